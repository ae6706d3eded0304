//! The kernel's IPVS table as text, from `/proc/net/ip_vs`: every virtual
//! service with its scheduler and every destination with its weight, read in
//! pieces ([`TableRead`]). The periodic sweep uses it to find what drifted
//! when the plans have IPv6 virtual services (the cheaper
//! [`ipvs::SockoptTable`] shows IPv4 only); only those virtual services are
//! then read (and written) through netlink, whose dumps cost one request per
//! virtual service.
//!
//! The format is the kernel's (`ip_vs_info_seq_show` in `ip_vs_ctl.c`):
//!
//! ```text
//! IP Virtual Server version 1.2.1 (size=4096)
//! Prot LocalAddress:Port Scheduler Flags
//!   -> RemoteAddress:Port Forward Weight ActiveConn InActConn
//! TCP  0A600001:0050 wrr
//!   -> 0AF40002:1F90      Masq    10     0          0
//! UDP  [fd00:0000:0000:0000:0000:0000:0000:000a]:0035 rr persistent 360 FFFFFFFF
//! FWM  00000001 rr
//! ```

use std::collections::HashSet;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipvs::{Protocol, ServiceKey};

use super::drift::{Comparison, TableHash, Wanted};

/// One virtual service as `/proc/net/ip_vs` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcService {
    /// Its key; `None` for services the agent never programs (fwmark, other protocols).
    pub key: Option<ServiceKey>,
    /// The scheduler's name.
    pub scheduler: String,
    /// Each destination's address and weight.
    pub destinations: Vec<(SocketAddr, u32)>,
}

impl ProcService {
    /// The weight of the destination at `address`, if the service has it.
    pub fn weight_of(&self, address: &SocketAddr) -> Option<u32> {
        self.destinations.iter().find(|(a, _)| a == address).map(|(_, w)| *w)
    }
}

/// A read of the table in pieces, so that the work loop can handle a change
/// between two pieces: under emulation, reading 1,000 virtual services takes
/// the kernel about 40 ms, which an edit arriving meanwhile would wait for.
pub struct TableRead {
    file: std::fs::File,
}

/// How much of the table one [`TableRead::next_piece`] reads (about 600
/// destinations).
const PIECE: usize = 64 * 1024;

impl TableRead {
    /// Open the table of this thread's network namespace and clear `buffer`.
    /// Keep the buffer from one read to the next: the table of 5,000 virtual
    /// services is about 3 MiB, and a fresh buffer each time costs the kernel
    /// page faults and zeroed pages (12 % of the idle agent's time in the
    /// scale bench's profile).
    pub fn open(buffer: &mut String) -> std::io::Result<Self> {
        buffer.clear();
        Ok(TableRead { file: std::fs::File::open("/proc/thread-self/net/ip_vs")? })
    }

    /// Append the next piece to `buffer`; `true` once the whole table is in it.
    pub fn next_piece(&mut self, buffer: &mut String) -> std::io::Result<bool> {
        use std::io::Read;
        let mut piece = (&mut self.file).take(PIECE as u64);
        let read = piece.read_to_string(buffer)?;
        Ok(read < PIECE)
    }
}

/// A hash of the table's text, to tell a table read before from a changed one
/// at a fraction of the cost of comparing it.
pub fn table_hash(text: &str) -> u64 {
    let mut hash = TableHash::default();
    hash.add_bytes(text.as_bytes());
    hash.finish()
}

/// Parse the table; `None` when the text is not in the format above.
pub fn parse(text: &str) -> Option<Vec<ProcService>> {
    let mut lines = text.lines();
    if !lines.next()?.starts_with("IP Virtual Server version") {
        return None;
    }
    let mut services: Vec<ProcService> = Vec::new();
    for line in lines {
        if let Some(rest) = line.trim_start().strip_prefix("->") {
            let mut fields = rest.split_whitespace();
            let address = fields.next()?;
            if address == "RemoteAddress:Port" {
                continue; // the header
            }
            let address = socket_addr(address)?;
            let _forward = fields.next()?;
            let weight: u32 = fields.next()?.parse().ok()?;
            services.last_mut()?.destinations.push((address, weight));
            continue;
        }
        let mut fields = line.split_whitespace();
        let Some(protocol) = fields.next() else { continue };
        if protocol == "Prot" {
            continue; // the header
        }
        let address = fields.next()?;
        let scheduler = fields.next()?.to_string();
        let protocol = match protocol {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None, // FWM, or a protocol kube-proxy never uses
        };
        let key = match protocol {
            Some(protocol) => Some(ServiceKey::new(protocol, socket_addr(address)?)),
            None => None,
        };
        services.push(ProcService { key, scheduler, destinations: Vec::new() });
    }
    Some(services)
}

/// The owners of the virtual services in `text` (the table) that differ from
/// what `find` wants of them: another scheduler or another weight. One pass over the text, nothing allocated per line:
/// the destinations of virtual services `find` does not know are not even
/// parsed. `None` when the text is not in the format above. (The periodic
/// sweep's comparison: at 5,000 virtual services and 50,000 destinations,
/// parsing the whole table into [`ProcService`]s first cost more than reading it.)
pub fn drifted<'a, K: Eq + Hash>(text: &str, mut find: impl FnMut(&ServiceKey) -> Option<Wanted<'a, K>>) -> Option<HashSet<&'a K>> {
    let mut lines = text.lines();
    if !lines.next()?.starts_with("IP Virtual Server version") {
        return None;
    }
    let mut drifted = HashSet::new();
    // The virtual service being read, when it is someone's.
    let mut current: Option<Comparison<'a, K>> = None;
    for line in lines {
        if let Some(rest) = line.trim_start().strip_prefix("->") {
            let Some(c) = current.as_mut().filter(|c| !c.differs()) else { continue };
            let mut fields = rest.split_whitespace();
            let address = socket_addr(fields.next()?)?;
            let _forward = fields.next()?;
            let weight: u32 = fields.next()?.parse().ok()?;
            c.destination(&address, weight);
            continue;
        }
        drifted.extend(current.take().and_then(Comparison::finish));
        let mut fields = line.split_whitespace();
        let Some(protocol) = fields.next() else { continue };
        let protocol = match protocol {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            "Prot" => continue, // the header
            _ => {
                fields.next()?; // FWM, or a protocol kube-proxy never uses: still a service line
                continue;
            }
        };
        let key = ServiceKey::new(protocol, socket_addr(fields.next()?)?);
        let scheduler = fields.next()?;
        if let Some(wanted) = find(&key).filter(|w| !drifted.contains(w.owner)) {
            current = Some(Comparison::new(wanted, scheduler));
        }
    }
    drifted.extend(current.and_then(Comparison::finish));
    Some(drifted)
}

/// `0A600001:0050` (IPv4, hex, host order) or `[2001:0db8:…]:0050`.
fn socket_addr(text: &str) -> Option<SocketAddr> {
    let (address, port) = text.rsplit_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match address.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        Some(v6) => IpAddr::V6(v6.parse::<Ipv6Addr>().ok()?),
        None => IpAddr::V4(Ipv4Addr::from(u32::from_str_radix(address, 16).ok()?)),
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const TABLE: &str = "IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A600001:0050 wrr 
  -> 0AF40002:1F90      Masq    10     0          0         
  -> 0AF40003:1F90      Masq    0      2          1         
UDP  0A14000A:7918 sh ops persistent 360 FFFFFFFF
FWM  00000001 rr 
  -> 0AF40004:0050      Route   1      0          0         
TCP  [fd00:0000:0000:0000:0000:0000:0000:000a]:0050 rr 
  -> [fd00:0000:0000:0000:0000:0000:0001:0005]:1F90      Masq    65535  0          0         
";

    #[test]
    fn services_destinations_and_weights_are_read() {
        let table = parse(TABLE).expect("the kernel's format");
        assert_eq!(table.len(), 4);
        assert_eq!(table[0].key, Some(ServiceKey::tcp("10.96.0.1:80".parse().unwrap())));
        assert_eq!(table[0].scheduler, "wrr");
        assert_eq!(table[0].weight_of(&"10.244.0.2:8080".parse().unwrap()), Some(10));
        assert_eq!(table[0].weight_of(&"10.244.0.3:8080".parse().unwrap()), Some(0));
        assert_eq!(table[0].weight_of(&"10.244.0.4:8080".parse().unwrap()), None);
        assert_eq!(table[1].key, Some(ServiceKey::udp("10.20.0.10:31000".parse().unwrap())));
        assert_eq!(table[1].scheduler, "sh");
        assert!(table[1].destinations.is_empty());
        // A fwmark service: no key, but its destinations are not given to the one before.
        assert_eq!(table[2].key, None);
        assert_eq!(table[2].destinations.len(), 1);
        assert_eq!(table[3].key, Some(ServiceKey::tcp("[fd00::a]:80".parse().unwrap())));
        assert_eq!(table[3].destinations, vec![("[fd00::1:5]:8080".parse().unwrap(), 65535)]);
    }

    #[test]
    fn drifted_names_the_owners_whose_services_differ() {
        let weights = |pairs: &[(&str, u16)]| -> BTreeMap<SocketAddr, u16> {
            pairs.iter().map(|(a, w)| (a.parse().unwrap(), *w)).collect()
        };
        let right = weights(&[("10.244.0.2:8080", 10), ("10.244.0.3:8080", 0)]);
        let wrong_weight = weights(&[("10.244.0.2:8080", 11)]);
        let missing = weights(&[("10.244.0.2:8080", 10), ("10.244.0.9:8080", 3)]);
        let v6 = weights(&[("[fd00::1:5]:8080", 65535)]);
        let none = BTreeMap::new();
        let tcp: ServiceKey = ServiceKey::tcp("10.96.0.1:80".parse().unwrap());
        let udp: ServiceKey = ServiceKey::udp("10.20.0.10:31000".parse().unwrap());
        let six: ServiceKey = ServiceKey::tcp("[fd00::a]:80".parse().unwrap());
        let check = |tcp_wants: &'static str, tcp_weights: &BTreeMap<SocketAddr, u16>, udp_scheduler: &'static str| {
            let (a, b, c) = ("a".to_string(), "b".to_string(), "c".to_string());
            let found = drifted(TABLE, |key| {
                if *key == tcp {
                    Some(Wanted { owner: &a, scheduler: Some(tcp_wants), weights: tcp_weights, zeros_stay: false })
                } else if *key == udp {
                    Some(Wanted { owner: &b, scheduler: Some(udp_scheduler), weights: &none, zeros_stay: false })
                } else if *key == six {
                    Some(Wanted { owner: &c, scheduler: Some("rr"), weights: &v6, zeros_stay: false })
                } else {
                    None
                }
            })
            .expect("the kernel's format");
            let mut names: Vec<String> = found.into_iter().cloned().collect();
            names.sort();
            names
        };
        assert!(check("wrr", &right, "sh").is_empty());
        assert_eq!(check("rr", &right, "sh"), ["a"]);
        assert_eq!(check("wrr", &wrong_weight, "sh"), ["a"]);
        assert!(check("wrr", &missing, "sh").is_empty(), "a destination the kernel lacks is kube-proxy's business");
        assert_eq!(check("wrr", &right, "wrr"), ["b"]);
        assert!(drifted("something else\n", |_| None::<Wanted<'_, String>>).is_none());
    }

    #[test]
    fn the_table_hash_changes_with_any_weight_or_scheduler() {
        let base = table_hash(TABLE);
        assert_eq!(base, table_hash(TABLE), "the same text, the same hash");
        let mut seen = std::collections::HashSet::from([base]);
        for (from, to) in [("Masq    10 ", "Masq    11 "), (" wrr ", " rr  "), ("65535", "65534"), ("0          0", "0          1")] {
            let changed = TABLE.replacen(from, to, 1);
            assert_ne!(changed, TABLE, "{from:?} is in the table");
            assert!(seen.insert(table_hash(&changed)), "{from:?} -> {to:?} changes the hash");
        }
        assert_ne!(table_hash(&TABLE[..TABLE.len() - 1]), base, "a shorter text");
        assert_ne!(table_hash(""), table_hash("\0"), "the length counts");
    }

    #[test]
    fn an_empty_table_and_unknown_text() {
        assert_eq!(parse(&TABLE.lines().take(3).collect::<Vec<_>>().join("\n")), Some(vec![]));
        assert_eq!(parse("something else\n"), None);
        assert_eq!(parse("IP Virtual Server version 1.2.1 (size=4096)\nTCP  nonsense wrr\n"), None);
    }
}
