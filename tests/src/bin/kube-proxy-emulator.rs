//! `kube-proxy-emulator`: kube-proxy's IPVS mode on one node, emulated (a
//! test double), against the real kernel; or, with `--mode nftables`, what
//! its nftables mode does to traffic for Services it does not serve.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use ipvs_operator_tests::kube_proxy::{IpCidr, KubeProxyEmulator, ProxyConfig, ProxyMode};

/// Does what kube-proxy's IPVS mode does on one node (a test double).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// API server URL (plain HTTP, e.g. the test API server); default: the kubeconfig.
    #[arg(long)]
    server: Option<String>,
    /// This node's name (Local traffic policies keep endpoints on it; its Node's labels give the zone).
    #[arg(long, env = "NODE_NAME", default_value = "node-1")]
    node_name: String,
    /// A label of this node while the API server has no Node of that name, e.g.
    /// topology.kubernetes.io/zone=zone-a (repeatable).
    #[arg(long = "node-label", value_parser = parse_label)]
    node_labels: Vec<(String, String)>,
    /// An address NodePorts are served on, either family (repeatable). Without one, as kube-proxy:
    /// every interface address but loopback, IPv6 link-local and the dummy interface's.
    #[arg(long = "node-address")]
    node_addresses: Vec<IpAddr>,
    /// kube-proxy's --nodeport-addresses: CIDRs, comma-separated or repeated, that narrow the
    /// interface addresses NodePorts are served on.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<IpCidr>,
    /// kube-proxy's --ipvs-exclude-cidrs: virtual services there are never deleted (every other
    /// virtual service no Service wants is).
    #[arg(long, value_delimiter = ',')]
    ipvs_exclude_cidrs: Vec<IpCidr>,
    /// The IPVS scheduler for every virtual service (kube-proxy's ipvs.scheduler).
    #[arg(long, default_value = "rr")]
    scheduler: String,
    /// Full sync period (kube-proxy's ipvs.syncPeriod): 30s, 500ms, 2m.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    sync_period: Duration,
    /// How often draining destinations are checked for remaining connections.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    graceful_check_interval: Duration,
    /// Bind ClusterIPs and external IPs to this dummy interface (kube-proxy: kube-ipvs0).
    #[arg(long)]
    dummy_interface: Option<String>,
    /// iproute2's ip, for --dummy-interface.
    #[arg(long, default_value = "ip")]
    ip_command: PathBuf,
    /// Which kube-proxy mode: ipvs (the whole IPVS proxier) or nftables (only
    /// its filtering of traffic to service-range addresses it does not serve,
    /// through `nft`).
    #[arg(long, default_value = "ipvs", value_parser = parse_mode)]
    mode: ProxyMode,
    /// kube-proxy's service CIDRs (--service-cluster-ip-range), comma-separated:
    /// in nftables mode, traffic to an address there that no Service it serves has is dropped.
    #[arg(long, value_delimiter = ',')]
    service_cidrs: Vec<IpCidr>,
    /// nftables' nft, for --mode nftables.
    #[arg(long, default_value = "nft")]
    nft_command: PathBuf,
    /// Sync once, then exit.
    #[arg(long)]
    once: bool,
}

fn parse_mode(s: &str) -> Result<ProxyMode, String> {
    match s {
        "ipvs" => Ok(ProxyMode::Ipvs),
        "nftables" => Ok(ProxyMode::Nftables),
        _ => Err(format!("unknown mode {s:?} (ipvs, nftables)")),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("bad label {s:?} (key=value)"))?;
    Ok((k.to_string(), v.to_string()))
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
        node_labels: args.node_labels.into_iter().collect::<BTreeMap<_, _>>(),
        node_addresses: (!args.node_addresses.is_empty()).then_some(args.node_addresses),
        nodeport_addresses: args.nodeport_addresses,
        exclude_cidrs: args.ipvs_exclude_cidrs,
        scheduler: args.scheduler,
        sync_period: args.sync_period,
        graceful_check_interval: args.graceful_check_interval,
        dummy_interface: args.dummy_interface,
        ip_command: args.ip_command,
        mode: args.mode,
        service_cidrs: args.service_cidrs,
        nft_command: args.nft_command,
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
