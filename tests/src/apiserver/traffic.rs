//! What the server sent each client, by resource: requests, response bytes,
//! watch events and watch bytes. Clients are told apart by their User-Agent
//! (an agent's names its node). `make bench-apiload` reads it to put a number
//! on what N agents cost an API server.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What one client received of one resource.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Traffic {
    /// Requests answered (a watch counts once, when it starts).
    pub requests: u64,
    /// Bytes of the responses that are not watches (lists, gets, writes).
    pub response_bytes: u64,
    /// Objects in list responses.
    pub list_items: u64,
    /// Watch events sent (ADDED, MODIFIED, DELETED; not bookmarks).
    pub watch_events: u64,
    /// Bytes of watch streams, bookmarks included.
    pub watch_bytes: u64,
}

impl Traffic {
    /// Every byte sent.
    pub fn bytes(&self) -> u64 {
        self.response_bytes + self.watch_bytes
    }

    /// The sum of two records.
    pub fn plus(&self, other: &Traffic) -> Traffic {
        Traffic {
            requests: self.requests + other.requests,
            response_bytes: self.response_bytes + other.response_bytes,
            list_items: self.list_items + other.list_items,
            watch_events: self.watch_events + other.watch_events,
            watch_bytes: self.watch_bytes + other.watch_bytes,
        }
    }
}

/// Traffic by (User-Agent, resource plural).
pub type TrafficLog = BTreeMap<(String, String), Traffic>;

/// One client's traffic by resource, from a [`TrafficLog`]: the entries whose
/// User-Agent is `user_agent`.
pub fn of_client(log: &TrafficLog, user_agent: &str) -> BTreeMap<String, Traffic> {
    log.iter().filter(|((ua, _), _)| ua == user_agent).map(|((_, resource), t)| (resource.clone(), *t)).collect()
}
