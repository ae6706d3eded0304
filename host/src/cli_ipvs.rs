//! `ipvs-operator ipvs …`: the kernel's IPVS table, read-only.

use std::io::Write as _;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use ipvs::{Info, IpvsClient, ServiceEntry};
use serde::Serialize;

/// Subcommands of `ipvs-operator ipvs`.
#[derive(Subcommand)]
pub enum IpvsCommand {
    /// List the virtual services and their destinations, like `ipvsadm -Ln`.
    ///
    /// Reads the table of this network namespace over generic netlink; needs
    /// CAP_NET_ADMIN and the ip_vs module.
    List(ListArgs),
}

/// Arguments of `ipvs list`.
#[derive(Args)]
pub struct ListArgs {
    /// Output format: `table` is exactly `ipvsadm -Ln`'s; `json` has every
    /// field (schedulers, flags, weights, thresholds, forwarding, counters).
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

/// The JSON document of `ipvs list -o json`.
#[derive(Serialize)]
struct Listing<'a> {
    version: String,
    connection_table_size: u32,
    services: &'a [ServiceEntry],
}

/// Runs an `ipvs` subcommand.
pub fn run(command: IpvsCommand) -> Result<()> {
    match command {
        IpvsCommand::List(args) => list(&args),
    }
}

fn list(args: &ListArgs) -> Result<()> {
    let mut client = IpvsClient::new()?;
    let info: Info = client.info()?;
    let entries = client.dump()?;
    let text = match args.output {
        Format::Table => ipvs::render_ipvsadm(Some(&info), &entries),
        Format::Json => {
            let listing = Listing {
                version: info.version_string(),
                connection_table_size: info.connection_table_size,
                services: &entries,
            };
            serde_json::to_string_pretty(&listing)? + "\n"
        }
    };
    std::io::stdout().lock().write_all(text.as_bytes()).context("writing to stdout")
}
