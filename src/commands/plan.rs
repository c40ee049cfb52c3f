//! `relocator plan`: the dry run. It walks the table as `run` does and asks the copy
//! stage the same questions in its looking-only mode, so it predicts what `run` does —
//! without changing anything in PostgreSQL or S3.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use tracing::{instrument, warn};

use crate::config::{config_error, JobConfig};
use crate::db;
use crate::pipeline::plan::{self, attention, moved_line, split_ready, Claims};
use crate::pipeline::{self, commit, copy};
use crate::progress::Progress;
use crate::report::{Outcome, Report, Summary};

/// `relocator plan`: the dry run. Changes nothing in PostgreSQL or S3 (each batch's
/// rewrites are tried in a transaction that is rolled back).
#[instrument(skip_all, fields(table = %cfg.table))]
pub async fn plan(cfg: &JobConfig, out: &Path, cancel: CancellationToken) -> Result<Summary> {
    may_keep_claims(cfg).await?;
    let mut sh = pipeline::open(cfg, 1, Report::new("plan", Some(out))?).await?;
    let db = sh.conn().await?;
    let (total, _) = db::count_selected(&db, &sh.table, crate::s3::Side::Source).await?;
    sh.progress = Progress::new("plan", Some(total));
    // Rows the table would refuse are found by trying the rewrites (rolled back), which
    // needs the UPDATE a run needs anyway.
    let service = cfg.service.as_ref().map(|s| s.column.as_str());
    let may_update: bool = db
        .query_one(
            "SELECT has_column_privilege($1::text::regclass, $2, 'UPDATE')
                AND ($3::text IS NULL OR has_column_privilege($1::text::regclass, $3, 'UPDATE'))",
            &[&sh.table.qualified, &cfg.path_column, &service],
        )
        .await
        .context("checking the UPDATE privilege")?
        .get(0);
    if !may_update {
        warn!(
            "this role may not UPDATE the path column (or the service column): plan cannot \
             try the rewrites, so rows the table would refuse are predicted as moved"
        );
    }
    // The destinations ready pairs claim, kept for the batches after theirs in a
    // temporary table of this session (gone when it ends), not in the process.
    db.batch_execute(
        "CREATE TEMPORARY TABLE relocator_plan_claims (dst text PRIMARY KEY, src text NOT NULL)",
    )
    .await
    .context(
        "creating plan's temporary table of claimed destinations (the role needs the \
         TEMPORARY privilege on the database: GRANT TEMPORARY ON DATABASE ... TO ...)",
    )?;
    // Destinations earlier runs moved other sources to are collisions, as `run` finds.
    let ledger = crate::ledger::exists(&db).await?;
    let mut last_id: Option<String> = None;
    let mut interrupted = false;
    loop {
        if cancel.is_cancelled() {
            interrupted = true;
            break;
        }
        let rows = db::scan(&db, &sh.q, last_id.as_deref(), None, cfg.batch_size).await?;
        let Some(last) = rows.last() else {
            break;
        };
        last_id = Some(last.id.clone());
        sh.progress.inc(rows.len() as u64, 0);
        let batch =
            pipeline::limits::plan_fitting(&db, &sh.table.limits, &sh.q, rows, &cfg.rewrite)
                .await?;
        let pairs = plan::distinct_pairs(&batch.moves);
        let Some(results) = copy::copy_all(
            &sh.s3,
            cfg,
            &pairs,
            &Default::default(),
            copy::Mode::DryRun,
            cfg.concurrency,
            &cancel,
        )
        .await?
        else {
            interrupted = true;
            break;
        };
        let mut claims = earlier_claims(&db, &pairs).await?;
        let mut by_pair = HashMap::new();
        for ((src, dst), r) in pairs.iter().zip(results) {
            let mut r = claims.judge(src, dst, r);
            if ledger {
                r = pipeline::claimed_earlier(&sh, &db, src, dst, r).await?;
            }
            by_pair.insert((src.as_str(), dst.as_str()), r);
        }
        store_claims(&db, claims.into_new()).await?;
        let plan::Split { ready, lines, held } =
            split_ready(&batch.moves, &by_pair, &cfg.source.bucket);
        let refused = if may_update {
            let rows: Vec<commit::Rewrite<'_>> = ready
                .iter()
                .filter(|(m, _)| !held.contains_key(&m.row.id))
                .map(|(m, _)| commit::Rewrite::from(*m))
                .collect();
            commit::refused_rewrites(&db, &sh.q, &rows).await?
        } else {
            HashMap::new()
        };
        let pairs: Vec<(&plan::Move, &copy::Made)> = ready.iter().map(|(m, c)| (*m, c)).collect();
        let mismatched = pipeline::checksum::check(&db, &sh.q, cfg, &pairs)
            .await?
            .mismatched;
        let mut report = sh.report();
        for l in batch.skipped.into_iter().chain(lines) {
            report.record(l)?;
        }
        for (m, made) in ready {
            if let Some(why) = held.get(&m.row.id) {
                report.record(attention(m, Outcome::HeldBack, why.clone()))?;
                continue;
            }
            if let Some(why) = mismatched.get(&m.row.id) {
                report.record(attention(m, Outcome::ChecksumMismatch, why.clone()))?;
                continue;
            }
            match refused.get(&m.row.id) {
                Some(why) => report.record(attention(m, Outcome::Rejected, why.clone()))?,
                None => report.record(moved_line(m, made.created, true))?,
            }
        }
        report.counters.batches += 1;
        report.flush()?;
    }
    sh.progress.finish();
    sh.finish(interrupted)
}

/// Before anything is written: plan keeps the destinations earlier batches claimed in a
/// temporary table, which the role must be allowed to create (exit 2 with the GRANT).
async fn may_keep_claims(cfg: &JobConfig) -> Result<()> {
    let pool = db::pool(&cfg.database_url, 1, None)?;
    let c = db::connect_checked(&pool, &cfg.database_url).await?;
    let row = c
        .query_one(
            "SELECT has_database_privilege(current_database(), 'TEMPORARY'),
                    quote_ident(current_database()), quote_ident(current_user)",
            &[],
        )
        .await
        .context("checking the TEMPORARY privilege")?;
    let (may, database, role): (bool, String, String) = (row.get(0), row.get(1), row.get(2));
    if may {
        return Ok(());
    }
    Err(config_error(format!(
        "plan keeps the destinations earlier batches claimed in a temporary table (so its \
         memory does not grow with the table), and this role may not create one: GRANT \
         TEMPORARY ON DATABASE {database} TO {role}; (PostgreSQL grants it to PUBLIC \
         unless it was revoked)"
    )))
}

/// The claims earlier batches made on this batch's destination keys.
async fn earlier_claims(db: &tokio_postgres::Client, pairs: &[(String, String)]) -> Result<Claims> {
    let dsts: Vec<&str> = pairs.iter().map(|(_, d)| d.as_str()).collect();
    let rows = db
        .query(
            "SELECT dst, src FROM pg_temp.relocator_plan_claims WHERE dst = ANY ($1)",
            &[&dsts],
        )
        .await
        .context("reading the destinations earlier batches claimed")?;
    Ok(Claims::earlier(
        rows.into_iter().map(|r| (r.get(0), r.get(1))),
    ))
}

async fn store_claims(db: &tokio_postgres::Client, new: Vec<(String, String)>) -> Result<()> {
    if new.is_empty() {
        return Ok(());
    }
    let (dsts, srcs): (Vec<String>, Vec<String>) = new.into_iter().unzip();
    db.execute(
        "INSERT INTO pg_temp.relocator_plan_claims (dst, src)
         SELECT * FROM unnest($1::text[], $2::text[])",
        &[&dsts, &srcs],
    )
    .await
    .context("keeping the destinations this batch claimed")?;
    Ok(())
}
