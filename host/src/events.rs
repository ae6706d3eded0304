//! Kubernetes Events about WeightedServices, deduplicated and rate-limited:
//! the same reason and message for the same object is published at most once
//! per [`REPEAT_AFTER`], and each process publishes at most [`SPAM_BURST`]
//! Events about one object, then one per [`SPAM_REFILL`] (client-go's spam
//! filter), so a failing policy on a thousand nodes does not flood the API
//! server.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::events::{EventType, Reporter};
use kube::Client;
use tokio::sync::mpsc;

/// How long an identical Event is not repeated.
pub const REPEAT_AFTER: Duration = Duration::from_secs(600);

/// Events about one object a process may publish at once (client-go's
/// `EventSourceObjectSpamFilter`: burst 25)…
pub const SPAM_BURST: u32 = 25;

/// …then one more per this long (client-go's: one per 5 minutes).
pub const SPAM_REFILL: Duration = Duration::from_secs(300);

/// An Event to publish.
#[derive(Debug, Clone)]
pub struct Notice {
    /// The object it is about.
    pub reference: ObjectReference,
    /// Normal or Warning.
    pub type_: EventType,
    /// A PascalCase reason, e.g. `PolicyFailed`.
    pub reason: String,
    /// The message, for people.
    pub note: String,
}

/// Where synchronous code hands Events to the publisher. Cheap to clone.
#[derive(Clone)]
pub struct EventSink {
    tx: Option<mpsc::UnboundedSender<Notice>>,
}

impl EventSink {
    /// A sink that drops everything (tests, `eval`).
    pub fn discard() -> Self {
        EventSink { tx: None }
    }

    /// Queue `notice` for publishing (never blocks).
    pub fn send(&self, notice: Notice) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(notice);
        }
    }
}

/// A sink, and the task that publishes what it receives as `reporter`.
///
/// Events are created directly as `events.k8s.io/v1` objects rather than
/// through kube-runtime's `Recorder`: its cache is scanned on every publish
/// (12 % of the controller's CPU with 5,000 WeightedServices), and it keys
/// repeats by reason only, so a new message within six minutes was patched
/// onto the old Event and never shown. [`Limiter`] already decides repeats.
pub fn publisher(client: Client, reporter: Reporter) -> (EventSink, impl std::future::Future<Output = ()> + Send) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Notice>();
    let task = async move {
        let mut limiter = Limiter::default();
        while let Some(notice) = rx.recv().await {
            if !limiter.allow(&notice, Instant::now()) {
                continue;
            }
            let event = to_event(&reporter, &notice, Timestamp::now());
            let namespace = event.metadata.namespace.as_deref().unwrap_or_default();
            let api: Api<Event> = Api::namespaced(client.clone(), namespace);
            if let Err(error) = api.create(&PostParams::default(), &event).await {
                tracing::warn!(%error, reason = notice.reason, "could not publish an Event");
            }
        }
    };
    (EventSink { tx: Some(tx) }, task)
}

/// The `events.k8s.io/v1` Event for `notice`, named as kubectl and client-go
/// name them: the object's name and the time in hex nanoseconds.
fn to_event(reporter: &Reporter, notice: &Notice, now: Timestamp) -> Event {
    let about = notice.reference.name.as_deref().unwrap_or(&reporter.controller);
    Event {
        metadata: ObjectMeta {
            namespace: Some(notice.reference.namespace.clone().unwrap_or_else(|| "default".into())),
            name: Some(format!("{about}.{:x}", now.as_nanosecond())),
            ..Default::default()
        },
        action: Some("Reconcile".into()),
        reason: Some(notice.reason.clone()),
        note: Some(truncate(&notice.note, 1000)),
        type_: Some(
            match notice.type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            }
            .into(),
        ),
        event_time: Some(MicroTime(now)),
        regarding: Some(notice.reference.clone()),
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(reporter.instance.clone().unwrap_or_else(|| reporter.controller.clone())),
        ..Default::default()
    }
}

/// How often [`Limiter`] forgets what it may publish again anyway.
const FORGET_EVERY: Duration = Duration::from_secs(60);

/// Remembers what was published when.
struct Limiter {
    last: HashMap<(String, String, String), (String, Instant)>,
    /// Per object (kind, namespace, name): the spam filter's bucket.
    buckets: HashMap<(String, String, String), Bucket>,
    forgotten_at: Instant,
}

/// A token bucket: [`SPAM_BURST`] tokens, one back per [`SPAM_REFILL`].
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u32,
    /// When the last token came back (or the bucket was made).
    refilled_at: Instant,
}

impl Bucket {
    fn full(now: Instant) -> Self {
        Bucket { tokens: SPAM_BURST, refilled_at: now }
    }

    fn refill(&mut self, now: Instant) {
        let periods = now.duration_since(self.refilled_at).as_secs_f64() / SPAM_REFILL.as_secs_f64();
        let back = periods.floor().min(f64::from(SPAM_BURST)) as u32;
        if back > 0 {
            self.tokens = (self.tokens + back).min(SPAM_BURST);
            self.refilled_at = if self.tokens == SPAM_BURST { now } else { self.refilled_at + SPAM_REFILL * back };
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter { last: HashMap::new(), buckets: HashMap::new(), forgotten_at: Instant::now() }
    }
}

impl Limiter {
    fn allow(&mut self, notice: &Notice, now: Instant) -> bool {
        // Entries past the window decide nothing: drop them now and then, so
        // objects deleted long ago do not stay in memory.
        if now.duration_since(self.forgotten_at) >= FORGET_EVERY {
            self.last.retain(|_, (_, at)| now.duration_since(*at) < REPEAT_AFTER);
            self.buckets.retain(|_, bucket| {
                bucket.refill(now);
                bucket.tokens < SPAM_BURST
            });
            self.forgotten_at = now;
        }
        let object = (
            notice.reference.namespace.clone().unwrap_or_default(),
            notice.reference.name.clone().unwrap_or_default(),
            notice.reason.clone(),
        );
        if let Some((note, at)) = self.last.get(&object)
            && *note == notice.note
            && now.duration_since(*at) < REPEAT_AFTER
        {
            return false;
        }
        // A repeat costs the API server nothing (it is not sent): only what is
        // sent takes from the object's budget.
        let about = (notice.reference.kind.clone().unwrap_or_default(), object.0.clone(), object.1.clone());
        if !self.buckets.entry(about).or_insert_with(|| Bucket::full(now)).take(now) {
            return false;
        }
        self.last.insert(object, (notice.note.clone(), now));
        true
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(note: &str) -> Notice {
        Notice {
            reference: ObjectReference {
                namespace: Some("default".into()),
                name: Some("web".into()),
                ..Default::default()
            },
            type_: EventType::Warning,
            reason: "PolicyFailed".into(),
            note: note.into(),
        }
    }

    #[test]
    fn the_same_event_is_not_repeated_within_the_window() {
        let mut limiter = Limiter::default();
        let t0 = Instant::now();
        assert!(limiter.allow(&notice("trap"), t0));
        assert!(!limiter.allow(&notice("trap"), t0 + Duration::from_secs(5)));
        assert!(limiter.allow(&notice("timeout"), t0 + Duration::from_secs(6)), "a new message goes out");
        assert!(limiter.allow(&notice("timeout"), t0 + REPEAT_AFTER + Duration::from_secs(7)));
    }

    #[test]
    fn one_object_gets_a_burst_then_one_event_per_refill_period() {
        let mut limiter = Limiter::default();
        let t0 = Instant::now();
        let sent = (0..100).filter(|i| limiter.allow(&notice(&format!("failure {i}")), t0)).count();
        assert_eq!(sent, SPAM_BURST as usize, "a burst, then nothing");
        assert!(!limiter.allow(&notice("another"), t0 + SPAM_REFILL / 2));
        assert!(limiter.allow(&notice("another"), t0 + SPAM_REFILL), "one back after a refill period");
        assert!(!limiter.allow(&notice("and another"), t0 + SPAM_REFILL + Duration::from_secs(1)));
        // Another object has a budget of its own.
        let mut other = notice("failure 0");
        other.reference.name = Some("api".into());
        assert!(limiter.allow(&other, t0 + SPAM_REFILL));
        // Repeats that are not sent take nothing: after a long quiet, a full burst again.
        let later = t0 + SPAM_REFILL * (SPAM_BURST + 2);
        let sent = (0..100).filter(|i| limiter.allow(&notice(&format!("late {i}")), later)).count();
        assert_eq!(sent, SPAM_BURST as usize);
    }

    #[test]
    fn entries_past_the_window_are_forgotten() {
        let mut limiter = Limiter::default();
        let t0 = limiter.forgotten_at;
        for i in 0..100 {
            let mut n = notice("trap");
            n.reference.name = Some(format!("web-{i}"));
            assert!(limiter.allow(&n, t0));
        }
        assert_eq!(limiter.last.len(), 100);
        assert!(limiter.allow(&notice("trap"), t0 + REPEAT_AFTER + FORGET_EVERY));
        assert_eq!(limiter.last.len(), 1, "only the fresh entry is kept");
    }

    #[test]
    fn an_event_names_its_object_and_reporter() {
        let reporter = Reporter { controller: "ipvs-operator".into(), instance: None };
        let now = Timestamp::from_second(1_700_000_000).expect("a valid time");
        let event = to_event(&reporter, &notice("it trapped"), now);
        assert_eq!(event.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(event.metadata.name, Some(format!("web.{:x}", now.as_nanosecond())));
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(event.note.as_deref(), Some("it trapped"));
        assert_eq!(event.reporting_instance.as_deref(), Some("ipvs-operator"), "the controller stands in for a missing instance");
        assert_eq!(event.regarding.and_then(|r| r.name).as_deref(), Some("web"));
    }

    #[test]
    fn long_notes_are_cut_on_a_character_boundary() {
        let text = "é".repeat(600);
        let cut = truncate(&text, 1000);
        assert!(cut.len() <= 1000 + "…".len());
        assert!(cut.ends_with('…'));
    }
}
