//! The cleanup stage: delete the sources of committed moves, and take back copies whose
//! row the application changed.
//!
//! Invariant enforced here, in [`delete_unreferenced`] and nowhere else: *an object a row
//! pointed at is deleted only after the row rewrite that stops referencing it has
//! committed, only when no row references that key — rows being written at that moment
//! included — and only while it still is the object relocator copied*. Callers pass only
//! ledger entries, which exist only for committed rewrites; the reference check runs
//! after that commit, under a lock that waits for the table's writers in flight; the
//! object's ETag is compared with the one the copy was made from. A rollback and the
//! take-back of unused copies go through the same function, on the same terms.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use futures::{stream, StreamExt, TryStreamExt};
use tracing::{info, warn};

use crate::db::Queries;
use crate::report::Counters;
use crate::s3::{Endpoint, S3Error, Side, DELETE_BATCH, S3};

/// A committed move whose source has not been dealt with yet (a ledger row).
#[derive(Debug, Clone)]
pub struct Pending {
    pub move_id: i64,
    pub row_id: String,
    pub old_path: String,
    pub new_path: String,
    pub src_bucket: String,
    /// The source's ETag when it was copied (None in ledgers from before it was kept).
    pub src_etag: Option<String>,
    /// The source's version when it was copied, in a versioned bucket.
    pub src_version: Option<String>,
}

/// A key to delete, with the ETag it must still have (where the server checks it).
type Doomed = (String, Option<String>);

/// One DeleteObjects answer: bucket, keys sent, keys S3 did not delete (with why).
type DeleteAnswer<'a> = (&'a str, usize, Vec<(String, String)>);

/// Which keys among `keys`, objects in `bucket`, some row of the table still references.
pub async fn still_referenced(
    client: &deadpool_postgres::Client,
    q: &Queries,
    bucket: &str,
    keys: &[&str],
) -> Result<HashSet<String>> {
    if keys.is_empty() {
        return Ok(HashSet::new());
    }
    let stmt = client.prepare_cached(&q.referenced).await?;
    crate::db::rt(1);
    let param = q.reference.param(bucket);
    let rows = if q.reference.takes_param() {
        client.query(&stmt, &[&keys, &param]).await
    } else {
        client.query(&stmt, &[&keys]).await
    };
    let rows = rows.context("checking which source keys rows still reference")?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// Delete the sources of these committed moves where no row references them any more
/// and they are still the objects copied, then mark the ledger. Keys S3 refuses to
/// delete stay pending (a rerun retries them). Returns the moves this call finished,
/// with their outcome (see [`delete_unreferenced`]).
pub async fn delete_sources(
    db: &deadpool_postgres::Client,
    s3c: &S3,
    q: &Queries,
    pending: &[Pending],
    counters: &mut Counters,
) -> Result<HashMap<i64, Cleaned>> {
    let items: Vec<Unreferenced<'_>> = pending
        .iter()
        .map(|p| Unreferenced {
            move_id: p.move_id,
            bucket: &p.src_bucket,
            key: &p.old_path,
            etag: p.src_etag.as_deref(),
            version: p.src_version.as_deref(),
        })
        .collect();
    delete_unreferenced(
        db,
        s3c,
        Side::Source,
        q,
        &items,
        Some(MARK_CLEANED),
        counters,
    )
    .await
}

/// Marks a forward move's source as dealt with.
const MARK_CLEANED: &str = "UPDATE relocator.moves m SET cleaned_at = now(), cleanup = u.outcome
                              FROM unnest($1::bigint[], $2::text[]) AS u(move_id, outcome)
                             WHERE m.move_id = u.move_id AND m.cleaned_at IS NULL
                         RETURNING m.move_id";

/// Marks an undone move's new object as dealt with ([`crate::commands::rollback`]).
pub const MARK_ROLLBACK_CLEANED: &str =
    "UPDATE relocator.moves m SET rollback_cleaned_at = now(), rollback_cleanup = u.outcome
       FROM unnest($1::bigint[], $2::text[]) AS u(move_id, outcome)
      WHERE m.move_id = u.move_id AND m.rollback_cleaned_at IS NULL
  RETURNING m.move_id";

/// Marks a take-back (an unused copy) as dealt with.
const MARK_TAKEN_BACK: &str =
    "UPDATE relocator.take_backs t SET done_at = now(), outcome = u.outcome
       FROM unnest($1::bigint[], $2::text[]) AS u(id, outcome)
      WHERE t.take_back_id = u.id AND t.done_at IS NULL
  RETURNING t.take_back_id";

/// A key that is to go once no row references it: the source of a committed move, the
/// new object of a committed undo, or an unused copy.
#[derive(Debug, Clone, Copy)]
pub struct Unreferenced<'a> {
    /// The ledger entry the outcome is marked on (move or take-back id).
    pub move_id: i64,
    pub bucket: &'a str,
    pub key: &'a str,
    /// The object must still have this ETag (it is then the object relocator copied);
    /// None: no identity is known, the key alone decides.
    pub etag: Option<&'a str>,
    /// With the ETag, in a versioned bucket: the object must still be this version.
    pub version: Option<&'a str>,
}

/// Advisory lock class for a bucket's reservations: a reservation takes it shared, a
/// delete exclusively (keyed by `hashtext(bucket)`).
const RESERVE_LOCK_CLASS: i32 = 0x7265_6c72;

/// Reserve the destination keys a batch is about to rely on (copy to, or find identical
/// and point rows at), before it looks at them; its commit releases them. A delete that
/// began before waits for nothing: the reservation waits for it to end (so the batch then
/// looks at what is left); a delete that begins after sees the reservation and keeps the
/// key. Without this a copy the batch relies on could be taken back, or deleted as
/// another job's source, between the batch's look and its commit.
pub async fn reserve(
    db: &deadpool_postgres::Client,
    bucket: &str,
    keys: &[&str],
    holder: &str,
    lease_id: i64,
) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    crate::db::rt(1);
    db.execute(
        "WITH l AS MATERIALIZED (SELECT pg_advisory_xact_lock_shared($1, hashtext($2)))
         INSERT INTO relocator.reservations (bucket, key, holder, lease_id)
         SELECT $2, k, $4, $5 FROM l, unnest($3::text[]) AS k
         ON CONFLICT DO NOTHING",
        &[&RESERVE_LOCK_CLASS, &bucket, &keys, &holder, &lease_id],
    )
    .await
    .context("reserving the batch's destination keys")?;
    Ok(())
}

/// A batch's copies as it notes them before making them (and the ones it did not make
/// after all), on its reservations of their keys: `creating`. Copies ask at once, and
/// each statement marks every key asked for meanwhile, so a batch of copies costs a few
/// statements, not one per copy; each copy waits for its own key's statement.
///
/// Why: a batch killed (or whose lease was taken over) between its copies and their
/// commit leaves them at the destination, and the next batch on those rows finds them
/// there. Its commit counts such an object as relocator's (`copied`) where a reservation
/// of the same run notes it as being created (see `Queries::commit`), so rollback and
/// take-backs remove it; an object the application put there never is.
pub struct BatchIntents<'a> {
    db: &'a deadpool_postgres::Client,
    bucket: &'a str,
    holder: &'a str,
    queue: std::sync::Mutex<IntentQueue>,
    /// One statement at a time.
    writer: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct IntentQueue {
    /// (key, creating, source ETag) asked for since the last statement.
    keys: Vec<(String, bool, Option<String>)>,
    /// Keys noted as being created (up front, [`BatchIntents::creating_all`], or by their
    /// copy): noting one again, or withdrawing one never noted, writes nothing.
    noted: HashSet<String>,
    /// Statements sent so far; an entry queued while `sent` was n goes with statement n+1.
    sent: u64,
    failed: bool,
}

impl<'a> BatchIntents<'a> {
    pub fn new(db: &'a deadpool_postgres::Client, bucket: &'a str, holder: &'a str) -> Self {
        BatchIntents {
            db,
            bucket,
            holder,
            queue: std::sync::Mutex::new(IntentQueue::default()),
            writer: tokio::sync::Mutex::new(()),
        }
    }

    /// Phase 1: the keys the batch's listing found free, noted in one statement before any
    /// copy (each copy still looks again right before it copies, and withdraws the note
    /// if it does not copy after all).
    pub async fn creating_all(&self, keys: &[(&str, &str)]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mine = {
            let mut q = self.lock();
            for (key, etag) in keys {
                q.noted.insert((*key).to_owned());
                q.keys
                    .push(((*key).to_owned(), true, Some((*etag).to_owned())));
            }
            q.sent
        };
        self.send(mine).await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IntentQueue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn note(&self, key: &str, creating: bool, src_etag: Option<&str>) -> Result<()> {
        let mine = {
            let mut q = self.lock();
            // Noted already, or never noted: nothing to write.
            let changes = if creating {
                q.noted.insert(key.to_owned())
            } else {
                q.noted.remove(key)
            };
            if !changes {
                return Ok(());
            }
            q.keys
                .push((key.to_owned(), creating, src_etag.map(str::to_owned)));
            q.sent
        };
        self.send(mine).await
    }

    /// Wait until what was queued while `mine` statements were sent is written: by an
    /// earlier caller's statement, or by this one's.
    async fn send(&self, mine: u64) -> Result<()> {
        let _writing = self.writer.lock().await;
        let keys = {
            let mut q = self.lock();
            anyhow::ensure!(!q.failed, "noting the batch's copies in the ledger failed");
            if q.sent > mine {
                return Ok(()); // sent with an earlier statement
            }
            q.sent += 1;
            std::mem::take(&mut q.keys)
        };
        let ks: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let creating: Vec<bool> = keys.iter().map(|k| k.1).collect();
        let etags: Vec<Option<&str>> = keys.iter().map(|k| k.2.as_deref()).collect();
        crate::db::rt(1);
        let sent = self
            .db
            .execute(
                "UPDATE relocator.reservations r SET creating = u.creating, src_etag = u.etag
                   FROM unnest($3::text[], $4::bool[], $5::text[]) AS u(key, creating, etag)
                  WHERE r.bucket = $1 AND r.holder = $2 AND r.key = u.key",
                &[&self.bucket, &self.holder, &ks, &creating, &etags],
            )
            .await
            .context("noting the batch's copies on its reservations");
        if sent.is_err() {
            self.lock().failed = true;
        }
        sent.map(|_| ())
    }
}

impl crate::pipeline::copy::Intents for BatchIntents<'_> {
    fn creating<'b>(
        &'b self,
        dst_key: &'b str,
        src_etag: &'b str,
    ) -> crate::pipeline::copy::BoxFuture<'b> {
        Box::pin(self.note(dst_key, true, Some(src_etag)))
    }

    fn not_made<'b>(&'b self, dst_key: &'b str) -> crate::pipeline::copy::BoxFuture<'b> {
        Box::pin(self.note(dst_key, false, None))
    }
}

/// Reservations of batches whose lease is done are void (their commit or a taker's
/// finished the lease), and so are all those of `runs` (being rolled back: no batch of
/// theirs is in flight). Drop them; a copy one of them noted as being created becomes a
/// take-back of its run (removed where nothing references it, see `finish_listed`).
pub async fn void_reservations(db: &deadpool_postgres::Client, runs: &[i64]) -> Result<()> {
    crate::db::rt(1);
    db.execute(
        "WITH void AS (
             DELETE FROM relocator.reservations r USING relocator.leases l
              WHERE l.lease_id = r.lease_id AND (l.done OR l.run_id = ANY ($1))
          RETURNING l.run_id, r.bucket, r.key, r.src_etag, r.creating
         )
         INSERT INTO relocator.take_backs (run_id, dst_bucket, dst_key, src_etag)
         SELECT DISTINCT ON (run_id, bucket, key) run_id, bucket, key, src_etag
           FROM void WHERE creating
         ON CONFLICT DO NOTHING",
        &[&runs],
    )
    .await
    .context("dropping void reservations")?;
    Ok(())
}

/// Keys among `keys` in `bucket` that rows of another table were moved onto (a move in
/// the ledger, not rolled back).
async fn moved_onto_by_others(
    db: &deadpool_postgres::Client,
    q: &Queries,
    bucket: &str,
    keys: &[&str],
) -> Result<HashSet<String>> {
    if keys.is_empty() {
        return Ok(HashSet::new());
    }
    crate::db::rt(1);
    let rows = db
        .query(
            "SELECT DISTINCT new_path FROM relocator.moves
              WHERE dst_bucket = $1 AND new_path = ANY ($2::text[]) AND table_name <> $3
                AND rolled_back_at IS NULL",
            &[&bucket, &keys, &q.table],
        )
        .await
        .context("checking which keys other tables' rows were moved onto")?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// Keys among `keys` in `bucket` some batch in flight has reserved (its lease is not
/// done). Called under the bucket's exclusive reservation lock.
async fn reserved(
    db: &deadpool_postgres::Client,
    bucket: &str,
    keys: &[&str],
) -> Result<HashSet<String>> {
    crate::db::rt(1);
    let rows = db
        .query(
            "SELECT DISTINCT r.key FROM relocator.reservations r
               JOIN relocator.leases l ON l.lease_id = r.lease_id
              WHERE NOT l.done AND r.bucket = $1 AND r.key = ANY ($2::text[])",
            &[&bucket, &keys],
        )
        .await
        .context("checking which keys a batch in flight relies on")?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// How long the cleanup waits for the table's writers in flight before it lets them go
/// on and tries again: a queued SHARE lock also holds up writers that come after it.
const WRITERS_WAIT: &str = "2s";
/// Tries at the lock before the cleanup gives up (exit 1; the ledger keeps the moves
/// pending and a rerun finishes them).
const WRITERS_TRIES: u32 = 30;

/// The one place relocator deletes an object a row pointed at or could point at. In one
/// transaction:
///
/// 1. `LOCK TABLE … IN SHARE MODE` waits for every transaction writing the table to end
///    (an INSERT of a row referencing the key that has not committed yet included) and
///    keeps new writers out;
/// 2. the reference check then sees every row there is;
/// 3. each key with a known identity is looked at (HEAD, or a listing of their range):
///    one that is gone or has another ETag is not relocator's copy any more (the
///    application replaced it) and is kept, marked `changed` — looked at here, right
///    before the delete, so that nothing the application uploads while the lock is waited
///    for or the check runs is taken for the copy;
/// 4. the keys no row references are deleted; the ledger is marked (`deleted` |
///    `still_referenced` | `changed`); COMMIT lets the writers go on.
///
/// The application's writes to the table pause for that long: one reference check, one
/// look and one round of DeleteObjects.
///
/// Keys S3 refuses to delete stay unmarked, so a rerun retries them. An entry another
/// process marked first is left to it. Returns what this call marked, entry id → outcome
/// (`deleted` | `still_referenced` | `changed` | `gone`; all of them without `mark`).
#[allow(clippy::too_many_arguments)]
pub async fn delete_unreferenced(
    db: &deadpool_postgres::Client,
    s3c: &S3,
    side: Side,
    q: &Queries,
    items: &[Unreferenced<'_>],
    mark: Option<&str>,
    counters: &mut Counters,
) -> Result<HashMap<i64, Cleaned>> {
    if items.is_empty() {
        return Ok(HashMap::new());
    }
    let (mut tries, mut unanswered) = (0, 0);
    // Keys an unanswered delete was sent for: found gone afterwards, relocator deleted them.
    let mut sent: HashSet<String> = HashSet::new();
    loop {
        tries += 1;
        // Looked at inside the lock, after the reference check and right before the
        // delete, so that a replacement uploaded while the lock was waited for (or the
        // check ran) is seen: the window left is the look and the delete; on servers that
        // honour the ETag in DeleteObjects, none.
        // Every request from the look to the last delete paid for now, so that no
        // `--max-rps` wait falls between them.
        let ep = s3c.side(side).prepaid(requests_upto(items)).await;
        let mut seen = Look {
            found: Looked::default(),
            s3c,
            side,
            sent: &sent,
        };
        db.batch_execute(&format!("BEGIN; SET LOCAL lock_timeout = '{WRITERS_WAIT}'"))
            .await
            .context("starting the cleanup's transaction")?;
        let r = delete_locked(db, &ep, q, items, &mut seen, mark, counters).await;
        let looked = seen.found;
        let end = if r.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let ended = db.batch_execute(end).await;
        if let Ok((_, locked_at)) = &r {
            let held = locked_at.elapsed().as_millis() as u64;
            counters.writers_paused_ms_max = counters.writers_paused_ms_max.max(held);
            counters.writers_paused_ms_total += held;
        }
        match r {
            Ok((marked, _)) => {
                ended.context("committing the cleanup's ledger marks")?;
                return Ok(marked);
            }
            Err(Locked::Busy) if tries < WRITERS_TRIES => {
                info!("the application kept writing the table; the cleanup tries again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(Locked::Busy) => {
                return Err(anyhow!(
                    "the table was not free of writing transactions for {WRITERS_WAIT} in \
                     {WRITERS_TRIES} tries, so no source could be safely deleted; the ledger \
                     keeps them pending: rerun when the application's long transactions end"
                ))
            }
            // A DeleteObjects went unanswered (sent once: the SDK does not retry it on a
            // look gone stale). Its marks are rolled back; the next try looks again, and
            // finds gone what it did delete.
            Err(Locked::Unanswered(e)) if unanswered < s3c.side(side).max_attempts() => {
                unanswered += 1;
                sent.extend(
                    items
                        .iter()
                        .filter(|p| !looked.changed.contains(p.key) && !looked.gone.contains(p.key))
                        .map(|p| p.key.to_owned()),
                );
                warn!(error = %format!("{e:#}"), "a delete went unanswered; the cleanup looks again");
                tokio::time::sleep(crate::s3::backoff(unanswered)).await;
            }
            Err(Locked::Unanswered(e) | Locked::Failed(e)) => return Err(e),
        }
    }
}

/// Keys looked at, then deleted, together (one `DeleteObjects` each): a key's look is
/// never older than the time its group takes to be looked at (one listing page, or
/// rounds of 16 HEADs).
const LOOKED_TOGETHER: usize = DELETE_BATCH;

/// The cleanup's look at its keys, taken inside the lock, and what it needs.
struct Look<'a> {
    found: Looked,
    s3c: &'a S3,
    side: Side,
    /// Keys an unanswered delete was sent for (found gone: relocator deleted them).
    sent: &'a HashSet<String>,
}

/// What went wrong inside the cleanup's locked transaction.
enum Locked {
    /// The table's writers did not finish within the lock timeout.
    Busy,
    /// A delete was not answered: it may or may not have been carried out.
    Unanswered(anyhow::Error),
    Failed(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Locked {
    fn from(e: E) -> Self {
        let e: anyhow::Error = e.into();
        let busy = e
            .chain()
            .filter_map(|c| c.downcast_ref::<tokio_postgres::Error>())
            .any(|pe| pe.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE));
        let unanswered = e
            .chain()
            .any(|c| matches!(c.downcast_ref::<S3Error>(), Some(S3Error::Unanswered(_))));
        if busy {
            Locked::Busy
        } else if unanswered {
            Locked::Unanswered(e)
        } else {
            Locked::Failed(e)
        }
    }
}

/// What the cleanup did with one entry, as the ledger records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleaned {
    Deleted,
    /// Some row references the key: kept.
    StillReferenced,
    /// Another object is at the key than the one copied (the application replaced it):
    /// kept.
    Changed,
    /// Nothing was at the key any more.
    Gone,
}

impl Cleaned {
    pub fn as_str(self) -> &'static str {
        match self {
            Cleaned::Deleted => "deleted",
            Cleaned::StillReferenced => "still_referenced",
            Cleaned::Changed => "changed",
            Cleaned::Gone => "gone",
        }
    }
}

/// The most S3 requests one try of a cleanup sends: a HEAD per distinct key whose
/// identity is known, and the DeleteObjects requests (per bucket, one per
/// [`LOOKED_TOGETHER`] keys).
fn requests_upto(items: &[Unreferenced<'_>]) -> usize {
    let heads: HashSet<(&str, &str)> = items
        .iter()
        .filter(|p| p.etag.is_some())
        .map(|p| (p.bucket, p.key))
        .collect();
    let buckets: HashSet<&str> = items.iter().map(|p| p.bucket).collect();
    heads.len() + items.len().div_ceil(LOOKED_TOGETHER) + buckets.len()
}

/// What a look at the keys with a known identity found.
#[derive(Default)]
struct Looked {
    /// Another object is at the key now (the application replaced it): kept.
    changed: HashSet<String>,
    /// Nothing is at the key any more: nothing to delete.
    gone: HashSet<String>,
    /// Of those, the keys relocator's own delete was sent for, unanswered: deleted.
    deleted: HashSet<String>,
}

/// Look at each key whose identity is known: is it still the object copied? A listing
/// of the keys' range confirms most of them where they lie close together in the bucket
/// ([`confirmed_by_listing`]); each one it does not confirm gets a HEAD.
async fn look(s3c: &S3, side: Side, ep: &Endpoint, items: &[Unreferenced<'_>]) -> Result<Looked> {
    let mut expect: HashMap<(&str, &str), Vec<&Unreferenced<'_>>> = HashMap::new();
    for p in items.iter().filter(|p| p.etag.is_some()) {
        expect.entry((p.bucket, p.key)).or_default().push(p);
    }
    // Under `--max-rps` a listing's later pages would wait for the rate between a key's
    // confirmation and its delete: the HEADs, paid for before the first, go out together.
    if !s3c.side(side).paced() {
        let confirmed = confirmed_by_listing(s3c, side, &expect).await?;
        expect.retain(|k, _| !confirmed.contains(k));
    }
    let found: Vec<(String, Option<bool>)> = stream::iter(expect)
        .map(|((bucket, key), etags)| async move {
            let now = ep
                .head(bucket, key)
                .await
                .map_err(anyhow::Error::from)
                .with_context(|| format!("looking at s3://{bucket}/{key} before deleting it"))?;
            let same = now.map(|o| {
                etags
                    .iter()
                    .all(|p| p.etag.is_some_and(|e| o.is(e, p.version)))
            });
            if same == Some(false) {
                warn!(bucket = %bucket, key = %key,
                      "the object is no longer the one relocator copied (replaced since): kept");
            }
            Ok::<_, anyhow::Error>((key.to_owned(), same))
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    let mut looked = Looked::default();
    for (key, same) in found {
        match same {
            Some(true) => {}
            Some(false) => {
                looked.changed.insert(key);
            }
            None => {
                looked.gone.insert(key);
            }
        }
    }
    Ok(looked)
}

/// Fewer keys than this to look at: HEADs cost less than a listing page.
const LIST_FROM_KEYS: usize = 32;
/// A full listing page holding fewer of the keys than this: they lie too far apart for
/// the listing to be cheaper than HEADs; the rest are HEADed. A page costs the server
/// about as much as 7 HEADs (Garage, SQLite metadata) to 40 (LMDB); see the README.
const LIST_MIN_HITS: usize = 50;

/// The keys a listing of their range finds still to be the object copied (ETag, and
/// version in a versioned bucket). Only a confirmation counts: a key the listing shows
/// changed, or does not show, is left to a HEAD. The listing starts after each bucket's
/// first key (a HEAD looks at that one) and stops at its last, or as soon as a full page
/// holds fewer than [`LIST_MIN_HITS`] of them.
async fn confirmed_by_listing<'a>(
    s3c: &S3,
    side: Side,
    expect: &HashMap<(&'a str, &'a str), Vec<&Unreferenced<'a>>>,
) -> Result<HashSet<(&'a str, &'a str)>> {
    let mut by_bucket: BTreeMap<&'a str, Vec<&'a str>> = BTreeMap::new();
    for (bucket, key) in expect.keys() {
        by_bucket.entry(bucket).or_default().push(key);
    }
    let mut confirmed = HashSet::new();
    for (bucket, mut keys) in by_bucket {
        if keys.len() < LIST_FROM_KEYS {
            continue;
        }
        keys.sort_unstable();
        let (first, last) = (keys[0], keys[keys.len() - 1]);
        let common = first
            .char_indices()
            .zip(last.chars())
            .find(|((_, a), b)| a != b)
            .map_or(first.len().min(last.len()), |((i, _), _)| i);
        let prefix = &first[..common];
        let wanted: HashSet<&'a str> = keys.iter().copied().collect();
        let mut listing = s3c.listing(side, bucket, prefix, Some(first.to_owned()));
        while let Some(page) = listing
            .page(1000)
            .await
            .map_err(anyhow::Error::from)
            .with_context(|| format!("listing s3://{bucket}/{prefix} before deleting"))?
        {
            let full = page.len() >= 1000;
            let past = page.last().is_some_and(|(k, _)| k.as_str() >= last);
            let mut hits = 0;
            for (key, now) in &page {
                let Some(k) = wanted.get(key.as_str()).copied() else {
                    continue;
                };
                hits += 1;
                if expect[&(bucket, k)]
                    .iter()
                    .all(|p| p.etag.is_some_and(|e| now.is(e, p.version)))
                {
                    confirmed.insert((bucket, k));
                }
            }
            if past || (full && hits < LIST_MIN_HITS) {
                break;
            }
        }
    }
    Ok(confirmed)
}

/// Inside the cleanup's transaction: wait for the writers, check references, delete,
/// mark.
async fn delete_locked(
    db: &deadpool_postgres::Client,
    ep: &Endpoint,
    q: &Queries,
    items: &[Unreferenced<'_>],
    seen: &mut Look<'_>,
    mark: Option<&str>,
    counters: &mut Counters,
) -> Result<(HashMap<i64, Cleaned>, Instant), Locked> {
    crate::db::rt(1);
    db.batch_execute(&q.lock_writers)
        .await
        .context("waiting for the table's writers in flight (LOCK TABLE … IN SHARE MODE)")?;
    let locked_at = Instant::now();
    // A column another process of a run on this table was given after this one started
    // (`--referenced-by`): this process does not look at it, so it deletes nothing.
    crate::db::rt(2);
    let remembered = crate::db::remembered_references(db, &q.table).await?;
    let unseen: Vec<&String> = remembered
        .iter()
        .filter(|c| !q.checked_columns.contains(c))
        .collect();
    if !unseen.is_empty() {
        return Err(Locked::Failed(anyhow!(
            "another process on {} was given --referenced-by {} after this one started, so \
             this one deleted nothing; rerun (the column is remembered now)",
            q.table,
            unseen
                .iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    // Row-level security turned on (or BYPASSRLS taken away) since the run started would
    // hide rows from the reference check: delete nothing.
    crate::db::rt(1);
    let hiding = crate::db::rls_hiding(db, &q.checked_tables).await?;
    if !hiding.is_empty() {
        return Err(Locked::Failed(crate::config::config_error(format!(
            "row-level security on {} may now hide rows from this role, so this cleanup \
                 deleted nothing (the ledger keeps it pending). Run as the table's owner or \
                 a role with BYPASSRLS, then rerun",
            hiding.join(", ")
        ))));
    }
    // Batches in flight: wait for reservations being made, then see every one there is.
    let mut buckets: Vec<&str> = items.iter().map(|p| p.bucket).collect();
    buckets.sort_unstable();
    buckets.dedup();
    crate::db::rt(1);
    db.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext(b)) FROM unnest($2::text[]) AS b",
        &[&RESERVE_LOCK_CLASS, &buckets],
    )
    .await
    .context("waiting for the batches reserving destination keys")?;
    let mut in_flight: HashSet<(&str, String)> = HashSet::new();
    for b in &buckets {
        let keys: Vec<&str> = items
            .iter()
            .filter(|p| p.bucket == *b)
            .map(|p| p.key)
            .collect();
        in_flight.extend(reserved(db, b, &keys).await?.into_iter().map(|k| (*b, k)));
    }
    // Bucket by bucket: with a service column, which rows may use an object depends on
    // its bucket (see crate::reference).
    let mut referenced: HashSet<(&str, String)> = HashSet::new();
    for b in &buckets {
        let keys: Vec<&str> = {
            let mut distinct = HashSet::new();
            items
                .iter()
                .filter(|p| p.bucket == *b && !in_flight.contains(&(p.bucket, p.key.to_owned())))
                .map(|p| p.key)
                .filter(|k| distinct.insert(*k))
                .collect()
        };
        referenced.extend(
            still_referenced(db, q, b, &keys)
                .await?
                .into_iter()
                .map(|k| (*b, k)),
        );
        // Rows of other tables that relocator moved onto a key rely on it too (another
        // job with the same destination found the object there): their references are
        // not in this table, but the ledger knows them.
        referenced.extend(
            moved_onto_by_others(db, q, b, &keys)
                .await?
                .into_iter()
                .map(|k| (*b, k)),
        );
    }
    let referenced_at = |p: &Unreferenced<'_>| referenced.contains(&(p.bucket, p.key.to_owned()));

    // The keys some row references stay; they are looked at too, so that a replaced one
    // is reported as such.
    let open = |p: &&Unreferenced<'_>| !in_flight.contains(&(p.bucket, p.key.to_owned()));
    let kept_ref: Vec<Unreferenced<'_>> = items
        .iter()
        .filter(open)
        .filter(|p| referenced_at(p))
        .copied()
        .collect();
    let mut found = look(seen.s3c, seen.side, ep, &kept_ref).await?;
    // The others, [`LOOKED_TOGETHER`] keys at a time: each group is looked at (is each
    // object still the one copied?) and, at once, deleted but for what changed, so that
    // a key's look is never older than its group's.
    let mut groups: Vec<(&str, Vec<Unreferenced<'_>>, usize)> = Vec::new();
    let mut group_of: HashMap<(&str, &str), usize> = HashMap::new();
    let mut by_bucket: BTreeMap<&str, Vec<&Unreferenced<'_>>> = BTreeMap::new();
    for p in items.iter().filter(open).filter(|p| !referenced_at(p)) {
        by_bucket.entry(p.bucket).or_default().push(p);
    }
    for (bucket, mut ps) in by_bucket {
        ps.sort_by_key(|p| p.key);
        for p in ps {
            let at = *group_of.entry((bucket, p.key)).or_insert_with(|| {
                match groups.last_mut() {
                    Some((b, _, n)) if *b == bucket && *n < LOOKED_TOGETHER => *n += 1,
                    _ => groups.push((bucket, Vec::new(), 1)),
                }
                groups.len() - 1
            });
            groups[at].1.push(*p);
        }
    }
    let (s3c, side) = (seen.s3c, seen.side);
    // Each group's look, and its delete's answer (or why it has none).
    type Group<'a> = (Looked, Result<DeleteAnswer<'a>>);
    let results: Vec<Result<Group<'_>>> = stream::iter(groups)
        .map(|(bucket, group, _)| async move {
            let looked = look(s3c, side, ep, &group).await?;
            let mut queued = HashSet::new();
            let doomed: Vec<Doomed> = group
                .iter()
                .filter(|p| !looked.changed.contains(p.key) && !looked.gone.contains(p.key))
                .filter(|p| queued.insert(p.key))
                .map(|p| (p.key.to_owned(), p.etag.map(str::to_owned)))
                .collect();
            let answer = if doomed.is_empty() {
                Ok(Vec::new())
            } else {
                ep.delete_many_if(bucket, &doomed)
                    .await
                    .map_err(anyhow::Error::from)
                    .with_context(|| format!("deleting objects in s3://{bucket}"))
            };
            Ok((looked, answer.map(|errors| (bucket, doomed.len(), errors))))
        })
        .buffer_unordered(8)
        .collect()
        .await;
    // Every look that was taken counts (a rerun after an unanswered delete relies on it),
    // then the first error, if any.
    let mut answers = Vec::new();
    let mut first_error = None;
    for r in results {
        match r {
            Ok((looked, answer)) => {
                found.changed.extend(looked.changed);
                found.gone.extend(looked.gone);
                match answer {
                    Ok(a) => answers.push(a),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    found.deleted = found.gone.intersection(seen.sent).cloned().collect();
    seen.found = found;
    if let Some(e) = first_error {
        return Err(e.into());
    }
    let mut failed: HashSet<(&str, String)> = HashSet::new();
    let mut deleted = 0;
    for (bucket, n, errors) in answers {
        deleted += (n - errors.len()) as u64;
        for (key, why) in errors {
            warn!(bucket = %bucket, key = %key, error = %why, "object not deleted; a rerun retries it");
            failed.insert((bucket, key));
        }
    }

    let mut ids = Vec::new();
    let mut outcomes: Vec<Cleaned> = Vec::new();
    let mut failures = 0;
    let mut deleted_unanswered = 0;
    for p in items {
        if in_flight.contains(&(p.bucket, p.key.to_owned())) {
            // A batch in flight relies on it: left pending, a later cleanup decides.
            continue;
        }
        let outcome = if seen.found.changed.contains(p.key) {
            Cleaned::Changed
        } else if seen.found.deleted.contains(p.key) {
            deleted_unanswered += 1;
            Cleaned::Deleted
        } else if seen.found.gone.contains(p.key) {
            Cleaned::Gone
        } else if referenced_at(p) {
            Cleaned::StillReferenced
        } else if failed.contains(&(p.bucket, p.key.to_owned())) {
            failures += 1;
            continue;
        } else {
            Cleaned::Deleted
        };
        ids.push(p.move_id);
        outcomes.push(outcome);
    }
    let marked: HashSet<i64> = match mark {
        Some(mark) => {
            let mark = db.prepare_cached(mark).await?;
            crate::db::rt(1);
            let words: Vec<&str> = outcomes.iter().map(|o| o.as_str()).collect();
            db.query(&mark, &[&ids, &words])
                .await
                .context("marking cleaned-up objects in the ledger")?
                .into_iter()
                .map(|r| r.get(0))
                .collect()
        }
        None => ids.iter().copied().collect(),
    };
    let mut tally = Counters {
        sources_deleted: deleted + deleted_unanswered,
        delete_failures: failures,
        ..Counters::default()
    };
    let mut result = HashMap::new();
    for (id, outcome) in ids.into_iter().zip(outcomes) {
        if !marked.contains(&id) {
            continue; // another process finished this entry first
        }
        match outcome {
            Cleaned::Changed => tally.sources_changed += 1,
            Cleaned::StillReferenced => tally.sources_kept_referenced += 1,
            Cleaned::Deleted | Cleaned::Gone => {}
        }
        result.insert(id, outcome);
    }
    // Counted only once the transaction's work is done (a retry would count twice).
    counters.add(&tally);
    Ok((result, locked_at))
}

/// Finish the ledger entries a query names, a page of 1000 at a time, through
/// [`delete_unreferenced`]: `sql` takes `$1` = `scope` and `$2` = the last entry id seen,
/// and returns `(id, bucket, key, etag)` ordered by id. `identity` turns the recorded
/// ETag into the one the object must still have. Used for what an earlier process left
/// (a rollback's new objects) and for a finished run's unused copies.
#[allow(clippy::too_many_arguments)]
pub async fn finish_listed(
    db: &deadpool_postgres::Client,
    s3c: &S3,
    side: Side,
    q: &Queries,
    sql: &str,
    scope: &(dyn tokio_postgres::types::ToSql + Sync),
    mark: &str,
    counters: &mut Counters,
) -> Result<()> {
    let mut after = 0i64;
    loop {
        crate::db::rt(1);
        let rows = db
            .query(sql, &[scope, &after])
            .await
            .context("reading unfinished entries from the ledger")?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after = last.get(0);
        let found: Vec<(i64, String, String, Option<String>)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        let items: Vec<Unreferenced<'_>> = found
            .iter()
            .map(|(id, bucket, key, etag)| Unreferenced {
                move_id: *id,
                bucket,
                key,
                etag: etag.as_deref(),
                version: None,
            })
            .collect();
        info!(
            count = items.len(),
            "finishing objects the ledger left pending"
        );
        delete_unreferenced(db, s3c, side, q, &items, Some(mark), counters).await?;
    }
}

/// Remove the copies `relocator.take_backs` lists for the runs `runs` selects (`$1`:
/// `scope`), where nothing references them, no batch has them reserved and they are still
/// the copy relocator made. Returns the counts (`copies_removed`).
pub async fn take_back(
    db: &deadpool_postgres::Client,
    s3c: &S3,
    q: &Queries,
    runs: &str,
    scope: &(dyn tokio_postgres::types::ToSql + Sync),
) -> Result<Counters> {
    let mut counters = Counters::default();
    finish_listed(
        db,
        s3c,
        Side::Dest,
        q,
        &format!(
            "SELECT take_back_id, dst_bucket, dst_key, coalesce(dst_etag, src_etag)
               FROM relocator.take_backs
              WHERE run_id IN ({runs}) AND done_at IS NULL AND take_back_id > $2
              ORDER BY take_back_id LIMIT 1000"
        ),
        scope,
        MARK_TAKEN_BACK,
        &mut counters,
    )
    .await?;
    Ok(counters.as_taken_back())
}

/// Ledger entries of this job (its fingerprint: table, columns, source, destination,
/// rewrite — another job on the same table checks references in another column, so it
/// must not finish these) whose cleanup was not finished and whose lease no live worker
/// holds (its process died between COMMIT and cleanup: the lease's lock is free, and a
/// lease taken over without its lock has an expired heartbeat), after `after` (keyset on
/// move_id), at most `limit`.
pub async fn pending_after(
    db: &deadpool_postgres::Client,
    job: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<Pending>> {
    crate::db::rt(1);
    let rows = db
        .query(
            &format!(
                "SELECT m.move_id, m.row_id, m.old_path, m.new_path, m.src_bucket, m.src_etag,
                    m.src_version
               FROM relocator.moves m
              WHERE m.run_id IN (SELECT run_id FROM relocator.runs WHERE job = $1)
                AND m.cleaned_at IS NULL AND m.move_id > $2
                AND NOT {}
                AND NOT EXISTS (SELECT 1 FROM relocator.leases l
                                  JOIN relocator.runs r ON r.run_id = l.run_id
                                 WHERE l.lease_id = m.lease_id AND NOT l.locked AND NOT l.done
                                   AND l.heartbeat > now() - make_interval(
                                       secs => coalesce(r.lease_ttl_secs, $5)::float8))
              ORDER BY m.move_id LIMIT $3",
                crate::pipeline::lease::holder_alive("m.lease_id", "$4")
            ),
            &[
                &job,
                &after,
                &limit,
                &crate::pipeline::lease::LOCK_CLASS_I64,
                &crate::pipeline::lease::DEFAULT_TTL_SECS,
            ],
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
            src_etag: r.get(5),
            src_version: r.get(6),
        })
        .collect())
}
