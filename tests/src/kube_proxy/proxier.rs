//! One sync of kube-proxy's IPVS mode, as a function of Services,
//! EndpointSlices and the kernel's table: what `syncProxyRules`,
//! `syncService`, `syncEndpoint` and the graceful-termination manager do.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipvs::{Destination, ForwardMethod, Protocol, Service as VirtualService, ServiceEntry, ServiceKey, Write};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::backend::IpvsOps;
use crate::apiserver::Cidr;

/// `IP_VS_SVC_F_PERSISTENT`: kube-proxy's ClientIP session affinity.
const FLAG_PERSISTENT: u32 = 0x0001;
/// `IP_VS_SVC_F_HASHED`: the kernel sets it on every service; kube-proxy's
/// library strips it before comparing.
const FLAG_HASHED: u32 = 0x0002;
/// kube-proxy's default ClientIP affinity timeout (3 h).
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// What the emulator is configured with (kube-proxy's flags and config file).
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// This node's name: `Local` traffic policies keep endpoints on it.
    pub node_name: String,
    /// Addresses NodePorts are served on (`--nodeport-addresses` narrowed to these).
    pub node_addresses: Vec<IpAddr>,
    /// `ipvs.scheduler` (kube-proxy's default: `rr`).
    pub scheduler: String,
    /// `ipvs.syncPeriod` (kube-proxy's default: 30 s).
    pub sync_period: Duration,
    /// How often draining destinations are checked for remaining connections
    /// (kube-proxy: 1 min).
    pub graceful_check_interval: Duration,
    /// The Service ClusterIP range: virtual services there that no Service
    /// wants are deleted, as kube-proxy deletes those bound to `kube-ipvs0`.
    pub service_cidr: Cidr,
    /// The dummy interface ClusterIPs, external IPs and load-balancer IPs are
    /// bound to (kube-proxy: `kube-ipvs0`); `None` binds nothing.
    pub dummy_interface: Option<String>,
    /// iproute2's `ip`, used to bind addresses.
    pub ip_command: std::path::PathBuf,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            node_name: "node-1".into(),
            node_addresses: Vec::new(),
            scheduler: "rr".into(),
            sync_period: Duration::from_secs(30),
            graceful_check_interval: Duration::from_secs(60),
            service_cidr: Cidr { base: u32::from(std::net::Ipv4Addr::new(10, 96, 0, 0)), prefix: 12 },
            dummy_interface: None,
            ip_command: "ip".into(),
        }
    }
}

/// The virtual service kube-proxy wants, with its destinations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredVirtualService {
    /// Scheduler, flags, timeout as kube-proxy sets them.
    pub service: VirtualService,
    /// One per endpoint in use, all weight 1, masquerade.
    pub destinations: BTreeSet<SocketAddr>,
    /// Whether the address is one kube-proxy binds to the dummy interface
    /// (ClusterIPs, external and load-balancer IPs; not node addresses).
    pub bind: bool,
}

/// What one sync did.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    /// The writes sent, in order.
    pub writes: Vec<Write>,
    /// Writes the kernel refused, with the reason.
    pub errors: Vec<String>,
    /// Virtual services wanted.
    pub services: usize,
    /// Destinations draining (weight 0, waiting for connections to end).
    pub draining: usize,
}

/// An endpoint of one Service port, as kube-proxy categorizes it.
#[derive(Debug, Clone)]
struct Endpoint {
    addr: SocketAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<String>,
}

fn protocol(p: Option<&str>) -> Protocol {
    match p {
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        _ => Protocol::Tcp,
    }
}

/// kube-proxy's endpoint choice: ready endpoints (on this node only for a
/// `Local` policy); if none is ready, the serving-and-terminating ones.
fn usable(eps: &[Endpoint], local_only: bool, node: &str) -> BTreeSet<SocketAddr> {
    let candidates: Vec<&Endpoint> = eps.iter().filter(|e| !local_only || e.node.as_deref() == Some(node)).collect();
    let ready: BTreeSet<SocketAddr> = candidates.iter().filter(|e| e.ready).map(|e| e.addr).collect();
    if !ready.is_empty() {
        return ready;
    }
    candidates.iter().filter(|e| e.serving && e.terminating).map(|e| e.addr).collect()
}

/// The virtual services and destinations kube-proxy's IPVS mode wants for
/// these Services and EndpointSlices on this node.
pub fn desired_state(cfg: &ProxyConfig, services: &[Service], slices: &[EndpointSlice]) -> BTreeMap<ServiceKey, DesiredVirtualService> {
    let mut out: BTreeMap<ServiceKey, DesiredVirtualService> = BTreeMap::new();
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let cluster_ips: Vec<IpAddr> = spec
            .cluster_ips
            .clone()
            .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        if cluster_ips.is_empty() {
            continue; // headless, or not allocated yet
        }
        let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let mine: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(ns)
                    && s.metadata.labels.as_ref().and_then(|l| l.get("kubernetes.io/service-name")).map(String::as_str) == Some(name)
            })
            .collect();
        let (flags, timeout) = if spec.session_affinity.as_deref() == Some("ClientIP") {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
            (FLAG_PERSISTENT, t)
        } else {
            (0, 0)
        };
        let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
        let node_port_type = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        let external_ips: Vec<IpAddr> = spec.external_ips.iter().flatten().filter_map(|ip| ip.parse().ok()).collect();
        let lb_ips: Vec<IpAddr> = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            // VIP-mode ingress IPs only (`ipMode` unset or `VIP`), as kube-proxy's
            // `IsVIPMode`: a `Proxy` load balancer sends its traffic to the NodePorts.
            .filter(|i| i.ip_mode.as_deref().is_none_or(|mode| mode == "VIP"))
            .filter_map(|i| i.ip.as_ref()?.parse().ok())
            .collect();
        for sp in spec.ports.iter().flatten() {
            let proto = protocol(sp.protocol.as_deref());
            let port_name = sp.name.clone().unwrap_or_default();
            let mut eps = Vec::new();
            for slice in &mine {
                let Some(target) = slice.ports.iter().flatten().find(|p| {
                    p.name.clone().unwrap_or_default() == port_name && protocol(p.protocol.as_deref()) == proto
                }) else {
                    continue;
                };
                let Some(tport) = target.port.and_then(|p| u16::try_from(p).ok()) else { continue };
                for e in slice.endpoints.iter().flatten() {
                    let c = e.conditions.as_ref();
                    for a in &e.addresses {
                        let Ok(ip) = a.parse::<IpAddr>() else { continue };
                        eps.push(Endpoint {
                            addr: SocketAddr::new(ip, tport),
                            ready: c.and_then(|c| c.ready).unwrap_or(true),
                            serving: c.and_then(|c| c.serving).unwrap_or(true),
                            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                            node: e.node_name.clone(),
                        });
                    }
                }
            }
            let Ok(port) = u16::try_from(sp.port) else { continue };
            let internal = usable(&eps, internal_local, &cfg.node_name);
            let external = usable(&eps, external_local, &cfg.node_name);
            let mut add = |addr: SocketAddr, dests: &BTreeSet<SocketAddr>, bind: bool| {
                let key = ServiceKey::new(proto, addr);
                let mut service = VirtualService::new(key, cfg.scheduler.clone());
                service.flags = flags;
                service.timeout = timeout;
                let dests: BTreeSet<SocketAddr> = dests.iter().filter(|d| d.is_ipv4() == addr.is_ipv4()).copied().collect();
                out.insert(key, DesiredVirtualService { service, destinations: dests, bind });
            };
            for ip in &cluster_ips {
                add(SocketAddr::new(*ip, port), &internal, true);
            }
            for ip in external_ips.iter().chain(&lb_ips) {
                add(SocketAddr::new(*ip, port), &external, true);
            }
            if node_port_type && let Some(np) = sp.node_port.and_then(|p| u16::try_from(p).ok()) {
                for ip in &cfg.node_addresses {
                    add(SocketAddr::new(*ip, np), &external, false);
                }
            }
        }
    }
    out
}

/// kube-proxy's state across syncs.
#[derive(Debug)]
pub struct Proxier {
    cfg: ProxyConfig,
    /// True until the first sync has run: that sync resets weights to 1.
    initial_sync: bool,
    /// Destinations draining: weight 0 until their connections end.
    graceful: BTreeSet<(ServiceKey, SocketAddr)>,
    /// Virtual services this process has wanted at some point (its own).
    seen: BTreeSet<ServiceKey>,
}

impl Proxier {
    /// A proxier that has not synced yet (as kube-proxy after a restart).
    pub fn new(cfg: ProxyConfig) -> Self {
        Self { cfg, initial_sync: true, graceful: BTreeSet::new(), seen: BTreeSet::new() }
    }

    /// The configuration.
    pub fn config(&self) -> &ProxyConfig {
        &self.cfg
    }

    /// Destinations draining now.
    pub fn draining(&self) -> &BTreeSet<(ServiceKey, SocketAddr)> {
        &self.graceful
    }

    fn owned(&self, key: &ServiceKey) -> bool {
        if self.seen.contains(key) {
            return true;
        }
        match key {
            ServiceKey::Address { address: IpAddr::V4(ip), .. } => {
                let c = self.cfg.service_cidr;
                let mask = if c.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(c.prefix)) };
                (u32::from(*ip) & mask) == c.base || self.cfg.node_addresses.contains(&IpAddr::V4(*ip))
            }
            ServiceKey::Address { address, .. } => self.cfg.node_addresses.contains(address),
            ServiceKey::Fwmark { .. } => false,
        }
    }

    /// One full sync: reads the kernel's table, writes the difference, and
    /// checks draining destinations.
    pub fn sync(&mut self, ipvs: &mut dyn IpvsOps, services: &[Service], slices: &[EndpointSlice]) -> Result<SyncReport, ipvs::IpvsError> {
        let desired = desired_state(&self.cfg, services, slices);
        let current: BTreeMap<ServiceKey, ServiceEntry> = ipvs.dump()?.into_iter().map(|e| (e.service.key, e)).collect();
        let mut writes = Vec::new();
        let mut deletions = Vec::new();
        for (key, want) in &desired {
            self.seen.insert(*key);
            let cur = current.get(key);
            match cur {
                None => writes.push(Write::AddService(want.service.clone())),
                Some(c) => {
                    let s = &c.service;
                    // syncService: any difference in scheduler, flags or timeout is reverted.
                    if s.scheduler != want.service.scheduler
                        || (s.flags & !FLAG_HASHED) != want.service.flags
                        || s.timeout != want.service.timeout
                    {
                        let mut fixed = want.service.clone();
                        fixed.netmask = s.netmask;
                        writes.push(Write::EditService(fixed));
                    }
                }
            }
            let cur_dests: BTreeMap<SocketAddr, &Destination> =
                cur.map(|c| c.destinations.iter().map(|d| (d.socket_addr(), d)).collect()).unwrap_or_default();
            for d in &want.destinations {
                let fresh = Destination::new(*d, ForwardMethod::Masquerade, 1);
                match cur_dests.get(d) {
                    None => writes.push(Write::AddDestination { service: *key, destination: fresh }),
                    Some(cd) => {
                        if self.graceful.remove(&(*key, *d)) {
                            // An endpoint back while draining: deleted and added afresh.
                            writes.push(Write::DeleteDestination { service: *key, destination: *d });
                            writes.push(Write::AddDestination { service: *key, destination: fresh });
                        } else if self.initial_sync && cd.weight != 1 {
                            // First sync after a restart: weights go back to 1.
                            writes.push(Write::set_weight(*key, cd, 1));
                        }
                    }
                }
            }
            for (addr, cd) in &cur_dests {
                if want.destinations.contains(addr) || self.graceful.contains(&(*key, *addr)) {
                    continue;
                }
                let tcp = matches!(key, ServiceKey::Address { protocol: Protocol::Tcp, .. });
                if tcp && cd.active_connections + cd.inactive_connections > 0 {
                    writes.push(Write::set_weight(*key, cd, 0));
                    self.graceful.insert((*key, *addr));
                } else {
                    writes.push(Write::DeleteDestination { service: *key, destination: *addr });
                }
            }
        }
        for key in current.keys() {
            if !desired.contains_key(key) && self.owned(key) {
                deletions.push(Write::DeleteService(*key));
                self.graceful.retain(|(k, _)| k != key);
                self.seen.remove(key);
            }
        }
        writes.extend(deletions);
        writes.extend(self.graceful_writes(&current));
        let results = ipvs.apply(&writes);
        let errors: Vec<String> = writes
            .iter()
            .zip(&results)
            .filter_map(|(w, r)| r.as_ref().err().map(|e| format!("{:?}: {e}", w.operation())))
            .collect();
        for e in &errors {
            tracing::warn!(error = %e, "kube-proxy emulator: a write failed");
        }
        self.initial_sync = false;
        Ok(SyncReport { writes, errors, services: desired.len(), draining: self.graceful.len() })
    }

    /// Deletes draining destinations whose connections have ended (or that
    /// are no longer in the kernel).
    fn graceful_writes(&mut self, current: &BTreeMap<ServiceKey, ServiceEntry>) -> Vec<Write> {
        let mut writes = Vec::new();
        let mut done = Vec::new();
        for (key, addr) in &self.graceful {
            let Some(d) = current.get(key).and_then(|e| e.destinations.iter().find(|d| d.socket_addr() == *addr)) else {
                done.push((*key, *addr));
                continue;
            };
            let tcp = matches!(key, ServiceKey::Address { protocol: Protocol::Tcp, .. });
            if !tcp || d.active_connections + d.inactive_connections == 0 {
                writes.push(Write::DeleteDestination { service: *key, destination: *addr });
                done.push((*key, *addr));
            }
        }
        for d in done {
            self.graceful.remove(&d);
        }
        writes
    }

    /// The graceful-termination manager's periodic check alone.
    pub fn check_draining(&mut self, ipvs: &mut dyn IpvsOps) -> Result<Vec<Write>, ipvs::IpvsError> {
        if self.graceful.is_empty() {
            return Ok(Vec::new());
        }
        let current: BTreeMap<ServiceKey, ServiceEntry> = ipvs.dump()?.into_iter().map(|e| (e.service.key, e)).collect();
        let writes = self.graceful_writes(&current);
        for (w, r) in writes.iter().zip(ipvs.apply(&writes)) {
            if let Err(e) = r {
                tracing::warn!(op = ?w.operation(), error = %e, "kube-proxy emulator: deleting a drained destination");
            }
        }
        Ok(writes)
    }
}
