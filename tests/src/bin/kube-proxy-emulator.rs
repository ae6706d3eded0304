//! `kube-proxy-emulator`: kube-proxy's IPVS mode on one node, emulated (a
//! test double), against the real kernel.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use ipvs_operator_tests::kube_proxy::{KubeProxyEmulator, ProxyConfig};

/// Does what kube-proxy's IPVS mode does on one node (a test double).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// API server URL (plain HTTP, e.g. the test API server); default: the kubeconfig.
    #[arg(long)]
    server: Option<String>,
    /// This node's name (Local traffic policies keep endpoints on it).
    #[arg(long, env = "NODE_NAME", default_value = "node-1")]
    node_name: String,
    /// An address NodePorts are served on (repeatable).
    #[arg(long = "node-address")]
    node_addresses: Vec<IpAddr>,
    /// The IPVS scheduler for every virtual service (kube-proxy's ipvs.scheduler).
    #[arg(long, default_value = "rr")]
    scheduler: String,
    /// Full sync period (kube-proxy's ipvs.syncPeriod): 30s, 500ms, 2m.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    sync_period: Duration,
    /// How often draining destinations are checked for remaining connections.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    graceful_check_interval: Duration,
    /// The Service ClusterIP range (stale virtual services there are deleted).
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: String,
    /// Bind ClusterIPs and external IPs to this dummy interface (kube-proxy: kube-ipvs0).
    #[arg(long)]
    dummy_interface: Option<String>,
    /// iproute2's ip, for --dummy-interface.
    #[arg(long, default_value = "ip")]
    ip_command: PathBuf,
    /// Sync once, then exit.
    #[arg(long)]
    once: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit() && c != '.').map(|i| s.split_at(i)).unwrap_or((s, "s"));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let client = match &args.server {
        Some(url) => ipvs_operator_tests::apiserver::client_for(url).context("client for --server")?,
        None => kube::Client::try_default().await.context("client from the kubeconfig")?,
    };
    let cfg = ProxyConfig {
        node_name: args.node_name,
        node_addresses: args.node_addresses,
        scheduler: args.scheduler,
        sync_period: args.sync_period,
        graceful_check_interval: args.graceful_check_interval,
        service_cidr: args.service_cidr.parse().context("--service-cidr")?,
        dummy_interface: args.dummy_interface,
        ip_command: args.ip_command,
    };
    let ipvs = ipvs::IpvsClient::new().context("opening IPVS")?;
    let emulator = KubeProxyEmulator::start(cfg, client, Box::new(ipvs));
    if args.once {
        anyhow::ensure!(emulator.wait_for_syncs(1, Duration::from_secs(60)).await, "no sync within 60 s");
        let st = emulator.status();
        emulator.stop().await?;
        if let Some(e) = st.last_error {
            anyhow::bail!("sync failed: {e}");
        }
        return Ok(());
    }
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
    }
    emulator.stop().await?;
    Ok(())
}
