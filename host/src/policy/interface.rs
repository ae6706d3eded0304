//! The policy interface, every version of it this host serves: the bindings
//! generated from each WIT file, which version a module speaks (read from its
//! exports), and the calls into it.
//!
//! A module built against 0.1.x exports only the evaluator of 0.1; one built
//! against the current version (0.2.x) exports its evaluator and, optionally,
//! `metadata` (`describe`, `validate-config`). The versions are read from the
//! WIT files' `package` lines: they are the one place they are written.

use std::sync::{Arc, LazyLock};

use wasmtime::component::{Instance, InstancePre};
use wasmtime::Store;

use crate::snapshot::Snapshot;

/// The WIT package every version of the interface belongs to.
pub const PACKAGE: &str = "ipvs-operator:policy";

const WIT_CURRENT: &str = include_str!("../../../sdk/wit/policy/policy.wit");
const WIT_0_1: &str = include_str!("../../../sdk/wit/policy-0.1/policy.wit");

/// The conversion of a [`Snapshot`] into a version's `input`: the evaluator's
/// types are the same in every version, but each version's bindings are types
/// of their own.
macro_rules! evaluator_input {
    () => {
        use std::collections::HashMap;
        use std::fmt::Write as _;
        use std::sync::Arc;

        use crate::snapshot::{Labels, Snapshot};

        fn labels(map: &Labels) -> Vec<wit::Label<'_>> {
            map.iter().map(|(key, value)| wit::Label { key, value }).collect()
        }

        fn conditions(e: &crate::snapshot::Endpoint) -> wit::Conditions {
            let mut c = wit::Conditions::empty();
            for (on, flag) in [
                (e.ready, wit::Conditions::READY),
                (e.serving, wit::Conditions::SERVING),
                (e.terminating, wit::Conditions::TERMINATING),
            ] {
                if on {
                    c |= flag;
                }
            }
            c
        }

        fn timestamp(t: k8s_openapi::jiff::Timestamp) -> wit::Timestamp {
            wit::Timestamp {
                seconds: t.as_second(),
                nanos: t.subsec_nanosecond().max(0) as u32,
            }
        }

        /// Build the policy input for `s`, borrowing its strings, and hand it to `f`.
        pub(super) fn with_input<R>(s: &Snapshot, f: impl FnOnce(wit::Input<'_>) -> R) -> R {
            // Endpoints share label maps (see `LabelSets`): pass each map once.
            let mut index: HashMap<*const Labels, u32> = HashMap::new();
            let mut label_sets: Vec<Vec<wit::Label<'_>>> = Vec::new();
            let label_set_of: Vec<u32> = s
                .endpoints
                .iter()
                .map(|e| {
                    *index.entry(Arc::as_ptr(&e.labels)).or_insert_with(|| {
                        label_sets.push(labels(&e.labels));
                        (label_sets.len() - 1) as u32
                    })
                })
                .collect();
            let label_set_slices: Vec<&[wit::Label<'_>]> = label_sets.iter().map(Vec::as_slice).collect();
            let mut location_index: HashMap<(&str, Option<&str>), u32> = HashMap::new();
            let mut locations: Vec<wit::Location<'_>> = Vec::new();
            let location_of: Vec<Option<u32>> = s
                .endpoints
                .iter()
                .map(|e| {
                    let node_name = e.node_name.as_deref()?;
                    let zone = e.zone.as_deref();
                    Some(*location_index.entry((node_name, zone)).or_insert_with(|| {
                        locations.push(wit::Location { node_name, zone });
                        (locations.len() - 1) as u32
                    }))
                })
                .collect();
            // All addresses in one buffer: one allocation instead of one per endpoint.
            let mut address_text = String::with_capacity(s.endpoints.len() * 16);
            let address_ends: Vec<usize> = s
                .endpoints
                .iter()
                .map(|e| {
                    let _ = write!(address_text, "{}", e.address);
                    address_text.len()
                })
                .collect();
            let service_labels = [labels(&s.service.selector), labels(&s.service.labels), labels(&s.service.annotations)];
            let group_selectors: Vec<Vec<wit::Label<'_>>> = s.groups.iter().map(|g| labels(&g.selector)).collect();
            let groups: Vec<wit::WeightGroup<'_>> = s
                .groups
                .iter()
                .zip(&group_selectors)
                .map(|(g, selector)| wit::WeightGroup { weight: g.weight, selector })
                .collect();
            let endpoints: Vec<wit::Endpoint<'_>> = s
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| wit::Endpoint {
                    pod_name: e.pod_name.as_deref(),
                    address: &address_text[if i == 0 { 0 } else { address_ends[i - 1] }..address_ends[i]],
                    location: location_of[i],
                    label_set: label_set_of[i],
                    conditions: conditions(e),
                    created: e.created.map(timestamp),
                    ready_since: e.ready_since.map(timestamp),
                })
                .collect();
            let node_labels = s.node.as_ref().map(|n| labels(&n.labels)).unwrap_or_default();
            f(wit::Input {
                service: wit::Service {
                    namespace: &s.service.namespace,
                    name: &s.service.name,
                    selector: &service_labels[0],
                    labels: &service_labels[1],
                    annotations: &service_labels[2],
                },
                groups: &groups,
                config: &s.config,
                label_sets: &label_set_slices,
                locations: &locations,
                endpoints: &endpoints,
                node: s.node.as_ref().map(|n| wit::Node {
                    name: &n.name,
                    zone: n.zone.as_deref(),
                    labels: &node_labels,
                }),
                now: timestamp(s.now),
            })
        }
    };
}

/// The current interface (`sdk/wit/policy/`), which the SDK builds.
mod current {
    wasmtime::component::bindgen!({
        path: "../sdk/wit/policy",
        world: "policy",
        // The input is lowered straight from borrowed strings: no copies on the host.
        ownership: Borrowing { duplicate_if_necessary: false },
    });
    pub(super) use exports::ipvs_operator::policy::evaluator as wit;
    pub(super) use exports::ipvs_operator::policy::metadata;
    evaluator_input!();
}

/// Version 0.1 (`sdk/wit/policy-0.1/`, frozen), for modules built against it.
mod v0_1 {
    wasmtime::component::bindgen!({
        path: "../sdk/wit/policy-0.1",
        world: "policy",
        ownership: Borrowing { duplicate_if_necessary: false },
    });
    pub(super) use exports::ipvs_operator::policy::evaluator as wit;
    evaluator_input!();
}

/// A version of the interface, `MAJOR.MINOR.PATCH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct InterfaceVersion {
    major: u64,
    minor: u64,
    patch: u64,
}

impl InterfaceVersion {
    /// `MAJOR.MINOR.PATCH`, nothing else (no pre-release or build suffix).
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split('.').map(|p| p.parse::<u64>().ok());
        let version = InterfaceVersion { major: parts.next()??, minor: parts.next()??, patch: parts.next()?? };
        parts.next().is_none().then_some(version)
    }

    /// Whether a module built against `self` can be served by a host that
    /// speaks `host` (semver: the same major, and below 1.0 the same minor —
    /// the rule wasmtime applies when it looks up an export).
    pub fn served_by(self, host: InterfaceVersion) -> bool {
        self.major == host.major && (self.major != 0 || self.minor == host.minor)
    }

    /// The version named in a WIT file's `package` line.
    fn of_wit(wit: &str) -> Self {
        wit.lines()
            .find_map(|line| line.trim().strip_prefix("package ipvs-operator:policy@"))
            .and_then(|rest| rest.strip_suffix(';'))
            .and_then(InterfaceVersion::parse)
            .expect("our own WIT file names its version")
    }
}

impl std::fmt::Display for InterfaceVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The versions this host serves, newest first: `[current, 0.1]`.
pub fn served() -> &'static [InterfaceVersion; 2] {
    static SERVED: LazyLock<[InterfaceVersion; 2]> =
        LazyLock::new(|| [InterfaceVersion::of_wit(WIT_CURRENT), InterfaceVersion::of_wit(WIT_0_1)]);
    &SERVED
}

/// The name under which a module exports the evaluator of `version`.
pub fn evaluator_export(version: InterfaceVersion) -> String {
    format!("{PACKAGE}/evaluator@{version}")
}

/// What the host expects, for people: `ipvs-operator:policy/evaluator@0.2.x or @0.1.x`.
pub fn expected_exports() -> String {
    let [current, old] = served();
    let series = |v: &InterfaceVersion| format!("{}.{}.x", v.major, v.minor);
    format!("{PACKAGE}/evaluator@{} or @{}", series(current), series(old))
}

/// A policy's account of itself (`describe`, interface 0.2 and later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// For people.
    pub description: String,
    /// The JSON Schema of its config, as JSON text.
    pub config_schema: Option<String>,
}

/// One thing `validate-config` found wrong with a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// A JSON path into the config (`$.steps[2].share`; `$` for the whole).
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// What `evaluate` returned, whatever the version.
pub struct RawDecision {
    /// One weight per endpoint (not checked yet).
    pub weights: Vec<u32>,
    /// Evaluate again after this long.
    pub requeue_after_ms: Option<u64>,
    /// The policy's message.
    pub message: Option<String>,
}

/// A module's exports, looked up once when it is loaded: which version of
/// the interface it speaks, and where its functions are.
#[derive(Clone)]
pub enum Exports {
    /// Built against 0.1.x: the evaluator only.
    V0_1(Arc<v0_1::wit::GuestIndices>),
    /// Built against the current version: the evaluator and, if it has it, `metadata`.
    Current {
        /// The evaluator.
        evaluator: Arc<current::wit::GuestIndices>,
        /// `describe` and `validate-config`, when the module exports them.
        metadata: Option<Arc<current::metadata::GuestIndices>>,
    },
}

/// Why a module's exports do not fit any version this host serves.
#[derive(Debug)]
pub enum ExportsMismatch {
    /// No evaluator of a version this host serves among its exports.
    NoEvaluator,
    /// An evaluator of a served version, with the wrong functions or types.
    Types(String),
}

impl Exports {
    /// Find the evaluator among `names` (the component's exports) and look up
    /// its functions in `pre`; the version is that of the export's name.
    pub fn find<T>(pre: &InstancePre<T>, names: &[String]) -> Result<(Exports, InterfaceVersion), ExportsMismatch> {
        let prefix = format!("{PACKAGE}/evaluator@");
        let [current, old] = *served();
        let version = names
            .iter()
            .filter_map(|n| n.strip_prefix(&prefix).and_then(InterfaceVersion::parse))
            .find(|v| v.served_by(current) || v.served_by(old))
            .ok_or(ExportsMismatch::NoEvaluator)?;
        let types = |e: wasmtime::Error| ExportsMismatch::Types(format!("{e:#}"));
        let exports = if version.served_by(current) {
            let evaluator = current::wit::GuestIndices::new(pre).map_err(types)?;
            let metadata_name = format!("{PACKAGE}/metadata@");
            let metadata = match names.iter().any(|n| n.starts_with(&metadata_name)) {
                true => Some(Arc::new(current::metadata::GuestIndices::new(pre).map_err(types)?)),
                false => None,
            };
            Exports::Current { evaluator: Arc::new(evaluator), metadata }
        } else {
            Exports::V0_1(Arc::new(v0_1::wit::GuestIndices::new(pre).map_err(types)?))
        };
        Ok((exports, version))
    }

    /// Check the types of every function against the module's, in `instance`
    /// (wasmtime checks them when a function is loaded).
    pub fn check_types<T>(&self, store: &mut Store<T>, instance: &Instance) -> wasmtime::Result<()> {
        match self {
            Exports::V0_1(evaluator) => evaluator.load(&mut *store, instance).map(drop),
            Exports::Current { evaluator, metadata } => {
                evaluator.load(&mut *store, instance)?;
                if let Some(metadata) = metadata {
                    metadata.load(&mut *store, instance)?;
                }
                Ok(())
            }
        }
    }

    /// Whether the module exports `describe` and `validate-config`.
    pub fn has_metadata(&self) -> bool {
        matches!(self, Exports::Current { metadata: Some(_), .. })
    }

    /// Call `evaluate` with `snapshot` as the input.
    pub fn evaluate<T>(
        &self,
        store: &mut Store<T>,
        instance: &Instance,
        snapshot: &Snapshot,
    ) -> wasmtime::Result<Result<RawDecision, String>> {
        match self {
            Exports::V0_1(evaluator) => {
                let evaluator = evaluator.load(&mut *store, instance)?;
                let decision = v0_1::with_input(snapshot, |input| evaluator.call_evaluate(&mut *store, input))?;
                Ok(decision.map(|d| RawDecision { weights: d.weights, requeue_after_ms: d.requeue_after_ms, message: d.message }))
            }
            Exports::Current { evaluator, .. } => {
                let evaluator = evaluator.load(&mut *store, instance)?;
                let decision = current::with_input(snapshot, |input| evaluator.call_evaluate(&mut *store, input))?;
                Ok(decision.map(|d| RawDecision { weights: d.weights, requeue_after_ms: d.requeue_after_ms, message: d.message }))
            }
        }
    }

    /// Call `describe`; `None` when the module does not export it.
    pub fn describe<T>(&self, store: &mut Store<T>, instance: &Instance) -> wasmtime::Result<Option<Description>> {
        let Exports::Current { metadata: Some(metadata), .. } = self else { return Ok(None) };
        let d = metadata.load(&mut *store, instance)?.call_describe(&mut *store)?;
        Ok(Some(Description {
            name: d.name,
            version: d.version,
            description: d.description,
            config_schema: d.config_schema,
        }))
    }

    /// Call `validate-config`; `None` when the module does not export it.
    pub fn validate_config<T>(
        &self,
        store: &mut Store<T>,
        instance: &Instance,
        config: &str,
    ) -> wasmtime::Result<Option<Result<(), Vec<ConfigIssue>>>> {
        let Exports::Current { metadata: Some(metadata), .. } = self else { return Ok(None) };
        let verdict = metadata.load(&mut *store, instance)?.call_validate_config(&mut *store, config)?;
        Ok(Some(verdict.map_err(|errors| {
            errors.into_iter().map(|e| ConfigIssue { path: e.path, message: e.message }).collect()
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_versions_are_read_from_the_wit_files() {
        let [current, old] = served();
        assert_eq!(current.to_string(), ipvs_policy_sdk::INTERFACE_VERSION, "the SDK builds the current version");
        assert_eq!(old.to_string(), "0.1.0", "0.1.0 is frozen");
        assert!(current > old);
        assert_eq!(evaluator_export(*old), "ipvs-operator:policy/evaluator@0.1.0");
    }

    #[test]
    fn semver_compatibility_is_wasmtimes() {
        let v = |t| InterfaceVersion::parse(t).unwrap();
        assert!(v("0.1.3").served_by(v("0.1.0")));
        assert!(!v("0.2.0").served_by(v("0.1.0")));
        assert!(v("1.4.0").served_by(v("1.0.0")));
        assert!(!v("2.0.0").served_by(v("1.0.0")));
        assert_eq!(InterfaceVersion::parse("0.2"), None);
        assert_eq!(InterfaceVersion::parse("0.2.0-rc1"), None);
        assert_eq!(InterfaceVersion::parse("0.2.0.1"), None);
    }
}
