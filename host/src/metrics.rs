//! Prometheus metrics, and the HTTP endpoint that serves them with the health
//! checks: `/metrics`, `/healthz` (the work loop is alive), `/readyz` (the first
//! full sync is done, and for the agent the first IPVS pass).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::policy::CatalogCounters;

/// Labels of a policy evaluation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvaluationLabels {
    /// The policy's name.
    pub policy: String,
    /// `ok`, or the error's kind (`trap`, `timeout`, …).
    pub result: String,
}

/// Labels naming a kind of thing.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The kind.
    pub kind: String,
}

/// Labels of a policy module load.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// The policy's name.
    pub policy: String,
}

/// Labels naming a step of the agent's periodic sweep.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// `read` (the table, from the kernel), `compare` (with the plans) or
    /// `cross_check` (caches against states, now and then).
    pub step: String,
}

/// Every metric the agent and the controller export.
pub struct Metrics {
    registry: Registry,
    /// Policy evaluations by policy and result.
    pub evaluations: Family<EvaluationLabels, Counter>,
    /// Time of one evaluation, in seconds.
    pub evaluation_seconds: Histogram,
    /// Netlink writes applied, by kind (`weight`, `scheduler`).
    pub netlink_writes: Family<KindLabels, Counter>,
    /// Netlink writes the kernel refused, by kind.
    pub netlink_errors: Family<KindLabels, Counter>,
    /// Writes that undid someone else's change (kube-proxy's), by kind.
    pub drift_repairs: Family<KindLabels, Counter>,
    /// Time of one reconcile (controller) or IPVS pass (agent), in seconds.
    pub reconcile_seconds: Histogram,
    /// Policy modules loaded, by policy.
    pub policy_loads: Family<PolicyLabels, Counter>,
    /// Policy modules refused at load, by policy.
    pub policy_load_failures: Family<PolicyLabels, Counter>,
    /// Configs a policy's `validate-config` refused (and that were not
    /// evaluated), by policy.
    pub policy_config_refusals: Family<PolicyLabels, Counter>,
    /// Policy module loads tried again after host trouble, by policy.
    pub policy_load_retries: Family<PolicyLabels, Counter>,
    /// Rescans of the policy directory, and bytes of modules read.
    pub policy_dir: CatalogCounters,
    /// Objects in the watch caches, by kind.
    pub watched_objects: Family<KindLabels, Gauge>,
    /// Watch errors (the watch restarts with backoff), by kind.
    pub watch_errors: Family<KindLabels, Counter>,
    /// Complete lists of a watched kind, by kind: the first, and one per
    /// relist (after a 410, or a reconnect that cannot resume).
    pub watch_lists: Family<KindLabels, Counter>,
    /// Periodic sweeps of the agent that found a virtual service to fix.
    pub sweep_differences: Counter,
    /// Periodic sweeps of the agent started.
    pub sweeps: Counter,
    /// 1 while this controller holds the leader Lease, else 0.
    pub leader: Gauge,
    /// CPU time of the agent's sweeps (the thread's own, user and kernel), by step.
    pub sweep_cpu_seconds: Family<StepLabels, Counter<f64, AtomicU64>>,
    /// Raises of a kernel weight of 0 that a fresh read of the API server did
    /// not confirm (the endpoint is draining), so not written.
    pub zero_raises_refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric, prefixed `ipvs_operator_`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ipvs_operator");
        let metrics = Metrics {
            evaluations: Family::default(),
            evaluation_seconds: Histogram::new(exponential_buckets(0.000_01, 4.0, 10)),
            netlink_writes: Family::default(),
            netlink_errors: Family::default(),
            drift_repairs: Family::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.000_1, 4.0, 10)),
            policy_loads: Family::default(),
            policy_load_failures: Family::default(),
            policy_config_refusals: Family::default(),
            policy_load_retries: Family::default(),
            policy_dir: CatalogCounters::default(),
            watched_objects: Family::default(),
            watch_errors: Family::default(),
            watch_lists: Family::default(),
            sweep_differences: Counter::default(),
            sweeps: Counter::default(),
            leader: Gauge::default(),
            sweep_cpu_seconds: Family::default(),
            zero_raises_refused: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("policy_evaluations", "Policy evaluations, by policy and result", metrics.evaluations.clone());
        registry.register("policy_evaluation_seconds", "Time of one policy evaluation", metrics.evaluation_seconds.clone());
        registry.register("netlink_writes", "IPVS writes applied, by kind", metrics.netlink_writes.clone());
        registry.register("netlink_errors", "IPVS writes the kernel refused, by kind", metrics.netlink_errors.clone());
        registry.register("drift_repairs", "Writes that undid a change made by someone else (kube-proxy), by kind", metrics.drift_repairs.clone());
        registry.register("reconcile_seconds", "Time of one reconcile (controller) or IPVS pass (agent)", metrics.reconcile_seconds.clone());
        registry.register("policy_loads", "Policy modules loaded, by policy", metrics.policy_loads.clone());
        registry.register("policy_load_failures", "Policy modules refused at load, by policy", metrics.policy_load_failures.clone());
        registry.register(
            "policy_config_refusals",
            "Configs a policy's validate-config refused, which it was not evaluated with, by policy",
            metrics.policy_config_refusals.clone(),
        );
        registry.register(
            "policy_load_retries",
            "Policy module loads tried again after trouble of the host's (compiler not started, instance pool full), by policy",
            metrics.policy_load_retries.clone(),
        );
        registry.register("policy_dir_scans", "Rescans of the policy directory", metrics.policy_dir.scans.clone());
        registry.register("policy_dir_read_bytes", "Bytes of policy module files read", metrics.policy_dir.bytes_read.clone());
        registry.register("watched_objects", "Objects in the watch caches, by kind", metrics.watched_objects.clone());
        registry.register("watch_errors", "Watch errors (the watch restarts with backoff), by kind", metrics.watch_errors.clone());
        registry.register("watch_lists", "Complete lists of a watched kind (the first, then one per relist), by kind", metrics.watch_lists.clone());
        registry.register("sweep_differences", "Periodic sweeps (agent) that found a virtual service to fix", metrics.sweep_differences.clone());
        registry.register("leader", "1 while this controller holds the leader Lease (it alone reconciles and writes), else 0", metrics.leader.clone());
        registry.register("sweeps", "Periodic sweeps (agent) started", metrics.sweeps.clone());
        registry.register(
            "sweep_cpu_seconds",
            "CPU time of the agent's periodic sweeps (its thread's, user and kernel), by step: read, compare, cross_check",
            metrics.sweep_cpu_seconds.clone(),
        );
        registry.register(
            "zero_raises_refused",
            "Kernel weights of 0 the agent wanted to raise but a fresh read of the EndpointSlices showed draining",
            metrics.zero_raises_refused.clone(),
        );
        // Known label values start at 0, so that they are on /metrics (and in
        // rate() queries) before the first write happens.
        for kind in ["weight", "scheduler", "virtual_service", "destination", "address", "nftables"] {
            for family in [&metrics.netlink_writes, &metrics.netlink_errors, &metrics.drift_repairs] {
                let _ = family.get_or_create(&KindLabels { kind: kind.into() });
            }
        }
        for step in ["read", "compare", "cross_check"] {
            let _ = metrics.sweep_cpu_seconds.get_or_create(&StepLabels { step: step.into() });
        }
        Metrics { registry, ..metrics }
    }

    /// Count an evaluation.
    pub fn evaluated(&self, policy: &str, result: &str, took: Duration) {
        // The name comes from a WeightedService: a label value stays bounded.
        let policy = crate::policy::bounded(policy.to_string());
        self.evaluations
            .get_or_create(&EvaluationLabels { policy, result: result.into() })
            .inc();
        self.evaluation_seconds.observe(took.as_secs_f64());
    }

    /// Count the outcome of an attempt to evaluate: an evaluation, or (for a
    /// config the policy refused, which it was not evaluated with) a refusal.
    pub fn attempted(&self, policy: &str, result: Result<(), &crate::policy::PolicyError>, took: Duration) {
        match result {
            Ok(()) => self.evaluated(policy, "ok", took),
            Err(crate::policy::PolicyError::ConfigInvalid { .. }) => {
                let policy = crate::policy::bounded(policy.to_string());
                self.policy_config_refusals.get_or_create(&PolicyLabels { policy }).inc();
            }
            Err(error) => self.evaluated(policy, error.kind(), took),
        }
    }

    /// Add to a counter of a kind.
    pub fn count(family: &Family<KindLabels, Counter>, kind: &str, n: u64) {
        if n > 0 {
            family.get_or_create(&KindLabels { kind: kind.into() }).inc_by(n);
        }
    }

    /// Add CPU time to a step of the sweep.
    pub fn sweep_step(&self, step: &str, cpu: Duration) {
        self.sweep_cpu_seconds.get_or_create(&StepLabels { step: step.into() }).inc_by(cpu.as_secs_f64());
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What `/healthz` and `/readyz` answer.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
    heartbeat_ms: AtomicU64,
}

impl Health {
    /// Ready from now on.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Whether ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The work loop is alive.
    pub fn beat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Alive: the work loop beat within `window` (or has not started yet).
    pub fn is_alive(&self, window: Duration) -> bool {
        let last = self.heartbeat_ms.load(Ordering::Relaxed);
        last == 0 || now_ms().saturating_sub(last) <= window.as_millis() as u64
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `addr` until the process ends.
/// `alive_window` is how long the work loop may go without a heartbeat.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>, health: Arc<Health>, alive_window: Duration) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accepting a metrics connection");
                continue;
            }
        };
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = answer(req.uri().path(), &metrics, &health, alive_window);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(path: &str, metrics: &Metrics, health: &Health, alive_window: Duration) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.encode()),
        "/healthz" if health.is_alive(alive_window) => (StatusCode::OK, "text/plain", "ok\n".into()),
        "/healthz" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "the work loop is stuck\n".into()),
        "/readyz" if health.is_ready() => (StatusCode::OK, "text/plain", "ready\n".into()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready: waiting for the first full sync\n".into()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics, /healthz or /readyz\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_exposed_with_the_prefix() {
        let metrics = Metrics::new();
        metrics.evaluated("label-selector", "ok", Duration::from_micros(40));
        Metrics::count(&metrics.netlink_writes, "weight", 3);
        let text = metrics.encode();
        assert!(text.contains("ipvs_operator_policy_evaluations_total{policy=\"label-selector\",result=\"ok\"} 1"), "{text}");
        assert!(text.contains("ipvs_operator_netlink_writes_total{kind=\"weight\"} 3"), "{text}");
    }

    /// The README lists every metric with its type: it must be what
    /// /metrics exposes, neither more nor less.
    #[test]
    fn the_operations_guide_lists_every_metric() {
        let metrics = Metrics::new();
        // Every family gets a sample (a family without any is not printed);
        // destructuring without `..` makes a new field fail to compile here.
        let Metrics {
            registry: _,
            evaluations: _,
            evaluation_seconds: _,
            netlink_writes,
            netlink_errors,
            drift_repairs,
            reconcile_seconds,
            policy_loads,
            policy_load_failures,
            policy_config_refusals,
            policy_load_retries,
            policy_dir,
            watched_objects,
            watch_errors,
            watch_lists,
            sweep_differences,
            sweeps,
            sweep_cpu_seconds: _,
            leader,
            zero_raises_refused,
        } = &metrics;
        sweeps.inc();
        leader.set(1);
        sweep_differences.inc();
        zero_raises_refused.inc();
        metrics.evaluated("label-selector", "ok", Duration::from_micros(40));
        for family in [netlink_writes, netlink_errors, drift_repairs, watch_errors, watch_lists] {
            Metrics::count(family, "weight", 1);
        }
        for family in [policy_loads, policy_load_failures, policy_config_refusals, policy_load_retries] {
            family.get_or_create(&PolicyLabels { policy: "p".into() }).inc();
        }
        policy_dir.scans.inc();
        policy_dir.bytes_read.inc();
        watched_objects.get_or_create(&KindLabels { kind: "Pod".into() }).set(1);
        reconcile_seconds.observe(0.001);

        let exposed: std::collections::BTreeSet<(String, String)> = metrics
            .encode()
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|rest| rest.split_once(' '))
            // Prometheus shows a counter's samples with `_total`; the guide does too.
            .map(|(name, kind)| (if kind == "counter" { format!("{name}_total") } else { name.to_string() }, kind.to_string()))
            .collect();
        let documented: std::collections::BTreeSet<(String, String)> = include_str!("../../README.md")
            .lines()
            .filter_map(|line| line.strip_prefix("| `ipvs_operator_"))
            .filter_map(|rest| {
                let (name, rest) = rest.split_once('`')?;
                Some((format!("ipvs_operator_{name}"), rest.split('|').nth(1)?.trim().to_string()))
            })
            .collect();
        assert_eq!(exposed.len(), 20, "{exposed:?}");
        assert_eq!(documented, exposed, "the README's metrics table (left) is not what /metrics exposes (right)");
    }

    #[test]
    fn known_kinds_start_at_zero() {
        let text = Metrics::new().encode();
        for line in [
            "ipvs_operator_netlink_writes_total{kind=\"weight\"} 0",
            "ipvs_operator_netlink_errors_total{kind=\"scheduler\"} 0",
            "ipvs_operator_drift_repairs_total{kind=\"scheduler\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn health_answers() {
        let metrics = Metrics::new();
        let health = Health::default();
        let window = Duration::from_secs(10);
        assert_eq!(answer("/readyz", &metrics, &health, window).status(), StatusCode::SERVICE_UNAVAILABLE);
        health.set_ready();
        assert_eq!(answer("/readyz", &metrics, &health, window).status(), StatusCode::OK);
        assert_eq!(answer("/healthz", &metrics, &health, window).status(), StatusCode::OK);
        health.heartbeat_ms.store(1, Ordering::Relaxed);
        assert_eq!(answer("/healthz", &metrics, &health, window).status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer("/nope", &metrics, &health, window).status(), StatusCode::NOT_FOUND);
    }
}
