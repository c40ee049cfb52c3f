//! The relocation job. `run`: finish what earlier runs left committed-but-not-cleaned,
//! then each worker takes leases ([`self::lease`]) and pushes their keyset batches
//! through a three-stage pipeline — copy → commit → cleanup, joined by bounded channels —
//! so S3 never waits on the database and the database never waits on S3. `plan` runs
//! the same planning and checks batch by batch, only looking.

pub mod checksum;
pub mod cleanup;
pub mod commit;
pub mod copy;
pub mod lease;
pub mod limits;
pub mod listed;
pub mod plan;
pub mod throttle;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use crate::config::JobConfig;
use crate::db::{self, Queries, Row, TableInfo};
use crate::ledger;
use crate::progress::Progress;
use crate::report::{BackupInfo, Outcome, Report, ReportLine, Summary};
use crate::s3::{self, Side, S3};
use cleanup::Pending;
use commit::{CommitBatch, Committed};
use copy::{Made, PairResult};
use lease::{TableLock, Take};
use plan::{attention, moved_line, split_ready, Move};

/// `--lease-ttl` of a run whose first process did not set one.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(120);

/// Options of `run` beyond the job itself.
#[derive(Debug, Clone)]
pub struct RunOptions<'a> {
    pub report: Option<&'a Path>,
    /// Pipelines in this process.
    pub workers: usize,
    /// Heartbeat age after which a lease whose owner still holds its session is taken;
    /// None: the run's (set by its first process), else [`DEFAULT_LEASE_TTL`].
    pub lease_ttl: Option<Duration>,
    /// The backup this run follows, recorded with the run in the ledger.
    pub backup: Option<BackupInfo>,
    /// When the run waits for the database's health.
    pub health: crate::config::Health,
}

impl Default for RunOptions<'_> {
    fn default() -> Self {
        RunOptions {
            report: None,
            workers: 1,
            lease_ttl: None,
            backup: None,
            health: crate::config::Health::default(),
        }
    }
}

/// Everything a job shares among its workers (and what `rollback` needs too).
pub(crate) struct Shared<'a> {
    pub(crate) cfg: &'a JobConfig,
    pub(crate) pool: deadpool_postgres::Pool,
    pub(crate) s3: S3,
    pub(crate) table: TableInfo,
    pub(crate) q: Queries,
    pub(crate) report: Mutex<Report>,
    /// Copies in flight per worker (the `--concurrency` budget split among workers).
    pub(crate) concurrency: usize,
    pub(crate) progress: Progress,
    /// `run`: waits while the database is under stress (None: nothing asked).
    pub(crate) throttle: Option<throttle::Throttle>,
    /// `run`: the run whose source listing phase 2 looks sources up in ([`listed`]);
    /// unset: a HEAD per source.
    pub(crate) listing: std::sync::OnceLock<i64>,
}

impl Shared<'_> {
    /// Whether the run walks the source listing first (phase 1): the prefix swap keeps
    /// key order (no --rewrite) and an index finds the rows of a page of keys. Else it
    /// sweeps the table by id (phase 2) from the start.
    pub(crate) fn phase1(&self) -> bool {
        self.table.path_indexed
            && self.cfg.rewrite_spec.is_none()
            && self.table.reference.values_are_keys()
    }

    /// Wait while the database is under stress (see [`throttle`]). False: the run was
    /// cancelled during the wait, and the step is not to be taken.
    pub(crate) async fn healthy(
        &self,
        db: &tokio_postgres::Client,
        run_id: i64,
        cancel: &CancellationToken,
    ) -> Result<bool> {
        match &self.throttle {
            None => Ok(true),
            Some(t) => t.wait(db, run_id, &self.progress, cancel).await,
        }
    }

    pub(crate) fn report(&self) -> std::sync::MutexGuard<'_, Report> {
        // A poisoned report only means another stage panicked; its counts are still
        // the best there is.
        self.report
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The report, once the stages are done with it.
    pub(crate) fn into_report(self) -> Report {
        self.report
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The summary of a command that keeps no run of its own (`plan`, `rollback`), logged.
    pub(crate) fn finish(self, interrupted: bool) -> Result<Summary> {
        let summary = self.into_report().finish(None, interrupted)?;
        info!("{}", summary.one_line());
        Ok(summary)
    }

    pub(crate) async fn conn(&self) -> Result<deadpool_postgres::Client> {
        self.pool
            .get()
            .await
            .map_err(|e| anyhow!("getting a PostgreSQL connection: {e}"))
    }
}

/// Connect, check the table against the catalog and both buckets: every failure here is
/// a configuration error (exit 2) and nothing has been changed yet.
pub(crate) async fn open<'a>(
    cfg: &'a JobConfig,
    pool_size: usize,
    report: Report,
) -> Result<Shared<'a>> {
    let pool = db::pool(&cfg.database_url, pool_size, Some(cfg.batch_timeout))?;
    let client = db::connect_checked(&pool, &cfg.database_url).await?;
    let table = TableInfo::resolve(&client, cfg).await?;
    drop(client);
    if table.reference.reads_whole_column() {
        warn!(
            table = %table.display,
            "{} holds URLs or documents: each cleanup batch reads the whole column for \
             references (no index finds a key inside them). On a large table give a larger \
             --batch-size",
            table.reference.scanned_columns().join(" and ")
        );
    } else if !table.path_indexed {
        warn!(
            table = %table.display,
            "no index leads with the path column: each cleanup batch checks references with a \
             table scan. On a large table create one first (CREATE INDEX CONCURRENTLY ... ON {} ({}))",
            table.qualified, table.path_col
        );
    }
    for r in table.referencing.iter().filter(|r| !r.indexed) {
        warn!(
            "no index leads with --referenced-by {}: each cleanup batch scans {} for \
             references. On a large table create one first (CREATE INDEX CONCURRENTLY ... \
             ON {} ({}))",
            r.name, r.qualified, r.qualified, r.column
        );
    }
    let mut s3c = S3::for_job(cfg).await;
    s3c.held = table.held_keys;
    // Its own two connections (opened only when a multipart copy starts): the stages
    // hold the job pool's connections for as long as they run.
    let uploads = db::pool(&cfg.database_url, 2, Some(cfg.batch_timeout))?;
    s3c.uploads = Some(std::sync::Arc::new(ledger::UploadNotes(uploads)));
    s3c.src.check_bucket("--source", &cfg.source.bucket).await?;
    s3c.dst.check_bucket("--dest", &cfg.dest.bucket).await?;
    if !s3c.server_side {
        info!("source and destination differ in endpoint or credentials: objects are streamed");
    }
    let q = Queries::new(&table);
    Ok(Shared {
        cfg,
        pool,
        s3: s3c,
        table,
        q,
        report: Mutex::new(report),
        concurrency: cfg.concurrency,
        progress: Progress::silent(),
        throttle: None,
        listing: Default::default(),
    })
}

/// `relocator run`.
#[instrument(skip_all, fields(table = %cfg.table))]
pub async fn run(
    cfg: &JobConfig,
    opts: &RunOptions<'_>,
    cancel: CancellationToken,
) -> Result<Summary> {
    let workers = opts.workers.max(1);
    // Per worker: lease, scan, commit and cleanup connections; one more for bookkeeping.
    let mut sh = open(cfg, workers * 4 + 1, Report::new("run", opts.report)?).await?;
    sh.concurrency = (cfg.concurrency / workers).max(1);
    // Before anything is changed: what the health options ask must be readable.
    sh.throttle = throttle::Throttle::prepare(&opts.health, &*sh.conn().await?, &sh.table).await?;
    sh.s3
        .learn_create_only(&cfg.dest.bucket, &cfg.dest.prefix, &cfg.write)
        .await;
    sh.s3.learn_versions(&cfg.source.bucket).await;
    let mut main = sh.conn().await?;
    ledger::ensure(&mut main).await?;
    lease::lock_table(&main, &sh.table, TableLock::Run).await?;
    let (run_id, resumed, lease_ttl) =
        lease::begin_run(&mut main, cfg, &sh.table, opts.lease_ttl).await?;
    info!(run_id, resumed, workers, source = %cfg.source, dest = %cfg.dest, "run started");
    if let Some(b) = &opts.backup {
        main.execute(
            "UPDATE relocator.runs SET backup = $2 WHERE run_id = $1",
            &[&run_id, &serde_json::to_value(b)?],
        )
        .await
        .context("recording the backup with the run")?;
        info!(file = %b.file, rows = b.rows, sha256 = %b.sha256, "following backup");
    }
    cleanup::void_reservations(&main, &[]).await?;
    let (total, _) = db::count_selected(&main, &sh.table, Side::Source).await?;
    sh.progress = Progress::new("run", Some(total));

    let result = async {
        finish_earlier_cleanups(&sh, &main, run_id, &cancel).await?;
        take_back_unused_copies(&sh, &main, run_id, &cancel).await?;
        if listed::applies(&sh)
            && listed::prepare(&sh, &main, run_id, total as i64, &cancel).await?
        {
            let _ = sh.listing.set(run_id);
        }
        let tag = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
        let all = (0..workers).map(|n| {
            let me = format!("{tag}-{n}");
            let sh = &sh;
            let cancel = cancel.clone();
            async move { worker(sh, run_id, &me, lease_ttl, &cancel).await }
        });
        futures::future::try_join_all(all).await?;
        let finished = lease::finish_run_if_complete(&main, run_id).await?;
        if finished {
            listed::forget(&main, run_id).await?;
            cleanup::void_reservations(&main, &[]).await?;
            take_back_unused_copies(&sh, &main, run_id, &cancel).await?;
        }
        Ok::<_, anyhow::Error>(finished)
    }
    .await;
    sh.progress.finish();
    if let Some(t) = &sh.throttle {
        t.done(&main, run_id).await;
    }
    let interrupted = cancel.is_cancelled();
    let status = match &result {
        Ok(true) => "finished",
        Ok(false) if interrupted => "interrupted",
        Ok(false) => "running",
        Err(_) => "failed",
    };
    if status != "finished" && status != "running" {
        if let Err(e) = main
            .execute(
                "UPDATE relocator.runs SET status = $2, updated_at = now()
                  WHERE run_id = $1 AND status <> 'finished'",
                &[&run_id, &status],
            )
            .await
        {
            warn!(error = %format!("{e:#}"), "could not record the run's status");
        }
    }
    result?;
    lease::unlock_table(&main, &sh.table, TableLock::Run).await?;
    let q = sh.q.clone();
    let report = sh.into_report();
    let unreported = if status == "finished" {
        rows_left_unreported(&main, &q, &report).await?
    } else {
        0
    };
    let mut summary = report.finish(Some(run_id), interrupted)?;
    summary.rows_left_unreported = unreported;
    if unreported > 0 {
        warn!(
            rows = unreported,
            "rows are still under the source prefix that this process did not report: \
             written after the run had passed their place (an id, or a key, below where it \
             had got to), or reported by another process of the run. Rerun the same \
             command to move the former"
        );
    }
    info!(run_id, status, "{}", summary.one_line());
    Ok(summary)
}

/// Rows still under the source prefix once every lease is done that no report line
/// covers: the application wrote them behind the run's frontier (a random uuid id, a key
/// below the listing's frontier). Read after the end, so the summary does not claim a
/// table the run did not see whole. Bounded: at most the reported rows and 1,000 more
/// are read.
async fn rows_left_unreported(
    db: &deadpool_postgres::Client,
    q: &Queries,
    report: &Report,
) -> Result<u64> {
    let limit = report.judged_count() as i64 + 1000;
    let rows = db
        .query(q.scan(false, false), &[&limit])
        .await
        .context("looking for rows written behind the run")?;
    // A line names a key; where a row's value is not its key (several references, a
    // URL, a document), the row's lines are found by its id.
    let by_key = q.reference.values_are_keys();
    Ok(rows
        .iter()
        .filter(|r| {
            let id: &str = r.get(0);
            if by_key {
                !report.judged(id, r.get::<_, &str>(1))
            } else {
                !report.judged_row(id)
            }
        })
        .count() as u64)
}

/// Before any lease: sources whose rows this job committed in a worker that died
/// before cleaning up (their lease's lock is free).
/// Like every delete of the run, each batch of them waits for the database's health.
async fn finish_earlier_cleanups(
    sh: &Shared<'_>,
    db: &deadpool_postgres::Client,
    run_id: i64,
    cancel: &CancellationToken,
) -> Result<()> {
    let job = sh.cfg.fingerprint();
    let mut after = 0;
    loop {
        let pending = cleanup::pending_after(db, &job, after, 1000).await?;
        let Some(last) = pending.last() else {
            return Ok(());
        };
        if !sh.healthy(db, run_id, cancel).await? {
            return Ok(());
        }
        after = last.move_id;
        info!(
            count = pending.len(),
            "finishing the cleanup of an earlier run"
        );
        let mut counters = crate::report::Counters::default();
        let done = cleanup::delete_sources(db, &sh.s3, &sh.q, &pending, &mut counters).await?;
        let mut report = sh.report();
        report.counters.add(&counters);
        // One line per row: a move another process finished meanwhile is its to report.
        for p in pending {
            let (outcome, detail) = match done.get(&p.move_id) {
                None => continue,
                Some(cleanup::Cleaned::Changed) => {
                    (Outcome::SourceChanged, source_changed_detail(&p))
                }
                Some(_) => (
                    Outcome::AlreadyMoved,
                    "rewritten by an earlier run; its source cleanup was finished now".into(),
                ),
            };
            report.record(ReportLine {
                id: p.row_id,
                old_path: p.old_path,
                new_path: p.new_path,
                outcome,
                detail,
            })?;
        }
        report.flush()?;
    }
}

fn source_changed_detail(p: &Pending) -> String {
    format!(
        "the object at s3://{}/{} was replaced after it was copied, so it was kept; the row \
         points at the copy of what it referenced when it was read ({}), the new upload is at \
         the old key",
        p.src_bucket, p.old_path, p.new_path
    )
}

/// Once a run of this job is finished (no batch of it in flight anywhere): remove the
/// copies it made for rows the application changed before their commit, where nothing
/// references them and they are still relocator's copies. Called when this run finishes,
/// and at start for an earlier finished run killed before it got to them; after a wait
/// for the database's health, like every delete of the run.
async fn take_back_unused_copies(
    sh: &Shared<'_>,
    db: &deadpool_postgres::Client,
    run_id: i64,
    cancel: &CancellationToken,
) -> Result<()> {
    if !sh.healthy(db, run_id, cancel).await? {
        return Ok(());
    }
    let counters = cleanup::take_back(
        db,
        &sh.s3,
        &sh.q,
        "SELECT run_id FROM relocator.runs WHERE job = $1 AND status = 'finished'",
        &sh.cfg.fingerprint(),
    )
    .await?;
    sh.report().counters.add(&counters);
    Ok(())
}

/// Where a batch reserves the destination keys it will rely on.
#[derive(Clone, Copy)]
struct Reserve<'a> {
    holder: &'a str,
    lease: i64,
}

impl Reserve<'_> {
    async fn reserve(
        &self,
        sh: &Shared<'_>,
        db: &deadpool_postgres::Client,
        pairs: &[(String, String)],
    ) -> Result<()> {
        let keys: Vec<&str> = pairs.iter().map(|(_, d)| d.as_str()).collect();
        cleanup::reserve(db, &sh.cfg.dest.bucket, &keys, self.holder, self.lease).await
    }

    /// Where the batch notes its copies before making them: on these reservations.
    fn intents<'s>(
        &'s self,
        sh: &'s Shared<'_>,
        db: &'s deadpool_postgres::Client,
    ) -> cleanup::BatchIntents<'s> {
        cleanup::BatchIntents::new(db, &sh.cfg.dest.bucket, self.holder)
    }
}

/// A name no other batch of any process has: its reservations' holder.
fn next_holder() -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let tag = TAG.get_or_init(|| format!("{}-{:016x}", std::process::id(), rand::random::<u64>()));
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{tag}-{n}")
}

/// A batch whose copies are done, on its way to the commit stage.
struct Copied {
    lease: i64,
    /// Names the batch's destination reservations, released by its commit.
    holder: String,
    /// The lease's last batch (phase 1: its only one): the commit marks it done.
    ends_lease: bool,
    last_id: String,
    ready: Vec<(Move, Made)>,
    /// Rows not to rewrite though some of their moves are ready, with why
    /// ([`plan::Split::held`]).
    held: HashMap<String, String>,
    rows: usize,
}

/// A batch's ready moves and the rows held back ([`plan::Split`]).
type Ready = (Vec<(Move, Made)>, HashMap<String, String>);

/// What flows from the copy stage to the commit stage.
enum ToCommit {
    Batch(Copied),
    /// Every batch of this lease has been sent.
    LeaseEnd(i64),
}

/// A committed batch, on its way to the cleanup stage; a lease is let go of only after
/// the cleanup of its last batch, so no other process finishes that cleanup meanwhile.
enum ToClean {
    Batch(Vec<Pending>),
    /// The lease's last batch was committed (`done`: marked done by that commit) or the
    /// lease was lost; let go of it.
    LeaseEnd {
        lease: i64,
        done: bool,
        lost: bool,
    },
}

/// A worker's hold on its leases, shared by its stages.
struct WorkerLeases {
    /// The session that holds the advisory locks of the worker's leases.
    conn: tokio::sync::Mutex<deadpool_postgres::Client>,
    /// Leases another worker took over: their remaining batches are dropped.
    lost: Mutex<HashSet<i64>>,
    /// Leases whose locks can go, released with the next lease request (no extra trip).
    released: Mutex<Vec<i64>>,
}

/// One worker: take leases until the run is done, push their batches through the
/// pipeline. Returns when the run has no more leases, or on cancellation.
async fn worker(
    sh: &Shared<'_>,
    run_id: i64,
    me: &str,
    ttl: Duration,
    cancel: &CancellationToken,
) -> Result<()> {
    let leases = WorkerLeases {
        conn: tokio::sync::Mutex::new(sh.conn().await?),
        lost: Mutex::new(HashSet::new()),
        released: Mutex::new(Vec::new()),
    };
    let (to_commit, commit_rx) = mpsc::channel::<ToCommit>(1);
    let (to_clean, clean_rx) = mpsc::channel::<ToClean>(1);
    let stages = async {
        tokio::try_join!(
            copy_stage(sh, run_id, me, ttl, &leases, to_commit, cancel),
            commit_stage(sh, run_id, me, &leases, commit_rx, to_clean, cancel),
            cleanup_stage(sh, run_id, me, &leases, clean_rx, cancel),
        )
    };
    // A live worker keeps its leases however long a batch takes: their heartbeat is
    // renewed three times per TTL while the stages work.
    let heartbeat = async {
        let every = (ttl / 3).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            lease::heartbeat(&*leases.conn.lock().await, me).await?;
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    };
    tokio::select! {
        r = stages => { r?; }
        r = heartbeat => r?,
    }
    // The connection goes back to the pool: it must not keep any lease's lock.
    leases
        .conn
        .lock()
        .await
        .execute("SELECT pg_advisory_unlock_all()", &[])
        .await?;
    Ok(())
}

/// Stage 1: take leases, scan their batches, plan them, make the destination objects.
async fn copy_stage(
    sh: &Shared<'_>,
    run_id: i64,
    me: &str,
    ttl: Duration,
    leases: &WorkerLeases,
    out: mpsc::Sender<ToCommit>,
    cancel: &CancellationToken,
) -> Result<()> {
    let cfg = sh.cfg;
    let scan_conn = sh.conn().await?;
    let claims = cfg.rewrite_spec.is_some();
    let phase1 = sh.phase1();
    'leases: loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        let taken = {
            let c = leases.conn.lock().await;
            let mut done = leases
                .released
                .lock()
                .map(|mut r| std::mem::take(&mut *r))
                .unwrap_or_default();
            lease::take(
                &c,
                &sh.q,
                &sh.s3,
                cfg,
                run_id,
                me,
                cfg.batch_size,
                ttl,
                phase1,
                &mut done,
            )
            .await?
        };
        let mut lease = match taken {
            // Taken (back) by this worker: whatever it lost of it before is its again.
            Take::Lease(l) => {
                if let Ok(mut lost) = leases.lost.lock() {
                    lost.remove(&l.id);
                }
                l
            }
            Take::Done => return Ok(()),
            Take::Wait => {
                // Another worker is on the remaining leases; if it dies, take over.
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        if lease.phase == 1 {
            let objects = match lease.objects.take() {
                Some(o) => o,
                None => relist(sh, lease.pos.as_deref(), lease.hi.as_deref()).await?,
            };
            if let Some((last, _)) = objects.last() {
                let last_id = last.clone();
                let n = objects.len();
                let holder = next_holder();
                let at = Reserve {
                    holder: &holder,
                    lease: lease.id,
                };
                if !sh.healthy(&scan_conn, run_id, cancel).await? {
                    return Ok(());
                }
                let copies = key_batch(sh, &scan_conn, lease.pos.as_deref(), objects, at, cancel);
                let Some((ready, held)) = within_batch_timeout(cfg, n, copies).await? else {
                    info!("interrupted during the copy stage; nothing of this batch was committed");
                    return Ok(());
                };
                let batch = Copied {
                    lease: lease.id,
                    holder,
                    ends_lease: true,
                    last_id,
                    ready,
                    held,
                    rows: n,
                };
                if out.send(ToCommit::Batch(batch)).await.is_err() {
                    return Ok(());
                }
            } else if out.send(ToCommit::LeaseEnd(lease.id)).await.is_err() {
                return Ok(());
            }
            continue;
        }
        let mut pos = lease.pos.clone();
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            if leases
                .lost
                .lock()
                .map(|l| l.contains(&lease.id))
                .unwrap_or(true)
            {
                continue 'leases;
            }
            let rows = db::scan(
                &scan_conn,
                &sh.q,
                pos.as_deref(),
                lease.hi.as_deref(),
                cfg.batch_size,
            )
            .await?;
            let Some(last) = rows.last() else {
                break;
            };
            let last_id = last.id.clone();
            // Rows phase 1 of this run reported (a conflict, a rejection) are not tried
            // and reported again while they still hold that path.
            let rows: Vec<Row> = {
                let report = sh.report();
                rows.into_iter()
                    .filter(|r| !report.judged(&r.id, &r.path))
                    .collect()
            };
            let n = rows.len();
            let holder = next_holder();
            let at = Reserve {
                holder: &holder,
                lease: lease.id,
            };
            if !sh.healthy(&scan_conn, run_id, cancel).await? {
                return Ok(());
            }
            let copies = copy_batch(sh, &scan_conn, run_id, rows, claims, at, cancel);
            let Some((ready, held)) = within_batch_timeout(cfg, n, copies).await? else {
                info!("interrupted during the copy stage; nothing of this batch was committed");
                return Ok(());
            };
            pos = Some(last_id.clone());
            let batch = Copied {
                lease: lease.id,
                holder,
                ends_lease: false,
                last_id,
                ready,
                held,
                rows: n,
            };
            if out.send(ToCommit::Batch(batch)).await.is_err() {
                return Ok(()); // the commit stage stopped; its error is reported
            }
        }
        if out.send(ToCommit::LeaseEnd(lease.id)).await.is_err() {
            return Ok(());
        }
    }
}

/// A batch's copy work, bounded by `--batch-timeout`: past it the run stops (exit 1)
/// with nothing of the batch committed, instead of hanging on a stuck server.
async fn within_batch_timeout<T>(
    cfg: &JobConfig,
    rows: usize,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(cfg.batch_timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(anyhow!(
                "a batch of {rows} rows did not finish within --batch-timeout {}s; nothing of \
                 it was committed",
                cfg.batch_timeout.as_secs()
            ))
        })
}

/// Plan one batch and make its destination objects. Rows that cannot move are reported
/// here; the rest come back ready to commit. `None` when cancelled.
#[allow(clippy::too_many_arguments)]
async fn copy_batch(
    sh: &Shared<'_>,
    db: &deadpool_postgres::Client,
    run_id: i64,
    rows: Vec<Row>,
    claims: bool,
    at: Reserve<'_>,
    cancel: &CancellationToken,
) -> Result<Option<Ready>> {
    let batch = limits::plan_fitting(db, &sh.table.limits, &sh.q, rows, &sh.cfg.rewrite).await?;
    let mut lines = batch.skipped;
    let mut moves = batch.moves;
    if claims {
        // Several sources may map to one destination under --rewrite: the first claim
        // in PostgreSQL wins, whichever worker makes it.
        let lost = claim_destinations(db, run_id, &moves).await?;
        // A row moves with all its references or not at all: one lost claim holds back
        // the others of its row.
        let losing: HashSet<String> = moves
            .iter()
            .filter(|m| lost.contains_key(&m.dst_key))
            .map(|m| m.row.id.clone())
            .collect();
        moves.retain(|m| {
            if !losing.contains(&m.row.id) {
                return true;
            }
            lines.push(match lost.get(&m.dst_key) {
                Some(other) => attention(
                    m,
                    Outcome::Collision,
                    format!("{other:?} maps to the same destination key"),
                ),
                None => attention(
                    m,
                    Outcome::HeldBack,
                    "another reference of the row is a collision; the row is left as it is".into(),
                ),
            });
            false
        });
    }
    let pairs = plan::distinct_pairs(&moves);
    at.reserve(sh, db, &pairs).await?;
    let seen = match sh.listing.get() {
        Some(&run) => {
            let keys: Vec<&str> = pairs.iter().map(|(s, _)| s.as_str()).collect();
            listed::lookup(db, run, &keys).await?
        }
        None => HashMap::new(),
    };
    let intents = at.intents(sh, db);
    let mode = copy::Mode::Copy(Some(&intents));
    let Some(results) =
        copy::copy_all(&sh.s3, sh.cfg, &pairs, &seen, mode, sh.concurrency, cancel).await?
    else {
        return Ok(None);
    };
    settle(sh, db, moves, &pairs, results, lines)
        .await
        .map(Some)
}

/// Phase 1: a page range of the source listing. The rows referencing those keys are
/// found through the path index; the destination range is listed just before the copies
/// (the prefix swap keeps key order, so it is one contiguous range): no HEAD per object.
async fn key_batch(
    sh: &Shared<'_>,
    db: &deadpool_postgres::Client,
    after: Option<&str>,
    objects: Vec<(String, s3::ObjectInfo)>,
    at: Reserve<'_>,
    cancel: &CancellationToken,
) -> Result<Option<Ready>> {
    let keys: Vec<&str> = objects.iter().map(|(k, _)| k.as_str()).collect();
    db::rt(1);
    let stmt = db.prepare_cached(&sh.q.lookup).await?;
    let rows: Vec<Row> = db
        .query(&stmt, &[&keys])
        .await
        .context("finding the rows that reference a page of source keys")?
        .into_iter()
        .map(|r| Row {
            id: r.get(0),
            path: r.get(1),
        })
        .collect();
    let batch = limits::plan_fitting(db, &sh.table.limits, &sh.q, rows, &sh.cfg.rewrite).await?;
    let pairs = plan::distinct_pairs(&batch.moves);
    at.reserve(sh, db, &pairs).await?;
    let swap = |k: &str| match sh.cfg.rewrite.map(k) {
        crate::rewrite::Mapped::To(d) => Some(d),
        _ => None,
    };
    // The listing must cover every destination this batch copies to, whatever else the
    // source page holds (its last key may not map: a stray key no row references). The
    // prefix swap keeps order, so (swap(after), max destination] covers them all; an
    // `after` that does not map lists from the prefix's start (more, never less).
    let dst_from = after.and_then(swap);
    let existing: HashMap<String, s3::ObjectInfo> =
        match batch.moves.iter().map(|m| m.dst_key.as_str()).max() {
            Some(dst_to) => list_until(sh, Side::Dest, dst_from, dst_to)
                .await?
                .into_iter()
                .collect(),
            None => HashMap::new(),
        };
    let src_info: HashMap<&str, &s3::ObjectInfo> =
        objects.iter().map(|(k, i)| (k.as_str(), i)).collect();
    let known: Vec<(String, s3::ObjectInfo, String, Option<s3::ObjectInfo>)> = pairs
        .iter()
        .filter_map(|(src, dst)| {
            let info = src_info.get(src.as_str())?;
            Some((
                src.clone(),
                (*info).clone(),
                dst.clone(),
                existing.get(dst).cloned(),
            ))
        })
        .collect();
    let intents = at.intents(sh, db);
    let free: Vec<(&str, &str)> = known
        .iter()
        .filter(|(_, _, _, listed)| listed.is_none())
        .map(|(_, src, dst, _)| (dst.as_str(), src.etag.as_str()))
        .collect();
    intents.creating_all(&free).await?;
    let Some(results) =
        copy::copy_all_known(&sh.s3, sh.cfg, &known, &intents, sh.concurrency, cancel).await?
    else {
        return Ok(None);
    };
    settle(sh, db, batch.moves, &pairs, results, batch.skipped)
        .await
        .map(Some)
}

/// The keys of one side's bucket under its prefix in (after, to], with their identity, in order.
async fn list_until(
    sh: &Shared<'_>,
    side: Side,
    after: Option<String>,
    to: &str,
) -> Result<Vec<(String, s3::ObjectInfo)>> {
    let loc = match side {
        Side::Source => &sh.cfg.source,
        Side::Dest => &sh.cfg.dest,
    };
    let (bucket, prefix) = (&loc.bucket, &loc.prefix);
    let mut found = Vec::new();
    let mut listing = sh.s3.listing(side, bucket, prefix, after);
    while let Some(page) = listing
        .page(1000)
        .await
        .map_err(anyhow::Error::from)
        .with_context(|| format!("listing s3://{bucket}/{prefix}"))?
    {
        let past = page.last().is_some_and(|(last, _)| last.as_str() >= to);
        found.extend(page.into_iter().filter(|(k, _)| k.as_str() <= to));
        if past {
            break;
        }
    }
    Ok(found)
}

/// After a takeover: the source objects of a phase-1 lease still to do, (after, hi].
async fn relist(
    sh: &Shared<'_>,
    after: Option<&str>,
    hi: Option<&str>,
) -> Result<Vec<(String, s3::ObjectInfo)>> {
    match hi {
        Some(hi) => list_until(sh, Side::Source, after.map(str::to_owned), hi).await,
        None => Ok(Vec::new()),
    }
}

/// Classify a batch's copy results (conflicts the ledger explains become collisions),
/// count the copies, report the rows that cannot move; the rest are ready to commit.
async fn settle(
    sh: &Shared<'_>,
    db: &deadpool_postgres::Client,
    moves: Vec<Move>,
    pairs: &[(String, String)],
    results: Vec<PairResult>,
    mut lines: Vec<ReportLine>,
) -> Result<Ready> {
    let mut by_pair: HashMap<(&str, &str), PairResult> = HashMap::new();
    let mut copies = (0u64, 0u64);
    for ((src, dst), r) in pairs.iter().zip(results) {
        let r = claimed_earlier(sh, db, src, dst, r).await?;
        if let PairResult::Ready {
            created: true,
            size,
            ..
        } = r
        {
            copies.0 += 1;
            copies.1 += size as u64;
        }
        by_pair.insert((src.as_str(), dst.as_str()), r);
    }
    let plan::Split {
        ready,
        lines: more,
        held,
    } = split_ready(&moves, &by_pair, &sh.cfg.source.bucket);
    lines.extend(more);
    let ready = ready.into_iter().map(|(m, c)| (m.clone(), c)).collect();
    sh.progress.inc(0, copies.1);
    let mut report = sh.report();
    report.counters.s3_copies += copies.0;
    report.counters.bytes_copied += copies.1;
    for l in lines {
        report.record(l)?;
    }
    Ok((ready, held))
}

/// Insert this batch's destination claims; returns the destinations already claimed by
/// a different source (in this run).
async fn claim_destinations(
    db: &deadpool_postgres::Client,
    run_id: i64,
    moves: &[Move],
) -> Result<HashMap<String, String>> {
    let dsts: Vec<&str> = moves.iter().map(|m| m.dst_key.as_str()).collect();
    let srcs: Vec<&str> = moves.iter().map(|m| m.src_key.as_str()).collect();
    let stmt = db
        .prepare_cached(
            "WITH c AS (
                 INSERT INTO relocator.claims (run_id, dst_key, src_key)
                 SELECT DISTINCT ON (d) $1, d, s FROM unnest($2::text[], $3::text[]) AS u(d, s)
                 ON CONFLICT DO NOTHING
             )
             SELECT c.dst_key, c.src_key FROM relocator.claims c
               JOIN unnest($2::text[], $3::text[]) AS u(d, s) ON c.dst_key = u.d AND c.src_key <> u.s
              WHERE c.run_id = $1",
        )
        .await?;
    db::rt(1);
    let rows = db
        .query(&stmt, &[&run_id, &dsts, &srcs])
        .await
        .context("claiming destination keys")?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// A destination that exists and differs (`r` a conflict), and which the ledger says
/// another source was moved to, is a collision rather than a foreign object. `run` and
/// `plan` (where the ledger exists) both ask.
pub(crate) async fn claimed_earlier(
    sh: &Shared<'_>,
    db: &tokio_postgres::Client,
    src: &str,
    dst: &str,
    r: PairResult,
) -> Result<PairResult> {
    let PairResult::Conflict(detail) = r else {
        return Ok(r);
    };
    db::rt(1);
    let row = db
        .query_opt(
            "SELECT old_path FROM relocator.moves
              WHERE table_name = $1 AND new_path = $2 AND old_path <> $3 LIMIT 1",
            &[&sh.table.display, &dst, &src],
        )
        .await
        .context("looking up who moved to a conflicting destination")?;
    Ok(match row {
        Some(r) => PairResult::Collision(format!(
            "{:?} maps to the same destination key",
            r.get::<_, String>(0)
        )),
        None => PairResult::Conflict(detail),
    })
}

/// Stage 2: commit each batch (only while owning its lease), report its rows, hand the
/// committed moves to the cleanup stage. Never interrupted mid-commit: it drains what
/// the copy stage sent before stopping, unless it is waiting for the database's health
/// when the run is cancelled (then the batch is left as a kill would leave it).
async fn commit_stage(
    sh: &Shared<'_>,
    run_id: i64,
    me: &str,
    leases: &WorkerLeases,
    mut rx: mpsc::Receiver<ToCommit>,
    out: mpsc::Sender<ToClean>,
    cancel: &CancellationToken,
) -> Result<()> {
    let db = sh.conn().await?;
    while let Some(msg) = rx.recv().await {
        let b = match msg {
            ToCommit::LeaseEnd(lease) => {
                let lost = leases
                    .lost
                    .lock()
                    .map(|l| l.contains(&lease))
                    .unwrap_or(false);
                let end = ToClean::LeaseEnd {
                    lease,
                    done: false,
                    lost,
                };
                if out.send(end).await.is_err() {
                    return Ok(());
                }
                continue;
            }
            ToCommit::Batch(b) => b,
        };
        let ready: Vec<(&Move, &Made)> = b.ready.iter().map(|(m, c)| (m, c)).collect();
        let checked = checksum::check(&db, &sh.q, sh.cfg, &ready).await?;
        let mismatched = &checked.mismatched;
        let mut set_aside = b.held.clone();
        set_aside.extend(mismatched.iter().map(|(k, v)| (k.clone(), v.clone())));
        let batch = CommitBatch {
            run_id,
            lease_id: b.lease,
            owner: me,
            table: &sh.table,
            src_bucket: &sh.cfg.source.bucket,
            dst_bucket: &sh.cfg.dest.bucket,
            moves: b.ready.iter().map(|(m, c)| (m, c)).collect(),
            last_id: &b.last_id,
            ends_lease: b.ends_lease,
            holder: &b.holder,
            set_aside: &set_aside,
            checksums: &checked.read,
        };
        if !sh.healthy(&db, run_id, cancel).await? {
            return Ok(());
        }
        let (committed, refused) = match commit::commit_batch(&db, &sh.q, &batch).await? {
            Committed::Rows(rows, refused) => (rows, refused),
            Committed::LeaseLost => {
                warn!(
                    lease = b.lease,
                    "another worker took this lease over; leaving it to them"
                );
                if let Ok(mut l) = leases.lost.lock() {
                    l.insert(b.lease);
                }
                if b.ends_lease {
                    let end = ToClean::LeaseEnd {
                        lease: b.lease,
                        done: true,
                        lost: true,
                    };
                    if out.send(end).await.is_err() {
                        return Ok(());
                    }
                }
                continue;
            }
        };
        let mut pending = Vec::with_capacity(committed.len());
        {
            let mut report = sh.report();
            for (m, made) in &b.ready {
                let this = (m.row.id.clone(), m.src_key.clone(), m.dst_key.clone());
                if let Some(moved) = committed.get(&this) {
                    pending.push(Pending {
                        move_id: moved.move_id,
                        row_id: m.row.id.clone(),
                        old_path: m.src_key.clone(),
                        new_path: m.dst_key.clone(),
                        src_bucket: sh.cfg.source.bucket.clone(),
                        src_etag: Some(made.src_etag.clone()),
                        src_version: made.src_version.clone(),
                    });
                    // As the ledger has it: a copy an earlier, killed attempt of the run
                    // made is relocator's too.
                    report.record(moved_line(m, moved.copied, false))?;
                } else if let Some(why) = b.held.get(&m.row.id) {
                    report.record(attention(m, Outcome::HeldBack, why.clone()))?;
                } else if let Some(why) = mismatched.get(&m.row.id) {
                    report.record(attention(m, Outcome::ChecksumMismatch, why.clone()))?;
                } else if let Some(why) = refused.get(&m.row.id) {
                    report.record(attention(m, Outcome::Rejected, why.clone()))?;
                } else {
                    // A copy made for it is taken back once the run is finished (the
                    // commit recorded it in relocator.take_backs).
                    report.record(attention(
                        m,
                        Outcome::ChangedByApp,
                        "the row changed before the rewrite committed; left as the application wrote it".into(),
                    ))?;
                }
            }
            report.counters.batches += 1;
            report.flush()?;
        }
        sh.progress.inc(b.rows as u64, 0);
        if out.send(ToClean::Batch(pending)).await.is_err() {
            return Ok(());
        }
        if b.ends_lease {
            let end = ToClean::LeaseEnd {
                lease: b.lease,
                done: true,
                lost: false,
            };
            if out.send(end).await.is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Stage 3: delete the sources of committed moves; let go of a lease once the cleanup
/// of its last batch is done.
async fn cleanup_stage(
    sh: &Shared<'_>,
    run_id: i64,
    me: &str,
    leases: &WorkerLeases,
    mut rx: mpsc::Receiver<ToClean>,
    cancel: &CancellationToken,
) -> Result<()> {
    let db = sh.conn().await?;
    while let Some(c) = rx.recv().await {
        let pending = match c {
            ToClean::Batch(p) => p,
            ToClean::LeaseEnd { lease, done, lost } => {
                if done {
                    // Marked done by its last commit: the lock goes with the next lease
                    // request (no extra round trip).
                    if let Ok(mut r) = leases.released.lock() {
                        r.push(lease);
                    }
                } else {
                    let c = leases.conn.lock().await;
                    if lost {
                        lease::release(&c, lease).await?;
                    } else {
                        lease::finish(&c, lease, me).await?;
                    }
                }
                continue;
            }
        };
        // Left to the next run's cleanup of earlier moves when cancelled meanwhile.
        if !sh.healthy(&db, run_id, cancel).await? {
            return Ok(());
        }
        let mut counters = crate::report::Counters::default();
        let done = cleanup::delete_sources(&db, &sh.s3, &sh.q, &pending, &mut counters).await?;
        let mut report = sh.report();
        report.counters.add(&counters);
        for p in pending
            .iter()
            .filter(|p| done.get(&p.move_id) == Some(&cleanup::Cleaned::Changed))
        {
            report.amend(
                Outcome::Moved,
                ReportLine {
                    id: p.row_id.clone(),
                    old_path: p.old_path.clone(),
                    new_path: p.new_path.clone(),
                    outcome: Outcome::SourceChanged,
                    detail: source_changed_detail(p),
                },
            )?;
        }
        report.flush()?;
    }
    Ok(())
}
