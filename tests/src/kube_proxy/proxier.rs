//! One sync of kube-proxy's IPVS mode, as a function of Services,
//! EndpointSlices, the node and the kernel's table: what `syncProxyRules`,
//! `syncService`, `syncEndpoint`, `cleanLegacyService` and the
//! graceful-termination manager do. One [`Proxier`] per IP family, as
//! kube-proxy's dual-stack meta-proxier runs them ([`DualStackProxier`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipvs::{Destination, ForwardMethod, Protocol, Service as VirtualService, ServiceEntry, ServiceKey, Write};
use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::backend::IpvsOps;
use super::node::{IpCidr, IpFamily, NodeInfo, node_address_set, node_port_addresses};
use super::topology::{Endpoint, PortPolicy, categorize};

/// `IP_VS_SVC_F_PERSISTENT`: kube-proxy's ClientIP session affinity.
const FLAG_PERSISTENT: u32 = 0x0001;
/// `IP_VS_SVC_F_HASHED`: the kernel sets it on every service; kube-proxy's
/// library strips it before comparing.
const FLAG_HASHED: u32 = 0x0002;
/// kube-proxy's `FlagSourceHash` (`IP_VS_SVC_F_SCHED2`, mh's source-port
/// hashing), set on every virtual service when its scheduler is `mh`.
const FLAG_SOURCE_HASH: u32 = 0x0010;
/// kube-proxy's default ClientIP affinity timeout (3 h).
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// The label naming an EndpointSlice's Service.
const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services (and their EndpointSlices) with this label belong to another
/// proxy: kube-proxy's informers select them out.
const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// EndpointSlices of headless Services carry it; kube-proxy selects them out.
const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// What the emulator is configured with (kube-proxy's flags and config file).
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// This node's name: endpoints there are local (`Local` traffic
    /// policies), and node topology hints are matched against it.
    pub node_name: String,
    /// This node's labels while the API server has no Node named
    /// `node_name`; the running emulator watches that Node and uses its
    /// labels when it exists (kube-proxy only knows its Node's). The zone
    /// (`topology.kubernetes.io/zone`) is what zone hints are matched against.
    pub node_labels: BTreeMap<String, String>,
    /// The addresses NodePorts are served on, both families (a test's
    /// explicit list). `None` (the default) picks them as kube-proxy does, on
    /// every sync: the addresses of the node's interfaces, see
    /// [`node_port_addresses`](super::node_port_addresses).
    pub node_addresses: Option<Vec<IpAddr>>,
    /// `--nodeport-addresses`: CIDRs (both families) that narrow the
    /// interface addresses NodePorts are served on; none means all. Not used
    /// with an explicit `node_addresses`.
    pub nodeport_addresses: Vec<IpCidr>,
    /// `--ipvs-exclude-cidrs`: virtual services whose address is in one of
    /// these are never deleted. Every other virtual service of a proxier's
    /// family that no Service wants is (`cleanLegacyService`).
    pub exclude_cidrs: Vec<IpCidr>,
    /// `ipvs.scheduler` (kube-proxy's default: `rr`).
    pub scheduler: String,
    /// `ipvs.syncPeriod` (kube-proxy's default: 30 s).
    pub sync_period: Duration,
    /// How often draining destinations are checked for remaining connections
    /// (kube-proxy: 1 min).
    pub graceful_check_interval: Duration,
    /// The dummy interface ClusterIPs, external IPs and load-balancer IPs are
    /// bound to (kube-proxy: `kube-ipvs0`); `None` binds nothing. Its
    /// addresses (`kube-ipvs0`'s when `None`) are not node addresses.
    pub dummy_interface: Option<String>,
    /// iproute2's `ip`, used to bind addresses.
    pub ip_command: std::path::PathBuf,
    /// Which kube-proxy mode is emulated.
    pub mode: ProxyMode,
    /// `--service-cluster-ip-range` (nftables mode: traffic to an address
    /// there that no Service has is dropped).
    pub service_cidrs: Vec<IpCidr>,
    /// nftables' `nft`, for the nftables mode.
    pub nft_command: std::path::PathBuf,
}

/// kube-proxy's mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProxyMode {
    /// IPVS: the virtual services of every Service (the emulator's whole model).
    #[default]
    Ipvs,
    /// nftables: only what it does to traffic for Services it does not serve
    /// (see [`super::nftables_mode`]).
    Nftables,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            node_name: "node-1".into(),
            node_labels: BTreeMap::new(),
            node_addresses: None,
            nodeport_addresses: Vec::new(),
            exclude_cidrs: Vec::new(),
            scheduler: "rr".into(),
            sync_period: Duration::from_secs(30),
            graceful_check_interval: Duration::from_secs(60),
            dummy_interface: None,
            ip_command: "ip".into(),
            mode: ProxyMode::Ipvs,
            service_cidrs: Vec::new(),
            nft_command: "nft".into(),
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
    /// (ClusterIPs; external and load-balancer IPs that are not node
    /// addresses; never NodePorts' node addresses).
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

impl SyncReport {
    fn merge(&mut self, other: SyncReport) {
        self.writes.extend(other.writes);
        self.errors.extend(other.errors);
        self.services += other.services;
        self.draining += other.draining;
    }
}

fn protocol(p: Option<&str>) -> Protocol {
    match p {
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        _ => Protocol::Tcp,
    }
}

/// Whether kube-proxy's label selector (`!service.kubernetes.io/service-proxy-name,
/// !service.kubernetes.io/headless`) leaves the object out.
pub(super) fn selected_out(meta: &ObjectMeta) -> bool {
    meta.labels.as_ref().is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS))
}

/// `GetClusterIPByFamily`: the ClusterIP of `family`, from `clusterIPs` by
/// the index of the family in `ipFamilies`, or `clusterIP` when a Service
/// has no `ipFamilies`.
fn cluster_ip(spec: &ServiceSpec, family: IpFamily) -> Option<IpAddr> {
    let families = spec.ip_families.as_deref().unwrap_or_default();
    let ip: IpAddr = if families.is_empty() {
        spec.cluster_ip.as_deref()?.parse().ok()?
    } else {
        let i = families.iter().position(|f| f == family.api_name())?;
        spec.cluster_ips.as_ref()?.get(i)?.parse().ok()?
    };
    family.has(ip).then_some(ip)
}

/// The endpoints of one Service port in its EndpointSlices of one family, as
/// kube-proxy's EndpointSlice cache builds them: the slice port with the
/// Service port's name and protocol (unnamed slice ports and port 0 are
/// ignored), the first address of each endpoint, one endpoint per address and
/// port (a non-terminating one wins).
fn port_endpoints(
    slices: &[&EndpointSlice],
    name: &str,
    proto: Protocol,
    family: IpFamily,
    node: &str,
) -> Vec<Endpoint> {
    let mut out: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
    for slice in slices {
        for p in slice.ports.iter().flatten() {
            if p.name.as_deref() != Some(name) || protocol(p.protocol.as_deref()) != proto {
                continue;
            }
            let Some(port) = p.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else { continue };
            for e in slice.endpoints.iter().flatten() {
                let Some(ip) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else { continue };
                if !family.has(ip) {
                    continue;
                }
                let c = e.conditions.as_ref();
                let hints = e.hints.as_ref();
                let zones = hints.and_then(|h| h.for_zones.as_ref()).into_iter().flatten();
                let nodes = hints.and_then(|h| h.for_nodes.as_ref()).into_iter().flatten();
                let ep = Endpoint {
                    addr: SocketAddr::new(ip, port),
                    ready: c.and_then(|c| c.ready).unwrap_or(true),
                    serving: c.and_then(|c| c.serving).unwrap_or(true),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                    local: !node.is_empty() && e.node_name.as_deref() == Some(node),
                    zone_hints: zones.map(|z| z.name.clone()).collect(),
                    node_hints: nodes.map(|n| n.name.clone()).collect(),
                };
                if !out.contains_key(&ep.addr) || !ep.terminating {
                    out.insert(ep.addr, ep);
                }
            }
        }
    }
    out.into_values().collect()
}

/// The virtual services and destinations the `family` proxier of kube-proxy's
/// IPVS mode wants on this node: for every Service port with a ClusterIP of
/// the family, the ClusterIP, the external IPs and VIP-mode load-balancer IPs
/// of the family, and its NodePort on the family's node addresses; their
/// destinations the port's endpoints of the family that `CategorizeEndpoints`
/// and `syncEndpoint` choose (traffic policies, topology hints).
pub fn desired_state(
    cfg: &ProxyConfig,
    family: IpFamily,
    node: &NodeInfo,
    services: &[Service],
    slices: &[EndpointSlice],
) -> BTreeMap<ServiceKey, DesiredVirtualService> {
    let mut out: BTreeMap<ServiceKey, DesiredVirtualService> = BTreeMap::new();
    let node_ips = node_address_set(cfg, family, node);
    let node_port_ips = node_port_addresses(cfg, family, node);
    let zone = node.zone();
    let mut family_slices: Vec<&EndpointSlice> =
        slices.iter().filter(|s| s.address_type == family.api_name() && !selected_out(&s.metadata)).collect();
    family_slices.sort_by_key(|s| (s.metadata.namespace.clone(), s.metadata.name.clone()));
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
        // ShouldSkipService: headless, not allocated yet, ExternalName.
        let no_cluster_ip = matches!(spec.cluster_ip.as_deref(), None | Some("" | "None"));
        if selected_out(&svc.metadata) || type_ == "ExternalName" || no_cluster_ip {
            continue;
        }
        let Some(cluster_ip) = cluster_ip(spec, family) else { continue };
        let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let mine: Vec<&EndpointSlice> = family_slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_deref().unwrap_or_default() == ns
                    && s.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)).is_some_and(|n| n == name)
            })
            .copied()
            .collect();
        let (mut flags, timeout) = if spec.session_affinity.as_deref() == Some("ClientIP") {
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
        if cfg.scheduler == "mh" {
            flags |= FLAG_SOURCE_HASH;
        }
        let any_external_ips = spec.external_ips.as_ref().is_some_and(|ips| !ips.is_empty());
        // apiservice.ExternallyAccessible / ExternalPolicyLocal / InternalPolicyLocal.
        let externally_accessible =
            matches!(type_, "LoadBalancer" | "NodePort") || (type_ == "ClusterIP" && any_external_ips);
        let external_local = externally_accessible && spec.external_traffic_policy.as_deref() == Some("Local");
        let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        let external_ips: Vec<IpAddr> =
            spec.external_ips.iter().flatten().filter_map(|ip| ip.parse().ok()).filter(|ip| family.has(*ip)).collect();
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
            .filter(|ip| family.has(*ip))
            .collect();
        for sp in spec.ports.iter().flatten() {
            let Ok(port) = u16::try_from(sp.port) else { continue };
            let proto = protocol(sp.protocol.as_deref());
            let node_port = sp.node_port.and_then(|p| u16::try_from(p).ok()).unwrap_or(0);
            let policy = PortPolicy {
                internal_local,
                external_local,
                externally_accessible: node_port != 0 || !external_ips.is_empty() || !lb_ips.is_empty(),
            };
            let eps = port_endpoints(&mine, sp.name.as_deref().unwrap_or_default(), proto, family, &cfg.node_name);
            let chosen = categorize(&eps, policy, &cfg.node_name, zone);
            let mut add = |addr: SocketAddr, dests: &BTreeSet<SocketAddr>, bind: bool| {
                let key = ServiceKey::new(proto, addr);
                let mut service = VirtualService::new(key, cfg.scheduler.clone());
                service.flags = flags;
                service.timeout = timeout;
                out.insert(key, DesiredVirtualService { service, destinations: dests.clone(), bind });
            };
            add(SocketAddr::new(cluster_ip, port), chosen.for_virtual_service(internal_local), true);
            // An external or load-balancer IP that is a node address stays off the dummy interface.
            for ip in external_ips.iter().chain(&lb_ips) {
                add(SocketAddr::new(*ip, port), chosen.for_virtual_service(external_local), !node_ips.contains(ip));
            }
            if node_port != 0 {
                for ip in &node_port_ips {
                    add(SocketAddr::new(*ip, node_port), chosen.for_virtual_service(external_local), false);
                }
            }
        }
    }
    out
}

/// [`desired_state`] of both families' proxiers, together.
pub fn dual_stack_desired_state(
    cfg: &ProxyConfig,
    node: &NodeInfo,
    services: &[Service],
    slices: &[EndpointSlice],
) -> BTreeMap<ServiceKey, DesiredVirtualService> {
    IpFamily::ALL.into_iter().flat_map(|f| desired_state(cfg, f, node, services, slices)).collect()
}

fn is_tcp(key: &ServiceKey) -> bool {
    matches!(key, ServiceKey::Address { protocol: Protocol::Tcp, .. })
}

/// One IP family's proxier of kube-proxy's IPVS mode, with its state across
/// syncs. It sees and touches only virtual services of its family.
#[derive(Debug)]
pub struct Proxier {
    cfg: ProxyConfig,
    family: IpFamily,
    /// True until the first sync has run: that sync resets weights to 1.
    initial_sync: bool,
    /// Destinations draining: weight 0 until their connections end.
    graceful: BTreeSet<(ServiceKey, SocketAddr)>,
}

impl Proxier {
    /// The `family` proxier, not synced yet (as kube-proxy after a restart).
    pub fn new(cfg: ProxyConfig, family: IpFamily) -> Self {
        Self { cfg, family, initial_sync: true, graceful: BTreeSet::new() }
    }

    /// The configuration.
    pub fn config(&self) -> &ProxyConfig {
        &self.cfg
    }

    /// Its IP family.
    pub fn family(&self) -> IpFamily {
        self.family
    }

    /// Destinations draining now.
    pub fn draining(&self) -> &BTreeSet<(ServiceKey, SocketAddr)> {
        &self.graceful
    }

    /// Whether `cleanLegacyService` deletes `key` when no Service wants it:
    /// every address service of the family outside `--ipvs-exclude-cidrs`.
    /// (kube-proxy reads a fwmark service as address 0.0.0.0 or :: port 0, and
    /// its delete by that address fails: fwmark services stay.)
    fn owns(&self, key: &ServiceKey) -> bool {
        match key {
            ServiceKey::Address { address, .. } => {
                self.family.has(*address) && !self.cfg.exclude_cidrs.iter().any(|c| c.contains(*address))
            }
            ServiceKey::Fwmark { .. } => false,
        }
    }

    /// One full sync: reads the kernel's table and writes the difference for
    /// this family. Drained destinations are left to [`Proxier::check_draining`].
    pub fn sync(
        &mut self,
        ipvs: &mut dyn IpvsOps,
        services: &[Service],
        slices: &[EndpointSlice],
        node: &NodeInfo,
    ) -> Result<SyncReport, ipvs::IpvsError> {
        let desired = desired_state(&self.cfg, self.family, node, services, slices);
        let current: BTreeMap<ServiceKey, ServiceEntry> = ipvs.dump()?.into_iter().map(|e| (e.service.key, e)).collect();
        // A draining destination someone else removed is no longer draining.
        let in_kernel = |k: &ServiceKey, a: &SocketAddr| {
            current.get(k).is_some_and(|e| e.destinations.iter().any(|d| d.socket_addr() == *a))
        };
        self.graceful.retain(|(k, a)| in_kernel(k, a));
        let mut writes = Vec::new();
        for (key, want) in &desired {
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
                // GracefulDeleteRS: TCP with connections drains at weight 0; the rest goes now.
                if is_tcp(key) && cd.active_connections + cd.inactive_connections > 0 {
                    if cd.weight != 0 {
                        writes.push(Write::set_weight(*key, cd, 0));
                    }
                    self.graceful.insert((*key, *addr));
                } else {
                    writes.push(Write::DeleteDestination { service: *key, destination: *addr });
                }
            }
        }
        for key in current.keys() {
            if !desired.contains_key(key) && self.owns(key) {
                writes.push(Write::DeleteService(*key));
                self.graceful.retain(|(k, _)| k != key);
            }
        }
        let results = ipvs.apply(&writes);
        let errors: Vec<String> = writes
            .iter()
            .zip(&results)
            .filter_map(|(w, r)| r.as_ref().err().map(|e| format!("{:?}: {e}", w.operation())))
            .collect();
        for e in &errors {
            tracing::warn!(family = %self.family, error = %e, "kube-proxy emulator: a write failed");
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
            if !is_tcp(key) || d.active_connections + d.inactive_connections == 0 {
                writes.push(Write::DeleteDestination { service: *key, destination: *addr });
                done.push((*key, *addr));
            }
        }
        for d in done {
            self.graceful.remove(&d);
        }
        writes
    }

    /// The graceful-termination manager's periodic check.
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

/// kube-proxy's dual-stack meta-proxier: an IPv4 and an IPv6 [`Proxier`]
/// over the one kernel table, each synced in turn.
#[derive(Debug)]
pub struct DualStackProxier {
    v4: Proxier,
    v6: Proxier,
}

impl DualStackProxier {
    /// Both proxiers, not synced yet.
    pub fn new(cfg: ProxyConfig) -> Self {
        Self { v4: Proxier::new(cfg.clone(), IpFamily::V4), v6: Proxier::new(cfg, IpFamily::V6) }
    }

    /// The proxier of one family.
    pub fn proxier(&self, family: IpFamily) -> &Proxier {
        match family {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        }
    }

    /// Syncs the IPv4 proxier, then the IPv6 one; one report for both. Both
    /// run even when the first fails; the first error is returned.
    pub fn sync(
        &mut self,
        ipvs: &mut dyn IpvsOps,
        services: &[Service],
        slices: &[EndpointSlice],
        node: &NodeInfo,
    ) -> Result<SyncReport, ipvs::IpvsError> {
        let v4 = self.v4.sync(ipvs, services, slices, node);
        let v6 = self.v6.sync(ipvs, services, slices, node);
        let mut report = v4?;
        report.merge(v6?);
        Ok(report)
    }

    /// Both proxiers' graceful-termination checks.
    pub fn check_draining(&mut self, ipvs: &mut dyn IpvsOps) -> Result<Vec<Write>, ipvs::IpvsError> {
        let mut writes = self.v4.check_draining(ipvs)?;
        writes.extend(self.v6.check_draining(ipvs)?);
        Ok(writes)
    }
}
