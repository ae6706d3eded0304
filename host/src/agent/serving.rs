//! Serving Services itself (standalone mode, see [`super::standalone`]):
//! their addresses on the agent's dummy interface and their virtual services
//! and destinations, made whole from the plans at each sync.
//!
//! What is ours comes from the kernel, not from memory: a virtual service at
//! an address on `ipvs-op0` (or one the plans want) is ours, and so are the
//! addresses there. A restarted agent adopts them and writes only what
//! differs. A Service switched back to kube-proxy is handed over: its virtual
//! services stay, and its addresses stay on `ipvs-op0`, until kube-proxy has
//! its addresses on `kube-ipvs0` (IPVS mode adopts a virtual service of the
//! same key, so no connection fails); then the addresses go and the virtual
//! services are kube-proxy's. If kube-proxy has not taken them within the
//! handover timeout (it is in another mode, whose rules catch the traffic
//! before IPVS does), they are deleted.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipvs::{IpvsClient, IpvsError, OwnedService, ServiceKey, Write};

use super::interface::{self, Interface, InterfaceError, INTERFACE};
use super::node_addresses::KUBE_PROXY_DUMMY;
use super::plan::{ServicePlan, Standalone};
use super::standalone::{interface_addresses, virtual_services};
use super::WsKey;
use crate::metrics::Metrics;

/// What one sync did.
#[derive(Debug, Default)]
pub(super) struct ServingOutcome {
    /// IPVS and address writes sent.
    pub(super) writes: usize,
    /// Writes the kernel refused.
    pub(super) errors: usize,
    /// The first failed write of each Service, for an Event.
    pub(super) failed: HashMap<WsKey, String>,
}

/// Why a sync could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// IPVS could not be opened or read.
    #[error("reading the IPVS table: {0}")]
    Ipvs(#[from] IpvsError),
    /// The dummy interface could not be read or made.
    #[error(transparent)]
    Interface(#[from] InterfaceError),
    /// No runtime for rtnetlink.
    #[error("starting the rtnetlink runtime: {0}")]
    Runtime(std::io::Error),
}

/// The kernel side of the Services the agent serves itself.
pub(super) struct Serving {
    metrics: Arc<Metrics>,
    /// rtnetlink is async: its connection runs on this runtime, during each sync.
    runtime: Option<tokio::runtime::Runtime>,
    handle: Option<rtnetlink::Handle>,
    ipvs: Option<IpvsClient>,
    drain_timeout: Duration,
    handover_timeout: Duration,
    /// When each draining destination began draining (the timeout starts
    /// again after a restart: the kernel does not say).
    draining_since: HashMap<(ServiceKey, SocketAddr), Instant>,
    /// Since when each Service no longer labelled has been handed over.
    handing_over: HashMap<WsKey, Instant>,
    /// The interface existed at the last sync (or the agent just started):
    /// passes without Services to serve still look, to clean up.
    pub(super) interface_seen: bool,
    /// NodePort virtual services (at the node's own addresses) made at the
    /// last sync: ours to delete when no longer wanted. Held in memory until
    /// the nftables table records them in the kernel (issue 20): one left
    /// while the agent was down stays until `--cleanup`.
    node_ports: HashSet<ServiceKey>,
    /// The node's sysctls were checked (once, when there is first something to serve).
    settings_checked: bool,
}

impl Serving {
    pub(super) fn new(metrics: Arc<Metrics>, drain_timeout: Duration, handover_timeout: Duration) -> Self {
        Serving {
            metrics,
            runtime: None,
            handle: None,
            ipvs: None,
            drain_timeout,
            handover_timeout,
            draining_since: HashMap::new(),
            handing_over: HashMap::new(),
            interface_seen: true,
            node_ports: HashSet::new(),
            settings_checked: false,
        }
    }

    /// Whether a pass with these plans has anything to do here.
    pub(super) fn needed<'a>(&self, mut plans: impl Iterator<Item = (&'a WsKey, &'a ServicePlan)>) -> bool {
        self.interface_seen || plans.any(|(_, p)| p.standalone.is_some())
    }

    /// Make the kernel serve the plans labelled standalone (and those being
    /// handed over), and nothing else of what is ours.
    pub(super) fn sync<'a>(
        &mut self,
        plans: impl Iterator<Item = (&'a WsKey, &'a ServicePlan)> + Clone,
        node_addresses: &HashSet<IpAddr>,
    ) -> Result<ServingOutcome, ServingError> {
        let result = self.sync_inner(plans, node_addresses);
        if result.is_err() {
            // Fresh sockets next time.
            self.ipvs = None;
            self.handle = None;
        }
        result
    }

    fn sync_inner<'a>(
        &mut self,
        plans: impl Iterator<Item = (&'a WsKey, &'a ServicePlan)> + Clone,
        node_addresses: &HashSet<IpAddr>,
    ) -> Result<ServingOutcome, ServingError> {
        if self.runtime.is_none() {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ServingError::Runtime)?;
            self.runtime = Some(runtime);
        }
        let Some(runtime) = self.runtime.as_ref() else { return Ok(ServingOutcome::default()) };
        let handle = match &self.handle {
            Some(handle) => handle.clone(),
            None => {
                let handle = runtime.block_on(async { interface::connect() })?;
                self.handle = Some(handle.clone());
                handle
            }
        };
        let serve_any = plans.clone().any(|(_, p)| p.standalone.is_some());
        let ours = runtime.block_on(async {
            if serve_any {
                Interface::ensure(handle.clone(), INTERFACE).await.map(Some)
            } else {
                Interface::existing(handle.clone(), INTERFACE).await
            }
        })?;
        let Some(ours) = ours else {
            self.interface_seen = false;
            self.handing_over.clear();
            return Ok(ServingOutcome::default());
        };
        self.interface_seen = true;
        let (have, kube_proxy_has) = runtime.block_on(async {
            let have: BTreeSet<IpAddr> = ours.addresses().await?.into_iter().map(|(ip, _)| ip).collect();
            let kube_proxy_has: BTreeSet<IpAddr> = match Interface::existing(handle.clone(), KUBE_PROXY_DUMMY).await? {
                Some(dummy) => dummy.addresses().await?.into_iter().map(|(ip, _)| ip).collect(),
                None => BTreeSet::new(),
            };
            Ok::<_, InterfaceError>((have, kube_proxy_has))
        })?;

        // Which plans are served: the labelled ones, and those switched back
        // to kube-proxy that it has not taken yet.
        let now = Instant::now();
        let mut served: Vec<(&WsKey, &ServicePlan, Standalone)> = Vec::new();
        let mut still_handing_over = HashSet::new();
        for (key, plan) in plans {
            if let Some(standalone) = plan.standalone {
                served.push((key, plan, standalone));
                continue;
            }
            let addresses = interface_addresses(plan);
            if addresses.is_disjoint(&have) {
                continue;
            }
            if addresses.is_subset(&kube_proxy_has) {
                tracing::info!(service = %key, "kube-proxy has taken the Service's addresses: handed over");
                continue;
            }
            let since = *self.handing_over.entry(key.clone()).or_insert_with(|| {
                tracing::info!(service = %key, "switched back to kube-proxy: served until kube-proxy takes it");
                now
            });
            if now.duration_since(since) < self.handover_timeout {
                still_handing_over.insert(key.clone());
                served.push((key, plan, Standalone::default()));
            } else if still_handing_over.insert(key.clone()) {
                tracing::warn!(
                    service = %key,
                    timeout_s = self.handover_timeout.as_secs(),
                    "kube-proxy has not taken the Service's addresses: no longer served here (is kube-proxy in IPVS mode?)"
                );
            }
        }
        self.handing_over.retain(|k, _| still_handing_over.contains(k));

        if !served.is_empty() && !self.settings_checked {
            self.settings_checked = true;
            let missing = crate::node_setup::missing_sysctls(std::path::Path::new("/proc/sys"));
            if !missing.is_empty() {
                let missing: Vec<String> = missing.iter().map(|(name, want, is)| format!("{name}={want} (is {is})")).collect();
                tracing::warn!(
                    ?missing,
                    "Services served here need these sysctls (hairpin and NodePort traffic, ARP): run `ipvs-operator node-setup` on the node (deploy/components/node-setup)"
                );
            }
        }
        let wanted_addresses: BTreeSet<IpAddr> = served.iter().flat_map(|(_, p, _)| interface_addresses(p)).collect();
        // Ours: at an address on our interface that kube-proxy does not have, or wanted.
        let our_address = |ip: &IpAddr| (have.contains(ip) || wanted_addresses.contains(ip)) && !kube_proxy_has.contains(ip);
        let ipvs = match self.ipvs.as_mut() {
            Some(ipvs) => ipvs,
            None => self.ipvs.insert(IpvsClient::new()?),
        };
        // Read only what may be ours: at our addresses, and at the node's own
        // only on the node ports served (kube-proxy's NodePorts are there too).
        let served_node_ports: HashSet<(ipvs::Protocol, u16)> = served
            .iter()
            .flat_map(|(_, p, _)| p.ports.iter().filter_map(|port| Some((port.protocol, port.node_port?))))
            .collect();
        let remembered = &self.node_ports;
        let maybe_ours = |key: &ServiceKey| match *key {
            ServiceKey::Address { protocol, address, port } => {
                our_address(&address)
                    || (node_addresses.contains(&address)
                        && (served_node_ports.contains(&(protocol, port)) || remembered.contains(key)))
            }
            ServiceKey::Fwmark { .. } => false,
        };
        let actual = ipvs.dump_services(|s| maybe_ours(&s.key))?;
        let current: HashMap<(ServiceKey, SocketAddr), u16> = actual
            .iter()
            .flat_map(|e| e.destinations.iter().map(|d| ((e.service.key, d.socket_addr()), u16::try_from(d.weight).unwrap_or(u16::MAX))))
            .collect();
        let nodes: BTreeSet<IpAddr> = node_addresses.iter().copied().collect();
        let mut desired: Vec<OwnedService> = Vec::new();
        let mut owner: HashMap<ServiceKey, &WsKey> = HashMap::new();
        for (key, plan, standalone) in &served {
            for v in virtual_services(plan, *standalone, &nodes, |k, d| current.get(&(*k, *d)).copied()) {
                owner.insert(v.service.key, *key);
                desired.push(v);
            }
        }
        let wanted_keys: HashSet<ServiceKey> = desired.iter().map(|d| d.service.key).collect();
        let node_ports = &self.node_ports;
        let owned =
            |key: &ServiceKey| wanted_keys.contains(key) || node_ports.contains(key) || key.ip().is_some_and(|a| our_address(&a));
        let drain_timeout = self.drain_timeout;
        let draining_since = &self.draining_since;
        let plan = ipvs::plan_owned(&desired, &actual, owned, |k, d| {
            draining_since.get(&(*k, d)).is_some_and(|since| now.duration_since(*since) >= drain_timeout)
        });
        let draining: HashSet<(ServiceKey, SocketAddr)> = plan.draining.iter().copied().collect();
        self.draining_since.retain(|k, _| draining.contains(k));
        for d in &draining {
            self.draining_since.entry(*d).or_insert(now);
        }

        self.node_ports = wanted_keys.into_iter().filter(|k| k.ip().is_some_and(|a| node_addresses.contains(&a))).collect();
        let mut outcome = ServingOutcome::default();
        let results = ipvs.apply(&plan.writes);
        for (write, result) in plan.writes.iter().zip(results) {
            let (service, kind) = match write {
                Write::AddService(s) | Write::EditService(s) => (s.key, "virtual_service"),
                Write::DeleteService(k) => (*k, "virtual_service"),
                Write::AddDestination { service, .. } | Write::DeleteDestination { service, .. } => (*service, "destination"),
                Write::EditDestination { service, .. } => (*service, "weight"),
            };
            outcome.writes += 1;
            match result {
                Ok(()) => Metrics::count(&self.metrics.netlink_writes, kind, 1),
                Err(error) => {
                    outcome.errors += 1;
                    Metrics::count(&self.metrics.netlink_errors, kind, 1);
                    tracing::warn!(virtual_service = %service, %error, "IPVS write for a Service served here failed");
                    if let Some(key) = owner.get(&service) {
                        outcome.failed.entry((*key).clone()).or_insert_with(|| error.to_string());
                    }
                }
            }
        }
        if !plan.writes.is_empty() {
            tracing::info!(writes = plan.writes.len(), draining = draining.len(), "virtual services of Services served here");
        }

        // Addresses after the virtual services: a new address is served from
        // its first packet, and an old one goes once nothing is behind it.
        let keep: BTreeSet<IpAddr> = wanted_addresses.difference(&kube_proxy_has).copied().collect();
        if keep.is_empty() && served.is_empty() {
            runtime.block_on(ours.delete())?;
            tracing::info!(interface = INTERFACE, "no Service served here any more: interface deleted");
            self.interface_seen = false;
            outcome.writes += 1;
            Metrics::count(&self.metrics.netlink_writes, "address", 1);
            return Ok(outcome);
        }
        let changes = runtime.block_on(ours.sync(&keep))?;
        let changed = changes.added.len() + changes.removed.len();
        if changed > 0 {
            tracing::info!(interface = INTERFACE, added = ?changes.added, removed = ?changes.removed, "addresses of Services served here");
            outcome.writes += changed;
            Metrics::count(&self.metrics.netlink_writes, "address", changed as u64);
        }
        Ok(outcome)
    }
}
