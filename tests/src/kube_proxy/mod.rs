//! A **kube-proxy emulator** (a test double): what kube-proxy's IPVS mode does
//! on one node, against the real kernel through the `ipvs` crate; and, in its
//! nftables mode ([`nftables_mode`]), what kube-proxy's nftables mode does to
//! traffic for Services it does not serve.
//!
//! It watches Services, EndpointSlices and its own Node with kube-rs and, on
//! every change and every `sync_period`, makes the kernel's table what
//! kube-proxy would, with one proxier per IP family as its dual-stack
//! meta-proxier runs them (each sees only its family's ClusterIPs, external
//! and load-balancer IPs, node addresses and EndpointSlices): one virtual
//! service per ClusterIP/port, external IP, VIP-mode load-balancer IP and
//! NodePort on each node address (by default every interface address but
//! loopback, IPv6 link-local and the dummy interface's, narrowed by
//! `--nodeport-addresses`), with the configured scheduler; one masquerade
//! destination of weight 1 per endpoint `CategorizeEndpoints` chooses (ready
//! ones, serving-and-terminating ones when none is; this node's under `Local`
//! traffic policies; the hinted ones under topology hints, matched against the
//! Node's name and `topology.kubernetes.io/zone`); a removed TCP destination
//! with connections drained at weight 0 until they end, everything else
//! deleted at once; a scheduler, flags or timeout that differs reverted on
//! every sync; on the first sync after a start, every weight reset to 1; and
//! every other virtual service of a family deleted unless `exclude_cidrs`
//! covers it.
//!
//! ```no_run
//! # async fn demo(client: kube::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use ipvs_operator_tests::kube_proxy::{KubeProxyEmulator, ProxyConfig};
//! let cfg = ProxyConfig { sync_period: std::time::Duration::from_secs(1), ..ProxyConfig::default() };
//! let emulator = KubeProxyEmulator::start(cfg, client, Box::new(ipvs::IpvsClient::new()?));
//! emulator.wait_for_syncs(1, std::time::Duration::from_secs(10)).await;
//! emulator.stop().await?;
//! # Ok(()) }
//! ```

mod backend;
pub mod nftables_mode;
mod node;
mod proxier;
mod topology;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::Notify;

pub use backend::{FakeIpvs, IpvsOps};
pub use node::{
    BadCidr, DEFAULT_DUMMY_INTERFACE, InterfaceAddress, IpCidr, IpFamily, NodeInfo, ZONE_LABEL, interface_addresses,
    node_address_set, node_port_addresses,
};
pub use proxier::{
    DesiredVirtualService, DualStackProxier, ProxyConfig, ProxyMode, Proxier, SyncReport, desired_state,
    dual_stack_desired_state,
};
pub use topology::{Categorized, Endpoint, PortPolicy, TopologyMode, categorize, topology_mode};

/// An error of the emulator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the kernel's IPVS table failed.
    #[error("IPVS")]
    Ipvs(#[from] ipvs::IpvsError),
    /// The Service, EndpointSlice or Node caches never became ready.
    #[error("the Service, EndpointSlice and Node caches did not fill")]
    CacheNotReady,
    /// Writing kube-proxy's nftables tables failed (nftables mode).
    #[error("nftables: {0}")]
    Nftables(String),
    /// The emulator task ended abnormally.
    #[error("the emulator task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// What the emulator has done so far.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// Completed syncs.
    pub syncs: u64,
    /// The last sync's report.
    pub last: Option<SyncReport>,
    /// The last sync's error, if it failed.
    pub last_error: Option<String>,
}

/// A running emulator. Dropping it stops it (without waiting).
pub struct KubeProxyEmulator {
    sync_now: Arc<Notify>,
    status: Arc<Mutex<Status>>,
    synced: Arc<Notify>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), Error>>>,
}

impl KubeProxyEmulator {
    /// Starts watching Services, EndpointSlices and its Node, and syncing `ipvs`.
    pub fn start(cfg: ProxyConfig, client: kube::Client, ipvs: Box<dyn IpvsOps>) -> Self {
        let sync_now = Arc::new(Notify::new());
        let synced = Arc::new(Notify::new());
        let status = Arc::new(Mutex::new(Status::default()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run(cfg, client, ipvs, status.clone(), sync_now.clone(), synced.clone(), rx));
        Self { sync_now, status, synced, shutdown: Some(tx), task: Some(task) }
    }

    /// Asks for a sync now (as any Service or EndpointSlice change does).
    pub fn sync_now(&self) {
        self.sync_now.notify_one();
    }

    /// What it has done so far.
    pub fn status(&self) -> Status {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until at least `n` syncs have completed; false on timeout.
    pub async fn wait_for_syncs(&self, n: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.synced.notified();
            if self.status().syncs >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.status().syncs >= n;
            }
        }
    }

    /// Stops it and waits for the task (a restart is `stop` then `start`).
    pub async fn stop(mut self) -> Result<(), Error> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(t) => t.await?,
            None => Ok(()),
        }
    }
}

impl Drop for KubeProxyEmulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn owned_cache<K: Clone>(store: &reflector::Store<K>) -> Vec<K>
where
    K: kube::Resource + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    store.state().iter().map(|o| (**o).clone()).collect()
}

async fn run(
    cfg: ProxyConfig,
    client: kube::Client,
    mut ipvs: Box<dyn IpvsOps>,
    status: Arc<Mutex<Status>>,
    sync_now: Arc<Notify>,
    synced: Arc<Notify>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), Error> {
    let changed = Arc::new(Notify::new());
    let (svc_store, svc_writer) = reflector::store::<Service>();
    let (es_store, es_writer) = reflector::store::<EndpointSlice>();
    let (node_store, node_writer) = reflector::store::<Node>();
    let c1 = changed.clone();
    let services = reflector(svc_writer, watcher(Api::<Service>::all(client.clone()), watcher::Config::default()))
        .default_backoff()
        .for_each(move |_| {
            c1.notify_one();
            futures::future::ready(())
        });
    let c2 = changed.clone();
    let slices = reflector(es_writer, watcher(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default()))
        .default_backoff()
        .for_each(move |_| {
            c2.notify_one();
            futures::future::ready(())
        });
    // As kube-proxy, its own Node only: its labels carry the zone topology hints name.
    let c3 = changed.clone();
    let this_node = watcher::Config::default().fields(&format!("metadata.name={}", cfg.node_name));
    let nodes = reflector(node_writer, watcher(Api::<Node>::all(client), this_node))
        .default_backoff()
        .for_each(move |_| {
            c3.notify_one();
            futures::future::ready(())
        });
    let watchers = tokio::spawn(futures::future::join3(services, slices, nodes));
    let _abort = AbortOnDrop(watchers);
    let ready =
        futures::future::join3(svc_store.wait_until_ready(), es_store.wait_until_ready(), node_store.wait_until_ready());
    tokio::select! {
        r = ready => {
            if r.0.is_err() || r.1.is_err() || r.2.is_err() {
                return Err(Error::CacheNotReady);
            }
        }
        _ = &mut shutdown => return Ok(()),
    }
    let mut proxier = DualStackProxier::new(cfg.clone());
    let ipvs_mode = cfg.mode == ProxyMode::Ipvs;
    if let Some(dev) = cfg.dummy_interface.as_ref().filter(|_| ipvs_mode) {
        ensure_dummy(&cfg, dev);
    }
    let mut next_graceful = tokio::time::Instant::now() + cfg.graceful_check_interval;
    loop {
        let svcs = owned_cache(&svc_store);
        let slices = owned_cache(&es_store);
        let node = node_info(&cfg, &node_store);
        // As kube-proxy: a new Service's address is bound before its destinations
        // exist, and an old one unbound after its virtual service is gone. So
        // once the table shows destinations, the address takes connections.
        let bound = cfg.dummy_interface.as_deref().filter(|_| ipvs_mode).map(|dev| {
            let want: BTreeSet<IpAddr> = dual_stack_desired_state(&cfg, &node, &svcs, &slices)
                .values()
                .filter(|d| d.bind)
                .filter_map(|d| d.service.address().map(|a| a.ip()))
                .collect();
            let present = bind_addresses(&cfg, dev, &want);
            (dev, want, present)
        });
        let result = match cfg.mode {
            ProxyMode::Ipvs => proxier.sync(&mut *ipvs, &svcs, &slices, &node).map_err(Error::from),
            ProxyMode::Nftables => {
                let script = nftables_mode::cluster_ips_check_script(&svcs, &cfg.service_cidrs);
                nftables_mode::apply(&cfg.nft_command, &script).map(|()| SyncReport::default()).map_err(Error::Nftables)
            }
        };
        if let Some((dev, want, present)) = bound {
            unbind_addresses(&cfg, dev, &want, &present);
        }
        {
            let mut st = status.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            st.syncs += 1;
            match result {
                Ok(r) => {
                    tracing::debug!(writes = r.writes.len(), services = r.services, draining = r.draining, "kube-proxy emulator synced");
                    st.last = Some(r);
                    st.last_error = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kube-proxy emulator: sync failed");
                    st.last_error = Some(e.to_string());
                }
            }
        }
        synced.notify_waiters();
        let next_sync = tokio::time::Instant::now() + cfg.sync_period;
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = changed.notified() => {
                    // Let a burst of events settle, as kube-proxy's bounded runner does.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    break;
                }
                _ = sync_now.notified() => break,
                _ = tokio::time::sleep_until(next_sync) => break,
                _ = tokio::time::sleep_until(next_graceful) => {
                    next_graceful = tokio::time::Instant::now() + cfg.graceful_check_interval;
                    if let Err(e) = proxier.check_draining(&mut *ipvs) {
                        tracing::warn!(error = %e, "kube-proxy emulator: checking draining destinations");
                    }
                }
            }
        }
    }
}

/// The node as the next sync sees it: its Node's labels (the configured ones
/// while there is no such Node), and its interfaces' addresses when NodePorts
/// follow them.
fn node_info(cfg: &ProxyConfig, nodes: &reflector::Store<Node>) -> NodeInfo {
    let node = nodes.state().into_iter().find(|n| n.metadata.name.as_deref() == Some(cfg.node_name.as_str()));
    let labels = match node {
        Some(n) => n.metadata.labels.clone().unwrap_or_default(),
        None => cfg.node_labels.clone(),
    };
    let interfaces = if cfg.node_addresses.is_some() {
        Vec::new()
    } else {
        interface_addresses().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "kube-proxy emulator: listing the node's addresses");
            Vec::new()
        })
    };
    NodeInfo { labels, interfaces }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn ip(cfg: &ProxyConfig, args: &[&str]) -> Option<String> {
    match Command::new(&cfg.ip_command).args(args).output() {
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).to_string()),
        Ok(o) => {
            tracing::debug!(?args, stderr = %String::from_utf8_lossy(&o.stderr), "ip failed");
            None
        }
        Err(e) => {
            tracing::warn!(command = %cfg.ip_command.display(), error = %e, "cannot run ip");
            None
        }
    }
}

/// Creates the dummy interface if missing (kube-proxy leaves it down: local
/// routes for its addresses exist all the same).
fn ensure_dummy(cfg: &ProxyConfig, dev: &str) {
    if ip(cfg, &["link", "show", dev]).is_none() {
        let _ = ip(cfg, &["link", "add", dev, "type", "dummy"]);
    }
}

/// Binds the wanted addresses missing from the dummy interface; returns the
/// addresses it had before.
fn bind_addresses(cfg: &ProxyConfig, dev: &str, want: &BTreeSet<IpAddr>) -> BTreeSet<IpAddr> {
    let present: BTreeSet<IpAddr> = ip(cfg, &["-o", "addr", "show", "dev", dev])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            it.by_ref().find(|w| *w == "inet" || *w == "inet6")?;
            it.next()?.split('/').next()?.parse().ok()
        })
        .collect();
    for a in want.difference(&present) {
        let _ = ip(cfg, &["addr", "add", &host_cidr(*a), "dev", dev]);
    }
    present
}

/// Unbinds the addresses the dummy interface had that are no longer wanted.
fn unbind_addresses(cfg: &ProxyConfig, dev: &str, want: &BTreeSet<IpAddr>, present: &BTreeSet<IpAddr>) {
    for a in present.difference(want) {
        let _ = ip(cfg, &["addr", "del", &host_cidr(*a), "dev", dev]);
    }
}

fn host_cidr(a: IpAddr) -> String {
    if a.is_ipv4() { format!("{a}/32") } else { format!("{a}/128") }
}
