//! Kubernetes Events about WeightedServices, deduplicated and rate-limited:
//! the same reason and message for the same object is published at most once
//! per [`REPEAT_AFTER`], so a failing policy on a thousand nodes does not flood
//! the API server.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;
use tokio::sync::mpsc;

/// How long an identical Event is not repeated.
pub const REPEAT_AFTER: Duration = Duration::from_secs(600);

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
pub fn publisher(client: Client, reporter: Reporter) -> (EventSink, impl std::future::Future<Output = ()> + Send) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Notice>();
    let recorder = Recorder::new(client, reporter);
    let task = async move {
        let mut limiter = Limiter::default();
        while let Some(notice) = rx.recv().await {
            if !limiter.allow(&notice, Instant::now()) {
                continue;
            }
            let event = Event {
                type_: notice.type_,
                reason: notice.reason.clone(),
                note: Some(truncate(&notice.note, 1000)),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(error) = recorder.publish(&event, &notice.reference).await {
                tracing::warn!(%error, reason = notice.reason, "could not publish an Event");
            }
        }
    };
    (EventSink { tx: Some(tx) }, task)
}

/// Remembers what was published when.
#[derive(Default)]
struct Limiter {
    last: HashMap<(String, String, String), (String, Instant)>,
}

impl Limiter {
    fn allow(&mut self, notice: &Notice, now: Instant) -> bool {
        let object = (
            notice.reference.namespace.clone().unwrap_or_default(),
            notice.reference.name.clone().unwrap_or_default(),
            notice.reason.clone(),
        );
        match self.last.get(&object) {
            Some((note, at)) if *note == notice.note && now.duration_since(*at) < REPEAT_AFTER => false,
            _ => {
                self.last.insert(object, (notice.note.clone(), now));
                true
            }
        }
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
    fn long_notes_are_cut_on_a_character_boundary() {
        let text = "é".repeat(600);
        let cut = truncate(&text, 1000);
        assert!(cut.len() <= 1000 + "…".len());
        assert!(cut.ends_with('…'));
    }
}
