//! The IPv4 part of the IPVS table through the kernel's older `getsockopt`
//! interface (`IP_VS_SO_GET_*`, what ipvsadm used before netlink), for a
//! cheap periodic read.
//!
//! Why a second interface: the agent compares the whole table every few
//! seconds. A netlink dump costs one request per virtual service with
//! attribute-encoded replies, and `/proc/net/ip_vs` makes the kernel format
//! every line as text; these options copy fixed-size structs instead (in the
//! test VM, 1,000 services with 10,000 destinations: 8.5 ms here, 26 ms for
//! the text, 475 ms for netlink dumps). They show IPv4 services only, and
//! nothing says whether there are others: the kernel's count of services
//! behind `IP_VS_SO_GET_INFO` counts IPv4 ones only. A caller that needs
//! IPv6 virtual services reads them another way.
//!
//! Layouts are those of `include/uapi/linux/ip_vs.h` on Linux (the structs'
//! natural alignment; they have not changed since 2.6). Only the fields the
//! agent compares are decoded: key, scheduler, and each destination's address
//! and weight.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::{IpvsError, Operation, Result};
use crate::types::{AddressFamily, Protocol, ServiceKey};

/// `IP_VS_BASE_CTL`: the first of IPVS's socket options.
const BASE_CTL: libc::c_int = 64 + 1024 + 64;
const SO_GET_INFO: libc::c_int = BASE_CTL + 1;
const SO_GET_SERVICES: libc::c_int = BASE_CTL + 2;
const SO_GET_DESTS: libc::c_int = BASE_CTL + 4;

/// `struct ip_vs_getinfo`: version, connection table size, number of services.
const GETINFO_LEN: usize = 12;
/// `struct ip_vs_get_services`: `num_services`, then (8-aligned) the entries.
const GET_SERVICES_HEADER: usize = 8;
/// `struct ip_vs_service_entry`, and where its fields are.
const SERVICE_ENTRY_LEN: usize = 104;
const SVC_PROTOCOL: usize = 0;
const SVC_ADDR: usize = 4;
const SVC_PORT: usize = 8;
const SVC_FWMARK: usize = 12;
const SVC_SCHED_NAME: usize = 16;
/// `IP_VS_SCHEDNAME_MAXLEN`.
const SCHED_NAME_LEN: usize = 16;
const SVC_NUM_DESTS: usize = 44;
/// `struct ip_vs_get_dests`: which service, `num_dests`, then the entries.
const GET_DESTS_HEADER: usize = 24;
const GD_PROTOCOL: usize = 0;
const GD_ADDR: usize = 4;
const GD_PORT: usize = 8;
const GD_FWMARK: usize = 12;
const GD_NUM_DESTS: usize = 16;
/// `struct ip_vs_dest_entry`, and where its fields are.
const DEST_ENTRY_LEN: usize = 96;
const DEST_ADDR: usize = 0;
const DEST_PORT: usize = 4;
const DEST_WEIGHT: usize = 12;

/// One IPv4 virtual service as the table lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SockoptService {
    /// Its key (an IPv4 address/port, or a firewall mark).
    pub key: ServiceKey,
    scheduler: [u8; SCHED_NAME_LEN],
    /// Destinations it had when listed.
    listed_destinations: u32,
    /// Its destinations in [`SockoptTable`]'s list, once read.
    destinations: std::ops::Range<usize>,
}

impl SockoptService {
    /// The scheduler's name.
    pub fn scheduler(&self) -> &str {
        let end = self.scheduler.iter().position(|b| *b == 0).unwrap_or(SCHED_NAME_LEN);
        std::str::from_utf8(&self.scheduler[..end]).unwrap_or("")
    }
}

/// The IPv4 virtual services of the kernel's table with each destination's
/// address and weight, read in pieces: [`SockoptTable::list_services`], then
/// [`SockoptTable::read_destinations`] until it says it is done. Keep one
/// and reuse it: its buffers stay allocated between reads.
pub struct SockoptTable {
    socket: OwnedFd,
    services: Vec<SockoptService>,
    destinations: Vec<(SocketAddr, u32)>,
    /// Services whose destinations are read so far.
    read: usize,
    buffer: Vec<u8>,
}

impl std::fmt::Debug for SockoptTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SockoptTable")
            .field("services", &self.services.len())
            .field("destinations", &self.destinations.len())
            .finish_non_exhaustive()
    }
}

impl SockoptTable {
    /// A reader on a UDP socket of the calling thread's network namespace
    /// (IPVS's options are reached through any IPv4 socket; a UDP one needs
    /// no capability to open, and none is bound).
    pub fn new() -> Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked
        // and owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::IPPROTO_UDP) };
        if fd < 0 {
            return Err(IpvsError::Io { op: Operation::OpenSocket, source: std::io::Error::last_os_error() });
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SockoptTable { socket, services: Vec::new(), destinations: Vec::new(), read: 0, buffer: Vec::new() })
    }

    /// Start a read: list the IPv4 services with their schedulers. Their
    /// destinations are read by [`SockoptTable::read_destinations`].
    pub fn list_services(&mut self) -> Result<()> {
        self.services.clear();
        self.destinations.clear();
        self.read = 0;
        let mut info = [0u8; GETINFO_LEN];
        self.get(SO_GET_INFO, &mut info, Operation::GetInfo)?;
        // IPv4 services only, as the listing has them.
        let total = u32_at(&info, 8) as usize;
        let len = GET_SERVICES_HEADER + total * SERVICE_ENTRY_LEN;
        // Zeroed: entries the kernel leaves unwritten (services deleted since
        // it counted them) read as protocol 0 and mark 0.
        self.buffer.clear();
        self.buffer.resize(len, 0);
        self.buffer[..4].copy_from_slice(&(total as u32).to_ne_bytes());
        let mut buffer = std::mem::take(&mut self.buffer);
        let result = self.get(SO_GET_SERVICES, &mut buffer, Operation::ListServices);
        self.buffer = buffer;
        result?;
        for entry in self.buffer[GET_SERVICES_HEADER..].chunks_exact(SERVICE_ENTRY_LEN) {
            let protocol = u16_at(entry, SVC_PROTOCOL);
            let fwmark = u32_at(entry, SVC_FWMARK);
            let key = if fwmark != 0 {
                ServiceKey::fwmark(AddressFamily::Inet, fwmark)
            } else if protocol != 0 {
                let address = Ipv4Addr::from(be_u32_at(entry, SVC_ADDR));
                ServiceKey::new(Protocol::from_raw(protocol), SocketAddr::new(IpAddr::V4(address), be_u16_at(entry, SVC_PORT)))
            } else {
                continue; // not written
            };
            let mut scheduler = [0u8; SCHED_NAME_LEN];
            scheduler.copy_from_slice(&entry[SVC_SCHED_NAME..SVC_SCHED_NAME + SCHED_NAME_LEN]);
            let listed_destinations = u32_at(entry, SVC_NUM_DESTS);
            self.services.push(SockoptService { key, scheduler, listed_destinations, destinations: 0..0 });
        }
        Ok(())
    }

    /// Read the destinations of up to `count` more listed services; `true`
    /// once every listed service's are read. A service deleted since it was
    /// listed is dropped from the table; destinations added since are not
    /// seen until the next read.
    pub fn read_destinations(&mut self, count: usize) -> Result<bool> {
        let mut budget = count;
        while budget > 0 && self.read < self.services.len() {
            budget -= 1;
            match self.read_one(self.read) {
                Ok(range) => {
                    self.services[self.read].destinations = range;
                    self.read += 1;
                }
                // Deleted since it was listed.
                Err(IpvsError::ServiceNotFound { .. }) => {
                    self.services.remove(self.read);
                }
                Err(error) => return Err(error),
            }
        }
        Ok(self.read >= self.services.len())
    }

    /// Read the destinations of the listed service at `index` into the list;
    /// where they are in it.
    fn read_one(&mut self, index: usize) -> Result<std::ops::Range<usize>> {
        let service = &self.services[index];
        let (protocol, address, port, fwmark) = match service.key {
            ServiceKey::Address { protocol, address: IpAddr::V4(address), port } => (protocol.to_raw(), address, port, 0),
            ServiceKey::Fwmark { mark, .. } => (0, Ipv4Addr::UNSPECIFIED, 0, mark),
            // Never listed: only IPv4 services are.
            ServiceKey::Address { .. } => return Ok(0..0),
        };
        let listed = service.listed_destinations;
        let key = service.key;
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        buffer.resize(GET_DESTS_HEADER + listed as usize * DEST_ENTRY_LEN, 0);
        buffer[GD_PROTOCOL..GD_PROTOCOL + 2].copy_from_slice(&protocol.to_ne_bytes());
        buffer[GD_ADDR..GD_ADDR + 4].copy_from_slice(&address.octets());
        buffer[GD_PORT..GD_PORT + 2].copy_from_slice(&port.to_be_bytes());
        buffer[GD_FWMARK..GD_FWMARK + 4].copy_from_slice(&fwmark.to_ne_bytes());
        buffer[GD_NUM_DESTS..GD_NUM_DESTS + 4].copy_from_slice(&listed.to_ne_bytes());
        let result = self.get(SO_GET_DESTS, &mut buffer, Operation::ListDestinations(key));
        let start = self.destinations.len();
        if result.is_ok() {
            for entry in buffer[GET_DESTS_HEADER..].chunks_exact(DEST_ENTRY_LEN) {
                let address = Ipv4Addr::from(be_u32_at(entry, DEST_ADDR));
                let port = be_u16_at(entry, DEST_PORT);
                if address.is_unspecified() && port == 0 {
                    break; // not written: the service has fewer destinations than when listed
                }
                self.destinations.push((SocketAddr::new(IpAddr::V4(address), port), u32_at(entry, DEST_WEIGHT)));
            }
        }
        self.buffer = buffer;
        result.map(|()| start..self.destinations.len())
    }

    /// The services listed, each with its destinations (address, weight) as
    /// far as they are read.
    pub fn services(&self) -> impl Iterator<Item = (&SockoptService, &[(SocketAddr, u32)])> {
        self.services.iter().map(|s| (s, &self.destinations[s.destinations.clone()]))
    }

    /// `getsockopt(IPPROTO_IP, option)` with `buffer` as the argument in and
    /// the answer out; the kernel wants its exact length.
    fn get(&self, option: libc::c_int, buffer: &mut [u8], op: Operation) -> Result<()> {
        let mut len = libc::socklen_t::try_from(buffer.len())
            .map_err(|_| IpvsError::InvalidArgument { op: op.clone(), reason: "the table is too large to read".into() })?;
        // SAFETY: buffer is valid for writes of len bytes, and len is its length.
        let rc = unsafe {
            libc::getsockopt(self.socket.as_raw_fd(), libc::IPPROTO_IP, option, buffer.as_mut_ptr().cast(), &mut len)
        };
        if rc == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        Err(match error.raw_os_error().unwrap_or(0) {
            libc::EPERM | libc::EACCES => IpvsError::PermissionDenied { op },
            libc::ESRCH => IpvsError::ServiceNotFound { op },
            // IPVS registers these options when it loads.
            libc::ENOPROTOOPT => IpvsError::FamilyNotFound,
            errno => IpvsError::Kernel { op, errno },
        })
    }
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([bytes[at], bytes[at + 1]])
}

fn be_u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn be_u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}
