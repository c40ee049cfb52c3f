//! The relocation job: finish what an earlier run left committed-but-not-cleaned, then
//! scan → plan → copy → commit → cleanup, one keyset batch at a time. `plan` runs the same
//! loop with the copy stage only looking and no commit.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aws_sdk_s3::Client;
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument, warn};

use crate::cleanup::{self, Pending};
use crate::commit::{self, CommitBatch};
use crate::config::JobConfig;
use crate::copy::{self, PairResult};
use crate::db::{self, Queries, TableInfo};
use crate::plan::{self, Move};
use crate::report::{Outcome, Report, ReportLine, Summary};
use crate::s3;

/// Options of `run` beyond the job itself.
#[derive(Debug, Default, Clone)]
pub struct RunOptions<'a> {
    pub report: Option<&'a Path>,
}

/// Everything a job holds open while it runs.
struct Ctx<'a> {
    cfg: &'a JobConfig,
    db: deadpool_postgres::Object,
    s3: Client,
    table: TableInfo,
    q: Queries,
}

/// Connect, check the table against the catalog and both buckets: every failure here is
/// a configuration error (exit 2) and nothing has been changed yet.
async fn open(cfg: &JobConfig) -> Result<Ctx<'_>> {
    let pool = db::pool(&cfg.database_url, 2)?;
    let client = db::connect_checked(&pool, &cfg.database_url).await?;
    let table = TableInfo::resolve(&client, cfg).await?;
    if !table.path_indexed {
        warn!(
            table = %table.display,
            "no index leads with the path column: each cleanup batch checks references with a \
             table scan. On a large table create one first (CREATE INDEX CONCURRENTLY ... ON {} ({}))",
            table.qualified, table.path_col
        );
    }
    let s3c = s3::client(&cfg.s3).await;
    s3::check_bucket(&s3c, "--source", &cfg.source.bucket).await?;
    s3::check_bucket(&s3c, "--dest", &cfg.dest.bucket).await?;
    let q = Queries::new(&table);
    Ok(Ctx {
        cfg,
        db: client,
        s3: s3c,
        table,
        q,
    })
}

/// `relocator run`.
#[instrument(skip_all, fields(table = %cfg.table))]
pub async fn run(
    cfg: &JobConfig,
    opts: &RunOptions<'_>,
    cancel: CancellationToken,
) -> Result<Summary> {
    let mut ctx = open(cfg).await?;
    db::ensure_ledger(&mut ctx.db).await?;
    let mut report = Report::new("run", opts.report)?;
    let (run_id, mut last_id) = begin_run(&ctx).await?;
    info!(run_id, resume_after = ?last_id, source = %cfg.source, dest = %cfg.dest, "run started");

    let result = async {
        finish_earlier_cleanups(&mut ctx, &mut report).await?;
        batches(&mut ctx, run_id, &mut last_id, &mut report, false, &cancel).await
    }
    .await;
    let status = match &result {
        Ok(true) => "interrupted",
        Ok(false) => "finished",
        Err(_) => "failed",
    };
    if let Err(e) = end_run(&ctx, run_id, status).await {
        warn!(error = %format!("{e:#}"), "could not record the run's status");
    }
    let interrupted = result?;
    let summary = report.finish(Some(run_id), interrupted)?;
    info!(run_id, status, "{}", summary.one_line());
    Ok(summary)
}

/// `relocator plan`: the dry run. Writes nothing to PostgreSQL or S3.
#[instrument(skip_all, fields(table = %cfg.table))]
pub async fn plan(cfg: &JobConfig, out: &Path, cancel: CancellationToken) -> Result<Summary> {
    let mut ctx = open(cfg).await?;
    let mut report = Report::new("plan", Some(out))?;
    let mut last_id = None;
    let interrupted = batches(&mut ctx, 0, &mut last_id, &mut report, true, &cancel).await?;
    let summary = report.finish(None, interrupted)?;
    info!("{}", summary.one_line());
    Ok(summary)
}

/// Resume the newest unfinished run of the same job, or start a new one.
async fn begin_run(ctx: &Ctx<'_>) -> Result<(i64, Option<String>)> {
    let job = ctx.cfg.fingerprint();
    let row = ctx
        .db
        .query_opt(
            "UPDATE relocator.runs SET status = 'running', updated_at = now()
              WHERE run_id = (SELECT run_id FROM relocator.runs
                               WHERE job = $1 AND status <> 'finished'
                               ORDER BY run_id DESC LIMIT 1)
          RETURNING run_id, last_id",
            &[&job],
        )
        .await
        .context("looking for an unfinished run to resume")?;
    if let Some(r) = row {
        return Ok((r.get(0), r.get(1)));
    }
    let r = ctx
        .db
        .query_one(
            "INSERT INTO relocator.runs (job, table_name, source, dest)
             VALUES ($1, $2, $3, $4) RETURNING run_id",
            &[
                &job,
                &ctx.table.display,
                &ctx.cfg.source.to_string(),
                &ctx.cfg.dest.to_string(),
            ],
        )
        .await
        .context("registering the run in the ledger")?;
    Ok((r.get(0), None))
}

async fn end_run(ctx: &Ctx<'_>, run_id: i64, status: &str) -> Result<()> {
    ctx.db
        .execute(
            "UPDATE relocator.runs SET status = $2, updated_at = now(),
                    finished_at = CASE WHEN $2 = 'finished' THEN now() END
              WHERE run_id = $1",
            &[&run_id, &status],
        )
        .await?;
    Ok(())
}

/// Before scanning: sources whose rows an earlier run committed but did not clean up.
async fn finish_earlier_cleanups(ctx: &mut Ctx<'_>, report: &mut Report) -> Result<()> {
    let mut after = 0;
    loop {
        let pending = cleanup::pending_after(&ctx.db, &ctx.table.display, after, 1000).await?;
        let Some(last) = pending.last() else {
            return Ok(());
        };
        after = last.move_id;
        info!(
            count = pending.len(),
            "finishing the cleanup of an earlier run"
        );
        cleanup::delete_sources(&ctx.db, &ctx.s3, &ctx.q, &pending, &mut report.counters).await?;
        for p in pending {
            report.record(ReportLine {
                id: p.row_id,
                old_path: p.old_path,
                new_path: p.new_path,
                outcome: Outcome::AlreadyMoved,
                detail: "rewritten by an earlier run; its source cleanup was finished now".into(),
            })?;
        }
        report.flush()?;
    }
}

/// The batch loop. Returns whether it was interrupted. `dry_run`: look, don't touch.
async fn batches(
    ctx: &mut Ctx<'_>,
    run_id: i64,
    last_id: &mut Option<String>,
    report: &mut Report,
    dry_run: bool,
    cancel: &CancellationToken,
) -> Result<bool> {
    // plan only: destinations earlier batches would have filled, to predict collisions
    // across batches the way run detects them (destination exists and differs).
    let mut planned_claims: HashMap<String, String> = HashMap::new();
    let mut progress = Progress::new();
    loop {
        if cancel.is_cancelled() {
            return Ok(true);
        }
        let rows = db::scan(
            &ctx.db,
            &ctx.q,
            &ctx.cfg.source.prefix,
            last_id.as_deref(),
            ctx.cfg.batch_size,
        )
        .await?;
        let Some(last) = rows.last() else {
            return Ok(false);
        };
        let batch_last = last.id.clone();
        let n_rows = rows.len();
        let batch = plan::plan_batch(rows, &ctx.cfg.rewrite);
        for line in batch.skipped {
            report.record(line)?;
        }
        let pairs = plan::distinct_pairs(&batch.moves);
        let Some(results) = copy::copy_all(&ctx.s3, ctx.cfg, &pairs, dry_run, cancel).await? else {
            info!("interrupted during the copy stage; nothing of this batch was committed");
            return Ok(true);
        };
        let mut by_pair: HashMap<(&str, &str), PairResult> = HashMap::new();
        for ((src, dst), r) in pairs.iter().zip(results) {
            let claimant = match &r {
                // plan: would an earlier batch have filled this destination from another source?
                PairResult::Ready { .. } | PairResult::Conflict(_) if dry_run => {
                    planned_claims.get(dst).filter(|o| *o != src).cloned()
                }
                // run: a differing destination that the ledger says another source moved to.
                PairResult::Conflict(_) => earlier_claimant(ctx, dst, src).await?,
                _ => None,
            };
            let r = match claimant {
                Some(other) => {
                    PairResult::Collision(format!("{other:?} maps to the same destination key"))
                }
                None => r,
            };
            if let PairResult::Ready { created, size } = r {
                if dry_run {
                    planned_claims.insert(dst.clone(), src.clone());
                } else if created {
                    report.counters.s3_copies += 1;
                    report.counters.bytes_copied += size as u64;
                }
            }
            by_pair.insert((src.as_str(), dst.as_str()), r);
        }

        let mut ready: Vec<(&Move, bool)> = Vec::new();
        for m in &batch.moves {
            let (outcome, detail) = match &by_pair[&(m.row.path.as_str(), m.dst_key.as_str())] {
                PairResult::Ready { created, .. } => {
                    ready.push((m, *created));
                    continue;
                }
                PairResult::MissingSource => (
                    Outcome::MissingSource,
                    format!("no object s3://{}/{}", ctx.cfg.source.bucket, m.row.path),
                ),
                PairResult::Conflict(d) => (Outcome::Conflict, d.clone()),
                PairResult::Collision(d) => (Outcome::Collision, d.clone()),
                PairResult::Rejected(d) => (Outcome::Error, d.clone()),
            };
            report.record(ReportLine {
                id: m.row.id.clone(),
                old_path: m.row.path.clone(),
                new_path: m.dst_key.clone(),
                outcome,
                detail,
            })?;
        }

        if dry_run {
            for (m, created) in &ready {
                report.record(moved_line(m, *created, true))?;
            }
        } else {
            commit_and_clean(ctx, run_id, &ready, &batch_last, report).await?;
        }
        *last_id = Some(batch_last);
        report.counters.batches += 1;
        report.flush()?;
        progress.tick(report, n_rows);
    }
}

/// Run only: a destination that exists and differs, and which the ledger says another
/// source was moved to, is a collision rather than a foreign object.
async fn earlier_claimant(ctx: &Ctx<'_>, dst: &str, src: &str) -> Result<Option<String>> {
    let row = ctx
        .db
        .query_opt(
            "SELECT old_path FROM relocator.moves
              WHERE table_name = $1 AND new_path = $2 AND old_path <> $3 LIMIT 1",
            &[&ctx.table.display, &dst, &src],
        )
        .await
        .context("looking up who moved to a conflicting destination")?;
    Ok(row.map(|r| r.get(0)))
}

fn moved_line(m: &Move, created: bool, dry_run: bool) -> ReportLine {
    let detail = match (created, dry_run) {
        (true, false) => "copied",
        (false, false) => "an identical object was already at the destination",
        (true, true) => "would copy",
        (false, true) => "an identical object is already at the destination",
    };
    ReportLine {
        id: m.row.id.clone(),
        old_path: m.row.path.clone(),
        new_path: m.dst_key.clone(),
        outcome: Outcome::Moved,
        detail: detail.into(),
    }
}

/// Commit the ready rows (and the keyset position), then clean up. The commit is never
/// interrupted: cancellation is only looked at between batches.
async fn commit_and_clean(
    ctx: &mut Ctx<'_>,
    run_id: i64,
    ready: &[(&Move, bool)],
    batch_last: &str,
    report: &mut Report,
) -> Result<()> {
    let batch = CommitBatch {
        run_id,
        table: &ctx.table,
        src_bucket: &ctx.cfg.source.bucket,
        dst_bucket: &ctx.cfg.dest.bucket,
        moves: ready.to_vec(),
        last_id: Some(batch_last),
    };
    let committed = commit::commit_batch(&mut ctx.db, &ctx.q, &batch).await?;

    let mut pending = Vec::with_capacity(committed.len());
    let mut used_dsts: HashSet<&str> = HashSet::new();
    for (m, _) in ready {
        if let Some(move_id) = committed.get(&m.row.id) {
            used_dsts.insert(&m.dst_key);
            pending.push(Pending {
                move_id: *move_id,
                row_id: m.row.id.clone(),
                old_path: m.row.path.clone(),
                new_path: m.dst_key.clone(),
                src_bucket: ctx.cfg.source.bucket.clone(),
            });
        }
    }
    let mut take_back: Vec<&str> = Vec::new();
    for (m, created) in ready {
        if committed.contains_key(&m.row.id) {
            report.record(moved_line(m, *created, false))?;
        } else {
            report.record(ReportLine {
                id: m.row.id.clone(),
                old_path: m.row.path.clone(),
                new_path: m.dst_key.clone(),
                outcome: Outcome::ChangedByApp,
                detail:
                    "the row changed before the rewrite committed; left as the application wrote it"
                        .into(),
            })?;
            if *created
                && !used_dsts.contains(m.dst_key.as_str())
                && !take_back.contains(&m.dst_key.as_str())
            {
                take_back.push(&m.dst_key);
            }
        }
    }
    cleanup::delete_sources(&ctx.db, &ctx.s3, &ctx.q, &pending, &mut report.counters).await?;
    cleanup::take_back_copies(
        &ctx.db,
        &ctx.s3,
        &ctx.q,
        &ctx.cfg.dest.bucket,
        &take_back,
        &mut report.counters,
    )
    .await?;
    Ok(())
}

/// A log line every few seconds (the progress bar comes with the runbook commands).
struct Progress {
    last: Instant,
}

impl Progress {
    fn new() -> Self {
        Progress {
            last: Instant::now(),
        }
    }

    fn tick(&mut self, report: &Report, _batch_rows: usize) {
        if self.last.elapsed() >= Duration::from_secs(5) {
            self.last = Instant::now();
            let secs = report.elapsed().as_secs_f64().max(0.001);
            info!(
                rows = report.rows_seen(),
                rate = format!("{:.0}/s", report.rows_seen() as f64 / secs),
                copies = report.counters.s3_copies,
                deleted = report.counters.sources_deleted,
                "progress"
            );
        }
    }
}
