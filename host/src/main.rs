//! The `ipvs-operator` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipvs_operator::crd::WeightedService;
use ipvs_operator::eval;
use ipvs_operator::policy::{Catalog, EngineConfig, PolicyEngine};
use ipvs_operator::snapshot::Snapshot;
use k8s_openapi::jiff::Timestamp;
use kube::CustomResourceExt;

mod cli_ipvs;

/// Sets IPVS load-balancing weights on Kubernetes Services, computed by
/// WebAssembly policies, beside kube-proxy in IPVS mode.
#[derive(Parser)]
#[command(name = "ipvs-operator", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate a policy offline: which weight each pod's IPVS destinations would get.
    ///
    /// Reads a WeightedService and Pods (what `kubectl get pods -o yaml` prints, or
    /// a multi-document YAML of Pods; Nodes in the same file give zones and the
    /// `--node` view) and prints one row per pod per Service port.
    Eval(EvalArgs),
    /// Print the WeightedService CustomResourceDefinition as YAML (deploy/crd.yaml).
    Crd,
    /// Read the kernel's IPVS table (needs CAP_NET_ADMIN and the ip_vs module).
    #[command(subcommand)]
    Ipvs(cli_ipvs::IpvsCommand),
}

#[derive(Args)]
struct EvalArgs {
    /// A YAML file holding the WeightedService (other kinds in it are ignored).
    #[arg(long, value_name = "FILE")]
    weighted_service: PathBuf,
    /// Which WeightedService, when the file holds several.
    #[arg(long)]
    name: Option<String>,
    /// A YAML file of Pods (a List/PodList or `---`-separated Pods).
    #[arg(long, value_name = "FILE")]
    pods: PathBuf,
    /// Use this built-in policy instead of the WeightedService's `spec.policy.name`.
    #[arg(long, conflicts_with = "policy_file")]
    policy: Option<String>,
    /// Use this policy module (a component built for wasm32-wasip2).
    #[arg(long, value_name = "FILE.wasm")]
    policy_file: Option<PathBuf>,
    /// Evaluate as the agent on this node does (default: the cluster-wide view).
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    /// The time the policy sees (default: now).
    #[arg(long, value_name = "RFC3339")]
    now: Option<Timestamp>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Sandbox limits of every policy evaluation.
#[derive(Args)]
struct LimitArgs {
    /// Wall-clock limit of one evaluation (e.g. 50ms, 1s).
    #[arg(long, value_name = "DURATION", default_value = "50ms", value_parser = parse_duration)]
    policy_timeout: std::time::Duration,
    /// Memory limit of one evaluation, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    policy_memory_mib: usize,
}

impl LimitArgs {
    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            timeout: self.policy_timeout,
            memory_limit: self.policy_memory_mib << 20,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    ipvs_policy_sdk::time::Duration::parse(text).map(|d| std::time::Duration::from_millis(d.as_millis()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Eval(args) => run_eval(args),
        Command::Crd => print_crd(),
        Command::Ipvs(command) => cli_ipvs::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_crd() -> Result<()> {
    print!("{}", serde_yaml::to_string(&WeightedService::crd()).context("rendering the CRD")?);
    Ok(())
}

fn run_eval(args: EvalArgs) -> Result<()> {
    let ws_objects = eval::read_objects(&args.weighted_service)?;
    let ws = eval::choose_weighted_service(&args.weighted_service, ws_objects.weighted_services, args.name.as_deref())?;
    let objects = if args.pods == args.weighted_service {
        eval::read_objects(&args.pods)?
    } else {
        let objects = eval::read_objects(&args.pods)?;
        if !objects.ignored_kinds.is_empty() {
            eprintln!(
                "note: {} ignores these kinds in {}: {}",
                "eval",
                args.pods.display(),
                objects.ignored_kinds.join(", ")
            );
        }
        objects
    };

    let engine = PolicyEngine::new(args.limits.engine_config())?;
    let policy = match (&args.policy_file, &args.policy) {
        (Some(path), _) => {
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let name = path.file_stem().map_or_else(|| "policy".into(), |s| s.to_string_lossy().into_owned());
            engine.load(&name, &bytes)?
        }
        (None, Some(name)) => Catalog::builtin(engine).get(name)?,
        (None, None) => Catalog::builtin(engine).get(ws.policy_name())?,
    };
    if let Some(pin) = ws.policy_sha256()
        && pin != policy.sha256()
    {
        bail!(
            "policy {:?} has sha256 {}, but WeightedService {} pins {pin}",
            policy.name(),
            policy.sha256(),
            ws.metadata.name.as_deref().unwrap_or_default()
        );
    }

    let now = args.now.unwrap_or_else(Timestamp::now);
    let node = args.node.as_deref().map(|n| eval::node_info(n, &objects.nodes));
    let (mut snapshot, skipped) = Snapshot::from_pods(&ws, &objects.pods, node, now);
    eval::add_zones(&mut snapshot, &objects.nodes);
    for s in &skipped {
        eprintln!("note: pod {} {}", s.pod, s.reason);
    }
    if snapshot.endpoints.is_empty() {
        eprintln!(
            "note: no pod in {} matches the selector of WeightedService {}",
            args.pods.display(),
            snapshot.service.name
        );
    }
    let report = eval::evaluate(&policy, &snapshot)?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print!("{}", eval::render_table(&report, &snapshot, now)),
    }
    Ok(())
}
