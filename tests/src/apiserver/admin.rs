//! The test controls over HTTP, under `/_test/`, for the standalone binary
//! (and anything outside the test process, e.g. a script in the VM). Each
//! mirrors a [`Handle`] method; bodies are JSON.
//!
//! | method and path | body | does |
//! |---|---|---|
//! | `POST /_test/load` | YAML manifests | [`Handle::load_manifests`] |
//! | `POST /_test/nodes` | [`NodeConfig`](super::NodeConfig) | [`Handle::add_node`] |
//! | `POST /_test/pods/{ns}/{name}` | [`PodUpdate`](super::PodUpdate) | [`Handle::update_pod`] |
//! | `POST /_test/pods/{ns}/{name}/delete` | `{"graceSeconds": n}` or `{}` (until finished) | [`Handle::delete_pod`] |
//! | `POST /_test/pods/{ns}/{name}/finish` | — | [`Handle::finish_pod_termination`] |
//! | `POST /_test/faults/close-watches` | — | [`Handle::close_watches`] |
//! | `POST /_test/faults/break-watches` | — | [`Handle::break_watches`] |
//! | `POST /_test/faults/fail` | [`FailRule`](super::FailRule) | [`Handle::add_fail_rule`] |
//! | `POST /_test/faults/delay` | `{"millis": n}` (0 stops) | [`Handle::set_delay`] |
//! | `POST /_test/faults/lag-watches` | a lag (below), `{}` stops | [`Handle::lag_watches`] |
//! | `POST /_test/faults/expire` | — | [`Handle::expire_resource_versions`] |
//! | `GET /_test/requests` | — | [`Handle::requests`] |
//! | `DELETE /_test/requests` | — | [`Handle::clear_requests`] |
//!
//! A lag is `{"userAgentPrefix": "ipvs-operator-agent/", "minMillis": 200, "maxMillis": 800}`
//! (a [`WatchLag`]; `maxMillis` defaults to `minMillis`).

use std::collections::HashMap;
use std::time::Duration;

use hyper::{Method, Response};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::error::{ApiError, Error};
use super::http::{Body, error_response, json_response};
use super::{FailRule, Grace, Handle, NodeConfig, PodUpdate, WatchLag};

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { body };
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("bad admin request body: {e}")))
}

fn from_error(e: Error) -> ApiError {
    match e {
        Error::Api(a) => a,
        other => ApiError::bad_request(other.to_string()),
    }
}

#[derive(serde::Deserialize)]
struct DeleteBody {
    #[serde(rename = "graceSeconds")]
    grace_seconds: Option<u64>,
}

#[derive(serde::Deserialize)]
struct DelayBody {
    millis: u64,
}

/// A [`WatchLag`] over HTTP; without `userAgentPrefix`, lagging stops.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LagBody {
    user_agent_prefix: Option<String>,
    #[serde(default)]
    min_millis: u64,
    /// Defaults to `minMillis`.
    max_millis: Option<u64>,
}

/// Handles a request under `/_test/`; `rest` is the path after that prefix.
pub(crate) fn handle(h: &Handle, method: &Method, rest: &str, _query: &HashMap<String, String>, body: &[u8]) -> Response<Body> {
    match run(h, method, rest, body) {
        Ok(v) => json_response(200, &v),
        Err(e) => error_response(&e),
    }
}

fn run(h: &Handle, method: &Method, rest: &str, body: &[u8]) -> Result<Value, ApiError> {
    let segs: Vec<&str> = rest.trim_matches('/').split('/').collect();
    let ok = json!({"ok": true});
    match (method.as_str(), segs.as_slice()) {
        ("POST", ["load"]) => {
            let text = std::str::from_utf8(body).map_err(|_| ApiError::bad_request("manifest is not UTF-8"))?;
            let loaded = h.load_manifests(text).map_err(from_error)?;
            Ok(json!({"loaded": loaded}))
        }
        ("POST", ["nodes"]) => h.add_node(&parse::<NodeConfig>(body)?).map_err(from_error),
        ("POST", ["pods", ns, name]) => h.update_pod(ns, name, &parse::<PodUpdate>(body)?).map_err(from_error),
        ("POST", ["pods", ns, name, "delete"]) => {
            let b: DeleteBody = parse(body)?;
            let grace = match b.grace_seconds {
                None => Grace::UntilFinished,
                Some(0) => Grace::Immediate,
                Some(s) => Grace::For(Duration::from_secs(s)),
            };
            h.delete_pod(ns, name, grace).map_err(from_error)
        }
        ("POST", ["pods", ns, name, "finish"]) => h.finish_pod_termination(ns, name).map(|()| ok).map_err(from_error),
        ("POST", ["faults", "close-watches"]) => {
            h.close_watches();
            Ok(ok)
        }
        ("POST", ["faults", "break-watches"]) => {
            h.break_watches();
            Ok(ok)
        }
        ("POST", ["faults", "fail"]) => {
            h.add_fail_rule(parse::<FailRule>(body)?);
            Ok(ok)
        }
        ("POST", ["faults", "delay"]) => {
            let d: DelayBody = parse(body)?;
            h.set_delay((d.millis > 0).then(|| Duration::from_millis(d.millis)));
            Ok(ok)
        }
        ("POST", ["faults", "lag-watches"]) => {
            let b: LagBody = parse(body)?;
            h.lag_watches(b.user_agent_prefix.map(|user_agent_prefix| WatchLag {
                user_agent_prefix,
                min: Duration::from_millis(b.min_millis),
                max: Duration::from_millis(b.max_millis.unwrap_or(b.min_millis)),
            }));
            Ok(ok)
        }
        ("POST", ["faults", "expire"]) => {
            h.expire_resource_versions();
            Ok(ok)
        }
        ("GET", ["requests"]) => serde_json::to_value(h.requests()).map_err(|e| ApiError::bad_request(e.to_string())),
        ("DELETE", ["requests"]) => {
            h.clear_requests();
            Ok(ok)
        }
        _ => Err(ApiError::no_route(&format!("/_test/{rest}"))),
    }
}
