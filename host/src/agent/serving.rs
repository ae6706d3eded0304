//! Serving Services itself (standalone mode, see [`super::standalone`]):
//! their addresses on the agent's dummy interface and their virtual services
//! and destinations, made whole from the plans at each sync.
//!
//! What is ours comes from the kernel, not from memory: a virtual service at
//! an address on `ipvs-op0`, or recorded in the agent's nftables table (see
//! [`super::nftables`]; NodePorts sit at the node's own addresses), or one
//! the plans want, is ours, and so are the addresses on `ipvs-op0`. A restarted agent adopts them and writes only what
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
use super::nftables::{NfTables, NfTablesError, Ruleset};
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
    /// Services whose virtual services another writer deleted since the last
    /// sync (made again in this one), with what to do about it, for an Event.
    pub(super) deleted_by_others: HashMap<WsKey, String>,
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
    /// The nftables table could not be read or written.
    #[error(transparent)]
    NfTables(#[from] NfTablesError),
    /// Some writes failed (see the log).
    #[error("{errors} kernel writes failed (see the log above)")]
    Incomplete {
        /// How many.
        errors: usize,
    },
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
    nftables: Option<NfTables>,
    /// The ruleset last written to the table: the record, as long as the
    /// table's fingerprint says the kernel still holds it.
    written: Option<Ruleset>,
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
    /// The node's sysctls were checked (once, when there is first something to serve).
    settings_checked: bool,
    /// The wanted virtual services in the kernel after the last sync: one
    /// missing at the next was deleted by someone else (kube-proxy in IPVS
    /// mode deletes those it does not know), which is reported.
    present: HashSet<ServiceKey>,
    /// Reading, writing the table failed at the last try: said once (warn), not every sync.
    table_read_failing: bool,
    table_write_failing: bool,
}

impl Serving {
    pub(super) fn new(metrics: Arc<Metrics>, drain_timeout: Duration, handover_timeout: Duration) -> Self {
        Serving {
            metrics,
            runtime: None,
            handle: None,
            ipvs: None,
            nftables: None,
            written: None,
            drain_timeout,
            handover_timeout,
            draining_since: HashMap::new(),
            handing_over: HashMap::new(),
            interface_seen: true,
            settings_checked: false,
            present: HashSet::new(),
            table_read_failing: false,
            table_write_failing: false,
        }
    }

    /// The table's fingerprint (`None`: no table) and the virtual services it
    /// records as the agent's. A kernel without nf_tables has no table,
    /// which is only an error when there is something to serve.
    fn read_table(&mut self, serve_any: bool) -> Result<(Option<Vec<u8>>, BTreeSet<ServiceKey>), NfTablesError> {
        let nftables = match self.nftables.as_mut() {
            Some(nftables) => nftables,
            None => match NfTables::new() {
                Ok(nftables) => self.nftables.insert(nftables),
                Err(e) if !serve_any && e.is_unsupported() => return Ok((None, BTreeSet::new())),
                Err(e) => return Err(e),
            },
        };
        let fingerprint = match nftables.fingerprint() {
            Err(e) if !serve_any && e.is_unsupported() => return Ok((None, BTreeSet::new())),
            other => other?,
        };
        let Some(fingerprint) = fingerprint else { return Ok((None, BTreeSet::new())) };
        let recorded = match &self.written {
            // The kernel holds what was last written: no need to read it back.
            Some(written) if written.fingerprint() == fingerprint => written.services.clone(),
            _ => nftables.recorded_services()?,
        };
        Ok((Some(fingerprint), recorded))
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
            self.nftables = None;
        }
        result
    }

    fn sync_inner<'a>(
        &mut self,
        plans: impl Iterator<Item = (&'a WsKey, &'a ServicePlan)> + Clone,
        node_addresses: &HashSet<IpAddr>,
    ) -> Result<ServingOutcome, ServingError> {
        let serve_any = plans.clone().any(|(_, p)| p.standalone.is_some());
        // The table: its fingerprint, and the virtual services it records as
        // ours. Without it the Services are still served (ClusterIPs from
        // pods need no masquerading); it is written when it can be read.
        let mut outcome = ServingOutcome::default();
        let (table, recorded, table_readable) = match self.read_table(serve_any) {
            Ok((table, recorded)) => {
                if std::mem::take(&mut self.table_read_failing) {
                    tracing::info!(table = super::nftables::TABLE, "the nftables table can be read again");
                }
                (table, recorded, true)
            }
            Err(error) => {
                if !std::mem::replace(&mut self.table_read_failing, true) {
                    tracing::warn!(%error, "the nftables table cannot be read: masquerading and the record of NodePorts wait for it (tried again at each sync)");
                } else {
                    tracing::debug!(%error, "the nftables table still cannot be read");
                }
                outcome.errors += 1;
                self.nftables = None;
                (None, BTreeSet::new(), false)
            }
        };
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
        let ours = runtime.block_on(async {
            // A table left without its interface (a teardown cut short) is cleaned up through it.
            if serve_any || table.is_some() {
                Interface::ensure(handle.clone(), INTERFACE).await.map(Some)
            } else {
                Interface::existing(handle.clone(), INTERFACE).await
            }
        })?;
        let Some(ours) = ours else {
            self.interface_seen = false;
            self.handing_over.clear();
            return Ok(outcome);
        };
        self.interface_seen = true;
        // kube-ipvs0 says kube-proxy runs in IPVS mode here.
        let (have, kube_proxy_ipvs, kube_proxy_has) = runtime.block_on(async {
            let have: BTreeSet<IpAddr> = ours.addresses().await?.into_iter().map(|(ip, _)| ip).collect();
            let (kube_proxy_ipvs, kube_proxy_has) = match Interface::existing(handle.clone(), KUBE_PROXY_DUMMY).await? {
                Some(dummy) => (true, dummy.addresses().await?.into_iter().map(|(ip, _)| ip).collect()),
                None => (false, BTreeSet::new()),
            };
            Ok::<_, InterfaceError>((have, kube_proxy_ipvs, kube_proxy_has))
        })?;

        // Which plans are served: the labelled ones, and those switched back
        // to kube-proxy that it has not taken yet.
        let now = Instant::now();
        let mut served: Vec<(&WsKey, &ServicePlan, Standalone)> = Vec::new();
        let mut still_handing_over = HashSet::new();
        // The NodePorts of Services kube-proxy has taken: its, even where the table still records them.
        let mut kube_proxys_node_ports: HashSet<(ipvs::Protocol, u16)> = HashSet::new();
        for (key, plan) in plans {
            if let Some(standalone) = plan.standalone {
                served.push((key, plan, standalone));
                continue;
            }
            let addresses = interface_addresses(plan);
            if !addresses.is_empty() && addresses.is_subset(&kube_proxy_has) {
                kube_proxys_node_ports.extend(plan.ports.iter().filter_map(|p| Some((p.protocol, p.node_port?))));
            }
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
        let keep: BTreeSet<IpAddr> = wanted_addresses.difference(&kube_proxy_has).copied().collect();
        // Ours: at an address on our interface that kube-proxy does not have, or wanted.
        let our_address = |ip: &IpAddr| (have.contains(ip) || wanted_addresses.contains(ip)) && !kube_proxy_has.contains(ip);
        let theirs = |key: &ServiceKey| match *key {
            ServiceKey::Address { protocol, address, port } => {
                kube_proxy_has.contains(&address)
                    || (node_addresses.contains(&address) && kube_proxys_node_ports.contains(&(protocol, port)))
            }
            ServiceKey::Fwmark { .. } => true,
        };
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
        let maybe_ours = |key: &ServiceKey| match *key {
            ServiceKey::Address { protocol, address, port } => {
                our_address(&address)
                    || recorded.contains(key)
                    || (node_addresses.contains(&address) && served_node_ports.contains(&(protocol, port)))
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
        let mut ruleset = Ruleset { addresses: keep.clone(), ..Ruleset::default() };
        for (key, plan, standalone) in &served {
            for v in virtual_services(plan, *standalone, &nodes, |k, d| current.get(&(*k, *d)).copied()) {
                owner.insert(v.service.key, *key);
                // NodePort, external and load-balancer traffic: masqueraded under a Cluster policy.
                let external = v.service.key.ip().is_some_and(|a| !plan.ports.iter().any(|p| p.cluster_ips.contains(&a)));
                ruleset.add(&v, external && !standalone.external_local);
                desired.push(v);
            }
        }
        let wanted_keys: HashSet<ServiceKey> = desired.iter().map(|d| d.service.key).collect();
        let actual_keys: HashSet<ServiceKey> = actual.iter().map(|e| e.service.key).collect();
        let mut vanished: HashMap<&WsKey, Vec<ServiceKey>> = HashMap::new();
        for key in self.present.iter().filter(|k| wanted_keys.contains(*k) && !actual_keys.contains(*k)) {
            if let Some(ws) = owner.get(key) {
                vanished.entry(*ws).or_default().push(*key);
            }
        }
        for (ws, keys) in &mut vanished {
            keys.sort();
            let keys: Vec<String> = keys.iter().map(ToString::to_string).collect();
            let hint = if kube_proxy_ipvs {
                "kube-proxy in IPVS mode deletes virtual services it does not know: give it --ipvs-exclude-cidrs covering this Service's addresses (NodePorts cannot be excluded: serve Services with NodePorts in standalone mode only on nodes whose kube-proxy is not in IPVS mode)"
            } else {
                "something else on the node writes IPVS"
            };
            tracing::warn!(service = %ws, virtual_services = ?keys, "virtual services of a Service served here were deleted by another writer: made again");
            outcome.deleted_by_others.insert((*ws).clone(), format!("{} deleted by another writer since the last sync and made again: {hint}", keys.join(", ")));
        }
        let owned = |key: &ServiceKey| {
            wanted_keys.contains(key) || ((recorded.contains(key) || key.ip().is_some_and(|a| our_address(&a))) && !theirs(key))
        };
        let drain_timeout = self.drain_timeout;
        let draining_since = &self.draining_since;
        let plan = ipvs::plan_owned(&desired, &actual, owned, |k, d| {
            drain_timeout.is_zero()
                || draining_since.get(&(*k, d)).is_some_and(|since| now.duration_since(*since) >= drain_timeout)
        });
        let draining: HashSet<(ServiceKey, SocketAddr)> = plan.draining.iter().copied().collect();
        self.draining_since.retain(|k, _| draining.contains(k));
        for d in &draining {
            self.draining_since.entry(*d).or_insert(now);
        }

        // The table before the virtual services: it records what is about to
        // be made (and still what is about to go), and masquerades from a
        // new virtual service's first packet.
        let going: BTreeSet<ServiceKey> = recorded.iter().filter(|k| owned(k) && !wanted_keys.contains(*k)).copied().collect();
        let mut before = ruleset.clone();
        before.services.extend(going.iter().copied());
        let mut table = table;
        // (No table to make for nothing: a teardown deletes it next.)
        if table_readable
            && !(table.is_none() && before.is_empty())
            && let Some(nftables) = self.nftables.as_mut()
        {
            let writer = TableWriter { written: &mut self.written, failing: &mut self.table_write_failing, metrics: &self.metrics };
            table = writer.write(nftables, table, &before, &mut outcome);
        }
        let results = ipvs.apply(&plan.writes);
        let mut undeleted = BTreeSet::new();
        self.present = wanted_keys.clone();
        for (write, result) in plan.writes.iter().zip(results) {
            match (write, &result) {
                (Write::DeleteService(key), Err(_)) => {
                    undeleted.insert(*key);
                }
                (Write::AddService(service), Err(_)) => {
                    self.present.remove(&service.key);
                }
                _ => {}
            }
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

        // The table after: what went is no longer recorded (unless its deletion failed).
        ruleset.services.extend(undeleted);
        if table_readable && let Some(nftables) = self.nftables.as_mut() {
            if ruleset.is_empty() && served.is_empty() {
                match nftables.delete() {
                    Ok(deleted) => {
                        if deleted {
                            tracing::info!(table = super::nftables::TABLE, "no Service served here any more: nftables table deleted");
                            outcome.writes += 1;
                            Metrics::count(&self.metrics.netlink_writes, "nftables", 1);
                        }
                        self.written = None;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "deleting the nftables table failed");
                        outcome.errors += 1;
                        Metrics::count(&self.metrics.netlink_errors, "nftables", 1);
                        // The interface stays too: the next sync sees the table and tries again.
                        return Ok(outcome);
                    }
                }
            } else {
                let writer = TableWriter { written: &mut self.written, failing: &mut self.table_write_failing, metrics: &self.metrics };
                writer.write(nftables, table, &ruleset, &mut outcome);
            }
        }

        // Addresses after the virtual services: a new address is served from
        // its first packet, and an old one goes once nothing is behind it.
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

/// Removes everything the agent made on this node for Services it serves
/// itself: the virtual services at addresses on `ipvs-op0` or recorded in the
/// nftables table (at once, without draining), the table, and the interface.
/// `agent --cleanup`; the number of kernel writes made.
pub fn cleanup() -> Result<usize, ServingError> {
    let mut serving = Serving::new(Arc::new(Metrics::new()), Duration::ZERO, Duration::ZERO);
    let outcome = serving.sync(std::iter::empty(), &HashSet::new())?;
    if outcome.errors > 0 {
        return Err(ServingError::Incomplete { errors: outcome.errors });
    }
    Ok(outcome.writes)
}

/// What writing the table updates besides the kernel.
struct TableWriter<'a> {
    /// The ruleset the kernel holds, when written here.
    written: &'a mut Option<Ruleset>,
    /// The last write failed (said once, not at every sync).
    failing: &'a mut bool,
    metrics: &'a Metrics,
}

impl TableWriter<'_> {
    /// Replaces the table with `ruleset` unless its fingerprint says it holds
    /// it already; the table's fingerprint after. A failure is logged and
    /// counted: the Services are served without the table meanwhile.
    fn write(self, nftables: &mut NfTables, table: Option<Vec<u8>>, ruleset: &Ruleset, outcome: &mut ServingOutcome) -> Option<Vec<u8>> {
        let fingerprint = ruleset.fingerprint();
        if table.as_ref() == Some(&fingerprint) {
            return table;
        }
        outcome.writes += 1;
        if let Err(error) = nftables.replace(ruleset) {
            if !std::mem::replace(self.failing, true) {
                tracing::warn!(%error, "replacing the nftables table failed: NodePort, external and hairpin traffic is not masqueraded (tried again at each sync)");
            }
            outcome.errors += 1;
            Metrics::count(&self.metrics.netlink_errors, "nftables", 1);
            *self.written = None;
            return table;
        }
        *self.failing = false;
        tracing::info!(
            table = super::nftables::TABLE,
            services = ruleset.services.len(),
            masquerade = ruleset.masquerade.len(),
            endpoints = ruleset.endpoints.len(),
            "nftables table of Services served here"
        );
        Metrics::count(&self.metrics.netlink_writes, "nftables", 1);
        *self.written = Some(ruleset.clone());
        Some(fingerprint)
    }
}
