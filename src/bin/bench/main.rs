//! The benchmark behind the README's performance section (run it with scripts/bench.sh).
//!
//! By default it measures the README's table on one S3 server ([`matrix`]): the S3
//! ceiling, `rclone move`, `relocator run` and the per-object script pattern, each alone,
//! in a rotating order, three times, on a table with and without an index on the path.
//! `--table FILES` prints the table from the JSON files of several servers.
//!
//! `--chart` instead, in one run, on fresh buckets seeded with the same N objects each,
//! measures, while counting the objects moved once a second:
//! (a) the S3 ceiling — a minimal client doing only CopyObject + batched DeleteObjects at
//!     its best concurrency, no database;
//! (b) `rclone move` of the same objects (server-side copy, tuned transfers/checkers);
//! (c) `relocator run` (release binary), with its own counters.
//! It prints objects/s, the ratios, peak RSS, S3 requests per object and database round
//! trips per 1,000 rows, and writes a CSV of the samples, a JSON of the results and a
//! PNG chart of objects/s over time. `--scaling` instead compares the peak RSS of each
//! relocator command (backup, plan, run, status, verify, rollback) at 10,000 and 100,000
//! rows; `--workers` the throughput of two `relocator run`
//! processes on one table with one, beside what the S3 server gives two clients.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aws_sdk_s3::Client;
use clap::Parser;
use futures::{stream, StreamExt, TryStreamExt};
use relocator::commands::seed;
use relocator::config::{DatabaseUrl, S3Location, S3Settings, TableName};
use relocator::s3;
use serde::Serialize;

mod matrix;
use matrix::Hop;

#[derive(Debug, Parser)]
struct Args {
    /// Rows per table (objects: their distinct keys).
    #[arg(long, default_value_t = 20_000)]
    objects: usize,
    /// Repetitions of each tool per schema.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// The server configuration's name in the table (e.g. garage-sqlite).
    #[arg(long, default_value = "garage")]
    label: String,
    /// The S3 server's process id, to measure its CPU time.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Instead: print the table from these matrix JSON files.
    #[arg(long, num_args = 1..)]
    table: Vec<PathBuf>,
    /// Instead: the three-tool comparison with objects/s over time (a sampler lists the
    /// destination once a second while each tool runs).
    #[arg(long)]
    chart: bool,
    /// Object sizes in bytes (small avatars).
    #[arg(long, default_value = "1024..3072")]
    sizes: String,
    /// Where the CSV, JSON and PNG go.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
    /// The relocator binary to measure.
    #[arg(long, default_value = "target/release/relocator")]
    relocator: PathBuf,
    /// An earlier relocator binary, measured in the same rotation as "relocator before".
    #[arg(long)]
    before: Option<PathBuf>,
    /// Concurrencies tried for the ceiling; the best is used by all three tools.
    #[arg(long, value_delimiter = ',', default_value = "32,64,128")]
    concurrency: Vec<usize>,
    /// Instead: the peak RSS of each relocator command at 10,000 and 100,000 rows.
    #[arg(long)]
    scaling: bool,
    /// Instead: two relocator processes on one table against one (N rows each time), and
    /// the ceiling with one client against two.
    #[arg(long)]
    workers: bool,
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    endpoint_url: String,
}

/// One tool's measurement.
#[derive(Debug, Clone, Serialize)]
struct Measured {
    tool: &'static str,
    objects: usize,
    seconds: f64,
    objects_per_sec: f64,
    peak_rss_kb: Option<u64>,
    s3_writes_per_object: Option<f64>,
    s3_reads_per_object: Option<f64>,
    db_round_trips_per_1000_rows: Option<f64>,
    /// Where the time went while it ran.
    cpu: matrix::CpuUse,
    /// (seconds since start, objects at the destination)
    #[serde(skip_serializing_if = "Vec::is_empty")]
    samples: Vec<(f64, u64)>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    std::env::remove_var("AWS_CA_BUNDLE");
    if !args.table.is_empty() {
        return matrix::print_table(&args.table);
    }
    std::fs::create_dir_all(&args.out)?;
    let sizes = parse_sizes(&args.sizes)?;
    let settings = S3Settings {
        endpoint_url: Some(args.endpoint_url.clone()),
        timeout: Duration::from_secs(60),
        max_attempts: 6,
        max_rps: None,
        profile: None,
        region: None,
        credentials: None,
    };
    let client = s3::client(&settings).await;
    let tag = format!(
        "bench-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
    );
    let ctx = Ctx {
        args: &args,
        client,
        settings,
        sizes,
        tag,
        sample: args.chart,
        server_pid: args.server_pid,
    };
    if args.scaling {
        return scaling(&ctx).await;
    }
    if args.workers {
        return workers(&ctx).await;
    }
    if args.chart {
        return compare(&ctx).await;
    }
    matrix::matrix(&ctx).await
}

struct Ctx<'a> {
    args: &'a Args,
    client: Client,
    settings: S3Settings,
    sizes: Range<usize>,
    tag: String,
    /// Count the objects moved while a tool runs (`--chart`).
    sample: bool,
    server_pid: Option<u32>,
}

fn parse_sizes(s: &str) -> Result<Range<usize>> {
    let (a, b) = s.split_once("..").context("--sizes is MIN..MAX")?;
    Ok(a.parse()?..b.parse()?)
}

/// The objects are seeded once and handed on: the ceiling moves them from `s0/image/` to
/// `s1/avatar/`, rclone from there to `s2/image/`, relocator from there to `s3/avatar/`
/// (its rows name `image/…` keys, whatever the bucket). Each tool moves the same objects,
/// and seeding costs one pass instead of three (it dominates at a million objects).
async fn compare(ctx: &Ctx<'_>) -> Result<()> {
    let n = ctx.args.objects;
    eprintln!("== seeding {n} rows and their objects");
    let stages = [
        ctx.bucket("s0").await?,
        ctx.bucket("s1").await?,
        ctx.bucket("s2").await?,
        ctx.bucket("s3").await?,
    ];
    let db = ctx.database("rel").await?;
    let keys = ctx.seed(&stages[0], n, Some(&db)).await?;

    eprintln!("== (a) S3 ceiling: CopyObject + batched DeleteObjects, no database");
    let best = best_concurrency(ctx, &stages[0], &keys).await?;
    let a = ceiling(ctx, Hop::new(&stages[0], "image/", &stages[1]), &keys, best).await?;
    eprintln!("== (b) rclone move (--transfers {best} --checkers {best})");
    let b = rclone(ctx, Hop::new(&stages[1], "avatar/", &stages[2]), best).await?;
    eprintln!("== (c) relocator run (--concurrency {best})");
    let hop = Hop::new(&stages[2], "image/", &stages[3]);
    let c = relocator_run(ctx, hop, &db, best, n, 1).await?;

    let all = [a, b, c];
    print_table(&all);
    write_outputs(&ctx.args.out, &all, best)?;
    for b in &stages {
        ctx.drop_bucket(b).await;
    }
    ctx.drop_database(&db).await;
    Ok(())
}

/// The commands `--scaling` measures, in the order it runs them on one table.
const SCALED: [&str; 8] = [
    "backup",
    "plan",
    "run",
    "status",
    "verify",
    "verify --orphans",
    "rollback",
    "status after rollback",
];

/// Each command's peak RSS at 10,000 and 100,000 rows: seed, `backup`, `plan`, `run`,
/// `status`, `verify`, `verify --orphans` (every row pointed away for it, so every object
/// is an orphan), `rollback`, `status`.
async fn scaling(ctx: &Ctx<'_>) -> Result<()> {
    let mut peaks: Vec<Vec<(f64, Option<u64>)>> = Vec::new();
    for n in [10_000usize, 100_000] {
        let pair = (
            ctx.bucket(&format!("s{n}-src")).await?,
            ctx.bucket(&format!("s{n}-dst")).await?,
        );
        let db = ctx.database(&format!("s{n}")).await?;
        eprintln!("== seeding {n}");
        ctx.seed(&pair.0, n, Some(&db)).await?;
        let mut got = Vec::new();
        for what in SCALED {
            let m = match what {
                "run" => {
                    let hop = Hop::new(&pair.0, "image/", &pair.1);
                    let m = relocator_run(ctx, hop, &db, 64, n, 1).await?;
                    (m.seconds, m.peak_rss_kb)
                }
                "verify --orphans" => {
                    // Every row points away from both prefixes: every object is an orphan.
                    ctx.sql(&db, "UPDATE avatars SET path = 'away/' || path")
                        .await?;
                    let m = relocator_cmd(ctx, (&pair.0, &pair.1), &db, what).await?;
                    ctx.sql(&db, "UPDATE avatars SET path = substr(path, 6)")
                        .await?;
                    m
                }
                _ => relocator_cmd(ctx, (&pair.0, &pair.1), &db, what).await?,
            };
            eprintln!(
                "{n} rows: {what}: {:.1} s, peak RSS {} KB",
                m.0,
                m.1.unwrap_or(0)
            );
            got.push(m);
        }
        peaks.push(got);
        ctx.drop_bucket(&pair.0).await;
        ctx.drop_bucket(&pair.1).await;
        ctx.drop_database(&db).await;
    }
    println!("| command | 10,000 rows | 100,000 rows | ratio |");
    println!("|---|---:|---:|---:|");
    let mut json = serde_json::Map::new();
    for (i, what) in SCALED.iter().enumerate() {
        let (small, large) = (peaks[0][i], peaks[1][i]);
        let (s, l) = (small.1.unwrap_or(0), large.1.unwrap_or(0));
        let ratio = l as f64 / s.max(1) as f64;
        println!(
            "| `{what}` | {:.1} MB | {:.1} MB | {ratio:.2} |",
            s as f64 / 1024.0,
            l as f64 / 1024.0
        );
        json.insert(
            what.to_string(),
            serde_json::json!({
                "rows_10000": {"seconds": small.0, "peak_rss_kb": s},
                "rows_100000": {"seconds": large.0, "peak_rss_kb": l},
                "rss_ratio": ratio,
            }),
        );
    }
    println!("(target: every ratio <= 1.15, every peak < 100 MB)");
    std::fs::write(
        ctx.args.out.join("scaling.json"),
        serde_json::to_string_pretty(&serde_json::Value::Object(json))?,
    )?;
    Ok(())
}

/// One relocator command other than `run` on the table (`what` as in [`SCALED`]):
/// (seconds, peak RSS in KB).
async fn relocator_cmd(
    ctx: &Ctx<'_>,
    (src, dst): (&str, &str),
    db: &str,
    what: &str,
) -> Result<(f64, Option<u64>)> {
    let mut cmd = time_cmd(&ctx.args.relocator);
    let words: Vec<&str> = what.split(' ').collect();
    cmd.arg(words[0]).args([
        "--source",
        &format!("s3://{src}/image/"),
        "--dest",
        &format!("s3://{dst}/avatar/"),
    ]);
    match what {
        "backup" => {
            cmd.arg("--out")
                .arg(ctx.args.out.join("scaling-backup.csv"));
        }
        "plan" => {
            cmd.arg("--out").arg(ctx.args.out.join("scaling-plan.csv"));
        }
        "verify --orphans" => {
            cmd.args(["--orphans", "--out"])
                .arg(ctx.args.out.join("scaling-verify.csv"));
        }
        "verify" | "rollback" => {
            cmd.arg("--concurrency").arg("64");
        }
        _ => {}
    }
    cmd.env("DATABASE_URL", db)
        .env("RUST_LOG", "warn")
        .env_remove("AWS_CA_BUNDLE");
    let (secs, rss, _) = timed(cmd).await?;
    Ok((secs, rss))
}

/// Two `relocator run` processes sharing one table through their leases, against one,
/// and — for what the server allows — the ceiling's copies with two clients against one.
async fn workers(ctx: &Ctx<'_>) -> Result<()> {
    let n = ctx.args.objects;
    let mut runs = Vec::new();
    for procs in [1usize, 2] {
        let pair = (
            ctx.bucket(&format!("w{procs}-src")).await?,
            ctx.bucket(&format!("w{procs}-dst")).await?,
        );
        let db = ctx.database(&format!("w{procs}")).await?;
        eprintln!("== seeding {n}; then {procs} relocator process(es) on the table");
        let keys = ctx.seed(&pair.0, n, Some(&db)).await?;
        // The server's side of the question: one copying client against two, each at 64.
        let trial = &keys[..keys.len().min(3000)];
        let t = Instant::now();
        let copies = (0..procs).map(|i| {
            let part: Vec<String> = trial.iter().skip(i).step_by(procs).cloned().collect();
            let (client, src) = (&ctx.client, &pair.0);
            async move {
                let prefix = format!("trial-{i}/");
                copy_keys(client, src, src, &prefix, &part, 64, &AtomicU64::new(0)).await
            }
        });
        futures::future::try_join_all(copies).await?;
        let ceiling = trial.len() as f64 / t.elapsed().as_secs_f64();
        let hop = Hop::new(&pair.0, "image/", &pair.1);
        let m = relocator_run(ctx, hop, &db, 64, n, procs).await?;
        eprintln!(
            "{procs} process(es): relocator {:.0} objects/s, ceiling {ceiling:.0} copies/s",
            m.objects_per_sec
        );
        runs.push((m.objects_per_sec, ceiling));
        ctx.drop_bucket(&pair.0).await;
        ctx.drop_bucket(&pair.1).await;
        ctx.drop_database(&db).await;
    }
    let (one, two) = (runs[0], runs[1]);
    println!(
        "two relocator processes / one = {:.2} (target >= 1.6 when the server allows it); \
         the server: two copying clients / one = {:.2}",
        two.0 / one.0,
        two.1 / one.1
    );
    std::fs::write(
        ctx.args.out.join("workers.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "rows": n,
            "relocator_objects_per_sec": {"one": one.0, "two": two.0, "ratio": two.0 / one.0},
            "ceiling_copies_per_sec": {"one": one.1, "two": two.1, "ratio": two.1 / one.1},
        }))?,
    )?;
    Ok(())
}

impl Ctx<'_> {
    /// Count the objects at `bucket`/`prefix` while a tool runs, unless the tools are
    /// measured alone (the matrix): then only the start and the end are known.
    fn sampler(
        &self,
        bucket: &str,
        prefix: &'static str,
        expected: usize,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<Vec<(f64, u64)>> {
        if !self.sample {
            return tokio::spawn(async { Vec::new() });
        }
        sampler(
            self.client.clone(),
            bucket.to_owned(),
            prefix,
            expected,
            stop,
        )
    }

    /// A fresh bucket.
    async fn bucket(&self, what: &str) -> Result<String> {
        let b = format!("{}-{what}", self.tag);
        self.client
            .create_bucket()
            .bucket(&b)
            .send()
            .await
            .with_context(|| {
                format!("creating bucket {b} (is the stack up? scripts/stack.sh up)")
            })?;
        Ok(b)
    }

    /// A fresh database; returns its URL.
    async fn database(&self, what: &str) -> Result<String> {
        let name = format!("{}_{what}", self.tag.replace('-', "_"));
        let (admin, conn) = tokio_postgres::connect(&self.args.database_url, tokio_postgres::NoTls)
            .await
            .context("connecting to PostgreSQL (is the stack up? scripts/stack.sh up)")?;
        tokio::spawn(conn);
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await?;
        let mut u = url::Url::parse(&self.args.database_url)?;
        u.set_path(&format!("/{name}"));
        Ok(u.to_string())
    }

    /// Seed `n` rows' objects into `bucket` under image/; rows too when `db` is given.
    /// Returns the distinct keys.
    async fn seed(&self, bucket: &str, n: usize, db: Option<&str>) -> Result<Vec<String>> {
        let target = S3Location::parse("--target", &format!("s3://{bucket}/image/"))?;
        if let Some(db) = db {
            let cfg = seed::SeedConfig {
                database_url: DatabaseUrl::new(db)?,
                table: TableName::parse("avatars")?,
                target,
                rows: n,
                missing: 0,
                seed: 1,
                sizes: self.sizes.clone(),
                concurrency: 64,
                clear: Vec::new(),
                s3: self.settings.clone(),
            };
            seed::seed(&cfg).await?;
        }
        let mut keys: Vec<String> = seed::rows("image/", n, 0, 1)
            .into_iter()
            .map(|r| r.path)
            .collect();
        keys.sort();
        keys.dedup();
        if db.is_none() {
            stream::iter(&keys)
                .map(|k| async move {
                    let body = seed::object_bytes(1, k, &self.sizes);
                    s3::Endpoint::from(self.client.clone())
                        .put(bucket, k, body, seed::content_type(k))
                        .await
                })
                .buffer_unordered(64)
                .try_collect::<Vec<_>>()
                .await?;
        }
        Ok(keys)
    }

    async fn drop_bucket(&self, b: &str) {
        let mut token = None;
        loop {
            let Ok(out) = self
                .client
                .list_objects_v2()
                .bucket(b)
                .set_continuation_token(token)
                .send()
                .await
            else {
                return;
            };
            let keys: Vec<String> = out
                .contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned))
                .collect();
            for chunk in keys.chunks(1000) {
                let _ = s3::Endpoint::from(self.client.clone())
                    .delete_many(b, chunk)
                    .await;
            }
            token = out.next_continuation_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        let _ = self.client.delete_bucket().bucket(b).send().await;
    }

    /// One statement on a database the bench created.
    async fn sql(&self, url: &str, statement: &str) -> Result<()> {
        let (db, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        db.batch_execute(statement)
            .await
            .with_context(|| format!("running {statement}"))
    }

    async fn drop_database(&self, url: &str) {
        let name = url.rsplit('/').next().unwrap_or_default().to_owned();
        if let Ok((admin, conn)) =
            tokio_postgres::connect(&self.args.database_url, tokio_postgres::NoTls).await
        {
            tokio::spawn(conn);
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await;
        }
    }
}

/// Count the objects under `prefix` until `stop`: once a second, or once per 20,000
/// expected objects' worth of seconds (a count lists the whole prefix, which at a
/// million objects would otherwise be a load of its own).
fn sampler(
    client: Client,
    bucket: String,
    prefix: &'static str,
    expected: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(f64, u64)>> {
    let every = Duration::from_secs((expected as u64 / 20_000).max(1));
    tokio::spawn(async move {
        let start = Instant::now();
        let mut samples = vec![(0.0, 0)];
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(every).await;
            if let Ok(n) = count(&client, &bucket, prefix).await {
                samples.push((start.elapsed().as_secs_f64(), n));
            }
        }
        samples
    })
}

async fn count(client: &Client, bucket: &str, prefix: &str) -> Result<u64> {
    let mut n = 0;
    let mut token = None;
    loop {
        let out = client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_continuation_token(token)
            .send()
            .await?;
        n += out.key_count().unwrap_or(0) as u64;
        token = out.next_continuation_token().map(str::to_owned);
        if token.is_none() {
            return Ok(n);
        }
    }
}

/// Copy `keys` from `src` to `dst` (under `prefix`) at concurrency `c`; objects copied.
async fn copy_keys(
    client: &Client,
    src: &str,
    dst: &str,
    prefix: &str,
    keys: &[String],
    c: usize,
    done: &AtomicU64,
) -> Result<()> {
    stream::iter(keys)
        .map(|k| async move {
            let rest = k.split_once('/').map_or(k.as_str(), |(_, r)| r);
            let dst_key = format!("{prefix}{rest}");
            client
                .copy_object()
                .copy_source(s3::copy_source(src, k))
                .bucket(dst)
                .key(dst_key)
                .send()
                .await
                .with_context(|| format!("copying {k}"))?;
            done.fetch_add(1, Ordering::Relaxed);
            Ok::<_, anyhow::Error>(k.clone())
        })
        .buffer_unordered(c)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// Try each concurrency on a slice of the keys (copies to a scratch prefix); the best.
async fn best_concurrency(ctx: &Ctx<'_>, src: &str, keys: &[String]) -> Result<usize> {
    let trial = &keys[..keys.len().min(1500)];
    let mut best = (0, 0.0);
    for &c in &ctx.args.concurrency {
        let t = Instant::now();
        copy_keys(
            &ctx.client,
            src,
            src,
            &format!("trial-{c}/"),
            trial,
            c,
            &AtomicU64::new(0),
        )
        .await?;
        let rate = trial.len() as f64 / t.elapsed().as_secs_f64();
        eprintln!("   concurrency {c}: {rate:.0} copies/s");
        if rate > best.1 {
            best = (c, rate);
        }
    }
    Ok(best.0)
}

async fn ceiling(ctx: &Ctx<'_>, hop: Hop<'_>, keys: &[String], c: usize) -> Result<Measured> {
    let (src, dst) = (hop.src, hop.dst);
    let stop = Arc::new(AtomicBool::new(false));
    let sampling = ctx.sampler(dst, hop.to, keys.len(), stop.clone());
    let cpu = matrix::Cpu::start(ctx.server_pid);
    let t = Instant::now();
    // Copy everything, deleting the sources in batches of 1,000 as copies complete.
    let done = AtomicU64::new(0);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(4096);
    let client = ctx.client.clone();
    let src_bucket = src.to_owned();
    let deleter = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(1000);
        let mut deletes = 0u64;
        while let Some(k) = rx.recv().await {
            batch.push(k);
            if batch.len() == 1000 {
                s3::Endpoint::from(client.clone())
                    .delete_many(&src_bucket, &batch)
                    .await?;
                deletes += 1;
                batch.clear();
            }
        }
        if !batch.is_empty() {
            s3::Endpoint::from(client.clone())
                .delete_many(&src_bucket, &batch)
                .await?;
            deletes += 1;
        }
        Ok::<_, anyhow::Error>(deletes)
    });
    stream::iter(keys)
        .map(|k| {
            let tx = tx.clone();
            let done = &done;
            async move {
                copy_keys(
                    &ctx.client,
                    src,
                    dst,
                    hop.to,
                    std::slice::from_ref(k),
                    1,
                    done,
                )
                .await?;
                tx.send(k.clone()).await.ok();
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(c)
        .try_collect::<Vec<_>>()
        .await?;
    drop(tx);
    let deletes = deleter.await??;
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu.end(None);
    stop.store(true, Ordering::Relaxed);
    let mut samples = sampling.await?;
    samples.push((secs, keys.len() as u64));
    Ok(Measured {
        tool: "s3 ceiling",
        cpu,
        objects: keys.len(),
        seconds: secs,
        objects_per_sec: keys.len() as f64 / secs,
        peak_rss_kb: None,
        s3_writes_per_object: Some((keys.len() as u64 + deletes) as f64 / keys.len() as f64),
        s3_reads_per_object: Some(0.0),
        db_round_trips_per_1000_rows: None,
        samples,
    })
}

/// Run `cmd` under /usr/bin/time; returns (seconds, peak RSS in KB, stderr).
async fn timed(mut cmd: tokio::process::Command) -> Result<(f64, Option<u64>, String)> {
    let t = Instant::now();
    let out = cmd.stderr(std::process::Stdio::piped()).output().await?;
    let secs = t.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let rss = err.lines().rev().find_map(|l| {
        l.strip_prefix("peak_rss_kb=")
            .and_then(|v| v.trim().parse().ok())
    });
    if !out.status.success() && out.status.code() != Some(3) {
        bail!("{:?} failed: {err}", cmd.as_std().get_program());
    }
    Ok((secs, rss, err))
}

fn time_cmd(program: &Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("/usr/bin/time");
    c.args(["-f", "peak_rss_kb=%M\ncpu_seconds=%U %S"])
        .arg(program);
    c
}

/// `rclone move` of everything under `src`'s prefix to `dst`'s (bucket, prefix).
async fn rclone(ctx: &Ctx<'_>, hop: Hop<'_>, c: usize) -> Result<Measured> {
    let (src, dst) = (hop.src, hop.dst);
    let n = count(&ctx.client, src, hop.from).await?;
    let mut cmd = time_cmd(Path::new("rclone"));
    cmd.args([
        "move",
        &format!("bench:{src}/{}", hop.from.trim_end_matches('/')),
        &format!("bench:{dst}/{}", hop.to.trim_end_matches('/')),
    ])
    .args(["--transfers", &c.to_string(), "--checkers", &c.to_string()])
    .args(["--fast-list", "--s3-no-check-bucket", "--retries", "3"])
    .env("RCLONE_CONFIG_BENCH_TYPE", "s3")
    .env("RCLONE_CONFIG_BENCH_PROVIDER", "Other")
    .env("RCLONE_CONFIG_BENCH_ENDPOINT", &ctx.args.endpoint_url)
    .env("AWS_ENDPOINT_URL", &ctx.args.endpoint_url)
    .env("RCLONE_CONFIG_BENCH_ENV_AUTH", "true")
    .env("RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE", "true")
    .env(
        "RCLONE_CONFIG_BENCH_REGION",
        std::env::var("AWS_REGION").unwrap_or_default(),
    )
    .env_remove("AWS_CA_BUNDLE");
    let stop = Arc::new(AtomicBool::new(false));
    let sampling = ctx.sampler(dst, hop.to, n as usize, stop.clone());
    let cpu = matrix::Cpu::start(ctx.server_pid);
    let (secs, rss, err) = timed(cmd).await?;
    let cpu = cpu.end(matrix::child_cpu(&err));
    stop.store(true, Ordering::Relaxed);
    let mut samples = sampling.await?;
    let moved = count(&ctx.client, dst, hop.to).await?;
    if moved != n {
        bail!("rclone moved {moved} of {n} objects");
    }
    samples.push((secs, moved));
    Ok(Measured {
        tool: "rclone move",
        cpu,
        objects: n as usize,
        seconds: secs,
        objects_per_sec: n as f64 / secs,
        peak_rss_kb: rss,
        s3_writes_per_object: None,
        s3_reads_per_object: None,
        db_round_trips_per_1000_rows: None,
        samples,
    })
}

/// `relocator run` from `src` to `dst`: `procs` processes at once on the one table (their
/// leases share the work). Seconds until the last ends; the peak RSS of the largest.
async fn relocator_run(
    ctx: &Ctx<'_>,
    hop: Hop<'_>,
    db: &str,
    c: usize,
    rows: usize,
    procs: usize,
) -> Result<Measured> {
    relocator_binary_run(
        ctx,
        &ctx.args.relocator,
        "relocator run",
        hop,
        db,
        c,
        rows,
        procs,
    )
    .await
}

/// [`relocator_run`] with another relocator binary, measured as `tool`.
#[allow(clippy::too_many_arguments)]
async fn relocator_binary_run(
    ctx: &Ctx<'_>,
    binary: &Path,
    tool: &'static str,
    hop: Hop<'_>,
    db: &str,
    c: usize,
    rows: usize,
    procs: usize,
) -> Result<Measured> {
    let (src, dst) = (hop.src, hop.dst);
    let objects = count(&ctx.client, src, hop.from).await?;
    let summaries: Vec<PathBuf> = (0..procs)
        .map(|i| ctx.args.out.join(format!("relocator-summary-{i}.json")))
        .collect();
    let cmds = summaries.iter().map(|summary| {
        let mut cmd = time_cmd(binary);
        cmd.args([
            "run",
            "--source",
            &format!("s3://{src}/{}", hop.from),
            "--dest",
            &format!("s3://{dst}/{}", hop.to),
        ])
        .args(["--concurrency", &c.to_string()])
        .arg("--summary-json")
        .arg(summary)
        .env("DATABASE_URL", db)
        .env("AWS_ENDPOINT_URL", &ctx.args.endpoint_url)
        .env("RUST_LOG", "warn")
        .env_remove("AWS_CA_BUNDLE");
        timed(cmd)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let sampling = ctx.sampler(dst, hop.to, objects as usize, stop.clone());
    let cpu = matrix::Cpu::start(ctx.server_pid);
    let t = Instant::now();
    let ended = futures::future::try_join_all(cmds).await?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu.end(
        ended
            .iter()
            .map(|(_, _, e)| matrix::child_cpu(e))
            .sum::<Option<f64>>(),
    );
    stop.store(true, Ordering::Relaxed);
    let mut samples = sampling.await?;
    samples.push((secs, objects));
    let rss = ended.iter().filter_map(|(_, rss, _)| *rss).max();
    let err: String = ended.iter().map(|(_, _, e)| e.as_str()).collect();
    let mut counters: std::collections::HashMap<String, f64> = Default::default();
    let mut moved = 0;
    for summary in &summaries {
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(summary)?)?;
        moved += s["outcomes"]["moved"].as_u64().unwrap_or(0);
        if let Some(m) = s["counters"].as_object() {
            for (k, v) in m {
                *counters.entry(k.clone()).or_default() += v.as_f64().unwrap_or(0.0);
            }
        }
    }
    if moved != rows as u64 {
        bail!("relocator moved {moved} of {rows} rows: {err}");
    }
    let counter = |k: &str| counters.get(k).copied().unwrap_or(0.0);
    Ok(Measured {
        tool,
        cpu,
        objects: objects as usize,
        seconds: secs,
        objects_per_sec: objects as f64 / secs,
        peak_rss_kb: rss,
        s3_writes_per_object: Some(counter("s3_writes") / objects as f64),
        s3_reads_per_object: Some(counter("s3_reads") / objects as f64),
        db_round_trips_per_1000_rows: Some(counter("db_round_trips") * 1000.0 / rows as f64),
        samples,
    })
}

fn print_table(all: &[Measured; 3]) {
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
    println!(
        "{:<14} {:>8} {:>9} {:>10} {:>12} {:>13} {:>12} {:>16}",
        "tool",
        "objects",
        "seconds",
        "objects/s",
        "peak RSS MB",
        "S3 writes/obj",
        "S3 reads/obj",
        "DB trips/1000 rows"
    );
    for m in all {
        println!(
            "{:<14} {:>8} {:>9.1} {:>10.0} {:>12} {:>13} {:>12} {:>16}",
            m.tool,
            m.objects,
            m.seconds,
            m.objects_per_sec,
            m.peak_rss_kb
                .map(|k| format!("{:.1}", k as f64 / 1024.0))
                .unwrap_or_else(|| "-".into()),
            opt(m.s3_writes_per_object),
            opt(m.s3_reads_per_object),
            opt(m.db_round_trips_per_1000_rows),
        );
    }
    let [a, b, c] = all;
    println!(
        "relocator / ceiling = {:.2} (target >= 0.85); relocator / rclone = {:.2} (target >= 1.5)",
        c.objects_per_sec / a.objects_per_sec,
        c.objects_per_sec / b.objects_per_sec
    );
}

fn write_outputs(out: &Path, all: &[Measured; 3], concurrency: usize) -> Result<()> {
    let mut w = csv::Writer::from_path(out.join("bench.csv"))?;
    w.write_record(["tool", "seconds", "objects_done"])?;
    for m in all {
        for (t, n) in &m.samples {
            w.write_record([m.tool, &format!("{t:.2}"), &n.to_string()])?;
        }
    }
    w.flush()?;
    let [a, b, c] = all;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "concurrency": concurrency,
            "tools": all,
            "relocator_over_ceiling": c.objects_per_sec / a.objects_per_sec,
            "relocator_over_rclone": c.objects_per_sec / b.objects_per_sec,
        }))?,
    )?;
    if let Err(e) = chart(&out.join("bench.png"), all) {
        eprintln!("chart not drawn: {e:#}");
    }
    Ok(())
}

/// objects/s over time, one line per tool.
fn chart(path: &Path, all: &[Measured; 3]) -> Result<()> {
    use plotters::prelude::*;
    let font = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"]
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .context("no DejaVu font (apt-get install fonts-dejavu-core)")?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("cannot load the font"))?;
    let rates: Vec<Vec<(f64, f64)>> = all
        .iter()
        .map(|m| {
            m.samples
                .windows(2)
                .filter(|w| w[1].0 > w[0].0)
                .map(|w| {
                    (
                        w[1].0,
                        (w[1].1.saturating_sub(w[0].1)) as f64 / (w[1].0 - w[0].0),
                    )
                })
                .collect()
        })
        .collect();
    let max_t = rates.iter().flatten().map(|p| p.0).fold(1.0, f64::max);
    let max_r = rates.iter().flatten().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let root = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "objects/s over time (same objects, same server, one run)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_t, 0.0..max_r)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("objects/s")
        .label_style(("sans-serif", 14))
        .draw()?;
    let colors = [RED, BLUE, GREEN];
    for ((m, pts), color) in all.iter().zip(&rates).zip(colors) {
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(format!("{} ({:.0}/s)", m.tool, m.objects_per_sec))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}
