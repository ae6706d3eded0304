//! Two controllers (the binary, as the Deployment's two replicas run it)
//! against the test API server: one holds the Lease and does all the work,
//! the other stands by and writes nothing; after the leader's SIGKILL the
//! other takes over within lease duration + retry period + one reconcile and
//! reconciles a WeightedService created meanwhile; a leader stopped with
//! SIGTERM gives the Lease up, and the other takes it at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipvs_operator_tests::apiserver::{kubeconfig_yaml, Config, Handle, TestApiServer};
use ipvs_operator_tests::project_binary;
use ipvs_operator_tests::testbed::metric_at;
use serde_json::Value;

const NAMESPACE: &str = "ipvs-operator";
const LEASE: &str = "ipvs-operator-controller";
/// The defaults of the flags: a follower takes over after this much silence.
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RETRY_PERIOD: Duration = Duration::from_secs(2);
/// One reconcile of a small WeightedService, with room for a slow machine.
const ONE_RECONCILE: Duration = Duration::from_secs(5);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repository").to_path_buf()
}

/// A controller process, killed (SIGKILL) on drop.
struct Controller {
    name: &'static str,
    child: Child,
    listen: SocketAddr,
    log: PathBuf,
}

impl Controller {
    fn start(name: &'static str, kubeconfig: &Path, dir: &Path) -> Controller {
        let listen = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port");
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("a log file");
        let child = Command::new(project_binary("ipvs-operator").expect("the operator binary"))
            .args(["controller", "--listen", &listen.to_string()])
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", name)
            .env("POD_NAMESPACE", NAMESPACE)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("ipvs-operator controller starts");
        Controller { name, child, listen, log }
    }

    fn metric(&self, name: &str) -> Option<f64> {
        metric_at(self.listen, name, "")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&mut self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    /// Send SIGTERM and wait for the process to end.
    fn stop(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not stop within 30 s of SIGTERM:\n{}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn weighted_service(name: &str) -> String {
    format!(
        "apiVersion: codesink.net/v1alpha1\nkind: WeightedService\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  selector: {{app: {name}}}\n  ports: [{{protocol: TCP, port: 80, targetPort: 8080}}]\n\
         \x20 weights:\n  - {{weight: 10, selector: {{env: prod}}}}\n  - {{weight: 1, selector: {{env: canary}}}}\n"
    )
}

/// Whether WeightedService `name` has a status for its generation and its Service exists.
fn reconciled(h: &Handle, name: &str) -> bool {
    let Some(ws) = h.get("weightedservices", "default", name) else { return false };
    ws["status"]["observedGeneration"] == ws["metadata"]["generation"] && h.get("services", "default", name).is_some()
}

fn lease(h: &Handle) -> Option<Value> {
    h.get("leases", NAMESPACE, LEASE)
}

fn holder(h: &Handle) -> Option<String> {
    lease(h)?["spec"]["holderIdentity"].as_str().filter(|s| !s.is_empty()).map(str::to_string)
}

fn wait_for<T>(what: &str, timeout: Duration, logs: &[&Controller], mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = logs.iter().map(|c| format!("--- {}:\n{}", c.name, c.log())).collect();
            panic!("{what}: not within {timeout:?}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes the controllers made: anything but reads and the Lease.
fn writes(h: &Handle) -> usize {
    h.requests()
        .iter()
        .filter(|r| !matches!(r.verb.as_str(), "get" | "list" | "watch") && r.resource != "leases")
        .count()
}

#[test]
fn one_controller_leads_and_the_other_takes_over_after_a_sigkill() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
    let mut config = Config::default();
    config.namespaces.push(NAMESPACE.into());
    let server = runtime.block_on(TestApiServer::start(config)).expect("the test API server starts");
    let h = server.handle().clone();
    h.load_file(&repo().join("deploy/crd.yaml")).expect("the CRD loads");
    h.load_manifests(&weighted_service("first")).expect("a WeightedService loads");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_yaml(server.url())).expect("a kubeconfig");

    // The first one started takes the Lease (it is free) and reconciles.
    let a = Controller::start("controller-a", &kubeconfig, dir.path());
    wait_for("controller-a to hold the Lease", Duration::from_secs(30), &[&a], || (holder(&h)? == "controller-a").then_some(()));
    let b = Controller::start("controller-b", &kubeconfig, dir.path());
    wait_for("WeightedService first to be reconciled", Duration::from_secs(60), &[&a, &b], || reconciled(&h, "first").then_some(()));
    // Both are ready: the follower stands by.
    wait_for("controller-b to follow", Duration::from_secs(30), &[&b], || b.log().contains("following").then_some(()));
    assert_eq!(b.metric("ipvs_operator_leader"), Some(0.0), "the follower says it leads:\n{}", b.log());
    assert_eq!(a.metric("ipvs_operator_leader"), Some(1.0), "the leader says it does not:\n{}", a.log());

    // A change while both run: only the leader reconciles it.
    h.load_manifests(&weighted_service("second")).expect("a WeightedService loads");
    wait_for("WeightedService second to be reconciled", Duration::from_secs(30), &[&a, &b], || reconciled(&h, "second").then_some(()));
    std::thread::sleep(RETRY_PERIOD * 2);
    assert_eq!(holder(&h).as_deref(), Some("controller-a"), "the Lease changed hands while its holder ran");
    assert_eq!(
        b.metric("ipvs_operator_reconcile_seconds_count"),
        Some(0.0),
        "the follower reconciled:\n{}",
        b.log()
    );
    let transitions_before = lease(&h).and_then(|l| l["spec"]["leaseTransitions"].as_i64()).unwrap_or(-1);

    // SIGKILL the leader: it cannot give the Lease up. Something changes meanwhile.
    drop(a);
    let killed = Instant::now();
    h.load_manifests(&weighted_service("third")).expect("a WeightedService loads");
    let writes_before = writes(&h);
    wait_for("controller-b to reconcile WeightedService third", LEASE_DURATION * 2, &[&b], || reconciled(&h, "third").then_some(()));
    let failover = killed.elapsed();
    let budget = LEASE_DURATION + RETRY_PERIOD + RETRY_PERIOD / 5 + ONE_RECONCILE;
    assert!(failover <= budget, "failover took {failover:?}, more than {budget:?}:\n{}", b.log());
    // Not before the Lease ran out either: it waited for the dead leader's lease.
    assert!(failover >= LEASE_DURATION - RETRY_PERIOD * 2, "took over after {failover:?}, before the Lease ran out");
    assert!(writes(&h) > writes_before, "nothing written after the take-over");
    assert_eq!(holder(&h).as_deref(), Some("controller-b"));
    let transitions = lease(&h).and_then(|l| l["spec"]["leaseTransitions"].as_i64()).unwrap_or(-1);
    assert_eq!(transitions, transitions_before + 1, "leaseTransitions counts the take-over");
    assert_eq!(b.metric("ipvs_operator_leader"), Some(1.0));
    eprintln!("failover after SIGKILL: {:.1} s (budget {:.1} s)", failover.as_secs_f64(), budget.as_secs_f64());

    // controller-a comes back (the same pod, restarted) and follows; SIGTERM
    // to controller-b gives the Lease up, and controller-a takes it within a
    // retry period, not a lease duration.
    let a = Controller::start("controller-a", &kubeconfig, dir.path());
    wait_for("the restarted controller-a to follow", Duration::from_secs(30), &[&a], || {
        a.log().matches("following").count().ge(&1).then_some(())
    });
    let stopped = Instant::now();
    let status = b.stop();
    assert!(status.success(), "controller-b exited with {status} on SIGTERM");
    wait_for("controller-a to take the released Lease", Duration::from_secs(10), &[&a], || {
        (holder(&h)? == "controller-a").then_some(())
    });
    let handover = stopped.elapsed();
    assert!(handover < RETRY_PERIOD * 3, "the hand-over after SIGTERM took {handover:?}: the Lease was not released");
    h.load_manifests(&weighted_service("fourth")).expect("a WeightedService loads");
    wait_for("controller-a to reconcile WeightedService fourth", Duration::from_secs(30), &[&a], || {
        reconciled(&h, "fourth").then_some(())
    });
    eprintln!("hand-over after SIGTERM: {:.1} s", handover.as_secs_f64());
}
