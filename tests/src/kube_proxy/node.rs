//! What kube-proxy knows of its node besides Services and EndpointSlices: the
//! IP families it proxies, its Node's labels, and the addresses of its
//! interfaces, from which it picks the addresses NodePorts are served on.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use super::proxier::ProxyConfig;

/// The Node label kube-proxy takes its zone from (`v1.LabelTopologyZone`).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// kube-proxy's dummy interface (`defaultDummyDevice`).
pub const DEFAULT_DUMMY_INTERFACE: &str = "kube-ipvs0";

/// An IP family: kube-proxy runs one proxier per family (its dual-stack
/// meta-proxier), each blind to the other family's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// Both, in the order the emulator syncs them.
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    /// The family of an address.
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { IpFamily::V4 } else { IpFamily::V6 }
    }

    /// Whether `ip` is of this family.
    pub fn has(self, ip: IpAddr) -> bool {
        IpFamily::of(ip) == self
    }

    /// The name the API uses (`spec.ipFamilies`, an EndpointSlice's `addressType`).
    pub fn api_name(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.api_name())
    }
}

/// A CIDR of either family (`10.96.0.0/12`, `fd00:10:96::/112`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpCidr {
    network: IpAddr,
    prefix: u8,
}

impl IpCidr {
    /// The range of `prefix` bits around `ip` (host bits cleared); `None` when
    /// the prefix is longer than the family's addresses.
    pub fn new(ip: IpAddr, prefix: u8) -> Option<Self> {
        let network = match ip {
            IpAddr::V4(a) if prefix <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) if prefix <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
            _ => return None,
        };
        Some(Self { network, prefix })
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The family of the range.
    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.network)
    }

    /// Whether it is `0.0.0.0/0` or `::/0` (kube-proxy's `IsZeroCIDR`).
    pub fn is_zero(&self) -> bool {
        self.prefix == 0
    }

    /// Whether `ip` is in the range (never for the other family).
    pub fn contains(&self, ip: IpAddr) -> bool {
        IpCidr::new(ip, self.prefix).is_some_and(|c| c.network == self.network)
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// A string that is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a CIDR: {0:?}")]
pub struct BadCidr(pub String);

impl FromStr for IpCidr {
    type Err = BadCidr;
    fn from_str(s: &str) -> Result<Self, BadCidr> {
        let bad = || BadCidr(s.to_string());
        let (ip, len) = s.split_once('/').ok_or_else(bad)?;
        let ip: IpAddr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = len.parse().map_err(|_| bad())?;
        IpCidr::new(ip, prefix).ok_or_else(bad)
    }
}

/// One address of one network interface, as `getifaddrs(3)` lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InterfaceAddress {
    /// The interface's name (`eth0`, `lo`, `kube-ipvs0`).
    pub interface: String,
    /// The address.
    pub address: IpAddr,
}

impl InterfaceAddress {
    /// `address` on `interface`.
    pub fn new(interface: impl Into<String>, address: IpAddr) -> Self {
        Self { interface: interface.into(), address }
    }
}

/// Every IPv4 and IPv6 address of every interface of this network namespace
/// (what kube-proxy reads over netlink on each sync).
pub fn interface_addresses() -> std::io::Result<Vec<InterfaceAddress>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list that freeifaddrs releases below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says which kind it is.
        let address = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let interface = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        out.push(InterfaceAddress { interface, address });
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// What a sync knows of the node besides the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The Node's labels: [`ZONE_LABEL`] is the zone topology hints are
    /// matched against.
    pub labels: BTreeMap<String, String>,
    /// The addresses of the node's interfaces ([`interface_addresses`]): where
    /// NodePorts are served unless [`ProxyConfig::node_addresses`] lists them.
    pub interfaces: Vec<InterfaceAddress>,
}

impl NodeInfo {
    /// The node's zone (`topology.kubernetes.io/zone`), empty when unlabelled.
    pub fn zone(&self) -> &str {
        self.labels.get(ZONE_LABEL).map(String::as_str).unwrap_or("")
    }
}

fn dummy_interface(cfg: &ProxyConfig) -> &str {
    cfg.dummy_interface.as_deref().unwrap_or(DEFAULT_DUMMY_INTERFACE)
}

/// kube-proxy's `isValidForSet`: of the family, not loopback, not IPv6 link-local.
fn valid_node_address(family: IpFamily, ip: IpAddr) -> bool {
    let link_local = matches!(ip, IpAddr::V6(a) if a.is_unicast_link_local());
    family.has(ip) && !ip.is_loopback() && !link_local
}

/// The node's own addresses of one family, as the IPv4 or IPv6 proxier sees
/// them (`GetAllLocalAddressesExcept(kube-ipvs0)`): every interface's but the
/// dummy interface's, without loopback and IPv6 link-local addresses. An
/// external or load-balancer IP among them is not bound to the dummy
/// interface. With [`ProxyConfig::node_addresses`] set, its addresses of the
/// family instead.
pub fn node_address_set(cfg: &ProxyConfig, family: IpFamily, node: &NodeInfo) -> BTreeSet<IpAddr> {
    if let Some(list) = &cfg.node_addresses {
        return list.iter().copied().filter(|ip| family.has(*ip)).collect();
    }
    let dummy = dummy_interface(cfg);
    node.interfaces
        .iter()
        .filter(|a| a.interface != dummy && valid_node_address(family, a.address))
        .map(|a| a.address)
        .collect()
}

/// The addresses one family's proxier serves NodePorts on. With
/// [`ProxyConfig::node_addresses`] set, its addresses of the family. Otherwise,
/// as kube-proxy: without `--nodeport-addresses` CIDRs of the family (or with
/// a `0.0.0.0/0` / `::/0` among them), [`node_address_set`]; with them, every
/// interface address inside one of them but loopback ones — kube-proxy's
/// `GetNodeIPs` then keeps IPv6 link-local addresses and the dummy
/// interface's addresses the CIDRs cover, and so does this.
pub fn node_port_addresses(cfg: &ProxyConfig, family: IpFamily, node: &NodeInfo) -> BTreeSet<IpAddr> {
    if cfg.node_addresses.is_some() {
        return node_address_set(cfg, family, node);
    }
    let cidrs: Vec<&IpCidr> = cfg.nodeport_addresses.iter().filter(|c| c.family() == family).collect();
    if cidrs.is_empty() || cidrs.iter().any(|c| c.is_zero()) {
        return node_address_set(cfg, family, node);
    }
    node.interfaces
        .iter()
        .map(|a| a.address)
        .filter(|ip| !ip.is_loopback() && cidrs.iter().any(|c| c.contains(*ip)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_normalise_and_contain_only_their_family() {
        let v4: IpCidr = "10.96.1.2/12".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v4.to_string(), "10.96.0.0/12");
        assert!(v4.contains("10.111.255.255".parse().unwrap_or(IpAddr::from([0; 4]))));
        assert!(!v4.contains("10.112.0.0".parse().unwrap_or(IpAddr::from([0; 4]))));
        assert!(!v4.contains("::".parse().unwrap_or(IpAddr::from([0; 4]))));
        let v6: IpCidr = "fd00:10:96::/112".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v6.family(), IpFamily::V6);
        assert!(v6.contains("fd00:10:96::ffff".parse().unwrap_or(IpAddr::from([0; 4]))));
        assert!(!v6.contains("fd00:10:96::1:0".parse().unwrap_or(IpAddr::from([0; 4]))));
        assert!("0.0.0.0/0".parse::<IpCidr>().is_ok_and(|c| c.is_zero() && c.contains(IpAddr::from([1, 2, 3, 4]))));
        for bad in ["10.0.0.0", "10.0.0.0/33", "::/129", "x/8", "10.0.0.0/-1"] {
            assert!(bad.parse::<IpCidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_interfaces_of_this_namespace_include_loopback() {
        let found = interface_addresses().unwrap_or_else(|e| panic!("getifaddrs: {e}"));
        let lo = IpAddr::from([127, 0, 0, 1]);
        assert!(found.iter().any(|a| a.address == lo), "{found:?}");
        let node = NodeInfo { interfaces: found, ..NodeInfo::default() };
        let cfg = ProxyConfig { node_addresses: None, ..ProxyConfig::default() };
        assert!(!node_port_addresses(&cfg, IpFamily::V4, &node).contains(&lo));
    }
}
