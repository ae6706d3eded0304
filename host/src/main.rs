//! The `ipvs-operator` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipvs_operator::agent::{self, AgentConfig, TableReader};
use ipvs_operator::controller;
use ipvs_operator::eval;
use ipvs_operator::metrics::{self, Health, Metrics};
use ipvs_operator::policy::{
    COMPILE_OUT_OF_MEMORY, Catalog, CatalogEvent, CompileLimits, Compiler, EngineConfig,
    PolicyEngine, PolicyError, precompile_in_child,
};
use ipvs_operator::snapshot::Snapshot;
use k8s_openapi::jiff::Timestamp;

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
    /// Print the CustomResourceDefinitions as YAML (deploy/crd.yaml): WeightedService, and
    /// PodInfoSlice (what the controller publishes of pods for the agents).
    Crd,
    /// Run the controller: owns each WeightedService's Service, evaluates its
    /// policy cluster-wide and writes its status (a Deployment; of its
    /// replicas, the holder of a Lease works and the others stand by).
    ///
    /// Talks to the API server of the kubeconfig (KUBECONFIG) or, in a pod, of its
    /// ServiceAccount.
    Controller(ControllerArgs),
    /// Run the node agent: evaluates policies for this node and writes IPVS
    /// weights and schedulers beside kube-proxy, and serves the Services of
    /// WeightedServices with `spec.proxy: ipvs-operator` itself (a DaemonSet,
    /// hostNetwork, NET_ADMIN).
    ///
    /// Talks to the API server of the kubeconfig (KUBECONFIG) or, in a pod, of its
    /// ServiceAccount.
    Agent(AgentArgs),
    /// Prepare this node for Services the agents serve themselves (`spec.proxy:
    /// ipvs-operator`): load the kernel modules (ip_vs and its schedulers,
    /// nf_conntrack, nf_tables, nft_ct, nft_chain_nat, nft_masq, dummy) with the kernel's
    /// own loader from the host's module tree, and set the sysctls kube-proxy's
    /// IPVS mode sets (net.ipv4.vs.conntrack, expire_nodest_conn,
    /// expire_quiescent_template, ip_forward, strict ARP).
    ///
    /// Run once per node, before the agent: a privileged init container on the
    /// host network with the host's /lib/modules mounted
    /// (deploy/components/node-setup), so that the agent keeps only NET_ADMIN.
    /// Prints one line per module and sysctl; exits 1 if any could not be done.
    NodeSetup(NodeSetupArgs),
    /// Read the kernel's IPVS table (needs CAP_NET_ADMIN and the ip_vs module).
    #[command(subcommand)]
    Ipvs(cli_ipvs::IpvsCommand),
    /// Work with policy modules offline.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Compile a policy module (stdin) to machine code (stdout): the child the
    /// controller and agent start, so that the compiler's memory goes away
    /// with it. Exit status 1 with the reason on stderr when it does not compile.
    #[command(hide = true)]
    CompilePolicy(CompileArgs),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Run a policy against case files, as `opa test` does: each file holds
    /// `cases:`, each case a `weightedService`, its `pods`, optionally a `node`
    /// (evaluate as that node's agent) and `now` (RFC 3339; default
    /// 2026-01-01T00:00:00Z), and `expect` (weight by pod name; pods not named
    /// are not checked) or `expectError` (a substring of the error), plus
    /// optionally `expectMessage` and `expectRequeueAfterSeconds`.
    ///
    /// Prints one line per failing case, then `N passed, M failed`; exits 1
    /// when a case failed. See docs/policies.md.
    Test(PolicyTestArgs),
    /// List the policies: the built-in ones and the modules of --policy-dir
    /// (NAME.wasm, and NAME.VERSION.wasm beside it), each with its version,
    /// the interface it was built against, its sha256 and its description —
    /// or why it was refused.
    List(PolicyListArgs),
    /// Show what a policy says about itself: name, version, description and
    /// the JSON Schema of its config (modules built against interface 0.2 or
    /// later; 0.1 modules have none).
    Describe(PolicyDescribeArgs),
    /// Ask a policy whether it accepts a config, as the controller and agents
    /// do before they evaluate: prints `ok`, or each error with its JSON path
    /// (exit status 1).
    Validate(PolicyValidateArgs),
}

/// Which policy a `policy` subcommand looks at.
#[derive(Args)]
struct PolicyChoice {
    /// A policy module file (a component built for wasm32-wasip2).
    #[arg(long, value_name = "FILE.wasm", conflicts_with_all = ["policy", "version"])]
    policy_file: Option<PathBuf>,
    /// A built-in policy, or a module of --policy-dir.
    #[arg(long, value_name = "NAME")]
    policy: Option<String>,
    /// With --policy: its version (the module NAME.VERSION.wasm of --policy-dir).
    #[arg(long, value_name = "VERSION", requires = "policy")]
    version: Option<String>,
}

impl PolicyChoice {
    fn load(&self, limits: &LimitArgs) -> Result<ipvs_operator::policy::LoadedPolicy> {
        Ok(match (&self.policy_file, &self.policy) {
            (Some(path), _) => load_policy_file(limits, path)?,
            (None, Some(name)) => {
                limits.catalog()?.get(&ipvs_operator::policy::module_key(name, self.version.as_deref()))?
            }
            (None, None) => anyhow::bail!("give --policy-file or --policy"),
        })
    }
}

#[derive(Args)]
struct PolicyListArgs {
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Args)]
struct PolicyDescribeArgs {
    #[command(flatten)]
    choice: PolicyChoice,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Args)]
struct PolicyValidateArgs {
    #[command(flatten)]
    choice: PolicyChoice,
    /// The config, as `spec.policy.config` would hold it (JSON).
    #[arg(long, value_name = "JSON", default_value = "{}")]
    config: String,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Args)]
struct PolicyTestArgs {
    /// The policy module to test (a component built for wasm32-wasip2).
    #[arg(long, value_name = "FILE.wasm", required_unless_present = "policy")]
    policy_file: Option<PathBuf>,
    /// Test this built-in policy (or a module of --policy-dir) instead.
    #[arg(long, conflicts_with = "policy_file")]
    policy: Option<String>,
    /// Case files (YAML).
    #[arg(value_name = "FILE", required = true)]
    files: Vec<PathBuf>,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Args)]
struct NodeSetupArgs {
    /// Where the host's module tree is (its `<kernel release>/modules.dep` is read).
    #[arg(long, value_name = "DIR", default_value = "/lib/modules")]
    modules_dir: PathBuf,
    /// Change nothing: report what is missing (exit status 1 if anything is).
    #[arg(long)]
    check: bool,
}

#[derive(Args)]
struct CompileArgs {
    /// The parent's --policy-memory-mib.
    #[arg(long, value_name = "MIB")]
    policy_memory_mib: usize,
    /// This process's address-space limit (RLIMIT_AS), set before it reads the module.
    #[arg(long, value_name = "MIB")]
    address_space_mib: Option<usize>,
    /// The policy's name, for messages.
    #[arg(long)]
    name: String,
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

#[derive(Args)]
struct ControllerArgs {
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// How long followers wait, from the last renewal of the leader Lease
    /// they saw, before they take it over (whole seconds). Only the holder of
    /// the Lease `ipvs-operator-controller` (in POD_NAMESPACE, else `default`)
    /// reconciles; the others stand by.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    leader_elect_lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal
    /// (shorter than the lease duration).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    leader_elect_renew_deadline: Duration,
    /// How often the leader renews the Lease and followers try to take it.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    leader_elect_retry_period: Duration,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    logs: LogArgs,
}

#[derive(Args)]
struct AgentArgs {
    /// This node's name (from the downward API: spec.nodeName).
    #[arg(long, env = "NODE_NAME", value_name = "NAME", required_unless_present = "cleanup")]
    node_name: Option<String>,
    /// Remove everything the agent made on this node for the Services it
    /// serves itself (their virtual services, the ipvs-op0 interface and the
    /// `inet ipvs-operator` nftables table), then exit: what is left after
    /// uninstalling. Needs no API server.
    #[arg(long)]
    cleanup: bool,
    /// How often the kernel's table is compared with the desired state, to repair
    /// what kube-proxy reverted (IPVS has no change notifications).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    drift_interval: Duration,
    /// How the periodic comparison reads the kernel's table.
    #[arg(long, value_name = "HOW", default_value = "auto")]
    table_reader: TableReader,
    /// Give the same value as kube-proxy's --nodeport-addresses (comma-separated
    /// CIDRs): NodePort virtual services are then recognised only on node
    /// addresses in these ranges. By default, as kube-proxy: every address of
    /// the node but loopback, IPv6 link-local and those on kube-ipvs0.
    #[arg(long, value_name = "CIDRS", value_delimiter = ',', env = "NODEPORT_ADDRESSES")]
    nodeport_addresses: Vec<agent::node_addresses::Cidr>,
    /// Where to serve /metrics, /healthz and /readyz (the agent runs on the host network).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9494")]
    listen: SocketAddr,
    /// Services served by the agent itself (`spec.proxy: ipvs-operator`): a
    /// removed endpoint's destination stays at weight 0 until its TCP
    /// connections end, or this long (UDP and SCTP ones go at once; 0: every
    /// one goes at once).
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// A Service switched back to `spec.proxy: kube-proxy` is still served by
    /// the agent until kube-proxy (IPVS mode) has its addresses on kube-ipvs0,
    /// or this long: kube-proxy in other modes catches its traffic by then.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    handover_timeout: Duration,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    logs: LogArgs,
}

/// Logging.
#[derive(Args)]
struct LogArgs {
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

impl LogArgs {
    fn init(&self) {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        match self.log_format {
            LogFormat::Text => builder.init(),
            LogFormat::Json => builder.json().flatten_event(true).init(),
        }
    }
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
    /// Keep compiled policies here, so that a restart loads them instead of
    /// compiling again. The directory must be writable by this process only:
    /// what is in it is loaded as machine code.
    #[arg(long, value_name = "DIR", env = "IPVS_OPERATOR_POLICY_CACHE")]
    policy_cache: Option<PathBuf>,
    /// Policy modules: every NAME.wasm here is a policy named NAME (mount the
    /// policies ConfigMap here). Changes are picked up without a restart; a
    /// module that fails to load never replaces a working one.
    #[arg(long, value_name = "DIR")]
    policy_dir: Option<PathBuf>,
    /// Where policies are compiled: in a short-lived child process (this
    /// executable again), so that the compiler's ~20 MiB are not kept resident
    /// by a long-running process, and bounded in time and memory; or in this
    /// process, unbounded.
    #[arg(long, value_name = "WHERE", default_value = "subprocess")]
    policy_compiler: CompilerKind,
    /// Wall-clock limit of compiling one module (the compiler child is killed
    /// after it, and the module refused).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    policy_compile_timeout: std::time::Duration,
    /// Address-space limit of the compiler child, in MiB: a module whose
    /// compile needs more is refused.
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    policy_compile_memory_mib: usize,
    /// Largest policy module accepted, in bytes; a larger one is refused
    /// before it is read. (A ConfigMap holds at most 1 MiB.)
    #[arg(long, value_name = "BYTES", default_value_t = 8 << 20)]
    policy_max_module_bytes: usize,
    /// The shortest requeue-after a policy gets: one that asks to be
    /// evaluated again sooner is evaluated after this long.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    min_requeue: std::time::Duration,
}

#[derive(Clone, Copy, ValueEnum)]
enum CompilerKind {
    Subprocess,
    InProcess,
}

impl LimitArgs {
    fn engine_config(&self) -> EngineConfig {
        let compiler = match (self.policy_compiler, std::env::current_exe()) {
            (CompilerKind::Subprocess, Ok(program)) => Compiler::Subprocess {
                program,
                args: vec![
                    "compile-policy".into(),
                    "--policy-memory-mib".into(),
                    self.policy_memory_mib.to_string(),
                    "--address-space-mib".into(),
                    self.policy_compile_memory_mib.to_string(),
                ],
            },
            (CompilerKind::Subprocess, Err(error)) => {
                tracing::warn!(%error, "cannot find this executable to compile policies in a child; compiling in this process");
                Compiler::InProcess
            }
            (CompilerKind::InProcess, _) => Compiler::InProcess,
        };
        EngineConfig {
            timeout: self.policy_timeout,
            memory_limit: self.policy_memory_mib << 20,
            cache_dir: self.policy_cache.clone(),
            compiler,
            compile: CompileLimits {
                timeout: self.policy_compile_timeout,
                address_space: self.policy_compile_memory_mib << 20,
            },
            max_module_bytes: self.policy_max_module_bytes,
            min_requeue: self.min_requeue,
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

/// `ipvs-operator node-setup`.
fn node_setup(args: NodeSetupArgs) -> Result<()> {
    use ipvs_operator::node_setup::{self as setup, Outcome};
    // Prints one line; false when it failed.
    let report = |what: &str, name: &str, outcome: Result<Outcome, setup::SetupError>| {
        let (line, ok) = match outcome {
            Ok(Outcome::Loaded(file)) => (format!("loaded from {}", file.display()), true),
            Ok(Outcome::AlreadyThere) => ("already there".to_string(), true),
            Ok(Outcome::Set { was }) => (format!("set (was {was})"), true),
            Ok(Outcome::Unchanged) => ("already set".to_string(), true),
            Err(error) => (format!("FAILED: {error}"), false),
        };
        println!("{what} {name}: {line}");
        ok
    };
    let mut failed = 0;
    if args.check {
        for module in setup::MODULES {
            if std::path::Path::new("/sys/module").join(module).exists() {
                println!("module {module}: loaded");
            } else {
                failed += 1;
                println!("module {module}: not loaded");
            }
        }
        let missing = setup::missing_sysctls(std::path::Path::new("/proc/sys"));
        for (name, value, is) in &missing {
            println!("sysctl {name}: {is}, wanted {value}");
        }
        failed += missing.len();
        if failed > 0 {
            anyhow::bail!("{failed} of what standalone mode needs missing: run `ipvs-operator node-setup`");
        }
        println!("everything standalone mode needs is there");
        return Ok(());
    }
    match setup::ModuleTree::open(&args.modules_dir) {
        Ok(tree) => {
            for (module, outcome) in setup::load_modules(&tree, setup::MODULES) {
                failed += usize::from(!report("module", &module, outcome));
            }
        }
        Err(error) => failed += usize::from(!report("modules", &args.modules_dir.display().to_string(), Err(error))),
    }
    for (name, outcome) in setup::set_sysctls(std::path::Path::new("/proc/sys"), setup::SYSCTLS) {
        failed += usize::from(!report("sysctl", &name, outcome));
    }
    if failed > 0 {
        anyhow::bail!("{failed} of the node's settings could not be made (above)");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Eval(args) => run_eval(args),
        Command::Crd => print_crd(),
        Command::Controller(args) => run_async(run_controller(args)),
        Command::Agent(args) => run_async(run_agent(args)),
        Command::NodeSetup(args) => node_setup(args),
        Command::Ipvs(command) => cli_ipvs::run(command),
        Command::Policy(PolicyCommand::Test(args)) => policy_test(args),
        Command::Policy(PolicyCommand::List(args)) => policy_list(args),
        Command::Policy(PolicyCommand::Describe(args)) => policy_describe(args),
        Command::Policy(PolicyCommand::Validate(args)) => policy_validate(args),
        Command::CompilePolicy(args) => return compile_policy(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_async(future: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(future);
    // Dropping the runtime would wait for its blocking tasks, one of which
    // waits for the agent's work loop: the process would not end on SIGTERM.
    // What is in flight is abandoned, as a SIGKILL would (the agent is built
    // to be killed at any point).
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

impl LimitArgs {
    /// The built-in policies and those of `--policy-dir`.
    fn catalog(&self) -> Result<Catalog> {
        let engine = PolicyEngine::new(self.engine_config())?;
        Ok(match &self.policy_dir {
            Some(dir) => {
                anyhow::ensure!(dir.is_dir(), "--policy-dir {}: not a directory", dir.display());
                Catalog::with_dir(engine, dir)
            }
            None => Catalog::builtin(engine),
        })
    }
}

/// The API client, the policies and the metrics endpoint both roles share.
/// `role` names the client in its User-Agent (`ipvs-operator-agent/0.1.0`),
/// and `instance` (an agent's node) follows it: `ipvs-operator-agent/0.1.0
/// (node-1)`, so that an API server's audit log tells the agents apart.
async fn common(
    role: &str,
    instance: Option<&str>,
    limits: &LimitArgs,
    listen: SocketAddr,
    alive_window: Duration,
) -> Result<(kube::Client, Arc<Catalog>, Arc<Metrics>, Arc<Health>)> {
    let mut config = kube::Config::infer()
        .await
        .context("no Kubernetes API to talk to: set KUBECONFIG, or run in a pod with a ServiceAccount")?;
    if config.cluster_url.scheme_str() == Some("http") {
        // Plain HTTP needs no CA; without this, the TLS stack insists on loading
        // the system's (absent in minimal images and the test VM).
        config.root_cert = Some(Vec::new());
    }
    let mut agent = format!("ipvs-operator-{role}/{}", env!("CARGO_PKG_VERSION"));
    if let Some(instance) = instance {
        agent.push_str(&format!(" ({instance})"));
    }
    if let Ok(value) = agent.parse() {
        config.headers.push((hyper::header::USER_AGENT, value));
    }
    let client = kube::Client::try_from(config).context("creating the Kubernetes client")?;
    let metrics = Arc::new(Metrics::new());
    // /healthz is served before anything is compiled: compiles happen in the
    // catalog's loader thread, bounded by --policy-compile-timeout.
    let health = Arc::new(Health::default());
    let listener = metrics::serve(listen, metrics.clone(), health.clone(), alive_window);
    tokio::spawn(async move {
        if let Err(error) = listener.await {
            tracing::error!(%error, %listen, "cannot serve /metrics and health checks");
        }
    });
    let catalog = Arc::new(limits.catalog()?.counting(metrics.policy_dir.clone()));
    let counters = metrics.clone();
    catalog.subscribe(move |event| {
        let policy = ipvs_operator::metrics::PolicyLabels { policy: event.name().to_string() };
        match event {
            CatalogEvent::Loaded { .. } => counters.policy_loads.get_or_create(&policy).inc(),
            CatalogEvent::Failed { .. } => {
                counters.policy_load_failures.get_or_create(&policy).inc()
            }
            CatalogEvent::Retrying { .. } => {
                counters.policy_load_retries.get_or_create(&policy).inc()
            }
            CatalogEvent::Removed { .. } => 0,
        };
    });
    catalog
        .start(Duration::from_secs(60))
        .context("watching --policy-dir")?;
    Ok((client, catalog, metrics, health))
}

async fn run_controller(args: ControllerArgs) -> Result<()> {
    args.logs.init();
    let election = ipvs_operator::leader::ElectionConfig {
        namespace: ipvs_operator::leader::default_namespace(),
        name: ipvs_operator::leader::LEASE_NAME.into(),
        identity: ipvs_operator::leader::default_identity(),
        lease_duration: args.leader_elect_lease_duration,
        renew_deadline: args.leader_elect_renew_deadline,
        retry_period: args.leader_elect_retry_period,
    }
    .validated()
    .context("leader election flags")?;
    let (client, catalog, metrics, health) = common("controller", None, &args.limits, args.listen, Duration::from_secs(60)).await?;
    tracing::info!(policies = ?catalog.names(), identity = %election.identity, namespace = %election.namespace, "controller starting");
    controller::run(client, catalog, metrics, health, election).await;
    // It returns once SIGTERM or SIGINT came and in-flight reconciles ended.
    tracing::info!("signalled: stopping");
    Ok(())
}

async fn run_agent(args: AgentArgs) -> Result<()> {
    args.logs.init();
    let node_name = match (args.cleanup, args.node_name) {
        (true, _) => {
            let writes = tokio::task::spawn_blocking(agent::serving::cleanup)
                .await
                .context("the cleanup stopped")?
                .context("cleaning up what the agent made on this node")?;
            println!("cleaned up: {writes} kernel writes (virtual services, ipvs-op0 and the nftables table)");
            return Ok(());
        }
        (false, Some(name)) => name,
        (false, None) => anyhow::bail!("--node-name (or NODE_NAME) is required"),
    };
    let (client, catalog, metrics, health) = common("agent", Some(&node_name), &args.limits, args.listen, args.drift_interval * 10 + Duration::from_secs(30)).await?;
    let config = AgentConfig {
        node_name,
        drift_interval: args.drift_interval,
        drain_timeout: args.drain_timeout,
        handover_timeout: args.handover_timeout,
        table_reader: args.table_reader,
        node_port_addresses: args.nodeport_addresses,
        ..AgentConfig::default()
    };
    tracing::info!(node = %config.node_name, drift_interval = ?config.drift_interval, policies = ?catalog.names(), "agent starting");
    tokio::select! {
        result = agent::run(client, config, catalog, metrics, health) => result.context("the agent stopped")?,
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping"),
        _ = terminated() => tracing::info!("terminated: stopping"),
    }
    Ok(())
}

/// Resolves on SIGTERM (what the kubelet sends).
async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut signal) => {
            signal.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// `compile-policy`: the module on stdin, the machine code on stdout. A module
/// that does not compile is exit status 1 with only the reason on stderr (the
/// parent names the policy); running out of the address space it was given is
/// [`COMPILE_OUT_OF_MEMORY`]; anything else is status 2.
fn compile_policy(args: CompileArgs) -> ExitCode {
    use std::io::{Read, Write};
    if let Some(mib) = args.address_space_mib
        && let Err(e) = limit_address_space(mib << 20)
    {
        eprintln!("cannot limit the compiler's address space to {mib} MiB: {e}");
        return ExitCode::from(2);
    }
    // Should the container run out of memory anyway, the kernel kills this
    // process rather than the agent or controller that started it.
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    let mut bytes = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut bytes) {
        eprintln!("reading the module from stdin: {e}");
        return ExitCode::from(2);
    }
    let config = EngineConfig {
        memory_limit: args.policy_memory_mib << 20,
        ..EngineConfig::default()
    };
    match precompile_in_child(&config, &args.name, &bytes) {
        Ok(code) => match std::io::stdout().lock().write_all(&code) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("writing the machine code to stdout: {e}");
                ExitCode::from(2)
            }
        },
        // Cranelift reports a failed mmap of code memory as an error, not an abort.
        Err(PolicyError::Compile { reason, .. }) if reason.contains("Cannot allocate memory") => {
            eprintln!("{reason}");
            ExitCode::from(COMPILE_OUT_OF_MEMORY)
        }
        Err(PolicyError::Compile { reason, .. }) => {
            eprintln!("{reason}");
            ExitCode::FAILURE
        }
        Err(other) => {
            eprintln!("{other}");
            ExitCode::from(2)
        }
    }
}

/// Set this process's RLIMIT_AS (soft and hard) to `bytes`.
fn limit_address_space(bytes: usize) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct we pass and changes only this process's limits.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn print_crd() -> Result<()> {
    print!("{}", ipvs_operator::crd::crds_yaml().context("rendering the CRDs")?);
    Ok(())
}

/// A policy module from a file, named after it.
fn load_policy_file(limits: &LimitArgs, path: &std::path::Path) -> Result<ipvs_operator::policy::LoadedPolicy> {
    let engine = PolicyEngine::new(limits.engine_config())?;
    let name = path.file_stem().map_or_else(|| "policy".into(), |s| s.to_string_lossy().into_owned());
    // A module over the size limit is refused unread.
    let size = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    let limit = engine.config().max_module_bytes as u64;
    if size > limit {
        return Err(PolicyError::TooLarge { policy: name, bytes: size, limit }.into());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(engine.load(&name, &bytes)?)
}

/// `policy list`: one line per policy.
fn policy_list(args: PolicyListArgs) -> Result<()> {
    let catalog = args.limits.catalog()?;
    println!("{:<20} {:<10} {:<10} {:<12} {:<16} DESCRIPTION", "NAME", "VERSION", "INTERFACE", "SHA256", "SOURCE");
    for key in catalog.names() {
        let (name, file_version) = ipvs_operator::policy::split_key(&key);
        let source = catalog.origin(&key).unwrap_or_default();
        let described = catalog.get(&key).and_then(|policy| Ok((policy.describe()?.cloned(), policy)));
        match described {
            Ok((described, policy)) => {
                let version = file_version.or(described.as_ref().map(|d| d.version.as_str())).unwrap_or("-");
                let text = described.as_ref().map_or("(no description)", |d| d.description.as_str());
                let (interface, sha256) = (policy.interface().to_string(), &policy.sha256()[..12]);
                println!("{name:<20} {version:<10} {interface:<10} {sha256:<12} {source:<16} {text}");
            }
            Err(error) => {
                println!("{name:<20} {:<10} {:<10} {:<12} {source:<16} REFUSED: {error}", file_version.unwrap_or("-"), "-", "-")
            }
        }
    }
    Ok(())
}

/// `policy describe`: everything the policy says about itself.
fn policy_describe(args: PolicyDescribeArgs) -> Result<()> {
    let policy = args.choice.load(&args.limits)?;
    println!("interface: {}", policy.interface());
    println!("sha256: {}", policy.sha256());
    match policy.describe()? {
        None => println!("(built against interface {}: it does not describe itself)", policy.interface()),
        Some(d) => {
            println!("name: {}", d.name);
            println!("version: {}", d.version);
            println!("description: {}", d.description);
            match d.config_schema.as_deref().map(serde_json::from_str::<serde_json::Value>) {
                Some(Ok(schema)) => println!("config schema:\n{}", serde_json::to_string_pretty(&schema)?),
                Some(Err(e)) => println!("config schema: (not JSON: {e})"),
                None => println!("config schema: (none)"),
            }
        }
    }
    Ok(())
}

/// `policy validate`: the policy's verdict on a config.
fn policy_validate(args: PolicyValidateArgs) -> Result<()> {
    let config: serde_json::Value =
        serde_json::from_str(&args.config).context("--config is not JSON (it is spec.policy.config, e.g. '{\"mode\": \"share\"}')")?;
    let policy = args.choice.load(&args.limits)?;
    if policy.describe()?.is_none() {
        eprintln!("note: policy {} (interface {}) has no validate-config: any config passes here", policy.name(), policy.interface());
    }
    match policy.validate_config(&config.to_string()) {
        Ok(()) => {
            println!("ok");
            Ok(())
        }
        Err(PolicyError::ConfigInvalid { issues, .. }) => {
            for issue in &issues {
                println!("{issue}");
            }
            anyhow::bail!("policy {} refuses the config ({} error{})", policy.name(), issues.len(), if issues.len() == 1 { "" } else { "s" })
        }
        Err(error) => Err(error.into()),
    }
}

/// `policy test`: every case of every file; one line per failing case.
fn policy_test(args: PolicyTestArgs) -> Result<()> {
    use ipvs_operator::policy_test::{read_case_file, run_case};
    let policy = match (&args.policy_file, &args.policy) {
        (Some(path), _) => load_policy_file(&args.limits, path)?,
        (None, Some(name)) => args.limits.catalog()?.get(name)?,
        (None, None) => anyhow::bail!("give --policy-file or --policy"),
    };
    let (mut passed, mut failed) = (0, 0);
    for path in &args.files {
        let file = read_case_file(path)?;
        for case in &file.cases {
            match run_case(&policy, case) {
                Ok(()) => passed += 1,
                Err(why) => {
                    failed += 1;
                    println!("FAIL {}: {}: {why}", path.display(), case.name);
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        anyhow::bail!("{failed} of {} cases failed (policy {}, sha256 {})", passed + failed, policy.name(), policy.sha256());
    }
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
                "note: eval ignores these kinds in {}: {}",
                args.pods.display(),
                objects.ignored_kinds.join(", ")
            );
        }
        objects
    };

    let policy = match (&args.policy_file, &args.policy) {
        (Some(path), _) => load_policy_file(&args.limits, path)?,
        (None, Some(name)) => args.limits.catalog()?.get(name)?,
        (None, None) => args.limits.catalog()?.get(&ws.policy_key())?,
    };
    if let Some(pin) = ws.policy_sha256()
        && pin != policy.sha256()
    {
        return Err(ipvs_operator::policy::PolicyError::PinMismatch {
            policy: policy.name().into(),
            expected: pin.into(),
            actual: policy.sha256().into(),
        })
        .with_context(|| format!("WeightedService {}", ws.metadata.name.as_deref().unwrap_or_default()));
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
