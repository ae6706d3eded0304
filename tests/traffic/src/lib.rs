//! Test traffic for IPVS: servers that answer every connection (TCP or SCTP
//! association, or UDP datagram) with their own name, and a client that opens
//! many connections to a virtual address and counts which server answered each.
//!
//! The binaries `traffic-server` and `traffic-client` wrap [`serve_tcp`],
//! [`serve_udp`], [`serve_sctp`] and [`run_client`]; tests in the VM run them in network
//! namespaces behind IPVS. Everything is blocking std networking: one thread
//! per concurrent client connection, which is fast enough to count thousands
//! of connections in seconds even under QEMU's TCG.

pub mod netns;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Answers every accepted connection with `name` and a newline, then closes
/// it. Runs until accepting fails.
pub fn serve_tcp(listener: TcpListener, name: &str) -> io::Result<()> {
    let answer = format!("{name}\n");
    loop {
        let (mut stream, _) = match listener.accept() {
            Ok(accepted) => accepted,
            // A client that gave up before accept: not the server's problem.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e),
        };
        // A client that vanished is its own problem: keep serving.
        let _ = stream.write_all(answer.as_bytes());
    }
}

/// Answers every datagram with `name` and a newline, to its sender. Runs
/// until receiving fails.
pub fn serve_udp(socket: UdpSocket, name: &str) -> io::Result<()> {
    let answer = format!("{name}\n");
    let mut buf = [0u8; 2048];
    loop {
        let (_, peer) = socket.recv_from(&mut buf)?;
        let _ = socket.send_to(answer.as_bytes(), peer);
    }
}

/// SCTP's IP protocol number (`IPPROTO_SCTP`).
const IPPROTO_SCTP: i32 = 132;

/// A one-to-one style SCTP socket (`SOCK_STREAM`, `IPPROTO_SCTP`) for `address`'s family.
fn sctp_socket(address: &SocketAddr) -> io::Result<socket2::Socket> {
    socket2::Socket::new(socket2::Domain::for_address(*address), socket2::Type::STREAM, Some(socket2::Protocol::from(IPPROTO_SCTP)))
}

/// A listening one-to-one style SCTP socket on `address`, for [`serve_sctp`]:
/// it accepts, reads and writes as a TCP listener does. The kernel needs SCTP
/// (the `sctp` module): without it this fails with `EPROTONOSUPPORT`. On
/// `[::]` it takes IPv4 associations too (see [`dual_stack`]).
pub fn sctp_listener(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = sctp_socket(&address)?;
    socket.set_reuse_address(true)?;
    dual_stack(&socket, &address)?;
    socket.bind(&address.into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

/// A listening TCP socket on `address`, for [`serve_tcp`]. On `[::]` it takes
/// IPv4 connections too (see [`dual_stack`]).
pub fn tcp_listener(address: SocketAddr) -> io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(address);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    dual_stack(&socket, &address)?;
    socket.bind(&address.into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

/// A UDP socket bound to `address`, for [`serve_udp`]. On `[::]` it takes
/// IPv4 datagrams too (see [`dual_stack`]).
pub fn udp_socket(address: SocketAddr) -> io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(address);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    dual_stack(&socket, &address)?;
    socket.bind(&address.into())?;
    Ok(socket.into())
}

/// A socket about to be bound to the IPv6 unspecified address `[::]` serves
/// both families (IPv4 peers as `::ffff:a.b.c.d`) whatever the namespace's
/// `net.ipv6.bindv6only` says: a dual-stack pod's server on `[::]` answers
/// on its IPv4 and its IPv6 address.
fn dual_stack(socket: &socket2::Socket, address: &SocketAddr) -> io::Result<()> {
    match address {
        SocketAddr::V6(v6) if v6.ip().is_unspecified() => socket.set_only_v6(false),
        _ => Ok(()),
    }
}

/// Answers every SCTP association accepted on `listener` (see
/// [`sctp_listener`]) with `name` and a newline once its client's request
/// (any message) arrives, then shuts it down. Runs until accepting fails.
///
/// Request first, unlike [`serve_tcp`]: an answer written as soon as the
/// association is accepted can reach the client before the COOKIE-ACK that
/// completes it (the two leave from different CPUs, and veth queues per CPU);
/// the client, not yet established, drops that DATA, and the server resends it
/// only when its retransmission timer expires, 3 s later. Seen in the test VM
/// behind IPVS about once in 30 to 60 associations (the server's T3 timer
/// expiring); request first, none in 1,200. The request can only be sent once
/// the client is established, and the answer only follows it.
pub fn serve_sctp(listener: TcpListener, name: &str) -> io::Result<()> {
    let answer = format!("{name}\n");
    let mut buf = [0u8; 2048];
    loop {
        let (mut stream, _) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e),
        };
        // A client that never asks must not hold the others up for long.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        if matches!(stream.read(&mut buf), Ok(n) if n > 0) {
            let _ = stream.write_all(answer.as_bytes());
        }
    }
}

/// TCP, UDP or SCTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// One TCP connection per request.
    Tcp,
    /// One datagram from a fresh socket (so a fresh source port) per request.
    Udp,
    /// One SCTP association (one-to-one style socket) per request: a request
    /// message, the answer, shutdown (see [`serve_sctp`]).
    Sctp,
}

/// What [`run_client`] does.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The virtual address and port.
    pub target: SocketAddr,
    /// How many connections in total.
    pub connections: usize,
    /// How many at a time (threads).
    pub concurrency: usize,
    /// Limit of each connect and each read.
    pub timeout: Duration,
    /// TCP, UDP or SCTP.
    pub transport: Transport,
}

/// The outcome of [`run_client`], printed as JSON by `traffic-client`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Connections attempted.
    pub connections: usize,
    /// How many were answered by each server name.
    pub counts: BTreeMap<String, usize>,
    /// Connections that failed (refused, timed out, no answer).
    pub errors: usize,
    /// The first few error messages, to say what went wrong.
    pub error_samples: Vec<String>,
    /// Wall time of the run in milliseconds.
    pub elapsed_ms: u128,
}

impl Report {
    /// The share (0..=1) of answered connections that `name` answered.
    pub fn share(&self, name: &str) -> f64 {
        let answered: usize = self.counts.values().sum();
        if answered == 0 {
            return 0.0;
        }
        self.counts.get(name).copied().unwrap_or(0) as f64 / answered as f64
    }
}

/// Opens `config.connections` connections to `config.target`, `concurrency`
/// at a time, reads each answer, and counts them by answer.
pub fn run_client(config: &ClientConfig) -> Report {
    let started = Instant::now();
    let report = Mutex::new(Report { connections: config.connections, ..Report::default() });
    let workers = config.concurrency.clamp(1, config.connections.max(1));
    std::thread::scope(|scope| {
        for worker in 0..workers {
            // Split the connections as evenly as possible between workers.
            let share = config.connections / workers + usize::from(worker < config.connections % workers);
            let report = &report;
            scope.spawn(move || {
                let mut local: BTreeMap<String, usize> = BTreeMap::new();
                let mut errors = Vec::new();
                for _ in 0..share {
                    match one_request(config) {
                        Ok(name) => *local.entry(name).or_default() += 1,
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                let mut report = report.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                for (name, n) in local {
                    *report.counts.entry(name).or_default() += n;
                }
                report.errors += errors.len();
                for e in errors {
                    if report.error_samples.len() < 5 {
                        report.error_samples.push(e);
                    }
                }
            });
        }
    });
    let mut report = report.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
    report.elapsed_ms = started.elapsed().as_millis();
    report
}

fn one_request(config: &ClientConfig) -> io::Result<String> {
    let answer = match config.transport {
        Transport::Tcp => {
            let mut stream = TcpStream::connect_timeout(&config.target, config.timeout)?;
            stream.set_read_timeout(Some(config.timeout))?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            answer
        }
        Transport::Udp => {
            let local: SocketAddr = if config.target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                .parse()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let socket = UdpSocket::bind(local)?;
            socket.set_read_timeout(Some(config.timeout))?;
            socket.connect(config.target)?;
            socket.send(b"?")?;
            let mut buf = [0u8; 2048];
            let n = socket.recv(&mut buf)?;
            String::from_utf8_lossy(&buf[..n]).into_owned()
        }
        Transport::Sctp => {
            let socket = sctp_socket(&config.target)?;
            socket.connect_timeout(&config.target.into(), config.timeout)?;
            let mut stream: TcpStream = socket.into();
            stream.set_read_timeout(Some(config.timeout))?;
            stream.write_all(b"?")?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            answer
        }
    };
    let name = answer.trim();
    if name.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "empty answer"));
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_tcp_answer_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        std::thread::spawn(move || serve_tcp(listener, "alpha"));
        let report = run_client(&ClientConfig {
            target,
            connections: 500,
            concurrency: 8,
            timeout: Duration::from_secs(5),
            transport: Transport::Tcp,
        });
        assert_eq!(report.errors, 0, "{report:?}");
        assert_eq!(report.counts.get("alpha"), Some(&500));
        assert_eq!(report.share("alpha"), 1.0);
    }

    #[test]
    fn counts_every_udp_answer_on_loopback() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let target = socket.local_addr().unwrap();
        std::thread::spawn(move || serve_udp(socket, "beta"));
        let report = run_client(&ClientConfig {
            target,
            connections: 200,
            concurrency: 4,
            timeout: Duration::from_secs(5),
            transport: Transport::Udp,
        });
        assert_eq!(report.errors, 0, "{report:?}");
        assert_eq!(report.counts.get("beta"), Some(&200));
    }

    #[test]
    fn counts_every_sctp_answer_on_loopback() {
        let listener = match sctp_listener("127.0.0.1:0".parse().unwrap()) {
            Ok(listener) => listener,
            // This host's kernel has no SCTP (the test VM's has: e2e tests use it there).
            Err(e) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) => {
                eprintln!("skipped: no SCTP in this kernel ({e})");
                return;
            }
            Err(e) => panic!("an SCTP listener: {e}"),
        };
        let target = listener.local_addr().unwrap();
        std::thread::spawn(move || serve_sctp(listener, "gamma"));
        let report = run_client(&ClientConfig {
            target,
            connections: 200,
            concurrency: 4,
            timeout: Duration::from_secs(5),
            transport: Transport::Sctp,
        });
        assert_eq!(report.errors, 0, "{report:?}");
        assert_eq!(report.counts.get("gamma"), Some(&200));
    }

    #[test]
    fn a_server_on_the_ipv6_wildcard_answers_both_families() {
        if TcpListener::bind("[::1]:0").is_err() {
            // A host without IPv6 (the test VM has it: tests/tests/e2e_ipv6.rs).
            eprintln!("skipped: no IPv6 loopback here");
            return;
        }
        let listener = tcp_listener("[::]:0".parse().unwrap()).expect("a TCP listener on [::]");
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || serve_tcp(listener, "delta"));
        let socket = udp_socket(SocketAddr::new("::".parse().unwrap(), port)).expect("a UDP socket on [::]");
        std::thread::spawn(move || serve_udp(socket, "delta"));
        for target in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
            for transport in [Transport::Tcp, Transport::Udp] {
                let report = run_client(&ClientConfig {
                    target: target.parse().unwrap(),
                    connections: 50,
                    concurrency: 2,
                    timeout: Duration::from_secs(5),
                    transport,
                });
                assert_eq!(report.errors, 0, "{transport:?} to {target}: {report:?}");
                assert_eq!(report.counts.get("delta"), Some(&50), "{transport:?} to {target}");
            }
        }
    }

    #[test]
    fn refused_connections_are_counted_as_errors() {
        // Bind then drop: nothing listens on that port any more.
        let target = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let report = run_client(&ClientConfig {
            target,
            connections: 3,
            concurrency: 2,
            timeout: Duration::from_secs(1),
            transport: Transport::Tcp,
        });
        assert_eq!(report.errors, 3);
        assert!(report.counts.is_empty());
        assert_eq!(report.error_samples.len(), 3);
        assert_eq!(report.share("anyone"), 0.0);
    }
}
