//! `relocator rollback`: undo a job's moves from the ledger, as carefully as `run` made
//! them. Per batch of ledger entries:
//!
//! 1. **restore** — make the object exist at the old key: it is there already (the
//!    source was not deleted yet, or an earlier rollback copied it back), or it is copied
//!    back from the new key through the same copy stage as `run` (never overwriting a
//!    different object: that row is reported as a `conflict` and left alone);
//! 2. **commit** — one statement rewrites each row back, guarded by the new value
//!    (compare-and-swap: a row the application changed since is left as it is), and marks
//!    the ledger entries in the same transaction;
//! 3. **clean up** — the new objects relocator created are deleted through
//!    [`cleanup::delete_unreferenced`], after that commit and only when no row
//!    references them.
//!
//! A killed rollback is rerun like a killed run: it first finishes the cleanups the
//! ledger says are pending, then goes on with the entries not rolled back yet. While it
//! works it holds the table's lock exclusively, so no `run` of the table runs meanwhile.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument};

use crate::config::{config_error, JobConfig};
use crate::db;
use crate::ledger;
use crate::pipeline::cleanup::{self, Unreferenced, MARK_ROLLBACK_CLEANED};
use crate::pipeline::commit::{self, Rewrite};
use crate::pipeline::copy::{self, PairResult};
use crate::pipeline::lease::{self, TableLock};
use crate::pipeline::{self, Shared};
use crate::progress::Progress;
use crate::report::{Counters, Outcome, Report, ReportLine, Summary};
use crate::s3::{Side, S3};

/// Options of `rollback` beyond the job itself.
#[derive(Debug, Clone, Default)]
pub struct RollbackOptions<'a> {
    /// Only this run's moves (it must belong to the job); default: every run of the job.
    pub run: Option<i64>,
    pub report: Option<&'a Path>,
}

/// A ledger entry to undo, with the row's current path (None: the row is gone).
#[derive(Debug, Clone)]
struct Entry {
    move_id: i64,
    row_id: String,
    /// The objects' keys, before and after the move.
    old_path: String,
    new_path: String,
    /// What the row holds now, if it is on the destination side.
    current: Option<String>,
    /// What the row held before and after the move.
    old_value: String,
    new_value: String,
}

/// The identity of a move's new object, for [`cleanup::finish_listed`]: its ETag as the
/// ledger recorded it; in older ledgers the source's, which a single-part copy keeps (None
/// for a multipart one: the key and the reference check alone decide then).
const NEW_ETAG_SQL: &str =
    "coalesce(dst_etag, CASE WHEN src_etag NOT LIKE '%-%' THEN src_etag END)";

/// `relocator rollback`.
#[instrument(skip_all, fields(table = %cfg.table))]
pub async fn rollback(
    cfg: &JobConfig,
    opts: &RollbackOptions<'_>,
    cancel: CancellationToken,
) -> Result<Summary> {
    let mut sh = pipeline::open(cfg, 2, Report::new("rollback", opts.report)?).await?;
    let mut main = sh.conn().await?;
    ledger::ensure(&mut main).await?;
    let runs = select_runs(&main, cfg, opts.run).await?;
    if runs.is_empty() {
        info!("the ledger has no run of this job: nothing to roll back");
        return sh.finish(false);
    }
    lease::lock_table(&main, &sh.table, TableLock::Rollback).await?;
    main.execute(
        "UPDATE relocator.runs SET status = 'rolling_back', updated_at = now()
          WHERE run_id = ANY ($1)",
        &[&runs],
    )
    .await
    .context("marking the runs as being rolled back")?;
    info!(?runs, "rollback started");
    // No batch of these runs is in flight (the table lock): their reservations are void,
    // and copies a killed batch noted become take-backs, removed below.
    cleanup::void_reservations(&main, &runs).await?;

    remove_new_objects(&sh, &main, &runs).await?;
    let total: i64 = main
        .query_one(
            "SELECT count(*) FROM relocator.moves
              WHERE run_id = ANY ($1) AND rolled_back_at IS NULL",
            &[&runs],
        )
        .await?
        .get(0);
    sh.progress = Progress::new("rollback", Some(total as u64));
    let fetch = main
        .prepare_cached(&sh.q.to_undo[0])
        .await
        .context("preparing the rollback's ledger scan")?;
    let fetch_rows = main
        .prepare_cached(&sh.q.to_undo[1])
        .await
        .context("preparing the rollback's ledger scan")?;
    // Moves read ahead with their row's earlier ones, not to be read again.
    let mut taken: std::collections::HashSet<i64> = std::collections::HashSet::new();
    // Copies go back: the destination is read, the source written.
    let reversed = (cfg.reversed(), sh.s3.reversed());
    let mut after = 0i64;
    let mut interrupted = false;
    loop {
        if cancel.is_cancelled() {
            interrupted = true;
            break;
        }
        let entry = |r: tokio_postgres::Row| Entry {
            move_id: r.get(0),
            row_id: r.get(1),
            old_path: r.get(2),
            new_path: r.get(3),
            current: r.get(4),
            old_value: r.get(5),
            new_value: r.get(6),
        };
        let page: Vec<Entry> = main
            .query(&fetch, &[&runs, &after, &(cfg.batch_size as i64)])
            .await
            .context("reading the next ledger entries to roll back")?
            .into_iter()
            .map(entry)
            .collect();
        let Some(last) = page.last().map(|e| e.move_id) else {
            break;
        };
        let mut entries: Vec<Entry> = page
            .into_iter()
            .filter(|e| !taken.contains(&e.move_id))
            .collect();
        if entries.is_empty() {
            after = last;
            continue;
        }
        // A row holding several references goes back whole, in one batch: its moves
        // past this page come with it.
        let rows: Vec<&str> = entries.iter().map(|e| e.row_id.as_str()).collect();
        let more: Vec<Entry> = main
            .query(&fetch_rows, &[&runs, &last, &rows])
            .await
            .context("reading the rest of the rows' ledger entries")?
            .into_iter()
            .map(entry)
            .collect();
        taken.retain(|id| *id > last);
        taken.extend(more.iter().map(|e| e.move_id));
        entries.extend(more);
        after = last;
        let n = entries.len() as u64;
        if !undo_batch(&sh, &main, &reversed, entries, &cancel).await? {
            interrupted = true;
            break;
        }
        sh.progress.inc(n, 0);
    }
    sh.progress.finish();

    if !interrupted {
        remove_new_objects(&sh, &main, &runs).await?;
        // Copies these runs made that no committed move kept (rows the application
        // changed, batches killed before their commit).
        let counters =
            cleanup::take_back(&main, &sh.s3, &sh.q, "SELECT unnest($1::bigint[])", &runs).await?;
        sh.report().counters.add(&counters);
        main.execute(
            "UPDATE relocator.runs r SET status = 'rolled_back', updated_at = now()
              WHERE r.run_id = ANY ($1)
                AND NOT EXISTS (SELECT 1 FROM relocator.moves m
                                 WHERE m.run_id = r.run_id AND m.rolled_back_at IS NULL)",
            &[&runs],
        )
        .await
        .context("marking the runs as rolled back")?;
    }
    lease::unlock_table(&main, &sh.table, TableLock::Rollback).await?;
    drop(main);
    sh.finish(interrupted)
}

/// The runs to undo: `--run N` (which must be this job's), or every run of the job.
async fn select_runs(
    db: &tokio_postgres::Client,
    cfg: &JobConfig,
    only: Option<i64>,
) -> Result<Vec<i64>> {
    let job = cfg.fingerprint();
    let Some(run_id) = only else {
        return Ok(db
            .query(
                "SELECT run_id FROM relocator.runs WHERE job = $1 ORDER BY run_id",
                &[&job],
            )
            .await
            .context("reading the job's runs")?
            .into_iter()
            .map(|r| r.get(0))
            .collect());
    };
    let row = db
        .query_opt(
            "SELECT job, source, dest FROM relocator.runs WHERE run_id = $1",
            &[&run_id],
        )
        .await
        .context("looking up the run")?;
    match row {
        None => Err(config_error(format!(
            "--run {run_id}: the ledger has no such run; `relocator status` lists this job's runs"
        ))),
        Some(r) if r.get::<_, String>(0) != job => Err(config_error(format!(
            "--run {run_id} moved {} to {} with other options than given here; give the \
             same --table, columns, --source, --dest and --rewrite as that run",
            r.get::<_, String>(1),
            r.get::<_, String>(2)
        ))),
        Some(_) => Ok(vec![run_id]),
    }
}

/// Undo one batch of entries. `false` when cancelled before its commit (nothing of the
/// batch was committed then; copies already made back are found again by the rerun).
async fn undo_batch(
    sh: &Shared<'_>,
    db: &deadpool_postgres::Client,
    reversed: &(JobConfig, S3),
    entries: Vec<Entry>,
    cancel: &CancellationToken,
) -> Result<bool> {
    // Only rows still pointing at the new key are candidates; the others were changed by
    // the application and are left as they are.
    let mut pairs: Vec<(String, String)> = entries
        .iter()
        .filter(|e| e.current.as_deref() == Some(e.new_value.as_str()))
        .map(|e| (e.new_path.clone(), e.old_path.clone()))
        .collect();
    pairs.sort();
    pairs.dedup();
    let restores = pairs
        .iter()
        .map(|(new, old)| restore_pair(sh, reversed, new, old));
    let Some(results) = copy::bounded(restores, sh.concurrency, cancel).await? else {
        return Ok(false);
    };
    let by_pair: HashMap<(&str, &str), PairResult> = pairs
        .iter()
        .map(|(n, o)| (n.as_str(), o.as_str()))
        .zip(results)
        .collect();

    let mut lines = Vec::new();
    let mut commit: Vec<(&Entry, bool)> = Vec::new();
    // Old keys a copy back was made to in this batch, with the copy's ETag.
    let mut copied_back: HashMap<&str, &str> = HashMap::new();
    let mut copies = 0u64;
    let mut failed_rows: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for e in &entries {
        if e.current.as_deref() != Some(e.new_value.as_str()) {
            commit.push((e, false));
            continue;
        }
        let (outcome, detail) = match &by_pair[&(e.new_path.as_str(), e.old_path.as_str())] {
            PairResult::Ready {
                created, dst_etag, ..
            } => {
                if *created && copied_back.insert(&e.old_path, dst_etag).is_none() {
                    copies += 1;
                }
                commit.push((e, true));
                continue;
            }
            PairResult::MissingSource => (
                Outcome::MissingSource,
                format!(
                    "neither s3://{}/{} nor s3://{}/{} exists; row left pointing at the new key",
                    sh.cfg.source.bucket, e.old_path, sh.cfg.dest.bucket, e.new_path
                ),
            ),
            PairResult::Conflict(d) => (
                Outcome::Conflict,
                format!("at the old key: {d}; row left pointing at the new key"),
            ),
            PairResult::Collision(d) => (Outcome::Collision, d.clone()),
            PairResult::Rejected(d) => (Outcome::Error, d.clone()),
        };
        failed_rows.insert(e.row_id.as_str());
        lines.push(line(e, outcome, detail));
    }
    // A row holding several references goes back whole or not at all: the others of a
    // row one of whose objects cannot go back stay as they are (the ledger keeps them,
    // for a rerun), and a copy made back for them is taken back.
    let mut take_back: Vec<(&str, Option<&str>)> = Vec::new();
    let mut held = Vec::new();
    commit.retain(|(e, tried)| {
        let hold = *tried && failed_rows.contains(e.row_id.as_str());
        if hold {
            held.push(*e);
        }
        !hold
    });
    for e in held {
        if let Some(etag) = copied_back.get(e.old_path.as_str()) {
            take_back.push((&e.old_path, Some(etag)));
        }
        lines.push(line(
            e,
            Outcome::HeldBack,
            "another reference of the row cannot go back; the row is left pointing at the \
             new keys"
                .into(),
        ));
    }

    let (restored, refused) = commit_undo(sh, db, &commit).await?;
    for (e, tried) in &commit {
        match restored.get(&e.move_id) {
            Some(true) => {
                // The new object goes once every row is restored (see `remove_new_objects`).
                lines.push(line(e, Outcome::RolledBack, "restored".into()));
            }
            _ => {
                if let Some(etag) = copied_back.get(e.old_path.as_str()).filter(|_| *tried) {
                    take_back.push((&e.old_path, Some(etag)));
                }
                lines.push(match refused.get(&e.row_id) {
                    // Left in the ledger as not rolled back: a rerun tries it again.
                    Some(why) => line(e, Outcome::Rejected, why.clone()),
                    None => line(
                        e,
                        Outcome::ChangedByApp,
                        "the row no longer holds the value this move wrote: it changed since \
                         (the application wrote it, or a later run moved what it wrote); \
                         left as it is"
                            .into(),
                    ),
                });
            }
        }
    }
    let mut counters = Counters {
        s3_copies: copies,
        batches: 1,
        ..Counters::default()
    };
    take_back.sort_unstable();
    take_back.dedup();
    let unused: Vec<Unreferenced<'_>> = take_back
        .iter()
        .map(|(key, etag)| Unreferenced {
            move_id: 0,
            bucket: &sh.cfg.source.bucket,
            key,
            etag: *etag,
            version: None,
        })
        .collect();
    let mut taken = Counters::default();
    cleanup::delete_unreferenced(db, &sh.s3, Side::Source, &sh.q, &unused, None, &mut taken)
        .await?;
    counters.add(&taken.as_taken_back());
    let mut report = sh.report();
    report.counters.add(&counters);
    for l in lines {
        report.record(l)?;
    }
    report.flush()?;
    Ok(true)
}

/// Make the object exist at `old` (source bucket) with the bytes at `new` (destination
/// bucket). `Ready { created }` when it does; `Conflict` when a different object is at
/// `old`; `MissingSource` when neither exists.
async fn restore_pair(
    sh: &Shared<'_>,
    reversed: &(JobConfig, S3),
    new: &str,
    old: &str,
) -> Result<PairResult> {
    let at_new = match sh.s3.dst.head(&sh.cfg.dest.bucket, new).await {
        Ok(n) => n,
        Err(e) => return copy::per_object(e),
    };
    let Some(n) = at_new else {
        // The row points at a missing object either way; the old key at least may exist.
        return match sh.s3.src.head(&sh.cfg.source.bucket, old).await {
            Ok(Some(o)) => Ok(PairResult::Ready {
                created: false,
                size: o.size,
                src_etag: o.etag.clone(),
                src_version: None,
                dst_etag: o.etag,
            }),
            Ok(None) => Ok(PairResult::MissingSource),
            Err(e) => copy::per_object(e),
        };
    };
    // Copies back are taken back by the rollback itself (see undo_batch).
    copy::copy_looking(
        &reversed.1,
        &reversed.0,
        new,
        &n,
        old,
        copy::Mode::Copy(None),
    )
    .await
}

/// One statement: rewrite the candidate rows back (compare-and-swap on the new path) and
/// mark every entry of the batch rolled back — `restored`, or `changed_by_app` when the
/// row did not hold the new path. Returns move id → restored.
async fn commit_undo(
    sh: &Shared<'_>,
    db: &deadpool_postgres::Client,
    commit: &[(&Entry, bool)],
) -> Result<(HashMap<i64, bool>, HashMap<String, String>)> {
    if commit.is_empty() {
        return Ok(Default::default());
    }
    let move_ids: Vec<i64> = commit.iter().map(|(e, _)| e.move_id).collect();
    let ids: Vec<&str> = commit.iter().map(|(e, _)| e.row_id.as_str()).collect();
    let olds: Vec<&str> = commit.iter().map(|(e, _)| e.old_path.as_str()).collect();
    let news: Vec<&str> = commit.iter().map(|(e, _)| e.new_path.as_str()).collect();
    let old_values: Vec<&str> = commit.iter().map(|(e, _)| e.old_value.as_str()).collect();
    let new_values: Vec<&str> = commit.iter().map(|(e, _)| e.new_value.as_str()).collect();
    let tried: Vec<bool> = commit.iter().map(|(_, t)| *t).collect();
    let rows: Vec<Rewrite<'_>> = commit
        .iter()
        .map(|(e, _)| Rewrite {
            id: &e.row_id,
            from: &e.new_value,
            to: &e.old_value,
            checksum: None,
        })
        .collect();
    let stmt = db
        .prepare_cached(&sh.q.undo)
        .await
        .context("preparing the rewrite back")?;
    let (restored, refused) =
        commit::without_refused(db, &sh.q.probe_back, &rows, HashMap::new(), |tries| {
            let refused: Vec<bool> = tries.iter().map(|t| !t).collect();
            let (stmt, move_ids, ids, olds, news, tried, old_values, new_values) = (
                &stmt,
                &move_ids,
                &ids,
                &olds,
                &news,
                &tried,
                &old_values,
                &new_values,
            );
            let (table, dst_bucket) = (&sh.table.display, &sh.cfg.dest.bucket);
            async move {
                db::rt(1);
                db.query(
                    stmt,
                    &[
                        move_ids, ids, olds, news, tried, &refused, table, dst_bucket, old_values,
                        new_values,
                    ],
                )
                .await
            }
        })
        .await
        .context("rewriting the batch's rows back")?;
    Ok((
        restored.into_iter().map(|r| (r.get(0), r.get(1))).collect(),
        refused,
    ))
}

/// The new objects of the rows restored (by this rollback or an earlier, killed one),
/// where nothing references them and they are still the objects the moves left: at the
/// start (a killed rollback's), and once every row is restored — not batch by batch, so a
/// new object two rows share goes with the last of them, whichever batch moved it.
async fn remove_new_objects(
    sh: &Shared<'_>,
    db: &deadpool_postgres::Client,
    runs: &[i64],
) -> Result<()> {
    let mut counters = Counters::default();
    cleanup::finish_listed(
        db,
        &sh.s3,
        Side::Dest,
        &sh.q,
        &format!(
            "SELECT move_id, dst_bucket, new_path, {NEW_ETAG_SQL} FROM relocator.moves
              WHERE run_id = ANY ($1) AND rollback = 'restored'
                AND rollback_cleaned_at IS NULL AND move_id > $2
              ORDER BY move_id LIMIT 1000"
        ),
        &runs,
        MARK_ROLLBACK_CLEANED,
        &mut counters,
    )
    .await?;
    sh.report().counters.add(&counters);
    Ok(())
}

fn line(e: &Entry, outcome: Outcome, detail: String) -> ReportLine {
    ReportLine {
        id: e.row_id.clone(),
        old_path: e.new_value.clone(),
        new_path: e.old_value.clone(),
        outcome,
        detail,
    }
}
