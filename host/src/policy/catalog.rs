//! Finding policies by name.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{LoadedPolicy, PolicyEngine, PolicyError};

include!(concat!(env!("OUT_DIR"), "/policies.rs"));

/// The policies a WeightedService can name: the built-in ones, compiled into the
/// binary and compiled to machine code on first use.
pub struct Catalog {
    engine: PolicyEngine,
    modules: BTreeMap<String, &'static [u8]>,
    loaded: Mutex<BTreeMap<String, LoadedPolicy>>,
}

impl Catalog {
    /// The built-in policies.
    pub fn builtin(engine: PolicyEngine) -> Self {
        Catalog {
            engine,
            modules: BUILTIN_POLICIES.iter().map(|(n, b)| (n.to_string(), *b)).collect(),
            loaded: Mutex::new(BTreeMap::new()),
        }
    }

    /// The engine policies run in.
    pub fn engine(&self) -> &PolicyEngine {
        &self.engine
    }

    /// The names of every policy.
    pub fn names(&self) -> Vec<String> {
        self.modules.keys().cloned().collect()
    }

    /// The policy called `name`, whose module must hash to `pin` if given.
    pub fn get_pinned(&self, name: &str, pin: Option<&str>) -> Result<LoadedPolicy, PolicyError> {
        let policy = self.get(name)?;
        match pin {
            Some(pin) if pin != policy.sha256() => Err(PolicyError::PinMismatch {
                policy: name.into(),
                expected: pin.into(),
                actual: policy.sha256().into(),
            }),
            _ => Ok(policy),
        }
    }

    /// The policy called `name`, compiled.
    pub fn get(&self, name: &str) -> Result<LoadedPolicy, PolicyError> {
        if let Some(policy) = self.loaded.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
            return Ok(policy.clone());
        }
        let bytes = self.modules.get(name).ok_or_else(|| PolicyError::NotFound {
            name: name.into(),
            known: self.names().join(", "),
        })?;
        let policy = self.engine.load(name, bytes)?;
        self.loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.into(), policy.clone());
        Ok(policy)
    }
}
