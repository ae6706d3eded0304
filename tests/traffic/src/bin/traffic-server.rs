//! Answers every TCP connection (and, with `--udp`, every datagram; with
//! `--sctp`, every SCTP association) on an address with this server's name.
//!
//! `traffic-server --listen 0.0.0.0:8080 --name backend-1 [--udp] [--sctp]`
//!
//! On `[::]:PORT` it serves IPv6 and IPv4 alike (dual-stack sockets), as a
//! dual-stack pod's server does. Prints `listening on ADDR as NAME` on stdout
//! once it accepts connections.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(name = "traffic-server", about = "Answer every connection with a name")]
struct Args {
    /// Address and port to listen on (`[::]:PORT`: both IP families).
    #[arg(long)]
    listen: SocketAddr,
    /// The answer.
    #[arg(long)]
    name: String,
    /// Also answer UDP datagrams on the same address and port.
    #[arg(long)]
    udp: bool,
    /// Also answer SCTP associations on the same address and port (the kernel needs SCTP).
    #[arg(long)]
    sctp: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let listener = match traffic::tcp_listener(args.listen) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("traffic-server: binding TCP {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    if args.udp {
        let socket = match traffic::udp_socket(args.listen) {
            Ok(socket) => socket,
            Err(e) => {
                eprintln!("traffic-server: binding UDP {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        let name = args.name.clone();
        std::thread::spawn(move || {
            if let Err(e) = traffic::serve_udp(socket, &name) {
                eprintln!("traffic-server: UDP: {e}");
                std::process::exit(1);
            }
        });
    }
    if args.sctp {
        let listener = match traffic::sctp_listener(args.listen) {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("traffic-server: binding SCTP {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        let name = args.name.clone();
        std::thread::spawn(move || {
            if let Err(e) = traffic::serve_sctp(listener, &name) {
                eprintln!("traffic-server: SCTP: {e}");
                std::process::exit(1);
            }
        });
    }
    println!("listening on {} as {}", args.listen, args.name);
    match traffic::serve_tcp(listener, &args.name) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("traffic-server: TCP: {e}");
            ExitCode::FAILURE
        }
    }
}
