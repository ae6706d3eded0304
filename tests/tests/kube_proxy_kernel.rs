//! The kube-proxy emulator against a real kernel's IPVS, read back with
//! ipvsadm (a tool nobody here wrote). Needs ip_vs and root: `make
//! test-kernel` runs it in the test VM; the VM is this binary's alone, so the
//! test uses the root network namespace.

use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use ipvs_operator_tests::apiserver::{Config, TestApiServer};
use ipvs_operator_tests::kube_proxy::{
    DualStackProxier, IpFamily, KubeProxyEmulator, NodeInfo, ProxyConfig, interface_addresses, node_port_addresses,
};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

const WAIT: Duration = Duration::from_secs(30);

const MANIFEST: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: a
  labels: {app: web}
  annotations: {test-apiserver.codesink.net/pod-ip: 10.1.0.10}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: b
  labels: {app: web}
  annotations: {test-apiserver.codesink.net/pod-ip: 10.1.0.11}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"#;

/// The tests share the root namespace's table, and a proxier deletes every
/// virtual service of its family that it does not want: one at a time.
static KERNEL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    KERNEL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The ClusterIP the test API server gave Service `name` (in `default`).
fn cluster_ip(server: &TestApiServer, name: &str) -> String {
    let service = server.handle().get("services", "default", name).expect("the Service");
    service["spec"]["clusterIP"].as_str().expect("a clusterIP").to_string()
}

/// `ipvsadm -Ln` lines for one virtual service: its own line, then `(dest, weight)`.
fn ipvsadm_service(vip: &str) -> (String, Vec<(String, u32)>) {
    let out = run("ipvsadm", &["-Ln"]);
    let mut lines = out.lines().skip_while(|l| !l.starts_with(&format!("TCP  {vip}")));
    let head = lines.next().unwrap_or_else(|| panic!("no {vip} in ipvsadm -Ln:\n{out}")).to_string();
    let dests = lines
        .take_while(|l| l.trim_start().starts_with("->"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "-> 10.1.0.10:8080  Masq  1  0  0"
            Some((f.get(1)?.to_string(), f.get(3)?.parse().ok()?))
        })
        .collect();
    (head, dests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_reverts_the_scheduler_and_resets_weights_on_restart() {
    let _serial = serial();
    let _ = Command::new("modprobe").arg("ip_vs").status();
    assert!(std::path::Path::new("/proc/net/ip_vs").exists(), "no IPVS in this kernel: run with `make test-kernel`");
    let server = TestApiServer::start(Config::default()).await.expect("server");
    server.handle().load_manifests(MANIFEST).expect("manifest");
    let vip = cluster_ip(&server, "web");
    let vs = format!("{vip}:80");
    let cfg = ProxyConfig {
        sync_period: Duration::from_millis(500),
        dummy_interface: Some("kube-ipvs0".into()),
        ..ProxyConfig::default()
    };
    let start = || {
        let ipvs = ipvs::IpvsClient::new().expect("IPVS netlink");
        KubeProxyEmulator::start(cfg.clone(), server.client().expect("client"), Box::new(ipvs))
    };
    let emu = start();
    assert!(emu.wait_for_syncs(1, WAIT).await);
    // The EndpointSlices come a moment after the pods; the emulator follows them.
    let deadline = std::time::Instant::now() + WAIT;
    while ipvsadm_service(&vs).1.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "the destinations never came:\n{}", run("ipvsadm", &["-Ln"]));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (head, dests) = ipvsadm_service(&vs);
    assert!(head.ends_with(" rr"), "kube-proxy's scheduler: {head}");
    assert_eq!(dests, [("10.1.0.10:8080".to_string(), 1), ("10.1.0.11:8080".to_string(), 1)]);
    let out = run("ipvsadm", &["-Ln"]);
    assert!(out.contains("Masq"), "masquerade forwarding:\n{out}");
    let addrs = run("ip", &["-o", "addr", "show", "dev", "kube-ipvs0"]);
    assert!(addrs.contains(&format!("{vip}/32")), "the ClusterIP bound to kube-ipvs0: {addrs}");

    // Another writer (as the agent would) changes the scheduler and a weight.
    // (Not read back: under TCG three process starts can outlast the 500 ms
    // sync period, and a sync may revert the scheduler before ipvsadm shows it.)
    run("ipvsadm", &["-E", "-t", &vs, "-s", "wrr"]);
    run("ipvsadm", &["-e", "-t", &vs, "-r", "10.1.0.10:8080", "-m", "-w", "7"]);
    // The next periodic sync reverts the scheduler; weights stay as they are.
    let n = emu.status().syncs;
    assert!(emu.wait_for_syncs(n + 2, WAIT).await);
    let (head, dests) = ipvsadm_service(&vs);
    assert!(head.ends_with(" rr"), "scheduler reverted on the next sync: {head}");
    assert_eq!(dests, [("10.1.0.10:8080".to_string(), 7), ("10.1.0.11:8080".to_string(), 1)]);

    // A restart: the first sync resets every weight to 1.
    emu.stop().await.expect("stop");
    assert_eq!(ipvsadm_service(&vs).1[0].1, 7, "nothing changes while it is down");
    let emu = start();
    assert!(emu.wait_for_syncs(1, WAIT).await);
    assert_eq!(ipvsadm_service(&vs).1, [("10.1.0.10:8080".to_string(), 1), ("10.1.0.11:8080".to_string(), 1)]);

    // A new Service: its ClusterIP is bound before its destinations appear, as
    // kube-proxy orders it, so a table with destinations takes connections
    // (a client that waits for the weights must not find the address missing).
    server.handle().load_manifests(NEW_SERVICE).expect("manifest");
    let new_vip: std::net::IpAddr = cluster_ip(&server, "api").parse().expect("an IP address");
    let mut ipvs = ipvs::IpvsClient::new().expect("IPVS netlink");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let table = ipvs.dump().expect("dump");
        let has_destinations =
            table.iter().any(|e| e.service.address().map(|a| a.ip()) == Some(new_vip) && !e.destinations.is_empty());
        if has_destinations {
            // Binding a socket to an address succeeds only when it is local.
            let bound = std::net::UdpSocket::bind((new_vip, 0));
            assert!(bound.is_ok(), "{new_vip} has destinations but is not bound: {bound:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no destinations for {new_vip}");
    }
    emu.stop().await.expect("stop");
}

const NEW_SERVICE: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: c
  labels: {app: api}
  annotations: {test-apiserver.codesink.net/pod-ip: 10.1.0.12}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Service
metadata: {name: api}
spec:
  selector: {app: api}
  ports: [{port: 80, targetPort: 8080}]
"#;

const DUAL_STACK: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:10:96::10"]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v4, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.1.0.10], nodeName: node-1}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ["fd00:1::10"], nodeName: node-1}]
"#;

fn objects(yaml: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
    let (mut services, mut slices) = (Vec::new(), Vec::new());
    for v in serde_saphyr::from_multiple::<serde_json::Value>(yaml).expect("YAML") {
        match v.get("kind").and_then(serde_json::Value::as_str) {
            Some("Service") => services.push(serde_json::from_value(v).expect("a Service")),
            _ => slices.push(serde_json::from_value(v).expect("an EndpointSlice")),
        }
    }
    (services, slices)
}

/// `ipvsadm -Ln`'s virtual services (`TCP  addr:port`) with their destinations' addresses.
fn ipvsadm_table() -> Vec<(String, Vec<String>)> {
    let out = run("ipvsadm", &["-Ln"]);
    let mut table: Vec<(String, Vec<String>)> = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["TCP" | "UDP" | "SCTP", addr, ..] => table.push((addr.to_string(), Vec::new())),
            ["->", dest, ..] if *dest != "RemoteAddress:Port" => {
                if let Some(last) = table.last_mut() {
                    last.1.push(dest.to_string());
                }
            }
            _ => {}
        }
    }
    table
}

#[test]
fn both_family_proxiers_on_the_kernel_with_node_ports_on_the_interfaces_addresses() {
    let _serial = serial();
    let _ = Command::new("modprobe").arg("ip_vs").status();
    assert!(std::path::Path::new("/proc/net/ip_vs").exists(), "no IPVS in this kernel: run with `make test-kernel`");
    // A node link with an address of each family (and, once up, an IPv6
    // link-local one), and kube-proxy's dummy interface holding a ClusterIP.
    let _ = Command::new("ip").args(["link", "del", "node0"]).output();
    run("ip", &["link", "add", "node0", "type", "dummy"]);
    run("ip", &["link", "set", "node0", "up"]);
    run("ip", &["addr", "add", "192.0.2.1/24", "dev", "node0"]);
    run("ip", &["addr", "add", "2001:db8::1/64", "dev", "node0", "nodad"]);
    if Command::new("ip").args(["link", "show", "kube-ipvs0"]).output().is_ok_and(|o| !o.status.success()) {
        run("ip", &["link", "add", "kube-ipvs0", "type", "dummy"]);
    }
    run("ip", &["addr", "replace", "10.96.99.99/32", "dev", "kube-ipvs0"]);
    // Strays: each family's proxier deletes its own, --ipvs-exclude-cidrs kept.
    run("ipvsadm", &["-A", "-t", "10.200.0.1:80"]);
    run("ipvsadm", &["-A", "-t", "[2001:db8::99]:80"]);
    run("ipvsadm", &["-A", "-t", "172.16.0.1:80"]);

    let interfaces = interface_addresses().expect("getifaddrs");
    let node = NodeInfo { interfaces, ..NodeInfo::default() };
    let cfg = ProxyConfig {
        exclude_cidrs: vec!["172.16.0.0/16".parse().expect("CIDR")],
        dummy_interface: Some("kube-ipvs0".into()),
        ..ProxyConfig::default()
    };
    let v4: Vec<String> = node_port_addresses(&cfg, IpFamily::V4, &node).iter().map(ToString::to_string).collect();
    let v6: Vec<String> = node_port_addresses(&cfg, IpFamily::V6, &node).iter().map(ToString::to_string).collect();
    assert_eq!((v4, v6), (vec!["192.0.2.1".to_string()], vec!["2001:db8::1".to_string()]), "{:?}", node.interfaces);
    assert!(node.interfaces.iter().any(|a| matches!(a.address, std::net::IpAddr::V6(v) if v.is_unicast_link_local())));

    let (svcs, slices) = objects(DUAL_STACK);
    let mut ipvs = ipvs::IpvsClient::new().expect("IPVS netlink");
    let mut proxier = DualStackProxier::new(cfg);
    let report = proxier.sync(&mut ipvs, &svcs, &slices, &node).expect("sync");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let table = ipvsadm_table();
    let listing = run("ipvsadm", &["-Ln"]);
    let expected: Vec<(String, Vec<String>)> = [
        ("10.96.0.10:80", "10.1.0.10:8080"),
        ("192.0.2.1:30080", "10.1.0.10:8080"),
        ("[2001:db8::1]:30080", "[fd00:1::10]:8080"),
        ("[fd00:10:96::10]:80", "[fd00:1::10]:8080"),
    ]
    .iter()
    .map(|(vs, d)| (vs.to_string(), vec![d.to_string()]))
    .chain([("172.16.0.1:80".to_string(), Vec::new())])
    .collect();
    let mut sorted = table.clone();
    sorted.sort();
    let mut expected_sorted = expected;
    expected_sorted.sort();
    assert_eq!(sorted, expected_sorted, "ipvsadm -Ln:\n{listing}");

    // The Service goes: its virtual services with it.
    proxier.sync(&mut ipvs, &[], &[], &node).expect("sync");
    assert_eq!(ipvsadm_table(), [("172.16.0.1:80".to_string(), Vec::new())]);
    run("ipvsadm", &["-D", "-t", "172.16.0.1:80"]);
    run("ip", &["link", "del", "node0"]);
    run("ip", &["addr", "del", "10.96.99.99/32", "dev", "kube-ipvs0"]);
}
