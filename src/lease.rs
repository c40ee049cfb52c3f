//! Sharing one run among many workers (threads of one process, or processes on many
//! machines) through PostgreSQL: the run's id space is handed out as leases on id ranges
//! carved from a frontier, and each worker holds a session advisory lock on the lease it
//! works on.
//!
//! - A worker whose process dies loses its database session, and with it the advisory
//!   lock: the next worker that looks takes the lease over at once, resuming at the
//!   lease's last committed position.
//! - A worker that is alive but stuck keeps its lock; its lease is taken over when its
//!   heartbeat is older than `--lease-ttl`. It cannot do harm afterwards: every commit
//!   checks lease ownership in the same statement ([`crate::commit`]).

use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::JobConfig;
use crate::db::{Queries, TableInfo};

/// First key of relocator's advisory locks ("relo"); the second is the lease id.
pub const LOCK_CLASS: i32 = 0x7265_6c6f;
/// The same, typed for comparisons with `pg_locks.classid`.
pub const LOCK_CLASS_I64: i64 = LOCK_CLASS as i64;

/// A lease: rows with `lo < id <= hi` of one run, resumed after `pos`.
#[derive(Debug, Clone)]
pub struct Lease {
    pub id: i64,
    pub hi: Option<String>,
    /// Where to continue: the last committed id, or the lease's lower bound.
    pub pos: Option<String>,
}

/// What [`take`] found.
#[derive(Debug)]
pub enum Take {
    Lease(Lease),
    /// No lease free now, but others are still being worked on: look again later (their
    /// owner may die).
    Wait,
    /// Every lease of the run is done.
    Done,
}

/// Join the newest unfinished run of this job, or register a new one. Serialised per
/// job, so processes started together share one run.
pub async fn begin_run(
    client: &mut deadpool_postgres::Client,
    cfg: &JobConfig,
    table: &TableInfo,
) -> Result<(i64, bool)> {
    let job = cfg.fingerprint();
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&job])
        .await?;
    let row = tx
        .query_opt(
            "UPDATE relocator.runs SET status = 'running', updated_at = now()
              WHERE run_id = (SELECT run_id FROM relocator.runs
                               WHERE job = $1 AND status <> 'finished'
                               ORDER BY run_id DESC LIMIT 1)
          RETURNING run_id",
            &[&job],
        )
        .await
        .context("looking for an unfinished run to join")?;
    let (run_id, resumed) = match row {
        Some(r) => (r.get(0), true),
        None => {
            let r = tx
                .query_one(
                    "INSERT INTO relocator.runs (job, table_name, source, dest)
                     VALUES ($1, $2, $3, $4) RETURNING run_id",
                    &[
                        &job,
                        &table.display,
                        &cfg.source.to_string(),
                        &cfg.dest.to_string(),
                    ],
                )
                .await
                .context("registering the run in the ledger")?;
            (r.get(0), false)
        }
    };
    tx.commit().await?;
    Ok((run_id, resumed))
}

/// Take a lease of `run_id` for worker `me`: first one whose owner is gone (its lock is
/// free) or hung (heartbeat older than `ttl`), else a new one of `rows` selected rows
/// carved from the frontier. Runs on the worker's own connection, which keeps the
/// session advisory lock on the lease it returns.
pub async fn take(
    lease_conn: &mut deadpool_postgres::Client,
    q: &Queries,
    cfg: &JobConfig,
    run_id: i64,
    me: &str,
    rows: i64,
    ttl: Duration,
) -> Result<Take> {
    let tx = lease_conn.transaction().await?;
    let open = tx
        .query(
            "SELECT lease_id, hi, COALESCE(last_id, lo),
                    heartbeat < now() - make_interval(secs => $3::float8)
               FROM relocator.leases
              WHERE run_id = $1 AND NOT done AND owner <> $2
              ORDER BY lease_id
                FOR UPDATE SKIP LOCKED",
            &[&run_id, &me, &ttl.as_secs_f64()],
        )
        .await
        .context("looking for leases to take over")?;
    for r in open {
        let id: i64 = r.get(0);
        let expired: bool = r.get(3);
        let free: bool = tx
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2::bigint::int)",
                &[&LOCK_CLASS, &id],
            )
            .await?
            .get(0);
        if free || expired {
            tx.execute(
                "UPDATE relocator.leases SET owner = $2, heartbeat = now() WHERE lease_id = $1",
                &[&id, &me],
            )
            .await?;
            tx.commit().await?;
            tracing::info!(lease = id, "took over a lease whose worker is gone");
            return Ok(Take::Lease(Lease {
                id,
                hi: r.get(1),
                pos: r.get(2),
            }));
        }
    }

    let run = tx
        .query_one(
            "SELECT frontier, frontier_end FROM relocator.runs WHERE run_id = $1 FOR UPDATE",
            &[&run_id],
        )
        .await
        .context("reading the run's frontier")?;
    let frontier: Option<String> = run.get(0);
    if run.get::<_, bool>(1) {
        let open: i64 = tx
            .query_one(
                "SELECT count(*) FROM relocator.leases WHERE run_id = $1 AND NOT done",
                &[&run_id],
            )
            .await?
            .get(0);
        tx.commit().await?;
        return Ok(if open > 0 { Take::Wait } else { Take::Done });
    }
    let offset = rows - 1;
    let prefix = cfg.source.prefix.as_str();
    let hi: Option<String> = match &frontier {
        None => tx
            .query_opt(q.lease_end(false), &[&prefix, &offset])
            .await?
            .map(|r| r.get(0)),
        Some(f) => tx
            .query_opt(q.lease_end(true), &[f, &prefix, &offset])
            .await?
            .map(|r| r.get(0)),
    };
    let id: i64 = tx
        .query_one(
            "INSERT INTO relocator.leases (run_id, lo, hi, owner) VALUES ($1, $2, $3, $4)
             RETURNING lease_id",
            &[&run_id, &frontier, &hi, &me],
        )
        .await?
        .get(0);
    tx.execute(
        "UPDATE relocator.runs SET frontier = $2::text, frontier_end = ($2::text IS NULL), updated_at = now()
          WHERE run_id = $1",
        &[&run_id, &hi],
    )
    .await?;
    tx.query_one(
        "SELECT pg_try_advisory_lock($1, $2::bigint::int)",
        &[&LOCK_CLASS, &id],
    )
    .await?;
    tx.commit().await.context("carving a new lease")?;
    Ok(Take::Lease(Lease {
        id,
        hi,
        pos: frontier,
    }))
}

/// The lease is finished: mark it done and let go of its lock.
pub async fn finish(lease_conn: &deadpool_postgres::Client, lease: i64, me: &str) -> Result<()> {
    lease_conn
        .execute(
            "UPDATE relocator.leases SET done = true, heartbeat = now()
              WHERE lease_id = $1 AND owner = $2",
            &[&lease, &me],
        )
        .await
        .context("marking a lease done")?;
    release(lease_conn, lease).await
}

/// Let go of a lease's advisory lock (finished, or lost to another worker).
pub async fn release(lease_conn: &deadpool_postgres::Client, lease: i64) -> Result<()> {
    lease_conn
        .execute(
            "SELECT pg_advisory_unlock($1, $2::bigint::int)",
            &[&LOCK_CLASS, &lease],
        )
        .await?;
    Ok(())
}

/// Mark the run finished once every lease is done and the frontier reached the end.
pub async fn finish_run_if_complete(
    client: &deadpool_postgres::Client,
    run_id: i64,
) -> Result<bool> {
    let n = client
        .execute(
            "UPDATE relocator.runs SET status = 'finished', finished_at = now(), updated_at = now()
              WHERE run_id = $1 AND frontier_end
                AND NOT EXISTS (SELECT 1 FROM relocator.leases WHERE run_id = $1 AND NOT done)",
            &[&run_id],
        )
        .await?;
    Ok(n == 1)
}
