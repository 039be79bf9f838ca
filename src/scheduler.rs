//! The tick: list `incoming/`, publish the backlog, pick up to `schedule.max_files_per_tick`
//! files (oldest first) that are neither in flight nor backing off, and hand each to a worker
//! task. A worker task first waits for one of `workers.concurrency` permits, then for the rate
//! limiter, then loads; the scheduler never waits for loads, so a slow file does not delay the
//! listing (and the backlog metric) of the next tick.
//!
//! A table that does not exist yet is created by one file: the first by key order of those
//! listed for it. The others for that table wait behind a [`Gate`] until that load ends, then
//! load in parallel; if it did not load, they are left for the next tick, which elects the next
//! first key. So the types of a new table never depend on which worker or replica wins a race.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::cloudwatch::Publisher;
use crate::config::Config;
use crate::error::Stage;
use crate::sink::redshift::RedshiftBatch;
use crate::source::{INCOMING, ObjectMeta};
use crate::status::{TickReport, TickResult};
use crate::worker::{FileOutcome, Unit, Worker};

pub struct Scheduler {
    worker: Arc<Worker>,
    interval: Duration,
    max_files_per_tick: usize,
    concurrency: usize,
    /// `workers.group_files` and `workers.group_bytes` (see [`Scheduler::units`]).
    group_files: usize,
    group_bytes: u64,
    /// Why a semaphore: it bounds loads (and so busy database connections) per process while
    /// letting the scheduler hand out work without waiting.
    permits: Arc<Semaphore>,
    /// Why governor: a direct limiter shared by all workers caps files started per second.
    limiter: Arc<DefaultDirectRateLimiter>,
    /// Keys handed to a worker and not finished: never handed out twice by this process.
    in_flight: Arc<Mutex<HashSet<String>>>,
    backoff: Arc<Mutex<HashMap<String, Backoff>>>,
    initial_backoff: Duration,
    max_backoff: Duration,
    ledger_ready: AtomicBool,
    /// Tables known to exist: no need to ask the database again.
    known_tables: Mutex<HashSet<String>>,
    /// Per table being created by a load of this process: that load's outcome, once known.
    creating: Mutex<HashMap<String, tokio::sync::watch::Receiver<Option<bool>>>>,
    tracker: TaskTracker,
    stop: CancellationToken,
    publisher: Option<Arc<Publisher>>,
    /// Log a failed tick (the daemon), or leave it to the caller, which reports it (`once`).
    log_failed_ticks: bool,
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    not_before: Instant,
}

impl Scheduler {
    pub fn new(
        config: &Config,
        worker: Arc<Worker>,
        stop: CancellationToken,
        publisher: Option<Arc<Publisher>>,
    ) -> Scheduler {
        let per_second = NonZeroU32::new(config.workers.files_per_second).unwrap_or(NonZeroU32::MIN);
        Scheduler {
            worker,
            interval: config.schedule.interval,
            max_files_per_tick: config.schedule.max_files_per_tick,
            concurrency: config.workers.concurrency.max(1),
            group_files: config.workers.group_files,
            group_bytes: config.workers.group_bytes,
            permits: Arc::new(Semaphore::new(config.workers.concurrency)),
            limiter: Arc::new(RateLimiter::direct(Quota::per_second(per_second))),
            in_flight: Arc::default(),
            backoff: Arc::default(),
            initial_backoff: config.retry.initial_backoff,
            max_backoff: config.retry.max_backoff,
            ledger_ready: AtomicBool::new(false),
            known_tables: Mutex::default(),
            creating: Mutex::default(),
            tracker: TaskTracker::new(),
            stop,
            publisher,
            log_failed_ticks: true,
        }
    }

    /// For `once`: a failed tick is not logged here, because the caller reports it (once).
    pub fn leaving_failed_ticks_to_the_caller(mut self) -> Scheduler {
        self.log_failed_ticks = false;
        self
    }

    /// Ticks every `schedule.interval` until `stop`, then waits up to `grace` for loads in
    /// flight. Returns the number of loads abandoned (they roll back).
    pub async fn run(&self, grace: Duration) -> usize {
        let mut interval = tokio::time::interval(self.interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = interval.tick() => {}
            }
            self.worker.status.heartbeat();
            if let Some(publisher) = &self.publisher {
                publisher.publish(); // the previous tick's outcome; never waited for
            }
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = self.tick() => {}
            }
            self.worker.status.heartbeat();
        }
        let abandoned = self.drain(grace).await;
        if let Some(publisher) = &self.publisher {
            let _ = publisher.publish().await; // the last figures; bounded by cloudwatch.timeout
        }
        abandoned
    }

    /// Waits up to `grace` for the tasks started so far; returns how many did not finish.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.tracker.close();
        let in_flight = self.in_flight.lock().map(|s| s.len()).unwrap_or(0);
        if in_flight > 0 {
            info!(
                loads = in_flight,
                grace_s = grace.as_secs_f64(),
                "stopping: letting loads in flight finish"
            );
        }
        match tokio::time::timeout(grace, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => {
                let left = self.in_flight.lock().map(|s| s.len()).unwrap_or(0);
                error!(
                    loads = left,
                    "grace period over: abandoning loads in flight; their transactions roll back"
                );
                left
            }
        }
    }

    /// One tick: list, record the backlog, dispatch. Returns the dispatched tasks.
    pub async fn tick(&self) -> Vec<JoinHandle<Vec<FileOutcome>>> {
        let started_at = Utc::now();
        let clock = Instant::now();
        let span = info_span!("tick");
        let (result, listed, dispatched, handles) = self.tick_inner().instrument(span).await;
        let report = TickReport {
            started_at,
            duration_ms: clock.elapsed().as_millis() as u64,
            listed,
            dispatched,
            result: match result {
                Ok(()) => TickResult::Ok,
                Err((stage, e)) => {
                    if self.log_failed_ticks {
                        let what = match stage {
                            Stage::List => format!("listing {INCOMING} failed"),
                            _ => "cannot reach the database".to_string(),
                        };
                        error!(error.stage = stage.as_str(), error.message = %e, "{what}");
                    }
                    TickResult::Failed(e)
                }
            },
        };
        self.worker.status.record_tick(report);
        handles
    }

    /// The tick's work; a failure says at which stage (listing, or the database's ledger).
    async fn tick_inner(&self) -> (Result<(), (Stage, String)>, u64, u64, Vec<JoinHandle<Vec<FileOutcome>>>) {
        let listing_started = Instant::now();
        let listing = match self.worker.source.list_incoming().await {
            Ok((listing, calls)) => {
                self.worker
                    .status
                    .record_listing(&listing, calls, listing_started.elapsed());
                listing
            }
            Err(e) => return (Err((Stage::List, e.to_string())), 0, 0, Vec::new()),
        };
        let listed = listing.len() as u64;
        if !self.ledger_ready.load(Ordering::Relaxed) {
            if let Err(e) = self.worker.db.ensure_ledger().await {
                return (Err((Stage::Database, e.to_string())), listed, 0, Vec::new());
            }
            self.ledger_ready.store(true, Ordering::Relaxed);
        }
        let mut listing = listing;
        let before = listing.len();
        let mut left = None;
        listing.retain(|o| {
            let leave = self.worker.routes.leaves(&o.key);
            if leave && left.is_none() {
                left = Some(o.key.clone());
            }
            !leave
        });
        if let Some(example) = left {
            warn!(
                files = before - listing.len(),
                example = %example,
                "left in incoming/: no route matches these keys (routing.unmatched = \"leave\")"
            );
        }
        let picked = self.pick(listing);
        if !picked.is_empty() {
            info!(listed, picked = picked.len(), "dispatching files");
        }
        let dispatched = picked.len() as u64;
        let handles = if self.worker.db.batch_loader().is_some() {
            // Batches create their table in their COPY's transaction: no gates.
            RedshiftBatch::group(picked, &self.worker.routes)
                .into_iter()
                .map(|batch| self.dispatch(Unit::Batch(Box::new(batch)), Gate::Open))
                .collect()
        } else {
            let gates = self.gates_for_new_tables(&picked).await;
            self.units(picked, gates)
                .into_iter()
                .map(|(unit, gate)| self.dispatch(unit, gate))
                .collect()
        };
        (Ok(()), listed, dispatched, handles)
    }

    /// One [`Gate`] per picked file: open for a table that exists (or cannot be checked: the
    /// loads then find out, serialized by the database), `Creates` for the first key of a table
    /// that does not, `Follows` for the rest of its files.
    async fn gates_for_new_tables(&self, picked: &[ObjectMeta]) -> Vec<Gate> {
        let tables: Vec<Option<String>> = picked
            .iter()
            .map(|o| self.worker.routes.resolve(&o.key).table.ok())
            .collect();
        let unknown: Vec<String> = {
            let known = self.known_tables.lock().unwrap_or_else(|p| p.into_inner());
            let mut unknown: Vec<String> = tables
                .iter()
                .flatten()
                .filter(|t| !known.contains(*t))
                .cloned()
                .collect();
            unknown.sort();
            unknown.dedup();
            unknown
        };
        let mut gates: Vec<Gate> = (0..picked.len()).map(|_| Gate::Open).collect();
        if unknown.is_empty() {
            return gates;
        }
        let existing = match self.worker.db.existing_tables(&unknown).await {
            Ok(existing) => existing,
            Err(_) => return gates,
        };
        let mut creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        creating.retain(|table, _| !existing.contains(table));
        self.known_tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(existing.iter().cloned());
        for table in unknown.iter().filter(|t| !existing.contains(*t)) {
            let files: Vec<usize> = (0..picked.len())
                .filter(|&i| tables[i].as_deref() == Some(table.as_str()))
                .collect();
            // A load of an earlier tick may be creating it still: everything follows that one.
            let pending =
                |rx: &&tokio::sync::watch::Receiver<Option<bool>>| rx.borrow().is_none() && rx.has_changed().is_ok();
            let outcome = match creating.get(table).filter(pending) {
                Some(rx) => rx.clone(),
                None => {
                    let Some(&first) = files.iter().min_by(|&&a, &&b| picked[a].key.cmp(&picked[b].key)) else {
                        continue;
                    };
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    gates[first] = Gate::Creates(tx);
                    creating.insert(table.clone(), rx.clone());
                    rx
                }
            };
            for i in files {
                if matches!(gates[i], Gate::Open) {
                    gates[i] = Gate::Follows(outcome.clone());
                }
            }
        }
        gates
    }

    /// What each worker task loads. Files of tables that exist (an open gate) go in groups,
    /// loaded in one transaction each, of at most `workers.group_files` files and
    /// `workers.group_bytes` bytes, and no larger than it takes to give every worker a share
    /// of this tick's files; the others (a file that creates its table or waits for it, one
    /// over the bytes, or a database without groups) load alone.
    fn units(&self, picked: Vec<ObjectMeta>, gates: Vec<Gate>) -> Vec<(Unit, Gate)> {
        let grouping = self.worker.db.loads_groups() && self.group_files > 1;
        let open = gates.iter().filter(|g| matches!(g, Gate::Open)).count();
        let size = self.group_files.min(open.div_ceil(self.concurrency)).max(1);
        let mut units = Vec::with_capacity(picked.len());
        let mut group: Vec<ObjectMeta> = Vec::new();
        let mut bytes = 0;
        fn close(group: &mut Vec<ObjectMeta>, units: &mut Vec<(Unit, Gate)>) {
            match group.len() {
                0 => {}
                1 => units.extend(group.pop().map(|obj| (Unit::File(obj), Gate::Open))),
                _ => units.push((Unit::Group(std::mem::take(group)), Gate::Open)),
            }
        }
        for (obj, gate) in picked.into_iter().zip(gates) {
            if !grouping || !matches!(gate, Gate::Open) || obj.size > self.group_bytes {
                units.push((Unit::File(obj), gate));
                continue;
            }
            if group.len() >= size || bytes + obj.size > self.group_bytes {
                close(&mut group, &mut units);
                bytes = 0;
            }
            bytes += obj.size;
            group.push(obj);
        }
        close(&mut group, &mut units);
        units
    }

    /// Oldest first; skips files in flight or backing off; at most `max_files_per_tick`.
    fn pick(&self, mut listing: Vec<ObjectMeta>) -> Vec<ObjectMeta> {
        let now = Instant::now();
        let in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let mut backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        let listed: HashSet<&str> = listing.iter().map(|o| o.key.as_str()).collect();
        backoff.retain(|k, _| listed.contains(k.as_str()));
        listing.retain(|o| !in_flight.contains(&o.key) && backoff.get(&o.key).is_none_or(|b| b.not_before <= now));
        listing.sort_by(|a, b| a.last_modified.cmp(&b.last_modified).then_with(|| a.key.cmp(&b.key)));
        listing.truncate(self.max_files_per_tick);
        listing
    }

    /// Starts a task for one file, or for one batch of files (Redshift).
    fn dispatch(&self, unit: Unit, gate: Gate) -> JoinHandle<Vec<FileOutcome>> {
        let objs = unit.files().to_vec();
        {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            in_flight.extend(objs.iter().map(|o| o.key.clone()));
        }
        let worker = self.worker.clone();
        let permits = self.permits.clone();
        let limiter = self.limiter.clone();
        let stop = self.stop.clone();
        let in_flight = self.in_flight.clone();
        let backoff = self.backoff.clone();
        let (initial, max) = (self.initial_backoff, self.max_backoff);
        let span = match objs.as_slice() {
            [obj] => info_span!("file", file.key = %obj.key, file.source = %worker.source.id(), file.etag = %obj.etag),
            _ if matches!(unit, Unit::Group(_)) => info_span!("group", files = objs.len()),
            _ => info_span!("batch", files = objs.len()),
        };
        self.tracker.spawn(
            async move {
                let outcomes = async {
                    let not_started = || vec![FileOutcome::NotStarted; objs.len()];
                    // Behind the load creating this file's table: only once it loaded.
                    if let Gate::Follows(mut outcome) = gate.clone_follower() {
                        let created = tokio::select! {
                            o = outcome.wait_for(Option::is_some) => o.is_ok_and(|o| *o == Some(true)),
                            _ = stop.cancelled() => false,
                        };
                        if !created {
                            return not_started();
                        }
                    }
                    // Files not started when a stop comes are simply left for next time.
                    let _permit = tokio::select! {
                        p = permits.acquire_owned() => p.expect("the semaphore is never closed"),
                        _ = stop.cancelled() => return not_started(),
                    };
                    // One start per file, a group's included.
                    for _ in 0..objs.len() {
                        tokio::select! {
                            _ = limiter.until_ready() => {}
                            _ = stop.cancelled() => return not_started(),
                        }
                    }
                    // Boxed, as the panic's recording below: a tick dispatches up to
                    // `max_files_per_tick` of these tasks at once, and each task's memory is its
                    // future's largest state, which these would otherwise inline.
                    let Some(unit) = Box::pin(worker.identify(unit)).await else {
                        return not_started();
                    };
                    // The versions loaded, for what a panic leaves to record.
                    let versions = unit.files().to_vec();
                    worker.status.load_started(&versions);
                    // Once started, a load runs to its end even if a stop comes meanwhile. It
                    // runs as a task of its own: a panic in it (ours or a dependency's) ends
                    // that task only, and is recorded as the attempt's outcome here, so the
                    // key leaves the in-flight set and the scheduler keeps going.
                    let load = {
                        let worker = worker.clone();
                        tokio::spawn(async move { worker.process_unit(unit).await }.in_current_span())
                    };
                    let outcomes = match load.await {
                        Ok(outcomes) => outcomes,
                        Err(e) => Box::pin(worker.panicked(&versions, &panic_message(e))).await,
                    };
                    worker.status.load_ended(&versions);
                    // In the order dispatched: a file of a group gone before its turn was not
                    // started.
                    let mut by_key: HashMap<&str, FileOutcome> =
                        versions.iter().map(|v| v.key.as_str()).zip(outcomes).collect();
                    let outcomes: Vec<FileOutcome> = objs
                        .iter()
                        .map(|o| by_key.remove(o.key.as_str()).unwrap_or(FileOutcome::NotStarted))
                        .collect();
                    if let Gate::Creates(tx) = &gate {
                        // Rows loaded means the table exists now; a header-only file creates none
                        // (and `AlreadyLoaded` does not say), so the next tick decides again.
                        let loaded = matches!(outcomes.first(), Some(FileOutcome::Loaded { rows }) if *rows > 0);
                        let _ = tx.send(Some(loaded));
                    }
                    outcomes
                }
                .await;
                // A creating load that never started drops its sender: its followers then see
                // the channel closed and are left for the next tick as well.
                let mut backoff = backoff.lock().unwrap_or_else(|p| p.into_inner());
                for (obj, outcome) in objs.iter().zip(&outcomes) {
                    if let FileOutcome::Retry { .. } = outcome {
                        let b = backoff.entry(obj.key.clone()).or_insert(Backoff {
                            failures: 0,
                            not_before: Instant::now(),
                        });
                        b.failures += 1;
                        b.not_before = Instant::now() + backoff_delay(initial, max, b.failures);
                    } else {
                        backoff.remove(&obj.key);
                    }
                }
                drop(backoff);
                let mut in_flight = in_flight.lock().unwrap_or_else(|p| p.into_inner());
                for obj in &objs {
                    in_flight.remove(&obj.key);
                }
                outcomes
            }
            .instrument(span),
        )
    }
}

/// How a file waits for the creation of its table (see the module docs).
enum Gate {
    /// The table exists, or is not this tick's concern.
    Open,
    /// This file's load creates the table; the others learn whether it loaded.
    Creates(tokio::sync::watch::Sender<Option<bool>>),
    /// Wait for the creating load; go on only if it loaded.
    Follows(tokio::sync::watch::Receiver<Option<bool>>),
}

impl Gate {
    fn clone_follower(&self) -> Gate {
        match self {
            Gate::Follows(rx) => Gate::Follows(rx.clone()),
            _ => Gate::Open,
        }
    }
}

/// What a load task that did not finish said.
fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// `initial × 2^(failures-1)`, capped at `max`, with ±50% jitter so replicas do not retry in step.
fn backoff_delay(initial: Duration, max: Duration, failures: u32) -> Duration {
    let exp = initial
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(max);
    exp.mul_f64(rand::rng().random_range(0.5..1.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One tick over a local folder into SQLite, waiting for its loads.
    async fn tick(scheduler: &Scheduler) -> Vec<FileOutcome> {
        let mut outcomes = Vec::new();
        for handle in scheduler.tick().await {
            outcomes.extend(handle.await.expect("the worker boundary never panics"));
        }
        outcomes
    }

    #[tokio::test]
    async fn a_panic_in_a_load_is_an_attempt_and_the_scheduler_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (key, body) in [("boom/a.csv", "id\n1\n"), ("fine/b.csv", "id\n2\n")] {
            let path = root.join("incoming").join(key);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, body).unwrap();
        }
        let mut config = Config::default();
        config.source.url = format!("file://{}", root.display());
        config.source.settle_time = Duration::ZERO;
        config.database.url = format!("sqlite://{}/loader.db", root.display()).into();
        let source = Arc::new(crate::source::Source::connect(&config.source, true).await.unwrap());
        let db = Arc::new(crate::sink::Database::connect_lazy(&config).unwrap());
        db.ensure_ledger().await.unwrap();
        let status = Arc::new(crate::status::Status::new(&config.pipeline, None));
        let worker = Arc::new(Worker {
            source: source.clone(),
            db: db.clone(),
            status: status.clone(),
            routes: crate::routes::Routes::new(&config),
            include_values: true,
        });
        let scheduler = Scheduler::new(&config, worker, CancellationToken::new(), None);
        crate::reader::tests::PANIC_ON.lock().unwrap().push("boom/a.csv".into());

        let mut first = tick(&scheduler).await;
        first.sort_by_key(|o| format!("{o:?}"));
        assert!(matches!(first[0], FileOutcome::Loaded { rows: 1 }), "{first:?}");
        assert!(
            matches!(&first[1], FileOutcome::Retry { stage: crate::error::Stage::Load, message } if message.contains("injected panic")),
            "{first:?}"
        );
        assert!(
            scheduler.in_flight.lock().unwrap().is_empty(),
            "the panicked key left the in-flight set"
        );
        assert!(root.join("incoming/boom/a.csv").exists() && root.join("processed/fine/b.csv").exists());
        let ledger = sqlx::SqlitePool::connect(&format!("sqlite://{}/loader.db", root.display()))
            .await
            .unwrap();
        let (attempts, history): (i64, String) =
            sqlx::query_as("SELECT attempts, history FROM s3_sql_loader_files WHERE object_key = 'boom/a.csv'")
                .fetch_one(&ledger)
                .await
                .unwrap();
        assert_eq!(attempts, 1);
        assert!(
            history.contains("\"load\"") && history.contains("injected panic"),
            "{history}"
        );

        // The same scheduler tries it again once its backoff has passed, and it loads.
        crate::reader::tests::PANIC_ON.lock().unwrap().clear();
        scheduler.backoff.lock().unwrap().clear();
        let second = tick(&scheduler).await;
        assert_eq!(second, vec![FileOutcome::Loaded { rows: 1 }]);
        assert!(root.join("processed/boom/a.csv").exists());
        assert_eq!(status.snapshot().totals.files_loaded, 2);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_stays_capped() {
        let (initial, max) = (Duration::from_secs(2), Duration::from_secs(60));
        for _ in 0..200 {
            let first = backoff_delay(initial, max, 1);
            assert!(
                first >= Duration::from_secs(1) && first <= Duration::from_secs(3),
                "{first:?}"
            );
            let fourth = backoff_delay(initial, max, 4);
            assert!(
                fourth >= Duration::from_secs(8) && fourth <= Duration::from_secs(24),
                "{fourth:?}"
            );
            assert!(backoff_delay(initial, max, 40) <= max.mul_f64(1.5));
        }
    }
}
