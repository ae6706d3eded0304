//! `test-apiserver`: the Kubernetes test API server (a test double), standalone.
//!
//! Prints `listening on http://ADDR` once ready; the test controls live under
//! `/_test/` (see `ipvs_operator_tests::apiserver::admin`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use ipvs_operator_tests::apiserver::{Cidr6, Config, Grace, NodeConfig, TestApiServer, kubeconfig_yaml};

/// A Kubernetes test API server (a test double, not a real API server).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:6443 (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Manifest files to load at start (repeatable).
    #[arg(long)]
    load: Vec<PathBuf>,
    /// Nodes as NAME=IP or NAME=IP@ZONE (repeatable); default: node-1=192.0.2.1.
    #[arg(long = "node")]
    nodes: Vec<String>,
    /// Range pod IPs come from.
    #[arg(long, default_value = "10.244.0.0/16")]
    pod_cidr: String,
    /// Range ClusterIPs come from.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: String,
    /// Range pods' IPv6 addresses come from (`none`: pods get IPv4 only).
    #[arg(long, default_value = "fd00:10:244::/64")]
    pod_cidr_v6: String,
    /// Range IPv6 ClusterIPs come from: the cluster is dual-stack, IPv4 first
    /// (`none`: IPv4 single-stack).
    #[arg(long, default_value = "fd00:10:96::/112")]
    service_cidr_v6: String,
    /// Seconds a deleted pod stays terminating when the delete names no grace period.
    #[arg(long, default_value_t = 1)]
    pod_grace_seconds: u64,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 5)]
    bookmark_seconds: u64,
    /// Seconds a deleted namespace stays Terminating before its contents go,
    /// as the namespace controller takes a moment; so that `kubectl delete -k`
    /// deletes each object itself, as against a real cluster (0: at once).
    #[arg(long, default_value_t = 1)]
    namespace_cleanup_seconds: u64,
    /// Milliseconds between a pod or Service change and the EndpointSlice
    /// writes that follow it (0: in the same instant).
    #[arg(long, default_value_t = 50)]
    endpoint_slice_delay_ms: u64,
    /// Endpoints per EndpointSlice at most.
    #[arg(long, default_value_t = 100)]
    max_endpoints_per_slice: usize,
    /// Seed of the server's random choices (default: from the time; the
    /// IPVS_TEST_SEED environment variable overrides it). Printed at start.
    #[arg(long)]
    seed: Option<u64>,
    /// Write a kubeconfig pointing at the server to this file.
    #[arg(long)]
    write_kubeconfig: Option<PathBuf>,
}

/// An IPv6 range, or none (`none` or empty).
fn optional_cidr(s: &str) -> anyhow::Result<Option<Cidr6>> {
    if s.is_empty() || s.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    Ok(Some(s.parse()?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut cfg = Config {
        pod_cidr: args.pod_cidr.parse().context("--pod-cidr")?,
        service_cidr: args.service_cidr.parse().context("--service-cidr")?,
        pod_cidr_v6: optional_cidr(&args.pod_cidr_v6).context("--pod-cidr-v6")?,
        service_cidr_v6: optional_cidr(&args.service_cidr_v6).context("--service-cidr-v6")?,
        pod_grace: if args.pod_grace_seconds == 0 {
            Grace::Immediate
        } else {
            Grace::For(Duration::from_secs(args.pod_grace_seconds))
        },
        bookmark_interval: Duration::from_secs(args.bookmark_seconds.max(1)),
        namespace_cleanup: Duration::from_secs(args.namespace_cleanup_seconds),
        endpoint_slice_delay: Duration::from_millis(args.endpoint_slice_delay_ms),
        max_endpoints_per_slice: args.max_endpoints_per_slice.max(1),
        seed: args.seed,
        ..Config::default()
    };
    if !args.nodes.is_empty() {
        cfg.nodes = args
            .nodes
            .iter()
            .map(|n| {
                let (name, rest) = n.split_once('=').context("--node wants NAME=IP")?;
                let (ip, zone) = match rest.split_once('@') {
                    Some((ip, zone)) => (ip, Some(zone)),
                    None => (rest, None),
                };
                let node = NodeConfig::new(name, ip.parse().context("--node IP")?);
                Ok(match zone {
                    Some(z) => node.with_zone(z),
                    None => node,
                })
            })
            .collect::<anyhow::Result<_>>()?;
    }
    let server = TestApiServer::start_on(args.listen, cfg).await.context("starting the server")?;
    for f in &args.load {
        let loaded = server.handle().load_file(f).with_context(|| format!("loading {}", f.display()))?;
        tracing::info!(file = %f.display(), objects = loaded.len(), "loaded manifests");
    }
    if let Some(path) = &args.write_kubeconfig {
        std::fs::write(path, kubeconfig_yaml(server.url())).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("listening on {}", server.url());
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
    server.shutdown().await;
    Ok(())
}
