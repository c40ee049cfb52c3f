//! The commit stage: one statement per batch rewrites the rows, guarded by their old
//! value, writes their ledger rows and the lease's progress — atomically.
//!
//! Invariant enforced here: *a row the application changed meanwhile is not rewritten* —
//! the UPDATE matches `id` **and** the old path (compare-and-swap); under READ COMMITTED
//! a concurrent update makes PostgreSQL re-check that condition on the newest row version.
//! And a batch is committed only by its lease's current owner: the lease check is part of
//! the same statement, so a worker that lost its lease rewrites nothing.
//!
//! The ledger also records whether relocator made each destination object (`copied`):
//! rollback and take-backs remove only those. A batch killed (or whose lease was taken
//! over) between its copies and its commit leaves copies the next batch on those rows
//! finds already there; it counts such an object as relocator's when it was made after
//! the dead batch reserved its key (its Last-Modified against the reservation's time, to
//! the second; both clocks are assumed to agree within that).

use std::collections::HashMap;

use anyhow::{Context, Result};

use crate::db::{Queries, TableInfo};
use crate::pipeline::copy::Made;
use crate::pipeline::plan::Move;

/// Where the batch's rows go and what the ledger needs to know about them.
pub struct CommitBatch<'a> {
    pub run_id: i64,
    pub lease_id: i64,
    pub owner: &'a str,
    pub table: &'a TableInfo,
    pub src_bucket: &'a str,
    pub dst_bucket: &'a str,
    /// Rows whose destination object is ready, with whether relocator created it and
    /// the source ETag it was made from.
    pub moves: Vec<(&'a Move, &'a Made)>,
    /// The lease's new progress position (the batch's last id).
    pub last_id: &'a str,
    /// This batch is the lease's last: mark it done in the same statement.
    pub ends_lease: bool,
    /// The batch's destination reservations ([`crate::pipeline::cleanup::reserve`]), released in
    /// the same statement.
    pub holder: &'a str,
    /// Rows not to rewrite, with why (their copies are taken back): see
    /// [`crate::pipeline::checksum`].
    pub set_aside: &'a HashMap<String, String>,
    /// `--checksum-column`: row id → the checksum read before the commit, which the
    /// compare-and-swap guards too.
    pub checksums: &'a HashMap<String, Option<String>>,
}

/// What the commit did.
#[derive(Debug)]
pub enum Committed {
    /// (row id, source key, destination key) → the ledger's move for the references of
    /// the rows actually rewritten, and row id → why the table refused the rewrite
    /// (PostgreSQL's message and SQLSTATE); the other rows were changed by the
    /// application.
    Rows(HashMap<MoveKey, Moved>, HashMap<String, String>),
    /// This worker no longer owns the lease (another took it over): nothing was written.
    LeaseLost,
}

/// One reference of a row: (row id, source key, destination key).
pub type MoveKey = (String, String, String);

/// A row the commit rewrote, as its ledger entry records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub move_id: i64,
    /// relocator made the destination object: this batch's copy, or one an earlier
    /// attempt of the run noted before it was killed.
    pub copied: bool,
}

/// Commit the batch in one statement — a single statement is one transaction in
/// PostgreSQL, and it costs one round trip instead of three with BEGIN/COMMIT.
///
/// A row the table refuses (too long for the column, a CHECK, a unique index, a foreign
/// key, row-level security, a trigger that raises) fails the whole statement, and so does
/// a row the table stores with another value than the new key (a trigger rewriting NEW:
/// the statement checks what it stored). Then the rows' rewrites are tried one after
/// the other in a transaction that is rolled back ([`find_refused`]), the refused rows
/// are set aside with PostgreSQL's reason, and the batch is committed without them — so
/// one row never blocks its batch, and the refusal is that row's outcome.
pub async fn commit_batch(
    client: &deadpool_postgres::Client,
    q: &Queries,
    b: &CommitBatch<'_>,
) -> Result<Committed> {
    let rows: Vec<Rewrite<'_>> = b
        .moves
        .iter()
        .map(|(m, _)| Rewrite {
            checksum: b.checksums.get(&m.row.id).and_then(|c| c.as_deref()),
            ..Rewrite::from(*m)
        })
        .collect();
    let (sent, refused) = without_refused(client, &q.probe, &rows, b.set_aside.clone(), |tries| {
        send(client, q, b, tries)
    })
    .await?;
    Ok(match sent {
        Some(moved) => Committed::Rows(moved, refused),
        None => Committed::LeaseLost,
    })
}

/// One row's guarded rewrite: from the value it must still hold to the new one.
pub struct Rewrite<'a> {
    pub id: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    /// `--checksum-column`: the checksum the commit's compare-and-swap guards too, so
    /// that the probe for refused rows skips a row the commit would skip.
    pub checksum: Option<&'a str>,
}

impl<'a> From<&'a Move> for Rewrite<'a> {
    /// A move's rewrite: the row's value to its new one.
    fn from(m: &'a Move) -> Self {
        Rewrite {
            id: &m.row.id,
            from: &m.row.path,
            to: &m.new_value,
            checksum: None,
        }
    }
}

/// Send a batch's statement (`send`, given for each row of `rows` whether to try it),
/// without the rows `set_aside` names; when the table refuses a row's rewrite, find
/// every such row ([`find_refused`]) and send it again without them. Returns what the
/// statement returned, and row id → why it was not tried (`set_aside`'s reasons, then
/// the table's). Shared by the forward commit and rollback's rewrite back.
pub(crate) async fn without_refused<T, Fut>(
    client: &deadpool_postgres::Client,
    probe: &str,
    rows: &[Rewrite<'_>],
    set_aside: HashMap<String, String>,
    send: impl Fn(Vec<bool>) -> Fut,
) -> Result<(T, HashMap<String, String>)>
where
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    let mut refused = set_aside;
    loop {
        let tries = rows.iter().map(|r| !refused.contains_key(r.id)).collect();
        match send(tries).await {
            Ok(sent) => return Ok((sent, refused)),
            Err(e) if refusal(&e).is_some() => {
                let found = find_refused(client, probe, rows, &refused).await?;
                if found.is_empty() {
                    // No single row is refused: not a per-row problem after all.
                    return Err(e).context("rewriting the batch's rows");
                }
                tracing::warn!(rows = found.len(), "the table refused some rows' rewrite");
                refused.extend(found);
            }
            Err(e) => return Err(e).context("rewriting the batch's rows"),
        }
    }
}

/// `plan`: the rows of a batch the table would refuse, found without changing anything:
/// the batch's rewrites are tried in one statement inside a transaction that is rolled
/// back (row locks for that statement; triggers fire and are rolled back with it), and
/// only when the table refuses one, each row alone ([`find_refused`]). Row id → why.
pub async fn refused_rewrites(
    client: &deadpool_postgres::Client,
    q: &Queries,
    rows: &[Rewrite<'_>],
) -> Result<HashMap<String, String>> {
    if rows.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.id).collect();
    let olds: Vec<&str> = rows.iter().map(|r| r.from).collect();
    let news: Vec<&str> = rows.iter().map(|r| r.to).collect();
    let stmt = client.prepare_cached(&q.probe_batch).await?;
    client
        .batch_execute("BEGIN; SET CONSTRAINTS ALL IMMEDIATE")
        .await?;
    crate::db::rt(3);
    let tried = client.query(&stmt, &[&ids, &olds, &news]).await;
    client.batch_execute("ROLLBACK").await?;
    match tried {
        Ok(written) => Ok(written
            .into_iter()
            .filter_map(|r| {
                let (id, new, got): (String, String, Option<String>) =
                    (r.get(0), r.get(1), r.get(2));
                (got.as_deref() != Some(new.as_str())).then(|| (id, stored_otherwise(&got, &new)))
            })
            .collect()),
        Err(e) if refusal(&e).is_some() => {
            find_refused(client, &q.probe, rows, &HashMap::new()).await
        }
        Err(e) => Err(e).context("trying the batch's rewrites"),
    }
}

/// Why a row is refused when the table stored another value than relocator wrote.
fn stored_otherwise(got: &Option<String>, want: &str) -> String {
    format!(
        "PostgreSQL stored {got:?} instead of {want:?} (a trigger rewrote the value); the row \
         was left as it was"
    )
}

/// PostgreSQL's reason when an error is a refusal of the row's new value by the table
/// (SQLSTATE classes 22 data, 23 integrity, 44 check option, P0 a raising trigger, and
/// 42501, which row-level security's WITH CHECK raises), not a fault of the session.
fn refusal(e: &tokio_postgres::Error) -> Option<String> {
    let db = e.as_db_error()?;
    let code = db.code().code();
    let per_row = ["22", "23", "44", "P0"].iter().any(|c| code.starts_with(c)) || code == "42501";
    per_row.then(|| {
        format!(
            "PostgreSQL refused the rewrite: {} (SQLSTATE {code})",
            db.message()
        )
    })
}

/// Try the rows' rewrites one after the other, in one transaction rolled back at the end
/// (a savepoint per row): the rows the table refuses, with why. A row the table takes
/// stays written for the rows after it, as in the batch's statement, so a row that
/// conflicts only with another row of the batch (two rows sharing a key, whose new keys
/// a unique index would make duplicates) is found too: the later one.
async fn find_refused(
    client: &deadpool_postgres::Client,
    probe: &str,
    rows: &[Rewrite<'_>],
    known: &HashMap<String, String>,
) -> Result<HashMap<String, String>> {
    let probe = client.prepare_cached(probe).await?;
    // A deferred constraint is checked at the commit: here, at each row.
    client
        .batch_execute("BEGIN; SET CONSTRAINTS ALL IMMEDIATE")
        .await?;
    let mut found = HashMap::new();
    let result = async {
        // A row holding several references comes once per reference: probed once.
        let mut seen = std::collections::HashSet::new();
        for r in rows
            .iter()
            .filter(|r| !known.contains_key(r.id) && seen.insert(r.id))
        {
            client.batch_execute("SAVEPOINT probe").await?;
            crate::db::rt(2);
            let refused = match client
                .query_opt(&probe, &[&r.id, &r.from, &r.to, &r.checksum])
                .await
            {
                // A trigger stored something else than the new key.
                Ok(Some(row)) if row.get::<_, Option<String>>(0).as_deref() != Some(r.to) => {
                    Some(stored_otherwise(&row.get(0), r.to))
                }
                Ok(_) => None,
                Err(e) => match refusal(&e) {
                    Some(why) => Some(why),
                    None => return Err(e),
                },
            };
            match refused {
                Some(why) => {
                    found.insert(r.id.to_owned(), why);
                    client.batch_execute("ROLLBACK TO SAVEPOINT probe").await?;
                }
                None => client.batch_execute("RELEASE SAVEPOINT probe").await?,
            }
        }
        Ok(())
    }
    .await;
    let ended = client.batch_execute("ROLLBACK").await;
    result.context("finding the rows the table refuses")?;
    ended?;
    Ok(found)
}

/// The batch's statement; `Ok(None)` when the lease is not this worker's any more.
async fn send(
    client: &deadpool_postgres::Client,
    q: &Queries,
    b: &CommitBatch<'_>,
    tries: Vec<bool>,
) -> Result<Option<HashMap<MoveKey, Moved>>, tokio_postgres::Error> {
    let ids: Vec<&str> = b.moves.iter().map(|(m, _)| m.row.id.as_str()).collect();
    let olds: Vec<&str> = b.moves.iter().map(|(m, _)| m.src_key.as_str()).collect();
    let news: Vec<&str> = b.moves.iter().map(|(m, _)| m.dst_key.as_str()).collect();
    let old_values: Vec<&str> = b.moves.iter().map(|(m, _)| m.row.path.as_str()).collect();
    let new_values: Vec<&str> = b.moves.iter().map(|(m, _)| m.new_value.as_str()).collect();
    let copied: Vec<bool> = b.moves.iter().map(|(_, c)| c.created).collect();
    let etags: Vec<&str> = b.moves.iter().map(|(_, c)| c.src_etag.as_str()).collect();
    let dst_etags: Vec<&str> = b.moves.iter().map(|(_, c)| c.dst_etag.as_str()).collect();
    let sizes: Vec<i64> = b.moves.iter().map(|(_, c)| c.size).collect();
    let checksums: Vec<Option<&str>> = b
        .moves
        .iter()
        .map(|(m, _)| b.checksums.get(&m.row.id).and_then(|c| c.as_deref()))
        .collect();
    let versions: Vec<Option<&str>> = b
        .moves
        .iter()
        .map(|(_, c)| c.src_version.as_deref())
        .collect();
    let stmt = client.prepare_cached(&q.commit).await?;
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
                &etags,
                &tries,
                &b.holder,
                &dst_etags,
                &sizes,
                &versions,
                &checksums,
                &old_values,
                &new_values,
            ],
        )
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        rows.into_iter()
            .filter_map(|r| {
                let row: Option<String> = r.get(2);
                let move_id: Option<i64> = r.get(1);
                let copied: Option<bool> = r.get(3);
                let (old, new): (Option<String>, Option<String>) = (r.get(4), r.get(5));
                let this = row.zip(old).zip(new).map(|((r, o), n)| (r, o, n));
                this.zip(move_id.zip(copied))
                    .map(|(this, (move_id, copied))| (this, Moved { move_id, copied }))
            })
            .collect(),
    ))
}
