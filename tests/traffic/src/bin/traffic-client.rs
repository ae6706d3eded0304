//! Opens many connections to an address and prints, as JSON, how many each
//! server name answered:
//!
//! `traffic-client --connect 10.0.0.100:80 --connections 5000 --concurrency 16 [--udp | --sctp]`
//!
//! `{"connections":5000,"counts":{"backend-1":2381,…},"errors":0,…}`
//!
//! Exits 0 when every connection was answered, 2 when some failed (the JSON
//! says how many and why), 1 on bad arguments.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use traffic::{ClientConfig, Transport};

#[derive(Parser)]
#[command(name = "traffic-client", about = "Count which server answers each connection")]
struct Args {
    /// The (virtual) address and port to connect to.
    #[arg(long)]
    connect: SocketAddr,
    /// Connections in total.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Connections at a time.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Limit of each connect and read, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Send UDP datagrams (one fresh socket each) instead of TCP connections.
    #[arg(long, conflicts_with = "sctp")]
    udp: bool,
    /// Open SCTP associations (one-to-one style sockets) instead of TCP connections.
    #[arg(long)]
    sctp: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let report = traffic::run_client(&ClientConfig {
        target: args.connect,
        connections: args.connections,
        concurrency: args.concurrency,
        timeout: Duration::from_millis(args.timeout_ms),
        transport: match (args.udp, args.sctp) {
            (true, _) => Transport::Udp,
            (_, true) => Transport::Sctp,
            _ => Transport::Tcp,
        },
    });
    match serde_json::to_string(&report) {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("traffic-client: {e}");
            return ExitCode::FAILURE;
        }
    }
    if report.errors == 0 { ExitCode::SUCCESS } else { ExitCode::from(2) }
}
