//! The netlink plumbing: one socket, requests, dumps and pipelined writes.

use std::collections::HashMap;
use std::fmt::Debug;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use netlink_packet_core::{
    DecodeError, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkDeserializable, NetlinkMessage, NetlinkPayload,
    NlasIterator, ParseableParametrized,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};

use crate::constants::{IPVS_CMD_ATTR_DEST, IPVS_CMD_ATTR_SERVICE};
use crate::error::{IpvsError, Operation, Result};
use crate::message::{IpvsAttr, IpvsCmd, IpvsMessage};
use crate::types::{Destination, Info, Service, ServiceEntry, ServiceKey};
use crate::write::Write;

/// How long a request may wait for the kernel by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes sent in one datagram before their acknowledgements are read. The
/// acknowledgements of a batch must fit the socket's receive buffer, or the
/// kernel drops them.
const WRITE_BATCH: usize = 128;

/// Receive buffer size asked for (best effort: capped by `net.core.rmem_max`).
const SOCKET_RCVBUF: libc::c_int = 4 << 20;

/// Large enough for any one datagram: netlink dump batches are at most 32 KiB.
const RECV_BUFFER: usize = 128 << 10;

/// `CTRL_ATTR_FAMILY_ID` of the generic netlink controller.
const CTRL_ATTR_FAMILY_ID: u16 = 1;

/// Requests the client has sent, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Writes (add, edit, delete) sent to the kernel.
    pub writes: u64,
    /// Dump requests sent (one per [`IpvsClient::services`] and per service in
    /// [`IpvsClient::destinations`]).
    pub dumps: u64,
    /// Other requests (family lookup, info, single gets, flush).
    pub requests: u64,
}

/// A generic netlink socket talking to the kernel's IPVS.
///
/// Owns one socket with send and receive timeouts; every reply is checked
/// against the request's sequence number and the socket's port id. The
/// `IPVS` family id is resolved when the client is created. Methods take
/// `&mut self`: share a client between threads behind a `Mutex`, or open one
/// per thread (a socket is cheap).
///
/// The socket belongs to the network namespace of the thread that creates the
/// client.
pub struct IpvsClient {
    socket: Socket,
    family_id: u16,
    port_id: u32,
    seq: u32,
    timeout: Duration,
    rx: Vec<u8>,
    counters: Counters,
}

impl Debug for IpvsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpvsClient")
            .field("family_id", &self.family_id)
            .field("port_id", &self.port_id)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What to do with one received message.
pub(crate) enum Received<T> {
    /// A reply that belongs to the request.
    Reply(T),
    /// `NLMSG_DONE`, or the acknowledgement (`NLMSG_ERROR` with code 0).
    Done,
    /// `NLMSG_ERROR` with this (positive) errno.
    Errno(i32),
    /// Not ours (another sequence number or port), or a no-op.
    Skip,
}

impl IpvsClient {
    /// Opens a client with [`DEFAULT_TIMEOUT`].
    ///
    /// Fails with [`IpvsError::FamilyNotFound`] when the `ip_vs` module is not
    /// loaded.
    pub fn new() -> Result<Self> {
        Self::with_timeout(DEFAULT_TIMEOUT)
    }

    /// Opens a client whose requests wait at most `timeout` for each answer.
    pub fn with_timeout(timeout: Duration) -> Result<Self> {
        let io_err = |source| IpvsError::Io { op: Operation::OpenSocket, source };
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(io_err)?;
        // Timeouts, so that a kernel that never answers cannot hang the agent.
        set_timeout(&socket, libc::SO_RCVTIMEO, timeout).map_err(io_err)?;
        set_timeout(&socket, libc::SO_SNDTIMEO, timeout).map_err(io_err)?;
        // Error acknowledgements without a copy of the request: smaller, so a
        // batch of them fits the receive buffer. Older kernels lack it: fine.
        let _ = socket.set_cap_ack(true);
        let _ = set_int_option(&socket, libc::SOL_SOCKET, libc::SO_RCVBUF, SOCKET_RCVBUF);
        let address = socket.bind_auto().map_err(io_err)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(io_err)?;
        let mut client = Self {
            socket,
            family_id: 0,
            port_id: address.port_number(),
            seq: 0,
            timeout,
            rx: Vec::with_capacity(RECV_BUFFER),
            counters: Counters::default(),
        };
        client.family_id = client.resolve_family()?;
        Ok(client)
    }

    /// The kernel-assigned id of the `IPVS` generic netlink family.
    pub fn family_id(&self) -> u16 {
        self.family_id
    }

    /// How many requests this client has sent, by kind.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// IPVS version and connection table size (`ipvsadm -Ln`'s first line).
    pub fn info(&mut self) -> Result<Info> {
        let op = Operation::GetInfo;
        let replies = self.request(IpvsCmd::GetInfo, vec![], &op)?;
        let mut info = Info { version: 0, connection_table_size: 0 };
        for attr in replies.iter().flat_map(|m| &m.attrs) {
            match attr {
                IpvsAttr::InfoVersion(v) => info.version = *v,
                IpvsAttr::InfoConnTabSize(s) => info.connection_table_size = *s,
                _ => {}
            }
        }
        Ok(info)
    }

    /// Every virtual service (one dump, in the kernel's order).
    pub fn services(&mut self) -> Result<Vec<Service>> {
        let op = Operation::ListServices;
        let replies = self.dump_request(IpvsCmd::GetService, vec![], &op)?;
        attributes(&replies, IPVS_CMD_ATTR_SERVICE, Service::parse).map_err(|source| IpvsError::Decode { op, source })
    }

    /// One virtual service; [`IpvsError::ServiceNotFound`] if it does not exist.
    pub fn service(&mut self, key: &ServiceKey) -> Result<Service> {
        let op = Operation::GetService(*key);
        let replies = self.request(IpvsCmd::GetService, vec![IpvsAttr::Service(key.to_attrs())], &op)?;
        let attrs = replies
            .iter()
            .flat_map(|m| &m.attrs)
            .find_map(|attr| match attr {
                IpvsAttr::Service(attrs) => Some(attrs),
                _ => None,
            })
            .ok_or_else(|| IpvsError::Decode { op: op.clone(), source: "reply without a service".into() })?;
        Service::from_attrs(attrs).map_err(|source| IpvsError::Decode { op, source })
    }

    /// The destinations of one service (one dump, in the kernel's order).
    /// For a service that does not exist the kernel's dump is simply empty.
    pub fn destinations(&mut self, service: &ServiceKey) -> Result<Vec<Destination>> {
        let op = Operation::ListDestinations(*service);
        let replies = self.dump_request(IpvsCmd::GetDest, vec![IpvsAttr::Service(service.to_attrs())], &op)?;
        let family = service.family();
        attributes(&replies, IPVS_CMD_ATTR_DEST, |payload| Destination::parse(payload, family))
            .map_err(|source| IpvsError::Decode { op, source })
    }

    /// The whole table: every service with its destinations.
    ///
    /// One dump of the services, then one dump of destinations per service
    /// (the kernel only dumps destinations per service). A service deleted
    /// between the two (kube-proxy works concurrently) shows no destinations,
    /// rather than failing the whole dump.
    pub fn dump(&mut self) -> Result<Vec<ServiceEntry>> {
        self.dump_services(|_| true)
    }

    /// Like [`IpvsClient::dump`], but dumps destinations only of the
    /// services `wanted` picks (the others are left out): one dump of the
    /// services plus one per picked service. The agent's periodic check
    /// costs what its own services cost, not what the whole node's do.
    pub fn dump_services(&mut self, wanted: impl Fn(&Service) -> bool) -> Result<Vec<ServiceEntry>> {
        let services = self.services()?;
        let mut entries = Vec::new();
        for service in services.into_iter().filter(|s| wanted(s)) {
            let destinations = self.destinations(&service.key)?;
            entries.push(ServiceEntry { service, destinations });
        }
        Ok(entries)
    }

    /// Sends every write, then collects the acknowledgements: one result per
    /// write, in the same order, each error attributed to its own write.
    ///
    /// Writes are pipelined: up to 128 requests go in one datagram and their
    /// acknowledgements are read afterwards, so a pass costs a few system
    /// calls, not a round trip per write. A failing write does not stop the
    /// ones after it. Nothing is sent for an empty slice.
    pub fn apply(&mut self, writes: &[Write]) -> Vec<Result<()>> {
        let mut results: Vec<Option<Result<()>>> = writes.iter().map(|_| None).collect();
        let mut datagram = Vec::new();
        for (batch_index, batch) in writes.chunks(WRITE_BATCH).enumerate() {
            let first = batch_index * WRITE_BATCH;
            datagram.clear();
            let mut pending: HashMap<u32, usize> = HashMap::with_capacity(batch.len());
            for (offset, write) in batch.iter().enumerate() {
                match write.request() {
                    Ok((cmd, attrs)) => {
                        let seq = self.next_seq();
                        self.encode(cmd, attrs, NLM_F_REQUEST | NLM_F_ACK, seq, &mut datagram);
                        pending.insert(seq, first + offset);
                    }
                    Err(e) => results[first + offset] = Some(Err(e)),
                }
            }
            if pending.is_empty() {
                continue;
            }
            self.counters.writes += pending.len() as u64;
            if let Err(e) = self.socket.send(&datagram, 0) {
                for &index in pending.values() {
                    let source = io::Error::new(e.kind(), e.to_string());
                    results[index] = Some(Err(IpvsError::Io { op: writes[index].operation(), source }));
                }
                continue;
            }
            while !pending.is_empty() {
                if let Err(e) = self.recv() {
                    // Whatever is still pending has no answer: say so for each.
                    for (_, index) in pending.drain() {
                        let op = writes[index].operation();
                        results[index] = Some(Err(match &e {
                            RecvError::Timeout => IpvsError::Timeout { op, timeout: self.timeout },
                            RecvError::Io(source) => {
                                IpvsError::Io { op, source: io::Error::new(source.kind(), source.to_string()) }
                            }
                        }));
                    }
                    break;
                }
                for (seq, errno) in acks(&self.rx, self.port_id) {
                    let Some(index) = pending.remove(&seq) else { continue };
                    let write = &writes[index];
                    results[index] = Some(match errno {
                        0 => Ok(()),
                        errno => Err(IpvsError::from_errno(write.operation(), errno, write.scheduler())),
                    });
                }
            }
        }
        results
            .into_iter()
            .zip(writes)
            .map(|(result, write)| {
                result.unwrap_or_else(|| {
                    Err(IpvsError::Decode { op: write.operation(), source: "no acknowledgement".into() })
                })
            })
            .collect()
    }

    /// Applies one write.
    pub fn write(&mut self, write: Write) -> Result<()> {
        self.apply(std::slice::from_ref(&write)).pop().unwrap_or(Ok(()))
    }

    /// Adds a virtual service.
    pub fn add_service(&mut self, service: &Service) -> Result<()> {
        self.write(Write::AddService(service.clone()))
    }

    /// Replaces a service's scheduler, flags, timeout, netmask and persistence engine.
    pub fn edit_service(&mut self, service: &Service) -> Result<()> {
        self.write(Write::EditService(service.clone()))
    }

    /// Sets the scheduler of `current` (as dumped), keeping everything else.
    pub fn set_scheduler(&mut self, current: &Service, scheduler: &str) -> Result<()> {
        self.write(Write::set_scheduler(current, scheduler))
    }

    /// Sets the scheduler of the virtual service `key` from a fresh read of it:
    /// SET_SERVICE rewrites flags, timeout, netmask and persistence engine
    /// together, so a listing made earlier would put back what another writer
    /// (kube-proxy) changed since. `Ok(false)` when it has that scheduler already.
    pub fn change_scheduler(&mut self, key: &ServiceKey, scheduler: &str) -> Result<bool> {
        let current = self.service(key)?;
        if current.scheduler == scheduler {
            return Ok(false);
        }
        self.set_scheduler(&current, scheduler)?;
        Ok(true)
    }

    /// Deletes a virtual service and its destinations.
    pub fn delete_service(&mut self, service: &ServiceKey) -> Result<()> {
        self.write(Write::DeleteService(*service))
    }

    /// Adds a destination to a service.
    pub fn add_destination(&mut self, service: &ServiceKey, destination: &Destination) -> Result<()> {
        self.write(Write::AddDestination { service: *service, destination: destination.clone() })
    }

    /// Replaces a destination's forwarding method, weight, thresholds and tunnel settings.
    pub fn edit_destination(&mut self, service: &ServiceKey, destination: &Destination) -> Result<()> {
        self.write(Write::EditDestination { service: *service, destination: destination.clone() })
    }

    /// Sets the weight of `current` (as dumped), keeping everything else.
    pub fn set_weight(&mut self, service: &ServiceKey, current: &Destination, weight: u16) -> Result<()> {
        self.write(Write::set_weight(*service, current, weight))
    }

    /// Deletes a destination.
    pub fn delete_destination(&mut self, service: &ServiceKey, destination: std::net::SocketAddr) -> Result<()> {
        self.write(Write::DeleteDestination { service: *service, destination })
    }

    /// Deletes every service and destination (`ipvsadm -C`). For tests.
    pub fn flush(&mut self) -> Result<()> {
        self.request(IpvsCmd::Flush, vec![], &Operation::Flush).map(drop)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Appends one IPVS request to `out`.
    fn encode(&self, cmd: IpvsCmd, attrs: Vec<IpvsAttr>, flags: u16, seq: u32, out: &mut Vec<u8>) {
        let mut genl = GenlMessage::from_payload(IpvsMessage { cmd, attrs });
        genl.set_resolved_family_id(self.family_id);
        encode_message(genl, flags, seq, self.port_id, out);
    }

    /// A request answered by replies and an acknowledgement (`NLM_F_ACK`).
    fn request(&mut self, cmd: IpvsCmd, attrs: Vec<IpvsAttr>, op: &Operation) -> Result<Vec<IpvsMessage>> {
        self.counters.requests += 1;
        self.exchange(cmd, attrs, NLM_F_REQUEST | NLM_F_ACK, op)
    }

    /// A dump: multi-part replies ended by `NLMSG_DONE`, kept raw for the
    /// caller to parse (see [`RawReply`]).
    fn dump_request(&mut self, cmd: IpvsCmd, attrs: Vec<IpvsAttr>, op: &Operation) -> Result<Vec<RawReply>> {
        self.counters.dumps += 1;
        self.exchange(cmd, attrs, NLM_F_REQUEST | NLM_F_DUMP, op)
    }

    fn exchange<F>(&mut self, cmd: IpvsCmd, attrs: Vec<IpvsAttr>, flags: u16, op: &Operation) -> Result<Vec<F>>
    where
        F: ParseableParametrized<[u8], GenlHeader> + Debug,
    {
        let seq = self.next_seq();
        let mut datagram = Vec::new();
        self.encode(cmd, attrs, flags, seq, &mut datagram);
        let family_id = self.family_id;
        self.send_and_collect::<F>(&datagram, seq, op, |header_type| header_type == family_id)
            .map_err(|e| match e {
                // The kernel's errno, in terms of this operation.
                Collected::Errno(errno) => IpvsError::from_errno(op.clone(), errno, None),
                Collected::Error(e) => e,
            })
    }

    /// Looks the `IPVS` family up through the generic netlink controller.
    fn resolve_family(&mut self) -> Result<u16> {
        let op = Operation::ResolveFamily;
        self.counters.requests += 1;
        let seq = self.next_seq();
        let mut genl = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(IpvsMessage::family_name().to_owned())],
        });
        genl.finalize();
        let mut datagram = Vec::new();
        encode_message(genl, NLM_F_REQUEST | NLM_F_ACK, seq, self.port_id, &mut datagram);
        let replies = self
            .send_and_collect::<FamilyReply>(&datagram, seq, &op, |_| true)
            .map_err(|e| match e {
                Collected::Errno(libc::ENOENT) => IpvsError::FamilyNotFound,
                Collected::Errno(errno) => IpvsError::from_errno(op.clone(), errno, None),
                Collected::Error(e) => e,
            })?;
        replies
            .into_iter()
            .find_map(|reply| reply.family_id)
            .ok_or(IpvsError::Decode { op, source: "the controller's answer has no family id".into() })
    }

    /// Sends one request and collects its replies until `NLMSG_DONE` or the
    /// acknowledgement. A dump that fails halfway is still read to its end,
    /// so that the socket can start the next one.
    fn send_and_collect<F>(
        &mut self,
        datagram: &[u8],
        seq: u32,
        op: &Operation,
        family_matches: impl Fn(u16) -> bool,
    ) -> Result<Vec<F>, Collected>
    where
        F: ParseableParametrized<[u8], GenlHeader> + Debug,
    {
        self.socket
            .send(datagram, 0)
            .map_err(|source| Collected::Error(IpvsError::Io { op: op.clone(), source }))?;
        let mut replies = Vec::new();
        let mut failure: Option<Collected> = None;
        loop {
            self.recv().map_err(|e| Collected::Error(e.into_error(op.clone(), self.timeout)))?;
            let mut finished = false;
            for message in messages::<GenlMessage<F>>(&self.rx) {
                let received = match message {
                    Ok(message) => classify(message, seq, self.port_id, &family_matches),
                    Err(source) => Err(Collected::Error(IpvsError::Decode { op: op.clone(), source })),
                };
                match received {
                    Ok(Received::Reply(reply)) => replies.push(reply),
                    Ok(Received::Done) => finished = true,
                    Ok(Received::Errno(errno)) => {
                        failure.get_or_insert(Collected::Errno(errno));
                        // An error ends a request; a dump ends with NLMSG_DONE,
                        // or with this error if it never started.
                        finished = true;
                    }
                    Ok(Received::Skip) => {}
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                }
            }
            if finished {
                return match failure {
                    Some(e) => Err(e),
                    None => Ok(replies),
                };
            }
        }
    }

    /// Receives one datagram into `self.rx`.
    fn recv(&mut self) -> Result<(), RecvError> {
        self.rx.clear();
        // MSG_TRUNC: the call returns the datagram's full length, so that a
        // truncated datagram is noticed rather than parsed half.
        match self.socket.recv(&mut self.rx, libc::MSG_TRUNC) {
            Ok(n) if n > self.rx.len() => Err(RecvError::Io(io::Error::other(format!(
                "a datagram of {n} bytes did not fit the {}-byte buffer",
                self.rx.len()
            )))),
            Ok(_) => Ok(()),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                Err(RecvError::Timeout)
            }
            Err(e) => Err(RecvError::Io(e)),
        }
    }
}

/// Why receiving failed.
enum RecvError {
    Timeout,
    Io(io::Error),
}

impl RecvError {
    fn into_error(self, op: Operation, timeout: Duration) -> IpvsError {
        match self {
            Self::Timeout => IpvsError::Timeout { op, timeout },
            Self::Io(source) => IpvsError::Io { op, source },
        }
    }
}

/// How collecting replies failed: the kernel's errno (mapped by the caller,
/// who knows what it means for the operation), or any other error.
pub(crate) enum Collected {
    Errno(i32),
    Error(IpvsError),
}

/// Sorts one parsed message: ours or not, reply, end or error.
pub(crate) fn classify<F: Debug>(
    message: NetlinkMessage<GenlMessage<F>>,
    seq: u32,
    port_id: u32,
    family_matches: &impl Fn(u16) -> bool,
) -> Result<Received<F>, Collected> {
    if message.header.sequence_number != seq || message.header.port_number != port_id {
        // A late answer to an earlier request that timed out, or not ours.
        return Ok(Received::Skip);
    }
    Ok(match message.payload {
        NetlinkPayload::InnerMessage(genl) if family_matches(message.header.message_type) => {
            Received::Reply(genl.payload)
        }
        NetlinkPayload::InnerMessage(_) | NetlinkPayload::Noop => Received::Skip,
        NetlinkPayload::Done(done) if done.code == 0 => Received::Done,
        NetlinkPayload::Done(done) => Received::Errno(done.code.saturating_abs()),
        NetlinkPayload::Error(error) => match error.code {
            None => Received::Done,
            Some(code) => Received::Errno(code.get().saturating_abs()),
        },
        NetlinkPayload::Overrun(_) => Received::Errno(libc::ENOBUFS),
        _ => Received::Skip,
    })
}

/// The acknowledgements in a datagram: (sequence number, errno; 0 = success).
pub(crate) fn acks(datagram: &[u8], port_id: u32) -> Vec<(u32, i32)> {
    messages::<GenlMessage<IpvsMessage>>(datagram)
        .filter_map(|message| message.ok())
        .filter(|message| message.header.port_number == port_id)
        .filter_map(|message| match message.payload {
            NetlinkPayload::Error(error) => {
                Some((message.header.sequence_number, error.code.map_or(0, |c| c.get().saturating_abs())))
            }
            _ => None,
        })
        .collect()
}

/// Iterates over the netlink messages of one datagram.
pub fn messages<I: NetlinkDeserializable>(datagram: &[u8]) -> impl Iterator<Item = Result<NetlinkMessage<I>, DecodeError>> {
    let mut offset = 0;
    std::iter::from_fn(move || {
        // A netlink header is 16 bytes; anything shorter is padding.
        if offset + 16 > datagram.len() {
            return None;
        }
        let rest = &datagram[offset..];
        let length = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if length < 16 || length > rest.len() {
            offset = datagram.len();
            return Some(Err(DecodeError::from(format!(
                "netlink message length {length} with {} bytes left",
                rest.len()
            ))));
        }
        offset += (length + 3) & !3;
        Some(NetlinkMessage::<I>::deserialize(&rest[..length]))
    })
}

/// Appends a finalized netlink message carrying `genl` to `out`.
pub(crate) fn encode_message<F>(genl: GenlMessage<F>, flags: u16, seq: u32, port_id: u32, out: &mut Vec<u8>)
where
    F: GenlFamily + netlink_packet_core::Emitable + Debug,
{
    let mut message = NetlinkMessage::from(genl);
    message.header.flags = flags;
    message.header.sequence_number = seq;
    message.header.port_number = port_id;
    message.finalize();
    let start = out.len();
    out.resize(start + message.buffer_len(), 0);
    message.serialize(&mut out[start..]);
    // Messages in one datagram start 4-byte aligned.
    out.resize((out.len() + 3) & !3, 0);
}

/// A reply kept as its attributes' bytes. Dump replies are parsed from these
/// straight into services and destinations (which need the service's
/// family), without a list of attribute enums in between.
#[derive(Debug)]
pub(crate) struct RawReply {
    pub(crate) attrs: Vec<u8>,
}

impl ParseableParametrized<[u8], GenlHeader> for RawReply {
    fn parse_with_param(buf: &[u8], _header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(Self { attrs: buf.to_vec() })
    }
}

/// Parses every first-level attribute of type `kind` in `replies` with `parse`.
pub(crate) fn attributes<T>(
    replies: &[RawReply],
    kind: u16,
    parse: impl Fn(&[u8]) -> Result<T, DecodeError>,
) -> Result<Vec<T>, DecodeError> {
    let mut out = Vec::with_capacity(replies.len());
    for reply in replies {
        for nla in NlasIterator::new(&reply.attrs) {
            let nla = nla?;
            if nla.kind() == kind {
                out.push(parse(nla.value())?);
            }
        }
    }
    Ok(out)
}

/// The controller's answer to `CTRL_CMD_GETFAMILY`, keeping only the id: the
/// full attribute set changes between kernels and is not needed.
#[derive(Debug)]
pub(crate) struct FamilyReply {
    family_id: Option<u16>,
}

impl ParseableParametrized<[u8], GenlHeader> for FamilyReply {
    fn parse_with_param(buf: &[u8], _header: GenlHeader) -> Result<Self, DecodeError> {
        let mut family_id = None;
        for nla in NlasIterator::new(buf) {
            let nla = nla?;
            if nla.kind() == CTRL_ATTR_FAMILY_ID {
                let value = nla.value();
                let bytes: [u8; 2] = value
                    .try_into()
                    .map_err(|_| DecodeError::from(format!("CTRL_ATTR_FAMILY_ID of {} bytes", value.len())))?;
                family_id = Some(u16::from_ne_bytes(bytes));
            }
        }
        Ok(Self { family_id })
    }
}

/// Sets `SO_RCVTIMEO` or `SO_SNDTIMEO` on a netlink socket.
pub fn set_timeout(socket: &Socket, option: libc::c_int, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX),
        tv_usec: timeout.subsec_micros().into(),
    };
    set_option(socket, libc::SOL_SOCKET, option, &tv)
}

fn set_int_option(socket: &Socket, level: libc::c_int, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    set_option(socket, level, option, &value)
}

fn set_option<T>(socket: &Socket, level: libc::c_int, option: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    /// An `NLMSG_ERROR` as the kernel sends it with `NETLINK_CAP_ACK`.
    #[rustfmt::skip]
    fn error_message(seq: u8, port: u8, errno: i8) -> Vec<u8> {
        let code = i32::from(errno).to_le_bytes();
        vec![
            0x24, 0x00, 0x00, 0x00, // length 36
            0x02, 0x00,             // NLMSG_ERROR
            0x00, 0x01,             // NLM_F_CAPPED
            seq, 0x00, 0x00, 0x00,  // the request's sequence number
            port, 0x00, 0x00, 0x00, // our port id
            code[0], code[1], code[2], code[3], // 0 (ack) or -errno
            0x10, 0x00, 0x00, 0x00, // the request's header: length 16
            0x1a, 0x00, 0x05, 0x00, // type, flags
            seq, 0x00, 0x00, 0x00,  // sequence number
            port, 0x00, 0x00, 0x00, // port id
        ]
    }

    #[test]
    fn acks_are_matched_by_sequence_number_and_port() {
        let mut datagram = error_message(5, 42, 0);
        datagram.extend(error_message(6, 42, -3)); // ESRCH
        datagram.extend(error_message(7, 99, -1)); // someone else's port
        assert_eq!(acks(&datagram, 42), vec![(5, 0), (6, libc::ESRCH)]);
    }

    #[test]
    fn a_bad_length_ends_the_datagram_with_an_error() {
        let mut datagram = error_message(5, 42, 0);
        // A header claiming 255 bytes where 16 are left.
        datagram.extend([0xff, 0, 0, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let parsed: Vec<_> = messages::<GenlMessage<IpvsMessage>>(&datagram).collect();
        assert_eq!(parsed.len(), 2);
        assert!(parsed[0].is_ok() && parsed[1].is_err());
    }

    #[test]
    fn replies_to_other_requests_are_skipped() {
        let datagram = error_message(9, 42, -2);
        let message = messages::<GenlMessage<IpvsMessage>>(&datagram).next().unwrap().unwrap();
        let skip = classify(message.clone(), 8, 42, &|_| true);
        assert!(matches!(skip, Ok(Received::Skip)));
        let ours = classify(message, 9, 42, &|_| true);
        assert!(matches!(ours, Ok(Received::Errno(libc::ENOENT))));
    }

    #[test]
    fn the_family_id_is_read_from_the_controllers_answer() {
        #[rustfmt::skip]
        let payload = [
            0x09, 0x00, 0x02, 0x00, // CTRL_ATTR_FAMILY_NAME
            b'I', b'P', b'V', b'S', 0x00, 0x00, 0x00, 0x00, // "IPVS\0", padding
            0x06, 0x00, 0x01, 0x00, // CTRL_ATTR_FAMILY_ID
            0x1f, 0x00, 0x00, 0x00, // 0x1f, padding
            0x08, 0x00, 0x42, 0x00, // an attribute newer than this code
            0x00, 0x00, 0x00, 0x00,
        ];
        let reply = FamilyReply::parse_with_param(&payload[..], GenlHeader { cmd: 1, version: 2 }).unwrap();
        assert_eq!(reply.family_id, Some(0x1f));
    }

    #[test]
    fn requests_are_padded_to_four_bytes() {
        let mut out = Vec::new();
        let mut genl = GenlMessage::from_payload(IpvsMessage { cmd: IpvsCmd::Flush, attrs: vec![] });
        genl.set_resolved_family_id(0x1a);
        encode_message(genl, NLM_F_REQUEST, 1, 0, &mut out);
        encode_message(
            GenlMessage::from_payload(IpvsMessage { cmd: IpvsCmd::GetInfo, attrs: vec![] }),
            NLM_F_REQUEST,
            2,
            0,
            &mut out,
        );
        assert_eq!(out.len(), 40);
        let parsed: Vec<_> = messages::<GenlMessage<IpvsMessage>>(&out).map(|m| m.unwrap()).collect();
        assert_eq!(parsed[1].header.sequence_number, 2);
    }
}
