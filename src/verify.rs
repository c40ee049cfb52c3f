//! `verify`: does every row point at an object that exists? The rows under each prefix,
//! streamed in byte order (`COLLATE "C"`, the order S3 lists keys in), are merge-joined
//! with the bucket listing: one LIST request per 1,000 keys, no HEAD per row, constant
//! memory.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use anyhow::{Context, Result};
use aws_sdk_s3::Client;
use futures::{pin_mut, StreamExt};
use serde::Serialize;

use crate::config::JobConfig;
use crate::db::{self, TableInfo};
use crate::progress::Progress;
use crate::s3;

/// How a row (or an unreferenced object) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// Points into the destination, and the object is there.
    Ok,
    /// Not moved yet; its source object is there.
    StillLegacy,
    /// Its object is in neither bucket.
    Missing,
    /// Moved (per the ledger), but its old source object still exists.
    LegacyLeftover,
    /// An object under either prefix that no row references (with `--orphans`).
    Orphan,
}

impl Check {
    fn as_str(self) -> &'static str {
        match self {
            Check::Ok => "ok",
            Check::StillLegacy => "still_legacy",
            Check::Missing => "missing",
            Check::LegacyLeftover => "legacy_leftover",
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
        self.counts.iter().all(|(c, n)| *c == Check::Ok || *n == 0)
    }

    pub fn one_line(&self) -> String {
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

/// `relocator verify`.
pub async fn verify(cfg: &JobConfig, out: Option<&Path>, orphans: bool) -> Result<VerifySummary> {
    let pool = db::pool(&cfg.database_url, 2, None)?;
    let client = db::connect_checked(&pool, &cfg.database_url).await?;
    let table = TableInfo::resolve(&client, cfg).await?;
    let s3c = s3::S3::for_job(cfg).await;
    s3::check_bucket(&s3c.src, "--source", &cfg.source.bucket).await?;
    s3::check_bucket(&s3c.dst, "--dest", &cfg.dest.bucket).await?;
    let ledger = db::ledger_exists(&client).await?;
    let (on_dest, _) = db::count_selected(&client, &table, &cfg.dest.prefix).await?;
    let (on_source, _) = db::count_selected(&client, &table, &cfg.source.prefix).await?;

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
    // Destination side: rows present → ok, absent → missing; unreferenced → orphan.
    let mut unreferenced = Vec::new();
    merge_side(
        &client,
        &table,
        &s3c.dst,
        &cfg.dest.bucket,
        &cfg.dest.prefix,
        Check::Ok,
        &mut o,
        &mut |k| unreferenced.push(k),
    )
    .await?;
    if orphans {
        for k in unreferenced.drain(..) {
            o.record(Check::Orphan, "", &cfg.dest.bucket, &k)?;
        }
    }
    // Source side: rows present → still_legacy; unreferenced keys the ledger says were
    // moved → legacy_leftover, the others → orphan.
    let mut leftovers = Vec::new();
    merge_side(
        &client,
        &table,
        &s3c.src,
        &cfg.source.bucket,
        &cfg.source.prefix,
        Check::StillLegacy,
        &mut o,
        &mut |k| leftovers.push(k),
    )
    .await?;
    for chunk in leftovers.chunks(1000) {
        let moved: BTreeMap<String, String> = if ledger {
            client
                .query(
                    "SELECT DISTINCT ON (old_path) old_path, row_id FROM relocator.moves
                      WHERE table_name = $1 AND src_bucket = $2 AND old_path = ANY ($3)
                      ORDER BY old_path, move_id DESC",
                    &[&table.display, &cfg.source.bucket, &chunk],
                )
                .await
                .context("looking up leftovers in the ledger")?
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect()
        } else {
            BTreeMap::new()
        };
        for k in chunk {
            match moved.get(k) {
                Some(row) => o.record(Check::LegacyLeftover, row, &cfg.source.bucket, k)?,
                None if orphans => o.record(Check::Orphan, "", &cfg.source.bucket, k)?,
                None => {}
            }
        }
    }
    if let Some(w) = &mut o.csv {
        w.flush()?;
    }
    o.progress.finish();
    Ok(o.summary)
}

/// Merge the rows whose path starts with `prefix` (byte order) with the listing of
/// `bucket` under `prefix`. Rows whose key is listed get `present`, the others
/// `missing`; listed keys no row references go to `unreferenced`.
#[allow(clippy::too_many_arguments)]
async fn merge_side(
    client: &tokio_postgres::Client,
    t: &TableInfo,
    s3c: &Client,
    bucket: &str,
    prefix: &str,
    present: Check,
    o: &mut Out,
    unreferenced: &mut dyn FnMut(String),
) -> Result<()> {
    let sql = format!(
        "SELECT t.{id}::text, t.{path}::text FROM {tbl} AS t
          WHERE starts_with(t.{path}, $1)
          ORDER BY t.{path} COLLATE \"C\", t.{id}",
        id = t.id_col,
        path = t.path_col,
        tbl = t.qualified
    );
    let rows = client
        .query_raw(&sql, [prefix])
        .await
        .context("scanning rows in key order")?;
    pin_mut!(rows);
    let mut listing = Listing {
        client: s3c,
        bucket,
        prefix,
        token: None,
        done: false,
        buf: VecDeque::new(),
    };
    let mut next_key = listing.next().await?;
    let mut last_matched: Option<String> = None;
    while let Some(row) = rows.next().await {
        let row = row.context("reading rows in key order")?;
        let (id, path): (String, String) = (row.get(0), row.get(1));
        o.progress.inc(1, 0);
        if last_matched.as_deref() == Some(path.as_str()) {
            o.record(present, &id, bucket, &path)?;
            continue;
        }
        while let Some(k) = next_key.as_ref().filter(|k| k.as_str() < path.as_str()) {
            unreferenced(k.clone());
            next_key = listing.next().await?;
        }
        if next_key.as_deref() == Some(path.as_str()) {
            o.record(present, &id, bucket, &path)?;
            last_matched = next_key.take();
            next_key = listing.next().await?;
        } else {
            o.record(Check::Missing, &id, bucket, &path)?;
        }
    }
    while let Some(k) = next_key {
        unreferenced(k);
        next_key = listing.next().await?;
    }
    Ok(())
}

/// The keys under a prefix, in S3's (byte) order, one ListObjectsV2 page at a time.
struct Listing<'a> {
    client: &'a Client,
    bucket: &'a str,
    prefix: &'a str,
    token: Option<String>,
    done: bool,
    buf: VecDeque<String>,
}

impl Listing<'_> {
    async fn next(&mut self) -> Result<Option<String>> {
        loop {
            if let Some(k) = self.buf.pop_front() {
                return Ok(Some(k));
            }
            if self.done {
                return Ok(None);
            }
            let out = self
                .client
                .list_objects_v2()
                .bucket(self.bucket)
                .prefix(self.prefix)
                .set_continuation_token(self.token.take())
                .send()
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "listing s3://{}/{}: {}",
                        self.bucket,
                        self.prefix,
                        aws_smithy_types::error::display::DisplayErrorContext(&e)
                    )
                })?;
            self.buf.extend(
                out.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
            self.token = out.next_continuation_token().map(str::to_owned);
            self.done = !out.is_truncated().unwrap_or(false) || self.token.is_none();
        }
    }
}
