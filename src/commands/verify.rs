//! `verify`: does every row point at an object that exists, and is it the object the
//! move left there? The rows under each prefix, streamed in byte order (`COLLATE "C"`,
//! the order S3 lists keys in), are merge-joined with the bucket listing: one LIST request
//! per 1,000 keys, no HEAD per row, constant memory. Each object a row points at in the
//! destination is compared (ETag and size, from the listing) with what the ledger
//! recorded for its move; with `--verify-content` its bytes are read and checked against
//! its ETag. Moves whose rows point outside both prefixes are looked up one by one. A
//! verify that found nothing to check says so and does not exit 0.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use futures::{pin_mut, StreamExt};
use serde::Serialize;

use crate::config::JobConfig;
use crate::db::{self, TableInfo};
use crate::progress::Progress;
use crate::s3::{self, ObjectInfo, Side, S3};

/// How a row (or an unreferenced object) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Points into the destination, and the object is there (the one the move left
    /// there, where the ledger knows it; with `--verify-content`, bytes checked).
    Ok,
    /// The object at the row's key is not the one relocator moved there: its ETag or size
    /// differs from the ledger's record of the move (replaced since, or damaged).
    Replaced,
    /// `--verify-content`: the object's bytes do not match its own ETag.
    Corrupt,
    /// `--checksum-column`: the object's MD5 (its ETag) is not the row's checksum.
    ChecksumMismatch,
    /// Not moved yet; its source object is there.
    StillLegacy,
    /// Its object is in neither bucket.
    Missing,
    /// Moved (per the ledger), but its old source object still exists.
    LegacyLeftover,
    /// An object under either prefix that no row of the table references but a
    /// `--referenced-by` column does: kept on purpose.
    KeptReferenced,
    /// An object under either prefix that no row references (with `--orphans`).
    Orphan,
}

impl Check {
    fn as_str(self) -> &'static str {
        match self {
            Check::Ok => "ok",
            Check::Replaced => "replaced",
            Check::Corrupt => "corrupt",
            Check::ChecksumMismatch => "checksum_mismatch",
            Check::StillLegacy => "still_legacy",
            Check::Missing => "missing",
            Check::LegacyLeftover => "legacy_leftover",
            Check::KeptReferenced => "kept_referenced",
            Check::Orphan => "orphan",
        }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct VerifySummary {
    pub counts: BTreeMap<Check, u64>,
}

impl VerifySummary {
    pub fn all_ok(&self) -> bool {
        self.checked() > 0
            && self
                .counts
                .iter()
                .all(|(c, n)| matches!(c, Check::Ok | Check::KeptReferenced) || *n == 0)
    }

    /// Rows and objects looked at.
    pub fn checked(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn one_line(&self) -> String {
        if self.checked() == 0 {
            return "verify: nothing to check: no row's path starts with either prefix and the \
                    ledger records no move of this table; check --source, --dest, --table and \
                    --path-column"
                .into();
        }
        let parts: Vec<String> = self
            .counts
            .iter()
            .map(|(c, n)| format!("{}={n}", c.as_str()))
            .collect();
        format!("verify: {}", parts.join(" "))
    }

    pub fn get(&self, c: Check) -> u64 {
        self.counts.get(&c).copied().unwrap_or(0)
    }
}

struct Out {
    csv: Option<csv::Writer<std::fs::File>>,
    summary: VerifySummary,
    progress: Progress,
}

impl Out {
    fn record(&mut self, check: Check, id: &str, bucket: &str, key: &str) -> Result<()> {
        *self.summary.counts.entry(check).or_default() += 1;
        if let Some(w) = &mut self.csv {
            w.write_record([id, bucket, key, check.as_str()])
                .context("writing the verify report")?;
        }
        Ok(())
    }
}

/// Of keys no row of the table references by its listed fields, those some row may
/// still use are recorded `kept_referenced`, and the others returned: a `--referenced-by`
/// column's, and, for a shape whose reference check reads more than the fields (a URL's
/// other spellings, a document's unlisted fields), any the cleanup would keep.
async fn kept_elsewhere(
    client: &tokio_postgres::Client,
    table: &TableInfo,
    o: &mut Out,
    bucket: &str,
    keys: Vec<String>,
) -> Result<Vec<String>> {
    let reference = &table.reference;
    // Each check, and whether it takes the shape's parameter `$2`.
    let own = reference.reads_whole_column().then(|| {
        (
            reference.referenced(&table.qualified),
            reference.takes_param(),
        )
    });
    let checks: Vec<(String, bool)> = table
        .referenced_elsewhere()
        .map(|sql| (sql, false))
        .into_iter()
        .chain(own)
        .collect();
    if checks.is_empty() {
        return Ok(keys);
    }
    let mut rest = Vec::with_capacity(keys.len());
    // A key the database cannot hold cannot be referenced by any of its rows.
    let (keys, unheld): (Vec<String>, Vec<String>) =
        keys.into_iter().partition(|k| table.held_keys.holds(k));
    rest.extend(unheld);
    let param = reference.param(bucket);
    for chunk in keys.chunks(1000) {
        let mut kept: std::collections::HashSet<String> = std::collections::HashSet::new();
        for (sql, takes_param) in &checks {
            let rows = if *takes_param {
                client.query(sql, &[&chunk, &param]).await
            } else {
                client.query(sql, &[&chunk]).await
            };
            kept.extend(
                rows.context("looking up the rows that may still use these objects")?
                    .into_iter()
                    .map(|r| r.get::<_, String>(0)),
            );
        }
        for k in chunk {
            if kept.contains(k) {
                o.record(Check::KeptReferenced, "", bucket, k)?;
            } else {
                rest.push(k.clone());
            }
        }
    }
    Ok(rest)
}

/// `relocator verify`.
pub async fn verify(cfg: &JobConfig, out: Option<&Path>, orphans: bool) -> Result<VerifySummary> {
    let pool = db::pool(&cfg.database_url, 2, None)?;
    let client = db::connect_checked(&pool, &cfg.database_url).await?;
    // The rows in key order stream in on one connection while the lookups they lead to
    // (the ledger, the --referenced-by columns) go out on another: on one connection a
    // query waits for the stream ahead of it to be read to its end, which never comes.
    let lookups = db::connect_checked(&pool, &cfg.database_url).await?;
    let table = TableInfo::resolve(&client, cfg).await?;
    // Every key a row could hold is listed (rows are matched to keys here, by a merge in
    // byte order); only keys sent to the database are limited to what it can hold.
    let s3c = S3::for_job(cfg).await;
    s3c.src.check_bucket("--source", &cfg.source.bucket).await?;
    s3c.dst.check_bucket("--dest", &cfg.dest.bucket).await?;
    let ledger = crate::ledger::exists(&client).await?;
    let (on_dest, _) = db::count_selected(&client, &table, Side::Dest).await?;
    let (on_source, _) = db::count_selected(&client, &table, Side::Source).await?;

    let mut o = Out {
        progress: Progress::new("verify", Some(on_dest + on_source)),
        csv: match out {
            Some(p) => {
                let mut w = csv::Writer::from_path(p)
                    .with_context(|| format!("creating {}", p.display()))?;
                w.write_record(["id", "bucket", "key", "check"])?;
                Some(w)
            }
            None => None,
        },
        summary: VerifySummary::default(),
    };
    // Destination side: rows present → ok (or replaced / corrupt), absent → missing;
    // unreferenced → orphan.
    let mut moved = Moved {
        client: &lookups,
        table: &table,
        s3c: &s3c,
        bucket: &cfg.dest.bucket,
        ledger,
        content: cfg.verify_content,
        rows: Vec::new(),
    };
    let mut unreferenced = Unreferenced {
        client: &lookups,
        table: &table,
        bucket: &cfg.dest.bucket,
        orphans,
        source: None,
        keys: Vec::new(),
    };
    merge_side(
        &client,
        &table,
        &s3c,
        Side::Dest,
        &cfg.dest.bucket,
        &cfg.dest.prefix,
        Some(&mut moved),
        &mut unreferenced,
        &mut o,
    )
    .await?;
    // Source side: rows present → still_legacy; unreferenced keys the ledger says were
    // moved → legacy_leftover, the others → orphan.
    let mut unreferenced = Unreferenced {
        bucket: &cfg.source.bucket,
        source: Some(ledger),
        ..unreferenced
    };
    merge_side(
        &client,
        &table,
        &s3c,
        Side::Source,
        &cfg.source.bucket,
        &cfg.source.prefix,
        None,
        &mut unreferenced,
        &mut o,
    )
    .await?;
    if ledger {
        elsewhere(&client, &table, &s3c, cfg, &mut o).await?;
    }
    if let Some(w) = &mut o.csv {
        w.flush()?;
    }
    o.progress.finish();
    Ok(o.summary)
}

/// Listed keys no row of the table references, judged 1,000 at a time as the merge
/// finds them, so memory does not grow with what the bucket holds: those a
/// `--referenced-by` column references are `kept_referenced`; on the source side those
/// the ledger says were moved are `legacy_leftover`; with `--orphans` the rest are
/// `orphan`s.
struct Unreferenced<'a> {
    client: &'a tokio_postgres::Client,
    table: &'a TableInfo,
    bucket: &'a str,
    orphans: bool,
    /// On the source side: `Some(whether the ledger exists)`.
    source: Option<bool>,
    keys: Vec<String>,
}

impl Unreferenced<'_> {
    async fn push(&mut self, o: &mut Out, key: String) -> Result<()> {
        self.keys.push(key);
        if self.keys.len() >= 1000 {
            self.flush(o).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, o: &mut Out) -> Result<()> {
        let keys = std::mem::take(&mut self.keys);
        if keys.is_empty() {
            return Ok(());
        }
        let keys = kept_elsewhere(self.client, self.table, o, self.bucket, keys).await?;
        let moved: BTreeMap<String, String> = match self.source {
            Some(true) => {
                let held: Vec<&String> = keys
                    .iter()
                    .filter(|k| self.table.held_keys.holds(k))
                    .collect();
                self.client
                    .query(
                        "SELECT DISTINCT ON (old_path) old_path, row_id FROM relocator.moves
                          WHERE table_name = $1 AND src_bucket = $2 AND old_path = ANY ($3)
                          ORDER BY old_path, move_id DESC",
                        &[&self.table.display, &self.bucket, &held],
                    )
                    .await
                    .context("looking up leftovers in the ledger")?
                    .into_iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect()
            }
            _ => BTreeMap::new(),
        };
        for k in keys {
            match moved.get(&k) {
                Some(row) => o.record(Check::LegacyLeftover, row, self.bucket, &k)?,
                None if self.orphans => o.record(Check::Orphan, "", self.bucket, &k)?,
                None => {}
            }
        }
        Ok(())
    }
}

/// Rows found at their key in the destination, checked against the ledger (and their
/// bytes) in chunks: one ledger query per 1,000 rows.
struct Moved<'a> {
    client: &'a tokio_postgres::Client,
    table: &'a TableInfo,
    s3c: &'a S3,
    bucket: &'a str,
    ledger: bool,
    content: bool,
    rows: Vec<(String, String, ObjectInfo)>,
}

impl Moved<'_> {
    async fn push(&mut self, o: &mut Out, id: String, key: String, info: ObjectInfo) -> Result<()> {
        self.rows.push((id, key, info));
        if self.rows.len() >= 1000 {
            self.flush(o).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, o: &mut Out) -> Result<()> {
        let rows = std::mem::take(&mut self.rows);
        if rows.is_empty() {
            return Ok(());
        }
        let recorded: BTreeMap<String, (Option<String>, Option<i64>)> = if self.ledger {
            let keys: Vec<&str> = rows.iter().map(|(_, k, _)| k.as_str()).collect();
            self.client
                .query(
                    "SELECT DISTINCT ON (new_path) new_path, dst_etag, size FROM relocator.moves
                      WHERE table_name = $1 AND dst_bucket = $2 AND new_path = ANY ($3)
                        AND rolled_back_at IS NULL
                      ORDER BY new_path, move_id DESC",
                    &[&self.table.display, &self.bucket, &keys],
                )
                .await
                .context("looking up the moves' recorded objects in the ledger")?
                .into_iter()
                .map(|r| (r.get(0), (r.get(1), r.get(2))))
                .collect()
        } else {
            BTreeMap::new()
        };
        // --checksum-column: each row's checksum against its object's MD5.
        let checksums: BTreeMap<String, Option<String>> = match self.table.checksums_query() {
            Some(sql) => {
                let ids: Vec<&str> = rows.iter().map(|(id, _, _)| id.as_str()).collect();
                self.client
                    .query(&sql, &[&ids])
                    .await
                    .context("reading the rows' checksums")?
                    .into_iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect()
            }
            None => BTreeMap::new(),
        };
        let mut read: BTreeMap<String, Check> = BTreeMap::new();
        for (id, key, info) in rows {
            let wrong_checksum = checksums
                .get(&id)
                .and_then(|c| c.as_deref())
                .and_then(|c| crate::pipeline::checksum::mismatch(c, &info.etag));
            let check = match recorded.get(&key) {
                Some((etag, size)) if !same(&info, etag, *size) => Check::Replaced,
                _ if wrong_checksum.is_some() => Check::ChecksumMismatch,
                _ if self.content => match read.get(&key) {
                    Some(c) => *c,
                    None => {
                        let c = content(self.s3c, self.bucket, &key, &info.etag).await?;
                        read.insert(key.clone(), c);
                        c
                    }
                },
                _ => Check::Ok,
            };
            o.record(check, &id, self.bucket, &key)?;
        }
        Ok(())
    }
}

/// Whether an object is the one the ledger recorded (entries from before the ledger kept
/// the identity match anything).
fn same(found: &ObjectInfo, etag: &Option<String>, size: Option<i64>) -> bool {
    etag.as_ref().is_none_or(|e| *e == found.etag) && size.is_none_or(|n| n == found.size)
}

/// `--verify-content`: the object's bytes against its ETag.
async fn content(s3c: &S3, bucket: &str, key: &str, etag: &str) -> Result<Check> {
    match s3c.dst.bytes_match_etag(bucket, key, etag).await {
        Ok(Some(true)) => Ok(Check::Ok),
        Ok(Some(false)) => Ok(Check::Corrupt),
        // Encrypted with a key (its ETag is no MD5): the bytes cannot be checked here.
        Ok(None) => Err(anyhow::anyhow!(
            "s3://{bucket}/{key} is encrypted with SSE-KMS or SSE-C, so its ETag is no MD5 \
             of its bytes and --verify-content cannot check them; verify without it"
        )),
        // Replaced (or removed) between the listing and the read.
        Err(s3::S3Error::PreconditionFailed | s3::S3Error::NotFound) => Ok(Check::Replaced),
        Err(e) => Err(anyhow::anyhow!(e)),
    }
}

/// Moves whose rows still point at the new key, but where this verify's prefixes do not
/// look (another destination, or a prefix given differently): each looked up with a HEAD.
async fn elsewhere(
    client: &tokio_postgres::Client,
    t: &TableInfo,
    s3c: &S3,
    cfg: &JobConfig,
    o: &mut Out,
) -> Result<()> {
    let sql = format!(
        "SELECT m.move_id, m.row_id, m.dst_bucket, m.new_path, m.dst_etag, m.size
           FROM relocator.moves m JOIN {tbl} AS t ON t.{id} = m.row_id::{ty}
          WHERE m.table_name = $1 AND m.rolled_back_at IS NULL AND {holds}{on}
            AND NOT (m.dst_bucket = $2 AND starts_with(m.new_path, $3))
            AND NOT starts_with(m.new_path, $4) AND m.move_id > $5
          ORDER BY m.move_id LIMIT 1000",
        tbl = t.qualified,
        id = t.id_col,
        ty = t.id_type,
        holds = t.reference.holds("t", "coalesce(m.new_value, m.new_path)"),
        on = t.reference.on(Side::Dest, "t"),
    );
    let mut after = 0i64;
    loop {
        let rows = client
            .query(
                &sql,
                &[
                    &t.display,
                    &cfg.dest.bucket,
                    &cfg.dest.prefix,
                    &cfg.source.prefix,
                    &after,
                ],
            )
            .await
            .context("reading moves whose rows point outside both prefixes")?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after = last.get(0);
        for r in rows {
            let (id, bucket, key): (String, String, String) = (r.get(1), r.get(2), r.get(3));
            let check = match s3c.dst.head(&bucket, &key).await? {
                None => Check::Missing,
                Some(found) if !same(&found, &r.get(4), r.get(5)) => Check::Replaced,
                Some(found) if cfg.verify_content => {
                    content(s3c, &bucket, &key, &found.etag).await?
                }
                Some(_) => Check::Ok,
            };
            o.record(check, &id, &bucket, &key)?;
        }
    }
}

/// Merge the rows whose path starts with `prefix` (byte order) with the listing of
/// `bucket` under `prefix`. Rows whose key is listed get `present` (on the destination
/// side: checked by `moved`), the others `missing`; listed keys no row references go to
/// `unreferenced`.
#[allow(clippy::too_many_arguments)]
async fn merge_side(
    client: &tokio_postgres::Client,
    t: &TableInfo,
    s3c: &S3,
    side: Side,
    bucket: &str,
    prefix: &str,
    mut moved: Option<&mut Moved<'_>>,
    unreferenced: &mut Unreferenced<'_>,
    o: &mut Out,
) -> Result<()> {
    let present = if moved.is_some() {
        Check::Ok
    } else {
        Check::StillLegacy
    };
    // Keys as bytes, in the order of the listing (UTF-8 bytes), whatever the column's
    // collation and the database's encoding.
    // A row holding several references (a JSON document's fields) is one row here per
    // reference on this side.
    let sql = format!(
        "SELECT t.{id}::text, x.k FROM {tbl} AS t CROSS JOIN LATERAL (VALUES ({keys})) AS x(k)
          WHERE {selected} AND x.k IS NOT NULL
          ORDER BY x.k, t.{id}",
        id = t.id_col,
        keys = t.reference.key_bytes(side, "t").join("), ("),
        tbl = t.qualified,
        selected = t.reference.selects(side, "t"),
    );
    let rows = client
        .query_raw(&sql, std::iter::empty::<&str>())
        .await
        .context("scanning rows in key order")?;
    pin_mut!(rows);
    let mut listing = s3c.listing(side, bucket, prefix, None);
    let mut next = listing.next().await?;
    let mut last_matched: Option<(String, ObjectInfo)> = None;
    while let Some(row) = rows.next().await {
        let row = row.context("reading rows in key order")?;
        let (id, key): (String, Option<Vec<u8>>) = (row.get(0), row.get(1));
        o.progress.inc(1, 0);
        // A value holding no key (a URL whose path is not percent-encoded UTF-8) points
        // at no object relocator could move: `run` reports it as `invalid_key`.
        let Some(path) = key.and_then(|k| String::from_utf8(k).ok()) else {
            continue;
        };
        let found = match &last_matched {
            Some((k, info)) if *k == path => Some(info.clone()),
            _ => {
                while let Some((k, _)) = next.as_ref().filter(|(k, _)| k.as_str() < path.as_str()) {
                    unreferenced.push(o, k.clone()).await?;
                    next = listing.next().await?;
                }
                if next.as_ref().is_some_and(|(k, _)| *k == path) {
                    last_matched = next.take();
                    next = listing.next().await?;
                    last_matched.as_ref().map(|(_, info)| info.clone())
                } else {
                    None
                }
            }
        };
        match (found, moved.as_deref_mut()) {
            (Some(info), Some(m)) => m.push(o, id, path, info).await?,
            (Some(_), None) => o.record(present, &id, bucket, &path)?,
            (None, _) => o.record(Check::Missing, &id, bucket, &path)?,
        }
    }
    if let Some(m) = moved {
        m.flush(o).await?;
    }
    while let Some((k, _)) = next {
        unreferenced.push(o, k).await?;
        next = listing.next().await?;
    }
    unreferenced.flush(o).await
}
