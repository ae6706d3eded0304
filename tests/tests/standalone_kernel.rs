//! Standalone mode (`spec.proxy: ipvs-operator`) against the real kernel, in
//! the test VM (`make test-kernel`): the dummy interface that holds
//! standalone Services' addresses, made, adopted, corrected and removed over
//! rtnetlink, as `ip` (a tool nobody here wrote) sees it, and real
//! connections through an owned virtual service at an address on it; then the
//! real controller and agent serving a WeightedService's Service with no
//! kube-proxy at all, across an agent restart and its deletion, and handing
//! it over to kube-proxy (the emulator, IPVS mode) without a failed connection.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use ipvs::{IpvsClient, OwnedService, Service as VirtualService, ServiceKey, plan_owned};
use ipvs_operator::agent::interface::{AddressChanges, INTERFACE, Interface, connect};
use ipvs_operator_tests::testbed::{NODE_IP, Testbed, TestbedConfig, pod_manifest, wait_until};
use traffic::netns::{NetNs, link, project_binary};

const TIMEOUT: Duration = Duration::from_secs(90);

/// `ip ARGS…`'s output; panics when it fails.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The addresses, with their prefix lengths, in `ip -o addr show` output.
fn addresses_in(listing: &str) -> BTreeSet<String> {
    listing
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            words.next().map(str::to_string)
        })
        .collect()
}

/// The addresses `ip` lists on the interface, with their prefix lengths.
fn listed() -> BTreeSet<String> {
    addresses_in(&ip(&["-o", "addr", "show", "dev", INTERFACE]))
}

fn set(addresses: &[&str]) -> BTreeSet<IpAddr> {
    addresses.iter().map(|a| a.parse().expect("an address")).collect()
}

#[tokio::test]
async fn the_dummy_interface_holds_exactly_the_wanted_addresses_and_is_adopted_after_a_restart() {
    let _ = Command::new("ip").args(["link", "del", INTERFACE]).status();
    let interface = Interface::ensure(connect().expect("rtnetlink"), INTERFACE).await.expect("made");
    let link = ip(&["-d", "link", "show", INTERFACE]);
    assert!(link.contains("dummy"), "{link}");

    let wanted = set(&["10.96.0.10", "192.0.2.7", "fd00::10"]);
    let changes = interface.sync(&wanted).await.expect("addresses added");
    assert_eq!(changes.added.len(), 3, "{changes:?}");
    let expected: BTreeSet<String> = ["10.96.0.10/32", "192.0.2.7/32", "fd00::10/128"].map(String::from).into();
    assert_eq!(listed(), expected, "host addresses only, no range");
    assert_eq!(interface.sync(&wanted).await.expect("again"), AddressChanges::default(), "nothing to do: nothing done");

    // A restarted agent adopts the interface and what it holds.
    let index = interface.index();
    drop(interface);
    let adopted = Interface::ensure(connect().expect("rtnetlink"), INTERFACE).await.expect("adopted");
    assert_eq!(adopted.index(), index, "the same interface");
    // Someone adds an address by hand: it goes, as does one no longer wanted.
    ip(&["addr", "add", "10.96.0.99/32", "dev", INTERFACE]);
    let changes = adopted.sync(&set(&["10.96.0.10", "fd00::10"])).await.expect("corrected");
    let removed: BTreeSet<IpAddr> = changes.removed.iter().copied().collect();
    assert_eq!((changes.added, removed), (vec![], set(&["10.96.0.99", "192.0.2.7"])));
    assert_eq!(listed(), ["10.96.0.10/32", "fd00::10/128"].map(String::from).into());

    adopted.delete().await.expect("deleted");
    let gone = Command::new("ip").args(["link", "show", INTERFACE]).output().expect("running ip");
    assert!(!gone.status.success(), "the interface is gone");
    assert!(Interface::existing(connect().expect("rtnetlink"), INTERFACE).await.expect("looked up").is_none());
}

/// `traffic-client` in `ns`: `connections` TCP connections to `target`; the share each backend answered.
fn shares(ns: &NetNs, target: &str, connections: usize) -> BTreeMap<String, f64> {
    let client = project_binary("traffic-client");
    let n = connections.to_string();
    let json = ns.exec(&[client.to_str().expect("a UTF-8 path"), "--connect", target, "--connections", &n, "--concurrency", "4"]);
    let report: serde_json::Value = serde_json::from_str(&json).expect("the client's JSON");
    assert_eq!(report["errors"], 0, "{report}");
    let counts = report["counts"].as_object().expect("counts");
    counts.iter().map(|(name, c)| (name.clone(), c.as_f64().unwrap_or(0.0) / connections as f64)).collect()
}

#[tokio::test]
async fn connections_to_an_address_on_the_down_dummy_interface_follow_the_owned_weights() {
    // A client "pod" and two backend "pods" routed through a node that holds
    // the VIP on ipvs-op0 (made by us, left down, as kube-ipvs0 is).
    let node = NetNs::new("sk-node");
    let client = NetNs::new("sk-client");
    node.no_dad();
    client.no_dad();
    link(&client, "eth0", "10.40.0.2/24", &node, "to-client", "10.40.0.1/24");
    client.exec(&["ip", "route", "add", "default", "via", "10.40.0.1"]);
    client.exec(&["ip", "addr", "add", "fd00:40::2/64", "dev", "eth0", "nodad"]);
    node.exec(&["ip", "addr", "add", "fd00:40::1/64", "dev", "to-client", "nodad"]);
    client.exec(&["ip", "-6", "route", "add", "default", "via", "fd00:40::1"]);
    node.sysctls(&[("net.ipv4.ip_forward", "1"), ("net.ipv6.conf.all.forwarding", "1")]);
    let server = project_binary("traffic-server");
    let mut backends = Vec::new();
    for i in 1..=2 {
        let mut be = NetNs::new(&format!("sk-b{i}"));
        link(&be, "eth0", &format!("10.41.{i}.2/24"), &node, &format!("to-b{i}"), &format!("10.41.{i}.1/24"));
        be.exec(&["ip", "route", "add", "default", "via", &format!("10.41.{i}.1")]);
        be.exec(&["ip", "addr", "add", &format!("fd00:41:{i}::2/64"), "dev", "eth0", "nodad"]);
        node.exec(&["ip", "addr", "add", &format!("fd00:41:{i}::1/64"), "dev", &format!("to-b{i}"), "nodad"]);
        be.exec(&["ip", "-6", "route", "add", "default", "via", &format!("fd00:41:{i}::1")]);
        let name = format!("backend-{i}");
        let line = be.spawn_until_line(&[server.to_str().expect("a UTF-8 path"), "--listen", "[::]:8080", "--name", &name]);
        assert!(line.starts_with("listening"), "{line}");
        backends.push(be);
    }
    let handle = node.enter(connect).expect("rtnetlink in the node");
    let interface = Interface::ensure(handle, INTERFACE).await.expect("made");
    interface.sync(&set(&["10.96.0.10", "fd00:96::10"])).await.expect("the VIPs");
    let link = node.exec(&["ip", "link", "show", INTERFACE]);
    assert!(link.contains("state DOWN"), "left down: {link}");

    let vip = ServiceKey::tcp("10.96.0.10:80".parse().expect("an address"));
    let vip6 = ServiceKey::tcp("[fd00:96::10]:80".parse().expect("an address"));
    let owned = |key: ServiceKey, weights: &[(&str, u16)]| OwnedService {
        service: VirtualService::new(key, "wrr"),
        destinations: weights.iter().map(|(a, w)| (a.parse().expect("an address"), *w)).collect(),
    };
    let want = |weights: &[(&str, u16)]| owned(vip, weights);
    let v6 = owned(vip6, &[("[fd00:41:1::2]:8080", 3), ("[fd00:41:2::2]:8080", 1)]);
    let mut ipvs = node.enter(IpvsClient::new).expect("IPVS in the node");
    let mut converge = |desired: &[OwnedService]| {
        let plan = plan_owned(desired, &ipvs.dump().expect("dump"), |k| *k == vip || *k == vip6, |_, _| false);
        assert!(ipvs.apply(&plan.writes).iter().all(Result::is_ok), "{plan:?}");
    };
    converge(&[want(&[("10.41.1.2:8080", 3), ("10.41.2.2:8080", 1)]), v6.clone()]);

    // From a pod on another path (forwarded) and from the node itself (host network), both families.
    for (who, ns) in [("a pod", &client), ("the node", &node)] {
        for target in ["10.96.0.10:80", "[fd00:96::10]:80"] {
            let split = shares(ns, target, 400);
            let one = split.get("backend-1").copied().unwrap_or(0.0);
            assert!((one - 0.75).abs() <= 0.06, "from {who} to {target}: backend-1 has {one:.2} of {split:?}, weights 3:1");
        }
    }

    // Backend 2 removed (idle: deleted at once); every connection goes to backend 1.
    converge(&[want(&[("10.41.1.2:8080", 3)])]);
    assert_eq!(shares(&client, "10.96.0.10:80", 50).get("backend-1").copied(), Some(1.0));
    converge(&[]);
    interface.delete().await.expect("deleted");
    drop(backends);
}

/// Three pods behind `web` (prod 3, canary 1), served by the agents
/// themselves; `{extra}` adds to the spec.
fn served(extra: &str) -> String {
    let mut yaml = String::new();
    for (name, env, n) in [("prod-a", "prod", 11), ("prod-b", "prod", 12), ("canary-a", "canary", 13)] {
        yaml += &pod_manifest(name, &[("app", "web"), ("env", env)], "node-1", &format!("10.244.0.{n}"));
    }
    yaml + &format!(
        r#"
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {{name: web, namespace: default}}
spec:
  proxy: ipvs-operator
  clusterIP: 10.96.100.10
  selector: {{app: web}}
  weights:
  - {{weight: 3, selector: {{env: prod}}}}
  - {{weight: 1, selector: {{env: canary}}}}
{extra}
"#
    )
}

/// The scheduler, flags and weights by pod of the node's virtual service at `vip`.
fn virtual_service(bed: &Testbed, key: ServiceKey) -> Option<(String, u32, BTreeMap<String, u32>)> {
    let entry = bed.ipvs().into_iter().find(|e| e.service.key == key)?;
    let by_ip = bed.pod_names_by_ip("default");
    let weights = entry
        .destinations
        .iter()
        .map(|d| (by_ip.get(&d.socket_addr().ip()).cloned().unwrap_or_else(|| d.socket_addr().to_string()), d.weight))
        .collect();
    Some((entry.service.scheduler, entry.service.timeout, weights))
}

fn wait_for_weights(bed: &Testbed, key: ServiceKey, want: &[(&str, u32)]) {
    let want: BTreeMap<String, u32> = want.iter().map(|(p, w)| (p.to_string(), *w)).collect();
    wait_until(TIMEOUT, &format!("{key} at {want:?}"), || {
        let (_, _, weights) = virtual_service(bed, key)?;
        (weights == want).then_some(())
    });
}

/// The addresses on `interface` in the node (empty when it does not exist).
fn node_addresses_on(bed: &Testbed, interface: &str) -> Option<BTreeSet<String>> {
    let out = bed.node.exec_output(&["ip", "-o", "addr", "show", "dev", interface]);
    out.status.success().then(|| addresses_in(&String::from_utf8_lossy(&out.stdout)))
}

fn assert_split(what: &str, counts: &BTreeMap<String, usize>) {
    let total: usize = counts.values().sum();
    for (pod, want) in [("prod-a", 3.0 / 7.0), ("prod-b", 3.0 / 7.0), ("canary-a", 1.0 / 7.0)] {
        let got = counts.get(pod).copied().unwrap_or(0) as f64 / total as f64;
        assert!((got - want).abs() <= 0.05, "{what}: {pod} got {got:.3}, expected {want:.3} ({counts:?})");
    }
}

/// The agent's writes of `kind` so far (0 before the first).
fn agent_writes(bed: &Testbed, kind: &str) -> f64 {
    bed.agent_metric("ipvs_operator_netlink_writes_total", &format!("kind=\"{kind}\"")).unwrap_or(0.0)
}

fn patch_proxy(bed: &Testbed, proxy: &str) {
    use ipvs_operator::crd::WeightedService;
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<WeightedService> = Api::namespaced(bed.client(), "default");
    let patch = serde_json::json!({"spec": {"proxy": proxy}});
    bed.block_on(api.patch("web", &PatchParams::default(), &Patch::Merge(&patch))).expect("patching the WeightedService");
}

/// Serves, at `ip:9000` in `ns`, connections that stay open: each line in is
/// answered with `name`.
fn hold_server(ns: &NetNs, ip: &str, name: &str) {
    use std::io::{BufRead, BufReader, Write};
    let listener = ns.enter(|| std::net::TcpListener::bind((ip, 9000))).expect("listening on port 9000");
    let name = name.to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let name = name.clone();
            std::thread::spawn(move || {
                let Ok(mut writer) = stream.try_clone() else { return };
                for line in BufReader::new(stream).lines() {
                    if line.is_err() || writeln!(writer, "{name}").is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// One line's round trip on `stream`: who answered.
fn ask(stream: &mut std::net::TcpStream) -> String {
    use std::io::{BufRead, BufReader, Write};
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("a read timeout");
    writeln!(stream, "?").expect("sending a line");
    let mut line = String::new();
    BufReader::new(stream.try_clone().expect("a clone")).read_line(&mut line).expect("an answer");
    line.trim().to_string()
}

/// A connection from the client to `target` that stays open, and who answers on it.
fn held_connection(bed: &Testbed, target: SocketAddr) -> (String, std::net::TcpStream) {
    let mut stream = bed.client.enter(|| std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))).expect("connected");
    (ask(&mut stream), stream)
}

#[test]
fn with_no_kube_proxy_the_agent_serves_the_cluster_ip_and_node_port_adopts_after_a_restart_and_cleans_up() {
    let mut bed = Testbed::new(TestbedConfig::default());
    bed.load(&served(
        "  type: NodePort\n  ports: [{name: www, protocol: TCP, port: 80, targetPort: www, nodePort: 30080}, {name: hold, protocol: TCP, port: 90, targetPort: 9000, nodePort: 30090}]",
    ));
    // Port 9000 of each pod keeps its connections open (port 8080's server closes each after answering).
    for pod in ["prod-a", "prod-b", "canary-a"] {
        let ip = format!("10.244.0.{}", 11 + ["prod-a", "prod-b", "canary-a"].iter().position(|p| *p == pod).unwrap_or(0));
        hold_server(bed.pod_netns("default", pod).expect("the pod's network"), &ip, pod);
    }
    bed.start_controller();
    bed.start_agent();
    let vip = ServiceKey::tcp("10.96.100.10:80".parse().expect("an address"));
    let node_port = ServiceKey::tcp(SocketAddr::new(IpAddr::V4(NODE_IP), 30080));
    let split = [("canary-a", 1), ("prod-a", 3), ("prod-b", 3)];
    wait_for_weights(&bed, vip, &split);
    wait_for_weights(&bed, node_port, &split);
    let service = bed.get("services", "default", "web").expect("the Service");
    assert_eq!(service["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"], "ipvs-operator");
    assert_eq!(node_addresses_on(&bed, INTERFACE), Some(["10.96.100.10/32".to_string()].into()));
    let (scheduler, timeout, _) = virtual_service(&bed, vip).expect("the virtual service");
    assert_eq!((scheduler.as_str(), timeout), ("wrr", 0), "wrr by default, no persistence");
    assert_split("ClusterIP", &bed.connect(SocketAddr::from(([10, 96, 100, 10], 80)), 700));
    assert_split("NodePort", &bed.connect(SocketAddr::new(IpAddr::V4(NODE_IP), 30080), 700));

    // A restarted agent adopts what is there: it writes nothing, and a
    // connection open across the restart lives on.
    let hold = SocketAddr::from(([10, 96, 100, 10], 90));
    let (answered_by, mut across) = held_connection(&bed, hold);
    bed.kill("agent");
    bed.start_agent();
    wait_until(TIMEOUT, "the restarted agent ready", || bed.agent_ready().then_some(()));
    std::thread::sleep(Duration::from_secs(3));
    for kind in ["virtual_service", "destination", "weight", "scheduler", "address", "nftables"] {
        assert_eq!(agent_writes(&bed, kind), 0.0, "{kind} written after a restart: {}", bed.log("agent"));
    }
    assert_eq!(ipvs_operator_tests::consistency::standalone_orphans(&bed, false), Vec::<String>::new());
    assert_eq!(ask(&mut across), answered_by, "a connection across the agent's restart");
    drop(across);

    // A ready pod gone: its destination drains at weight 0 (the connections
    // above are still in the table), the others stay; an established
    // connection to it lives on, and new ones go elsewhere.
    let mut held = None;
    for _ in 0..30 {
        let (answered_by, stream) = held_connection(&bed, hold);
        if answered_by == "prod-b" {
            held = Some(stream);
            break;
        }
    }
    let mut held = held.expect("one of 30 connections on prod-b");
    bed.handle().delete_pod("default", "prod-b", ipvs_operator_tests::apiserver::Grace::Immediate).expect("deleted");
    // (The pod is gone from the API: its destination shows by address.)
    wait_for_weights(&bed, vip, &[("canary-a", 1), ("prod-a", 3), ("10.244.0.12:8080", 0)]);
    let hold_key = ServiceKey::tcp(hold);
    wait_for_weights(&bed, hold_key, &[("canary-a", 1), ("prod-a", 3), ("10.244.0.12:9000", 0)]);
    assert_eq!(ask(&mut held), "prod-b", "the established connection lives on while its destination drains");
    for _ in 0..20 {
        let (answered_by, _) = held_connection(&bed, hold);
        assert_ne!(answered_by, "prod-b", "a new connection went to the draining destination");
    }
    drop(held);

    // The WeightedService deleted: nothing of it is left on the node.
    use ipvs_operator::crd::WeightedService;
    let api: kube::Api<WeightedService> = kube::Api::namespaced(bed.client(), "default");
    bed.block_on(api.delete("web", &Default::default())).expect("deleted");
    wait_until(TIMEOUT, "nothing left", || {
        (node_addresses_on(&bed, INTERFACE).is_none() && bed.ipvs().is_empty() && nft_table(&bed).is_none()).then_some(())
    });
    assert_eq!(bed.ipvsadm().lines().filter(|l| l.starts_with("TCP") || l.starts_with("UDP")).count(), 0, "{}", bed.ipvsadm());
}

#[test]
fn switched_back_to_kube_proxy_a_service_is_handed_over_without_a_failed_connection() {
    // kube-proxy in IPVS mode beside it, leaving the range of standalone
    // ClusterIPs alone (--ipvs-exclude-cidrs), as the docs tell users to.
    let mut bed = Testbed::new(TestbedConfig {
        proxy_scheduler: "wrr".into(),
        proxy_flags: vec!["--ipvs-exclude-cidrs".into(), "10.96.100.0/24".into()],
        ..TestbedConfig::default()
    });
    bed.load(&served("  ports: [{protocol: TCP, port: 80, targetPort: www}]"));
    bed.start_all();
    let vip = ServiceKey::tcp("10.96.100.10:80".parse().expect("an address"));
    wait_for_weights(&bed, vip, &[("canary-a", 1), ("prod-a", 3), ("prod-b", 3)]);
    assert!(!node_addresses_on(&bed, "kube-ipvs0").unwrap_or_default().contains("10.96.100.10/32"), "kube-proxy skips it");
    assert_split("served by the agent", &bed.connect(SocketAddr::from(([10, 96, 100, 10], 80)), 700));

    // kube-proxy sees the Service without the label before its EndpointSlices
    // (the EndpointSlice controller copies the label over after): for that
    // moment it has no endpoints and drains every destination, as real
    // kube-proxy does. New connections fail until its next sync, and no longer.
    patch_proxy(&bed, "kube-proxy");
    let started = Instant::now();
    let mut failures: Vec<(Duration, String)> = Vec::new();
    let mut connections = 0;
    let mut handed_over: Option<Instant> = None;
    while handed_over.is_none_or(|at| at.elapsed() < Duration::from_secs(2)) {
        assert!(started.elapsed() < TIMEOUT, "not handed over: {}", bed.logs());
        let (counts, errors) = bed.connect_counting_errors(SocketAddr::from(([10, 96, 100, 10], 80)), 2);
        connections += counts.values().sum::<usize>() + errors.len();
        failures.extend(errors.into_iter().map(|e| (started.elapsed(), e)));
        if handed_over.is_none() && node_addresses_on(&bed, INTERFACE).is_none() {
            handed_over = Some(Instant::now());
        }
    }
    let window = match (failures.first(), failures.last()) {
        (Some((first, _)), Some((last, _))) => *last - *first,
        _ => Duration::ZERO,
    };
    eprintln!("handover: {} of {connections} connections failed, within {window:?}", failures.len());
    assert!(window < Duration::from_secs(2), "connections failed for {window:?}, longer than one kube-proxy sync: {failures:?}");
    assert!(node_addresses_on(&bed, "kube-ipvs0").unwrap_or_default().contains("10.96.100.10/32"), "kube-proxy has it");
    wait_until(TIMEOUT, "the agent's table gone", || nft_table(&bed).is_none().then_some(()));
    // kube-proxy's now, weighted by the agent as any other.
    wait_for_weights(&bed, vip, &[("canary-a", 1), ("prod-a", 3), ("prod-b", 3)]);
    assert_split("served by kube-proxy", &bed.connect(SocketAddr::from(([10, 96, 100, 10], 80)), 700));
}

/// A pod with a TCP port `www` (8080) and a UDP port `dns` (5353).
fn tcp_udp_pod(name: &str, env: &str, node: &str, ip: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: mixed, env: {env}}}}}
spec:
  nodeName: {node}
  containers:
  - name: server
    image: server
    ports: [{{name: www, containerPort: 8080, protocol: TCP}}, {{name: dns, containerPort: 5353, protocol: UDP}}]
status:
  phase: Running
  podIP: "{ip}"
  podIPs: [{{ip: "{ip}"}}]
  conditions: [{{type: Ready, status: "True"}}]
---
"#
    )
}

#[test]
fn served_here_udp_client_ip_affinity_external_ips_and_local_traffic_follow_kube_proxys_rules() {
    use traffic::Transport;
    let mut bed = Testbed::new(TestbedConfig::default());
    let mut yaml = String::new();
    for (name, env, node, ip) in [("prod-a", "prod", "node-1", "10.244.0.21"), ("canary-a", "canary", "node-1", "10.244.0.22"), ("prod-r", "prod", "node-2", "10.244.0.23")] {
        yaml += &tcp_udp_pod(name, env, node, ip);
    }
    yaml += r#"
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: mixed, namespace: default}
spec:
  proxy: ipvs-operator
  type: NodePort
  clusterIP: 10.96.100.20
  externalIPs: [192.0.2.30]
  externalTrafficPolicy: Local
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  selector: {app: mixed}
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: www, nodePort: 30090}
  - {name: dns, protocol: UDP, port: 53, targetPort: dns, nodePort: 30053}
  weights:
  - {weight: 3, selector: {env: prod}}
  - {weight: 1, selector: {env: canary}}
"#;
    bed.load(&yaml);
    bed.start_controller();
    bed.start_agent();
    let key = |protocol: ipvs::Protocol, address: &str| ServiceKey::new(protocol, address.parse().expect("an address"));
    let everywhere = [("canary-a", 1), ("prod-a", 3), ("prod-r", 3)];
    let local = [("canary-a", 1), ("prod-a", 3)];
    // Behind the ClusterIP every endpoint; behind the external IP and the
    // NodePorts (externalTrafficPolicy: Local) only this node's. TCP and UDP.
    wait_for_weights(&bed, key(ipvs::Protocol::Tcp, "10.96.100.20:80"), &everywhere);
    wait_for_weights(&bed, key(ipvs::Protocol::Udp, "10.96.100.20:53"), &everywhere);
    wait_for_weights(&bed, key(ipvs::Protocol::Tcp, "192.0.2.30:80"), &local);
    wait_for_weights(&bed, key(ipvs::Protocol::Tcp, &format!("{NODE_IP}:30090")), &local);
    wait_for_weights(&bed, key(ipvs::Protocol::Udp, &format!("{NODE_IP}:30053")), &local);
    let (_, timeout, _) = virtual_service(&bed, key(ipvs::Protocol::Udp, "10.96.100.20:53")).expect("the UDP virtual service");
    assert_eq!(timeout, 60, "ClientIP affinity: persistence with the Service's timeout");
    assert_eq!(
        node_addresses_on(&bed, INTERFACE),
        Some(["10.96.100.20/32".to_string(), "192.0.2.30/32".to_string()].into()),
        "the ClusterIP and the external IP, not the node's own"
    );

    // One client stays on one pod (TCP and UDP), and outside traffic stays on this node's pods.
    for (transport, target, local_only) in [
        (Transport::Tcp, "10.96.100.20:80", false),
        (Transport::Udp, "10.96.100.20:53", false),
        (Transport::Tcp, "192.0.2.30:80", true),
        (Transport::Udp, &format!("{NODE_IP}:30053"), true),
    ] {
        let counts = bed.connect_over(transport, target.parse().expect("an address"), 30);
        assert_eq!(counts.len(), 1, "{transport:?} {target}: one client, one pod under ClientIP affinity: {counts:?}");
        if local_only {
            assert!(counts.keys().all(|pod| pod != "prod-r"), "{target}: externalTrafficPolicy Local: {counts:?}");
        }
    }
}

/// `nft list table inet ipvs-operator` in the node (nftables' own tool), or
/// `None` when there is no such table.
fn nft_table(bed: &Testbed) -> Option<String> {
    let out = bed.node.exec_output(&["nft", "list", "table", "inet", "ipvs-operator"]);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn replies_that_would_bypass_the_node_are_masqueraded_the_table_is_adopted_and_cleanup_leaves_nothing() {
    use ipvs_operator_tests::testbed::{CLIENT_IP, REMOTE_NODE_NAME};
    use traffic::Transport;
    let mut bed = Testbed::new(TestbedConfig::default());
    // As node-setup sets it: netfilter sees IPVS connections, to masquerade them.
    bed.node.sysctls(&[("net.ipv4.vs.conntrack", "1")]);
    bed.add_remote_node();
    let mut yaml = pod_manifest("far-a", &[("app", "far")], REMOTE_NODE_NAME, "10.244.0.31");
    yaml += &pod_manifest("solo-a", &[("app", "solo")], "node-1", "10.244.0.32");
    for (name, ip, extra) in [
        ("far", "10.96.100.30", "  type: NodePort\n  ports: [{protocol: TCP, port: 80, targetPort: www, nodePort: 30082}]"),
        ("solo", "10.96.100.31", "  ports: [{protocol: TCP, port: 80, targetPort: www}]"),
    ] {
        yaml += &format!(
            "apiVersion: codesink.net/v1alpha1\nkind: WeightedService\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  proxy: ipvs-operator\n  clusterIP: {ip}\n  selector: {{app: {name}}}\n  weights:\n  - {{weight: 1, selector: {{app: {name}}}}}\n{extra}\n---\n"
        );
    }
    bed.load(&yaml);
    bed.start_controller();
    bed.start_agent();
    let far_vip = ServiceKey::tcp("10.96.100.30:80".parse().expect("an address"));
    let solo_vip = ServiceKey::tcp("10.96.100.31:80".parse().expect("an address"));
    let node_port = ServiceKey::tcp(SocketAddr::new(IpAddr::V4(NODE_IP), 30082));
    wait_for_weights(&bed, node_port, &[("far-a", 1)]);
    wait_for_weights(&bed, solo_vip, &[("solo-a", 1)]);
    let remote = bed.remote_node().expect("the second node");
    assert!(
        !remote.exec_output(&["ip", "route", "get", &CLIENT_IP.to_string()]).status.success(),
        "the second node must have no route to the client, or nothing here tests masquerading"
    );
    let table = wait_until(TIMEOUT, "the table with the NodePort", || nft_table(&bed).filter(|t| t.contains("30082")));
    assert_eq!(ipvs_operator_tests::consistency::standalone_orphans(&bed, false), Vec::<String>::new());
    eprintln!("{table}");
    assert!(table.contains("hook postrouting") && table.contains("masquerade"), "{table}");

    // An external client through the NodePort to a pod on the other node: its
    // reply comes back through this node only because it was masqueraded.
    let external = bed.connect(SocketAddr::new(IpAddr::V4(NODE_IP), 30082), 20);
    assert_eq!(external, [("far-a".to_string(), 20)].into());
    // Hairpin: a pod reaching itself through its Service.
    let solo = bed.pod_netns("default", "solo-a").expect("solo-a's network");
    let (hairpin, errors) = bed.connect_from(solo, Transport::Tcp, SocketAddr::from(([10, 96, 100, 31], 80)), 20);
    assert!(errors.is_empty(), "hairpin connections failed: {errors:?}");
    assert_eq!(hairpin, [("solo-a".to_string(), 20)].into());
    // The node itself as the client (host network): its source is the VIP.
    let (from_node, errors) = bed.connect_from(&bed.node, Transport::Tcp, SocketAddr::from(([10, 96, 100, 30], 80)), 20);
    assert!(errors.is_empty(), "connections from the node failed: {errors:?}");
    assert_eq!(from_node, [("far-a".to_string(), 20)].into());

    // `far` deleted while the agent is down: the restarted agent still knows
    // its NodePort virtual services were its own (the table records them),
    // deletes them and leaves `solo` as it is.
    bed.kill("agent");
    use ipvs_operator::crd::WeightedService;
    let api: kube::Api<WeightedService> = kube::Api::namespaced(bed.client(), "default");
    bed.block_on(api.delete("far", &Default::default())).expect("deleted");
    wait_until(TIMEOUT, "the Service gone", || bed.get("services", "default", "far").is_none().then_some(()));
    bed.start_agent();
    wait_until(TIMEOUT, "far's virtual services gone", || {
        let keys: BTreeSet<ServiceKey> = bed.ipvs().into_iter().map(|e| e.service.key).collect();
        (keys == [solo_vip].into()).then_some(())
    });
    wait_until(TIMEOUT, "the table without far", || nft_table(&bed).filter(|t| !t.contains("30082")));
    let orphans = ipvs_operator_tests::consistency::standalone_orphans(&bed, false);
    assert!(orphans.is_empty(), "{orphans:?}");
    assert!(!node_addresses_on(&bed, INTERFACE).unwrap_or_default().contains("10.96.100.30/32"));
    assert!(bed.ipvs().iter().all(|e| e.service.key != far_vip));
    assert_eq!(agent_writes(&bed, "weight") + agent_writes(&bed, "scheduler"), 0.0, "solo rewritten: {}", bed.log("agent"));

    // `agent --cleanup` (after uninstalling): nothing the agent made is left.
    bed.kill("agent");
    let cleanup = project_binary("ipvs-operator");
    let out = bed.node.exec_output(&[cleanup.to_str().expect("a UTF-8 path"), "agent", "--cleanup"]);
    assert!(out.status.success(), "agent --cleanup: {}", String::from_utf8_lossy(&out.stderr));
    assert!(bed.ipvs().is_empty(), "{}", bed.ipvsadm());
    assert_eq!(node_addresses_on(&bed, INTERFACE), None);
    assert_eq!(nft_table(&bed), None);
    let ruleset = bed.node.exec(&["nft", "list", "ruleset"]);
    assert!(!ruleset.contains("ipvs-operator"), "{ruleset}");
    // And again: nothing to do, no error.
    let again = bed.node.exec_output(&[cleanup.to_str().expect("a UTF-8 path"), "agent", "--cleanup"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 kernel writes"), "{}", String::from_utf8_lossy(&again.stdout));
}

#[test]
fn beside_kube_proxy_in_nftables_mode_pods_and_host_network_clients_reach_a_service_served_here() {
    use traffic::Transport;
    // kube-proxy's nftables mode drops new connections to service-range
    // addresses it does not know, on the forward and output paths.
    let mut bed = Testbed::new(TestbedConfig {
        proxy_flags: vec!["--mode".into(), "nftables".into(), "--service-cidrs".into(), "10.96.0.0/16,fd00:96::/108".into()],
        ..TestbedConfig::default()
    });
    bed.node.sysctls(&[("net.ipv4.vs.conntrack", "1")]);
    bed.load(&served("  ports: [{protocol: TCP, port: 80, targetPort: www}]"));
    bed.start_all();
    let vip = ServiceKey::tcp("10.96.100.10:80".parse().expect("an address"));
    wait_for_weights(&bed, vip, &[("canary-a", 1), ("prod-a", 3), ("prod-b", 3)]);
    let kube_proxys = wait_until(TIMEOUT, "kube-proxy's table", || {
        let out = bed.node.exec_output(&["nft", "list", "table", "ip", "kube-proxy"]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    assert!(kube_proxys.contains("10.96.0.0/16") && kube_proxys.contains("hook output"), "{kube_proxys}");
    // The chain is there and drops: a host-network connection to an address
    // of the range that only the node has (nothing listens: without the chain
    // it would be refused at once) times out.
    bed.node.exec(&["ip", "addr", "add", "10.96.100.99/32", "dev", "lo"]);
    let (answered, errors) = bed.connect_from(&bed.node, Transport::Tcp, SocketAddr::from(([10, 96, 100, 99], 80)), 1);
    assert!(answered.is_empty() && errors.len() == 1 && errors[0].contains("timed out"), "{answered:?} {errors:?}");
    // A host-network client reaches the Service served here: IPVS rewrote the
    // destination (LOCAL_OUT, priority -98) before kube-proxy's output filter (-90).
    let (from_node, errors) = bed.connect_from(&bed.node, Transport::Tcp, SocketAddr::from(([10, 96, 100, 10], 80)), 70);
    assert!(errors.is_empty(), "host-network connections failed: {errors:?}");
    assert_split("from the node", &from_node);
    // So does a pod (through INPUT, which kube-proxy does not filter).
    let pod = bed.pod_netns("default", "prod-a").expect("prod-a's network");
    let (from_pod, errors) = bed.connect_from(pod, Transport::Tcp, SocketAddr::from(([10, 96, 100, 10], 80)), 70);
    assert!(errors.is_empty(), "pod connections failed: {errors:?}");
    assert_split("from a pod", &from_pod);
}

#[test]
fn without_exclude_cidrs_kube_proxy_deletes_a_served_virtual_service_and_the_agent_says_so() {
    // kube-proxy (IPVS mode) beside it without --ipvs-exclude-cidrs: it deletes
    // the agent's virtual service at each sync; the agent makes it again and
    // tells the WeightedService's Events why.
    let mut bed = Testbed::new(TestbedConfig {
        proxy_scheduler: "wrr".into(),
        proxy_sync_period: Duration::from_secs(1),
        ..TestbedConfig::default()
    });
    bed.load(&served("  ports: [{protocol: TCP, port: 80, targetPort: www}]"));
    bed.start_all();
    let event = wait_until(TIMEOUT, "a VirtualServiceDeleted Event", || {
        bed.handle().list("events", Some("default")).into_iter().find(|e| e["reason"] == "VirtualServiceDeleted")
    });
    let note = event["message"].as_str().unwrap_or_default();
    assert!(note.contains("TCP 10.96.100.10:80") && note.contains("--ipvs-exclude-cidrs") && note.contains("node-1"), "{event}");
    assert_eq!(event["involvedObject"]["name"], "web", "{event}");
}
