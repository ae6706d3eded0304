//! Finding policies by name: the built-in ones, compiled into the binary, and
//! `NAME.wasm` modules in a policy directory (a mounted ConfigMap), reloaded
//! when the directory changes.
//!
//! The kubelet updates a ConfigMap volume by writing a new timestamped
//! directory and swapping the `..data` symlink, so the directory is watched (not
//! the files), and every change leads to a rescan of what is there once things
//! have settled. A module that does not compile, fails its load checks, or fails
//! on a sample input never replaces a working one. A module whose file is
//! deleted stays in use (with a warning) until it is replaced: the
//! WeightedServices that name it keep their weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::engine::hex_sha256;
use super::{LoadedPolicy, PolicyEngine, PolicyError};
use crate::crd::WeightGroup;
use crate::snapshot::{Endpoint, ServiceMeta, Snapshot};

include!(concat!(env!("OUT_DIR"), "/policies.rs"));

/// The bytes of a built-in policy or a test fixture, as the binary embeds them.
pub fn embedded_module(name: &str) -> Option<&'static [u8]> {
    BUILTIN_POLICIES.iter().chain(FIXTURE_POLICIES).find(|(n, _)| *n == name).map(|(_, bytes)| *bytes)
}

/// How long the directory must be quiet before it is read again: a ConfigMap
/// update is several filesystem events.
const SETTLE: Duration = Duration::from_millis(150);

/// What a rescan of the policy directory changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogEvent {
    /// A module was loaded (new, or replaced with different bytes).
    Loaded {
        /// The policy's name.
        name: String,
        /// The new module's hash.
        sha256: String,
    },
    /// A module was refused; the previous one (if any) stays in use.
    Failed {
        /// The policy's name.
        name: String,
        /// Which file, and why.
        error: String,
    },
    /// A module's file is gone; the loaded module stays in use.
    Removed {
        /// The policy's name.
        name: String,
    },
}

impl CatalogEvent {
    /// The policy the event is about.
    pub fn name(&self) -> &str {
        match self {
            CatalogEvent::Loaded { name, .. } | CatalogEvent::Failed { name, .. } | CatalogEvent::Removed { name } => name,
        }
    }
}

type Listener = Box<dyn Fn(&CatalogEvent) + Send + Sync>;

/// What [`Catalog::lookup`] found.
enum Found {
    Loaded(LoadedPolicy),
    Source(Source),
}

/// Where a policy comes from.
#[derive(Clone)]
enum Source {
    Builtin(&'static [u8]),
    File { path: PathBuf, removed: bool },
}

#[derive(Default)]
struct State {
    /// Compiled policies by name.
    loaded: BTreeMap<String, LoadedPolicy>,
    /// Where each known policy comes from.
    sources: BTreeMap<String, Source>,
    /// The last refusal of a file, by name (kept until the file loads).
    failures: BTreeMap<String, String>,
    /// Hash of the bytes last refused, so an unchanged broken file is not retried.
    refused: BTreeMap<String, String>,
}

/// The policies a WeightedService can name.
pub struct Catalog {
    engine: PolicyEngine,
    dir: Option<PathBuf>,
    state: Mutex<State>,
    listeners: Mutex<Vec<Listener>>,
    /// Held while [`Catalog::get`] compiles, so that callers asking for the
    /// same policy at once wait for one compile instead of each starting their
    /// own. One lock for all policies: compiles are rare, and a compile uses
    /// every core anyway.
    compiling: Mutex<()>,
    /// How many modules [`Catalog::get`] compiled (tests check there is one per policy).
    compiled_on_demand: AtomicUsize,
}

impl Catalog {
    /// The built-in policies (compiled to machine code on first use).
    pub fn builtin(engine: PolicyEngine) -> Self {
        let sources = BUILTIN_POLICIES.iter().map(|(n, b)| (n.to_string(), Source::Builtin(b))).collect();
        Catalog {
            engine,
            dir: None,
            state: Mutex::new(State { sources, ..State::default() }),
            listeners: Mutex::new(Vec::new()),
            compiling: Mutex::new(()),
            compiled_on_demand: AtomicUsize::new(0),
        }
    }

    /// The built-in policies and the modules in `dir` (read now; see
    /// [`Catalog::watch`] to follow changes). A module there named like a
    /// built-in one takes its place.
    pub fn with_dir(engine: PolicyEngine, dir: &Path) -> Self {
        let mut catalog = Self::builtin(engine);
        catalog.dir = Some(dir.to_path_buf());
        for event in catalog.rescan() {
            if let CatalogEvent::Failed { name, error } = &event {
                tracing::warn!(policy = %name, %error, "policy module refused");
            }
        }
        catalog
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The engine policies run in.
    pub fn engine(&self) -> &PolicyEngine {
        &self.engine
    }

    /// The policy directory, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The names of every policy.
    pub fn names(&self) -> Vec<String> {
        self.state().sources.keys().cloned().collect()
    }

    /// Why the module file of `name` was last refused, while it has not loaded since.
    pub fn failure(&self, name: &str) -> Option<String> {
        self.state().failures.get(name).cloned()
    }

    /// Be told of every reload, refusal and removal.
    pub fn subscribe(&self, listener: impl Fn(&CatalogEvent) + Send + Sync + 'static) {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner()).push(Box::new(listener));
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
        if let Found::Loaded(policy) = self.lookup(name)? {
            return Ok(policy);
        }
        // Compiled outside the state lock (it takes a while, and other
        // policies are in use), one at a time: whoever waited here finds it
        // loaded.
        let _one_at_a_time = self.compiling.lock().unwrap_or_else(|p| p.into_inner());
        match self.lookup(name)? {
            Found::Loaded(policy) => Ok(policy),
            Found::Source(source) => self.compile(name, source),
        }
    }

    /// What the catalog has for `name`: the compiled policy, or where to
    /// compile it from; an error if nothing is called that.
    fn lookup(&self, name: &str) -> Result<Found, PolicyError> {
        let state = self.state();
        if let Some(policy) = state.loaded.get(name) {
            return Ok(Found::Loaded(policy.clone()));
        }
        if let Some(source) = state.sources.get(name) {
            return Ok(Found::Source(source.clone()));
        }
        Err(match state.failures.get(name) {
            Some(error) => PolicyError::Compile { policy: name.into(), reason: error.clone() },
            None => PolicyError::NotFound {
                name: name.into(),
                known: state.sources.keys().cloned().collect::<Vec<_>>().join(", "),
            },
        })
    }

    fn compile(&self, name: &str, source: Source) -> Result<LoadedPolicy, PolicyError> {
        self.compiled_on_demand.fetch_add(1, Ordering::Relaxed);
        let policy = match source {
            Source::Builtin(bytes) => self.engine.load(name, bytes)?,
            Source::File { path, .. } => {
                let bytes = std::fs::read(&path).map_err(|e| PolicyError::Compile {
                    policy: name.into(),
                    reason: format!("reading {}: {e}", path.display()),
                })?;
                self.engine.load(name, &bytes)?
            }
        };
        // A rescan may have loaded newer bytes meanwhile: those win.
        Ok(self.state().loaded.entry(name.into()).or_insert(policy).clone())
    }

    /// Read the policy directory again and load what changed. Returns what
    /// happened (listeners are told too).
    pub fn rescan(&self) -> Vec<CatalogEvent> {
        let Some(dir) = &self.dir else { return Vec::new() };
        let present = match module_files(dir) {
            Ok(files) => files,
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "cannot read the policy directory");
                return Vec::new();
            }
        };
        let mut events = Vec::new();
        for (name, path) in &present {
            let bytes = match std::fs::read(path) {
                Ok(bytes) => bytes,
                // Replaced while we looked: the next rescan sees the new one.
                Err(error) => {
                    tracing::debug!(path = %path.display(), %error, "module vanished while reading it");
                    continue;
                }
            };
            let sha256 = hex_sha256(&bytes);
            {
                let mut state = self.state();
                let same = state.loaded.get(name).is_some_and(|p| p.sha256() == sha256);
                if same {
                    if let Some(Source::File { removed, .. }) = state.sources.get_mut(name) {
                        *removed = false;
                    }
                    continue;
                }
                if state.refused.get(name) == Some(&sha256) {
                    continue;
                }
            }
            match self.engine.load(name, &bytes).and_then(|policy| check_sample(&policy).map(|()| policy)) {
                Ok(policy) => {
                    let mut state = self.state();
                    state.loaded.insert(name.clone(), policy);
                    state.sources.insert(name.clone(), Source::File { path: path.clone(), removed: false });
                    state.failures.remove(name);
                    state.refused.remove(name);
                    tracing::info!(policy = %name, %sha256, path = %path.display(), "policy module loaded");
                    events.push(CatalogEvent::Loaded { name: name.clone(), sha256 });
                }
                Err(error) => {
                    // Running out of time on a busy machine is no property of
                    // the bytes: the next rescan tries the module again.
                    let transient = matches!(error, PolicyError::Timeout { .. });
                    let error = format!("{}: {error}", path.display());
                    let mut state = self.state();
                    state.failures.insert(name.clone(), error.clone());
                    if !transient {
                        state.refused.insert(name.clone(), sha256);
                    }
                    let keeps = if state.loaded.contains_key(name) { "; the previous module stays in use" } else { "" };
                    tracing::warn!(policy = %name, %error, "policy module refused{keeps}");
                    events.push(CatalogEvent::Failed { name: name.clone(), error });
                }
            }
        }
        {
            let mut state = self.state();
            for (name, source) in state.sources.iter_mut() {
                if let Source::File { removed, .. } = source
                    && !*removed
                    && !present.contains_key(name)
                {
                    *removed = true;
                    tracing::warn!(policy = %name, "policy module deleted from the directory: the loaded module stays in use until WeightedServices stop naming it");
                    events.push(CatalogEvent::Removed { name: name.clone() });
                }
            }
        }
        let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        for event in &events {
            for listener in listeners.iter() {
                listener(event);
            }
        }
        events
    }

    /// Follow the policy directory: a rescan after every change (once the
    /// directory has been quiet for a moment) and every `every` regardless, in
    /// case an event was missed. Runs until the catalog is dropped.
    pub fn watch(self: &Arc<Self>, every: Duration) -> Result<(), notify::Error> {
        use notify::Watcher as _;
        let Some(dir) = self.dir.clone() else { return Ok(()) };
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok() {
                let _ = tx.send(());
            }
        })?;
        watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("policy-dir".into())
            .spawn(move || {
                let _watcher = watcher; // lives as long as the thread
                loop {
                    let changed = rx.recv_timeout(every).is_ok();
                    if changed {
                        // Let the burst of events of one update pass.
                        while rx.recv_timeout(SETTLE).is_ok() {}
                    }
                    let Some(catalog) = weak.upgrade() else { return };
                    catalog.rescan();
                }
            })
            .map_err(notify::Error::io)?;
        Ok(())
    }
}

/// `NAME.wasm` files in `dir` (through symlinks, as a ConfigMap volume has them).
fn module_files(dir: &Path) -> std::io::Result<BTreeMap<String, PathBuf>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        // The ConfigMap's own bookkeeping (`..data`, `..2026_…`) is not a module.
        if file_name.starts_with('.') {
            continue;
        }
        if let Some(name) = file_name.strip_suffix(".wasm")
            && path.is_file()
        {
            files.insert(name.to_string(), path);
        }
    }
    Ok(files)
}

/// A new module must get through a sample evaluation: it may refuse the sample
/// (its config is not the real one), but not trap, run out of time or memory,
/// or return an invalid decision.
fn check_sample(policy: &LoadedPolicy) -> Result<(), PolicyError> {
    let endpoint = |i: u8, env: &str| Endpoint {
        pod_name: Some(format!("sample-{env}-{i}")),
        address: std::net::IpAddr::from([10, 0, 0, i]),
        node_name: Some("node-a".into()),
        zone: Some("zone-a".into()),
        labels: Arc::new([("app".to_string(), "sample".to_string()), ("env".to_string(), env.to_string())].into()),
        ready: true,
        serving: true,
        terminating: false,
        created: Some(Timestamp::UNIX_EPOCH),
        ready_since: Some(Timestamp::UNIX_EPOCH),
        ports: vec![],
    };
    let sample = Snapshot {
        service: ServiceMeta {
            namespace: "default".into(),
            name: "sample".into(),
            selector: [("app".to_string(), "sample".to_string())].into(),
            ..ServiceMeta::default()
        },
        groups: vec![WeightGroup { weight: 2, selector: [("env".to_string(), "prod".to_string())].into() }],
        config: "{}".into(),
        endpoints: vec![endpoint(1, "prod"), endpoint(2, "canary")],
        node: None,
        now: Timestamp::from_second(1_767_225_600).unwrap_or(Timestamp::UNIX_EPOCH),
    };
    // The first calls of a new module pay one-time costs (its code paged in,
    // its memory set up) that can exceed the deadline on a busy or emulated
    // CPU: a timeout is tried again before the module is refused.
    let mut attempts = 0;
    loop {
        attempts += 1;
        match policy.evaluate(&sample) {
            Ok(_) | Err(PolicyError::Failed { .. }) => return Ok(()),
            Err(PolicyError::Timeout { .. }) if attempts < SAMPLE_ATTEMPTS => {}
            Err(error) => return Err(error),
        }
    }
}

/// How many times the sample evaluation may run out of time before a module is refused.
const SAMPLE_ATTEMPTS: u32 = 3;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::EngineConfig;

    fn builtin(name: &str) -> &'static [u8] {
        embedded_module(name).expect(name)
    }

    fn catalog(dir: &Path) -> Catalog {
        Catalog::with_dir(PolicyEngine::new(EngineConfig::default()).unwrap(), dir)
    }

    #[test]
    fn callers_asking_at_once_share_one_compile() {
        let catalog = Catalog::builtin(PolicyEngine::new(EngineConfig::default()).unwrap());
        let barrier = std::sync::Barrier::new(6);
        let hashes: Vec<String> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..6)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        catalog.get("label-selector").map(|p| p.sha256().to_string())
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap().unwrap()).collect()
        });
        assert!(hashes.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(catalog.compiled_on_demand.load(Ordering::Relaxed), 1);
        assert!(matches!(catalog.get("nonesuch"), Err(PolicyError::NotFound { .. })));
    }

    #[test]
    fn modules_in_the_directory_are_policies_by_file_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mine.wasm"), builtin("label-selector")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a module").unwrap();
        let catalog = catalog(dir.path());
        assert!(catalog.names().contains(&"mine".to_string()));
        assert!(!catalog.names().iter().any(|n| n.starts_with("notes")));
        assert_eq!(catalog.get("mine").unwrap().sha256(), hex_sha256(builtin("label-selector")));
    }

    #[test]
    fn a_broken_module_never_replaces_a_working_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine.wasm");
        std::fs::write(&path, builtin("label-selector")).unwrap();
        let catalog = catalog(dir.path());
        let good = catalog.get("mine").unwrap().sha256().to_string();
        std::fs::write(&path, b"\0asm garbage").unwrap();
        let events = catalog.rescan();
        assert!(matches!(&events[..], [CatalogEvent::Failed { name, error }] if name == "mine" && error.contains("mine.wasm")), "{events:?}");
        assert_eq!(catalog.get("mine").unwrap().sha256(), good, "the working module stays");
        assert!(catalog.failure("mine").is_some());
        // An unchanged broken file is not tried again.
        assert!(catalog.rescan().is_empty());
        // A module that imports WASI fails its load checks: refused as well.
        std::fs::write(&path, builtin("nosy")).unwrap();
        let events = catalog.rescan();
        assert!(matches!(&events[..], [CatalogEvent::Failed { error, .. }] if error.contains("imports")), "{events:?}");
        assert_eq!(catalog.get("mine").unwrap().sha256(), good);
    }

    #[test]
    fn a_replaced_module_is_loaded_and_a_deleted_one_stays_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine.wasm");
        std::fs::write(&path, builtin("label-selector")).unwrap();
        let catalog = catalog(dir.path());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        catalog.subscribe(move |e| sink.lock().unwrap().push(e.clone()));
        std::fs::write(&path, builtin("misbehaving")).unwrap();
        catalog.rescan();
        assert_eq!(catalog.get("mine").unwrap().sha256(), hex_sha256(builtin("misbehaving")));
        std::fs::remove_file(&path).unwrap();
        catalog.rescan();
        assert!(catalog.get("mine").is_ok(), "a deleted module stays in use");
        let seen = seen.lock().unwrap();
        assert!(matches!(&seen[..], [CatalogEvent::Loaded { .. }, CatalogEvent::Removed { .. }]), "{seen:?}");
    }

    #[test]
    fn a_config_map_update_is_followed_through_its_symlinks() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        // The kubelet's layout: NAME.wasm -> ..data/NAME.wasm, ..data -> ..<timestamp>
        let first = dir.path().join("..2026_11_26_10_00_00.1");
        std::fs::create_dir(&first).unwrap();
        std::fs::write(first.join("mine.wasm"), builtin("label-selector")).unwrap();
        symlink("..2026_11_26_10_00_00.1", dir.path().join("..data")).unwrap();
        symlink("..data/mine.wasm", dir.path().join("mine.wasm")).unwrap();
        let catalog = Arc::new(catalog(dir.path()));
        catalog.watch(Duration::from_secs(3600)).unwrap();
        assert_eq!(catalog.get("mine").unwrap().sha256(), hex_sha256(builtin("label-selector")));
        // The update: a new directory, then the ..data swap (rename over the old link).
        let second = dir.path().join("..2026_11_26_10_05_00.2");
        std::fs::create_dir(&second).unwrap();
        std::fs::write(second.join("mine.wasm"), builtin("misbehaving")).unwrap();
        symlink("..2026_11_26_10_05_00.2", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        std::fs::remove_dir_all(&first).unwrap();
        let want = hex_sha256(builtin("misbehaving"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while catalog.get("mine").unwrap().sha256() != want {
            assert!(std::time::Instant::now() < deadline, "the update was not picked up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
