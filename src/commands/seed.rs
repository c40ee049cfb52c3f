//! Demo and test data: N rows in the application's table and their objects in the source
//! bucket, uploaded concurrently. Deterministic: the same `--seed` gives the same keys,
//! and an object's bytes are a function of (seed, key) alone, so a check can recompute
//! what any object must contain.

use std::ops::Range;

use anyhow::{Context, Result};
use futures::{stream, StreamExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tracing::info;

use crate::config::{ConfigError, DatabaseUrl, S3Location, S3Settings, TableName};
use crate::db;
use crate::s3;

const AWKWARD: &str = include_str!("../../seeds/awkward-keys.txt");

/// Every this-many rows, one points at the shared default avatar.
const SHARED_EVERY: usize = 50;

#[derive(Debug, Clone)]
pub struct SeedConfig {
    pub database_url: DatabaseUrl,
    pub table: TableName,
    pub target: S3Location,
    pub rows: usize,
    pub missing: usize,
    pub seed: u64,
    pub sizes: Range<usize>,
    pub concurrency: usize,
    /// Prefixes emptied before seeding (demo reruns).
    pub clear: Vec<S3Location>,
    pub s3: S3Settings,
}

impl SeedConfig {
    pub fn from_args(a: &crate::cli::SeedArgs) -> Result<Self, ConfigError> {
        let sizes = parse_sizes(&a.sizes)?;
        if a.missing > a.rows {
            return Err(ConfigError(format!(
                "--missing {} is more than --rows {}",
                a.missing, a.rows
            )));
        }
        Ok(SeedConfig {
            database_url: DatabaseUrl::new(&a.database_url)?,
            // An unqualified name goes to `public`, not to the first schema of the
            // search_path (which is relocator's ledger schema for a role named relocator).
            table: {
                let mut t = TableName::parse(&a.table)?;
                t.schema.get_or_insert_with(|| "public".to_owned());
                t
            },
            target: S3Location::parse("--target", &a.target)?,
            rows: a.rows,
            missing: a.missing,
            seed: a.seed,
            sizes,
            concurrency: a.concurrency.clamp(1, 1024),
            clear: a
                .clear
                .iter()
                .map(|c| S3Location::parse("--clear", c))
                .collect::<Result<_, _>>()?,
            s3: S3Settings::from_args(&a.s3)?,
        })
    }
}

fn parse_sizes(s: &str) -> Result<Range<usize>, ConfigError> {
    let bad = || {
        ConfigError(format!(
            "--sizes {s:?} must be MIN..MAX bytes, e.g. 200..8192"
        ))
    };
    let (a, b) = s.split_once("..").ok_or_else(bad)?;
    let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if a >= b {
        return Err(bad());
    }
    Ok(a..b)
}

/// One seeded row: its path, and whether its object exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedRow {
    pub path: String,
    pub has_object: bool,
}

/// The rows `seed` creates, in insertion (id) order. Pure.
pub fn rows(prefix: &str, n: usize, missing: usize, seed: u64) -> Vec<SeedRow> {
    let awkward: Vec<&str> = AWKWARD
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    let exts = ["png", "jpg", "gif", "webp"];
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let path = if i % SHARED_EVERY == 7 {
                format!("{prefix}default.png")
            } else if i >= n - missing {
                format!("{prefix}missing-{i}.png")
            } else if i % 10 == 3 {
                let t = awkward[(i / 10) % awkward.len()];
                format!("{prefix}{}", t.replace("{i}", &i.to_string()))
            } else {
                let ext = exts[rng.random_range(0..exts.len())];
                format!("{prefix}avatar-{i}.{ext}")
            };
            let has_object = !(i >= n - missing && i % SHARED_EVERY != 7);
            SeedRow { path, has_object }
        })
        .collect()
}

/// The bytes of the object at `key`: a function of (seed, key, sizes) only.
pub fn object_bytes(seed: u64, key: &str, sizes: &Range<usize>) -> Vec<u8> {
    let mut h: u64 = seed ^ 0x9e37_79b9_7f4a_7c15;
    for b in key.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut rng = StdRng::seed_from_u64(h);
    let len = rng.random_range(sizes.clone());
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    buf
}

/// The headers a seeded object carries: every one a copy must keep (Content-Type,
/// Cache-Control, Content-Disposition, Content-Encoding, Content-Language, Expires and
/// user metadata), so tests can check that each survives each copy path.
pub fn headers(seed: u64, key: &str) -> s3::Headers {
    s3::Headers {
        content_type: Some(content_type(key).to_owned()),
        cache_control: Some("public, max-age=86400".to_owned()),
        content_disposition: Some("inline".to_owned()),
        content_encoding: Some("identity".to_owned()),
        content_language: Some("en".to_owned()),
        expires: Some("Thu, 01 Jan 2099 00:00:00 GMT".to_owned()),
        metadata: [
            ("seed".to_owned(), seed.to_string()),
            ("uploaded-by".to_owned(), "relocator-seed".to_owned()),
        ]
        .into_iter()
        .collect(),
    }
}

/// Content-Type by extension, as an upload form would set it.
pub fn content_type(key: &str) -> &'static str {
    match key.rsplit('.').next().unwrap_or("") {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        _ => "application/octet-stream",
    }
}

/// What seeding made.
#[derive(Debug, Clone, Default)]
pub struct Seeded {
    pub rows: usize,
    pub objects: usize,
    pub bytes: u64,
}

/// Create the table if needed, insert the rows, upload their objects.
pub async fn seed(cfg: &SeedConfig) -> Result<Seeded> {
    let pool = db::pool(&cfg.database_url, 1, None)?;
    let client = db::connect_checked(&pool, &cfg.database_url).await?;
    if let Some(schema) = &cfg.table.schema {
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                crate::config::quote_ident(schema)
            ))
            .await
            .context("creating the table's schema")?;
    }
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} (id serial PRIMARY KEY, path varchar)",
            cfg.table
        ))
        .await
        .with_context(|| format!("creating table {}", cfg.table))?;
    // A well-kept application table has an index on the path column; relocator uses it to
    // find rows by key (phase 1) and to check references before deleting a source.
    client
        .batch_execute(&format!(
            "CREATE INDEX IF NOT EXISTS {} ON {} (path)",
            crate::config::quote_ident(&format!("{}_path_idx", cfg.table.name)),
            cfg.table
        ))
        .await
        .with_context(|| format!("indexing {}", cfg.table))?;

    let s3c = s3::Endpoint::from(s3::client(&cfg.s3).await);
    s3c.check_bucket("--target", &cfg.target.bucket).await?;
    for loc in &cfg.clear {
        clear(&s3c, loc).await?;
    }
    let all = rows(&cfg.target.prefix, cfg.rows, cfg.missing, cfg.seed);
    let mut keys: Vec<&str> = all
        .iter()
        .filter(|r| r.has_object)
        .map(|r| r.path.as_str())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let bytes = upload(&s3c, cfg, &keys).await?;

    let insert = format!("INSERT INTO {} (path) SELECT unnest($1::text[])", cfg.table);
    for chunk in all.chunks(5000) {
        let paths: Vec<&str> = chunk.iter().map(|r| r.path.as_str()).collect();
        client
            .execute(&insert, &[&paths])
            .await
            .with_context(|| format!("inserting rows into {}", cfg.table))?;
    }
    info!(rows = all.len(), objects = keys.len(), bytes, "seeded");
    Ok(Seeded {
        rows: all.len(),
        objects: keys.len(),
        bytes,
    })
}

/// Delete every object under `loc` (demo reruns start from empty prefixes).
async fn clear(s3c: &s3::Endpoint, loc: &S3Location) -> Result<()> {
    let wrapped = s3::S3::new(s3c.clone());
    let mut deleted = 0;
    loop {
        let page = wrapped
            .listing(s3::Side::Source, &loc.bucket, &loc.prefix, None)
            .page(1000)
            .await
            .with_context(|| format!("listing {loc} to clear it"))?;
        let Some(page) = page else {
            info!(%loc, deleted, "cleared");
            return Ok(());
        };
        let keys: Vec<String> = page.into_iter().map(|(k, _)| k).collect();
        let failed = s3c
            .delete_many(&loc.bucket, &keys)
            .await
            .with_context(|| format!("clearing {loc}"))?;
        if let Some((key, why)) = failed.first() {
            anyhow::bail!("clearing {loc}: {key:?} was not deleted: {why}");
        }
        deleted += keys.len();
    }
}

async fn upload(s3c: &s3::Endpoint, cfg: &SeedConfig, keys: &[&str]) -> Result<u64> {
    let bucket = &cfg.target.bucket;
    let sizes: Vec<u64> = stream::iter(keys)
        .map(|key| async move {
            let body = object_bytes(cfg.seed, key, &cfg.sizes);
            let len = body.len() as u64;
            s3c.put_with(bucket, key, body, &headers(cfg.seed, key))
                .await
                .with_context(|| format!("uploading seed object {key:?}"))?;
            Ok::<_, anyhow::Error>(len)
        })
        .buffer_unordered(cfg.concurrency)
        .try_collect()
        .await?;
    Ok(sizes.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_rows_are_deterministic_and_include_the_awkward_cases() {
        let a = rows("image/", 1000, 10, 7);
        assert_eq!(a, rows("image/", 1000, 10, 7));
        let paths: Vec<&str> = a.iter().map(|r| r.path.as_str()).collect();
        for needle in [" ", "+", "%", "#", "ü", "?"] {
            assert!(
                paths.iter().any(|p| p.contains(needle)),
                "no key with {needle:?}"
            );
        }
        let shared = paths.iter().filter(|p| **p == "image/default.png").count();
        assert!(shared >= 2, "the default avatar is shared");
        assert_eq!(a.iter().filter(|r| !r.has_object).count(), 10);
    }

    #[test]
    fn object_bytes_depend_on_seed_and_key_only() {
        let s = 10..100;
        assert_eq!(object_bytes(1, "k", &s), object_bytes(1, "k", &s));
        assert_ne!(object_bytes(1, "k", &s), object_bytes(2, "k", &s));
        assert_ne!(object_bytes(1, "k", &s), object_bytes(1, "j", &s));
        assert!(s.contains(&object_bytes(1, "k", &s).len()));
    }
}
