//! Finding policies by name: the built-in ones, compiled into the binary, and
//! `NAME.wasm` modules in a policy directory (a mounted ConfigMap), reloaded
//! when the directory changes.
//!
//! Versions live side by side: `NAME.VERSION.wasm` is the policy `NAME` at
//! `VERSION` (`spec.policy.version`), known to the catalog as `NAME.VERSION`
//! ([`module_key`]); policy names have no dots, so the first one splits the
//! two. A module that describes itself must say the version of its file.
//!
//! Compiles happen off the callers' threads: [`Catalog::ready`] answers at
//! once ([`PolicyError::Loading`] while a module is compiled by the catalog's
//! loader thread, see [`Catalog::start`]), so an agent's work loop never waits
//! for a compile. [`Catalog::get`] compiles in the caller, for `eval` and tests.
//!
//! The kubelet updates a ConfigMap volume by writing a new timestamped
//! directory and swapping the `..data` symlink, so the directory is watched (not
//! the files). Only changes of module files and of `..data` lead to a rescan,
//! never reads (the rescan's own reads would otherwise trigger the next one);
//! a rescan compares each file's metadata (inode, size, times) and reads only
//! files whose metadata changed. A periodic rescan is the safety net for a
//! missed event.
//!
//! Whose fault a failure is decides what follows. A module that does not
//! compile, fails its load checks, or fails on a sample input is refused for
//! those bytes (tried again when they change), and never replaces a working
//! one. Host trouble (the compiler could not run, the instance pool was full)
//! is tried again with exponential backoff. A module in the directory named
//! like a built-in one takes its place from the start: should it fail to load
//! after a restart, WeightedServices naming it get its error, never the
//! built-in. A module whose file is deleted stays in use (with a warning)
//! until it is replaced: the WeightedServices that name it keep their weights.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use prometheus_client::metrics::counter::Counter;

use super::engine::{bounded, hex_sha256};
use super::{LoadedPolicy, PolicyEngine, PolicyError};
use crate::crd::WeightGroup;
use crate::snapshot::{Endpoint, ServiceMeta, Snapshot};

include!(concat!(env!("OUT_DIR"), "/policies.rs"));

/// The bytes of a built-in policy, as the binary embeds them.
pub fn embedded_module(name: &str) -> Option<&'static [u8]> {
    BUILTIN_POLICIES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bytes)| *bytes)
}

/// The catalog's key of policy `name` at `version`: `NAME` or `NAME.VERSION`,
/// the module file's name without `.wasm`.
pub fn module_key(name: &str, version: Option<&str>) -> String {
    match version {
        Some(version) => format!("{name}.{version}"),
        None => name.to_string(),
    }
}

/// A catalog key (or a module file's name without `.wasm`) split into the
/// policy's name and its version, if it has one.
pub fn split_key(key: &str) -> (&str, Option<&str>) {
    match key.split_once('.') {
        Some((name, version)) => (name, Some(version)),
        None => (key, None),
    }
}

/// How long the directory must be quiet before it is read again: a ConfigMap
/// update is several filesystem events.
const SETTLE: Duration = Duration::from_millis(150);

/// The first retry after host trouble comes this soon; each next one twice as late…
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// …up to this.
const LAST_RETRY: Duration = Duration::from_secs(300);

/// What the catalog's loader did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogEvent {
    /// A module was loaded (new, replaced with different bytes, or a built-in compiled).
    Loaded {
        /// The policy's name.
        name: String,
        /// The new module's hash.
        sha256: String,
    },
    /// A module was refused for its own fault; the previous one (if any) stays in use.
    Failed {
        /// The policy's name.
        name: String,
        /// Which file, and why (at most [`super::MAX_TEXT`] bytes).
        error: String,
    },
    /// A module could not be loaded for the host's trouble; tried again later.
    Retrying {
        /// The policy's name.
        name: String,
        /// Why (at most [`super::MAX_TEXT`] bytes).
        error: String,
        /// When it is tried again.
        after: Duration,
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
            CatalogEvent::Loaded { name, .. }
            | CatalogEvent::Failed { name, .. }
            | CatalogEvent::Retrying { name, .. }
            | CatalogEvent::Removed { name } => name,
        }
    }
}

/// Counters of the policy directory's rescans, exported as metrics.
#[derive(Debug, Clone, Default)]
pub struct CatalogCounters {
    /// Rescans of the directory.
    pub scans: Counter,
    /// Bytes of module files read.
    pub bytes_read: Counter,
}

type Listener = Box<dyn Fn(&CatalogEvent) + Send + Sync>;

/// What identifies a file's content without reading it: when none of this
/// changed, neither did the bytes (a kubelet update makes new files, so new inodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    /// The stamp of what `path` points to (symlinks followed).
    fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// A module file in the directory.
#[derive(Debug, Clone)]
struct ModuleFile {
    path: PathBuf,
    /// The stamp of the bytes last read (and judged); `None` before the first read.
    stamp: Option<FileStamp>,
    /// The file is gone; a module loaded from it stays in use.
    removed: bool,
}

/// A refusal of the module's bytes, for its own fault.
#[derive(Debug, Clone)]
struct Refusal {
    /// The bytes refused (`None`: refused unread, e.g. too large).
    sha256: Option<String>,
    error: PolicyError,
}

/// Host trouble, tried again.
#[derive(Debug, Clone)]
struct Retry {
    at: Instant,
    delay: Duration,
    error: PolicyError,
}

/// Everything known about one policy name.
#[derive(Debug, Default)]
struct Entry {
    builtin: Option<&'static [u8]>,
    file: Option<ModuleFile>,
    loaded: Option<LoadedPolicy>,
    refused: Option<Refusal>,
    retry: Option<Retry>,
    /// Asked for through [`Catalog::ready`] and not compiled yet.
    requested: bool,
}

impl Entry {
    /// Where the module to compile comes from: the directory's file, which
    /// takes the place of a built-in of the same name, or the built-in.
    fn source(&self) -> Option<Source> {
        match (&self.file, self.builtin) {
            (Some(file), _) if !file.removed => Some(Source::File(file.path.clone())),
            (_, Some(bytes)) => Some(Source::Builtin(bytes)),
            _ => None,
        }
    }

    /// Nothing left to offer: no file, no built-in, nothing loaded.
    fn is_empty(&self) -> bool {
        self.builtin.is_none() && self.file.is_none() && self.loaded.is_none()
    }
}

/// Where a policy's bytes come from.
#[derive(Clone)]
enum Source {
    Builtin(&'static [u8]),
    File(PathBuf),
}

/// What wakes the loader thread.
enum Wake {
    /// Something changed in the directory.
    Dir,
    /// A policy was asked for.
    Request,
}

/// The policies a WeightedService can name.
pub struct Catalog {
    engine: PolicyEngine,
    dir: Option<PathBuf>,
    entries: Mutex<BTreeMap<String, Entry>>,
    listeners: Mutex<Vec<Listener>>,
    /// Held while a module is read and compiled, so that callers asking for
    /// the same policy at once wait for one compile instead of each starting
    /// their own. One lock for all policies: compiles are rare.
    compiling: Mutex<()>,
    /// How many modules were compiled (tests check there is one per policy).
    compiles: AtomicUsize,
    counters: CatalogCounters,
    /// Where [`Catalog::ready`] asks the loader thread for a compile, once it runs.
    loader: Mutex<Option<Sender<Wake>>>,
}

impl Catalog {
    /// The built-in policies (compiled to machine code on first use).
    pub fn builtin(engine: PolicyEngine) -> Self {
        let entries = BUILTIN_POLICIES
            .iter()
            .map(|(n, b)| {
                (
                    n.to_string(),
                    Entry {
                        builtin: Some(b),
                        ..Entry::default()
                    },
                )
            })
            .collect();
        Catalog {
            engine,
            dir: None,
            entries: Mutex::new(entries),
            listeners: Mutex::new(Vec::new()),
            compiling: Mutex::new(()),
            compiles: AtomicUsize::new(0),
            counters: CatalogCounters::default(),
            loader: Mutex::new(None),
        }
    }

    /// The built-in policies and the modules in `dir`. Only the names are
    /// read now; the modules are read and compiled by the loader thread
    /// ([`Catalog::start`]), or by the first [`Catalog::get`]. A module there
    /// named like a built-in one takes its place.
    pub fn with_dir(engine: PolicyEngine, dir: &Path) -> Self {
        let mut catalog = Self::builtin(engine);
        catalog.dir = Some(dir.to_path_buf());
        match module_files(dir) {
            Ok(files) => {
                let mut entries = catalog.entries();
                for (name, path) in files {
                    entries.entry(name).or_default().file = Some(ModuleFile {
                        path,
                        stamp: None,
                        removed: false,
                    });
                }
            }
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "cannot read the policy directory")
            }
        }
        catalog
    }

    /// Count rescans and bytes read in these counters (the metrics').
    pub fn counting(mut self, counters: CatalogCounters) -> Self {
        self.counters = counters;
        self
    }

    fn entries(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
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
        self.entries()
            .iter()
            .filter(|(_, e)| !e.is_empty())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Where the module of `key` comes from: `built-in`, or its file's path.
    pub fn origin(&self, key: &str) -> Option<String> {
        self.entries().get(key).and_then(Entry::source).map(|source| match source {
            Source::Builtin(_) => "built-in".to_string(),
            Source::File(path) => path.display().to_string(),
        })
    }

    /// Why the module of `name` was last refused (the cause, not wrapped in
    /// [`PolicyError::Refused`]), while it has not loaded since.
    pub fn refusal(&self, name: &str) -> Option<PolicyError> {
        self.entries()
            .get(name)
            .and_then(|e| e.refused.as_ref())
            .map(|r| r.error.clone())
    }

    /// How many modules were compiled so far.
    pub fn compiles(&self) -> usize {
        self.compiles.load(Ordering::Relaxed)
    }

    /// Be told of every load, refusal, retry and removal.
    pub fn subscribe(&self, listener: impl Fn(&CatalogEvent) + Send + Sync + 'static) {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner()).push(Box::new(listener));
    }

    fn tell(&self, events: &[CatalogEvent]) {
        let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        for event in events {
            for listener in listeners.iter() {
                listener(event);
            }
        }
    }

    /// The policy called `name`, whose module must hash to `pin` if given,
    /// without waiting: [`PolicyError::Loading`] while it is not compiled yet
    /// (the loader thread is asked to compile it, and tells subscribers with
    /// [`CatalogEvent::Loaded`] when it is done), the module's refusal
    /// ([`PolicyError::Refused`]), or the host trouble that keeps it from
    /// loading until its next retry.
    pub fn ready(&self, name: &str, pin: Option<&str>) -> Result<LoadedPolicy, PolicyError> {
        let request = {
            let mut entries = self.entries();
            let Some(entry) = entries.get_mut(name).filter(|e| !e.is_empty()) else {
                return Err(not_found(name, &entries));
            };
            if let Some(policy) = &entry.loaded {
                return pinned(policy.clone(), pin);
            }
            if let Some(refusal) = &entry.refused {
                return Err(refusal.error.refusal());
            }
            if let Some(retry) = &entry.retry {
                return Err(retry.error.clone());
            }
            !std::mem::replace(&mut entry.requested, true)
        };
        if request {
            match &*self.loader.lock().unwrap_or_else(|p| p.into_inner()) {
                Some(loader) => {
                    let _ = loader.send(Wake::Request);
                }
                None => tracing::warn!(
                    policy = name,
                    "a policy was asked for before the catalog's loader started"
                ),
            }
        }
        Err(PolicyError::Loading {
            policy: name.into(),
        })
    }

    /// The policy called `name`, whose module must hash to `pin` if given,
    /// compiled now in the caller if need be (`eval`, tests).
    pub fn get_pinned(&self, name: &str, pin: Option<&str>) -> Result<LoadedPolicy, PolicyError> {
        pinned(self.get(name)?, pin)
    }

    /// The policy called `name`, compiled now in the caller if need be.
    pub fn get(&self, name: &str) -> Result<LoadedPolicy, PolicyError> {
        if let Some(answer) = self.settled(name)? {
            return answer;
        }
        // One compile at a time: whoever waited here finds it loaded.
        let _one_at_a_time = self.compiling.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(answer) = self.settled(name)? {
            return answer;
        }
        self.load_now(name)
    }

    /// The loaded policy or the refusal of `name`, if either is known
    /// (`Ok(None)`: it has to be compiled).
    #[allow(clippy::type_complexity)]
    fn settled(
        &self,
        name: &str,
    ) -> Result<Option<Result<LoadedPolicy, PolicyError>>, PolicyError> {
        let entries = self.entries();
        let entry = entries
            .get(name)
            .filter(|e| !e.is_empty())
            .ok_or_else(|| not_found(name, &entries))?;
        Ok(match (&entry.loaded, &entry.refused) {
            (Some(policy), _) => Some(Ok(policy.clone())),
            (None, Some(refusal)) => Some(Err(refusal.error.refusal())),
            (None, None) => None,
        })
    }

    /// Read (if a file) and compile `name` now, record the outcome and tell
    /// the listeners. The caller holds `compiling`.
    fn load_now(&self, name: &str) -> Result<LoadedPolicy, PolicyError> {
        let source = self.entries().get(name).and_then(Entry::source);
        let Some(source) = source else {
            return Err(not_found(name, &self.entries()));
        };
        let (outcome, event) = match source {
            Source::Builtin(bytes) => {
                let outcome = self.compile(name, bytes, false);
                let event = self.record(name, &hex_sha256(bytes), None, &outcome, None);
                (outcome, event)
            }
            Source::File(path) => match self.read_module(name, &path) {
                Ok((bytes, stamp)) => {
                    let outcome = self.compile(name, &bytes, true);
                    let event = self.record(
                        name,
                        &hex_sha256(&bytes),
                        Some(stamp),
                        &outcome,
                        Some(&path),
                    );
                    (outcome, event)
                }
                Err((error, stamp)) => {
                    let outcome = Err(error);
                    let event = self.record(name, "", stamp, &outcome, Some(&path));
                    (outcome, event)
                }
            },
        };
        self.tell(&event.into_iter().collect::<Vec<_>>());
        outcome.map_err(|error| {
            if error.is_host_trouble() {
                error
            } else {
                error.refusal()
            }
        })
    }

    /// Compile and check `bytes`; a module from the directory must also get
    /// through a sample evaluation (built-ins are ours).
    fn compile(&self, name: &str, bytes: &[u8], sample: bool) -> Result<LoadedPolicy, PolicyError> {
        self.compiles.fetch_add(1, Ordering::Relaxed);
        let policy = self.engine.load(name, bytes)?;
        // Only a versioned file's module is asked (`describe` is no part of evaluating).
        if let Some(file_version) = split_key(name).1
            && let Some(described) = policy.describe()?
            && described.version != file_version
        {
            return Err(PolicyError::VersionMismatch {
                policy: name.into(),
                described: described.version.clone(),
            });
        }
        if sample {
            check_sample(&policy)?;
        }
        Ok(policy)
    }

    /// Read a module file, unless it is over the size limit. The error comes
    /// with the file's stamp when there is one (a file refused for its size
    /// is not looked at again until it changes).
    #[allow(clippy::result_large_err)] // a refusal, once per module change
    fn read_module(&self, name: &str, path: &Path) -> Result<(Vec<u8>, FileStamp), (PolicyError, Option<FileStamp>)> {
        let host = |e: std::io::Error| PolicyError::Host {
            policy: name.into(),
            reason: bounded(format!("reading {}: {e}", path.display())),
        };
        let stamp = FileStamp::of(path).map_err(|e| (host(e), None))?;
        let limit = self.engine.config().max_module_bytes as u64;
        if stamp.size > limit {
            return Err((
                PolicyError::TooLarge {
                    policy: name.into(),
                    bytes: stamp.size,
                    limit,
                },
                Some(stamp),
            ));
        }
        let mut bytes = Vec::with_capacity(stamp.size as usize);
        // Bounded even if the file grew since it was looked at.
        let read =
            std::fs::File::open(path).and_then(|f| f.take(limit + 1).read_to_end(&mut bytes));
        self.counters.bytes_read.inc_by(bytes.len() as u64);
        read.map_err(|e| (host(e), Some(stamp)))?;
        if bytes.len() as u64 > limit {
            return Err((
                PolicyError::TooLarge {
                    policy: name.into(),
                    bytes: bytes.len() as u64,
                    limit,
                },
                Some(stamp),
            ));
        }
        Ok((bytes, stamp))
    }

    /// Record what loading `name` (bytes hashing to `sha256`) came to, and
    /// say it as an event. A failure of the module is held against these
    /// bytes; host trouble is tried again later.
    fn record(
        &self,
        name: &str,
        sha256: &str,
        stamp: Option<FileStamp>,
        outcome: &Result<LoadedPolicy, PolicyError>,
        path: Option<&Path>,
    ) -> Option<CatalogEvent> {
        let mut entries = self.entries();
        let entry = entries.entry(name.to_string()).or_default();
        if let (Some(file), Some(stamp)) = (entry.file.as_mut(), stamp) {
            file.stamp = Some(stamp);
        }
        entry.requested = false;
        let what = path.map_or_else(
            || "built-in module".to_string(),
            |p| p.display().to_string(),
        );
        match outcome {
            Ok(policy) => {
                // A rescan may have loaded newer bytes meanwhile: those win.
                if entry
                    .loaded
                    .as_ref()
                    .is_some_and(|l| l.sha256() == policy.sha256())
                {
                    return None;
                }
                entry.loaded = Some(policy.clone());
                entry.refused = None;
                entry.retry = None;
                tracing::info!(policy = name, sha256, source = %what, "policy module loaded");
                Some(CatalogEvent::Loaded {
                    name: name.into(),
                    sha256: sha256.into(),
                })
            }
            Err(error) if error.is_host_trouble() => {
                let delay = entry
                    .retry
                    .as_ref()
                    .map_or(FIRST_RETRY, |r| (r.delay * 2).min(LAST_RETRY));
                entry.retry = Some(Retry {
                    at: Instant::now() + delay,
                    delay,
                    error: error.clone(),
                });
                tracing::warn!(policy = name, source = %what, %error, retry_in = ?delay, "policy module could not be loaded for now; trying again");
                Some(CatalogEvent::Retrying {
                    name: name.into(),
                    error: bounded(format!("{what}: {error}")),
                    after: delay,
                })
            }
            Err(error) => {
                entry.retry = None;
                entry.refused = Some(Refusal {
                    sha256: (!sha256.is_empty()).then(|| sha256.to_string()),
                    error: error.clone(),
                });
                let keeps = if entry.loaded.is_some() {
                    "; the previous module stays in use"
                } else {
                    ""
                };
                tracing::warn!(policy = name, source = %what, %error, "policy module refused{keeps}");
                Some(CatalogEvent::Failed {
                    name: name.into(),
                    error: bounded(format!("{what}: {error}")),
                })
            }
        }
    }

    /// Look at the policy directory again: read the module files whose
    /// metadata changed since they were last read, and load what changed.
    /// Returns what happened (listeners are told too).
    pub fn rescan(&self) -> Vec<CatalogEvent> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        self.counters.scans.inc();
        let present = match module_files(dir) {
            Ok(files) => files,
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "cannot read the policy directory");
                return Vec::new();
            }
        };
        let mut events = Vec::new();
        let mut changed = Vec::new();
        {
            let mut entries = self.entries();
            for (name, path) in &present {
                let entry = entries.entry(name.clone()).or_insert_with(|| Entry {
                    builtin: embedded_module(name),
                    ..Entry::default()
                });
                let file = entry.file.get_or_insert_with(|| ModuleFile {
                    path: path.clone(),
                    stamp: None,
                    removed: false,
                });
                file.path = path.clone();
                file.removed = false;
                // Replaced while we looked: the next rescan sees the new one.
                let Ok(stamp) = FileStamp::of(path) else {
                    continue;
                };
                if file.stamp != Some(stamp) {
                    changed.push(name.clone());
                }
            }
            let mut gone = Vec::new();
            for (name, entry) in entries.iter_mut() {
                let Some(file) = entry.file.as_mut() else {
                    continue;
                };
                if file.removed || present.contains_key(name) {
                    continue;
                }
                if entry.loaded.is_some() {
                    file.removed = true;
                    tracing::warn!(policy = %name, "policy module deleted from the directory: the loaded module stays in use until WeightedServices stop naming it");
                } else {
                    // Never loaded: what was said about the file goes with it.
                    entry.file = None;
                    entry.refused = None;
                    entry.retry = None;
                    tracing::info!(policy = %name, "policy module deleted from the directory");
                    if entry.is_empty() {
                        gone.push(name.clone());
                    }
                }
                events.push(CatalogEvent::Removed { name: name.clone() });
            }
            for name in gone {
                entries.remove(&name);
            }
        }
        self.tell(&events);
        for name in changed {
            let _one_at_a_time = self.compiling.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(event) = self.reload_file(&name) {
                self.tell(std::slice::from_ref(&event));
                events.push(event);
            }
        }
        events
    }

    /// Read the module file of `name` again, and load it if its bytes are
    /// new: neither those loaded nor those refused. The caller holds `compiling`.
    fn reload_file(&self, name: &str) -> Option<CatalogEvent> {
        let path = self.entries().get(name)?.file.as_ref()?.path.clone();
        let (bytes, stamp) = match self.read_module(name, &path) {
            Ok(read) => read,
            Err((error, stamp)) => return self.record(name, "", stamp, &Err(error), Some(&path)),
        };
        let sha256 = hex_sha256(&bytes);
        {
            let mut entries = self.entries();
            let entry = entries.get_mut(name)?;
            let loaded = entry.loaded.as_ref().is_some_and(|p| p.sha256() == sha256);
            let refused = entry
                .refused
                .as_ref()
                .is_some_and(|r| r.sha256.as_deref() == Some(sha256.as_str()));
            if loaded || refused {
                if let Some(file) = entry.file.as_mut() {
                    file.stamp = Some(stamp);
                }
                return None;
            }
        }
        let outcome = self.compile(name, &bytes, true);
        self.record(name, &sha256, Some(stamp), &outcome, Some(&path))
    }

    /// Compile what was asked for through [`Catalog::ready`], and retry what
    /// host trouble held up once its time has come. Returns when the next
    /// retry is due, if any.
    fn serve(&self) -> Option<Instant> {
        loop {
            let now = Instant::now();
            let next = {
                let entries = self.entries();
                entries
                    .iter()
                    .find(|(_, e)| {
                        e.loaded.is_none()
                            && e.refused.is_none()
                            && (e.requested || e.retry.as_ref().is_some_and(|r| r.at <= now))
                    })
                    .map(|(n, _)| n.clone())
            };
            let Some(name) = next else {
                return self
                    .entries()
                    .values()
                    .filter_map(|e| e.retry.as_ref().map(|r| r.at))
                    .min();
            };
            if let Some(entry) = self.entries().get_mut(&name) {
                entry.requested = false;
            }
            let _one_at_a_time = self.compiling.lock().unwrap_or_else(|p| p.into_inner());
            // Something else may have settled it meanwhile.
            if matches!(self.settled(&name), Ok(None)) {
                let _ = self.load_now(&name);
            }
        }
    }

    /// Start the loader thread: it reads and compiles the directory's modules,
    /// compiles what [`Catalog::ready`] is asked for, retries host trouble,
    /// and follows the directory — a rescan after each change of a module
    /// file or of `..data` (once the directory has been quiet for a moment),
    /// and every `every` regardless, in case an event was missed. Runs until
    /// the catalog is dropped.
    pub fn start(self: &Arc<Self>, every: Duration) -> Result<(), notify::Error> {
        use notify::Watcher as _;
        let (tx, rx) = std::sync::mpsc::channel::<Wake>();
        let watcher = match &self.dir {
            Some(dir) => {
                let to_loader = tx.clone();
                let mut watcher =
                    notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                        if event.is_ok_and(|e| is_module_change(&e)) {
                            let _ = to_loader.send(Wake::Dir);
                        }
                    })?;
                watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
                Some(watcher)
            }
            None => None,
        };
        *self.loader.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("policy-loader".into())
            .spawn(move || {
                let _watcher = watcher; // lives as long as the thread
                loader(weak, rx, every);
            })
            .map_err(notify::Error::io)?;
        Ok(())
    }
}

/// The loader thread's loop (see [`Catalog::start`]).
fn loader(catalog: std::sync::Weak<Catalog>, rx: Receiver<Wake>, every: Duration) {
    let mut next_scan = Instant::now();
    let mut next_retry: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let wake = next_retry.map_or(next_scan, |r| r.min(next_scan));
        let mut rescan = now >= next_scan;
        if !rescan && wake > now {
            match rx.recv_timeout(wake - now) {
                Ok(Wake::Dir) => {
                    // Let the burst of events of one update pass (requests
                    // that come meanwhile are served after the rescan).
                    while rx.recv_timeout(SETTLE).is_ok() {}
                    rescan = true;
                }
                Ok(Wake::Request) => {}
                Err(RecvTimeoutError::Timeout) => rescan = Instant::now() >= next_scan,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        let Some(catalog) = catalog.upgrade() else {
            return;
        };
        if rescan {
            catalog.rescan();
            next_scan = Instant::now() + every;
        }
        next_retry = catalog.serve();
    }
}

/// Whether a filesystem event is a change of a module file or of the
/// ConfigMap's `..data` link. Reads (open, access, close after reading) are
/// not: the rescan's own reads would trigger the next rescan for ever.
fn is_module_change(event: &notify::Event) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind, MetadataKind, ModifyKind};
    let relevant_kind = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)) => false,
        EventKind::Create(_)
        | EventKind::Modify(_)
        | EventKind::Remove(_)
        | EventKind::Any
        | EventKind::Other => true,
    };
    relevant_kind
        && event.paths.iter().any(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == "..data" || n.ends_with(".wasm"))
        })
}

/// `policy`, if its module hashes to `pin` (when given).
fn pinned(policy: LoadedPolicy, pin: Option<&str>) -> Result<LoadedPolicy, PolicyError> {
    match pin {
        Some(pin) if pin != policy.sha256() => Err(PolicyError::PinMismatch {
            policy: policy.name().into(),
            expected: bounded(pin.into()),
            actual: policy.sha256().into(),
        }),
        _ => Ok(policy),
    }
}

fn not_found(name: &str, entries: &BTreeMap<String, Entry>) -> PolicyError {
    PolicyError::NotFound {
        name: bounded(name.into()),
        known: entries
            .iter()
            .filter(|(_, e)| !e.is_empty())
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", "),
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
/// (its config is not the real one), in `evaluate` or `validate-config`, but not trap, run out of time or memory,
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
        hints: Default::default(),
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
            Ok(_) | Err(PolicyError::Failed { .. } | PolicyError::ConfigInvalid { .. }) => return Ok(()),
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
    use crate::policy::{Compiler, EngineConfig};
    use policy_fixtures::{MISBEHAVING, NOSY};

    fn builtin(name: &str) -> &'static [u8] {
        embedded_module(name).expect(name)
    }

    fn engine() -> PolicyEngine {
        PolicyEngine::new(EngineConfig::default()).unwrap()
    }

    fn catalog(dir: &Path) -> Catalog {
        Catalog::with_dir(engine(), dir)
    }

    /// Waits (up to 10 s) until `done` holds.
    fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Replace `name` in a kubelet-style ConfigMap directory by a new
    /// timestamped directory and a swap of `..data`.
    fn config_map_update(dir: &Path, generation: u32, name: &str, bytes: &[u8]) {
        use std::os::unix::fs::symlink;
        let data = format!("..2026_11_26_10_{generation:02}_00.{generation}");
        std::fs::create_dir(dir.join(&data)).unwrap();
        std::fs::write(dir.join(&data).join(name), bytes).unwrap();
        symlink(&data, dir.join("..data_tmp")).unwrap();
        let old = std::fs::read_link(dir.join("..data")).ok();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        if !dir.join(name).exists() {
            symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(dir.join(old)).unwrap();
        }
    }

    #[test]
    fn callers_asking_at_once_share_one_compile() {
        let catalog = Catalog::builtin(engine());
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
        assert_eq!(catalog.compiles(), 1);
        assert!(matches!(
            catalog.get("nonesuch"),
            Err(PolicyError::NotFound { .. })
        ));
    }

    #[test]
    fn ready_never_waits_for_a_compile_the_loader_does_it() {
        let catalog = Arc::new(Catalog::builtin(engine()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        catalog.subscribe(move |e| sink.lock().unwrap().push(e.clone()));
        catalog.start(Duration::from_secs(3600)).unwrap();
        let started = Instant::now();
        let first = catalog.ready("slow-start", None);
        assert!(
            matches!(first, Err(PolicyError::Loading { .. })),
            "{first:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "ready() waited {:?}",
            started.elapsed()
        );
        eventually("the loader compiles it", || {
            catalog.ready("slow-start", None).is_ok()
        });
        assert!(
            matches!(&seen.lock().unwrap()[..], [CatalogEvent::Loaded { name, .. }] if name == "slow-start")
        );
        let pin = "0".repeat(64);
        assert!(matches!(
            catalog.ready("slow-start", Some(&pin)),
            Err(PolicyError::PinMismatch { .. })
        ));
        assert!(matches!(
            catalog.ready("nonesuch", None),
            Err(PolicyError::NotFound { .. })
        ));
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
        assert!(
            matches!(&events[..], [CatalogEvent::Failed { name, error }] if name == "mine" && error.contains("mine.wasm")),
            "{events:?}"
        );
        assert_eq!(
            catalog.get("mine").unwrap().sha256(),
            good,
            "the working module stays"
        );
        assert!(matches!(
            catalog.refusal("mine"),
            Some(PolicyError::Compile { .. })
        ));
        // An unchanged broken file is not read or tried again.
        assert!(catalog.rescan().is_empty());
        // A module that imports WASI fails its load checks: refused as well.
        std::fs::write(&path, NOSY).unwrap();
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
        catalog.get("mine").unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        catalog.subscribe(move |e| sink.lock().unwrap().push(e.clone()));
        std::fs::write(&path, MISBEHAVING).unwrap();
        catalog.rescan();
        assert_eq!(
            catalog.get("mine").unwrap().sha256(),
            hex_sha256(MISBEHAVING)
        );
        std::fs::remove_file(&path).unwrap();
        catalog.rescan();
        assert!(catalog.get("mine").is_ok(), "a deleted module stays in use");
        let seen = seen.lock().unwrap();
        assert!(matches!(&seen[..], [CatalogEvent::Loaded { .. }, CatalogEvent::Removed { .. }]), "{seen:?}");
    }

    #[test]
    fn a_module_named_like_a_builtin_takes_its_place_even_when_it_fails() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("label-selector.wasm"),
            b"\0asm not a module",
        )
        .unwrap();
        // As after a restart: the file was there first.
        let catalog = catalog(dir.path());
        let err = catalog
            .get("label-selector")
            .err()
            .expect("the broken module, not the built-in");
        assert!(
            matches!(&err, PolicyError::Refused { cause, .. } if matches!(**cause, PolicyError::Compile { .. })),
            "{err}"
        );
        // Deleting the file gives the built-in back (nothing was loaded from the file).
        std::fs::remove_file(dir.path().join("label-selector.wasm")).unwrap();
        catalog.rescan();
        assert_eq!(
            catalog.get("label-selector").unwrap().sha256(),
            hex_sha256(builtin("label-selector"))
        );
    }

    #[test]
    fn an_unchanged_directory_is_not_read_again() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mine.wasm"), builtin("label-selector")).unwrap();
        std::fs::write(dir.path().join("theirs.wasm"), MISBEHAVING).unwrap();
        let counters = CatalogCounters::default();
        let catalog = catalog(dir.path()).counting(counters.clone());
        catalog.rescan();
        let read = counters.bytes_read.get();
        assert_eq!(
            read,
            (builtin("label-selector").len() + MISBEHAVING.len()) as u64
        );
        for _ in 0..3 {
            assert!(catalog.rescan().is_empty());
        }
        assert_eq!(
            counters.bytes_read.get(),
            read,
            "nothing changed: nothing read"
        );
        assert_eq!(counters.scans.get(), 4);
        // A new file is read; the unchanged one is not.
        std::fs::write(dir.path().join("mine.wasm"), MISBEHAVING).unwrap();
        catalog.rescan();
        assert_eq!(counters.bytes_read.get(), read + MISBEHAVING.len() as u64);
    }

    #[test]
    fn a_module_over_the_size_limit_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big.wasm"), vec![0u8; 4096]).unwrap();
        let engine = PolicyEngine::new(EngineConfig {
            max_module_bytes: 1000,
            ..EngineConfig::default()
        })
        .unwrap();
        let counters = CatalogCounters::default();
        let catalog = Catalog::with_dir(engine, dir.path()).counting(counters.clone());
        let events = catalog.rescan();
        assert!(
            matches!(&events[..], [CatalogEvent::Failed { error, .. }] if error.contains("4096 bytes, over the limit of 1000")),
            "{events:?}"
        );
        assert_eq!(counters.bytes_read.get(), 0);
        assert!(matches!(
            catalog.refusal("big"),
            Some(PolicyError::TooLarge {
                bytes: 4096,
                limit: 1000,
                ..
            })
        ));
        assert!(matches!(
            catalog.get("big"),
            Err(PolicyError::Refused { .. })
        ));
    }

    #[test]
    fn host_trouble_is_retried_with_backoff_and_not_held_against_the_module() {
        let engine = PolicyEngine::new(EngineConfig {
            compiler: Compiler::Subprocess {
                program: "/nonexistent/ipvs-operator".into(),
                args: vec![],
            },
            ..EngineConfig::default()
        })
        .unwrap();
        let catalog = Arc::new(Catalog::builtin(engine));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        catalog.subscribe(move |e| sink.lock().unwrap().push(e.clone()));
        catalog.start(Duration::from_secs(3600)).unwrap();
        assert!(matches!(
            catalog.ready("label-selector", None),
            Err(PolicyError::Loading { .. })
        ));
        eventually("two attempts", || seen.lock().unwrap().len() >= 2);
        let seen = seen.lock().unwrap().clone();
        let delays: Vec<Duration> = seen
            .iter()
            .map(|e| match e {
                CatalogEvent::Retrying { error, after, .. } => {
                    assert!(
                        error.contains("cannot start the policy compiler"),
                        "{error}"
                    );
                    *after
                }
                other => panic!("not a retry: {other:?}"),
            })
            .collect();
        assert!(delays[1] > delays[0], "backoff: {delays:?}");
        assert!(
            catalog.refusal("label-selector").is_none(),
            "host trouble is not the module's fault"
        );
        assert!(matches!(
            catalog.ready("label-selector", None),
            Err(PolicyError::Host { .. })
        ));
    }

    #[test]
    fn a_config_map_update_is_followed_and_the_loader_does_not_react_to_its_own_reads() {
        let dir = tempfile::tempdir().unwrap();
        // The kubelet's layout: NAME.wasm -> ..data/NAME.wasm, ..data -> ..<timestamp>
        config_map_update(dir.path(), 1, "mine.wasm", builtin("label-selector"));
        let counters = CatalogCounters::default();
        let catalog = Arc::new(catalog(dir.path()).counting(counters.clone()));
        catalog.start(Duration::from_secs(3600)).unwrap();
        eventually("the first load", || catalog.ready("mine", None).is_ok());
        assert_eq!(
            catalog.ready("mine", None).unwrap().sha256(),
            hex_sha256(builtin("label-selector"))
        );
        config_map_update(dir.path(), 2, "mine.wasm", MISBEHAVING);
        let want = hex_sha256(MISBEHAVING);
        eventually("the update", || {
            catalog
                .ready("mine", None)
                .is_ok_and(|p| p.sha256() == want)
        });
        // Quiet now: the rescans' own reads of the directory and the module
        // must not lead to more rescans.
        let (scans, read) = (counters.scans.get(), counters.bytes_read.get());
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            (counters.scans.get(), counters.bytes_read.get()),
            (scans, read),
            "rescans while nothing changed"
        );
        assert!(scans <= 3, "{scans} rescans for one update");
    }
}
