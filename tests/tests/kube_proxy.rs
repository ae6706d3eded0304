//! The kube-proxy emulator's behaviour, against the test API server and an
//! in-memory IPVS table (the kernel test is `kube_proxy_kernel.rs`, in the VM).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipvs::{ForwardMethod, Protocol, ServiceEntry, ServiceKey};
use ipvs_operator_tests::apiserver::{Config, Grace, TestApiServer};
use ipvs_operator_tests::kube_proxy::{FakeIpvs, KubeProxyEmulator, ProxyConfig};

const WAIT: Duration = Duration::from_secs(10);

const MANIFEST: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: a
  labels: {app: web}
  annotations: {test-apiserver.codesink.net/pod-ip: 10.1.0.10}
spec: {nodeName: node-1, containers: [{name: c, image: x, ports: [{name: www, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: b
  labels: {app: web}
  annotations: {test-apiserver.codesink.net/pod-ip: 10.1.0.11}
spec: {nodeName: node-1, containers: [{name: c, image: x, ports: [{name: www, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  externalIPs: [192.0.2.50]
  sessionAffinity: ClientIP
  ports:
  - {name: http, port: 80, targetPort: www}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
"#;

type Shared = Arc<Mutex<FakeIpvs>>;

fn cfg() -> ProxyConfig {
    ProxyConfig {
        node_name: "node-1".into(),
        node_addresses: vec!["192.0.2.1".parse().unwrap_or(std::net::IpAddr::from([192, 0, 2, 1]))],
        sync_period: Duration::from_millis(300),
        graceful_check_interval: Duration::from_millis(100),
        ..ProxyConfig::default()
    }
}

fn table(f: &Shared) -> Vec<ServiceEntry> {
    f.lock().map(|f| f.entries.clone()).unwrap_or_default()
}

fn entry(f: &Shared, addr: &str, proto: Protocol) -> Option<ServiceEntry> {
    let key = ServiceKey::new(proto, addr.parse().ok()?);
    table(f).into_iter().find(|e| e.service.key == key)
}

fn dests(e: &ServiceEntry) -> Vec<(String, u32)> {
    let mut d: Vec<(String, u32)> = e.destinations.iter().map(|d| (d.socket_addr().to_string(), d.weight)).collect();
    d.sort();
    d
}

async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every virtual service has both pods as destinations: the
/// EndpointSlices come a moment after the pods, and the emulator follows them.
async fn both_pods_programmed(f: &Shared) {
    eventually("both pods programmed", || {
        let t = table(f);
        (t.len() == 6 && t.iter().all(|e| e.destinations.len() == 2)).then_some(())
    })
    .await;
}

fn edit(f: &Shared, addr: &str, proto: Protocol, change: impl FnOnce(&mut ServiceEntry)) {
    let key = ServiceKey::new(proto, addr.parse().expect("address"));
    if let Ok(mut t) = f.lock()
        && let Some(e) = t.entries.iter_mut().find(|e| e.service.key == key)
    {
        change(e);
    }
}

#[tokio::test]
async fn programs_services_reverts_schedulers_and_resets_weights_on_restart() {
    let server = TestApiServer::start(Config::default()).await.expect("server");
    server.handle().load_manifests(MANIFEST).expect("manifest");
    let svc = server.handle().get("services", "default", "web").expect("service");
    let vip = svc["spec"]["clusterIP"].as_str().expect("clusterIP").to_string();
    let node_port = svc["spec"]["ports"][0]["nodePort"].as_u64().expect("nodePort");
    let fake: Shared = Arc::default();
    let emu = KubeProxyEmulator::start(cfg(), server.client().expect("client"), Box::new(fake.clone()));
    assert!(emu.wait_for_syncs(1, WAIT).await);
    both_pods_programmed(&fake).await;

    let want = vec![("10.1.0.10:8080".to_string(), 1), ("10.1.0.11:8080".to_string(), 1)];
    for addr in [format!("{vip}:80"), "192.0.2.50:80".into(), format!("192.0.2.1:{node_port}")] {
        let e = entry(&fake, &addr, Protocol::Tcp).unwrap_or_else(|| panic!("virtual service {addr}: {:#?}", table(&fake)));
        assert_eq!(e.service.scheduler, "rr");
        assert_eq!((e.service.flags & 1, e.service.timeout), (1, 10_800), "ClientIP affinity: persistent, 3 h");
        assert_eq!(dests(&e), want, "{addr}");
        assert!(e.destinations.iter().all(|d| d.forward == ForwardMethod::Masquerade));
    }
    let udp = entry(&fake, &format!("{vip}:53"), Protocol::Udp).expect("UDP service");
    assert_eq!(dests(&udp), [("10.1.0.10:5353".to_string(), 1), ("10.1.0.11:5353".to_string(), 1)]);
    assert_eq!(table(&fake).len(), 6, "ClusterIP, external IP and NodePort for each of two ports");

    // Someone changes the scheduler and a weight: the next sync reverts the
    // scheduler, and leaves the weight (kube-proxy resets weights only at start).
    let http = format!("{vip}:80");
    edit(&fake, &http, Protocol::Tcp, |e| {
        e.service.scheduler = "wrr".into();
        e.destinations[0].weight = 5;
    });
    let n = emu.status().syncs;
    emu.sync_now();
    assert!(emu.wait_for_syncs(n + 1, WAIT).await);
    let e = entry(&fake, &http, Protocol::Tcp).expect("service");
    assert_eq!(e.service.scheduler, "rr", "scheduler reverted");
    assert!(dests(&e).iter().any(|(_, w)| *w == 5), "weights untouched by a later sync: {:?}", dests(&e));

    // The periodic sync alone (no change, no request) reverts too.
    edit(&fake, &http, Protocol::Tcp, |e| e.service.scheduler = "wlc".into());
    eventually("the periodic sync", || (entry(&fake, &http, Protocol::Tcp)?.service.scheduler == "rr").then_some(())).await;

    emu.stop().await.expect("stop");
    let emu = KubeProxyEmulator::start(cfg(), server.client().expect("client"), Box::new(fake.clone()));
    assert!(emu.wait_for_syncs(1, WAIT).await);
    assert_eq!(dests(&entry(&fake, &http, Protocol::Tcp).expect("service")), want, "restart resets weights to 1");

    // A deleted Service takes its virtual services with it.
    let client = server.client().expect("client");
    kube::Api::<k8s_openapi::api::core::v1::Service>::namespaced(client, "default")
        .delete("web", &Default::default())
        .await
        .expect("delete service");
    eventually("virtual services deleted", || table(&fake).is_empty().then_some(())).await;
    emu.stop().await.expect("stop");
}

#[tokio::test]
async fn drains_tcp_destinations_with_connections_and_falls_back_to_terminating_endpoints() {
    let server = TestApiServer::start(Config::default()).await.expect("server");
    server.handle().load_manifests(MANIFEST).expect("manifest");
    let vip = server.handle().get("services", "default", "web").expect("service")["spec"]["clusterIP"]
        .as_str()
        .expect("clusterIP")
        .to_string();
    let (http, dns) = (format!("{vip}:80"), format!("{vip}:53"));
    let fake: Shared = Arc::default();
    let emu = KubeProxyEmulator::start(cfg(), server.client().expect("client"), Box::new(fake.clone()));
    assert!(emu.wait_for_syncs(1, WAIT).await);
    both_pods_programmed(&fake).await;

    // Pod a has connections on both ports; it leaves the ready set.
    for (addr, proto) in [(&http, Protocol::Tcp), (&dns, Protocol::Udp)] {
        edit(&fake, addr, proto, |e| {
            for d in &mut e.destinations {
                if d.address.to_string() == "10.1.0.10" {
                    d.active_connections = 2;
                }
            }
        });
    }
    server.handle().set_pod_ready("default", "a", false).expect("unready");
    eventually("TCP destination drained at weight 0", || {
        let e = entry(&fake, &http, Protocol::Tcp)?;
        (dests(&e) == [("10.1.0.10:8080".to_string(), 0), ("10.1.0.11:8080".to_string(), 1)]).then_some(())
    })
    .await;
    let udp = entry(&fake, &dns, Protocol::Udp).expect("UDP service");
    assert_eq!(dests(&udp), [("10.1.0.11:5353".to_string(), 1)], "UDP deleted at once, connections or not");

    // Its connections end: the graceful-termination check deletes it.
    edit(&fake, &http, Protocol::Tcp, |e| e.destinations.iter_mut().for_each(|d| d.active_connections = 0));
    eventually("drained destination deleted", || {
        (dests(&entry(&fake, &http, Protocol::Tcp)?) == [("10.1.0.11:8080".to_string(), 1)]).then_some(())
    })
    .await;

    // Back to ready: added afresh with weight 1.
    server.handle().set_pod_ready("default", "a", true).expect("ready");
    eventually("destination back", || (entry(&fake, &http, Protocol::Tcp)?.destinations.len() == 2).then_some(())).await;

    // Both pods terminating but serving: with no ready endpoint, kube-proxy uses them.
    server.handle().delete_pod("default", "a", Grace::UntilFinished).expect("terminate a");
    server.handle().delete_pod("default", "b", Grace::UntilFinished).expect("terminate b");
    let n = emu.status().syncs;
    emu.sync_now();
    assert!(emu.wait_for_syncs(n + 1, WAIT).await);
    let e = entry(&fake, &http, Protocol::Tcp).expect("service");
    assert_eq!(dests(&e), [("10.1.0.10:8080".to_string(), 1), ("10.1.0.11:8080".to_string(), 1)]);
    // One finishes: a connection-less destination goes at once.
    server.handle().finish_pod_termination("default", "b").expect("finish b");
    eventually("b deleted", || (dests(&entry(&fake, &http, Protocol::Tcp)?) == [("10.1.0.10:8080".to_string(), 1)]).then_some(())).await;
    emu.stop().await.expect("stop");
}
