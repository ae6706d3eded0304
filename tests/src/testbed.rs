//! A one-node cluster for end-to-end tests and the demo, inside the test VM:
//! the test API server, the kube-proxy emulator, the real `ipvs-operator`
//! controller and agent, pods as network-namespace backends, and a client.
//!
//! ```text
//!  root ns (test process): test API server ──mgmt veth── node ns: IPVS table,
//!  controller                                            agent, kube-proxy emulator
//!                                                         │ veth per pod    │ veth
//!                                                  pod ns: traffic-server   client ns
//! ```
//!
//! Dual-stack: the node and the client have an IPv4 and an IPv6 address on
//! their link ([`NODE_IP`], [`NODE_IP6`]; NodePorts live on both), and a pod
//! whose `status.podIPs` has an IPv6 entry gets that address too, with its
//! servers listening on `[::]` (both families). IPv6 duplicate address
//! detection is off in the namespaces with IPv6 addresses, so they work at once.
//!
//! Each testbed has namespaces of its own (the node's IPVS table included), so
//! tests run side by side in one VM. Everything is torn down on drop; when the
//! thread is panicking, the processes' logs are printed first.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use ipvs::{IpvsClient, ServiceEntry};
use serde_json::Value;
use traffic::netns::{project_binary, run, NetNs};
use traffic::Transport;

use crate::apiserver::{kubeconfig_yaml, Config, NodeConfig, TestApiServer};

/// The second node of [`Testbed::add_remote_node`].
pub const REMOTE_NODE_NAME: &str = "node-2";

/// The node every testbed has.
pub const NODE_NAME: &str = "node-1";
/// The node's address (on its link to the client): NodePorts live here.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 1);
/// The client's address (outside the cluster).
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 2);
/// The node's IPv6 address on its link to the client: IPv6 NodePorts live here.
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 1);
const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 2);
/// The node's addresses kube-proxy serves NodePorts on (its `--node-address`es).
pub const NODE_ADDRESSES: [IpAddr; 2] = [IpAddr::V4(NODE_IP), IpAddr::V6(NODE_IP6)];
/// Where pods' default route points (an address on the node's side of every pod veth).
const POD_GATEWAY: &str = "169.254.1.1";
/// Where pods' IPv6 default route points: a link-local address on the node's
/// side of every pod veth (link-local addresses are per link, so one serves all).
const POD_GATEWAY6: &str = "fe80::1";

static NEXT_ID: AtomicU8 = AtomicU8::new(0);

/// The namespace of the controllers' leader Lease (deploy/'s).
pub const CONTROLLER_NAMESPACE: &str = "ipvs-operator";

/// How a testbed runs its processes.
#[derive(Debug, Clone)]
pub struct TestbedConfig {
    /// The agent's `--drift-interval`.
    pub drift_interval: Duration,
    /// kube-proxy's scheduler (`--scheduler`).
    pub proxy_scheduler: String,
    /// kube-proxy's sync period.
    pub proxy_sync_period: Duration,
    /// kube-proxy's graceful-termination check interval.
    pub proxy_graceful_check: Duration,
    /// The agent's and the controller's `--policy-dir` (none by default).
    pub policy_dir: Option<PathBuf>,
    /// The agent's and the controller's `--policy-timeout` (by default theirs).
    pub policy_timeout: Option<Duration>,
    /// The agent's `--table-reader` (by default its own).
    pub table_reader: Option<String>,
    /// More policy flags for the agent and the controller (e.g.
    /// `--policy-compile-timeout`).
    pub policy_flags: Vec<String>,
    /// How often the API server sends watch bookmarks (by default the test
    /// API server's 5 s; a real one sends one about every minute).
    pub bookmark_interval: Option<Duration>,
    /// More flags for the agent (e.g. `--handover-timeout`).
    pub agent_flags: Vec<String>,
    /// More flags for the kube-proxy emulator (e.g. `--ipvs-exclude-cidrs`).
    pub proxy_flags: Vec<String>,
}

impl Default for TestbedConfig {
    fn default() -> Self {
        TestbedConfig {
            drift_interval: Duration::from_secs(1),
            proxy_scheduler: "rr".into(),
            proxy_sync_period: Duration::from_secs(30),
            proxy_graceful_check: Duration::from_secs(2),
            policy_dir: None,
            policy_timeout: None,
            table_reader: None,
            policy_flags: Vec::new(),
            bookmark_interval: None,
            agent_flags: Vec::new(),
            proxy_flags: Vec::new(),
        }
    }
}

/// A running process, killed on drop; its output goes to a log file.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A pod's backend: its namespace and the servers answering its name.
struct Backend {
    /// The pod's network (its servers go with it, on drop).
    namespace: NetNs,
    /// Its addresses: at most one per family (see [`pod_ips`]).
    ips: Vec<IpAddr>,
}

/// One node, its pods and a client, around the test API server.
pub struct Testbed {
    /// Short id; namespaces and interfaces are named after it.
    pub id: String,
    config: TestbedConfig,
    runtime: tokio::runtime::Runtime,
    api: Option<TestApiServer>,
    /// The node: IPVS, the agent and the emulator live here.
    pub node: NetNs,
    /// Where connections come from.
    pub client: NetNs,
    dir: tempfile::TempDir,
    mgmt_root: Ipv4Addr,
    mgmt_node: Ipv4Addr,
    backends: BTreeMap<(String, String), Backend>,
    /// The second node, when added: (its namespace, its address on the link to the node).
    remote: Option<(NetNs, Ipv4Addr)>,
    next_link: u32,
    processes: BTreeMap<&'static str, Process>,
}

impl Testbed {
    /// A testbed with the test API server running and the network built; no
    /// processes yet (see [`Testbed::start_all`]).
    pub fn new(config: TestbedConfig) -> Self {
        load_ip_vs();
        load_nftables();
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let id = format!("tb{n}");
        let dir = tempfile::Builder::new().prefix(&format!("{id}-")).tempdir().expect("a temp dir");
        let node = NetNs::new(&format!("{id}-node"));
        let client = NetNs::new(&format!("{id}-client"));
        node.sysctls(&[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ]);
        client.no_dad();
        // The management link: the root namespace (API server, controller) and the node.
        let (mgmt_root, mgmt_node) = (Ipv4Addr::new(10, 250, n, 1), Ipv4Addr::new(10, 250, n, 2));
        let root_if = format!("{id}m");
        run("ip", &["link", "add", &root_if, "type", "veth", "peer", "name", "mgmt0", "netns", &node.name]);
        run("ip", &["addr", "add", &format!("{mgmt_root}/30"), "dev", &root_if]);
        run("ip", &["link", "set", &root_if, "up"]);
        node.exec(&["ip", "addr", "add", &format!("{mgmt_node}/30"), "dev", "mgmt0"]);
        node.exec(&["ip", "link", "set", "mgmt0", "up"]);
        // The client's link: the node's address, where NodePorts live.
        traffic::netns::link(&node, "client0", &format!("{NODE_IP}/24"), &client, "eth0", &format!("{CLIENT_IP}/24"));
        client.exec(&["ip", "route", "add", "default", "via", &NODE_IP.to_string()]);
        // And its IPv6 addresses; the default route covers the IPv6 Service CIDR.
        node.exec(&["ip", "-6", "addr", "add", &format!("{NODE_IP6}/64"), "dev", "client0", "nodad"]);
        client.exec(&["ip", "-6", "addr", "add", &format!("{CLIENT_IP6}/64"), "dev", "eth0", "nodad"]);
        client.exec(&["ip", "-6", "route", "add", "default", "via", &NODE_IP6.to_string()]);

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let mut api_config = Config {
            nodes: vec![NodeConfig {
                name: NODE_NAME.into(),
                address: IpAddr::V4(NODE_IP),
                labels: [("topology.kubernetes.io/zone".to_string(), "zone-a".to_string())].into(),
            }],
            ..Config::default()
        };
        // The controllers' leader Lease is there, as deploy/ installs them.
        api_config.namespaces.push(CONTROLLER_NAMESPACE.into());
        if let Some(interval) = config.bookmark_interval {
            api_config.bookmark_interval = interval;
        }
        let api = runtime
            .block_on(TestApiServer::start_on(SocketAddr::from(([0, 0, 0, 0], 0)), api_config))
            .expect("the test API server starts");
        let port = api.addr().port();
        for (file, host) in [("kubeconfig-root", Ipv4Addr::LOCALHOST), ("kubeconfig-node", mgmt_root)] {
            std::fs::write(dir.path().join(file), kubeconfig_yaml(&format!("http://{host}:{port}"))).expect("write a kubeconfig");
        }
        Testbed {
            id,
            config,
            runtime,
            api: Some(api),
            node,
            client,
            dir,
            mgmt_root,
            mgmt_node,
            backends: BTreeMap::new(),
            remote: None,
            next_link: 0,
            processes: BTreeMap::new(),
        }
    }

    /// The test API server.
    pub fn api(&self) -> &TestApiServer {
        self.api.as_ref().expect("the API server runs until drop")
    }

    /// Its controls.
    pub fn handle(&self) -> &crate::apiserver::Handle {
        self.api().handle()
    }

    /// Run `future` on the testbed's runtime (for kube clients in tests).
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// A kube client for the API server.
    pub fn client(&self) -> kube::Client {
        let _guard = self.runtime.enter();
        self.api().client().expect("a kube client")
    }

    /// Load manifests (Deployments, WeightedServices, …) and give every pod a backend.
    pub fn load(&mut self, yaml: &str) {
        self.handle().load_manifests(yaml).expect("the manifests load");
        self.sync_backends();
    }

    /// Start the emulator, the controller and the agent.
    pub fn start_all(&mut self) {
        self.start_emulator();
        self.start_controller();
        self.start_agent();
    }

    /// Start (or restart) the kube-proxy emulator in the node.
    pub fn start_emulator(&mut self) {
        let mut args = vec!["--server".to_string(), self.url_from_node(), "--node-name".into(), NODE_NAME.into()];
        for address in NODE_ADDRESSES {
            args.extend(["--node-address".into(), address.to_string()]);
        }
        args.extend([
            "--scheduler".into(),
            self.config.proxy_scheduler.clone(),
            "--sync-period".into(),
            format!("{}ms", self.config.proxy_sync_period.as_millis()),
            "--graceful-check-interval".into(),
            format!("{}ms", self.config.proxy_graceful_check.as_millis()),
            // As kube-proxy does: ClusterIPs on a dummy interface, so that IPVS sees them as local.
            "--dummy-interface".into(),
            "kube-ipvs0".into(),
        ]);
        args.extend(self.config.proxy_flags.iter().cloned());
        self.spawn("kube-proxy", true, "kube-proxy-emulator", &args);
    }

    /// The API server's URL as seen from the node.
    fn url_from_node(&self) -> String {
        format!("http://{}:{}", self.mgmt_root, self.api().addr().port())
    }

    /// Start (or restart) the controller, in the root namespace.
    pub fn start_controller(&mut self) {
        self.start_controller_as("controller", 8080);
    }

    /// Start (or restart) another controller process next to the first: its
    /// own process `name` (for [`Testbed::kill`] and [`Testbed::log`]),
    /// listening on `port`. Controllers have no leader election: two run at
    /// once, as they do during a rolling update.
    pub fn start_controller_as(&mut self, name: &'static str, port: u16) {
        let mut args = vec!["controller".to_string(), "--listen".into(), format!("{}:{port}", self.mgmt_root)];
        args.extend(self.policy_args());
        self.spawn(name, false, "ipvs-operator", &args);
    }

    /// Who holds the controllers' leader Lease (a process name given to
    /// [`Testbed::start_controller_as`]), if anyone.
    pub fn leader(&self) -> Option<String> {
        let lease = self.get("leases", CONTROLLER_NAMESPACE, "ipvs-operator-controller")?;
        lease["spec"]["holderIdentity"].as_str().filter(|h| !h.is_empty()).map(str::to_string)
    }

    /// How this testbed runs its processes.
    pub fn config(&self) -> &TestbedConfig {
        &self.config
    }

    /// The same, to change before (re)starting a process.
    pub fn config_mut(&mut self) -> &mut TestbedConfig {
        &mut self.config
    }

    /// Start (or restart) the agent in the node.
    pub fn start_agent(&mut self) {
        let mut args = vec![
            "agent".to_string(),
            "--node-name".into(),
            NODE_NAME.into(),
            "--drift-interval".into(),
            format!("{}ms", self.config.drift_interval.as_millis()),
            "--listen".into(),
            format!("{}:9494", self.mgmt_node),
        ];
        if let Some(reader) = &self.config.table_reader {
            args.extend(["--table-reader".into(), reader.clone()]);
        }
        args.extend(self.policy_args());
        args.extend(self.config.agent_flags.iter().cloned());
        self.spawn("agent", true, "ipvs-operator", &args);
    }

    /// `--policy-dir DIR` and `--policy-timeout` when the config has them.
    fn policy_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(dir) = &self.config.policy_dir {
            args.extend(["--policy-dir".into(), dir.display().to_string()]);
        }
        if let Some(timeout) = self.config.policy_timeout {
            args.extend(["--policy-timeout".into(), format!("{}ms", timeout.as_millis())]);
        }
        args.extend(self.config.policy_flags.iter().cloned());
        args
    }

    /// Kill a process (SIGKILL), e.g. `"agent"` or `"kube-proxy"`.
    pub fn kill(&mut self, name: &str) {
        if let Some(mut p) = self.processes.remove(name) {
            p.kill();
        }
    }

    /// A running process's pid (as seen from the root namespace).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.processes.get(name).map(|p| p.child.id())
    }

    /// A process's log so far.
    pub fn log(&self, name: &str) -> String {
        self.processes.get(name).map(Process::log).unwrap_or_default()
    }

    fn spawn(&mut self, name: &'static str, in_node: bool, binary: &str, args: &[String]) {
        self.kill(name);
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("a log file");
        let kubeconfig = self.dir.path().join(if in_node { "kubeconfig-node" } else { "kubeconfig-root" });
        let program = project_binary(binary);
        let mut command = if in_node {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &self.node.name]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        if binary == "ipvs-operator" && args.first().map(String::as_str) == Some("controller") {
            // As the Deployment's downward API sets them: a restarted process
            // is the same pod, and holds the Lease it held.
            command.env("POD_NAME", name).env("POD_NAMESPACE", CONTROLLER_NAMESPACE);
        }
        command
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            // Compiling a policy takes seconds under the VM's emulated CPU: every
            // process of every testbed shares what was compiled once.
            .env("IPVS_OPERATOR_POLICY_CACHE", policy_cache_dir())
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info,kube=warn".into()))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("a log file"))
            .stderr(file);
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.processes.insert(name, Process { name: name.into(), child, log });
    }

    /// Adds a second node, [`REMOTE_NODE_NAME`], linked to the node only (IPv4):
    /// pods scheduled there get their network on it, and the node routes to
    /// them through it. It has no route to the client, as a node whose reply
    /// would go out its own default route: a connection from the client to a
    /// pod there works only when the node masquerades it.
    pub fn add_remote_node(&mut self) {
        if self.remote.is_some() {
            return;
        }
        let n = self.mgmt_node.octets()[2];
        let remote = NetNs::new(&format!("{}-node2", self.id));
        remote.sysctls(&[("net.ipv4.ip_forward", "1")]);
        let (near, far) = (Ipv4Addr::new(10, 249, n, 1), Ipv4Addr::new(10, 249, n, 2));
        traffic::netns::link(&self.node, "node2", &format!("{near}/30"), &remote, "node1", &format!("{far}/30"));
        self.remote = Some((remote, far));
    }

    /// The second node's namespace, once added.
    pub fn remote_node(&self) -> Option<&NetNs> {
        self.remote.as_ref().map(|(ns, _)| ns)
    }

    /// The network namespace of a pod with an IP (see [`Testbed::sync_backends`]).
    pub fn pod_netns(&self, namespace: &str, name: &str) -> Option<&NetNs> {
        self.backends.get(&(namespace.to_string(), name.to_string())).map(|b| &b.namespace)
    }

    /// Make the backends follow the API server's pods: a namespace with the
    /// pod's IPs (its IPv4 and IPv6 one, of `status.podIPs`) and a server per
    /// container port number (answering TCP, and UDP or SCTP too when a
    /// container port of that number has that protocol) for each pod with an
    /// IP; pods that are gone lose theirs.
    pub fn sync_backends(&mut self) {
        let pods = self.handle().list("pods", None);
        let mut seen = BTreeSet::new();
        for pod in &pods {
            let (Some(ns), Some(name)) = (pod["metadata"]["namespace"].as_str(), pod["metadata"]["name"].as_str()) else {
                continue;
            };
            let ips = pod_ips(pod);
            if ips.is_empty() {
                continue;
            }
            let key = (ns.to_string(), name.to_string());
            seen.insert(key.clone());
            if self.backends.get(&key).is_some_and(|b| b.ips == ips) {
                continue;
            }
            self.backends.remove(&key);
            let mut ports: BTreeMap<u16, BTreeSet<String>> = BTreeMap::new();
            for p in pod["spec"]["containers"].as_array().into_iter().flatten().flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default()) {
                let Some(port) = p["containerPort"].as_u64().and_then(|p| u16::try_from(p).ok()) else { continue };
                ports.entry(port).or_default().insert(p["protocol"].as_str().unwrap_or("TCP").to_string());
            }
            let remote = pod["spec"]["nodeName"].as_str() == Some(REMOTE_NODE_NAME);
            let backend = self.backend(name, ips, &ports, remote);
            self.backends.insert(key, backend);
        }
        self.backends.retain(|k, _| seen.contains(k));
    }

    fn backend(&mut self, pod: &str, ips: Vec<IpAddr>, ports: &BTreeMap<u16, BTreeSet<String>>, remote_pod: bool) -> Backend {
        self.next_link += 1;
        let n = self.next_link;
        let mut ns = NetNs::new(&format!("{}-p{n}", self.id));
        let ipv6 = ips.iter().any(IpAddr::is_ipv6);
        if ipv6 {
            // Before the veth: its end there takes the namespace's defaults.
            ns.no_dad();
        }
        // One shell per side: every `ip netns exec` costs a process and a
        // mount namespace, which add up under the VM's emulated CPU.
        let node_if = format!("p{n}");
        let mut node = vec![
            format!("ip link add {node_if} type veth peer name eth0 netns {}", ns.name),
            format!("ip addr add {POD_GATEWAY}/32 dev {node_if}"),
        ];
        if ipv6 {
            node.push(format!("ip -6 addr add {POD_GATEWAY6}/64 dev {node_if} nodad"));
        }
        node.push(format!("ip link set {node_if} up"));
        let mut pod_side = vec!["ip link set eth0 up".to_string()];
        for ip in &ips {
            match ip {
                IpAddr::V4(_) => {
                    node.push(format!("ip route add {ip}/32 dev {node_if}"));
                    pod_side.push(format!("ip addr add {ip}/32 dev eth0"));
                    pod_side.push(format!("ip route add {POD_GATEWAY} dev eth0"));
                    pod_side.push(format!("ip route add default via {POD_GATEWAY}"));
                }
                IpAddr::V6(_) => {
                    node.push(format!("ip -6 route add {ip}/128 dev {node_if}"));
                    pod_side.push(format!("ip -6 addr add {ip}/128 dev eth0 nodad"));
                    pod_side.push(format!("ip -6 route add default via {POD_GATEWAY6} dev eth0"));
                }
            }
        }
        match &self.remote {
            // On the second node; the node routes its IPv4 address there.
            Some((remote, via)) if remote_pod => {
                remote.sh(&node.join(" && "));
                let routes: Vec<String> = ips.iter().filter(|ip| ip.is_ipv4()).map(|ip| format!("ip route add {ip}/32 via {via}")).collect();
                self.node.sh(&routes.join(" && "));
            }
            _ => {
                self.node.sh(&node.join(" && "));
            }
        }
        ns.sh(&pod_side.join(" && "));
        let server = project_binary("traffic-server");
        let server = server.to_str().expect("a UTF-8 path");
        for (port, protocols) in ports {
            // `[::]` answers both families (dual-stack sockets).
            let listen = if ipv6 { format!("[::]:{port}") } else { format!("0.0.0.0:{port}") };
            let mut command = vec![server, "--listen", &listen, "--name", pod];
            if protocols.contains("UDP") {
                command.push("--udp");
            }
            if protocols.contains("SCTP") {
                load_sctp();
                command.push("--sctp");
            }
            ns.spawn_until_line(&command);
        }
        Backend { namespace: ns, ips }
    }

    /// Pod name by pod IP (each of its addresses), in `namespace`.
    pub fn pod_names_by_ip(&self, namespace: &str) -> BTreeMap<IpAddr, String> {
        let mut out = BTreeMap::new();
        for pod in self.handle().list("pods", Some(namespace)) {
            let Some(name) = pod["metadata"]["name"].as_str() else { continue };
            out.extend(pod_ips(&pod).into_iter().map(|ip| (ip, name.to_string())));
        }
        out
    }

    /// The kernel's IPVS table in the node.
    pub fn ipvs(&self) -> Vec<ServiceEntry> {
        let mut client = self.node.enter(|| IpvsClient::new().expect("IPVS in the node"));
        client.dump().expect("a dump of the node's IPVS table")
    }

    /// `ipvsadm -Ln` in the node (a tool nobody here wrote).
    pub fn ipvsadm(&self) -> String {
        self.node.ipvsadm(&["-Ln"])
    }

    /// Open `connections` TCP connections from the client to `target`, one after
    /// the other, and count which pod answered each; every one must succeed.
    ///
    /// One at a time, because least-connection schedulers (wlc, the README's)
    /// weigh a destination's *active* connections 256 times its inactive ones:
    /// with many in flight at once they balance concurrency, not new connections.
    pub fn connect(&self, target: SocketAddr, connections: usize) -> BTreeMap<String, usize> {
        let (counts, errors) = self.connect_counting_errors(target, connections);
        assert!(errors.is_empty(), "{} of {connections} connections failed: {errors:?}", errors.len());
        counts
    }

    /// Like [`Testbed::connect`], but failed connections are returned (their
    /// errors) instead of failing the test.
    pub fn connect_counting_errors(&self, target: SocketAddr, connections: usize) -> (BTreeMap<String, usize>, Vec<String>) {
        self.connect_over_counting_errors(Transport::Tcp, target, connections)
    }

    /// Like [`Testbed::connect`] over `transport`: TCP connections, UDP
    /// request/answer datagrams (each from a fresh socket, so a fresh source
    /// port and a new IPVS connection), or SCTP associations.
    pub fn connect_over(&self, transport: Transport, target: SocketAddr, connections: usize) -> BTreeMap<String, usize> {
        let (counts, errors) = self.connect_over_counting_errors(transport, target, connections);
        assert!(errors.is_empty(), "{} of {connections} {transport:?} connections to {target} failed: {errors:?}", errors.len());
        counts
    }

    /// Like [`Testbed::connect_counting_errors`] over `transport`.
    pub fn connect_over_counting_errors(&self, transport: Transport, target: SocketAddr, connections: usize) -> (BTreeMap<String, usize>, Vec<String>) {
        self.connect_from(&self.client, transport, target, connections)
    }

    /// Like [`Testbed::connect_over_counting_errors`], from another namespace
    /// (a pod's, see [`Testbed::pod_netns`], or the node's own).
    pub fn connect_from(&self, from: &NetNs, transport: Transport, target: SocketAddr, connections: usize) -> (BTreeMap<String, usize>, Vec<String>) {
        let client = project_binary("traffic-client");
        let (target, connections) = (target.to_string(), connections.to_string());
        let mut command =
            vec![client.to_str().expect("a UTF-8 path"), "--connect", &target, "--connections", &connections, "--concurrency", "1"];
        match transport {
            Transport::Tcp => {}
            Transport::Udp => command.push("--udp"),
            Transport::Sctp => {
                load_sctp();
                command.push("--sctp");
            }
        }
        let out = from.exec_output(&command);
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("traffic-client: {e}: {}", String::from_utf8_lossy(&out.stderr)));
        let counts = report["counts"]
            .as_object()
            .map(|counts| counts.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0) as usize)).collect())
            .unwrap_or_default();
        let errors = report["errors"].as_u64().unwrap_or(0) as usize;
        let samples: Vec<String> = report["error_samples"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.as_str().map(String::from))
            .collect();
        let mut described = samples;
        described.resize(errors, "(not sampled)".into());
        (counts, described)
    }

    /// An object from the API server.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.handle().get(resource, namespace, name)
    }

    /// The ClusterIP of a Service, once it has one.
    pub fn cluster_ip(&self, namespace: &str, name: &str) -> IpAddr {
        wait_until(Duration::from_secs(60), &format!("Service {namespace}/{name} to get a ClusterIP"), || {
            self.get("services", namespace, name)?["spec"]["clusterIP"].as_str()?.parse().ok()
        })
    }

    /// Every ClusterIP of a Service (`spec.clusterIPs`: one per IP family of a
    /// dual-stack Service), once it has one.
    pub fn cluster_ips(&self, namespace: &str, name: &str) -> Vec<IpAddr> {
        wait_until(Duration::from_secs(60), &format!("Service {namespace}/{name} to get a ClusterIP"), || {
            let ips = service_cluster_ips(&self.get("services", namespace, name)?);
            (!ips.is_empty()).then_some(ips)
        })
    }

    /// The IPv6 ClusterIP of a dual-stack (or IPv6) Service, once it has one.
    pub fn cluster_ip6(&self, namespace: &str, name: &str) -> Ipv6Addr {
        wait_until(Duration::from_secs(60), &format!("Service {namespace}/{name} to get an IPv6 ClusterIP"), || {
            service_cluster_ips(&self.get("services", namespace, name)?).into_iter().find_map(|ip| match ip {
                IpAddr::V6(ip) => Some(ip),
                IpAddr::V4(_) => None,
            })
        })
    }

    /// A metric of the agent (the sum over its label sets matching `labels`, e.g.
    /// `kind="weight"`), from its /metrics.
    pub fn agent_metric(&self, name: &str, labels: &str) -> Option<f64> {
        metric(&self.agent_metrics()?, name, labels)
    }

    /// The agent's /metrics, as Prometheus text.
    pub fn agent_metrics(&self) -> Option<String> {
        http_get(SocketAddr::from((self.mgmt_node, 9494)), "/metrics")
    }

    /// A metric of the controller, as [`Testbed::agent_metric`] reads the agent's.
    pub fn controller_metric(&self, name: &str, labels: &str) -> Option<f64> {
        self.controller_metric_on(8080, name, labels)
    }

    /// A metric of the controller listening on `port` (see [`Testbed::start_controller_as`]).
    pub fn controller_metric_on(&self, port: u16, name: &str, labels: &str) -> Option<f64> {
        metric_at(SocketAddr::from((self.mgmt_root, port)), name, labels)
    }

    /// Set a pod's `metadata.creationTimestamp` (RFC 3339), which the API server
    /// otherwise sets to the time the pod was loaded: e.g. pods that have been
    /// running for an hour. The object is changed in place, with no watch event:
    /// call it before starting the processes that watch pods.
    pub fn set_pod_creation_time(&self, namespace: &str, name: &str, time: &str) {
        let mut store = self.handle().store();
        let pods = crate::apiserver::resources::ids::pods();
        let pod = store.objects[pods]
            .get_mut(&(namespace.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("no pod {namespace}/{name}"));
        pod["metadata"]["creationTimestamp"] = Value::from(time);
    }

    /// Whether the agent answers /readyz with 200.
    pub fn agent_ready(&self) -> bool {
        http_status(SocketAddr::from((self.mgmt_node, 9494)), "/readyz") == Some(200)
    }

    /// Where the logs and kubeconfigs are.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every process's log, for a failure report.
    pub fn logs(&self) -> String {
        self.processes
            .values()
            .map(|p| format!("===== {} =====\n{}", p.name, p.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("testbed {} logs:\n{}\nipvsadm -Ln:\n{}", self.id, self.logs(), self.node.ipvsadm(&["-Ln"]));
        }
        self.processes.clear();
        self.backends.clear();
        if let Some(api) = self.api.take() {
            self.runtime.block_on(api.shutdown());
        }
        let _ = Command::new("ip").args(["link", "del", &format!("{}m", self.id)]).status();
    }
}

/// Where every process of every testbed keeps compiled policies
/// (`IPVS_OPERATOR_POLICY_CACHE`): compiling one takes seconds under the VM's
/// emulated CPU.
pub fn policy_cache_dir() -> PathBuf {
    std::env::temp_dir().join("ipvs-operator-policy-cache")
}

/// Loads ip_vs (the VM boots without it) and checks the kernel has it.
pub fn load_ip_vs() {
    let _ = Command::new("modprobe").arg("ip_vs").status();
    assert!(
        Path::new("/proc/net/ip_vs").exists(),
        "this kernel has no IPVS: run the end-to-end tests with `make test-kernel` (in the VM)"
    );
}

/// Loads nftables and what the agent's table uses (NAT, masquerade, conntrack
/// expressions) for Services the agent serves itself, as `node-setup` does
/// on a real node, and reject (the emulator's nftables mode). The kernel may
/// also load them on demand; this way it does not matter whether it can.
pub fn load_nftables() {
    for module in ["nf_tables", "nft_ct", "nft_chain_nat", "nft_masq", "nft_reject_ipv4", "nft_reject_ipv6"] {
        let _ = Command::new("modprobe").arg(module).status();
    }
}

/// Loads the kernel's SCTP (the VM boots without it) and checks the kernel has
/// it: a pod with an SCTP container port, or SCTP traffic, needs it.
pub fn load_sctp() {
    let _ = Command::new("modprobe").arg("sctp").status();
    assert!(
        Path::new("/proc/net/sctp").exists(),
        "this kernel has no SCTP (module sctp): the test VM's initramfs carries it (tests/vm/run)"
    );
}

/// A manifest of one running, ready pod in `default` with port 8080 named
/// `www`, at a fixed IP on `node` (for [`Testbed::load`]).
pub fn pod_manifest(name: &str, labels: &[(&str, &str)], node: &str, ip: &str) -> String {
    pod_manifest_with_ips(name, labels, node, &[ip])
}

/// [`pod_manifest`] of a dual-stack pod: `status.podIP` is `ip` (IPv4) and
/// `status.podIPs` has `ip` and `ip6` (IPv6), as a dual-stack cluster gives them.
pub fn dual_stack_pod_manifest(name: &str, labels: &[(&str, &str)], node: &str, ip: &str, ip6: &str) -> String {
    pod_manifest_with_ips(name, labels, node, &[ip, ip6])
}

/// [`pod_manifest`] with `status.podIPs` = `ips` (the first is `status.podIP`).
fn pod_manifest_with_ips(name: &str, labels: &[(&str, &str)], node: &str, ips: &[&str]) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let pod_ips: Vec<String> = ips.iter().map(|ip| format!("{{ip: \"{ip}\"}}")).collect();
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{{labels}}}}}
spec:
  nodeName: {node}
  containers:
  - name: web
    image: web
    ports: [{{name: www, containerPort: 8080, protocol: TCP}}]
status:
  phase: Running
  podIP: "{ip}"
  podIPs: [{pod_ips}]
  conditions: [{{type: Ready, status: "True"}}]
---
"#,
        labels = labels.join(", "),
        ip = ips.first().copied().unwrap_or_default(),
        pod_ips = pod_ips.join(", "),
    )
}

/// A pod's addresses: `status.podIP` and the entries of `status.podIPs`, at
/// most one per IP family (the first of each), IPv4 first.
pub fn pod_ips(pod: &Value) -> Vec<IpAddr> {
    let listed = pod["status"]["podIPs"].as_array().into_iter().flatten().map(|entry| &entry["ip"]);
    let all: Vec<IpAddr> =
        std::iter::once(&pod["status"]["podIP"]).chain(listed).filter_map(|ip| ip.as_str()?.parse().ok()).collect();
    let v4 = all.iter().find(|ip| ip.is_ipv4());
    let v6 = all.iter().find(|ip| ip.is_ipv6());
    v4.into_iter().chain(v6).copied().collect()
}

/// A Service's ClusterIPs: `spec.clusterIPs`, or `spec.clusterIP` alone when
/// it has none (neither `None` nor `""` is an address).
pub fn service_cluster_ips(service: &Value) -> Vec<IpAddr> {
    let listed: Vec<IpAddr> = service["spec"]["clusterIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.as_str()?.parse().ok())
        .collect();
    if !listed.is_empty() {
        return listed;
    }
    service["spec"]["clusterIP"].as_str().and_then(|ip| ip.parse().ok()).into_iter().collect()
}

/// Poll `check` every 100 ms until it gives a value, or panic after `timeout`
/// saying what was awaited.
pub fn wait_until<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The sum of the samples of metric `name` whose labels contain `labels`.
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, l)) => (n, l),
            None => (series, ""),
        };
        if series_name == name && series_labels.contains(labels) {
            *found.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    found
}

/// A metric of the process serving `/metrics` at `addr`, as [`metric`] reads it.
pub fn metric_at(addr: SocketAddr, name: &str, labels: &str) -> Option<f64> {
    metric(&http_get(addr, "/metrics")?, name, labels)
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let response = http(addr, path)?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    Some(body.to_string())
}

fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    http(addr, path)?.split_whitespace().nth(1)?.parse().ok()
}

fn http(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_matching_series() {
        let text = "# HELP x\nipvs_operator_netlink_writes_total{kind=\"weight\"} 3\nipvs_operator_netlink_writes_total{kind=\"scheduler\"} 2\nother 1\n";
        assert_eq!(metric(text, "ipvs_operator_netlink_writes_total", ""), Some(5.0));
        assert_eq!(metric(text, "ipvs_operator_netlink_writes_total", "kind=\"weight\""), Some(3.0));
        assert_eq!(metric(text, "missing", ""), None);
    }

    #[test]
    fn a_dual_stack_pod_manifest_gives_both_addresses() {
        let yaml = dual_stack_pod_manifest("web-1", &[("app", "web")], NODE_NAME, "10.244.9.21", "fd00:10:244::9:21");
        let pod: Value = serde_saphyr::from_str(yaml.trim_end().trim_end_matches("---")).expect("the manifest is YAML");
        assert_eq!(pod["status"]["podIP"], "10.244.9.21");
        assert_eq!(pod["status"]["podIPs"], serde_json::json!([{"ip": "10.244.9.21"}, {"ip": "fd00:10:244::9:21"}]));
        let ips: Vec<String> = pod_ips(&pod).iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.244.9.21", "fd00:10:244::9:21"]);
        // The single-stack manifest has its one address in both fields.
        let yaml = pod_manifest("web-2", &[], NODE_NAME, "10.244.9.22");
        let pod: Value = serde_saphyr::from_str(yaml.trim_end().trim_end_matches("---")).expect("the manifest is YAML");
        assert_eq!(pod_ips(&pod), [IpAddr::V4(Ipv4Addr::new(10, 244, 9, 22))]);
    }

    #[test]
    fn a_pod_has_one_address_per_family_and_a_service_its_cluster_ips() {
        let listed = serde_json::json!([{"ip": "fd00::5"}, {"ip": "10.0.0.5"}, {"ip": "10.0.0.6"}]);
        let pod = serde_json::json!({"status": {"podIP": "fd00::5", "podIPs": listed}});
        let ips: Vec<String> = pod_ips(&pod).iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.0.0.5", "fd00::5"]);
        assert!(pod_ips(&serde_json::json!({"status": {"phase": "Pending"}})).is_empty());
        let dual = serde_json::json!({"spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:10:96::a"]}});
        let ips: Vec<String> = service_cluster_ips(&dual).iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.96.0.10", "fd00:10:96::a"]);
        assert_eq!(service_cluster_ips(&serde_json::json!({"spec": {"clusterIP": "10.96.0.11"}})).len(), 1);
        let headless = serde_json::json!({"spec": {"clusterIP": "None", "clusterIPs": ["None"]}});
        assert!(service_cluster_ips(&headless).is_empty());
    }
}
