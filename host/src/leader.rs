//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's
//! rules: the holder renews the Lease every retry period; another process
//! takes it over once it has seen the Lease unchanged for the lease duration,
//! by its own clock (clocks of different machines are never compared); the
//! holder stops leading when it could not renew within the renew deadline,
//! which is shorter than the lease duration, so that it stops before anyone
//! else can start. Every write names the Lease's resourceVersion: of two
//! processes that try at once, one wins.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// The Lease the controllers elect their leader on.
pub const LEASE_NAME: &str = "ipvs-operator-controller";

/// How the election runs.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// Who this process is (its pod's name).
    pub identity: String,
    /// How long others wait, from the last change of the Lease they saw,
    /// before they take it over.
    pub lease_duration: Duration,
    /// How long the holder keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often to renew, and to try to take the Lease over.
    pub retry_period: Duration,
}

/// Why a configuration cannot elect safely.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// The holder could still be leading when another takes over.
    #[error("the lease duration ({lease:?}) must be longer than the renew deadline ({renew:?})")]
    DeadlineNotShorter {
        /// The lease duration.
        lease: Duration,
        /// The renew deadline.
        renew: Duration,
    },
    /// Renewals could not be tried before the deadline.
    #[error("the renew deadline ({renew:?}) must be longer than the retry period ({retry:?})")]
    RetryNotShorter {
        /// The renew deadline.
        renew: Duration,
        /// The retry period.
        retry: Duration,
    },
    /// The Lease's duration is whole seconds.
    #[error("the lease duration must be at least one second, in whole seconds: {0:?}")]
    LeaseDuration(Duration),
    /// An identity is needed to tell holders apart.
    #[error("the holder identity is empty")]
    NoIdentity,
}

impl ElectionConfig {
    /// The configuration, or why it would let two processes lead at once.
    pub fn validated(self) -> Result<Self, ElectionError> {
        if self.lease_duration <= self.renew_deadline {
            return Err(ElectionError::DeadlineNotShorter { lease: self.lease_duration, renew: self.renew_deadline });
        }
        if self.renew_deadline <= self.retry_period {
            return Err(ElectionError::RetryNotShorter { renew: self.renew_deadline, retry: self.retry_period });
        }
        if self.lease_duration.as_secs() == 0 || self.lease_duration.subsec_nanos() != 0 {
            return Err(ElectionError::LeaseDuration(self.lease_duration));
        }
        if self.identity.is_empty() {
            return Err(ElectionError::NoIdentity);
        }
        Ok(self)
    }
}

/// What the Lease said when it was last seen to change, and when (by this
/// process's clock).
#[derive(Debug, Clone)]
struct Observed {
    record: LeaseRecord,
    at: Instant,
}

/// The parts of a Lease's spec that tell one renewal from another.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LeaseRecord {
    holder: Option<String>,
    duration_seconds: Option<i32>,
    acquired: Option<Timestamp>,
    renewed: Option<Timestamp>,
    transitions: Option<i32>,
}

impl LeaseRecord {
    fn of(spec: &LeaseSpec) -> Self {
        LeaseRecord {
            holder: spec.holder_identity.clone(),
            duration_seconds: spec.lease_duration_seconds,
            acquired: spec.acquire_time.as_ref().map(|t| t.0),
            renewed: spec.renew_time.as_ref().map(|t| t.0),
            transitions: spec.lease_transitions,
        }
    }
}

/// What one try to take or renew the Lease found.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// This process holds it now.
    Held,
    /// Another holds it, and its lease has not run out as far as this process saw.
    HeldBy(String),
}

/// Why a leader stopped leading.
#[derive(Debug, thiserror::Error)]
pub enum Lost {
    /// Another process holds the Lease.
    #[error("the lease is held by {0}")]
    TakenBy(String),
    /// No renewal succeeded within the renew deadline.
    #[error("no renewal succeeded within the renew deadline ({deadline:?}); the last error: {last}")]
    NotRenewed {
        /// The renew deadline.
        deadline: Duration,
        /// Why the last try failed.
        last: String,
    },
}

/// One process's side of the election.
pub struct LeaderElector {
    api: Api<Lease>,
    config: ElectionConfig,
    observed: Option<Observed>,
    /// When the last successful take-over or renewal started.
    renewed_at: Option<Instant>,
}

impl LeaderElector {
    /// An elector on `config`'s Lease.
    pub fn new(client: Client, config: ElectionConfig) -> Self {
        let api = Api::namespaced(client, &config.namespace);
        LeaderElector { api, config, observed: None, renewed_at: None }
    }

    /// Who this process is.
    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    /// Wait until this process holds the Lease, trying every retry period.
    pub async fn acquire(&mut self) {
        let mut last_holder: Option<String> = None;
        loop {
            let started = Instant::now();
            let mut wait = jittered(self.config.retry_period);
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Held) => {
                    self.renewed_at = Some(started);
                    tracing::info!(lease = %self.config.name, namespace = %self.config.namespace, identity = %self.config.identity, "leading");
                    return;
                }
                Ok(Attempt::HeldBy(holder)) => {
                    if last_holder.as_ref() != Some(&holder) {
                        tracing::info!(lease = %self.config.name, %holder, "following: the lease is held by another");
                        last_holder = Some(holder);
                    }
                    // Try again as soon as the holder's lease runs out, if that
                    // is sooner than a retry period: a take-over waits no longer.
                    if let Some(left) = self.time_left() {
                        wait = wait.min(left + Duration::from_millis(10));
                    }
                }
                Err(error) => tracing::warn!(lease = %self.config.name, %error, "cannot read or take the lease; trying again"),
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Renew the Lease every retry period; return when this process no
    /// longer leads. Cancel-safe: dropping it stops renewing (the Lease then
    /// runs out, or [`LeaderElector::release`] gives it up).
    pub async fn renew_until_lost(&mut self) -> Lost {
        let mut last_error = String::from("none");
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            let Some(renewed_at) = self.renewed_at else {
                return Lost::NotRenewed { deadline: self.config.renew_deadline, last: "never held".into() };
            };
            let deadline = renewed_at + self.config.renew_deadline;
            let started = Instant::now();
            let Some(left) = deadline.checked_duration_since(started).filter(|d| !d.is_zero()) else {
                return Lost::NotRenewed { deadline: self.config.renew_deadline, last: last_error };
            };
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Held)) => self.renewed_at = Some(started),
                Ok(Ok(Attempt::HeldBy(holder))) => return Lost::TakenBy(holder),
                Ok(Err(error)) => {
                    tracing::warn!(lease = %self.config.name, %error, "cannot renew the lease; trying again");
                    last_error = error.to_string();
                }
                Err(_) => last_error = "the renewal timed out".into(),
            }
        }
    }

    /// Give the Lease up, so that another process takes it over without
    /// waiting for it to run out (on a clean shutdown). As client-go: the
    /// holder is emptied and the duration set to one second.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else { return };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        let now = MicroTime(Timestamp::now());
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
        match self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(_) => tracing::info!(lease = %self.config.name, "released the lease"),
            Err(error) => tracing::warn!(lease = %self.config.name, %error, "cannot release the lease: it runs out instead"),
        }
        self.renewed_at = None;
    }

    /// One try: create the Lease, renew it, or take it over if it ran out.
    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let identity = self.config.identity.clone();
        let duration_seconds = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(identity.clone()),
                    lease_duration_seconds: Some(duration_seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            let created = self.api.create(&PostParams::default(), &lease).await?;
            self.observe(&created);
            return Ok(Attempt::Held);
        };
        self.observe(&lease);
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let held_by_other = !holder.is_empty() && holder != identity;
        // Observed just now: its duration is this Lease's.
        let ran_out = self.time_left().is_some_and(|left| left.is_zero());
        if held_by_other && !ran_out {
            return Ok(Attempt::HeldBy(holder));
        }
        if holder != identity {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.holder_identity = Some(identity);
        spec.lease_duration_seconds = Some(duration_seconds);
        spec.renew_time = Some(MicroTime(now));
        // A replace names the resourceVersion read: a conflict means another
        // process wrote in between, and this try fails.
        let written = self.api.replace(&self.config.name, &PostParams::default(), &lease).await?;
        self.observe(&written);
        Ok(Attempt::Held)
    }

    /// Note the Lease as seen now, if it changed since it was last seen.
    fn observe(&mut self, lease: &Lease) {
        let spec = lease.spec.clone().unwrap_or_default();
        let record = LeaseRecord::of(&spec);
        if self.observed.as_ref().is_none_or(|o| o.record != record) {
            self.observed = Some(Observed { record, at: Instant::now() });
        }
    }

    /// How long until the Lease as last observed runs out, by this process's clock.
    fn time_left(&self) -> Option<Duration> {
        let observed = self.observed.as_ref()?;
        let seconds = observed.record.duration_seconds.unwrap_or(0).max(0) as u64;
        Some(Duration::from_secs(seconds).saturating_sub(observed.at.elapsed()))
    }
}

/// `period` plus up to a fifth more, so that followers started together do
/// not all try at the same instant.
fn jittered(period: Duration) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    period + period.mul_f64(f64::from(nanos % 1000) / 5000.0)
}

/// This process's identity: `POD_NAME`, else the host's name and the process id.
pub fn default_identity() -> String {
    if let Some(name) = std::env::var("POD_NAME").ok().filter(|n| !n.is_empty()) {
        return name;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    let host = if host.is_empty() { "unknown-host".to_string() } else { host };
    format!("{host}_{}", std::process::id())
}

/// The Lease's namespace: `POD_NAMESPACE`, else `default`.
pub fn default_namespace() -> String {
    std::env::var("POD_NAMESPACE").ok().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(lease: u64, renew: u64, retry: u64) -> ElectionConfig {
        ElectionConfig {
            namespace: "default".into(),
            name: LEASE_NAME.into(),
            identity: "a".into(),
            lease_duration: Duration::from_secs(lease),
            renew_deadline: Duration::from_secs(renew),
            retry_period: Duration::from_secs(retry),
        }
    }

    #[test]
    fn a_configuration_that_could_let_two_lead_is_refused() {
        assert!(config(15, 10, 2).validated().is_ok());
        assert!(matches!(config(10, 10, 2).validated(), Err(ElectionError::DeadlineNotShorter { .. })));
        assert!(matches!(config(15, 2, 2).validated(), Err(ElectionError::RetryNotShorter { .. })));
        let mut fractional = config(15, 10, 2);
        fractional.lease_duration = Duration::from_millis(15_500);
        assert!(matches!(fractional.validated(), Err(ElectionError::LeaseDuration(_))));
        let mut anonymous = config(15, 10, 2);
        anonymous.identity.clear();
        assert!(matches!(anonymous.validated(), Err(ElectionError::NoIdentity)));
    }

    #[test]
    fn a_renewal_is_a_change_even_by_the_same_holder() {
        let spec = |renewed: i64| LeaseSpec {
            holder_identity: Some("b".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).expect("a timestamp"))),
            ..LeaseSpec::default()
        };
        assert_eq!(LeaseRecord::of(&spec(1)), LeaseRecord::of(&spec(1)));
        assert_ne!(LeaseRecord::of(&spec(1)), LeaseRecord::of(&spec(2)));
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        let period = Duration::from_secs(2);
        let j = jittered(period);
        assert!(j >= period && j <= period + period / 5, "{j:?}");
    }

    #[test]
    fn the_identity_is_the_pod_name_or_host_and_pid() {
        let identity = default_identity();
        match std::env::var("POD_NAME") {
            Ok(name) if !name.is_empty() => assert_eq!(identity, name),
            _ => assert!(identity.ends_with(&format!("_{}", std::process::id())), "{identity}"),
        }
    }
}
