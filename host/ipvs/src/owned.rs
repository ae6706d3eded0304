//! Virtual services this process owns (standalone mode): the whole desired
//! state against the kernel's. Unlike [`crate::plan`], which only edits what
//! kube-proxy made, this creates and deletes services and destinations, and
//! drains a removed destination first, as kube-proxy's graceful termination
//! does (`pkg/proxy/ipvs/graceful_termination.go`): a TCP destination with
//! connections goes to weight 0, so that no new connection reaches it, and is
//! deleted once it has none left or the caller's drain timeout passed; one
//! without connections, and any UDP or SCTP one (whose connection entries the
//! kernel drops with `expire_nodest_conn`), is deleted at once.
//!
//! State comes from the kernel only: a destination of an owned service that
//! is not wanted is draining, whatever process put it there, so a restarted
//! agent goes on draining what its predecessor started.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use crate::constants::IP_VS_SVC_F_HASHED;
use crate::types::{Destination, ForwardMethod, Protocol, Service, ServiceEntry, ServiceKey};
use crate::write::Write;

/// One virtual service as it should be, whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedService {
    /// Key, scheduler, flags, persistence timeout and netmask.
    pub service: Service,
    /// Every destination it should have (masqueraded), with its weight.
    pub destinations: BTreeMap<SocketAddr, u16>,
}

/// The outcome of [`plan_owned`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnedPlan {
    /// Service additions and edits, then destination additions and edits,
    /// then deletions; empty when the kernel already agrees.
    pub writes: Vec<Write>,
    /// Destinations left at weight 0 until their connections end.
    pub draining: Vec<(ServiceKey, SocketAddr)>,
}

/// Whether the kernel's `actual` service already has what `wanted` asks:
/// the kernel adds `IP_VS_SVC_F_HASHED` to every service it holds.
fn same_service(actual: &Service, wanted: &Service) -> bool {
    actual.scheduler == wanted.scheduler
        && actual.flags & !IP_VS_SVC_F_HASHED == wanted.flags & !IP_VS_SVC_F_HASHED
        && actual.timeout == wanted.timeout
        && (wanted.timeout == 0 || actual.netmask == wanted.netmask)
        && actual.persistence_engine == wanted.persistence_engine
}

/// Masquerading as asked: the kernel reports a masqueraded destination on
/// one of its own addresses as local.
fn forwards_as_wanted(d: &Destination) -> bool {
    matches!(d.forward, ForwardMethod::Masquerade | ForwardMethod::Local)
}

/// Whether a removed destination of `service` waits for its connections
/// (kube-proxy's `IsRsGracefulTerminationNeeded`: not for UDP and SCTP).
fn waits_for_connections(service: &ServiceKey) -> bool {
    !matches!(service, ServiceKey::Address { protocol: Protocol::Udp | Protocol::Sctp, .. })
}

/// The writes that turn the kernel's `actual` table into `desired`, for the
/// services `owned` says are ours (the others are never touched).
/// `drain_over(service, destination)` says whether a draining destination's
/// timeout has passed (the caller keeps when it began).
pub fn plan_owned(
    desired: &[OwnedService],
    actual: &[ServiceEntry],
    owned: impl Fn(&ServiceKey) -> bool,
    drain_over: impl Fn(&ServiceKey, SocketAddr) -> bool,
) -> OwnedPlan {
    let index: HashMap<ServiceKey, &ServiceEntry> = actual.iter().map(|e| (e.service.key, e)).collect();
    let wanted: HashMap<ServiceKey, &OwnedService> = desired.iter().map(|d| (d.service.key, d)).collect();
    let mut plan = OwnedPlan::default();
    let mut deletions = Vec::new();
    for want in desired {
        let key = want.service.key;
        let masq = |(address, weight): (&SocketAddr, &u16)| Destination::new(*address, ForwardMethod::Masquerade, *weight);
        let Some(entry) = index.get(&key) else {
            plan.writes.push(Write::AddService(want.service.clone()));
            plan.writes.extend(want.destinations.iter().map(|d| Write::AddDestination { service: key, destination: masq(d) }));
            continue;
        };
        if !same_service(&entry.service, &want.service) {
            plan.writes.push(Write::EditService(want.service.clone()));
        }
        let current: HashMap<SocketAddr, &Destination> = entry.destinations.iter().map(|d| (d.socket_addr(), d)).collect();
        for (address, weight) in &want.destinations {
            match current.get(address) {
                None => plan.writes.push(Write::AddDestination { service: key, destination: masq((address, weight)) }),
                Some(d) if !forwards_as_wanted(d) => {
                    plan.writes.push(Write::EditDestination { service: key, destination: masq((address, weight)) })
                }
                Some(d) if d.weight != u32::from(*weight) => plan.writes.push(Write::set_weight(key, d, *weight)),
                Some(_) => {}
            }
        }
        for d in entry.destinations.iter().filter(|d| !want.destinations.contains_key(&d.socket_addr())) {
            let address = d.socket_addr();
            let idle = d.active_connections == 0 && d.inactive_connections == 0;
            if !waits_for_connections(&key) || idle || (d.weight == 0 && drain_over(&key, address)) {
                deletions.push(Write::DeleteDestination { service: key, destination: address });
                continue;
            }
            if d.weight != 0 {
                plan.writes.push(Write::set_weight(key, d, 0));
            }
            plan.draining.push((key, address));
        }
    }
    for entry in actual.iter().filter(|e| owned(&e.service.key) && !wanted.contains_key(&e.service.key)) {
        deletions.push(Write::DeleteService(entry.service.key));
    }
    plan.writes.extend(deletions);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constants::IP_VS_SVC_F_PERSISTENT;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("a socket address")
    }

    fn vip() -> ServiceKey {
        ServiceKey::tcp(addr("10.96.0.10:80"))
    }

    fn want(key: ServiceKey, destinations: &[(&str, u16)]) -> OwnedService {
        OwnedService {
            service: Service::new(key, "wrr"),
            destinations: destinations.iter().map(|(a, w)| (addr(a), *w)).collect(),
        }
    }

    /// What the kernel does with the writes, as far as this module reads it back.
    fn apply(state: &mut Vec<ServiceEntry>, writes: &[Write]) {
        for write in writes {
            match write.clone() {
                Write::AddService(mut s) => {
                    s.flags |= IP_VS_SVC_F_HASHED;
                    state.push(ServiceEntry { service: s, destinations: Vec::new() });
                }
                Write::EditService(s) => {
                    let e = state.iter_mut().find(|e| e.service.key == s.key).expect("edited service exists");
                    e.service = Service { flags: s.flags | IP_VS_SVC_F_HASHED, ..s };
                }
                Write::DeleteService(k) => state.retain(|e| e.service.key != k),
                Write::AddDestination { service, destination } => {
                    let e = state.iter_mut().find(|e| e.service.key == service).expect("its service exists");
                    assert!(e.destinations.iter().all(|d| d.socket_addr() != destination.socket_addr()), "added twice");
                    e.destinations.push(destination);
                }
                Write::EditDestination { service, destination } => {
                    let e = state.iter_mut().find(|e| e.service.key == service).expect("its service exists");
                    let d = e.destinations.iter_mut().find(|d| d.socket_addr() == destination.socket_addr()).expect("it exists");
                    let (active, inactive) = (d.active_connections, d.inactive_connections);
                    *d = Destination { active_connections: active, inactive_connections: inactive, ..destination };
                }
                Write::DeleteDestination { service, destination } => {
                    let e = state.iter_mut().find(|e| e.service.key == service).expect("its service exists");
                    e.destinations.retain(|d| d.socket_addr() != destination);
                }
            }
        }
    }

    fn ours(_: &ServiceKey) -> bool {
        true
    }

    fn never(_: &ServiceKey, _: SocketAddr) -> bool {
        false
    }

    #[test]
    fn an_empty_table_gets_services_then_destinations_and_converges() {
        let desired = [want(vip(), &[("10.1.0.1:8080", 10), ("10.1.0.2:8080", 90)])];
        let mut state = Vec::new();
        let plan = plan_owned(&desired, &state, ours, never);
        assert!(matches!(plan.writes[0], Write::AddService(_)), "{plan:?}");
        assert_eq!(plan.writes.len(), 3);
        apply(&mut state, &plan.writes);
        assert_eq!(plan_owned(&desired, &state, ours, never), OwnedPlan::default(), "nothing left to write");
    }

    #[test]
    fn a_persistence_change_edits_the_service_and_the_hashed_flag_is_not_a_difference() {
        let mut desired = [want(vip(), &[("10.1.0.1:8080", 1)])];
        let mut state = Vec::new();
        let first = plan_owned(&desired, &state, ours, never);
        apply(&mut state, &first.writes);
        desired[0].service.flags = IP_VS_SVC_F_PERSISTENT;
        desired[0].service.timeout = 10800;
        let plan = plan_owned(&desired, &state, ours, never);
        assert_eq!(plan.writes, [Write::EditService(desired[0].service.clone())]);
        apply(&mut state, &plan.writes);
        assert!(plan_owned(&desired, &state, ours, never).writes.is_empty());
    }

    #[test]
    fn a_removed_tcp_destination_drains_at_weight_zero_until_its_connections_end() {
        let mut state = Vec::new();
        let both = [want(vip(), &[("10.1.0.1:8080", 5), ("10.1.0.2:8080", 5)])];
        let first = plan_owned(&both, &state, ours, never);
        apply(&mut state, &first.writes);
        state[0].destinations[1].active_connections = 3;
        let one = [want(vip(), &[("10.1.0.1:8080", 5)])];
        let plan = plan_owned(&one, &state, ours, never);
        let gone = addr("10.1.0.2:8080");
        assert_eq!(plan.draining, [(vip(), gone)]);
        let Write::EditDestination { destination, .. } = &plan.writes[0] else { panic!("{plan:?}") };
        assert_eq!((destination.socket_addr(), destination.weight), (gone, 0));
        apply(&mut state, &plan.writes);

        // Still connected: it stays, at 0, and nothing is written again.
        let plan = plan_owned(&one, &state, ours, never);
        assert!(plan.writes.is_empty() && plan.draining == [(vip(), gone)], "{plan:?}");
        // The timeout passes: it goes even with connections.
        let plan = plan_owned(&one, &state, ours, |_, _| true);
        assert_eq!(plan.writes, [Write::DeleteDestination { service: vip(), destination: gone }]);
        // Or its connections end.
        state[0].destinations[1].active_connections = 0;
        let plan = plan_owned(&one, &state, ours, never);
        assert_eq!(plan.writes, [Write::DeleteDestination { service: vip(), destination: gone }]);
        assert!(plan.draining.is_empty());
    }

    #[test]
    fn a_removed_udp_destination_goes_at_once() {
        let key = ServiceKey::udp(addr("10.96.0.10:53"));
        let mut state = Vec::new();
        let first = plan_owned(&[want(key, &[("10.1.0.1:53", 1), ("10.1.0.2:53", 1)])], &state, ours, never);
        apply(&mut state, &first.writes);
        state[0].destinations[1].active_connections = 4;
        let plan = plan_owned(&[want(key, &[("10.1.0.1:53", 1)])], &state, ours, never);
        assert_eq!(plan.writes, [Write::DeleteDestination { service: key, destination: addr("10.1.0.2:53") }]);
    }

    #[test]
    fn only_owned_services_are_deleted_and_others_are_never_touched() {
        let theirs = ServiceKey::tcp(addr("10.96.0.99:443"));
        let mut state = vec![ServiceEntry {
            service: Service::new(theirs, "rr"),
            destinations: vec![Destination::new(addr("10.2.0.1:443"), ForwardMethod::Masquerade, 1)],
        }];
        let first = plan_owned(&[want(vip(), &[("10.1.0.1:8080", 1)])], &state, |k| *k == vip(), never);
        apply(&mut state, &first.writes);
        let plan = plan_owned(&[], &state, |k| *k == vip(), never);
        assert_eq!(plan.writes, [Write::DeleteService(vip())]);
        apply(&mut state, &plan.writes);
        assert_eq!(state.len(), 1);
        assert_eq!(state[0].service.key, theirs);
    }

    #[test]
    fn a_destination_forwarded_otherwise_is_put_back_to_masquerade() {
        let mut state = Vec::new();
        let desired = [want(vip(), &[("10.1.0.1:8080", 2)])];
        let first = plan_owned(&desired, &state, ours, never);
        apply(&mut state, &first.writes);
        state[0].destinations[0].forward = ForwardMethod::DirectRoute;
        let plan = plan_owned(&desired, &state, ours, never);
        let Write::EditDestination { destination, .. } = &plan.writes[0] else { panic!("{plan:?}") };
        assert_eq!((destination.forward, destination.weight), (ForwardMethod::Masquerade, 2));
        // The kernel's report of a masqueraded local destination is no difference.
        state[0].destinations[0].forward = ForwardMethod::Local;
        assert!(plan_owned(&desired, &state, ours, never).writes.is_empty());
    }
}
