//! A **kube-proxy emulator** (a test double): what kube-proxy's IPVS mode does
//! on one node, against the real kernel through the `ipvs` crate.
//!
//! It watches Services and EndpointSlices with kube-rs and, on every change and
//! every `sync_period`, makes the kernel's table what kube-proxy would: one
//! virtual service per ClusterIP/port, external IP, load-balancer IP and
//! NodePort on each node address, with the configured scheduler; one
//! masquerade destination of weight 1 per ready endpoint (serving-and-terminating
//! ones only when none is ready); a removed TCP destination with connections
//! drained at weight 0 until they end, everything else deleted at once; a
//! scheduler, flags or timeout that differs reverted on every sync; and, on the
//! first sync after a start, every weight reset to 1.
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
mod proxier;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::Notify;

pub use backend::{FakeIpvs, IpvsOps};
pub use proxier::{DesiredVirtualService, ProxyConfig, Proxier, SyncReport, desired_state};

/// An error of the emulator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the kernel's IPVS table failed.
    #[error("IPVS")]
    Ipvs(#[from] ipvs::IpvsError),
    /// The Service or EndpointSlice caches never became ready.
    #[error("the Service and EndpointSlice caches did not fill")]
    CacheNotReady,
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
    /// Starts watching Services and EndpointSlices and syncing `ipvs`.
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
    let c1 = changed.clone();
    let services = reflector(svc_writer, watcher(Api::<Service>::all(client.clone()), watcher::Config::default()))
        .default_backoff()
        .for_each(move |_| {
            c1.notify_one();
            futures::future::ready(())
        });
    let c2 = changed.clone();
    let slices = reflector(es_writer, watcher(Api::<EndpointSlice>::all(client), watcher::Config::default()))
        .default_backoff()
        .for_each(move |_| {
            c2.notify_one();
            futures::future::ready(())
        });
    let watchers = tokio::spawn(futures::future::join(services, slices));
    let _abort = AbortOnDrop(watchers);
    tokio::select! {
        r = futures::future::join(svc_store.wait_until_ready(), es_store.wait_until_ready()) => {
            if r.0.is_err() || r.1.is_err() {
                return Err(Error::CacheNotReady);
            }
        }
        _ = &mut shutdown => return Ok(()),
    }
    let mut proxier = Proxier::new(cfg.clone());
    if let Some(dev) = &cfg.dummy_interface {
        ensure_dummy(&cfg, dev);
    }
    let mut next_graceful = tokio::time::Instant::now() + cfg.graceful_check_interval;
    loop {
        let svcs = owned_cache(&svc_store);
        let slices = owned_cache(&es_store);
        // As kube-proxy: a new Service's address is bound before its destinations
        // exist, and an old one unbound after its virtual service is gone. So
        // once the table shows destinations, the address takes connections.
        let bound = cfg.dummy_interface.as_deref().map(|dev| {
            let want: BTreeSet<IpAddr> = desired_state(&cfg, &svcs, &slices)
                .values()
                .filter(|d| d.bind)
                .filter_map(|d| d.service.address().map(|a| a.ip()))
                .collect();
            let present = bind_addresses(&cfg, dev, &want);
            (dev, want, present)
        });
        let result = proxier.sync(&mut *ipvs, &svcs, &slices);
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
