//! The commit stage: one statement per batch rewrites the rows, guarded by their old
//! value, writes their ledger rows and the lease's progress — atomically.
//!
//! Invariant enforced here: *a row the application changed meanwhile is not rewritten* —
//! the UPDATE matches `id` **and** the old path (compare-and-swap); under READ COMMITTED
//! a concurrent update makes PostgreSQL re-check that condition on the newest row version.
//! And a batch is committed only by its lease's current owner: the lease check is part of
//! the same statement, so a worker that lost its lease rewrites nothing.

use std::collections::HashMap;

use anyhow::{Context, Result};

use crate::db::{Queries, TableInfo};
use crate::plan::Move;

/// Where the batch's rows go and what the ledger needs to know about them.
pub struct CommitBatch<'a> {
    pub run_id: i64,
    pub lease_id: i64,
    pub owner: &'a str,
    pub table: &'a TableInfo,
    pub src_bucket: &'a str,
    pub dst_bucket: &'a str,
    /// Rows whose destination object is ready, with whether relocator created it.
    pub moves: Vec<(&'a Move, bool)>,
    /// The lease's new progress position (the batch's last id).
    pub last_id: &'a str,
    /// This batch is the lease's last: mark it done in the same statement.
    pub ends_lease: bool,
}

/// What the commit did.
#[derive(Debug)]
pub enum Committed {
    /// Row id → ledger move id for the rows actually rewritten; the others were changed
    /// by the application.
    Rows(HashMap<String, i64>),
    /// This worker no longer owns the lease (another took it over): nothing was written.
    LeaseLost,
}

/// Commit the batch in one statement — a single statement is one transaction in
/// PostgreSQL, and it costs one round trip instead of three with BEGIN/COMMIT.
pub async fn commit_batch(
    client: &deadpool_postgres::Client,
    q: &Queries,
    b: &CommitBatch<'_>,
) -> Result<Committed> {
    let ids: Vec<&str> = b.moves.iter().map(|(m, _)| m.row.id.as_str()).collect();
    let olds: Vec<&str> = b.moves.iter().map(|(m, _)| m.row.path.as_str()).collect();
    let news: Vec<&str> = b.moves.iter().map(|(m, _)| m.dst_key.as_str()).collect();
    let copied: Vec<bool> = b.moves.iter().map(|(_, c)| *c).collect();
    let stmt = client
        .prepare_cached(&q.commit)
        .await
        .context("preparing the batch rewrite")?;
    crate::db::rt(1);
    let rows = client
        .query(
            &stmt,
            &[
                &ids,
                &olds,
                &news,
                &copied,
                &b.run_id,
                &b.table.display,
                &b.src_bucket,
                &b.dst_bucket,
                &b.last_id,
                &b.lease_id,
                &b.owner,
                &b.ends_lease,
            ],
        )
        .await
        .context("rewriting the batch's rows")?;
    if rows.is_empty() {
        return Ok(Committed::LeaseLost);
    }
    Ok(Committed::Rows(
        rows.into_iter()
            .filter_map(|r| {
                let row: Option<String> = r.get(2);
                let mv: Option<i64> = r.get(1);
                row.zip(mv)
            })
            .collect(),
    ))
}
