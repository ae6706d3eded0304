//! What the agent does when: the set of things changed since the last pass
//! ([`Dirty`]), the short retries after EndpointSlice changes (kube-proxy
//! acts asynchronously), policies due again, and the periodic sweep — a cheap
//! read of the whole table, compared with every plan, then netlink reads only
//! for the Services that differ, in chunks between which changes go first.

use std::collections::{BTreeSet, HashSet};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use ipvs::SockoptTable;

use super::plan::{Match, Matcher};
use super::{drift, procfs, TableReader, Worker, WsKey};
use crate::cluster::Change;

/// Labelled Services compared with the kernel in one chunk of the periodic
/// sweep; changes that arrived meanwhile are handled between chunks.
const SWEEP_CHUNK: usize = 50;

/// How many virtual services' destinations one piece of a `getsockopt` read
/// gets (about 1.5 ms under emulation, for 10 destinations each).
const SOCKOPT_PIECE: usize = 200;

/// Every this many sweeps, the node's addresses are read again and the table
/// is compared in full, whatever its hash.
const ADDRESSES_EVERY: u64 = 15;

/// Every this many sweeps (5 minutes at the default interval), the labelled
/// Services in the caches and those the agent knows are cross-checked: watch
/// events keep them the same, this is the net under them. Under emulation it
/// costs as much as six reads of a 1,000-Service table: every 15 sweeps, it
/// was a quarter of the idle agent's CPU.
const CROSS_CHECK_EVERY: u64 = 150;

/// Which labelled Services a pass looks at.
#[derive(Default)]
pub(super) struct Dirty {
    /// Rebuild and compare everything (the first pass, relists, the Node, policies).
    pub(super) all: bool,
    /// Rebuild and compare these.
    pub(super) keys: HashSet<WsKey>,
    /// Only compare these with the kernel (a chunk of the periodic sweep): their
    /// inputs did not change.
    pub(super) check: HashSet<WsKey>,
}

impl Dirty {
    pub(super) fn add(&mut self, change: Change) {
        match change {
            Change::WeightedService(namespace, name)
            | Change::Service(namespace, name)
            | Change::Slices(namespace, name)
            | Change::PodInfo(namespace, name) => {
                self.keys.insert(WsKey { namespace, name });
            }
            Change::Node | Change::All => self.all = true,
        }
    }

    /// Whether the Service's snapshot is rebuilt.
    pub(super) fn contains(&self, key: &WsKey) -> bool {
        self.all || self.keys.contains(key)
    }

    /// Whether the Service is compared with the kernel.
    pub(super) fn in_scope(&self, key: &WsKey) -> bool {
        self.contains(key) || self.check.contains(key)
    }

    /// Only a chunk of the sweep: nothing to rebuild.
    pub(super) fn is_sweep_chunk(&self) -> bool {
        !self.all && self.keys.is_empty()
    }

    pub(super) fn is_empty(&self) -> bool {
        !self.all && self.keys.is_empty() && self.check.is_empty()
    }
}

/// What a sweep that found nothing to repair saw: a sweep that reads the same
/// table while the plans are the same has nothing to repair either.
#[derive(Clone, Copy, PartialEq, Eq)]
struct QuietSweep {
    /// A hash of the table as read (text or IPv4 structs).
    table: u64,
    /// The plans' generation then.
    plans: u64,
}

/// A sweep's read of the kernel's table, under way.
pub(super) enum TableReading {
    /// The IPv4 table through `getsockopt`: [`Sweeper::sockopt`].
    Sockopt,
    /// `/proc/net/ip_vs`, into [`Sweeper::table_text`].
    Proc(procfs::TableRead),
}

/// The periodic sweep's state.
#[derive(Default)]
pub(super) struct Sweeper {
    table_reader: TableReader,
    /// Sweeps started, for the occasional cross-check.
    sweeps: u64,
    /// The last text of `/proc/net/ip_vs`: its buffer is reused by the next sweep.
    table_text: String,
    /// The reader of the IPv4 table; `None` until the first sweep, or when it
    /// cannot be opened (the sweep then reads `/proc/net/ip_vs`).
    sockopt: Option<SockoptTable>,
    quiet: Option<QuietSweep>,
    /// Whether the plans have IPv6 virtual services, as of a plans' generation.
    plans_have_ipv6: Option<(u64, bool)>,
    /// The sweep under way has been counted as finding differences.
    counted: bool,
    /// EndpointSlice changes noted so far, and as of the last time the
    /// endpoints that are gone were forgotten: none since, none to forget.
    slice_changes: u64,
    slice_changes_forgotten: u64,
}

impl Sweeper {
    pub(super) fn new(table_reader: TableReader) -> Self {
        Sweeper { table_reader, ..Sweeper::default() }
    }

    /// `compare`'s answer, unless the table hashes as it did at the last sweep
    /// that found nothing and the plans are the same: an idle node reads the
    /// same table every sweep, and hashing it costs a fraction of comparing it.
    fn unless_quiet(
        &mut self,
        seen: (u64, u64),
        compare: impl FnOnce(&Self) -> Option<HashSet<WsKey>>,
    ) -> Option<HashSet<WsKey>> {
        let seen = QuietSweep { table: seen.0, plans: seen.1 };
        if self.quiet == Some(seen) {
            return Some(HashSet::new());
        }
        let drifted = compare(self);
        self.quiet = drifted.as_ref().filter(|d| d.is_empty()).map(|_| seen);
        drifted
    }
}

/// What the sweep wants of a virtual service that `m` matched.
fn wanted<'a>(m: Match<'a, WsKey>) -> drift::Wanted<'a, WsKey> {
    drift::Wanted { owner: m.key, scheduler: m.plan.scheduler.as_deref(), weights: m.weights, zeros_stay: m.plan.restoring }
}

impl Worker {
    /// Run passes until `changes` is closed.
    pub fn run(mut self, changes: Receiver<Change>) {
        let mut dirty = Dirty { all: true, ..Dirty::default() };
        // The first pass compares everything: the first sweep comes one interval later.
        let mut next_sweep = Instant::now() + self.config.drift_interval;
        // What is left of the current sweep, and its read of the table under way.
        let mut sweep: Vec<WsKey> = Vec::new();
        let mut reading: Option<TableReading> = None;
        let mut retries: BTreeSet<Instant> = BTreeSet::new();
        let mut retry_keys: HashSet<WsKey> = HashSet::new();
        // Changes and sweep chunks take turns when both wait, so that a stream of
        // changes cannot hold drift repairs back for ever.
        let mut chunk_turn = false;
        loop {
            self.health.beat();
            let now = Instant::now();
            if dirty.is_empty() && (!sweep.is_empty() || reading.is_some()) {
                // Between two chunks of a sweep: what changed meanwhile goes first.
                loop {
                    match changes.try_recv() {
                        Ok(change) => self.note(change, &mut dirty, &mut retries, &mut retry_keys),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => return,
                    }
                }
            } else if dirty.is_empty() {
                let due = self.evaluator.states.values().filter_map(|s| s.due).min();
                let wake =
                    [Some(next_sweep), due, retries.first().copied()].into_iter().flatten().min().unwrap_or(next_sweep);
                if wake > now {
                    match changes.recv_timeout(wake - now) {
                        Ok(change) => {
                            self.note(change, &mut dirty, &mut retries, &mut retry_keys);
                            // Gather a burst of watch events into one pass.
                            std::thread::sleep(self.config.debounce);
                            while let Ok(change) = changes.try_recv() {
                                self.note(change, &mut dirty, &mut retries, &mut retry_keys);
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            }
            let now = Instant::now();
            if now >= next_sweep {
                next_sweep = now + self.config.drift_interval;
                // A sweep still going (slower than the interval) is not restarted.
                if sweep.is_empty() && reading.is_none() {
                    reading = self.begin_sweep(&mut dirty);
                    if reading.is_none() {
                        sweep = self.evaluator.states.keys().cloned().collect();
                    }
                }
            }
            while retries.first().is_some_and(|r| *r <= now) {
                retries.pop_first();
                dirty.keys.extend(retry_keys.iter().cloned());
            }
            if retries.is_empty() {
                retry_keys.clear();
            }
            for (key, state) in &self.evaluator.states {
                if state.due.is_some_and(|d| d <= now) {
                    dirty.keys.insert(key.clone());
                }
            }
            let sweep_waits = !sweep.is_empty() || reading.is_some();
            let work = if !dirty.is_empty() && (!chunk_turn || !sweep_waits) {
                chunk_turn = true;
                std::mem::take(&mut dirty)
            } else if let Some(read) = reading.as_mut() {
                chunk_turn = false;
                match self.read_piece(read) {
                    Ok(false) => {}
                    Ok(true) => {
                        let drifted = self.drifted(read);
                        reading = None;
                        sweep = match drifted {
                            Some(drifted) => {
                                if !drifted.is_empty() {
                                    self.count_sweep_difference();
                                }
                                drifted.into_iter().collect()
                            }
                            None => self.evaluator.states.keys().cloned().collect(),
                        };
                    }
                    Err(error) => {
                        tracing::debug!(%error, "cannot read the IPVS table: the sweep reads everything through netlink");
                        reading = None;
                        sweep = self.evaluator.states.keys().cloned().collect();
                    }
                }
                continue;
            } else if !sweep.is_empty() {
                chunk_turn = false;
                let chunk = sweep.split_off(sweep.len().saturating_sub(SWEEP_CHUNK));
                Dirty { check: chunk.into_iter().collect(), ..Dirty::default() }
            } else {
                continue;
            };
            if work.all {
                // This pass compares everything: the sweep under way is done with it.
                sweep.clear();
                reading = None;
            }
            let started = Instant::now();
            let report = self.pass(&work);
            self.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
            if !self.kernel.is_open() {
                // The kernel could not be opened or read: the next sweep tries again.
                sweep.clear();
                reading = None;
            }
            if work.is_sweep_chunk() && report.writes > 0 {
                self.count_sweep_difference();
            }
            if report.writes > 0 || report.errors > 0 || report.evaluated > 0 {
                tracing::info!(
                    evaluated = report.evaluated,
                    writes = report.writes,
                    errors = report.errors,
                    missing = report.missing,
                    took_ms = started.elapsed().as_secs_f64() * 1e3,
                    "pass"
                );
            }
            if report.missing > 0 && retries.is_empty() {
                // Not created by kube-proxy yet: look again soon (the periodic sweep
                // keeps looking after these).
                retry_keys.extend(work.keys.iter().cloned());
                for delay in &self.config.slice_retries {
                    retries.insert(Instant::now() + *delay);
                }
            }
            if self.kernel.is_open() && !self.health.is_ready() {
                self.health.set_ready();
                tracing::info!("first pass done: ready");
            }
            if work.all {
                // The first lists of every watch and the first pass leave the
                // allocator's arenas full of freed buffers: give them back.
                super::release_free_memory();
            }
        }
    }

    /// Count the sweep under way as one that found something to fix (once).
    fn count_sweep_difference(&mut self) {
        if !self.sweeper.counted {
            self.sweeper.counted = true;
            self.metrics.sweep_differences.inc();
        }
    }

    fn note(&mut self, change: Change, dirty: &mut Dirty, retries: &mut BTreeSet<Instant>, retry_keys: &mut HashSet<WsKey>) {
        if matches!(change, Change::Slices(..) | Change::All) {
            self.sweeper.slice_changes += 1;
        }
        if let Change::Slices(namespace, name) = &change {
            retry_keys.insert(WsKey { namespace: namespace.clone(), name: name.clone() });
            let now = Instant::now();
            for delay in &self.config.slice_retries {
                retries.insert(now + *delay);
            }
        }
        dirty.add(change);
    }

    /// Start a sweep: start reading the table (in pieces, between changes;
    /// then it is compared with the plans), or `None` if it cannot be read
    /// (the sweep then reads every virtual service through netlink). Now and
    /// then, what the caches and the states disagree on is made dirty, should
    /// a change have been missed, and the node's addresses are read again.
    fn begin_sweep(&mut self, dirty: &mut Dirty) -> Option<TableReading> {
        self.kernel.listed = None;
        self.serving_due = true;
        self.sweeper.sweeps += 1;
        self.sweeper.counted = false;
        self.metrics.sweeps.inc();
        if self.sweeper.sweeps.is_multiple_of(ADDRESSES_EVERY) {
            let started = thread_cpu();
            if self.kernel.refresh_node_addresses() {
                self.evaluator.plans_changed += 1;
            }
            self.kernel.forget_expired_refusals();
            // And the table is compared in full, whatever its hash.
            self.sweeper.quiet = None;
            self.metrics.sweep_step("cross_check", thread_cpu().saturating_sub(started));
        }
        if self.sweeper.sweeps.is_multiple_of(CROSS_CHECK_EVERY) {
            let started = thread_cpu();
            self.evaluator.cross_check(dirty);
            if self.sweeper.slice_changes != self.sweeper.slice_changes_forgotten {
                self.sweeper.slice_changes_forgotten = self.sweeper.slice_changes;
                let present = self.evaluator.endpoint_addresses();
                self.evaluator.forget_gone_endpoints(&present);
                self.kernel.forget_gone_endpoints(&present);
            }
            self.metrics.sweep_step("cross_check", thread_cpu().saturating_sub(started));
        }
        let started = thread_cpu();
        let reading = self.open_table();
        self.metrics.sweep_step("read", thread_cpu().saturating_sub(started));
        reading
    }

    /// Open a read of the table: list it through `getsockopt` or open
    /// `/proc/net/ip_vs`.
    fn open_table(&mut self) -> Option<TableReading> {
        if self.sweeper.table_reader == TableReader::Auto && !self.plans_have_ipv6() {
            if self.sweeper.sockopt.is_none() {
                match SockoptTable::new() {
                    Ok(table) => self.sweeper.sockopt = Some(table),
                    Err(error) => tracing::warn!(%error, "cannot open a socket to read the IPVS table: the sweep reads /proc/net/ip_vs"),
                }
            }
            if let Some(table) = self.sweeper.sockopt.as_mut() {
                match table.list_services() {
                    Ok(()) => return Some(TableReading::Sockopt),
                    Err(error) => tracing::debug!(%error, "cannot list the IPVS table through getsockopt: the sweep reads /proc/net/ip_vs"),
                }
            }
        }
        match procfs::TableRead::open(&mut self.sweeper.table_text) {
            Ok(read) => Some(TableReading::Proc(read)),
            Err(error) => {
                tracing::debug!(%error, "cannot read /proc/net/ip_vs: the sweep reads everything through netlink");
                None
            }
        }
    }

    /// Read the next piece of the table; `true` once it is all read.
    fn read_piece(&mut self, reading: &mut TableReading) -> Result<bool, Box<dyn std::error::Error>> {
        let started = thread_cpu();
        let done: Result<bool, Box<dyn std::error::Error>> = match reading {
            TableReading::Sockopt => match self.sweeper.sockopt.as_mut() {
                Some(table) => table.read_destinations(SOCKOPT_PIECE).map_err(Into::into),
                None => Ok(true),
            },
            TableReading::Proc(read) => read.next_piece(&mut self.sweeper.table_text).map_err(Into::into),
        };
        self.metrics.sweep_step("read", thread_cpu().saturating_sub(started));
        done
    }

    /// The plans' owners whose virtual services differ from them in the table
    /// just read; `None` when it cannot be compared.
    fn drifted(&mut self, reading: &TableReading) -> Option<HashSet<WsKey>> {
        let started = thread_cpu();
        let drifted = match reading {
            TableReading::Sockopt => self.drifted_in_sockopt_table(),
            TableReading::Proc(_) => self.drifted_in_text(),
        };
        self.metrics.sweep_step("compare", thread_cpu().saturating_sub(started));
        drifted
    }

    /// Whether any plan has an IPv6 virtual service or destination: the
    /// `getsockopt` interface would not show it (kube-proxy programs IPv6
    /// NodePorts only for IPv6 Services, whose ClusterIPs are IPv6).
    fn plans_have_ipv6(&mut self) -> bool {
        let generation = self.evaluator.plans_changed;
        if let Some((seen, answer)) = self.sweeper.plans_have_ipv6
            && seen == generation
        {
            return answer;
        }
        let answer = self.evaluator.plans_have_ipv6();
        self.sweeper.plans_have_ipv6 = Some((generation, answer));
        answer
    }

    /// The plans' owners whose virtual services differ from them in the
    /// table just read through `getsockopt`: a scheduler or a weight.
    fn drifted_in_sockopt_table(&mut self) -> Option<HashSet<WsKey>> {
        let hash = drift::sockopt_table_hash(self.sweeper.sockopt.as_ref()?);
        let (evaluator, node_addresses) = (&self.evaluator, &self.kernel.node_addresses);
        self.sweeper.unless_quiet((hash, evaluator.plans_changed), |sweeper| {
            // Built only when the sweep compares: a quiet one only hashes.
            let matcher = Matcher::new(evaluator.plans(), node_addresses);
            let table = sweeper.sockopt.as_ref()?;
            let drifted = drift::drifted_in_sockopt_table(table, |key| Some(wanted(matcher.find(key)?)));
            Some(drifted.into_iter().cloned().collect())
        })
    }

    /// The same, in the text of `/proc/net/ip_vs` just read; `None` when the
    /// text is not in the kernel's format.
    fn drifted_in_text(&mut self) -> Option<HashSet<WsKey>> {
        let hash = procfs::table_hash(&self.sweeper.table_text);
        let (evaluator, node_addresses) = (&self.evaluator, &self.kernel.node_addresses);
        self.sweeper.unless_quiet((hash, evaluator.plans_changed), |sweeper| {
            let matcher = Matcher::new(evaluator.plans(), node_addresses);
            let Some(drifted) = procfs::drifted(&sweeper.table_text, |key| Some(wanted(matcher.find(key)?))) else {
                tracing::warn!("/proc/net/ip_vs is not in the expected format: the sweep reads everything through netlink");
                return None;
            };
            Some(drifted.into_iter().cloned().collect())
        })
    }
}

/// CPU time of the calling thread so far, user and kernel.
fn thread_cpu() -> Duration {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec for the call to write.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(u64::try_from(now.tv_sec).unwrap_or(0), u32::try_from(now.tv_nsec).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, n: &str) -> WsKey {
        WsKey { namespace: ns.into(), name: n.into() }
    }

    #[test]
    fn dirty_tracks_keys_and_everything() {
        let mut dirty = Dirty::default();
        assert!(dirty.is_empty());
        dirty.add(Change::Slices("shop".into(), "web".into()));
        dirty.add(Change::PodInfo("blog".into(), "web".into()));
        assert!(dirty.contains(&key("shop", "web")));
        assert!(dirty.contains(&key("blog", "web")), "a PodInfoSlice names its WeightedService");
        assert!(!dirty.contains(&key("shop", "api")));
        assert!(!dirty.is_sweep_chunk());
        dirty.add(Change::All);
        assert!(dirty.contains(&key("shop", "api")));
    }

    #[test]
    fn a_sweep_chunk_only_compares() {
        let dirty = Dirty { check: [key("shop", "web")].into(), ..Dirty::default() };
        assert!(dirty.is_sweep_chunk());
        assert!(dirty.in_scope(&key("shop", "web")));
        assert!(!dirty.contains(&key("shop", "web")), "nothing is rebuilt");
    }

    #[test]
    fn a_quiet_sweep_is_not_compared_again_until_the_table_or_the_plans_change() {
        let mut sweeper = Sweeper::new(TableReader::Auto);
        let mut compared = 0;
        let mut sweep = |sweeper: &mut Sweeper, seen: (u64, u64), found: &[&str]| {
            sweeper.unless_quiet(seen, |_| {
                compared += 1;
                Some(found.iter().map(|n| key("ns", n)).collect())
            })
        };
        assert_eq!(sweep(&mut sweeper, (1, 1), &[]), Some(HashSet::new()));
        assert_eq!(sweep(&mut sweeper, (1, 1), &["never"]), Some(HashSet::new()), "the same table: quiet");
        assert_eq!(sweep(&mut sweeper, (2, 1), &["a"]).map(|d| d.len()), Some(1), "another table");
        assert_eq!(sweep(&mut sweeper, (2, 1), &["a"]).map(|d| d.len()), Some(1), "a sweep with differences is not quiet");
        assert_eq!(sweep(&mut sweeper, (2, 2), &[]), Some(HashSet::new()), "other plans");
        assert_eq!(compared, 4);
    }
}
