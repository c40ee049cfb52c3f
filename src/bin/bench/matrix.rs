//! The benchmark's table: every tool alone on one S3 server, for each schema (the path
//! column indexed, and not — the application's table as it usually is), in a rotating
//! order, `--reps` times; medians and spreads, and the ratios of each repetition.
//!
//! The objects are seeded once per schema and handed on from tool to tool: each moves
//! everything from one bucket and prefix to a fresh bucket and the other prefix (`image/`
//! ↔ `avatar/`), so every run moves the same objects and no run shares the server with
//! seeding, sampling or another tool. Before a tool that rewrites rows, the rows are
//! pointed at where the objects are (outside the timing, then `VACUUM ANALYZE`).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use futures::{stream, StreamExt, TryStreamExt};
use serde::Serialize;

use crate::{best_concurrency, ceiling, count, rclone, relocator_run, Ctx, Measured};

/// One tool's move of every object from (src, from) to (dst, to).
#[derive(Debug, Clone, Copy)]
pub struct Hop<'a> {
    pub src: &'a str,
    pub from: &'static str,
    pub dst: &'a str,
    pub to: &'static str,
}

impl<'a> Hop<'a> {
    /// From `src`/`from` to `dst` under the other prefix.
    pub fn new(src: &'a str, from: &'static str, dst: &'a str) -> Self {
        let to = if from == "image/" {
            "avatar/"
        } else {
            "image/"
        };
        Hop { src, from, dst, to }
    }
}

/// CPU seconds spent while a tool ran: by the tool (its process, or this one for the
/// in-process tools), by the S3 server, and the machine's busy share of both cores.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuUse {
    pub tool_seconds: Option<f64>,
    pub server_seconds: Option<f64>,
    pub machine_busy: Option<f64>,
}

pub struct Cpu {
    server_pid: Option<u32>,
    server: Option<f64>,
    own: Option<f64>,
    machine: Option<(u64, u64)>,
}

const TICKS: f64 = 100.0;

/// utime + stime of a process, in seconds.
fn proc_cpu(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / TICKS)
}

/// (busy, total) jiffies of the whole machine.
fn machine() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

impl Cpu {
    pub fn start(server_pid: Option<u32>) -> Self {
        Cpu {
            server_pid,
            server: server_pid.and_then(|p| proc_cpu(&p.to_string())),
            own: proc_cpu("self"),
            machine: machine(),
        }
    }

    /// `child`: the tool's own CPU seconds when it ran as a child process; else this
    /// process's.
    pub fn end(self, child: Option<f64>) -> CpuUse {
        let server = self
            .server_pid
            .and_then(|p| proc_cpu(&p.to_string()))
            .zip(self.server)
            .map(|(b, a)| b - a);
        let own = proc_cpu("self").zip(self.own).map(|(b, a)| b - a);
        let busy = machine().zip(self.machine).map(|(b, a)| {
            let (busy, total) = (b.0 - a.0, b.1 - a.1);
            busy as f64 / total.max(1) as f64
        });
        CpuUse {
            tool_seconds: child.or(own),
            server_seconds: server,
            machine_busy: busy,
        }
    }
}

/// A child's CPU seconds from `/usr/bin/time`'s `cpu_seconds=U S` line.
pub fn child_cpu(stderr: &str) -> Option<f64> {
    let line = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("cpu_seconds="))?;
    let (u, s) = line.trim().split_once(' ')?;
    Some(u.parse::<f64>().ok()? + s.parse::<f64>().ok()?)
}

/// The tools, in the order of the first repetition; each later one starts one further.
/// "relocator before" (`--before`) goes last.
const TOOLS: [&str; 5] = [
    "s3 ceiling",
    "rclone move",
    "relocator run",
    "per-object script",
    "relocator before",
];

/// The script pattern's threads: Python's `ThreadPoolExecutor` default,
/// `min(32, cores + 4)` (one database session each).
fn script_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores + 4).min(32)
}

/// What one request of each kind costs the S3 server in CPU (milliseconds), measured on
/// a scratch prefix with no other traffic: where each tool's server time goes.
#[derive(Debug, Serialize)]
struct RequestCosts {
    server: String,
    put: f64,
    head: f64,
    head_missing: f64,
    copy: f64,
    list_page_1000: f64,
    delete_objects_per_key: f64,
    delete_object: f64,
}

const COST_KEYS: usize = 2000;

async fn request_costs(ctx: &Ctx<'_>, label: &str) -> Result<RequestCosts> {
    let pid = ctx
        .server_pid
        .context("--server-pid is needed to measure the server's CPU")?;
    let bucket = ctx.bucket("costs").await?;
    let keys: Vec<String> = (0..COST_KEYS).map(|i| format!("a/k{i:05}.png")).collect();
    let ep = relocator::s3::Endpoint::from(ctx.client.clone());
    // The server's CPU milliseconds per item of `items`, each a request sent by `f`.
    async fn per<'k, F, Fut>(pid: u32, items: &'k [String], f: F) -> Result<f64>
    where
        F: Fn(&'k String) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let cpu = Cpu::start(Some(pid));
        stream::iter(items)
            .map(f)
            .buffer_unordered(32)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(cpu.end(None).server_seconds.unwrap_or(f64::NAN) * 1000.0 / items.len() as f64)
    }
    let (b, c, e) = (&bucket, &ctx.client, &ep);
    let put = per(pid, &keys, |k| async move {
        e.put(b, k, vec![7u8; 2048], "image/png").await?;
        Ok(())
    })
    .await?;
    let head = per(pid, &keys, |k| async move {
        c.head_object().bucket(b).key(k).send().await?;
        Ok(())
    })
    .await?;
    let head_missing = per(pid, &keys, |k| async move {
        let _ = c.head_object().bucket(b).key(format!("x/{k}")).send().await;
        Ok(())
    })
    .await?;
    let copy = per(pid, &keys, |k| async move {
        c.copy_object()
            .copy_source(relocator::s3::copy_source(b, k))
            .bucket(b)
            .key(format!("z/{k}"))
            .send()
            .await?;
        Ok(())
    })
    .await?;
    let pages: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    let list_page_1000 = per(pid, &pages, |_| async move {
        c.list_objects_v2()
            .bucket(b)
            .prefix("a/")
            .max_keys(1000)
            .send()
            .await?;
        Ok(())
    })
    .await?;
    let chunks: Vec<String> = (0..COST_KEYS / 1000).map(|i| i.to_string()).collect();
    let delete_objects_per_key = per(pid, &chunks, |i| {
        let i: usize = i.parse().unwrap_or(0);
        let chunk = keys[i * 1000..(i + 1) * 1000].to_vec();
        async move {
            e.delete_many(b, &chunk).await?;
            Ok(())
        }
    })
    .await?
        / 1000.0;
    let delete_object = per(pid, &keys, |k| async move {
        c.delete_object()
            .bucket(b)
            .key(format!("z/{k}"))
            .send()
            .await?;
        Ok(())
    })
    .await?;
    ctx.drop_bucket(&bucket).await;
    Ok(RequestCosts {
        server: label.to_owned(),
        put,
        head,
        head_missing,
        copy,
        list_page_1000,
        delete_objects_per_key,
        delete_object,
    })
}

#[derive(Debug, Serialize)]
struct Cell {
    server: String,
    schema: &'static str,
    objects: usize,
    rows: usize,
    concurrency: usize,
    /// Every run, in the order made: (repetition, measurement).
    runs: Vec<(usize, Measured)>,
}

/// Run the matrix on this server (`--label` names its configuration); writes
/// `matrix-<label>.json` and prints its part of the table.
pub async fn matrix(ctx: &Ctx<'_>) -> Result<()> {
    let n = ctx.args.objects;
    let label = ctx.args.label.clone();
    eprintln!("== {label}: what each kind of request costs the server");
    let costs = request_costs(ctx, &label).await?;
    std::fs::write(
        ctx.args.out.join(format!("costs-{label}.json")),
        serde_json::to_string_pretty(&costs)?,
    )?;
    let mut cells = Vec::new();
    for (schema, indexed) in [("path indexed", true), ("path not indexed", false)] {
        eprintln!("== {label}, {schema}: seeding {n} rows and their objects");
        let db = ctx.database(if indexed { "mi" } else { "mn" }).await?;
        let mut bucket = ctx
            .bucket(&format!("{}-0", &schema[..9].replace(' ', "")))
            .await?;
        let keys = ctx.seed(&bucket, n, Some(&db)).await?;
        if !indexed {
            ctx.sql(&db, "DROP INDEX avatars_path_idx").await?;
        }
        ctx.sql(&db, "VACUUM ANALYZE avatars").await?;
        let best = best_concurrency(ctx, &bucket, &keys).await?;
        let mut prefix: &'static str = "image/";
        let mut rows_at: &'static str = "image/";
        let mut runs = Vec::new();
        let mut hop_no = 0;
        let tools = if ctx.args.before.is_some() {
            &TOOLS[..]
        } else {
            &TOOLS[..4]
        };
        for rep in 0..ctx.args.reps {
            for i in 0..tools.len() {
                let tool = tools[(i + rep) % tools.len()];
                hop_no += 1;
                let next = ctx
                    .bucket(&format!("{}-{hop_no}", &schema[..9].replace(' ', "")))
                    .await?;
                let hop = Hop::new(&bucket, prefix, &next);
                let rewrites = matches!(
                    tool,
                    "relocator run" | "per-object script" | "relocator before"
                );
                if rewrites && rows_at != prefix {
                    point_rows(ctx, &db, prefix).await?;
                    rows_at = prefix;
                }
                eprintln!("== {label}, {schema}, repetition {}: {tool}", rep + 1);
                let m = match tool {
                    "s3 ceiling" => {
                        let keys = list(ctx, &bucket, prefix).await?;
                        ceiling(ctx, hop, &keys, best).await?
                    }
                    "rclone move" => rclone(ctx, hop, best).await?,
                    "relocator run" => relocator_run(ctx, hop, &db, best, n, 1).await?,
                    "relocator before" => {
                        let before = ctx.args.before.as_deref().context("--before")?;
                        let t = "relocator before";
                        crate::relocator_binary_run(ctx, before, t, hop, &db, best, n, 1).await?
                    }
                    _ => script(ctx, hop, &db, script_threads()).await?,
                };
                if rewrites {
                    rows_at = hop.to;
                }
                let left = count(&ctx.client, &bucket, prefix).await?;
                let there = count(&ctx.client, &next, hop.to).await?;
                if left != 0 || there != keys.len() as u64 {
                    bail!(
                        "{tool} left {left} objects and moved {there} of {}",
                        keys.len()
                    );
                }
                eprintln!("   {:.0} objects/s", m.objects_per_sec);
                runs.push((rep, m));
                let to = hop.to;
                ctx.drop_bucket(&bucket).await;
                bucket = next;
                prefix = to;
            }
        }
        ctx.drop_bucket(&bucket).await;
        ctx.drop_database(&db).await;
        cells.push(Cell {
            server: label.clone(),
            schema,
            objects: keys.len(),
            rows: n,
            concurrency: best,
            runs,
        });
    }
    let out = ctx.args.out.join(format!("matrix-{label}.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&cells)?)?;
    eprintln!("== written {}", out.display());
    print_table(&[out])?;
    Ok(())
}

/// The request costs of the servers whose matrix files are given (`costs-<label>.json`
/// beside each).
fn print_costs(files: &[std::path::PathBuf]) -> Result<()> {
    println!("S3 server CPU per request, milliseconds (no other traffic; 2,000 requests each)");
    println!(
        "| server | PUT 2 KiB | HEAD | HEAD (missing) | CopyObject | ListObjectsV2 (1,000 keys) \
         | DeleteObjects, per key | DeleteObject |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for f in files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let costs = f.with_file_name(name.replacen("matrix-", "costs-", 1));
        let Ok(text) = std::fs::read_to_string(&costs) else {
            continue;
        };
        let c: serde_json::Value = serde_json::from_str(&text)?;
        let v = |k: &str| c[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:.2} |",
            c["server"].as_str().unwrap_or("?"),
            v("put"),
            v("head"),
            v("head_missing"),
            v("copy"),
            v("list_page_1000"),
            v("delete_objects_per_key"),
            v("delete_object"),
        );
    }
    println!();
    Ok(())
}

/// The keys under `prefix`, in listing order.
async fn list(ctx: &Ctx<'_>, bucket: &str, prefix: &str) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut token = None;
    loop {
        let out = ctx
            .client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_continuation_token(token)
            .send()
            .await?;
        keys.extend(
            out.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
        token = out.next_continuation_token().map(str::to_owned);
        if token.is_none() {
            return Ok(keys);
        }
    }
}

/// Point every row at `prefix` (keeping the rest of its path), then tidy the table.
async fn point_rows(ctx: &Ctx<'_>, db: &str, prefix: &str) -> Result<()> {
    ctx.sql(
        db,
        &format!("UPDATE avatars SET path = '{prefix}' || substr(path, strpos(path, '/') + 1)"),
    )
    .await?;
    ctx.sql(db, "VACUUM ANALYZE avatars").await
}

/// The pattern relocator replaces, as a hand-written migration script does it: read the
/// rows, then from a thread pool (its default size, [`script_threads`]), per row: CopyObject, a one-row UPDATE in
/// its own transaction, DeleteObject. (No check that the destination is free, nor that
/// no other row still references the source: the script's speed is bought with that.)
async fn script(ctx: &Ctx<'_>, hop: Hop<'_>, db: &str, threads: usize) -> Result<Measured> {
    let objects = count(&ctx.client, hop.src, hop.from).await?;
    let cpu = crate::matrix::Cpu::start(ctx.server_pid);
    let t = Instant::now();
    let mut sessions = Vec::new();
    for _ in 0..threads {
        let (c, conn) = tokio_postgres::connect(db, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        sessions.push(tokio::sync::Mutex::new(c));
    }
    let rows: Vec<(i32, String)> = sessions[0]
        .lock()
        .await
        .query(
            "SELECT id, path FROM avatars WHERE starts_with(path, $1)",
            &[&hop.from],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let n_rows = rows.len();
    stream::iter(rows.into_iter().enumerate())
        .map(|(i, (id, path))| {
            let sessions = &sessions;
            async move {
                let rest = path.split_once('/').map_or(path.as_str(), |(_, r)| r);
                let new = format!("{}{rest}", hop.to);
                let copied = ctx
                    .client
                    .copy_object()
                    .copy_source(relocator::s3::copy_source(hop.src, &path))
                    .bucket(hop.dst)
                    .key(&new)
                    .send()
                    .await;
                // Rows sharing a key: another thread may have moved it already.
                if let Err(e) = copied {
                    let there = ctx
                        .client
                        .head_object()
                        .bucket(hop.dst)
                        .key(&new)
                        .send()
                        .await;
                    if there.is_err() {
                        return Err(anyhow::anyhow!("copying {path}: {e}"));
                    }
                }
                let s = sessions[i % sessions.len()].lock().await;
                s.execute("UPDATE avatars SET path = $2 WHERE id = $1", &[&id, &new])
                    .await
                    .with_context(|| format!("updating row {id}"))?;
                drop(s);
                ctx.client
                    .delete_object()
                    .bucket(hop.src)
                    .key(&path)
                    .send()
                    .await
                    .with_context(|| format!("deleting {path}"))?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(threads)
        .try_collect::<Vec<_>>()
        .await?;
    let secs = t.elapsed().as_secs_f64();
    Ok(Measured {
        tool: "per-object script",
        cpu: cpu.end(None),
        objects: objects as usize,
        seconds: secs,
        objects_per_sec: objects as f64 / secs,
        peak_rss_kb: None,
        s3_writes_per_object: Some(2.0 * n_rows as f64 / objects as f64),
        s3_reads_per_object: Some(0.0),
        db_round_trips_per_1000_rows: Some(1000.0),
        samples: Vec::new(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The median of `value` over one tool's runs (a cell's `runs`: [repetition, measured]).
fn median_of(
    runs: &[serde_json::Value],
    tool: &str,
    value: impl Fn(&serde_json::Value) -> Option<f64>,
) -> f64 {
    median(
        runs.iter()
            .filter(|r| r[1]["tool"] == tool)
            .filter_map(|r| value(&r[1]))
            .collect(),
    )
}

fn spread(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// Print the README's table from matrix JSON files (one per server configuration).
pub fn print_table(files: &[std::path::PathBuf]) -> Result<()> {
    print_costs(files)?;
    let mut cells: Vec<serde_json::Value> = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let v: Vec<serde_json::Value> = serde_json::from_str(&text)?;
        cells.extend(v);
    }
    println!(
        "| server | schema | ceiling obj/s | rclone move obj/s | relocator obj/s | script obj/s \
         | relocator / ceiling | relocator / rclone | relocator / script | relocator peak RSS \
         | relocator S3 reads/obj | before: relocator / ceiling | before: relocator / rclone |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in &cells {
        let runs = c["runs"].as_array().cloned().unwrap_or_default();
        let reps = runs
            .iter()
            .filter_map(|r| r[0].as_u64())
            .max()
            .map_or(0, |m| m + 1);
        let rate = |tool: &str, rep: u64| {
            runs.iter()
                .find(|r| r[0].as_u64() == Some(rep) && r[1]["tool"] == tool)
                .and_then(|r| r[1]["objects_per_sec"].as_f64())
        };
        let col = |tool: &str| {
            let v: Vec<f64> = (0..reps).filter_map(|r| rate(tool, r)).collect();
            let (lo, hi) = spread(&v);
            format!("{:.0} ({:.0}–{:.0})", median(v), lo, hi)
        };
        let ratio_of = |mine: &str, other: &str| {
            let v: Vec<f64> = (0..reps)
                .filter_map(|r| Some(rate(mine, r)? / rate(other, r)?))
                .collect();
            if v.is_empty() {
                return "–".to_owned();
            }
            let (lo, hi) = spread(&v);
            format!("**{:.2}** ({:.2}–{:.2})", median(v), lo, hi)
        };
        let ratio = |other: &str| ratio_of("relocator run", other);
        let of_relocator = |field: &str| median_of(&runs, "relocator run", |m| m[field].as_f64());
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} MB | {:.2} | {} | {} |",
            c["server"].as_str().unwrap_or("?"),
            c["schema"].as_str().unwrap_or("?"),
            col("s3 ceiling"),
            col("rclone move"),
            col("relocator run"),
            col("per-object script"),
            ratio("s3 ceiling"),
            ratio("rclone move"),
            ratio("per-object script"),
            of_relocator("peak_rss_kb") / 1024.0,
            of_relocator("s3_reads_per_object"),
            ratio_of("relocator before", "s3 ceiling"),
            ratio_of("relocator before", "rclone move"),
        );
    }
    println!();
    println!("CPU seconds per 1,000 objects (median): tool / S3 server; machine busy share");
    println!("| server | schema | ceiling | rclone move | relocator | script | relocator before |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for c in &cells {
        let runs = c["runs"].as_array().cloned().unwrap_or_default();
        let cpu = |tool: &str| {
            if !runs.iter().any(|r| r[1]["tool"] == tool) {
                return "–".to_owned();
            }
            let of = |field: &str| {
                median_of(&runs, tool, |m| {
                    Some(m["cpu"][field].as_f64()? * 1000.0 / m["objects"].as_f64()?)
                })
            };
            let busy = median_of(&runs, tool, |m| m["cpu"]["machine_busy"].as_f64());
            format!(
                "{:.2} / {:.2}; {:.0}%",
                of("tool_seconds"),
                of("server_seconds"),
                busy * 100.0
            )
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            c["server"].as_str().unwrap_or("?"),
            c["schema"].as_str().unwrap_or("?"),
            cpu("s3 ceiling"),
            cpu("rclone move"),
            cpu("relocator run"),
            cpu("per-object script"),
            cpu("relocator before"),
        );
    }
    Ok(())
}
