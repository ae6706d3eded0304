//! Entry points for the fuzz targets in `fuzz/` (not part of the API): what
//! the client does with a datagram the kernel sends, without a socket, with
//! the properties that must hold for any bytes asserted.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use netlink_packet_core::{Emitable, NetlinkPayload, NlasIterator, ParseableParametrized};
use netlink_packet_generic::{GenlHeader, GenlMessage};

use crate::client::{FamilyReply, RawReply, acks, attributes, classify, messages};
use crate::constants::{IPVS_CMD_ATTR_DEST, IPVS_CMD_ATTR_SERVICE};
use crate::diff::{DesiredService, plan};
use crate::message::{IpvsAttr, IpvsMessage};
use crate::nlas::{ServiceAttr, parse_nested};
use crate::table::render_ipvsadm;
use crate::types::{AddressFamily, Destination, Info, Service, ServiceEntry, ServiceKey, Stats};
use crate::write::{MAX_WEIGHT, Write};

/// What [`reply_datagram`] made of a datagram.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Services of the dump replies, each with the destinations of the dump
    /// replies that parse in its family.
    pub entries: Vec<ServiceEntry>,
    /// `IPVS_CMD_SET_INFO` contents, if any.
    pub info: Option<Info>,
    /// `ipvsadm -Ln` of the above.
    pub table: String,
}

/// Reads `datagram` every way the client reads what the kernel sends —
/// acknowledgements, typed replies (`info`, `service`), dump replies
/// (`services`, `destinations`), the controller's family reply — then runs
/// what the agent does with a dump: renders it, plans against it, and builds
/// the writes that send each entry back. Panics when a property breaks:
///
/// - a typed message emits and parses back to itself;
/// - the dump path (`Service::parse`) and the attribute path
///   (`Service::from_attrs`) agree;
/// - a plan that wants what the dump has writes nothing;
/// - a weight or scheduler change sends back everything else as dumped.
pub fn reply_datagram(datagram: &[u8]) -> Parsed {
    let port = datagram.get(12..16).map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    let _ = acks(datagram, port);

    let mut parsed = Parsed::default();
    for message in messages::<GenlMessage<IpvsMessage>>(datagram) {
        let Ok(message) = message else { continue };
        let (seq, port, kind) =
            (message.header.sequence_number, message.header.port_number, message.header.message_type);
        if let NetlinkPayload::InnerMessage(genl) = &message.payload {
            typed_message(genl, &mut parsed);
        }
        let _ = classify(message, seq, port, &|t| t == kind);
    }
    for message in messages::<GenlMessage<FamilyReply>>(datagram).flatten() {
        let _ = classify(message, 0, 0, &|_| true);
    }

    let replies: Vec<RawReply> = messages::<GenlMessage<RawReply>>(datagram)
        .filter_map(|m| match m.ok()?.payload {
            NetlinkPayload::InnerMessage(genl) => Some(genl.payload),
            _ => None,
        })
        .collect();
    for reply in &replies {
        for nla in NlasIterator::new(&reply.attrs).flatten() {
            if nla.kind() == IPVS_CMD_ATTR_SERVICE {
                let dumped = Service::parse(nla.value()).ok();
                let typed = parse_nested(nla.value(), "service", ServiceAttr::parse)
                    .and_then(|attrs| Service::from_attrs(&attrs))
                    .ok();
                assert_eq!(dumped, typed, "the dump path and the attribute path disagree");
            }
        }
    }
    let services = attributes(&replies, IPVS_CMD_ATTR_SERVICE, Service::parse).unwrap_or_default();
    let destinations = |family| {
        attributes(&replies, IPVS_CMD_ATTR_DEST, |payload| Destination::parse(payload, family)).unwrap_or_default()
    };
    let (v4, v6) = (destinations(AddressFamily::Inet), destinations(AddressFamily::Inet6));
    parsed.entries = services
        .into_iter()
        .map(|service| {
            let destinations = match service.family() {
                AddressFamily::Inet => v4.clone(),
                AddressFamily::Inet6 => v6.clone(),
            };
            ServiceEntry { service, destinations }
        })
        .collect();

    parsed.table = render_ipvsadm(parsed.info.as_ref(), &parsed.entries);
    converged_plan_writes_nothing(&parsed.entries);
    for entry in &parsed.entries {
        writes_send_back_what_was_dumped(entry);
    }
    parsed
}

fn typed_message(genl: &GenlMessage<IpvsMessage>, parsed: &mut Parsed) {
    let message = &genl.payload;
    // Attributes this crate does not know are kept as DefaultNla, which
    // drops NLA_F_NET_BYTEORDER when emitted (they are never sent back): a
    // message may change on its first trip out and back, never after.
    let trip = |m: &IpvsMessage| {
        let mut bytes = vec![0; m.buffer_len()];
        m.emit(&mut bytes);
        let back = IpvsMessage::parse_with_param(&bytes[..], GenlHeader { cmd: m.cmd.into(), version: 1 })
            .expect("an emitted message parses");
        (bytes, back)
    };
    let (bytes, once) = trip(message);
    let (bytes_again, twice) = trip(&once);
    assert_eq!(once.attrs.len(), message.attrs.len(), "attributes lost on the way out and back");
    assert_eq!(twice, once, "a message changed on its second trip out and back");
    assert_eq!(bytes_again, bytes, "a message emits differently after a trip out and back");
    for attr in &message.attrs {
        match attr {
            IpvsAttr::Service(attrs) => {
                let _ = Service::from_attrs(attrs);
            }
            IpvsAttr::Destination(attrs) => {
                let _ = Destination::from_attrs(attrs, AddressFamily::Inet);
                let _ = Destination::from_attrs(attrs, AddressFamily::Inet6);
            }
            IpvsAttr::InfoVersion(v) => parsed.info.get_or_insert(Info { version: 0, connection_table_size: 0 }).version = *v,
            IpvsAttr::InfoConnTabSize(s) => {
                parsed.info.get_or_insert(Info { version: 0, connection_table_size: 0 }).connection_table_size = *s
            }
            IpvsAttr::Other(_) => {}
        }
    }
}

/// `plan` sees the last entry of a service key and the last destination of
/// an address (as the kernel never sends twice); wanting exactly that is converged.
fn converged_plan_writes_nothing(entries: &[ServiceEntry]) {
    let mut last: HashMap<ServiceKey, &ServiceEntry> = HashMap::new();
    for entry in entries {
        last.insert(entry.service.key, entry);
    }
    let desired: Vec<DesiredService> = last
        .values()
        .map(|entry| {
            let weights: BTreeMap<SocketAddr, u32> =
                entry.destinations.iter().map(|d| (d.socket_addr(), d.weight)).collect();
            let mut want = DesiredService::new(entry.service.key).with_scheduler(entry.service.scheduler.clone());
            for (address, weight) in weights {
                if let Ok(weight) = u16::try_from(weight) {
                    want = want.with_weight(address, weight);
                }
            }
            want
        })
        .collect();
    let result = plan(&desired, entries);
    assert!(result.is_converged(), "wanting what the dump has gives {result:?}");

    // Every weight changed: one weight write each, every one sendable.
    let flipped: Vec<DesiredService> = desired
        .iter()
        .map(|d| DesiredService {
            scheduler: None,
            weights: d.weights.iter().map(|(a, w)| (*a, w ^ 1)).collect(),
            ..d.clone()
        })
        .collect();
    let result = plan(&flipped, entries);
    let wanted: usize = flipped.iter().map(|d| d.weights.len()).sum();
    assert_eq!(result.writes.len(), wanted, "{result:?}");
    for write in &result.writes {
        write.request().expect("a weight write from a plan is sendable");
    }
}

/// The agent's writes send back the dumped entry with only the weight or the
/// scheduler changed (the kernel resets whatever a full entry leaves out).
fn writes_send_back_what_was_dumped(entry: &ServiceEntry) {
    let service = &entry.service;
    if let Ok((_, attrs)) = Write::set_scheduler(service, "wrr").request() {
        let [IpvsAttr::Service(attrs)] = attrs.as_slice() else { panic!("{attrs:?}") };
        let sent = Service::from_attrs(attrs).expect("a service write parses");
        let expected = Service { scheduler: "wrr".into(), stats: Stats::default(), ..service.clone() };
        assert_eq!(sent, expected, "a scheduler change must keep the rest of the service");
    }
    for destination in &entry.destinations {
        let weight = (destination.weight.min(MAX_WEIGHT) as u16) ^ 1;
        let write = Write::set_weight(service.key, destination, weight);
        let (_, attrs) = write.request().expect("a weight write is sendable");
        let [IpvsAttr::Service(key), IpvsAttr::Destination(attrs)] = attrs.as_slice() else { panic!("{attrs:?}") };
        assert_eq!(Service::from_attrs(key).map(|s| s.key).ok(), Some(service.key), "the write names another service");
        let sent = Destination::from_attrs(attrs, service.family()).expect("a destination write parses");
        let expected = Destination {
            weight: u32::from(weight),
            active_connections: 0,
            inactive_connections: 0,
            persistent_connections: 0,
            stats: Stats::default(),
            ..destination.clone()
        };
        assert_eq!(sent, expected, "a weight change must keep the rest of the destination");
    }
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use netlink_packet_core::NLM_F_MULTIPART;

    use super::*;
    use crate::client::encode_message;
    use crate::message::IpvsCmd;
    use crate::types::ForwardMethod;

    /// The harness itself, on a dump as the kernel sends it (the fuzz targets
    /// are not built by `cargo test`).
    #[test]
    fn reads_a_dump_the_way_the_client_does() {
        let service = Service::new(ServiceKey::tcp("10.96.0.1:80".parse().unwrap()), "rr");
        let destination = Destination::new("10.244.1.5:8080".parse().unwrap(), ForwardMethod::Masquerade, 3);
        let mut datagram = Vec::new();
        for (cmd, attr) in [
            (IpvsCmd::NewService, IpvsAttr::Service(service.to_attrs())),
            (IpvsCmd::NewDest, IpvsAttr::Destination(destination.to_attrs())),
        ] {
            let mut genl = GenlMessage::from_payload(IpvsMessage { cmd, attrs: vec![attr] });
            genl.set_resolved_family_id(0x1a);
            encode_message(genl, NLM_F_MULTIPART, 1, 7, &mut datagram);
        }
        let parsed = reply_datagram(&datagram);
        assert_eq!(parsed.entries, vec![ServiceEntry { service, destinations: vec![destination] }]);
        assert!(parsed.table.contains("  -> 10.244.1.5:8080"), "{}", parsed.table);
        // Any prefix of it is read without a panic.
        for len in 0..datagram.len() {
            reply_datagram(&datagram[..len]);
        }
    }

    /// Inputs on which the `netlink_reply` fuzz target failed while it was
    /// written (kept in tests/fuzz-regressions/): a service dump carrying an
    /// unknown attribute with the nested and byte-order flags set, and a dump
    /// reply followed by an error message cut short.
    #[test]
    fn inputs_the_fuzzer_crashed_on_read_without_a_panic() {
        for datagram in [
            &include_bytes!("../tests/fuzz-regressions/netlink_reply-7308f62f")[..],
            &include_bytes!("../tests/fuzz-regressions/netlink_reply-d2d32439")[..],
        ] {
            reply_datagram(datagram);
        }
    }
}
