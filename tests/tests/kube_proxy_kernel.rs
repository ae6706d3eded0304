//! The kube-proxy emulator against a real kernel's IPVS, read back with
//! ipvsadm (a tool nobody here wrote). Needs ip_vs and root: `make
//! test-kernel` runs it in the test VM; the VM is this binary's alone, so the
//! test uses the root network namespace.

use std::process::Command;
use std::time::Duration;

use ipvs_operator_tests::apiserver::{Config, TestApiServer};
use ipvs_operator_tests::kube_proxy::{KubeProxyEmulator, ProxyConfig};

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
    run("ipvsadm", &["-E", "-t", &vs, "-s", "wrr"]);
    run("ipvsadm", &["-e", "-t", &vs, "-r", "10.1.0.10:8080", "-m", "-w", "7"]);
    assert!(ipvsadm_service(&vs).0.ends_with(" wrr"));
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
