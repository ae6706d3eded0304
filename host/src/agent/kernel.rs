//! Talking to the kernel: reading the virtual services of the plans in scope,
//! and writing only the difference — with two guards, since kube-proxy writes
//! the same table. A weight of 0 that this process did not write is raised
//! only when a fresh read of the API server confirms the endpoint is ready
//! (kube-proxy drains with 0, and the agent's watch may lag). A scheduler is
//! changed from a fresh read of its virtual service (SET_SERVICE rewrites
//! flags, timeout, netmask and persistence engine with it).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipvs::{DesiredService, IpvsClient, IpvsError, ServiceEntry, ServiceKey, Write};

use super::confirm::EndpointReader;
use super::node_addresses::{self, Cidr};
use super::plan::{desired, Matcher, ServicePlan};
use super::WsKey;
use crate::metrics::Metrics;

/// Up to this many virtual services, a pass reads them one by one by key
/// rather than listing every virtual service of the node.
const TARGETED_READS: usize = 32;

/// After the API server said an endpoint is not ready, its weight 0 is not
/// raised (nor asked about again) for this long: the watch catches up.
const REFUSED_FOR: Duration = Duration::from_secs(2);

/// One plan a pass compares with the kernel.
pub(super) struct InScope {
    /// Whose.
    pub(super) key: WsKey,
    /// The plan.
    pub(super) plan: Arc<ServicePlan>,
    /// It was written before: a write now repairs someone else's change.
    pub(super) applied: bool,
}

/// What one sync did.
#[derive(Debug, Default)]
pub(super) struct SyncOutcome {
    /// Writes sent.
    pub(super) writes: usize,
    /// Writes the kernel refused.
    pub(super) errors: usize,
    /// Wanted virtual services or destinations the kernel does not have (yet).
    pub(super) missing: usize,
    /// Failed writes worth an Event, by plan (the first error of each).
    pub(super) failed: HashMap<WsKey, String>,
}

/// The kernel-facing part of the agent.
pub(super) struct Kernel {
    ipvs: Option<IpvsClient>,
    metrics: Arc<Metrics>,
    /// The node's virtual services as listed for the sweep under way: its
    /// chunks read only their destinations. Dropped when a sweep starts and
    /// when a pass writes.
    pub(super) listed: Option<Vec<ipvs::Service>>,
    /// Destinations this process set to weight 0: its own to raise again.
    zeros_written: HashSet<(ServiceKey, SocketAddr)>,
    /// Raises of a 0 the API server did not confirm, until when they are not tried.
    refused: HashMap<(ServiceKey, SocketAddr), Instant>,
    reader: Box<dyn EndpointReader>,
    /// Where NodePorts are, as kube-proxy picks the node's addresses.
    pub(super) node_addresses: HashSet<IpAddr>,
    node_port_cidrs: Vec<Cidr>,
}

impl Kernel {
    pub(super) fn new(metrics: Arc<Metrics>, reader: Box<dyn EndpointReader>, node_port_cidrs: Vec<Cidr>) -> Self {
        let mut kernel = Kernel {
            ipvs: None,
            metrics,
            listed: None,
            zeros_written: HashSet::new(),
            refused: HashMap::new(),
            reader,
            node_addresses: HashSet::new(),
            node_port_cidrs,
        };
        kernel.refresh_node_addresses();
        kernel
    }

    /// Whether the last pass could open and read IPVS.
    pub(super) fn is_open(&self) -> bool {
        self.ipvs.is_some()
    }

    /// Read the node's addresses again; true if they changed.
    pub(super) fn refresh_node_addresses(&mut self) -> bool {
        match node_addresses::local_addresses() {
            Ok(all) => {
                let addresses = node_addresses::node_port_addresses(&all, &self.node_port_cidrs);
                if addresses != self.node_addresses {
                    tracing::info!(addresses = ?addresses, "node addresses for NodePorts");
                    self.node_addresses = addresses;
                    return true;
                }
            }
            Err(error) => tracing::warn!(%error, "cannot list the node's addresses: NodePorts matched on the last ones"),
        }
        false
    }

    /// Forget the zeros written to destinations of endpoints that are gone.
    pub(super) fn forget_gone_endpoints(&mut self, present: &HashSet<IpAddr>) {
        self.zeros_written.retain(|(_, d)| present.contains(&d.ip()));
        self.forget_expired_refusals();
    }

    /// Forget refusals to raise a zero whose hold is over.
    pub(super) fn forget_expired_refusals(&mut self) {
        let now = Instant::now();
        self.refused.retain(|_, until| *until > now);
    }

    /// Compare the virtual services of `in_scope` with their plans and write
    /// the difference; `sweeping` reuses the sweep's listing of the table.
    /// `None` when IPVS cannot be opened.
    pub(super) fn sync(&mut self, in_scope: &[InScope], sweeping: bool) -> Option<SyncOutcome> {
        if in_scope.is_empty() && self.ipvs.is_some() {
            return Some(SyncOutcome::default());
        }
        let mut ipvs = match self.ipvs.take() {
            Some(client) => client,
            None => match IpvsClient::new() {
                Ok(client) => client,
                Err(error) => {
                    tracing::error!(%error, "cannot open IPVS; retrying at the next pass");
                    return None;
                }
            },
        };
        match self.sync_with(&mut ipvs, in_scope, sweeping) {
            Ok(outcome) => {
                self.ipvs = Some(ipvs);
                Some(outcome)
            }
            Err(error) => {
                // A fresh socket next time.
                tracing::warn!(%error, "reading the IPVS table");
                Some(SyncOutcome::default())
            }
        }
    }

    fn sync_with(&mut self, ipvs: &mut IpvsClient, in_scope: &[InScope], sweeping: bool) -> Result<SyncOutcome, IpvsError> {
        if in_scope.is_empty() {
            return Ok(SyncOutcome::default());
        }
        // Out of `self` while the matcher borrows it: the guards below need `&mut self`.
        let node_addresses = std::mem::take(&mut self.node_addresses);
        let result = self.sync_matched(ipvs, in_scope, sweeping, &node_addresses);
        self.node_addresses = node_addresses;
        result
    }

    fn sync_matched(
        &mut self,
        ipvs: &mut IpvsClient,
        in_scope: &[InScope],
        sweeping: bool,
        node_addresses: &HashSet<IpAddr>,
    ) -> Result<SyncOutcome, IpvsError> {
        let mut outcome = SyncOutcome::default();
        let plans = || in_scope.iter().map(|s| (&s.key, &*s.plan));
        let matcher = Matcher::new(plans(), node_addresses);
        let wanted = |service: &ipvs::Service| matcher.find(&service.key).is_some();
        let entries = if sweeping {
            // A chunk of the sweep: the listing made for the sweep, fresh destinations.
            let listed = match self.listed.take() {
                Some(listed) => listed,
                None => ipvs.services()?,
            };
            let mut entries = Vec::new();
            for service in listed.iter().filter(|s| wanted(s)) {
                let destinations = ipvs.destinations(&service.key)?;
                entries.push(ServiceEntry { service: service.clone(), destinations });
            }
            self.listed = Some(listed);
            entries
        } else {
            match targeted_keys(in_scope) {
                Some(keys) => read_services(ipvs, keys)?,
                None => ipvs.dump_services(wanted)?,
            }
        };
        let wanted: Vec<(&WsKey, DesiredService)> = desired(plans(), node_addresses, &entries);
        let owner: HashMap<ServiceKey, &WsKey> = wanted.iter().map(|(k, d)| (d.service, *k)).collect();
        let desired_services: Vec<DesiredService> = wanted.into_iter().map(|(_, d)| d).collect();
        let plan = ipvs::plan(&desired_services, &entries);
        outcome.missing = plan.missing_services.len() + plan.missing_destinations.len();
        let writes = self.confirm_raises(plan.writes, &entries, &owner);
        if writes.is_empty() {
            return Ok(outcome);
        }
        // What the sweep listed may be out of date now.
        self.listed = None;
        // Weights in one batch; each scheduler from a fresh read of its virtual
        // service, since kube-proxy may have changed its flags since `entries`.
        let mut results = Vec::with_capacity(writes.len());
        let (schedulers, weights): (Vec<Write>, Vec<Write>) = writes.into_iter().partition(|w| matches!(w, Write::EditService(_)));
        let mut written = Vec::with_capacity(schedulers.len() + weights.len());
        for write in schedulers {
            let Write::EditService(wanted) = &write else { continue };
            match ipvs.change_scheduler(&wanted.key, &wanted.scheduler) {
                Ok(false) => continue,
                Ok(true) => results.push(Ok(())),
                Err(error) => results.push(Err(error)),
            }
            written.push(write);
        }
        results.extend(ipvs.apply(&weights));
        written.extend(weights);
        let writes = written;
        outcome.writes = writes.len();
        let applied: HashSet<&WsKey> = in_scope.iter().filter(|s| s.applied).map(|s| &s.key).collect();
        for (write, result) in writes.iter().zip(results) {
            let (service, kind) = match write {
                Write::EditService(s) => (s.key, "scheduler"),
                Write::EditDestination { service, .. } => (*service, "weight"),
                _ => continue,
            };
            let Some(key) = owner.get(&service) else { continue };
            match result {
                Ok(()) => {
                    Metrics::count(&self.metrics.netlink_writes, kind, 1);
                    if applied.contains(key) {
                        Metrics::count(&self.metrics.drift_repairs, kind, 1);
                    }
                    if let Write::EditDestination { service, destination } = write {
                        self.record_weight(*service, destination.socket_addr(), destination.weight);
                    }
                }
                Err(error) => {
                    outcome.errors += 1;
                    Metrics::count(&self.metrics.netlink_errors, kind, 1);
                    match error {
                        // Gone between the read and the write: kube-proxy's business, not an error.
                        IpvsError::ServiceNotFound { .. } | IpvsError::DestinationNotFound { .. } => {
                            tracing::debug!(weighted_service = %key, %error, "IPVS entry vanished before the write");
                        }
                        error => {
                            tracing::warn!(weighted_service = %key, %error, "IPVS write failed");
                            outcome.failed.entry((*key).clone()).or_insert_with(|| error.to_string());
                        }
                    }
                }
            }
        }
        Ok(outcome)
    }

    /// Remember who wrote a weight 0.
    fn record_weight(&mut self, service: ServiceKey, destination: SocketAddr, weight: u32) {
        if weight == 0 {
            self.zeros_written.insert((service, destination));
        } else {
            self.zeros_written.remove(&(service, destination));
        }
    }

    /// `writes` without the raises of a weight 0 this process did not write
    /// that a fresh read of the API server does not confirm: the endpoint is
    /// ready and not terminating there, whatever the watch cache says.
    fn confirm_raises(&mut self, writes: Vec<Write>, entries: &[ServiceEntry], owner: &HashMap<ServiceKey, &WsKey>) -> Vec<Write> {
        let zeros: HashSet<(ServiceKey, SocketAddr)> = entries
            .iter()
            .flat_map(|e| e.destinations.iter().filter(|d| d.weight == 0).map(|d| (e.service.key, d.socket_addr())))
            .collect();
        let raise = |write: &Write| match write {
            Write::EditDestination { service, destination } if destination.weight > 0 => {
                let id = (*service, destination.socket_addr());
                (zeros.contains(&id) && !self.zeros_written.contains(&id)).then_some(id)
            }
            _ => None,
        };
        let now = Instant::now();
        // Who to ask about which addresses.
        let mut asks: HashMap<&WsKey, HashSet<IpAddr>> = HashMap::new();
        for id in writes.iter().filter_map(raise) {
            if self.refused.get(&id).is_none_or(|until| *until <= now)
                && let Some(key) = owner.get(&id.0)
            {
                asks.entry(*key).or_default().insert(id.1.ip());
            }
        }
        if asks.is_empty() && !writes.iter().any(|w| raise(w).is_some()) {
            return writes;
        }
        let mut confirmed: HashSet<IpAddr> = HashSet::new();
        for (key, addresses) in asks {
            match self.reader.ready_addresses(&key.namespace, &key.name) {
                Ok(ready) => confirmed.extend(addresses.into_iter().filter(|a| ready.contains(a))),
                Err(error) => {
                    tracing::warn!(service = %key, %error, "cannot confirm that endpoints at weight 0 are ready: left at 0");
                }
            }
        }
        let mut kept = Vec::with_capacity(writes.len());
        for write in writes {
            match raise(&write) {
                Some(id) if !confirmed.contains(&id.1.ip()) => {
                    if self.refused.insert(id, now + REFUSED_FOR).is_none_or(|until| until <= now) {
                        self.metrics.zero_raises_refused.inc();
                        tracing::info!(
                            virtual_service = %id.0,
                            destination = %id.1,
                            "not raising weight 0: the API server does not have this endpoint ready (kube-proxy is draining it)"
                        );
                    }
                }
                _ => kept.push(write),
            }
        }
        kept
    }
}

/// The virtual services to read by key, when that is cheaper than listing the
/// node's: a few, and none of them a NodePort (whose addresses are the node's:
/// only a listing finds them).
fn targeted_keys(in_scope: &[InScope]) -> Option<BTreeSet<ServiceKey>> {
    let mut keys: BTreeSet<ServiceKey> = BTreeSet::new();
    for scope in in_scope {
        for port in &scope.plan.ports {
            if port.node_port.is_some() {
                return None;
            }
            keys.extend(port.addresses().map(|a| ServiceKey::new(port.protocol, SocketAddr::new(*a, port.port))));
            if keys.len() > TARGETED_READS {
                return None;
            }
        }
    }
    Some(keys)
}

/// These virtual services and their destinations, one by one; those the
/// kernel does not have are left out.
fn read_services(ipvs: &mut IpvsClient, keys: BTreeSet<ServiceKey>) -> Result<Vec<ServiceEntry>, IpvsError> {
    let mut entries = Vec::with_capacity(keys.len());
    for key in keys {
        let service = match ipvs.service(&key) {
            Ok(service) => service,
            Err(IpvsError::ServiceNotFound { .. }) => continue,
            Err(error) => return Err(error),
        };
        let destinations = ipvs.destinations(&key)?;
        entries.push(ServiceEntry { service, destinations });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::super::confirm::ReadError;
    use super::*;
    use ipvs::{Destination, ForwardMethod, Service as VirtualService};
    use std::sync::Mutex;

    /// What the API server has ready, and who asked (a unit-test double of [`EndpointReader`]).
    struct Answers {
        ready: HashSet<IpAddr>,
        asked: Arc<Mutex<Vec<String>>>,
    }

    impl EndpointReader for Answers {
        fn ready_addresses(&mut self, namespace: &str, service: &str) -> Result<HashSet<IpAddr>, ReadError> {
            self.asked.lock().unwrap().push(format!("{namespace}/{service}"));
            Ok(self.ready.clone())
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_zero_is_raised_only_when_written_here_or_confirmed_ready() {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let reader = Answers { ready: ["10.244.1.6".parse().unwrap()].into(), asked: asked.clone() };
        let mut kernel = Kernel::new(Arc::new(Metrics::new()), Box::new(reader), vec![]);
        let vip = ServiceKey::tcp(addr("10.96.0.10:80"));
        let (draining, back, ours, other) =
            (addr("10.244.1.5:8080"), addr("10.244.1.6:8080"), addr("10.244.1.7:8080"), addr("10.244.1.8:8080"));
        let entries = vec![ServiceEntry {
            service: VirtualService::new(vip, "wrr"),
            destinations: vec![
                Destination::new(draining, ForwardMethod::Masquerade, 0), // kube-proxy's 0, pod terminating
                Destination::new(back, ForwardMethod::Masquerade, 0),     // a 0 from before a restart, pod ready
                Destination::new(ours, ForwardMethod::Masquerade, 0),     // written by this process
                Destination::new(other, ForwardMethod::Masquerade, 3),
            ],
        }];
        kernel.record_weight(vip, ours, 0);
        let key = WsKey { namespace: "shop".into(), name: "web".into() };
        let owner: HashMap<ServiceKey, &WsKey> = [(vip, &key)].into();
        let writes: Vec<Write> =
            entries[0].destinations.iter().map(|d| Write::set_weight(vip, d, 5)).collect();
        let kept = kernel.confirm_raises(writes.clone(), &entries, &owner);
        let kept: Vec<SocketAddr> = kept
            .iter()
            .filter_map(|w| match w {
                Write::EditDestination { destination, .. } => Some(destination.socket_addr()),
                _ => None,
            })
            .collect();
        assert_eq!(kept, [back, ours, other]);
        assert_eq!(*asked.lock().unwrap(), ["shop/web"], "one read for the Service");
        assert_eq!(kernel.metrics.zero_raises_refused.get(), 1);
        // Refused a moment ago: not asked again, still not raised.
        let kept = kernel.confirm_raises(writes, &entries, &owner);
        assert_eq!(kept.len(), 3);
        assert_eq!(asked.lock().unwrap().len(), 2, "the other zero (not refused) is asked about again");
        assert_eq!(kernel.metrics.zero_raises_refused.get(), 1, "a refusal is counted once while it lasts");
    }

    #[test]
    fn writes_of_zero_and_non_zero_are_remembered_and_forgotten() {
        let reader = Answers { ready: HashSet::new(), asked: Arc::default() };
        let mut kernel = Kernel::new(Arc::new(Metrics::new()), Box::new(reader), vec![]);
        let vip = ServiceKey::tcp(addr("10.96.0.10:80"));
        kernel.record_weight(vip, addr("10.244.1.5:8080"), 0);
        kernel.record_weight(vip, addr("10.244.1.6:8080"), 0);
        kernel.record_weight(vip, addr("10.244.1.6:8080"), 4);
        assert_eq!(kernel.zeros_written.len(), 1);
        kernel.forget_gone_endpoints(&HashSet::new());
        assert!(kernel.zeros_written.is_empty(), "the endpoint is gone");
    }

    #[test]
    fn node_ports_and_many_addresses_are_listed_not_read_by_key() {
        let plan = |node_port: Option<u16>, addresses: usize| InScope {
            key: WsKey { namespace: "a".into(), name: "b".into() },
            plan: Arc::new(ServicePlan {
                scheduler: Some("wrr".into()),
                ports: vec![super::super::plan::PortPlan {
                    protocol: ipvs::Protocol::Tcp,
                    port: 80,
                    node_port,
                    cluster_ips: (0..addresses).map(|i| IpAddr::from([10, 96, 0, i as u8])).collect(),
                    external_ips: vec![],
                    internal: Arc::default(),
                    external: Arc::default(),
                }],
                restoring: false,
                standalone: None,
            }),
            applied: false,
        };
        assert_eq!(targeted_keys(&[plan(None, 2)]).map(|k| k.len()), Some(2));
        assert!(targeted_keys(&[plan(Some(30080), 2)]).is_none());
        assert!(targeted_keys(&[plan(None, TARGETED_READS + 1)]).is_none());
    }
}
