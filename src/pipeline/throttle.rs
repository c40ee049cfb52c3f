//! Throttling on the database's health. Rewriting hundreds of millions of rows makes WAL,
//! dead tuples and replica lag; like GitLab's batched background migrations and gh-ost,
//! a run waits while the database says it is under stress:
//! - a replica's lag is over `--max-replica-lag` (read on the primary from
//!   `pg_stat_replication`, or on each `--replica-url`);
//! - autovacuum works on the job's table (`pg_stat_progress_vacuum`), unless
//!   `--no-autovacuum-pause`;
//! - WAL is written faster than `--max-wal-rate`.
//!
//! Each worker asks before a batch's copies, its commit and its cleanup, so while the
//! database is unhealthy no row is rewritten, no source deleted, and S3 copies stay at
//! most one batch ahead. The verdict is sampled at most once a second for the whole
//! process. A wait shows in the progress bar, as a log line with what was seen, and in
//! `status` (the run's `waiting` in the ledger).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{config_error, DatabaseUrl, Health};
use crate::db::{self, TableInfo};
use crate::progress::Progress;

/// How long a verdict stands before it is sampled again.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// How often a wait that goes on is logged (and recorded with the run) again; `status`
/// shows a wait recorded within three times this.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// The WAL rate is the average over this much time (a wait of a second does not let the
/// next batch through at once).
const WAL_WINDOW: Duration = Duration::from_secs(10);

/// The roles that may read other sessions' lag and progress columns.
const MONITOR_SQL: &str = "SELECT pg_has_role(current_user, 'pg_monitor', 'MEMBER')
        OR pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER')
        OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)";

/// A replica's lag as the replica sees it: nothing received that is not replayed, or
/// the age of the last transaction replayed (an idle primary's first write after a long
/// pause shows as that long: the safe side).
const REPLICA_LAG_SQL: &str = "SELECT CASE WHEN NOT pg_is_in_recovery() THEN NULL
             WHEN pg_last_wal_receive_lsn() IS NULL
               OR pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0
             ELSE COALESCE(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0)
        END::float8";

/// What a process needs to judge the database's health, ready to ask.
pub struct Throttle {
    health: Health,
    /// The job's table (`pg_stat_progress_vacuum.relid`).
    table_oid: u32,
    /// Autovacuum is watched (asked for, and this role may see it).
    watch_vacuum: bool,
    replicas: Vec<(DatabaseUrl, deadpool_postgres::Pool)>,
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    sampled: Option<Instant>,
    /// Why the database is unhealthy; None: healthy.
    over: Option<String>,
    /// The WAL positions read in the last [`WAL_WINDOW`], oldest first.
    wal: std::collections::VecDeque<(Instant, f64)>,
    /// When the current wait began and was last logged.
    waiting: Option<(Instant, Instant)>,
}

impl Throttle {
    /// Check what `health` asks for can be read: a role that cannot read the lag of
    /// replicas is refused here (exit 2, with the GRANT), and each replica URL is
    /// connected to and must be a replica. Autovacuum that this role cannot see is
    /// warned about and not watched.
    pub async fn prepare(
        health: &Health,
        db: &tokio_postgres::Client,
        table: &TableInfo,
    ) -> Result<Option<Throttle>> {
        if !health.asks_anything() {
            return Ok(None);
        }
        let monitor = may_monitor(db).await?;
        if health.max_replica_lag.is_some() && health.replica_urls.is_empty() && !monitor {
            return Err(config_error(
                "--max-replica-lag reads the replicas' lag from pg_stat_replication, which \
                 this role may not read; GRANT pg_monitor TO the role, or give each \
                 replica with --replica-url",
            ));
        }
        let watch_vacuum = health.autovacuum_pause && monitor;
        if health.autovacuum_pause && !monitor {
            warn!(
                "this role cannot see autovacuum workers (pg_stat_progress_vacuum), so the \
                 run does not pause for them; GRANT pg_monitor TO the role, or say \
                 --no-autovacuum-pause"
            );
        }
        let table_oid: u32 = db
            .query_one("SELECT $1::text::regclass::oid", &[&table.qualified])
            .await
            .context("looking up the table's oid")?
            .get(0);
        let mut replicas = Vec::new();
        for url in &health.replica_urls {
            let pool = db::pool(url, 1, Some(Duration::from_secs(10)))?;
            let c = db::connect_checked(&pool, url).await?;
            let lag: Option<f64> = c
                .query_one(REPLICA_LAG_SQL, &[])
                .await
                .with_context(|| format!("reading the lag of replica {url}"))?
                .get(0);
            if lag.is_none() {
                return Err(config_error(format!(
                    "--replica-url {url} is not a replica (pg_is_in_recovery() is false); \
                     give the URL of a streaming replica of the job's database"
                )));
            }
            drop(c);
            replicas.push((url.clone(), pool));
        }
        // The WAL rate is measured from here on (the run's first batch waits like the
        // others once it is over).
        let mut state = State::default();
        if health.max_wal_rate.is_some() {
            state
                .wal
                .push_back((Instant::now(), wal_position(db).await?));
        }
        Ok(Some(Throttle {
            health: health.clone(),
            table_oid,
            watch_vacuum,
            replicas,
            state: tokio::sync::Mutex::new(state),
        }))
    }

    /// This process is done: a wait it recorded with the run is over (another process
    /// of the run that still waits records its own again within [`LOG_EVERY`]).
    pub async fn done(&self, db: &tokio_postgres::Client, run_id: i64) {
        if self.state.lock().await.waiting.is_some() {
            if let Err(e) = record(db, run_id, None).await {
                warn!(error = %format!("{e:#}"), "could not clear the run's wait in the ledger");
            }
        }
    }

    /// Wait while the database is unhealthy. Returns false when the run was cancelled
    /// during the wait (the caller stops without doing the step).
    pub async fn wait(
        &self,
        db: &tokio_postgres::Client,
        run_id: i64,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<bool> {
        loop {
            let over = self.verdict(db, run_id, progress).await?;
            if over.is_none() {
                return Ok(true);
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                _ = tokio::time::sleep(SAMPLE_EVERY) => {}
            }
        }
    }

    /// The current verdict: sampled again once [`SAMPLE_EVERY`] has passed; a change
    /// is logged, shown in the progress bar and recorded with the run.
    async fn verdict(
        &self,
        db: &tokio_postgres::Client,
        run_id: i64,
        progress: &Progress,
    ) -> Result<Option<String>> {
        let mut st = self.state.lock().await;
        if st.sampled.is_some_and(|t| t.elapsed() < SAMPLE_EVERY) {
            return Ok(st.over.clone());
        }
        let over = self.sample(db, &mut st).await?;
        st.sampled = Some(Instant::now());
        let now = Instant::now();
        match (&over, st.waiting) {
            (Some(why), None) => {
                warn!(
                    run_id,
                    "database under stress, commits and deletes wait: {why}"
                );
                st.waiting = Some((now, now));
                progress.waiting(Some(why));
                record(db, run_id, Some(why)).await?;
            }
            (Some(why), Some((since, logged))) => {
                if logged.elapsed() >= LOG_EVERY {
                    warn!(
                        run_id,
                        waited_secs = since.elapsed().as_secs(),
                        "still waiting: {why}"
                    );
                    st.waiting = Some((since, now));
                    record(db, run_id, Some(why)).await?;
                }
                progress.waiting(Some(why));
            }
            (None, Some((since, _))) => {
                info!(
                    run_id,
                    waited_secs = since.elapsed().as_secs(),
                    "database healthy again, going on"
                );
                st.waiting = None;
                progress.waiting(None);
                record(db, run_id, None).await?;
            }
            (None, None) => {}
        }
        st.over = over.clone();
        Ok(over)
    }

    async fn sample(&self, db: &tokio_postgres::Client, st: &mut State) -> Result<Option<String>> {
        if let Some(max) = self.health.max_replica_lag {
            let (lag, who) = self.replica_lag(db).await?;
            if lag > max.as_secs_f64() {
                return Ok(Some(format!(
                    "replica lag {lag:.1}s ({who}) over --max-replica-lag {}s",
                    max.as_secs_f64()
                )));
            }
        }
        if self.watch_vacuum {
            let vacuums: i64 = db
                .query_one(
                    "SELECT count(*) FROM pg_stat_progress_vacuum v
                       JOIN pg_stat_activity a USING (pid)
                      WHERE v.relid = $1 AND a.backend_type = 'autovacuum worker'",
                    &[&self.table_oid],
                )
                .await
                .context("reading pg_stat_progress_vacuum")?
                .get(0);
            if vacuums > 0 {
                return Ok(Some(
                    "autovacuum is working on the table (--no-autovacuum-pause to go on)".into(),
                ));
            }
        }
        if let Some(max) = self.health.max_wal_rate {
            let now = Instant::now();
            let lsn = wal_position(db).await?;
            st.wal.push_back((now, lsn));
            // Keep one reading at least a window old, as the base of the average.
            while st.wal.len() > 2 && now.duration_since(st.wal[1].0) >= WAL_WINDOW {
                st.wal.pop_front();
            }
            let rate = st.wal.front().map(|(t, at)| {
                (lsn - at).max(0.0) / now.duration_since(*t).as_secs_f64().max(0.001)
            });
            if let Some(rate) = rate.filter(|r| *r > max as f64) {
                return Ok(Some(format!(
                    "WAL written at {}/s over --max-wal-rate {}/s",
                    indicatif::HumanBytes(rate as u64),
                    indicatif::HumanBytes(max)
                )));
            }
        }
        Ok(None)
    }

    /// The largest lag of any replica in seconds, and which one.
    async fn replica_lag(&self, db: &tokio_postgres::Client) -> Result<(f64, String)> {
        let mut worst = (0.0, "no replica".to_owned());
        if self.replicas.is_empty() {
            for r in db
                .query(
                    "SELECT coalesce(application_name, '') || '@' || coalesce(client_addr::text, 'local'),
                            extract(epoch FROM greatest(write_lag, flush_lag, replay_lag))::float8
                       FROM pg_stat_replication",
                    &[],
                )
                .await
                .context("reading the replicas' lag from pg_stat_replication")?
            {
                let lag: f64 = r.get::<_, Option<f64>>(1).unwrap_or(0.0);
                if lag >= worst.0 {
                    worst = (lag, r.get(0));
                }
            }
            return Ok(worst);
        }
        for (url, pool) in &self.replicas {
            // A replica that cannot be asked counts as lagging without bound: the run
            // waits (and says so) rather than outrun it.
            let lag = match pool.get().await {
                Ok(c) => match c.query_one(REPLICA_LAG_SQL, &[]).await {
                    Ok(r) => r.get::<_, Option<f64>>(0).unwrap_or(f64::INFINITY),
                    Err(e) => {
                        warn!(replica = %url, "cannot read the replica's lag: {e}");
                        f64::INFINITY
                    }
                },
                Err(e) => {
                    warn!(replica = %url, "cannot reach the replica: {e}");
                    f64::INFINITY
                }
            };
            if lag >= worst.0 {
                worst = (lag, url.to_string());
            }
        }
        Ok(worst)
    }
}

/// Whether this role may read other sessions' replication lag and vacuum progress.
pub async fn may_monitor(db: &tokio_postgres::Client) -> Result<bool> {
    Ok(db
        .query_one(MONITOR_SQL, &[])
        .await
        .context("checking whether this role may read replication and vacuum progress")?
        .get::<_, Option<bool>>(0)
        .unwrap_or(false))
}

/// The replicas the primary streams to, as `name (lag)`; None where none is connected.
pub async fn replicas_seen(db: &tokio_postgres::Client) -> Result<Vec<String>> {
    Ok(db
        .query(
            "SELECT coalesce(application_name, '') || '@' || coalesce(client_addr::text, 'local')
                    || ' (' || coalesce(extract(epoch FROM replay_lag)::numeric(12, 1)::text || 's', 'no') || ' lag)'
               FROM pg_stat_replication",
            &[],
        )
        .await
        .context("reading pg_stat_replication")?
        .into_iter()
        .map(|r| r.get(0))
        .collect())
}

/// The cluster's WAL position in bytes.
async fn wal_position(db: &tokio_postgres::Client) -> Result<f64> {
    Ok(db
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::float8", &[])
        .await
        .context("reading the WAL position")?
        .get(0))
}

/// The run's `waiting` in the ledger, for `status`: why, since when, and when it was last
/// seen (a process killed while waiting leaves a mark that `status` then lets go stale).
async fn record(db: &tokio_postgres::Client, run_id: i64, why: Option<&String>) -> Result<()> {
    db.execute(
        "UPDATE relocator.runs SET waiting = $2,
                waiting_since = CASE WHEN $2::text IS NULL THEN NULL
                                     WHEN waiting_seen > now() - interval '30 seconds'
                                     THEN coalesce(waiting_since, now())
                                     ELSE now() END,
                waiting_seen = CASE WHEN $2::text IS NULL THEN NULL ELSE now() END
          WHERE run_id = $1",
        &[&run_id, &why],
    )
    .await
    .context("recording the run's wait in the ledger")?;
    Ok(())
}
