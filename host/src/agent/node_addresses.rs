//! The node's own addresses, as kube-proxy's IPVS mode picks them for
//! NodePort virtual services: every address of every local interface but
//! loopback, IPv6 link-local and those on kube-proxy's dummy interface
//! (`kube-ipvs0`, which holds the ClusterIPs) and on the agent's own
//! (`ipvs-op0`, which holds those of the Services it serves), narrowed by
//! `--nodeport-addresses` when that is given. A virtual service on a
//! Service's NodePort counts as that NodePort only at one of these.

use std::collections::HashSet;
use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The interface kube-proxy binds ClusterIPs, external and load-balancer IPs to.
pub const KUBE_PROXY_DUMMY: &str = "kube-ipvs0";

/// An address range of `--nodeport-addresses`, e.g. `10.0.0.0/8` or `fd00::/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    base: IpAddr,
    prefix: u8,
}

/// A `--nodeport-addresses` value that is not a CIDR.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a CIDR (address/prefix length, e.g. 10.0.0.0/8 or fd00::/64)")]
pub struct BadCidr(String);

impl FromStr for Cidr {
    type Err = BadCidr;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadCidr(text.to_string());
        let (base, prefix) = text.trim().split_once('/').ok_or_else(bad)?;
        let base: IpAddr = base.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let max = if base.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { base, prefix })
    }
}

impl Cidr {
    /// Whether `address` is in the range.
    pub fn contains(&self, address: &IpAddr) -> bool {
        let (base, address, bits) = match (self.base, address) {
            (IpAddr::V4(b), IpAddr::V4(a)) => (u128::from(b.to_bits()), u128::from(a.to_bits()), 32),
            (IpAddr::V6(b), IpAddr::V6(a)) => (b.to_bits(), a.to_bits(), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (base >> shift) == (address >> shift)
    }
}

/// Which of `interfaces` (name, address) kube-proxy serves NodePorts on.
pub fn node_port_addresses(interfaces: &[(String, IpAddr)], only: &[Cidr]) -> HashSet<IpAddr> {
    interfaces
        .iter()
        .filter(|(name, _)| name != KUBE_PROXY_DUMMY && name != super::standalone::INTERFACE)
        .map(|(_, address)| *address)
        .filter(|a| !a.is_loopback())
        .filter(|a| !matches!(a, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .filter(|a| only.is_empty() || only.iter().any(|c| c.contains(a)))
        .collect()
}

/// Every address of every interface of this network namespace, with the
/// interface's name.
pub fn local_addresses() -> std::io::Result<Vec<(String, IpAddr)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
        let address = unsafe {
            match i32::from((*entry.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(entry.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(entry.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(entry.ifa_name) }.to_string_lossy().into_owned();
        out.push((name, address));
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_link_local_and_the_dummy_interface_are_not_node_addresses() {
        let interfaces: Vec<(String, IpAddr)> = [
            ("lo", "127.0.0.1"),
            ("lo", "::1"),
            ("eth0", "172.18.0.2"),
            ("eth0", "fe80::1"),
            ("eth0", "fd00:18::2"),
            ("kube-ipvs0", "10.96.0.10"),
            ("veth1", "169.254.1.1"), // IPv4 link-local is a node address for kube-proxy
        ]
        .into_iter()
        .map(|(n, a)| (n.to_string(), ip(a)))
        .collect();
        let all = node_port_addresses(&interfaces, &[]);
        assert_eq!(all, [ip("172.18.0.2"), ip("fd00:18::2"), ip("169.254.1.1")].into());
        let only: Vec<Cidr> = vec!["172.16.0.0/12".parse().unwrap(), "fd00:18::/64".parse().unwrap()];
        assert_eq!(node_port_addresses(&interfaces, &only), [ip("172.18.0.2"), ip("fd00:18::2")].into());
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let c: Cidr = "10.20.0.0/16".parse().unwrap();
        assert!(c.contains(&ip("10.20.3.4")));
        assert!(!c.contains(&ip("10.21.0.1")));
        assert!(!c.contains(&ip("fd00::1")), "another family");
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(&ip("8.8.8.8")));
        assert!("::/0".parse::<Cidr>().unwrap().contains(&ip("fd00::1")));
        assert!("10.0.0.1/32".parse::<Cidr>().unwrap().contains(&ip("10.0.0.1")));
        for bad in ["10.0.0.0", "10.0.0.0/33", "fd00::/129", "primary", "x/8"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn this_namespace_has_addresses() {
        // Every network namespace has at least loopback.
        let all = local_addresses().expect("getifaddrs");
        assert!(all.iter().any(|(_, a)| a.is_loopback()), "{all:?}");
    }
}
