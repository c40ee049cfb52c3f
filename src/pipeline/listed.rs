//! The source listing, loaded into the ledger, for a run that sweeps the table by id
//! (phase 2: no index leads with the path column, or `--rewrite`). Without it, phase 2
//! learns each source with a HEAD; with it, a batch looks its sources up in PostgreSQL,
//! one statement per batch, and a HEAD is sent only for a key the listing did not have.
//!
//! The listing is taken once per run, before its first lease (one process lists; the
//! others of the run wait for it), into `relocator.listed` — UNLOGGED, so it costs no
//! WAL and no replica's time, and is gone after a crash of the cluster, which is noticed
//! and answered by listing again. It is dropped when the run finishes.
//!
//! A listing is older than the objects: a key written after it is not in it (a HEAD,
//! as before), and a listed object may have been changed or deleted since. Neither can
//! misplace anything: a copy names the listed ETag (`x-amz-copy-source-if-match`), which
//! the server is known to check ([`applies`]), and whatever is refused, missing, or
//! already at the destination is looked at again with a HEAD ([`crate::pipeline::copy`]).

use std::collections::HashMap;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::s3::{ObjectInfo, Side};

use super::Shared;

/// Serialises the listing of one run among its processes.
const LISTING_LOCK_CLASS: i32 = 0x7265_6c73;

/// Keys listed per statement.
const PAGE: i32 = 1000;

/// Beyond this many listed keys per row under the source prefix (and at least
/// [`MIN_LIMIT`]), the listing costs more than the HEADs it saves: it is given up.
const KEYS_PER_ROW: i64 = 20;
const MIN_LIMIT: i64 = 100_000;

/// Whether the run's batches may learn their sources from a listing taken at its start:
/// only where the run sweeps the table by id (phase 2 from the start), and only where a
/// copy from an old look is refused once the source changed — the server refuses a
/// wrong `x-amz-copy-source-if-match` (probed at the run's start) and the source bucket
/// keeps no versions (a copy names a listed version, which stays there, current or not,
/// so no copy would be refused). Elsewhere a HEAD per source, right before its copy.
pub(crate) fn applies(sh: &Shared<'_>) -> bool {
    !sh.phase1() && sh.s3.server_side && sh.s3.copy_checks_source && !sh.s3.versions
}

/// Make sure the run's source listing is in the ledger. Returns whether phase 2 may look
/// sources up there: false when the prefix holds far more objects than the table has
/// rows (a HEAD per row is cheaper), or when cancelled.
pub(crate) async fn prepare(
    sh: &Shared<'_>,
    db: &tokio_postgres::Client,
    run_id: i64,
    rows: i64,
    cancel: &CancellationToken,
) -> Result<bool> {
    let key = run_id as i32;
    // Another process of the run may be listing (for hours, at scale): wait for it
    // without a statement that could outlast the statement timeout.
    loop {
        let got: bool = db
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2)",
                &[&LISTING_LOCK_CLASS, &key],
            )
            .await
            .context("waiting for the run's source listing")?
            .get(0);
        if got {
            break;
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(false),
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
    let loaded = load_once(sh, db, run_id, rows, cancel).await;
    db.execute(
        "SELECT pg_advisory_unlock($1, $2)",
        &[&LISTING_LOCK_CLASS, &key],
    )
    .await
    .context("letting go of the run's source listing")?;
    loaded
}

async fn load_once(
    sh: &Shared<'_>,
    db: &tokio_postgres::Client,
    run_id: i64,
    rows: i64,
    cancel: &CancellationToken,
) -> Result<bool> {
    // listed_keys NULL: never listed (or the listing was interrupted); -1: given up;
    // else the count. A count with no rows behind it: the cluster crashed and emptied
    // the unlogged table, or a standby was promoted; list again.
    let state = db
        .query_one(
            "SELECT listed_keys, EXISTS (SELECT 1 FROM relocator.listed WHERE run_id = $1)
               FROM relocator.runs WHERE run_id = $1",
            &[&run_id],
        )
        .await
        .context("reading the run's source listing")?;
    let (count, present): (Option<i64>, bool) = (state.get(0), state.get(1));
    match count {
        Some(-1) => return Ok(false),
        Some(n) if n == 0 || present => return Ok(true),
        _ => {}
    }
    forget(db, run_id).await?;
    let limit = (rows * KEYS_PER_ROW).max(MIN_LIMIT);
    let (bucket, prefix) = (&sh.cfg.source.bucket, &sh.cfg.source.prefix);
    info!(
        bucket = %bucket, prefix = %prefix,
        "no index leads with the path column: listing the source into the ledger once, \
         instead of a HEAD per row"
    );
    let started = std::time::Instant::now();
    let insert = db
        .prepare(
            "INSERT INTO relocator.listed (run_id, key, etag, size, version)
             SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bigint[], $5::text[])
             ON CONFLICT DO NOTHING",
        )
        .await?;
    let mut listing = sh.s3.listing(Side::Source, bucket, prefix, None);
    let mut listed: i64 = 0;
    loop {
        let page = tokio::select! {
            _ = cancel.cancelled() => return Ok(false),
            p = listing.page(PAGE) => p
                .map_err(anyhow::Error::from)
                .with_context(|| format!("listing s3://{bucket}/{prefix}"))?,
        };
        let Some(page) = page else { break };
        // A key PostgreSQL cannot hold as text (a NUL) is referenced by no row either.
        let page: Vec<(String, ObjectInfo)> = page
            .into_iter()
            .filter(|(k, _)| !k.contains('\0'))
            .collect();
        listed += page.len() as i64;
        if listed > limit {
            info!(
                listed,
                rows,
                "the source prefix holds far more objects than the table has rows: a HEAD \
                 per row instead of the listing"
            );
            forget(db, run_id).await?;
            record(db, run_id, -1).await?;
            return Ok(false);
        }
        let keys: Vec<&str> = page.iter().map(|(k, _)| k.as_str()).collect();
        let etags: Vec<&str> = page.iter().map(|(_, i)| i.etag.as_str()).collect();
        let sizes: Vec<i64> = page.iter().map(|(_, i)| i.size).collect();
        let versions: Vec<Option<&str>> = page.iter().map(|(_, i)| i.version.as_deref()).collect();
        crate::db::rt(1);
        db.execute(&insert, &[&run_id, &keys, &etags, &sizes, &versions])
            .await
            .context("loading the source listing into the ledger")?;
    }
    record(db, run_id, listed).await?;
    info!(
        keys = listed,
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "source listing loaded"
    );
    Ok(true)
}

async fn record(db: &tokio_postgres::Client, run_id: i64, n: i64) -> Result<()> {
    crate::db::rt(1);
    db.execute(
        "UPDATE relocator.runs SET listed_keys = $2 WHERE run_id = $1",
        &[&run_id, &n],
    )
    .await
    .context("recording the run's source listing")?;
    Ok(())
}

/// Drop the run's listing (the run finished, or it is taken again).
pub(crate) async fn forget(db: &tokio_postgres::Client, run_id: i64) -> Result<()> {
    crate::db::rt(1);
    db.execute("DELETE FROM relocator.listed WHERE run_id = $1", &[&run_id])
        .await
        .context("dropping the run's source listing")?;
    Ok(())
}

/// What the run's listing says of these source keys (a key it does not have is absent).
pub(crate) async fn lookup(
    db: &deadpool_postgres::Client,
    run_id: i64,
    keys: &[&str],
) -> Result<HashMap<String, ObjectInfo>> {
    crate::db::rt(1);
    let stmt = db
        .prepare_cached(
            "SELECT key, etag, size, version FROM relocator.listed
              WHERE run_id = $1 AND key = ANY ($2)",
        )
        .await?;
    let rows = db
        .query(&stmt, &[&run_id, &keys])
        .await
        .context("looking a batch's sources up in the run's listing")?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.get(0),
                ObjectInfo {
                    etag: r.get(1),
                    size: r.get(2),
                    version: r.get(3),
                },
            )
        })
        .collect())
}
