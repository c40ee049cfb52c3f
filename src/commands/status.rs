//! `status`: what the ledger says about a job's runs — state, leases, rows moved,
//! cleanups pending, rate, what is left and when it should be done. Read-only.

use anyhow::{Context, Result};
use serde::Serialize;

use crate::config::JobConfig;
use crate::db::{self, TableInfo};
use crate::ledger;

/// One run of the job, as the ledger has it.
#[derive(Debug, Clone, Serialize)]
pub struct RunStatus {
    pub run_id: i64,
    pub status: String,
    pub started_at: String,
    pub updated_at: String,
    pub leases_done: i64,
    pub leases_open: i64,
    pub rows_moved: i64,
    pub cleanups_pending: i64,
    /// Moves of this run undone by `rollback`.
    pub rows_rolled_back: i64,
    /// The backup the run followed (`run --backup`): file, rows, bytes, sha256.
    pub backup: Option<serde_json::Value>,
    /// Rows moved per second between the run's start and its last update.
    pub rows_per_sec: f64,
    /// Why the run is waiting for the database (replica lag, autovacuum, WAL rate), and
    /// since when; None while it is not.
    pub waiting: Option<String>,
    pub waiting_since: Option<String>,
}

/// The job's runs (newest first) and what is left to move.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub runs: Vec<RunStatus>,
    /// Rows whose path is still under the source prefix.
    pub rows_left: i64,
    /// At the newest run's rate, if it has one.
    pub eta_secs: Option<f64>,
}

impl Status {
    /// The text a person reads.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.runs.is_empty() {
            out.push_str("no run of this job in the ledger yet\n");
        }
        for r in &self.runs {
            out.push_str(&format!(
                "run {} {}: started {}, last progress {}; leases {} done, {} open; {} rows moved \
                 ({:.0} rows/s); {} source cleanups pending{}{}{}\n",
                r.run_id,
                r.status,
                r.started_at,
                r.updated_at,
                r.leases_done,
                r.leases_open,
                r.rows_moved,
                r.rows_per_sec,
                r.cleanups_pending,
                if r.rows_rolled_back > 0 {
                    format!("; {} rolled back", r.rows_rolled_back)
                } else {
                    String::new()
                },
                match r.backup.as_ref().and_then(|b| b.get("file")) {
                    Some(f) => format!("; followed backup {f}"),
                    None => String::new(),
                },
                match (&r.waiting, &r.waiting_since) {
                    (Some(why), since) =>
                        format!("; WAITING since {}: {why}", since.as_deref().unwrap_or("?")),
                    _ => String::new(),
                }
            ));
        }
        out.push_str(&format!(
            "rows still under the source prefix: {}",
            self.rows_left
        ));
        if let Some(eta) = self.eta_secs {
            out.push_str(&format!(" (about {:.0} s at the last run's rate)", eta));
        }
        out.push('\n');
        out
    }
}

/// `relocator status`.
pub async fn status(cfg: &JobConfig) -> Result<Status> {
    let pool = db::pool(&cfg.database_url, 1, None)?;
    let client = db::connect_checked(&pool, &cfg.database_url).await?;
    let table = TableInfo::resolve(&client, cfg).await?;
    let left: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {} AS t WHERE {}",
                table.qualified,
                table.reference.selects(crate::s3::Side::Source, "t")
            ),
            &[],
        )
        .await
        .context("counting the rows left")?
        .get(0);
    if !ledger::exists(&client).await? {
        return Ok(Status {
            runs: Vec::new(),
            rows_left: left,
            eta_secs: None,
        });
    }
    let rows = client
        .query(
            "SELECT r.run_id, r.status, r.started_at::text, r.updated_at::text,
                    (SELECT count(*) FROM relocator.leases l WHERE l.run_id = r.run_id AND l.done),
                    (SELECT count(*) FROM relocator.leases l WHERE l.run_id = r.run_id AND NOT l.done),
                    -- rows, not references: a row holding several is one
                    (SELECT count(DISTINCT m.row_id) FROM relocator.moves m WHERE m.run_id = r.run_id),
                    (SELECT count(*) FROM relocator.moves m
                      WHERE m.run_id = r.run_id AND m.cleaned_at IS NULL),
                    GREATEST(extract(epoch FROM r.updated_at - r.started_at), 0.001)::float8,
                    (SELECT count(DISTINCT m.row_id) FROM relocator.moves m
                      WHERE m.run_id = r.run_id AND m.rollback = 'restored'),
                    r.backup,
                    -- (read through jsonb: a ledger an older relocator made has no such
                    -- columns yet)
                    -- a wait last seen long ago is a process that died waiting
                    w.waiting,
                    w.since
               FROM relocator.runs r
               LEFT JOIN LATERAL (
                    SELECT to_jsonb(r) ->> 'waiting' AS waiting,
                           (to_jsonb(r) ->> 'waiting_since')::timestamptz::text AS since
                     WHERE (to_jsonb(r) ->> 'waiting_seen')::timestamptz
                           > now() - interval '30 seconds') w ON true
              WHERE r.job = $1
              ORDER BY r.run_id DESC",
            &[&cfg.fingerprint()],
        )
        .await
        .context("reading the job's runs")?;
    let runs: Vec<RunStatus> = rows
        .into_iter()
        .map(|r| {
            let moved: i64 = r.get(6);
            let secs: f64 = r.get(8);
            RunStatus {
                run_id: r.get(0),
                status: r.get(1),
                started_at: r.get(2),
                updated_at: r.get(3),
                leases_done: r.get(4),
                leases_open: r.get(5),
                rows_moved: moved,
                cleanups_pending: r.get(7),
                rows_rolled_back: r.get(9),
                backup: r.get(10),
                rows_per_sec: moved as f64 / secs,
                waiting: r.get(11),
                waiting_since: r.get(12),
            }
        })
        .collect();
    let eta_secs = runs
        .first()
        .filter(|r| r.rows_per_sec > 0.0 && left > 0)
        .map(|r| left as f64 / r.rows_per_sec);
    Ok(Status {
        runs,
        rows_left: left,
        eta_secs,
    })
}
