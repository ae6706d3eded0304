//! The table as `ipvsadm -Ln` prints it, so that the two can be compared
//! line for line.

use std::cmp::Ordering;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::constants::*;
use crate::types::{AddressFamily, Destination, Info, Protocol, Service, ServiceEntry, ServiceKey};

/// Renders `entries` exactly as `ipvsadm -Ln` does (ipvsadm 1.31): the
/// version line when `info` is given, the two title lines, then services and
/// their destinations sorted as ipvsadm sorts them.
pub fn render_ipvsadm(info: Option<&Info>, entries: &[ServiceEntry]) -> String {
    let mut out = String::new();
    if let Some(info) = info {
        let _ = writeln!(
            out,
            "IP Virtual Server version {} (size={})",
            info.version_string(),
            info.connection_table_size
        );
    }
    out.push_str("Prot LocalAddress:Port Scheduler Flags\n");
    out.push_str("  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n");
    let mut sorted: Vec<&ServiceEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| service_order(&a.service, &b.service));
    for entry in sorted {
        out.push_str(&service_line(&entry.service));
        out.push('\n');
        let mut destinations: Vec<&Destination> = entry.destinations.iter().collect();
        destinations.sort_by_key(|d| (d.family(), d.address, d.port));
        for d in destinations {
            let mut name = address_name(d.socket_addr());
            if d.family() == AddressFamily::Inet {
                name.truncate(28);
            }
            // The kernel's weight is an int; ipvsadm prints it with %d.
            let _ = writeln!(
                out,
                "  -> {:<28} {:<7} {:<6} {:<10} {:<10}",
                name,
                d.forward.ipvsadm_name(),
                d.weight as i32,
                d.active_connections,
                d.inactive_connections
            );
        }
    }
    out
}

/// ipvsadm's order: fwmark (address services, mark 0, first), family,
/// protocol, address, port.
fn service_order(a: &Service, b: &Service) -> Ordering {
    let key = |s: &Service| {
        let (protocol, address, port) = match s.key {
            ServiceKey::Address { protocol, address, port } => (protocol.to_raw(), Some(address), port),
            ServiceKey::Fwmark { .. } => (IPPROTO_TCP, None::<IpAddr>, 0),
        };
        (s.fwmark().unwrap_or(0), s.family(), protocol, address, port)
    };
    key(a).cmp(&key(b))
}

fn address_name(address: SocketAddr) -> String {
    // SocketAddr's Display already gives "1.2.3.4:80" and "[::1]:80", like ipvsadm.
    address.to_string()
}

fn service_line(service: &Service) -> String {
    let mut line = match service.key {
        ServiceKey::Fwmark { family, mark } => match family {
            AddressFamily::Inet => format!("FWM  {mark}"),
            AddressFamily::Inet6 => format!("FWM  {mark} IPv6"),
        },
        ServiceKey::Address { protocol, address, port } => {
            let name = match protocol {
                Protocol::Tcp => "TCP",
                Protocol::Udp => "UDP",
                Protocol::Sctp => "SCTP",
                Protocol::Other(_) => "?",
            };
            let mut s = format!("{name:<4} {}", address_name(SocketAddr::new(address, port)));
            if !address.is_ipv6() {
                s.truncate(33);
            }
            s
        }
    };
    let _ = write!(line, " {}", service.scheduler);
    let sched_flags = sched_flags(service);
    if !sched_flags.is_empty() {
        let _ = write!(line, " ({sched_flags})");
    }
    if service.flags & IP_VS_SVC_F_PERSISTENT != 0 {
        let _ = write!(line, " persistent {}", service.timeout);
        match service.family() {
            AddressFamily::Inet if service.netmask != u32::MAX => {
                let _ = write!(line, " mask {}", std::net::Ipv4Addr::from(service.netmask));
            }
            AddressFamily::Inet6 if service.netmask != 128 => {
                let _ = write!(line, " mask {}", service.netmask);
            }
            _ => {}
        }
        if let Some(pe) = &service.persistence_engine {
            let _ = write!(line, " pe {pe}");
        }
    }
    if service.flags & IP_VS_SVC_F_ONEPACKET != 0 {
        line.push_str(" ops");
    }
    line
}

/// The scheduler flags as ipvsadm names them (`sh-fallback,sh-port`, `flag-1`, …).
fn sched_flags(service: &Service) -> String {
    let names: &[(u32, &str)] = match service.scheduler.as_str() {
        "sh" => &[(IP_VS_SVC_F_SCHED_SH_FALLBACK, "sh-fallback"), (IP_VS_SVC_F_SCHED_SH_PORT, "sh-port")],
        "mh" => &[(IP_VS_SVC_F_SCHED_MH_FALLBACK, "mh-fallback"), (IP_VS_SVC_F_SCHED_MH_PORT, "mh-port")],
        _ => &[(IP_VS_SVC_F_SCHED1, "flag-1"), (IP_VS_SVC_F_SCHED2, "flag-2"), (IP_VS_SVC_F_SCHED3, "flag-3")],
    };
    names
        .iter()
        .filter(|(bit, _)| service.flags & bit != 0)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ForwardMethod;

    #[test]
    fn renders_like_ipvsadm() {
        let mut persistent = Service::new(ServiceKey::tcp("10.0.0.1:443".parse().unwrap()), "sh");
        persistent.flags = IP_VS_SVC_F_PERSISTENT | IP_VS_SVC_F_SCHED_SH_PORT | IP_VS_SVC_F_HASHED;
        persistent.timeout = 300;
        persistent.netmask = 0xffff_ff00;
        let entries = vec![
            ServiceEntry {
                service: Service::new(ServiceKey::udp("[fd00::1]:53".parse().unwrap()), "wlc"),
                destinations: vec![Destination::new("[fd00::3]:53".parse().unwrap(), ForwardMethod::DirectRoute, 2)],
            },
            ServiceEntry { service: persistent, destinations: vec![] },
            ServiceEntry {
                service: Service::new(ServiceKey::tcp("10.0.0.1:80".parse().unwrap()), "wrr"),
                destinations: vec![
                    Destination::new("10.0.1.2:8080".parse().unwrap(), ForwardMethod::Tunnel, 1),
                    Destination::new("10.0.1.1:8080".parse().unwrap(), ForwardMethod::Masquerade, 300),
                ],
            },
            ServiceEntry {
                service: Service::new(ServiceKey::fwmark(AddressFamily::Inet6, 9), "rr"),
                destinations: vec![],
            },
        ];
        let info = Info { version: 0x010201, connection_table_size: 4096 };
        let expected = "\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  10.0.0.1:80 wrr
  -> 10.0.1.1:8080                Masq    300    0          0         
  -> 10.0.1.2:8080                Tunnel  1      0          0         
TCP  10.0.0.1:443 sh (sh-port) persistent 300 mask 255.255.255.0
UDP  [fd00::1]:53 wlc
  -> [fd00::3]:53                 Route   2      0          0         
FWM  9 IPv6 rr
";
        assert_eq!(render_ipvsadm(Some(&info), &entries), expected);
    }
}
