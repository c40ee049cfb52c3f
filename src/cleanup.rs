//! The cleanup stage: delete the sources of committed moves, and take back copies whose
//! row the application changed.
//!
//! Invariant enforced here, in [`delete_unreferenced`] and nowhere else: *a source object
//! is deleted only after the row rewrite that stops referencing it has committed, and
//! only when no row still references that key*. Callers pass only ledger entries, which
//! exist only for committed rewrites; the reference check runs after that commit. A
//! rollback removes the new objects through the same function, on the same terms.

use std::collections::{BTreeMap, HashSet};

use anyhow::{Context, Result};
use futures::{stream, StreamExt, TryStreamExt};
use tracing::{info, warn};

use crate::db::Queries;
use crate::report::Counters;
use crate::s3::{self, Side, DELETE_BATCH, S3};

/// A committed move whose source has not been dealt with yet (a ledger row).
#[derive(Debug, Clone)]
pub struct Pending {
    pub move_id: i64,
    pub row_id: String,
    pub old_path: String,
    pub new_path: String,
    pub src_bucket: String,
}

/// One DeleteObjects answer: bucket, keys sent, keys S3 did not delete (with why).
type DeleteAnswer<'a> = (&'a str, usize, Vec<(String, String)>);

/// Which keys among `keys` some row of the table still references.
pub async fn still_referenced(
    client: &deadpool_postgres::Client,
    q: &Queries,
    keys: &[&str],
) -> Result<HashSet<String>> {
    if keys.is_empty() {
        return Ok(HashSet::new());
    }
    let stmt = client.prepare_cached(&q.referenced).await?;
    crate::db::rt(1);
    let rows = client
        .query(&stmt, &[&keys])
        .await
        .context("checking which source keys rows still reference")?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// Delete the sources of these committed moves where no row references them any more,
/// then mark the ledger. Keys S3 refuses to delete stay pending (a rerun retries them).
pub async fn delete_sources(
    db: &deadpool_postgres::Client,
    s3c: &S3,
    q: &Queries,
    pending: &[Pending],
    counters: &mut Counters,
) -> Result<()> {
    let items: Vec<Unreferenced<'_>> = pending
        .iter()
        .map(|p| Unreferenced {
            move_id: p.move_id,
            bucket: &p.src_bucket,
            key: &p.old_path,
        })
        .collect();
    delete_unreferenced(db, s3c, Side::Source, q, &items, MARK_CLEANED, counters).await
}

/// Marks a forward move's source as dealt with.
const MARK_CLEANED: &str = "UPDATE relocator.moves m SET cleaned_at = now(), cleanup = u.outcome
                              FROM unnest($1::bigint[], $2::text[]) AS u(move_id, outcome)
                             WHERE m.move_id = u.move_id";

/// Marks an undone move's new object as dealt with ([`crate::rollback`]).
pub const MARK_ROLLBACK_CLEANED: &str =
    "UPDATE relocator.moves m SET rollback_cleaned_at = now(), rollback_cleanup = u.outcome
       FROM unnest($1::bigint[], $2::text[]) AS u(move_id, outcome)
      WHERE m.move_id = u.move_id";

/// A key that is to go once no row references it: the source of a committed move, or
/// (rollback) the new object of a committed undo.
#[derive(Debug, Clone, Copy)]
pub struct Unreferenced<'a> {
    pub move_id: i64,
    pub bucket: &'a str,
    pub key: &'a str,
}

/// The one place relocator deletes an object a row pointed at: after the commit that
/// stopped the row pointing at it (callers pass ledger entries only), and only when the
/// reference check — made now, after that commit — finds no row referencing the key.
/// `mark` records each move's outcome (`deleted` | `still_referenced`) in the ledger;
/// keys S3 refuses to delete stay unmarked, so a rerun retries them.
#[allow(clippy::too_many_arguments)]
pub async fn delete_unreferenced(
    db: &deadpool_postgres::Client,
    s3c: &S3,
    side: Side,
    q: &Queries,
    items: &[Unreferenced<'_>],
    mark: &str,
    counters: &mut Counters,
) -> Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = {
        let mut seen = HashSet::new();
        items
            .iter()
            .map(|p| p.key)
            .filter(|k| seen.insert(*k))
            .collect()
    };
    let referenced = still_referenced(db, q, &keys).await?;

    // Group deletable keys by bucket (a ledger may span jobs with different buckets).
    let mut by_bucket: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut queued = HashSet::new();
    for p in items {
        if !referenced.contains(p.key) && queued.insert((p.bucket, p.key)) {
            by_bucket
                .entry(p.bucket)
                .or_default()
                .push(p.key.to_owned());
        }
    }
    // The DeleteObjects requests of a batch go out together (at most 8 at once): the
    // last batch's cleanup otherwise runs alone at the end of a run.
    let requests: Vec<(&str, &[String])> = by_bucket
        .iter()
        .flat_map(|(bucket, keys)| keys.chunks(DELETE_BATCH).map(move |c| (*bucket, c)))
        .collect();
    let answers: Vec<DeleteAnswer<'_>> = stream::iter(requests)
        .map(|(bucket, chunk)| async move {
            s3c.ready_write().await;
            let errors = s3::delete_many(s3c.client(side), bucket, chunk)
                .await
                .map_err(anyhow::Error::from)
                .with_context(|| format!("deleting objects in s3://{bucket}"))?;
            Ok::<_, anyhow::Error>((bucket, chunk.len(), errors))
        })
        .buffer_unordered(8)
        .try_collect()
        .await?;
    let mut failed: HashSet<(&str, String)> = HashSet::new();
    for (bucket, n, errors) in answers {
        counters.sources_deleted += (n - errors.len()) as u64;
        for (key, why) in errors {
            warn!(bucket = %bucket, key = %key, error = %why, "object not deleted; a rerun retries it");
            failed.insert((bucket, key));
        }
    }

    let mut ids = Vec::new();
    let mut outcomes = Vec::new();
    for p in items {
        if referenced.contains(p.key) {
            ids.push(p.move_id);
            outcomes.push("still_referenced");
            counters.sources_kept_referenced += 1;
        } else if failed.contains(&(p.bucket, p.key.to_owned())) {
            counters.delete_failures += 1;
        } else {
            ids.push(p.move_id);
            outcomes.push("deleted");
        }
    }
    let mark = db.prepare_cached(mark).await?;
    crate::db::rt(1);
    db.execute(&mark, &[&ids, &outcomes])
        .await
        .context("marking cleaned-up moves in the ledger")?;
    Ok(())
}

/// Ledger entries of this table whose cleanup was not finished and whose lease no live
/// worker holds (its process died between COMMIT and cleanup), after `after` (keyset on
/// move_id), at most `limit`.
pub async fn pending_after(
    db: &deadpool_postgres::Client,
    table: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<Pending>> {
    crate::db::rt(1);
    let rows = db
        .query(
            "SELECT m.move_id, m.row_id, m.old_path, m.new_path, m.src_bucket
               FROM relocator.moves m
              WHERE m.table_name = $1 AND m.cleaned_at IS NULL AND m.move_id > $2
                AND NOT EXISTS (SELECT 1 FROM pg_locks l
                                 WHERE l.locktype = 'advisory' AND l.granted
                                   AND l.database = (SELECT oid FROM pg_database
                                                      WHERE datname = current_database())
                                   AND l.classid = $4::bigint::oid AND l.objsubid = 2
                                   AND l.objid = m.lease_id::oid)
              ORDER BY m.move_id LIMIT $3",
            &[&table, &after, &limit, &crate::lease::LOCK_CLASS_I64],
        )
        .await
        .context("reading unfinished cleanups from the ledger")?;
    Ok(rows
        .into_iter()
        .map(|r| Pending {
            move_id: r.get(0),
            row_id: r.get(1),
            old_path: r.get(2),
            new_path: r.get(3),
            src_bucket: r.get(4),
        })
        .collect())
}

/// Remove copies relocator created for rows the application changed before the commit,
/// unless some row references the destination key after all.
pub async fn take_back_copies(
    db: &deadpool_postgres::Client,
    s3c: &S3,
    side: Side,
    q: &Queries,
    bucket: &str,
    keys: &[&str],
    counters: &mut Counters,
) -> Result<()> {
    let referenced = still_referenced(db, q, keys).await?;
    for key in keys.iter().filter(|k| !referenced.contains(**k)) {
        s3c.ready_write().await;
        s3::delete_one(s3c.client(side), bucket, key)
            .await
            .map_err(anyhow::Error::from)
            .with_context(|| format!("removing the unused copy s3://{bucket}/{key}"))?;
        info!(bucket = %bucket, key = %key, "removed a copy whose row the application changed");
        counters.copies_removed += 1;
    }
    Ok(())
}
