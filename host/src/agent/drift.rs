//! The periodic sweep's comparison of the kernel's table with the plans, for
//! either way of reading the table: the IPv4 table through `getsockopt`
//! ([`ipvs::SockoptTable`], the cheap one) or `/proc/net/ip_vs`'s text
//! ([`super::procfs`], which also has IPv6).

use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;
use std::net::SocketAddr;

use ipvs::{ServiceKey, SockoptTable};

/// What one virtual service should be: whose it is, its scheduler, and the
/// weight of each destination that has one.
pub struct Wanted<'a, K> {
    /// Whose (a WeightedService).
    pub owner: &'a K,
    /// The scheduler it should have; `None`: any.
    pub scheduler: Option<&'a str>,
    /// The weight each of these destinations should have.
    pub weights: &'a BTreeMap<SocketAddr, u16>,
    /// Whether a weight of 0 is left as it is (a Service being restored).
    pub zeros_stay: bool,
}

/// One virtual service of the kernel compared with what is wanted of it, one
/// destination at a time.
pub struct Comparison<'a, K> {
    wanted: Wanted<'a, K>,
    differs: bool,
}

impl<'a, K> Comparison<'a, K> {
    /// Start with the service's scheduler.
    pub fn new(wanted: Wanted<'a, K>, scheduler: &str) -> Self {
        let differs = wanted.scheduler.is_some_and(|s| s != scheduler);
        Comparison { wanted, differs }
    }

    /// Whether a difference was found already (the rest need not be read).
    pub fn differs(&self) -> bool {
        self.differs
    }

    /// One destination of the service with its weight.
    pub fn destination(&mut self, address: &SocketAddr, weight: u32) {
        match self.wanted.weights.get(address) {
            Some(w) if u32::from(*w) == weight => {}
            Some(_) if weight == 0 && self.wanted.zeros_stay => {}
            Some(_) => self.differs = true,
            None => {} // not the agent's to weigh (not ready, terminating)
        }
    }

    /// The owner, if the service differs: another scheduler or another
    /// weight. A wanted destination the kernel lacks is not a difference:
    /// which destinations exist is kube-proxy's business.
    pub fn finish(self) -> Option<&'a K> {
        self.differs.then_some(self.wanted.owner)
    }
}

/// The owners of the virtual services in `table` that differ from what
/// `find` wants of them.
pub fn drifted_in_sockopt_table<'a, K: Eq + Hash>(
    table: &SockoptTable,
    mut find: impl FnMut(&ServiceKey) -> Option<Wanted<'a, K>>,
) -> HashSet<&'a K> {
    let mut drifted = HashSet::new();
    for (service, destinations) in table.services() {
        let Some(wanted) = find(&service.key).filter(|w| !drifted.contains(w.owner)) else { continue };
        let mut comparison = Comparison::new(wanted, service.scheduler());
        for (address, weight) in destinations {
            if comparison.differs() {
                break;
            }
            comparison.destination(address, *weight);
        }
        drifted.extend(comparison.finish());
    }
    drifted
}

/// A hash of what the sweep compares in `table` (keys, schedulers,
/// destinations and weights), to tell a table read before from a changed one
/// at a fraction of the cost of comparing it.
pub fn sockopt_table_hash(table: &SockoptTable) -> u64 {
    let mut hash = TableHash::default();
    for (service, destinations) in table.services() {
        if let ServiceKey::Address { protocol, address: std::net::IpAddr::V4(address), port } = service.key {
            hash.add(u64::from(address.to_bits()) << 32 | u64::from(port) << 16 | u64::from(protocol.to_raw()));
        } else {
            hash.add(u64::MAX); // a fwmark service: never the agent's
        }
        hash.add_bytes(service.scheduler().as_bytes());
        for (address, weight) in destinations {
            let ip = match address.ip() {
                std::net::IpAddr::V4(ip) => u64::from(ip.to_bits()),
                std::net::IpAddr::V6(_) => 0, // never in this table
            };
            hash.add(ip << 32 | u64::from(address.port()));
            hash.add(u64::from(*weight));
        }
        hash.add(destinations.len() as u64);
    }
    hash.finish()
}

/// A fast hash for telling two reads of the table apart: eight bytes at a
/// time, each step a bijection of the state for the same input word, so that
/// inputs differing in one word (a weight, a scheduler) never hash the same.
/// (Under emulation, SipHash over 1,000 virtual services cost a quarter of the
/// idle agent's own work.)
#[derive(Default)]
pub struct TableHash {
    state: u64,
    words: u64,
}

impl TableHash {
    /// Mix in one word.
    pub fn add(&mut self, word: u64) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        self.state = (self.state.rotate_left(5) ^ word).wrapping_mul(K);
        self.words += 1;
    }

    /// Mix in bytes, eight at a time, then their length.
    pub fn add_bytes(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let mut last = [0u8; 8];
        last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.add(u64::from_le_bytes(last));
        self.add(bytes.len() as u64);
    }

    /// The hash of everything added.
    pub fn finish(mut self) -> u64 {
        let words = self.words;
        self.add(words);
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comparison_finds_each_kind_of_difference() {
        let weights: BTreeMap<SocketAddr, u16> =
            [("10.0.0.1:80".parse().unwrap(), 3), ("10.0.0.2:80".parse().unwrap(), 0)].into_iter().collect();
        let owner = "ws".to_string();
        let compare_as = |wanted_scheduler: Option<&'static str>, zeros_stay: bool, scheduler: &str, seen: &[(&str, u32)]| {
            let wanted = Wanted { owner: &owner, scheduler: wanted_scheduler, weights: &weights, zeros_stay };
            let mut c = Comparison::new(wanted, scheduler);
            for (address, weight) in seen {
                c.destination(&address.parse().unwrap(), *weight);
            }
            c.finish().is_some()
        };
        let compare = |scheduler: &str, seen: &[(&str, u32)]| compare_as(Some("wrr"), false, scheduler, seen);
        assert!(!compare("wrr", &[("10.0.0.1:80", 3), ("10.0.0.2:80", 0), ("10.0.0.9:80", 1)]), "others are left alone");
        assert!(compare("rr", &[("10.0.0.1:80", 3), ("10.0.0.2:80", 0)]), "another scheduler");
        assert!(compare("wrr", &[("10.0.0.1:80", 1), ("10.0.0.2:80", 0)]), "another weight");
        assert!(compare("wrr", &[("10.0.0.1:80", 0), ("10.0.0.2:80", 0)]), "a zero where a weight is wanted");
        assert!(!compare("wrr", &[("10.0.0.1:80", 3)]), "a destination missing is kube-proxy's business");
        assert!(!compare_as(None, true, "rr", &[("10.0.0.1:80", 0)]), "restoring: any scheduler, zeros stay");
        assert!(compare_as(None, true, "rr", &[("10.0.0.1:80", 5)]), "restoring: another non-zero weight");
    }

    #[test]
    fn the_hash_tells_words_their_order_and_lengths_apart() {
        let hash = |words: &[u64], bytes: &[u8]| {
            let mut h = TableHash::default();
            for w in words {
                h.add(*w);
            }
            h.add_bytes(bytes);
            h.finish()
        };
        let base = hash(&[1, 2], b"wrr");
        assert_eq!(base, hash(&[1, 2], b"wrr"));
        let mut seen = HashSet::from([base]);
        for other in [hash(&[2, 1], b"wrr"), hash(&[1, 3], b"wrr"), hash(&[1, 2], b"rr"), hash(&[1, 2], b"wrr\0"), hash(&[1, 2, 0], b"wrr")] {
            assert!(seen.insert(other), "a different input, a different hash");
        }
    }
}
