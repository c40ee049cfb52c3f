//! The commit stage: one transaction per batch rewrites the rows, guarded by their old
//! value, writes their ledger rows and the keyset position, and commits.
//!
//! Invariant enforced here: *a row the application changed meanwhile is not rewritten* —
//! the UPDATE matches `id` **and** the old path (compare-and-swap); under READ COMMITTED
//! a concurrent update makes PostgreSQL re-check that condition on the newest row version.

use std::collections::HashMap;

use anyhow::{Context, Result};

use crate::db::{Queries, TableInfo};
use crate::plan::Move;

/// Where the batch's rows go and what the ledger needs to know about them.
pub struct CommitBatch<'a> {
    pub run_id: i64,
    pub table: &'a TableInfo,
    pub src_bucket: &'a str,
    pub dst_bucket: &'a str,
    /// Rows whose destination object is ready, with whether relocator created it.
    pub moves: Vec<(&'a Move, bool)>,
    /// Keyset position to record (the batch's last id), or None to keep the old one.
    pub last_id: Option<&'a str>,
}

/// Commit the batch. Returns row id → ledger move id for the rows actually rewritten;
/// the others were changed by the application.
pub async fn commit_batch(
    client: &mut tokio_postgres::Client,
    q: &Queries,
    b: &CommitBatch<'_>,
) -> Result<HashMap<String, i64>> {
    let ids: Vec<&str> = b.moves.iter().map(|(m, _)| m.row.id.as_str()).collect();
    let olds: Vec<&str> = b.moves.iter().map(|(m, _)| m.row.path.as_str()).collect();
    let news: Vec<&str> = b.moves.iter().map(|(m, _)| m.dst_key.as_str()).collect();
    let copied: Vec<bool> = b.moves.iter().map(|(_, c)| *c).collect();
    let tx = client
        .transaction()
        .await
        .context("starting the batch transaction")?;
    let rows = tx
        .query(
            &q.commit,
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
            ],
        )
        .await
        .context("rewriting the batch's rows")?;
    tx.commit().await.context("committing the batch")?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get::<_, String>(1), r.get::<_, i64>(0)))
        .collect())
}
