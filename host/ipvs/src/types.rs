//! The typed view of IPVS: services, destinations and their keys, converted
//! from and to the wire attributes of [`crate::nlas`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netlink_packet_core::{DecodeError, NlasIterator};
use serde::{Serialize, Serializer};

use crate::constants::*;
use crate::nlas::{DestinationAttr, ServiceAttr, StatsAttr};

/// The address family of a service or destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum AddressFamily {
    /// `AF_INET`.
    #[serde(rename = "ipv4")]
    Inet,
    /// `AF_INET6`.
    #[serde(rename = "ipv6")]
    Inet6,
}

impl AddressFamily {
    /// The kernel's `AF_*` number.
    pub fn to_raw(self) -> u16 {
        match self {
            Self::Inet => AF_INET,
            Self::Inet6 => AF_INET6,
        }
    }

    /// From the kernel's `AF_*` number; IPVS knows no other families.
    pub fn from_raw(raw: u16) -> Option<Self> {
        match raw {
            AF_INET => Some(Self::Inet),
            AF_INET6 => Some(Self::Inet6),
            _ => None,
        }
    }

    /// The family of an address.
    pub fn of(address: &IpAddr) -> Self {
        match address {
            IpAddr::V4(_) => Self::Inet,
            IpAddr::V6(_) => Self::Inet6,
        }
    }
}

impl fmt::Display for AddressFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Inet => "IPv4",
            Self::Inet6 => "IPv6",
        })
    }
}

/// The transport protocol of an address/port virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// `IPPROTO_TCP`.
    Tcp,
    /// `IPPROTO_UDP`.
    Udp,
    /// `IPPROTO_SCTP`.
    Sctp,
    /// Any other `IPPROTO_*` number the kernel reports (it also knows AH and ESP).
    Other(u16),
}

impl Protocol {
    /// The `IPPROTO_*` number.
    pub fn to_raw(self) -> u16 {
        match self {
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
            Self::Sctp => IPPROTO_SCTP,
            Self::Other(n) => n,
        }
    }

    /// From an `IPPROTO_*` number.
    pub fn from_raw(raw: u16) -> Self {
        match raw {
            IPPROTO_TCP => Self::Tcp,
            IPPROTO_UDP => Self::Udp,
            IPPROTO_SCTP => Self::Sctp,
            n => Self::Other(n),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp => f.write_str("TCP"),
            Self::Udp => f.write_str("UDP"),
            Self::Sctp => f.write_str("SCTP"),
            Self::Other(n) => write!(f, "proto-{n}"),
        }
    }
}

impl Serialize for Protocol {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// How a virtual service is identified: protocol, address and port (what
/// kube-proxy uses), or a firewall mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceKey {
    /// An address/port service.
    Address {
        /// TCP, UDP or SCTP.
        protocol: Protocol,
        /// The virtual address; its family is the service's.
        address: IpAddr,
        /// The virtual port, in host byte order.
        port: u16,
    },
    /// A firewall-mark service.
    Fwmark {
        /// IPv4 or IPv6.
        family: AddressFamily,
        /// The mark (never 0: 0 means "not a fwmark service" to the kernel).
        mark: u32,
    },
}

impl ServiceKey {
    /// An address/port service key.
    pub fn new(protocol: Protocol, address: SocketAddr) -> Self {
        Self::Address { protocol, address: address.ip(), port: address.port() }
    }

    /// A TCP service key.
    pub fn tcp(address: SocketAddr) -> Self {
        Self::new(Protocol::Tcp, address)
    }

    /// A UDP service key.
    pub fn udp(address: SocketAddr) -> Self {
        Self::new(Protocol::Udp, address)
    }

    /// An SCTP service key.
    pub fn sctp(address: SocketAddr) -> Self {
        Self::new(Protocol::Sctp, address)
    }

    /// The virtual address (none for a firewall-mark service).
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Self::Address { address, .. } => Some(*address),
            Self::Fwmark { .. } => None,
        }
    }

    /// A firewall-mark service key.
    pub fn fwmark(family: AddressFamily, mark: u32) -> Self {
        Self::Fwmark { family, mark }
    }

    /// The service's address family.
    pub fn family(&self) -> AddressFamily {
        match self {
            Self::Address { address, .. } => AddressFamily::of(address),
            Self::Fwmark { family, .. } => *family,
        }
    }

    /// The attributes that identify this service in a request.
    pub(crate) fn to_attrs(self) -> Vec<ServiceAttr> {
        let mut attrs = vec![ServiceAttr::AddressFamily(self.family().to_raw())];
        match self {
            Self::Address { protocol, address, port } => {
                attrs.push(ServiceAttr::Protocol(protocol.to_raw()));
                attrs.push(ServiceAttr::Address(address_bytes(&address)));
                attrs.push(ServiceAttr::Port(port));
            }
            Self::Fwmark { mark, .. } => attrs.push(ServiceAttr::Fwmark(mark)),
        }
        attrs
    }
}

/// Like ipvsadm: `TCP 10.96.0.1:80`, `UDP [fd00::a]:53`, `FWM 7 IPv4`.
impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Address { protocol, address, port } => {
                write!(f, "{protocol} {}", SocketAddr::new(*address, *port))
            }
            Self::Fwmark { family, mark } => write!(f, "FWM {mark} {family}"),
        }
    }
}

/// JSON: `{"family","protocol","address","port"}` or `{"family","fwmark"}`.
impl Serialize for ServiceKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("family", &self.family())?;
        match self {
            Self::Address { protocol, address, port } => {
                map.serialize_entry("protocol", protocol)?;
                map.serialize_entry("address", address)?;
                map.serialize_entry("port", port)?;
            }
            Self::Fwmark { mark, .. } => map.serialize_entry("fwmark", mark)?,
        }
        map.end()
    }
}

/// Traffic counters and rates of a service or destination (`struct ip_vs_stats_user`,
/// 64-bit where the kernel reports `*_STATS64`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Connections scheduled.
    pub connections: u64,
    /// Incoming packets.
    pub packets_in: u64,
    /// Outgoing packets.
    pub packets_out: u64,
    /// Incoming bytes.
    pub bytes_in: u64,
    /// Outgoing bytes.
    pub bytes_out: u64,
    /// Current connection rate (per second).
    pub cps: u64,
    /// Current incoming packet rate.
    pub pps_in: u64,
    /// Current outgoing packet rate.
    pub pps_out: u64,
    /// Current incoming byte rate.
    pub bps_in: u64,
    /// Current outgoing byte rate.
    pub bps_out: u64,
}

impl Stats {
    fn from_attrs(attrs: &[StatsAttr]) -> Self {
        let mut stats = Self::default();
        for attr in attrs {
            stats.add(attr);
        }
        stats
    }

    /// Parses a nested statistics attribute set straight into counters.
    fn parse(payload: &[u8]) -> Result<Self, DecodeError> {
        let mut stats = Self::default();
        for nla in NlasIterator::new(payload) {
            stats.add(&StatsAttr::parse(&nla?)?);
        }
        Ok(stats)
    }

    fn add(&mut self, attr: &StatsAttr) {
        let StatsAttr::Counter { kind, value, .. } = *attr else { return };
        let field = match kind {
            IPVS_STATS_ATTR_CONNS => &mut self.connections,
            IPVS_STATS_ATTR_INPKTS => &mut self.packets_in,
            IPVS_STATS_ATTR_OUTPKTS => &mut self.packets_out,
            IPVS_STATS_ATTR_INBYTES => &mut self.bytes_in,
            IPVS_STATS_ATTR_OUTBYTES => &mut self.bytes_out,
            IPVS_STATS_ATTR_CPS => &mut self.cps,
            IPVS_STATS_ATTR_INPPS => &mut self.pps_in,
            IPVS_STATS_ATTR_OUTPPS => &mut self.pps_out,
            IPVS_STATS_ATTR_INBPS => &mut self.bps_in,
            IPVS_STATS_ATTR_OUTBPS => &mut self.bps_out,
            _ => return,
        };
        *field = value;
    }
}

/// How many attributes an entry usually has, to size the list once.
const TYPICAL_ATTRS: usize = 16;

/// A virtual service as the kernel reports it (`IPVS_CMD_ATTR_SERVICE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    /// What identifies the service: address family, protocol, address and
    /// port, or address family and firewall mark.
    #[serde(flatten)]
    pub key: ServiceKey,
    /// The scheduler's name (`rr`, `wrr`, `wlc`, …).
    pub scheduler: String,
    /// `IP_VS_SVC_F_*` bits. The kernel adds `IP_VS_SVC_F_HASHED` to every
    /// service in its table.
    pub flags: u32,
    /// Persistence timeout in seconds (with `IP_VS_SVC_F_PERSISTENT`).
    pub timeout: u32,
    /// Persistence netmask: for IPv4 the mask as a number (`0xffff_ffff` is
    /// /32, what ipvsadm sets by default), for IPv6 the prefix length (128).
    pub netmask: u32,
    /// Persistence engine (`sip`), if any.
    pub persistence_engine: Option<String>,
    /// Counters and rates (zero in requests).
    pub stats: Stats,
}

impl Service {
    /// A service with ipvsadm's defaults: no flags, no persistence, a /32
    /// (IPv4) or /128 (IPv6) persistence netmask.
    pub fn new(key: ServiceKey, scheduler: impl Into<String>) -> Self {
        let netmask = match key.family() {
            AddressFamily::Inet => u32::MAX,
            AddressFamily::Inet6 => 128,
        };
        Self {
            key,
            scheduler: scheduler.into(),
            flags: 0,
            timeout: 0,
            netmask,
            persistence_engine: None,
            stats: Stats::default(),
        }
    }

    /// The address family.
    pub fn family(&self) -> AddressFamily {
        self.key.family()
    }

    /// The protocol of an address/port service (`None` for fwmark services).
    pub fn protocol(&self) -> Option<Protocol> {
        match self.key {
            ServiceKey::Address { protocol, .. } => Some(protocol),
            ServiceKey::Fwmark { .. } => None,
        }
    }

    /// The virtual address and port of an address/port service.
    pub fn address(&self) -> Option<SocketAddr> {
        match self.key {
            ServiceKey::Address { address, port, .. } => Some(SocketAddr::new(address, port)),
            ServiceKey::Fwmark { .. } => None,
        }
    }

    /// The firewall mark of a fwmark service.
    pub fn fwmark(&self) -> Option<u32> {
        match self.key {
            ServiceKey::Fwmark { mark, .. } => Some(mark),
            ServiceKey::Address { .. } => None,
        }
    }

    /// Parses the payload of an `IPVS_CMD_ATTR_SERVICE` attribute.
    ///
    /// Statistics, most of a dump's attributes, go straight into [`Stats`]
    /// rather than through a list of [`StatsAttr`]: dumps stay cheap.
    pub(crate) fn parse(payload: &[u8]) -> Result<Self, DecodeError> {
        let (mut stats, mut stats64) = (None, None);
        let mut attrs = Vec::with_capacity(TYPICAL_ATTRS);
        for nla in NlasIterator::new(payload) {
            let nla = nla?;
            match nla.kind() {
                IPVS_SVC_ATTR_STATS => stats = Some(Stats::parse(nla.value())?),
                IPVS_SVC_ATTR_STATS64 => stats64 = Some(Stats::parse(nla.value())?),
                _ => attrs.push(ServiceAttr::parse(&nla)?),
            }
        }
        let mut service = Self::from_attrs(&attrs)?;
        if let Some(stats) = stats64.or(stats) {
            service.stats = stats;
        }
        Ok(service)
    }

    /// Builds a service from the kernel's attributes, skipping unknown ones.
    pub(crate) fn from_attrs(attrs: &[ServiceAttr]) -> Result<Self, DecodeError> {
        let mut family = None;
        let mut protocol = None;
        let mut address = None;
        let mut port = None;
        let mut fwmark = 0;
        let mut netmask = None;
        let mut service = Self::new(ServiceKey::fwmark(AddressFamily::Inet, 0), "");
        let mut stats = None;
        let mut stats64 = None;
        for attr in attrs {
            match attr {
                ServiceAttr::AddressFamily(af) => family = Some(*af),
                ServiceAttr::Protocol(p) => protocol = Some(Protocol::from_raw(*p)),
                ServiceAttr::Address(bytes) => address = Some(bytes.as_slice()),
                ServiceAttr::Port(p) => port = Some(*p),
                ServiceAttr::Fwmark(m) => fwmark = *m,
                ServiceAttr::SchedName(name) => service.scheduler.clone_from(name),
                ServiceAttr::Flags { flags, .. } => service.flags = *flags,
                ServiceAttr::Timeout(t) => service.timeout = *t,
                ServiceAttr::Netmask(bytes) => netmask = Some(*bytes),
                ServiceAttr::PeName(name) if !name.is_empty() => service.persistence_engine = Some(name.clone()),
                ServiceAttr::PeName(_) => {}
                ServiceAttr::Stats(s) => stats = Some(s),
                ServiceAttr::Stats64(s) => stats64 = Some(s),
                ServiceAttr::Other(_) => {}
            }
        }
        let family = family.ok_or("service without IPVS_SVC_ATTR_AF")?;
        let family = AddressFamily::from_raw(family)
            .ok_or_else(|| DecodeError::from(format!("service with unknown address family {family}")))?;
        service.key = if fwmark != 0 {
            ServiceKey::Fwmark { family, mark: fwmark }
        } else {
            ServiceKey::Address {
                protocol: protocol.ok_or("service without IPVS_SVC_ATTR_PROTOCOL")?,
                address: parse_address(family, address.ok_or("service without IPVS_SVC_ATTR_ADDR")?)?,
                port: port.ok_or("service without IPVS_SVC_ATTR_PORT")?,
            }
        };
        if let Some(bytes) = netmask {
            service.netmask = netmask_from_wire(family, bytes);
        }
        service.stats = stats64.or(stats).map(|s| Stats::from_attrs(s)).unwrap_or_default();
        Ok(service)
    }

    /// The attributes of a full entry, as `IPVS_CMD_NEW_SERVICE` and
    /// `IPVS_CMD_SET_SERVICE` need them.
    pub(crate) fn to_attrs(&self) -> Vec<ServiceAttr> {
        let mut attrs = self.key.to_attrs();
        attrs.push(ServiceAttr::SchedName(self.scheduler.clone()));
        // mask = all bits: the kernel sets the flags to exactly these.
        attrs.push(ServiceAttr::Flags { flags: self.flags, mask: u32::MAX });
        attrs.push(ServiceAttr::Timeout(self.timeout));
        attrs.push(ServiceAttr::Netmask(netmask_to_wire(self.family(), self.netmask)));
        if let Some(pe) = &self.persistence_engine {
            // Left out, the kernel would drop the service's persistence engine.
            attrs.push(ServiceAttr::PeName(pe.clone()));
        }
        attrs
    }
}

/// The IPv4 netmask is `__be32`; the IPv6 "netmask" is a prefix length the
/// kernel compares as a plain number (ipvsadm sends it in host order).
fn netmask_from_wire(family: AddressFamily, bytes: [u8; 4]) -> u32 {
    match family {
        AddressFamily::Inet => u32::from_be_bytes(bytes),
        AddressFamily::Inet6 => u32::from_ne_bytes(bytes),
    }
}

fn netmask_to_wire(family: AddressFamily, netmask: u32) -> [u8; 4] {
    match family {
        AddressFamily::Inet => netmask.to_be_bytes(),
        AddressFamily::Inet6 => netmask.to_ne_bytes(),
    }
}

/// How IPVS forwards packets to a destination (`IP_VS_CONN_F_*` & `IP_VS_CONN_F_FWD_MASK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForwardMethod {
    /// NAT (`IP_VS_CONN_F_MASQ`, ipvsadm `-m`, "Masq"); what kube-proxy uses.
    Masquerade,
    /// The destination is local (`IP_VS_CONN_F_LOCALNODE`); the kernel turns a
    /// masquerade or direct-route destination on a local address into this.
    Local,
    /// IP-in-IP, GUE or GRE tunnelling (`IP_VS_CONN_F_TUNNEL`, `-i`).
    Tunnel,
    /// Direct routing (`IP_VS_CONN_F_DROUTE`, `-g`, "Route").
    DirectRoute,
    /// Cache bypass (`IP_VS_CONN_F_BYPASS`).
    Bypass,
    /// A value this crate does not know.
    Other(u32),
}

impl ForwardMethod {
    /// The `IP_VS_CONN_F_*` value.
    pub fn to_raw(self) -> u32 {
        match self {
            Self::Masquerade => IP_VS_CONN_F_MASQ,
            Self::Local => IP_VS_CONN_F_LOCALNODE,
            Self::Tunnel => IP_VS_CONN_F_TUNNEL,
            Self::DirectRoute => IP_VS_CONN_F_DROUTE,
            Self::Bypass => IP_VS_CONN_F_BYPASS,
            Self::Other(n) => n,
        }
    }

    /// From the kernel's value (only the forwarding bits count).
    pub fn from_raw(raw: u32) -> Self {
        match raw & IP_VS_CONN_F_FWD_MASK {
            IP_VS_CONN_F_MASQ => Self::Masquerade,
            IP_VS_CONN_F_LOCALNODE => Self::Local,
            IP_VS_CONN_F_TUNNEL => Self::Tunnel,
            IP_VS_CONN_F_DROUTE => Self::DirectRoute,
            IP_VS_CONN_F_BYPASS => Self::Bypass,
            n => Self::Other(n),
        }
    }

    /// ipvsadm's name in its `Forward` column.
    pub fn ipvsadm_name(self) -> &'static str {
        match self {
            Self::Masquerade => "Masq",
            Self::Local => "Local",
            Self::Tunnel => "Tunnel",
            Self::DirectRoute => "Route",
            // ipvsadm prints printf("%s", NULL) for the rest.
            Self::Bypass | Self::Other(_) => "(null)",
        }
    }
}

impl fmt::Display for ForwardMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Masquerade => f.write_str("masquerade"),
            Self::Local => f.write_str("local"),
            Self::Tunnel => f.write_str("tunnel"),
            Self::DirectRoute => f.write_str("route"),
            Self::Bypass => f.write_str("bypass"),
            Self::Other(n) => write!(f, "fwd-{n}"),
        }
    }
}

impl Serialize for ForwardMethod {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The encapsulation of a tunnel destination (`IP_VS_CONN_F_TUNNEL_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TunnelType {
    /// IP in IP (the default).
    Ipip,
    /// Generic UDP encapsulation.
    Gue,
    /// GRE.
    Gre,
    /// A value this crate does not know.
    Other(u8),
}

impl TunnelType {
    /// The kernel's number.
    pub fn to_raw(self) -> u8 {
        match self {
            Self::Ipip => IP_VS_CONN_F_TUNNEL_TYPE_IPIP,
            Self::Gue => IP_VS_CONN_F_TUNNEL_TYPE_GUE,
            Self::Gre => IP_VS_CONN_F_TUNNEL_TYPE_GRE,
            Self::Other(n) => n,
        }
    }

    /// From the kernel's number.
    pub fn from_raw(raw: u8) -> Self {
        match raw {
            IP_VS_CONN_F_TUNNEL_TYPE_IPIP => Self::Ipip,
            IP_VS_CONN_F_TUNNEL_TYPE_GUE => Self::Gue,
            IP_VS_CONN_F_TUNNEL_TYPE_GRE => Self::Gre,
            n => Self::Other(n),
        }
    }
}

impl Serialize for TunnelType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Ipip => s.serialize_str("ipip"),
            Self::Gue => s.serialize_str("gue"),
            Self::Gre => s.serialize_str("gre"),
            Self::Other(n) => s.serialize_u8(*n),
        }
    }
}

/// Tunnel settings of a destination (kernels since 5.3 report them for every
/// destination; they matter with [`ForwardMethod::Tunnel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Tunnel {
    /// The encapsulation.
    #[serde(rename = "type")]
    pub kind: TunnelType,
    /// The GUE port, host byte order.
    pub port: u16,
    /// `IP_VS_TUNNEL_ENCAP_FLAG_*`.
    pub flags: u16,
}

/// A destination (real server) of a virtual service (`IPVS_CMD_ATTR_DEST`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Destination {
    /// The destination's address; its family may differ from the service's
    /// only for tunnel destinations.
    pub address: IpAddr,
    /// The destination's port, host byte order.
    pub port: u16,
    /// How packets reach it.
    pub forward: ForwardMethod,
    /// The weight as the kernel holds it. The kernel's field is an `int`, but
    /// this crate only writes 0..=65535, because kube-proxy reads 16 bits.
    pub weight: u32,
    /// Upper connection threshold (0: none).
    pub upper_threshold: u32,
    /// Lower connection threshold.
    pub lower_threshold: u32,
    /// Active connections (reported, ignored in requests).
    pub active_connections: u32,
    /// Inactive connections (reported, ignored in requests).
    pub inactive_connections: u32,
    /// Persistent connection templates (reported, ignored in requests).
    pub persistent_connections: u32,
    /// Tunnel settings, when the kernel reports them (since 5.3 it does for
    /// every destination, `ipip` with port 0 unless set; they only matter
    /// with [`ForwardMethod::Tunnel`]).
    pub tunnel: Option<Tunnel>,
    /// Counters and rates (zero in requests).
    pub stats: Stats,
}

impl Destination {
    /// A destination for a request: no thresholds, no tunnel settings.
    pub fn new(address: SocketAddr, forward: ForwardMethod, weight: u16) -> Self {
        Self {
            address: address.ip(),
            port: address.port(),
            forward,
            weight: u32::from(weight),
            upper_threshold: 0,
            lower_threshold: 0,
            active_connections: 0,
            inactive_connections: 0,
            persistent_connections: 0,
            tunnel: None,
            stats: Stats::default(),
        }
    }

    /// Address and port: what identifies a destination within its service.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }

    /// The destination's address family.
    pub fn family(&self) -> AddressFamily {
        AddressFamily::of(&self.address)
    }

    /// Parses the payload of an `IPVS_CMD_ATTR_DEST` attribute (statistics
    /// straight into [`Stats`], as [`Service::parse`] does).
    pub(crate) fn parse(payload: &[u8], service_family: AddressFamily) -> Result<Self, DecodeError> {
        let (mut stats, mut stats64) = (None, None);
        let mut attrs = Vec::with_capacity(TYPICAL_ATTRS);
        for nla in NlasIterator::new(payload) {
            let nla = nla?;
            match nla.kind() {
                IPVS_DEST_ATTR_STATS => stats = Some(Stats::parse(nla.value())?),
                IPVS_DEST_ATTR_STATS64 => stats64 = Some(Stats::parse(nla.value())?),
                _ => attrs.push(DestinationAttr::parse(&nla)?),
            }
        }
        let mut destination = Self::from_attrs(&attrs, service_family)?;
        if let Some(stats) = stats64.or(stats) {
            destination.stats = stats;
        }
        Ok(destination)
    }

    /// Builds a destination from the kernel's attributes. `service_family`
    /// is used when the kernel does not say the destination's own (before 3.18).
    pub(crate) fn from_attrs(attrs: &[DestinationAttr], service_family: AddressFamily) -> Result<Self, DecodeError> {
        let mut family = service_family;
        let mut address = None;
        let mut port = None;
        let mut dest = Self::new(SocketAddr::from(([0, 0, 0, 0], 0)), ForwardMethod::Masquerade, 0);
        let (mut tun_type, mut tun_port, mut tun_flags) = (None, 0, 0);
        let mut stats = None;
        let mut stats64 = None;
        for attr in attrs {
            match attr {
                DestinationAttr::Address(bytes) => address = Some(bytes.as_slice()),
                DestinationAttr::Port(p) => port = Some(*p),
                DestinationAttr::ForwardMethod(m) => dest.forward = ForwardMethod::from_raw(*m),
                DestinationAttr::Weight(w) => dest.weight = *w,
                DestinationAttr::UpperThreshold(t) => dest.upper_threshold = *t,
                DestinationAttr::LowerThreshold(t) => dest.lower_threshold = *t,
                DestinationAttr::ActiveConnections(n) => dest.active_connections = *n,
                DestinationAttr::InactiveConnections(n) => dest.inactive_connections = *n,
                DestinationAttr::PersistentConnections(n) => dest.persistent_connections = *n,
                DestinationAttr::Stats(s) => stats = Some(s),
                DestinationAttr::Stats64(s) => stats64 = Some(s),
                DestinationAttr::AddressFamily(af) => {
                    family = AddressFamily::from_raw(*af).ok_or_else(|| {
                        DecodeError::from(format!("destination with unknown address family {af}"))
                    })?
                }
                DestinationAttr::TunnelType(t) => tun_type = Some(TunnelType::from_raw(*t)),
                DestinationAttr::TunnelPort(p) => tun_port = *p,
                DestinationAttr::TunnelFlags(f) => tun_flags = *f,
                DestinationAttr::Other(_) => {}
            }
        }
        dest.address = parse_address(family, address.ok_or("destination without IPVS_DEST_ATTR_ADDR")?)?;
        dest.port = port.ok_or("destination without IPVS_DEST_ATTR_PORT")?;
        dest.tunnel = tun_type.map(|kind| Tunnel { kind, port: tun_port, flags: tun_flags });
        dest.stats = stats64.or(stats).map(|s| Stats::from_attrs(s)).unwrap_or_default();
        Ok(dest)
    }

    /// The attributes of a full entry, as `IPVS_CMD_NEW_DEST` and
    /// `IPVS_CMD_SET_DEST` need them. Everything is sent: the kernel resets
    /// whatever a full entry leaves out (thresholds, tunnel settings).
    pub(crate) fn to_attrs(&self) -> Vec<DestinationAttr> {
        let mut attrs = vec![
            DestinationAttr::AddressFamily(self.family().to_raw()),
            DestinationAttr::Address(address_bytes(&self.address)),
            DestinationAttr::Port(self.port),
            DestinationAttr::ForwardMethod(self.forward.to_raw()),
            DestinationAttr::Weight(self.weight),
            DestinationAttr::UpperThreshold(self.upper_threshold),
            DestinationAttr::LowerThreshold(self.lower_threshold),
        ];
        if let Some(tunnel) = self.tunnel {
            attrs.push(DestinationAttr::TunnelType(tunnel.kind.to_raw()));
            attrs.push(DestinationAttr::TunnelPort(tunnel.port));
            attrs.push(DestinationAttr::TunnelFlags(tunnel.flags));
        }
        attrs
    }

    /// Only the attributes that identify the destination (for `IPVS_CMD_DEL_DEST`).
    pub(crate) fn key_attrs(address: SocketAddr) -> Vec<DestinationAttr> {
        vec![
            DestinationAttr::AddressFamily(AddressFamily::of(&address.ip()).to_raw()),
            DestinationAttr::Address(address_bytes(&address.ip())),
            DestinationAttr::Port(address.port()),
        ]
    }
}

/// `union nf_inet_addr`: 16 bytes, an IPv4 address in the first 4 (as ipvsadm sends it).
pub(crate) fn address_bytes(address: &IpAddr) -> Vec<u8> {
    let mut bytes = vec![0; 16];
    match address {
        IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => bytes.copy_from_slice(&v6.octets()),
    }
    bytes
}

fn parse_address(family: AddressFamily, bytes: &[u8]) -> Result<IpAddr, DecodeError> {
    match family {
        AddressFamily::Inet => {
            let octets: [u8; 4] = bytes
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| DecodeError::from(format!("IPv4 address of {} bytes", bytes.len())))?;
            Ok(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        AddressFamily::Inet6 => {
            let octets: [u8; 16] = bytes
                .get(..16)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| DecodeError::from(format!("IPv6 address of {} bytes", bytes.len())))?;
            Ok(IpAddr::V6(Ipv6Addr::from(octets)))
        }
    }
}

/// A service together with its destinations: one entry of [`crate::IpvsClient::dump`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceEntry {
    /// The virtual service.
    #[serde(flatten)]
    pub service: Service,
    /// Its destinations, in the kernel's order.
    pub destinations: Vec<Destination>,
}

/// General IPVS information (`IPVS_CMD_GET_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Info {
    /// `IP_VS_VERSION_CODE`, e.g. `0x010201` for 1.2.1.
    pub version: u32,
    /// Size of the connection hash table.
    pub connection_table_size: u32,
}

impl Info {
    /// The version as `major.minor.patch`.
    pub fn version_string(&self) -> String {
        let v = self.version;
        format!("{}.{}.{}", (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6_service(netmask: [u8; 4]) -> Vec<ServiceAttr> {
        vec![
            ServiceAttr::AddressFamily(AF_INET6),
            ServiceAttr::Protocol(IPPROTO_SCTP),
            ServiceAttr::Address("fd00::1".parse::<Ipv6Addr>().unwrap().octets().to_vec()),
            ServiceAttr::Port(3868),
            ServiceAttr::SchedName("wlc".into()),
            ServiceAttr::Flags { flags: IP_VS_SVC_F_HASHED | IP_VS_SVC_F_PERSISTENT, mask: u32::MAX },
            ServiceAttr::Timeout(300),
            ServiceAttr::Netmask(netmask),
            ServiceAttr::PeName("sip".into()),
            ServiceAttr::Stats64(vec![StatsAttr::Counter { kind: IPVS_STATS_ATTR_INBYTES, value: 1 << 40, wide: true }]),
            ServiceAttr::Stats(vec![StatsAttr::Counter { kind: IPVS_STATS_ATTR_INBYTES, value: 5, wide: true }]),
        ]
    }

    #[test]
    fn an_ipv6_service_round_trips_with_its_prefix_length_in_host_order() {
        let service = Service::from_attrs(&v6_service(64u32.to_ne_bytes())).unwrap();
        assert_eq!(service.key, ServiceKey::sctp("[fd00::1]:3868".parse().unwrap()));
        assert_eq!(service.netmask, 64);
        assert_eq!(service.timeout, 300);
        assert_eq!(service.persistence_engine.as_deref(), Some("sip"));
        assert_eq!(service.stats.bytes_in, 1 << 40, "STATS64 wins over STATS");
        let attrs = service.to_attrs();
        assert!(attrs.contains(&ServiceAttr::Netmask(64u32.to_ne_bytes())));
        assert!(attrs.contains(&ServiceAttr::PeName("sip".into())), "left out, the kernel drops the engine");
    }

    #[test]
    fn an_ipv4_netmask_is_network_order() {
        let attrs = vec![
            ServiceAttr::AddressFamily(AF_INET),
            ServiceAttr::Protocol(IPPROTO_TCP),
            ServiceAttr::Address(vec![10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            ServiceAttr::Port(80),
            ServiceAttr::Netmask([255, 255, 255, 0]),
        ];
        let service = Service::from_attrs(&attrs).unwrap();
        assert_eq!(service.netmask, 0xffff_ff00);
        assert!(service.to_attrs().contains(&ServiceAttr::Netmask([255, 255, 255, 0])));
        assert_eq!(Service::new(service.key, "rr").netmask, u32::MAX);
    }

    #[test]
    fn a_fwmark_service_has_no_protocol_address_or_port() {
        let attrs = vec![ServiceAttr::AddressFamily(AF_INET6), ServiceAttr::Fwmark(7)];
        let service = Service::from_attrs(&attrs).unwrap();
        assert_eq!(service.key, ServiceKey::fwmark(AddressFamily::Inet6, 7));
        assert_eq!((service.protocol(), service.address(), service.fwmark()), (None, None, Some(7)));
        assert_eq!(service.key.to_string(), "FWM 7 IPv6");
        assert_eq!(
            service.key.to_attrs(),
            vec![ServiceAttr::AddressFamily(AF_INET6), ServiceAttr::Fwmark(7)]
        );
    }

    #[test]
    fn missing_or_short_attributes_are_errors() {
        assert!(Service::from_attrs(&[]).is_err());
        assert!(Service::from_attrs(&[ServiceAttr::AddressFamily(99), ServiceAttr::Fwmark(1)]).is_err());
        let short = vec![
            ServiceAttr::AddressFamily(AF_INET6),
            ServiceAttr::Protocol(IPPROTO_TCP),
            ServiceAttr::Address(vec![0; 4]),
            ServiceAttr::Port(80),
        ];
        assert!(Service::from_attrs(&short).is_err());
        assert!(Destination::from_attrs(&[DestinationAttr::Port(1)], AddressFamily::Inet).is_err());
    }

    #[test]
    fn a_destination_without_its_own_family_takes_the_services() {
        let attrs = vec![
            DestinationAttr::Address("fd00::2".parse::<Ipv6Addr>().unwrap().octets().to_vec()),
            DestinationAttr::Port(80),
            DestinationAttr::ForwardMethod(IP_VS_CONN_F_DROUTE),
            DestinationAttr::Weight(5),
        ];
        let dest = Destination::from_attrs(&attrs, AddressFamily::Inet6).unwrap();
        assert_eq!(dest.socket_addr(), "[fd00::2]:80".parse().unwrap());
        assert_eq!(dest.forward, ForwardMethod::DirectRoute);
        assert_eq!(dest.tunnel, None);
    }

    #[test]
    fn a_destination_sends_back_everything_the_kernel_would_reset() {
        let mut dest = Destination::new("10.0.0.2:8080".parse().unwrap(), ForwardMethod::Tunnel, 3);
        dest.upper_threshold = 100;
        dest.lower_threshold = 10;
        dest.tunnel = Some(Tunnel { kind: TunnelType::Gue, port: 6081, flags: 1 });
        let attrs = dest.to_attrs();
        for attr in [
            DestinationAttr::ForwardMethod(IP_VS_CONN_F_TUNNEL),
            DestinationAttr::Weight(3),
            DestinationAttr::UpperThreshold(100),
            DestinationAttr::LowerThreshold(10),
            DestinationAttr::TunnelType(IP_VS_CONN_F_TUNNEL_TYPE_GUE),
            DestinationAttr::TunnelPort(6081),
            DestinationAttr::TunnelFlags(1),
        ] {
            assert!(attrs.contains(&attr), "{attr:?} missing from {attrs:?}");
        }
        let parsed = Destination::from_attrs(&attrs, AddressFamily::Inet).unwrap();
        assert_eq!(parsed, dest);
    }

    #[test]
    fn parsing_bytes_gives_what_the_attribute_path_gives() {
        use netlink_packet_core::{DefaultNla, Emitable};
        let counters = |wide, value| {
            let mut attrs: Vec<StatsAttr> =
                (1..=10).map(|kind| StatsAttr::Counter { kind, value: value + u64::from(kind), wide }).collect();
            attrs.push(StatsAttr::Other(DefaultNla::new(IPVS_STATS_ATTR_PAD, vec![])));
            attrs
        };
        let mut dest = Destination::new("[fd00::5]:443".parse().unwrap(), ForwardMethod::Tunnel, 9);
        dest.tunnel = Some(Tunnel { kind: TunnelType::Gre, port: 0, flags: 2 });
        let mut attrs = dest.to_attrs();
        attrs.push(DestinationAttr::Stats(counters(false, 10)));
        attrs.push(DestinationAttr::Stats64(counters(true, 1 << 33)));
        attrs.push(DestinationAttr::Other(DefaultNla::new(42, vec![1, 2, 3, 4])));
        let mut bytes = vec![0; attrs.as_slice().buffer_len()];
        attrs.as_slice().emit(&mut bytes);

        let parsed = Destination::parse(&bytes, AddressFamily::Inet).unwrap();
        assert_eq!(parsed, Destination::from_attrs(&attrs, AddressFamily::Inet).unwrap());
        assert_eq!(parsed.stats.connections, (1 << 33) + 1, "the 64-bit counters win");
        assert_eq!(parsed.stats.bps_out, (1 << 33) + 10);
        assert_eq!(Destination { stats: Stats::default(), ..parsed }, dest);

        let service = Service::new(ServiceKey::udp("10.1.2.3:53".parse().unwrap()), "mh");
        let mut attrs = service.to_attrs();
        attrs.push(ServiceAttr::Stats(counters(false, 3)));
        let mut bytes = vec![0; attrs.as_slice().buffer_len()];
        attrs.as_slice().emit(&mut bytes);
        let parsed = Service::parse(&bytes).unwrap();
        assert_eq!(parsed, Service::from_attrs(&attrs).unwrap());
        assert_eq!(parsed.stats.packets_in, 5);
        assert!(Service::parse(&bytes[..bytes.len() - 3]).is_err(), "a cut attribute is an error");
    }

    #[test]
    fn unknown_kernel_values_are_kept_not_rejected() {
        assert_eq!(ForwardMethod::from_raw(6), ForwardMethod::Other(6));
        assert_eq!(ForwardMethod::from_raw(0x100 | IP_VS_CONN_F_DROUTE), ForwardMethod::DirectRoute);
        assert_eq!(Protocol::from_raw(50), Protocol::Other(50));
        assert_eq!(TunnelType::from_raw(9), TunnelType::Other(9));
    }

    #[test]
    fn json_names_the_service_fields() {
        let entry = ServiceEntry {
            service: Service::new(ServiceKey::udp("10.96.0.10:53".parse().unwrap()), "wrr"),
            destinations: vec![Destination::new("10.244.0.3:53".parse().unwrap(), ForwardMethod::Masquerade, 7)],
        };
        let json = serde_json::to_value(&entry).unwrap();
        assert_eq!(json["family"], "ipv4");
        assert_eq!(json["protocol"], "UDP");
        assert_eq!(json["address"], "10.96.0.10");
        assert_eq!(json["port"], 53);
        assert_eq!(json["scheduler"], "wrr");
        assert_eq!(json["destinations"][0]["forward"], "masquerade");
        assert_eq!(json["destinations"][0]["weight"], 7);
        assert_eq!(json["destinations"][0]["address"], "10.244.0.3");
    }
}
