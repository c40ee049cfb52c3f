//! Sharing one run among many workers (threads of one process, or processes on many
//! machines) through PostgreSQL: the work is handed out as leases carved from frontiers —
//! phase 1: page ranges of the source listing; phase 2: id ranges of the table — and each
//! worker holds a session advisory lock on the lease it works on.
//!
//! - A worker whose process dies loses its database session, and with it the advisory
//!   lock: the next worker that looks takes the lease over at once, resuming at the
//!   lease's last committed position.
//! - A worker that is alive but stuck keeps its lock; its lease is taken over when its
//!   heartbeat is older than `--lease-ttl`. It cannot do harm afterwards: every commit
//!   checks lease ownership in the same statement ([`crate::pipeline::commit`]).

use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::JobConfig;
use crate::db::{rt, Queries, TableInfo};
use crate::s3::{self, ObjectInfo, S3};

/// First key of relocator's advisory locks ("relo"); the second is the lease id.
pub const LOCK_CLASS: i32 = 0x7265_6c6f;
/// The same, typed for comparisons with `pg_locks.classid`.
pub const LOCK_CLASS_I64: i64 = LOCK_CLASS as i64;

/// SQL: the session that holds the lease `lease_id` (an SQL expression) is alive — its
/// advisory lock on the lease is granted. The one test relocator has for "the holder is
/// gone": a worker whose process died loses its session, and with it the lock. `class`
/// is the statement's parameter carrying [`LOCK_CLASS_I64`].
pub(crate) fn holder_alive(lease_id: &str, class: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM pg_locks k
                  WHERE k.locktype = 'advisory' AND k.granted
                    AND k.database = (SELECT oid FROM pg_database
                                       WHERE datname = current_database())
                    AND k.classid = {class}::bigint::oid AND k.objsubid = 2
                    AND k.objid = {lease_id}::oid)"
    )
}

/// First key of the lock on a table's relocations: every `run` holds it shared for its
/// whole duration, a `rollback` exclusively, so the two never work on a table at once.
/// The second key is `hashtext` of the table's name.
const TABLE_LOCK_CLASS: i32 = 0x7265_6c74;

/// Who holds a table's lock: runs share it, a rollback holds it alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableLock {
    Run,
    Rollback,
}

/// Take the table's lock on this session (until [`unlock_table`] or the session ends,
/// so a killed process lets go at once). Fails with the reason when the other kind holds
/// it.
pub async fn lock_table(
    client: &tokio_postgres::Client,
    table: &TableInfo,
    kind: TableLock,
) -> Result<()> {
    let sql = match kind {
        TableLock::Run => "SELECT pg_try_advisory_lock_shared($1, hashtext($2))",
        TableLock::Rollback => "SELECT pg_try_advisory_lock($1, hashtext($2))",
    };
    let got: bool = client
        .query_one(sql, &[&TABLE_LOCK_CLASS, &table.display])
        .await
        .context("locking the table's relocations")?
        .get(0);
    if got {
        return Ok(());
    }
    Err(match kind {
        TableLock::Run => anyhow::anyhow!(
            "a rollback of {} is in progress; let it finish (see relocator status), then rerun",
            table.display
        ),
        TableLock::Rollback => anyhow::anyhow!(
            "a run or rollback of {} is in progress; stop it or let it finish, then rerun the \
             rollback",
            table.display
        ),
    })
}

pub async fn unlock_table(
    client: &tokio_postgres::Client,
    table: &TableInfo,
    kind: TableLock,
) -> Result<()> {
    let sql = match kind {
        TableLock::Run => "SELECT pg_advisory_unlock_shared($1, hashtext($2))",
        TableLock::Rollback => "SELECT pg_advisory_unlock($1, hashtext($2))",
    };
    client
        .execute(sql, &[&TABLE_LOCK_CLASS, &table.display])
        .await
        .context("unlocking the table's relocations")?;
    Ok(())
}

/// A lease: in phase 1, source keys in (lo, hi]; in phase 2, rows with lo < id <= hi.
#[derive(Debug, Clone)]
pub struct Lease {
    pub id: i64,
    pub phase: i16,
    pub hi: Option<String>,
    /// Where to continue: the last committed key/id, or the lease's lower bound.
    pub pos: Option<String>,
    /// Phase 1, freshly carved: the source objects the carving listing returned, so the
    /// worker need not list them again.
    pub objects: Option<Vec<(String, ObjectInfo)>>,
}

/// What [`take`] found.
#[derive(Debug)]
pub enum Take {
    Lease(Lease),
    /// No lease free now, but others are still being worked on: look again later (their
    /// owner may die, or phase 2 waits for phase 1 to end).
    Wait,
    /// Every lease of the run is done.
    Done,
}

/// Join the newest unfinished run of this job, or register a new one. Serialised per
/// job, so processes started together share one run. The lease TTL belongs to the run:
/// a new run records `ttl` (or the default), a joining process adopts the run's, and one
/// that asked for another value is refused (exit 2) before anything is changed — else a
/// process with a smaller TTL would take over the leases of live workers.
pub async fn begin_run(
    client: &mut deadpool_postgres::Client,
    cfg: &JobConfig,
    table: &TableInfo,
    ttl: Option<Duration>,
) -> Result<(i64, bool, Duration)> {
    let job = cfg.fingerprint();
    let asked = ttl.map(|t| t.as_secs() as i64);
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&job])
        .await?;
    // Jobs naming services register one at a time per table, each seeing the others'
    // service-to-bucket mapping (checked once already, but another job may have
    // registered since).
    if cfg.service.is_some() {
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('relocator services ' || $1))",
            &[&table.display],
        )
        .await?;
        crate::db::services_agree(&*tx, cfg, &table.display).await?;
    }
    let open = tx
        .query_opt(
            "SELECT run_id, lease_ttl_secs FROM relocator.runs
              WHERE job = $1 AND status IN ('running', 'interrupted', 'failed')
              ORDER BY run_id DESC LIMIT 1",
            &[&job],
        )
        .await
        .context("looking for an unfinished run to join")?;
    let (run_id, resumed, secs) = match open {
        Some(r) => {
            let (run_id, theirs): (i64, Option<i64>) = (r.get(0), r.get(1));
            let secs = match (theirs, asked) {
                (Some(t), Some(a)) if t != a => {
                    return Err(crate::config::config_error(format!(
                        "run {run_id} of this job uses --lease-ttl {t}; a process joining it \
                         must use the same (or leave --lease-ttl out to adopt it)"
                    )))
                }
                (Some(t), _) => t,
                (None, a) => a.unwrap_or(DEFAULT_TTL_SECS),
            };
            tx.execute(
                "UPDATE relocator.runs SET status = 'running', updated_at = now(),
                        lease_ttl_secs = $2,
                        referenced_by = ARRAY(SELECT DISTINCT c
                                                FROM unnest(referenced_by || $3::text[]) c)
                  WHERE run_id = $1",
                &[&run_id, &secs, &table.referencing_names()],
            )
            .await
            .context("joining the unfinished run")?;
            (run_id, true, secs)
        }
        None => {
            let secs = asked.unwrap_or(DEFAULT_TTL_SECS);
            let r = tx
                .query_one(
                    "INSERT INTO relocator.runs
                            (job, table_name, source, dest, lease_ttl_secs, referenced_by,
                             services)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING run_id",
                    &[
                        &job,
                        &table.display,
                        &cfg.source.to_string(),
                        &cfg.dest.to_string(),
                        &secs,
                        &table.referencing_names(),
                        &cfg.services_json(),
                    ],
                )
                .await
                .context("registering the run in the ledger")?;
            (r.get(0), false, secs)
        }
    };
    tx.commit().await?;
    Ok((run_id, resumed, Duration::from_secs(secs.max(1) as u64)))
}

/// A run's lease TTL when its first process set none (`--lease-ttl`'s default).
pub const DEFAULT_TTL_SECS: i64 = crate::pipeline::DEFAULT_LEASE_TTL.as_secs() as i64;

/// Take a lease of `run_id` for worker `me`: first one whose owner is gone (its lock is
/// free) or hung (heartbeat older than `ttl`); else a new one carved from the run's
/// frontiers — phase 1 (a page range of the source listing, `batch` keys) while
/// `phase1` is allowed and the listing is not exhausted, then phase 2 (`batch` rows of
/// ids) once every phase-1 lease is done. Carving is optimistic: the frontier moves only
/// if nobody moved it meanwhile, so nothing is locked while the listing runs. The lease
/// connection keeps the session advisory lock on the lease returned.
#[allow(clippy::too_many_arguments)]
pub async fn take(
    lease_conn: &deadpool_postgres::Client,
    q: &Queries,
    s3c: &S3,
    cfg: &JobConfig,
    run_id: i64,
    me: &str,
    batch: usize,
    ttl: Duration,
    phase1: bool,
    release: &mut Vec<i64>,
) -> Result<Take> {
    loop {
        // One statement: let go of finished leases' locks, find leases to take over,
        // read the frontiers.
        rt(1);
        let run = lease_conn
            .query_one(
                &format!(
                    "WITH released AS (
                     SELECT pg_advisory_unlock($6, x::int) FROM unnest($5::bigint[]) AS x
                 )
                 SELECT key_frontier, key_frontier_end, frontier, frontier_end,
                        (SELECT count(*) FROM relocator.leases
                          WHERE run_id = $1 AND NOT done AND phase = 1),
                        (SELECT count(*) FROM relocator.leases WHERE run_id = $1 AND NOT done),
                        (SELECT array_agg(l.lease_id ORDER BY l.lease_id) FROM relocator.leases l
                          WHERE l.run_id = $1 AND NOT l.done AND l.owner <> $2
                            AND (l.heartbeat < now() - make_interval(secs => $3::float8)
                                 OR l.locked AND NOT {})),
                        (SELECT count(*) FROM released)
                   FROM relocator.runs WHERE run_id = $1",
                    holder_alive("l.lease_id", "$4")
                ),
                &[
                    &run_id,
                    &me,
                    &ttl.as_secs_f64(),
                    &LOCK_CLASS_I64,
                    &*release,
                    &LOCK_CLASS,
                ],
            )
            .await
            .context("reading the run's frontiers")?;
        release.clear();
        let candidates: Option<Vec<i64>> = run.get(6);
        for id in candidates.unwrap_or_default() {
            if let Some(l) = take_over(lease_conn, id, me, ttl).await? {
                return Ok(Take::Lease(l));
            }
        }
        let (key_frontier, key_end): (Option<String>, bool) = (run.get(0), run.get(1));
        let (frontier, id_end): (Option<String>, bool) = (run.get(2), run.get(3));
        let (open_phase1, open_all): (i64, i64) = (run.get(4), run.get(5));

        if phase1 && !key_end {
            let objects = list_keys(s3c, cfg, key_frontier.as_deref(), batch).await?;
            let hi = objects.last().map(|(k, _)| k.clone());
            let end = objects.len() < batch;
            let carved = carve(
                lease_conn,
                run_id,
                me,
                1,
                key_frontier.as_deref(),
                hi.as_deref(),
                end,
            )
            .await?;
            match (carved, hi) {
                (Carved::Lease(id), Some(hi)) => {
                    return Ok(Take::Lease(Lease {
                        id,
                        phase: 1,
                        hi: Some(hi),
                        pos: key_frontier,
                        objects: Some(objects),
                    }))
                }
                // Lost the race for the frontier, or the listing was empty: look again.
                _ => continue,
            }
        }
        if open_phase1 > 0 {
            // Phase 2 sweeps rows phase 1 may still be moving: wait for it to end.
            return Ok(Take::Wait);
        }
        if id_end {
            return Ok(if open_all > 0 { Take::Wait } else { Take::Done });
        }
        let offset = batch as i64 * PHASE2_BATCHES - 1;
        rt(1);
        let hi: Option<String> = match &frontier {
            None => lease_conn.query_opt(q.lease_end(false), &[&offset]).await?,
            Some(f) => {
                lease_conn
                    .query_opt(q.lease_end(true), &[f, &offset])
                    .await?
            }
        }
        .map(|r| r.get(0));
        let end = hi.is_none();
        if let Carved::Lease(id) = carve(
            lease_conn,
            run_id,
            me,
            2,
            frontier.as_deref(),
            hi.as_deref(),
            end,
        )
        .await?
        {
            return Ok(Take::Lease(Lease {
                id,
                phase: 2,
                hi,
                pos: frontier,
                objects: None,
            }));
        }
    }
}

/// Phase-2 leases span this many batches (id ranges are cheap to carve).
const PHASE2_BATCHES: i64 = 10;

/// Up to `n` source objects after `after`, in listing order.
async fn list_keys(
    s3c: &S3,
    cfg: &JobConfig,
    after: Option<&str>,
    n: usize,
) -> Result<Vec<(String, ObjectInfo)>> {
    let mut objects: Vec<(String, ObjectInfo)> = Vec::with_capacity(n);
    let (bucket, prefix) = (&cfg.source.bucket, &cfg.source.prefix);
    let mut listing = s3c.listing(s3::Side::Source, bucket, prefix, after.map(str::to_owned));
    while objects.len() < n {
        let want = (n - objects.len()).min(1000) as i32;
        match listing
            .page(want)
            .await
            .map_err(anyhow::Error::from)
            .context("listing the source")?
        {
            Some(page) => objects.extend(page),
            None => break,
        }
    }
    Ok(objects)
}

enum Carved {
    Lease(i64),
    /// The frontier moved (another worker carved first), or there was nothing to carve.
    No,
}

/// Move a frontier from `lo` to `hi` (and mark its end) and insert the lease (lo, hi] —
/// one statement, so only if nobody moved the frontier since it was read.
#[allow(clippy::too_many_arguments)]
async fn carve(
    c: &deadpool_postgres::Client,
    run_id: i64,
    me: &str,
    phase: i16,
    lo: Option<&str>,
    hi: Option<&str>,
    end: bool,
) -> Result<Carved> {
    let (col, end_col) = if phase == 1 {
        ("key_frontier", "key_frontier_end")
    } else {
        ("frontier", "frontier_end")
    };
    rt(1);
    let row = c
        .query_opt(
            &format!(
                "WITH f AS (
                     UPDATE relocator.runs SET {col} = COALESCE($3::text, {col}), {end_col} = $4,
                            updated_at = now()
                      WHERE run_id = $1 AND {col} IS NOT DISTINCT FROM $2::text AND NOT {end_col}
                  RETURNING run_id
                 ), l AS (
                     INSERT INTO relocator.leases (run_id, phase, lo, hi, owner)
                     SELECT $1, $5::smallint, $2::text, $3::text, $6 FROM f WHERE $3::text IS NOT NULL OR $5::smallint = 2
                  RETURNING lease_id
                 )
                 SELECT (SELECT count(*) FROM f),
                        (SELECT lease_id FROM l),
                        (SELECT pg_try_advisory_lock($7, lease_id::int) FROM l)"
            ),
            &[&run_id, &lo, &hi, &end, &phase, &me, &LOCK_CLASS],
        )
        .await
        .context("carving a new lease")?;
    let lease: Option<i64> = row.and_then(|r| r.get(1));
    Ok(match lease {
        Some(id) => Carved::Lease(id),
        None => Carved::No,
    })
}

/// Take lease `id` over if its owner is still gone (its advisory lock is free) or hung
/// (its heartbeat expired). Taken from a hung owner, the lease's lock may still be that
/// owner's: the lease then records that its new owner does not hold it (`locked`), so its
/// liveness is judged by the heartbeat alone — else, once the hung process went away and
/// its lock with it, the lease would look abandoned while its new owner works on it.
async fn take_over(
    c: &deadpool_postgres::Client,
    id: i64,
    me: &str,
    ttl: Duration,
) -> Result<Option<Lease>> {
    rt(1);
    let row = c
        .query_one(
            "WITH lk AS MATERIALIZED (
                 SELECT pg_try_advisory_lock($3, $1::bigint::int) AS got
             ), taken AS (
                 UPDATE relocator.leases SET owner = $2, heartbeat = clock_timestamp(),
                        locked = lk.got
                   FROM lk
                  WHERE lease_id = $1 AND NOT done AND owner <> $2
                    AND (lk.got OR heartbeat < now() - make_interval(secs => $4::float8))
              RETURNING phase, hi, COALESCE(last_id, lo) AS pos
             )
             SELECT lk.got, t.phase, t.hi, t.pos FROM lk LEFT JOIN taken t ON true",
            &[&id, &me, &LOCK_CLASS, &ttl.as_secs_f64()],
        )
        .await?;
    let (got, phase): (bool, Option<i16>) = (row.get(0), row.get(1));
    let Some(phase) = phase else {
        if got {
            // Not taken (done, or taken by another meanwhile): the lock is not this
            // worker's to keep.
            rt(1);
            c.execute(
                "SELECT pg_advisory_unlock($1, $2::bigint::int)",
                &[&LOCK_CLASS, &id],
            )
            .await?;
        }
        return Ok(None);
    };
    tracing::info!(lease = id, "took over a lease whose worker is gone");
    Ok(Some(Lease {
        id,
        phase,
        hi: row.get(2),
        pos: row.get(3),
        objects: None,
    }))
}

/// Renew the heartbeat of every lease `me` holds, so none is taken over from a worker
/// that is alive but busy with a long batch.
pub async fn heartbeat(lease_conn: &deadpool_postgres::Client, me: &str) -> Result<()> {
    rt(1);
    lease_conn
        .execute(
            "UPDATE relocator.leases SET heartbeat = clock_timestamp() WHERE owner = $1 AND NOT done",
            &[&me],
        )
        .await
        .context("renewing the heartbeat of this worker's leases")?;
    Ok(())
}

/// The lease is finished: mark it done and let go of its lock, in one statement.
pub async fn finish(lease_conn: &deadpool_postgres::Client, lease: i64, me: &str) -> Result<()> {
    rt(1);
    lease_conn
        .query_one(
            "WITH d AS (UPDATE relocator.leases SET done = true, heartbeat = now()
                         WHERE lease_id = $1 AND owner = $2)
             SELECT pg_advisory_unlock($3, $1::bigint::int)",
            &[&lease, &me, &LOCK_CLASS],
        )
        .await
        .context("marking a lease done")?;
    Ok(())
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
