//! The agent's nftables table, `inet ipvs-operator`, for the Services it
//! serves itself (standalone mode): it masquerades the connections whose
//! replies would otherwise bypass the node, and it is the kernel's record of
//! which virtual services are the agent's (a NodePort one sits at the node's
//! own address, where nothing else says whose it is).
//!
//! The table is built whole from a [`Ruleset`] and replaced in one nftables
//! transaction when it differs; the table's user data holds the ruleset's
//! fingerprint, so a sync that changes nothing costs one netlink round trip.
//! kube-proxy's IPVS mode does the same masquerading with iptables and ipsets
//! (`KUBE-NODE-PORT`, `KUBE-EXTERNAL-IP`, `KUBE-LOOP-BACK`); this table has
//! no marks, so it cannot collide with kube-proxy's or a CNI's mark bits:
//!
//! ```text
//! table inet ipvs-operator {
//!   set services4 { type ipv4_addr . inet_proto . inet_service }   # every virtual service served here
//!   set masquerade4 { type ipv4_addr . inet_proto . inet_service } # NodePorts, external IPs (Cluster policy)
//!   set hairpin4 { type ipv4_addr . inet_proto . inet_service . ipv4_addr } # endpoint . proto . port . endpoint
//!   set addresses4 { type ipv4_addr }                              # the addresses on ipvs-op0
//!   (and the same four for IPv6)
//!   chain postrouting {
//!     type nat hook postrouting priority srcnat; policy accept;
//!     ct original ip daddr . meta l4proto . ct original proto-dst @masquerade4 masquerade
//!     ip daddr . meta l4proto . th dport . ip saddr @hairpin4 masquerade
//!     ip saddr @addresses4 masquerade   # the node itself as the client: its source is the VIP
//!     (the same three for IPv6)
//!   }
//! }
//! ```
//!
//! Masquerading IPVS traffic needs `net.ipv4.vs.conntrack=1` (see `node-setup`).

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ipvs::{OwnedService, Protocol, ServiceKey};
use netlink_packet_core::{
    DefaultNla, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions, Hook, HookNumber,
    InetHookNumber, ListAttribute, Lookup, Meta, MetaKey, NfTablesMessage, Operator, Payload, Register, RuleAttribute,
    RuleMessage, SetAttribute, SetElementAttribute, SetElementList, SetElementMessage, SetFlags, SetMessage,
    TableAttribute, TableMessage,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr as NetlinkAddr};
use sha2::{Digest, Sha256};

/// The table's name (family `inet`).
pub const TABLE: &str = "ipvs-operator";
const CHAIN: &str = "postrouting";
/// Part of the fingerprint: a table made by an agent with other chains or
/// rules is rebuilt, not adopted.
const LAYOUT: &[u8] = b"ipvs-operator table layout 1";
/// How long a request waits for the kernel's answer.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Elements per set-element message: its element list is one netlink
/// attribute, whose length field is 16 bits.
const ELEMENTS_PER_MESSAGE: usize = 1000;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NF_ACCEPT: u32 = 1;
/// The first 32-bit register (`NFT_REG32_00`): concatenations load each part
/// into registers of their own, 4-byte aligned.
const NFT_REG32_00: u32 = 8;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFTA_CT_DIRECTION: u16 = 3;
const NFT_CT_PROTO_DST: u32 = 12;
const NFT_CT_DST_IP: u32 = 20;
const NFT_CT_DST_IP6: u32 = 22;
const IP_CT_DIR_ORIGINAL: u8 = 0;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// nft's data type ids, for `nft list` to print the sets' keys (the kernel ignores them).
const TYPE_BITS: u32 = 6;
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;

/// Everything the table holds; the table is built from it whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Every virtual service served here: the record of what is the agent's.
    pub services: BTreeSet<ServiceKey>,
    /// Virtual services whose connections are masqueraded: NodePorts and
    /// external and load-balancer IPs of Services with `externalTrafficPolicy: Cluster`
    /// (the endpoint may be on another node, and must answer through this one).
    pub masquerade: BTreeSet<ServiceKey>,
    /// Endpoints (protocol, address, port) of the Services served here: a pod
    /// that reaches itself through its Service (hairpin) is masqueraded.
    pub endpoints: BTreeSet<(Protocol, SocketAddr)>,
    /// The addresses on the agent's interface: a connection from one of them
    /// is the node's own (a host-network client), masqueraded so that the
    /// reply, from another node, comes back here.
    pub addresses: BTreeSet<IpAddr>,
}

impl Ruleset {
    /// A digest of everything in the table, kept in the table's user data.
    pub fn fingerprint(&self) -> Vec<u8> {
        let mut hash = Sha256::new();
        hash.update(LAYOUT);
        for family in [Family::V4, Family::V6] {
            for set in family.sets(self) {
                hash.update(set.name.as_bytes());
                for element in &set.elements {
                    hash.update(element);
                }
            }
        }
        hash.finalize().to_vec()
    }

    /// Adds a virtual service served here: recorded, its destinations as
    /// hairpin endpoints, and masqueraded when `masquerade`.
    pub fn add(&mut self, virtual_service: &OwnedService, masquerade: bool) {
        let key = virtual_service.service.key;
        self.services.insert(key);
        if masquerade {
            self.masquerade.insert(key);
        }
        if let ServiceKey::Address { protocol, .. } = key {
            self.endpoints.extend(virtual_service.destinations.keys().map(|d| (protocol, *d)));
        }
    }

    /// Whether nothing is served (the table is not needed).
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.masquerade.is_empty() && self.endpoints.is_empty() && self.addresses.is_empty()
    }
}

/// Why the table could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum NfTablesError {
    /// The netlink socket failed.
    #[error("nftables netlink socket ({op}): {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The kernel refused a request.
    #[error("nftables: {op} refused by the kernel: {source}{hint}")]
    Kernel {
        /// What was being done.
        op: &'static str,
        /// The kernel's errno.
        source: io::Error,
        /// What to do about it, when known.
        hint: &'static str,
    },
    /// No answer in time.
    #[error("nftables: no answer to {op} within {TIMEOUT:?}")]
    Timeout {
        /// What was being done.
        op: &'static str,
    },
    /// An answer that does not parse.
    #[error("nftables: an undecodable answer to {op}: {detail}")]
    Decode {
        /// What was being done.
        op: &'static str,
        /// The parser's complaint.
        detail: String,
    },
}

impl NfTablesError {
    /// The kernel has no nf_tables (or netfilter netlink) at all.
    pub fn is_unsupported(&self) -> bool {
        let errno = match self {
            Self::Io { source, .. } | Self::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        };
        // EINVAL: netfilter netlink without nf_tables' subsystem answers so.
        matches!(errno, Some(libc::EPROTONOSUPPORT | libc::EOPNOTSUPP | libc::EAFNOSUPPORT | libc::EINVAL))
    }
}

fn kernel_error(op: &'static str, errno: i32) -> NfTablesError {
    let hint = match errno {
        libc::ENOENT | libc::EOPNOTSUPP => {
            " (is a module missing? standalone mode needs nf_tables, nft_ct, nft_chain_nat and nft_masq: run `ipvs-operator node-setup`)"
        }
        libc::EPERM => " (the agent needs CAP_NET_ADMIN)",
        _ => "",
    };
    NfTablesError::Kernel { op, source: io::Error::from_raw_os_error(errno), hint }
}

/// A netfilter netlink socket for the agent's table.
pub struct NfTables {
    socket: Socket,
    seq: u32,
    rx: Vec<u8>,
}

impl std::fmt::Debug for NfTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NfTables").field("seq", &self.seq).finish()
    }
}

impl NfTables {
    /// Opens a socket.
    pub fn new() -> Result<Self, NfTablesError> {
        let io_err = |source| NfTablesError::Io { op: "open", source };
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(io_err)?;
        ipvs::netlink::set_timeout(&socket, libc::SO_RCVTIMEO, TIMEOUT).map_err(io_err)?;
        ipvs::netlink::set_timeout(&socket, libc::SO_SNDTIMEO, TIMEOUT).map_err(io_err)?;
        socket.bind_auto().map_err(io_err)?;
        socket.connect(&NetlinkAddr::new(0, 0)).map_err(io_err)?;
        Ok(NfTables { socket, seq: 0, rx: Vec::with_capacity(256 * 1024) })
    }

    /// The table's fingerprint ([`Ruleset::fingerprint`]; empty when the
    /// table has no user data), or `None` when there is no table.
    pub fn fingerprint(&mut self) -> Result<Option<Vec<u8>>, NfTablesError> {
        let op = "reading the table";
        let request = NfTablesMessage::GetTable(TableMessage { attributes: vec![TableAttribute::Name(TABLE.into())] });
        let replies = match self.request(op, request, NLM_F_REQUEST | NLM_F_ACK) {
            Ok(replies) => replies,
            Err(NfTablesError::Kernel { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        for reply in replies {
            if let NfTablesMessage::NewTable(table) = reply {
                let user_data = table.attributes.into_iter().find_map(|a| match a {
                    TableAttribute::UserData(data) => Some(data),
                    _ => None,
                });
                return Ok(Some(user_data.unwrap_or_default()));
            }
        }
        Ok(None)
    }

    /// The virtual services the table records as the agent's (its
    /// `services` sets); empty when there is no table.
    pub fn recorded_services(&mut self) -> Result<BTreeSet<ServiceKey>, NfTablesError> {
        let mut out = BTreeSet::new();
        for family in [Family::V4, Family::V6] {
            let set = family.name("services");
            let request = NfTablesMessage::GetSetElement(SetElementMessage {
                attributes: vec![SetElementList::Table(TABLE.into()), SetElementList::Set(set)],
            });
            let replies = match self.request("reading the recorded services", request, NLM_F_REQUEST | NLM_F_DUMP) {
                Ok(replies) => replies,
                Err(NfTablesError::Kernel { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(e),
            };
            for reply in replies {
                let NfTablesMessage::NewSetElement(message) = reply else { continue };
                for list in message.attributes {
                    let SetElementList::Elements(elements) = list else { continue };
                    for element in elements {
                        let ListAttribute::Element(attributes) = element else { continue };
                        for attribute in attributes {
                            if let SetElementAttribute::Key(DataAttribute::Value(key)) = attribute
                                && let Some(service) = family.decode_service(&key)
                            {
                                out.insert(service);
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Replaces the table with one built from `ruleset`, in one transaction:
    /// packets see the old table or the new one, never none.
    pub fn replace(&mut self, ruleset: &Ruleset) -> Result<(), NfTablesError> {
        let messages = table_messages(ruleset);
        self.transaction("replacing the table", messages)
    }

    /// Deletes the table; `false` when there was none.
    pub fn delete(&mut self) -> Result<bool, NfTablesError> {
        let delete = NfTablesMessage::DeleteTable(TableMessage { attributes: vec![TableAttribute::Name(TABLE.into())] });
        match self.transaction("deleting the table", vec![(delete, 0)]) {
            Ok(()) => Ok(true),
            Err(NfTablesError::Kernel { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn encode(&self, inner: NetfilterMessageInner, family: NetfilterProtoFamily, res_id: u16, flags: u16, seq: u32, out: &mut Vec<u8>) {
        let mut message = NetlinkMessage::from(NetfilterMessage::new(NetfilterHeader::new(family, 0, res_id), inner));
        message.header.flags = flags;
        message.header.sequence_number = seq;
        message.finalize();
        let start = out.len();
        out.resize(start + message.buffer_len(), 0);
        message.serialize(&mut out[start..]);
        // Messages in one datagram start 4-byte aligned.
        out.resize((out.len() + 3) & !3, 0);
    }

    /// Sends one request and collects its replies until the acknowledgement
    /// or the end of the dump.
    fn request(&mut self, op: &'static str, message: NfTablesMessage, flags: u16) -> Result<Vec<NfTablesMessage>, NfTablesError> {
        let seq = self.next_seq();
        let mut datagram = Vec::new();
        self.encode(NetfilterMessageInner::NfTables(message), NetfilterProtoFamily::Inet, 0, flags, seq, &mut datagram);
        self.socket.send(&datagram, 0).map_err(|source| NfTablesError::Io { op, source })?;
        let mut replies = Vec::new();
        loop {
            self.recv(op)?;
            for message in ipvs::netlink::messages::<NetfilterMessage>(&self.rx) {
                let message = message.map_err(|e| NfTablesError::Decode { op, detail: e.to_string() })?;
                if message.header.sequence_number != seq {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::InnerMessage(NetfilterMessage { inner: NetfilterMessageInner::NfTables(m), .. }) => {
                        replies.push(m)
                    }
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(error) => match error.code {
                        None => return Ok(replies),
                        Some(code) => return Err(kernel_error(op, code.get().saturating_abs())),
                    },
                    _ => {}
                }
            }
        }
    }

    /// Sends `messages` as one batch (one transaction) and waits for every
    /// acknowledgement; the first error fails it (the kernel has then applied
    /// nothing of it).
    fn transaction(&mut self, op: &'static str, messages: Vec<(NfTablesMessage, u16)>) -> Result<(), NfTablesError> {
        let mut datagram = Vec::new();
        let begin = self.next_seq();
        self.encode(NetfilterMessageInner::None(ControlMessage::BatchBegin), NetfilterProtoFamily::Unspec, NFNL_SUBSYS_NFTABLES, NLM_F_REQUEST, begin, &mut datagram);
        let mut waiting = BTreeSet::new();
        for (message, flags) in messages {
            let seq = self.next_seq();
            waiting.insert(seq);
            let inner = NetfilterMessageInner::NfTables(message);
            self.encode(inner, NetfilterProtoFamily::Inet, 0, NLM_F_REQUEST | NLM_F_ACK | flags, seq, &mut datagram);
        }
        let end = self.next_seq();
        self.encode(NetfilterMessageInner::None(ControlMessage::BatchEnd), NetfilterProtoFamily::Unspec, NFNL_SUBSYS_NFTABLES, NLM_F_REQUEST, end, &mut datagram);
        self.socket.send(&datagram, 0).map_err(|source| NfTablesError::Io { op, source })?;
        let mut first_error = None;
        while !waiting.is_empty() {
            if let Err(e) = self.recv(op) {
                return Err(first_error.unwrap_or(e));
            }
            for message in ipvs::netlink::messages::<NetfilterMessage>(&self.rx) {
                let Ok(message) = message else { continue };
                let seq = message.header.sequence_number;
                if let NetlinkPayload::Error(error) = message.payload
                    && (waiting.remove(&seq) || seq == begin || seq == end)
                    && let Some(code) = error.code
                {
                    first_error.get_or_insert_with(|| kernel_error(op, code.get().saturating_abs()));
                    // A batch the kernel refused as a whole answers once, for its first message.
                    if seq == begin || seq == end {
                        waiting.clear();
                    }
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn recv(&mut self, op: &'static str) -> Result<(), NfTablesError> {
        self.rx.clear();
        match self.socket.recv(&mut self.rx, libc::MSG_TRUNC) {
            Ok(n) if n > self.rx.len() => {
                Err(NfTablesError::Io { op, source: io::Error::other(format!("a {n}-byte answer did not fit the buffer")) })
            }
            Ok(_) => Ok(()),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Err(NfTablesError::Timeout { op }),
            Err(source) => Err(NfTablesError::Io { op, source }),
        }
    }
}

/// One set of the table, with its elements encoded.
struct Set {
    name: String,
    key_type: u32,
    key_len: u32,
    elements: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(address: &IpAddr) -> Family {
        if address.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    fn name(self, set: &str) -> String {
        format!("{set}{}", if self == Family::V4 { 4 } else { 6 })
    }

    fn address_len(self) -> u32 {
        if self == Family::V4 { 4 } else { 16 }
    }

    fn address_type(self) -> u32 {
        if self == Family::V4 { TYPE_IPADDR } else { TYPE_IP6ADDR }
    }

    fn nfproto(self) -> u8 {
        if self == Family::V4 { NFPROTO_IPV4 } else { NFPROTO_IPV6 }
    }

    /// address . proto . port, each part padded to 4 bytes as registers hold them.
    fn encode_service(self, key: &ServiceKey) -> Option<Vec<u8>> {
        let ServiceKey::Address { protocol, address, port } = *key else { return None };
        if Family::of(&address) != self {
            return None;
        }
        let mut out = octets(&address);
        out.extend([u8::try_from(protocol.to_raw()).unwrap_or(0), 0, 0, 0]);
        out.extend(port.to_be_bytes());
        out.extend([0, 0]);
        Some(out)
    }

    fn decode_service(self, bytes: &[u8]) -> Option<ServiceKey> {
        let n = self.address_len() as usize;
        if bytes.len() != n + 8 {
            return None;
        }
        let address = match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&bytes[..4]).ok()?)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[..16]).ok()?)),
        };
        let protocol = Protocol::from_raw(u16::from(bytes[n]));
        let port = u16::from_be_bytes([bytes[n + 4], bytes[n + 5]]);
        Some(ServiceKey::Address { protocol, address, port })
    }

    /// endpoint . proto . port . endpoint.
    fn encode_endpoint(self, protocol: Protocol, endpoint: &SocketAddr) -> Option<Vec<u8>> {
        let mut out = self.encode_service(&ServiceKey::Address { protocol, address: endpoint.ip(), port: endpoint.port() })?;
        out.extend(octets(&endpoint.ip()));
        Some(out)
    }

    fn sets(self, ruleset: &Ruleset) -> [Set; 4] {
        let service_type = ((self.address_type() << TYPE_BITS) | TYPE_INET_PROTOCOL) << TYPE_BITS | TYPE_INET_SERVICE;
        let service_len = self.address_len() + 8;
        let services = |keys: &BTreeSet<ServiceKey>| keys.iter().filter_map(|k| self.encode_service(k)).collect();
        [
            Set { name: self.name("services"), key_type: service_type, key_len: service_len, elements: services(&ruleset.services) },
            Set {
                name: self.name("masquerade"),
                key_type: service_type,
                key_len: service_len,
                elements: services(&ruleset.masquerade),
            },
            Set {
                name: self.name("hairpin"),
                key_type: (service_type << TYPE_BITS) | self.address_type(),
                key_len: service_len + self.address_len(),
                elements: ruleset.endpoints.iter().filter_map(|(p, e)| self.encode_endpoint(*p, e)).collect(),
            },
            Set {
                name: self.name("addresses"),
                key_type: self.address_type(),
                key_len: self.address_len(),
                elements: ruleset.addresses.iter().filter(|a| Family::of(a) == self).map(octets).collect(),
            },
        ]
    }

    /// The family's three rules, as expression lists.
    fn rules(self) -> Vec<Vec<ListAttribute<ExpressionAttribute>>> {
        let n = self.address_len();
        let (ct_daddr, daddr_offset, saddr_offset) = match self {
            Family::V4 => (NFT_CT_DST_IP, 16, 12),
            Family::V6 => (NFT_CT_DST_IP6, 24, 8),
        };
        let words = n / 4;
        let nfproto = [
            meta(MetaKey::Nfproto, Register::Reg1),
            Expressions::Cmp(vec![
                Cmp::SourceRegister(Register::Reg1),
                Cmp::Op(Operator::Equal),
                Cmp::Data(DataAttribute::Value(vec![self.nfproto()])),
            ]),
        ];
        let masquerade_set = [
            ct(ct_daddr, 0),
            meta(MetaKey::L4Proto, reg(words)),
            ct(NFT_CT_PROTO_DST, words + 1),
            lookup(self.name("masquerade")),
            masq(),
        ];
        let hairpin = [
            payload(NFT_PAYLOAD_NETWORK_HEADER, daddr_offset, n, 0),
            meta(MetaKey::L4Proto, reg(words)),
            payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, words + 1),
            payload(NFT_PAYLOAD_NETWORK_HEADER, saddr_offset, n, words + 2),
            lookup(self.name("hairpin")),
            masq(),
        ];
        let from_node = [payload(NFT_PAYLOAD_NETWORK_HEADER, saddr_offset, n, 0), lookup(self.name("addresses")), masq()];
        [masquerade_set.to_vec(), hairpin.to_vec(), from_node.to_vec()]
            .into_iter()
            .map(|rule| nfproto.iter().cloned().chain(rule).map(ListAttribute::from).collect())
            .collect()
    }
}

fn octets(address: &IpAddr) -> Vec<u8> {
    match address {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The `i`th 32-bit register.
fn reg(i: u32) -> Register {
    Register::from(NFT_REG32_00 + i)
}

fn meta(key: MetaKey, register: Register) -> Expressions {
    Expressions::Meta(vec![Meta::Key(key), Meta::DestinationRegister(register)])
}

fn payload(base: u32, offset: u32, len: u32, register: u32) -> Expressions {
    Expressions::Payload(vec![
        Payload::DestinationRegister(reg(register)),
        Payload::Base(base),
        Payload::Offset(offset),
        Payload::Len(len),
    ])
}

fn ct(key: u32, register: u32) -> Expressions {
    Expressions::Other {
        expression_type: "ct".into(),
        attributes: vec![
            DefaultNla::new(NFTA_CT_DREG, (NFT_REG32_00 + register).to_be_bytes().to_vec()),
            DefaultNla::new(NFTA_CT_KEY, key.to_be_bytes().to_vec()),
            DefaultNla::new(NFTA_CT_DIRECTION, vec![IP_CT_DIR_ORIGINAL]),
        ],
    }
}

fn lookup(set: String) -> Expressions {
    Expressions::Lookup(vec![Lookup::Set(set), Lookup::SourceRegister(reg(0))])
}

fn masq() -> Expressions {
    Expressions::Other { expression_type: "masq".into(), attributes: vec![] }
}

/// The transaction that replaces the table: create it (so that deleting
/// cannot fail), delete it, and build it again, with its fingerprint.
fn table_messages(ruleset: &Ruleset) -> Vec<(NfTablesMessage, u16)> {
    let table = |user_data: Option<Vec<u8>>| {
        let mut attributes = vec![TableAttribute::Name(TABLE.into())];
        attributes.extend(user_data.map(TableAttribute::UserData));
        TableMessage { attributes }
    };
    let mut out = vec![
        (NfTablesMessage::NewTable(table(None)), NLM_F_CREATE),
        (NfTablesMessage::DeleteTable(table(None)), 0),
        (NfTablesMessage::NewTable(table(Some(ruleset.fingerprint()))), NLM_F_CREATE),
    ];
    let mut set_id = 0;
    for family in [Family::V4, Family::V6] {
        for set in family.sets(ruleset) {
            set_id += 1;
            out.push((
                NfTablesMessage::NewSet(SetMessage {
                    attributes: vec![
                        SetAttribute::Table(TABLE.into()),
                        SetAttribute::Name(set.name.clone()),
                        SetAttribute::Flags(SetFlags::empty()),
                        SetAttribute::KeyType(set.key_type),
                        SetAttribute::KeyLen(set.key_len),
                        SetAttribute::Id(set_id),
                    ],
                }),
                NLM_F_CREATE,
            ));
            for chunk in set.elements.chunks(ELEMENTS_PER_MESSAGE) {
                let elements = chunk
                    .iter()
                    .map(|key| ListAttribute::Element(vec![SetElementAttribute::Key(DataAttribute::Value(key.clone()))]))
                    .collect();
                out.push((
                    NfTablesMessage::NewSetElement(SetElementMessage {
                        attributes: vec![
                            SetElementList::Table(TABLE.into()),
                            SetElementList::Set(set.name.clone()),
                            SetElementList::SetId(set_id),
                            SetElementList::Elements(elements),
                        ],
                    }),
                    NLM_F_CREATE,
                ));
            }
        }
    }
    out.push((
        NfTablesMessage::NewChain(ChainMessage {
            attributes: vec![
                ChainAttribute::Table(TABLE.into()),
                ChainAttribute::Name(CHAIN.into()),
                ChainAttribute::Hook(vec![
                    Hook::Number(HookNumber::Inet(InetHookNumber::PostRouting)),
                    // srcnat
                    Hook::Priority(100),
                ]),
                ChainAttribute::Policy(NF_ACCEPT),
                ChainAttribute::Type("nat".into()),
            ],
        }),
        NLM_F_CREATE,
    ));
    for family in [Family::V4, Family::V6] {
        for expressions in family.rules() {
            out.push((
                NfTablesMessage::NewRule(RuleMessage {
                    attributes: vec![
                        RuleAttribute::Table(TABLE.into()),
                        RuleAttribute::Chain(CHAIN.into()),
                        RuleAttribute::Expressions(expressions),
                    ],
                }),
                NLM_F_CREATE | NLM_F_APPEND,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(protocol: Protocol, s: &str) -> ServiceKey {
        let address: SocketAddr = s.parse().expect("a socket address");
        ServiceKey::Address { protocol, address: address.ip(), port: address.port() }
    }

    #[test]
    fn service_keys_round_trip_through_their_set_encoding() {
        for (family, k) in [(Family::V4, key(Protocol::Udp, "10.96.0.10:53")), (Family::V6, key(Protocol::Sctp, "[fd00::1]:30080"))] {
            let bytes = family.encode_service(&k).expect("the family's key");
            assert_eq!(bytes.len() as u32, family.address_len() + 8);
            assert_eq!(family.decode_service(&bytes), Some(k));
        }
        // The padding is where registers put it: proto in byte 0 of its word, the port big-endian.
        let bytes = Family::V4.encode_service(&key(Protocol::Tcp, "10.0.0.1:80")).expect("an IPv4 key");
        assert_eq!(bytes, [10, 0, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]);
        assert_eq!(Family::V6.encode_service(&key(Protocol::Tcp, "10.0.0.1:80")), None, "not in the IPv6 sets");
    }

    #[test]
    fn the_fingerprint_changes_with_any_element_and_not_otherwise() {
        let mut ruleset = Ruleset::default();
        ruleset.services.insert(key(Protocol::Tcp, "10.96.0.10:80"));
        let before = ruleset.fingerprint();
        assert_eq!(before, ruleset.clone().fingerprint());
        for change in [
            |r: &mut Ruleset| {
                r.masquerade.insert(key(Protocol::Tcp, "192.168.1.10:30080"));
            },
            |r: &mut Ruleset| {
                r.endpoints.insert((Protocol::Tcp, "10.244.0.5:8080".parse().expect("an endpoint")));
            },
            |r: &mut Ruleset| {
                r.addresses.insert("fd00::10".parse().expect("an address"));
            },
        ] {
            let mut changed = ruleset.clone();
            change(&mut changed);
            assert_ne!(changed.fingerprint(), before);
        }
    }

    #[test]
    fn the_transaction_recreates_the_table_with_every_set_and_rule() {
        let mut ruleset = Ruleset::default();
        for port in 0..2500u16 {
            ruleset.services.insert(key(Protocol::Tcp, &format!("10.96.0.10:{port}")));
        }
        let messages = table_messages(&ruleset);
        assert!(matches!(messages[0].0, NfTablesMessage::NewTable(_)));
        assert!(matches!(messages[1].0, NfTablesMessage::DeleteTable(_)));
        let sets = messages.iter().filter(|(m, _)| matches!(m, NfTablesMessage::NewSet(_))).count();
        assert_eq!(sets, 8);
        // 2,500 elements in messages of at most 1,000.
        let element_messages = messages.iter().filter(|(m, _)| matches!(m, NfTablesMessage::NewSetElement(_))).count();
        assert_eq!(element_messages, 3);
        let rules = messages.iter().filter(|(m, _)| matches!(m, NfTablesMessage::NewRule(_))).count();
        assert_eq!(rules, 6);
    }
}
