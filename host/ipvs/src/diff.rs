//! Desired state against the kernel's: the minimal writes that make them agree.
//!
//! Pure functions over dumped state, so the agent's repair pass can be tested
//! without a kernel and writes nothing when nothing differs.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use crate::types::{ServiceEntry, ServiceKey};
use crate::write::Write;

/// What one virtual service should look like. Only what is named here is
/// compared: destinations left out, and the scheduler when `None`, are not
/// touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    /// Which service.
    pub service: ServiceKey,
    /// The scheduler it should have, or `None` to leave it.
    pub scheduler: Option<String>,
    /// The weight each destination (address and port) should have.
    pub weights: BTreeMap<SocketAddr, u16>,
}

impl DesiredService {
    /// A desired state for `service` with no scheduler and no weights yet.
    pub fn new(service: ServiceKey) -> Self {
        Self { service, scheduler: None, weights: BTreeMap::new() }
    }

    /// Also wants this scheduler.
    pub fn with_scheduler(mut self, scheduler: impl Into<String>) -> Self {
        self.scheduler = Some(scheduler.into());
        self
    }

    /// Also wants this weight for the destination at `address`.
    pub fn with_weight(mut self, address: SocketAddr, weight: u16) -> Self {
        self.weights.insert(address, weight);
        self
    }
}

/// The outcome of [`plan`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The writes to apply: scheduler changes first for each service, then
    /// weight changes; empty when the kernel already agrees.
    pub writes: Vec<Write>,
    /// Desired services the kernel does not have (kube-proxy has not created
    /// them yet): retry later; never added here.
    pub missing_services: Vec<ServiceKey>,
    /// Desired destinations the kernel does not have in an existing service:
    /// retry later; never added here.
    pub missing_destinations: Vec<(ServiceKey, SocketAddr)>,
}

impl Plan {
    /// True when the kernel already matches and nothing is missing.
    pub fn is_converged(&self) -> bool {
        self.writes.is_empty() && self.missing_services.is_empty() && self.missing_destinations.is_empty()
    }
}

/// Compares the desired state with `actual` (from [`crate::IpvsClient::dump`])
/// and returns the minimal writes: a scheduler change where the scheduler
/// differs, a weight change (keeping everything else of the destination as
/// the kernel reported it) where the weight differs, nothing else.
pub fn plan(desired: &[DesiredService], actual: &[ServiceEntry]) -> Plan {
    let index: HashMap<ServiceKey, &ServiceEntry> = actual.iter().map(|e| (e.service.key, e)).collect();
    let mut plan = Plan::default();
    for want in desired {
        let key = want.service;
        let Some(entry) = index.get(&key) else {
            plan.missing_services.push(key);
            continue;
        };
        if let Some(scheduler) = &want.scheduler
            && *scheduler != entry.service.scheduler
        {
            plan.writes.push(Write::set_scheduler(&entry.service, scheduler.clone()));
        }
        let destinations: HashMap<SocketAddr, _> = entry.destinations.iter().map(|d| (d.socket_addr(), d)).collect();
        for (&address, &weight) in &want.weights {
            match destinations.get(&address).copied() {
                Some(current) if current.weight == u32::from(weight) => {}
                Some(current) => plan.writes.push(Write::set_weight(key, current, weight)),
                None => plan.missing_destinations.push((key, address)),
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Destination, ForwardMethod, Service, Tunnel, TunnelType};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn actual() -> Vec<ServiceEntry> {
        let mut tunnel = Destination::new(addr("10.0.1.3:80"), ForwardMethod::Tunnel, 1);
        tunnel.upper_threshold = 50;
        tunnel.tunnel = Some(Tunnel { kind: TunnelType::Ipip, port: 0, flags: 0 });
        vec![ServiceEntry {
            service: Service::new(ServiceKey::tcp(addr("10.96.0.1:80")), "rr"),
            destinations: vec![
                Destination::new(addr("10.0.1.1:80"), ForwardMethod::Masquerade, 1),
                Destination::new(addr("10.0.1.2:80"), ForwardMethod::Masquerade, 1),
                tunnel,
            ],
        }]
    }

    #[test]
    fn writes_only_what_differs_and_keeps_the_rest_of_each_destination() {
        let vip = ServiceKey::tcp(addr("10.96.0.1:80"));
        let desired = [DesiredService::new(vip)
            .with_scheduler("wrr")
            .with_weight(addr("10.0.1.1:80"), 1)
            .with_weight(addr("10.0.1.3:80"), 10)];
        let plan = plan(&desired, &actual());
        assert_eq!(plan.writes.len(), 2, "{plan:?}");
        let Write::EditService(service) = &plan.writes[0] else { panic!("{plan:?}") };
        assert_eq!(service.scheduler, "wrr");
        let Write::EditDestination { service, destination } = &plan.writes[1] else { panic!("{plan:?}") };
        assert_eq!(*service, vip);
        assert_eq!(destination.weight, 10);
        assert_eq!(destination.forward, ForwardMethod::Tunnel);
        assert_eq!(destination.upper_threshold, 50);
        assert!(destination.tunnel.is_some());
        assert!(plan.missing_services.is_empty() && plan.missing_destinations.is_empty());
    }

    #[test]
    fn converged_state_gives_zero_writes() {
        let vip = ServiceKey::tcp(addr("10.96.0.1:80"));
        let desired = [DesiredService::new(vip).with_scheduler("rr").with_weight(addr("10.0.1.2:80"), 1)];
        let plan = plan(&desired, &actual());
        assert!(plan.is_converged(), "{plan:?}");
    }

    #[test]
    fn missing_services_and_destinations_are_reported_not_added() {
        let known = ServiceKey::tcp(addr("10.96.0.1:80"));
        let unknown = ServiceKey::udp(addr("10.96.0.1:80"));
        let desired = [
            DesiredService::new(unknown).with_weight(addr("10.0.1.1:80"), 5),
            DesiredService::new(known).with_weight(addr("10.0.9.9:80"), 5),
        ];
        let plan = plan(&desired, &actual());
        assert!(plan.writes.is_empty(), "{plan:?}");
        assert_eq!(plan.missing_services, vec![unknown]);
        assert_eq!(plan.missing_destinations, vec![(known, addr("10.0.9.9:80"))]);
    }

    #[test]
    fn applying_the_plan_to_the_state_converges() {
        let vip = ServiceKey::tcp(addr("10.96.0.1:80"));
        let desired = [DesiredService::new(vip).with_weight(addr("10.0.1.1:80"), 7).with_scheduler("wlc")];
        let mut state = actual();
        for write in plan(&desired, &state).writes {
            match write {
                Write::EditService(s) => state[0].service = s,
                Write::EditDestination { destination, .. } => {
                    let slot = state[0].destinations.iter_mut().find(|d| d.socket_addr() == destination.socket_addr());
                    *slot.unwrap() = destination;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(plan(&desired, &state).writes.is_empty());
    }
}
