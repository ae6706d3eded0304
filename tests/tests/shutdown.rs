//! SIGTERM (what the kubelet sends when a pod stops) ends the agent and the
//! controller promptly, with status 0, instead of leaving them to be killed
//! at the end of the grace period. Runs on the host: the agent needs no IPVS
//! to start, sync its caches and stop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipvs_operator_tests::apiserver::{kubeconfig_yaml, Config, TestApiServer};
use ipvs_operator_tests::project_binary;

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `ipvs-operator ARGS…` against the server; its logs go to `log`.
fn start(args: &[&str], kubeconfig: &std::path::Path, log: &std::path::Path) -> Running {
    let log = std::fs::File::create(log).expect("log file");
    let child = Command::new(project_binary("ipvs-operator").expect("the operator binary"))
        .args(args)
        .args(["--listen", "127.0.0.1:0"])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("ipvs-operator starts");
    Running(child)
}

/// Wait until `log` has a line containing `text`.
fn wait_for_log(log: &std::path::Path, text: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(log).is_ok_and(|l| l.contains(text)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no {text:?} in {} after {timeout:?}:\n{}", log.display(), std::fs::read_to_string(log).unwrap_or_default());
}

/// Send SIGTERM and wait for the exit; the time it took.
fn terminate(process: &mut Running, log: &std::path::Path) -> Duration {
    let pid = libc::pid_t::try_from(process.0.id()).expect("a pid");
    let sent = Instant::now();
    // SAFETY: kill(2) on a child we started and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "kill");
    loop {
        if let Some(status) = process.0.try_wait().expect("wait") {
            assert!(status.success(), "exit status {status} after SIGTERM:\n{}", std::fs::read_to_string(log).unwrap_or_default());
            return sent.elapsed();
        }
        if sent.elapsed() > Duration::from_secs(10) {
            panic!("still running 10 s after SIGTERM:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_agent_and_the_controller_promptly() {
    let server = TestApiServer::start(Config::default()).await.expect("test API server");
    server
        .handle()
        .load_manifests(
            "apiVersion: codesink.net/v1alpha1\nkind: WeightedService\nmetadata: {name: web, namespace: shop}\n\
             spec: {selector: {app: web}, ports: [{port: 80}], weights: [{weight: 2, selector: {env: prod}}]}\n",
        )
        .expect("load");
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_yaml(server.url())).expect("kubeconfig");

    let (agent_log, controller_log) = (dir.path().join("agent.log"), dir.path().join("controller.log"));
    let mut agent = start(&["agent", "--node-name", "node-1"], &kubeconfig, &agent_log);
    let mut controller = start(&["controller"], &kubeconfig, &controller_log);
    let (agent_log2, controller_log2) = (agent_log.clone(), controller_log.clone());
    tokio::task::spawn_blocking(move || {
        // The agent's work loop is running (on this host it cannot open IPVS and retries).
        wait_for_log(&agent_log2, "watch caches synced", Duration::from_secs(60));
        wait_for_log(&controller_log2, "watch caches synced", Duration::from_secs(60));
    })
    .await
    .expect("join");
    std::thread::sleep(Duration::from_millis(500));

    for (name, process, log) in [("agent", &mut agent, &agent_log), ("controller", &mut controller, &controller_log)] {
        let took = terminate(process, log);
        assert!(took < Duration::from_secs(3), "the {name} took {took:?} to stop after SIGTERM");
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(text.contains(": stopping"), "the {name} says why it stops:\n{text}");
    }
}
