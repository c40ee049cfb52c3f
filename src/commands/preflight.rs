//! `relocator preflight`: everything a run needs, checked before anything is touched.
//! Each check that fails names its fix (the GRANT, the IAM action). The only writes are
//! probe objects under the destination prefix, removed again, and the ledger's DDL inside
//! a transaction that is rolled back.

use std::time::Instant;

use anyhow::Result;
use futures::{stream, StreamExt};
use serde::Serialize;

use crate::config::{quote_ident, JobConfig};
use crate::db::{self, TableInfo};
use crate::ledger;
use crate::s3::{self, ObjectInfo, S3};

/// Copies made to measure the server's copy rate.
const SAMPLE_COPIES: usize = 64;

/// How a check came out. `Warn`: a run would succeed, but not as well as it could.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One check: how it came out, what was found, how to fix it.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// Everything preflight found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    /// Rows under the source prefix (exact, or the planner's estimate on huge tables).
    pub rows_to_move: Option<u64>,
    pub rows_exact: bool,
    /// Server-side copies per second measured with [`SAMPLE_COPIES`] probe copies.
    pub copies_per_sec: Option<f64>,
    /// rows_to_move / copies_per_sec: the copy work alone, a lower bound.
    pub estimate_secs: Option<f64>,
}

impl Report {
    /// A run can succeed only if every check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!(
                "{:<5} {:<16} {}\n",
                match c.status {
                    Status::Ok => "ok",
                    Status::Warn => "warn",
                    Status::Fail => "FAIL",
                },
                c.name,
                c.detail
            ));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("{:<22} fix: {fix}\n", ""));
            }
        }
        if let (Some(rows), Some(rate), Some(secs)) =
            (self.rows_to_move, self.copies_per_sec, self.estimate_secs)
        {
            out.push_str(&format!(
                "estimate: {}{rows} rows at about {rate:.0} copies/s (measured with \
                 {SAMPLE_COPIES} probe copies) → at least {}\n",
                if self.rows_exact { "" } else { "~" },
                human_duration(secs)
            ));
        }
        let failed = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count();
        out.push_str(&if failed == 0 {
            format!("preflight: all {} checks passed\n", self.checks.len())
        } else {
            format!(
                "preflight: {failed} of {} checks failed; a run would not succeed\n",
                self.checks.len()
            )
        });
        out
    }

    fn ok(&mut self, name: &'static str, detail: impl Into<String>) {
        self.push(name, Status::Ok, detail.into(), None);
    }

    fn warn(&mut self, name: &'static str, detail: impl Into<String>, fix: String) {
        self.push(name, Status::Warn, detail.into(), Some(fix));
    }

    fn fail(&mut self, name: &'static str, detail: impl Into<String>, fix: Option<String>) {
        self.push(name, Status::Fail, detail.into(), fix);
    }

    fn push(&mut self, name: &'static str, status: Status, detail: String, fix: Option<String>) {
        self.checks.push(Check {
            name,
            status,
            detail,
            fix,
        });
    }
}

fn human_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{:.1} h", s as f64 / 3600.0),
    }
}

/// `relocator preflight`.
pub async fn preflight(cfg: &JobConfig) -> Result<Report> {
    let mut r = Report {
        checks: Vec::new(),
        rows_to_move: None,
        rows_exact: false,
        copies_per_sec: None,
        estimate_secs: None,
    };
    database(cfg, &mut r).await?;
    buckets_and_permissions(cfg, &mut r).await?;
    Ok(r)
}

/// PostgreSQL: connection, table and columns, privileges, ledger, row count.
async fn database(cfg: &JobConfig, r: &mut Report) -> Result<()> {
    let pool = db::pool(&cfg.database_url, 1, None)?;
    let mut client = match db::connect_checked(&pool, &cfg.database_url).await {
        Ok(c) => c,
        Err(e) => {
            r.fail("database", format!("{e:#}"), None);
            return Ok(());
        }
    };
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await?
        .get(0);
    r.ok(
        "database",
        format!("connected to {} as {user}", cfg.database_url),
    );
    let table = match TableInfo::resolve(&client, cfg).await {
        Ok(t) => t,
        Err(e) => {
            r.fail("table", format!("{e:#}"), None);
            return Ok(());
        }
    };
    r.ok(
        "table",
        format!(
            "{}: id column {} ({}, unique), path column {}",
            table.display, table.id_col, table.id_type, table.path_col
        ),
    );
    let role = quote_ident(&user);
    let row = client
        .query_one(
            "SELECT has_schema_privilege(c.relnamespace, 'USAGE'),
                    has_table_privilege(c.oid, 'SELECT'),
                    -- Table-level: the rewrite needs the column, the cleanup's LOCK TABLE
                    -- ... IN SHARE MODE the table.
                    has_table_privilege(c.oid, 'UPDATE'),
                    n.nspname::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = $1::text::regclass",
            &[&table.qualified],
        )
        .await?;
    let (usage, select, update, schema): (bool, bool, bool, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if usage && select {
        r.ok("select", format!("{user} may read {}", table.display));
    } else {
        let mut fix = Vec::new();
        if !usage {
            fix.push(format!(
                "GRANT USAGE ON SCHEMA {} TO {role};",
                quote_ident(&schema)
            ));
        }
        if !select {
            fix.push(format!("GRANT SELECT ON {} TO {role};", table.qualified));
        }
        r.fail(
            "select",
            format!("{user} may not read {}", table.display),
            Some(fix.join(" ")),
        );
    }
    if update {
        r.ok(
            "update",
            format!(
                "{user} may UPDATE {} (the rewrite, and the cleanup's short SHARE lock)",
                table.display
            ),
        );
    } else {
        r.fail(
            "update",
            format!(
                "{user} may not UPDATE {}, so no row could be rewritten (the cleanup's LOCK \
                 TABLE ... IN SHARE MODE, which waits for the application's writes in flight, \
                 needs UPDATE on the table, not only on the path column)",
                table.display
            ),
            Some(format!("GRANT UPDATE ON {} TO {role};", table.qualified)),
        );
    }
    // The ledger's DDL in a transaction that is rolled back: exactly the rights it needs.
    let tx = client.transaction().await?;
    match ledger::apply(&tx).await {
        Ok(()) => r.ok(
            "ledger",
            format!("{user} may create and use relocator's ledger (schema relocator)"),
        ),
        Err(e) => r.fail(
            "ledger",
            format!("{e:#}"),
            Some(format!(
                "CREATE SCHEMA IF NOT EXISTS relocator AUTHORIZATION {role}; (see sql/roles.sql)"
            )),
        ),
    }
    tx.rollback().await?;
    if table.reference.reads_whole_column() {
        r.warn(
            "reference check",
            format!(
                "{} holds URLs or documents, not bare keys: no index finds the rows holding a \
                 key, so each cleanup batch reads the whole column",
                table.reference.scanned_columns().join(" and ")
            ),
            "give a larger --batch-size on a large table (fewer cleanup batches)".to_owned(),
        );
    } else if !table.path_indexed {
        r.warn(
            "path index",
            format!(
                "no index leads with {}: each batch would look rows up with a table scan",
                table.path_col
            ),
            format!(
                "CREATE INDEX CONCURRENTLY ON {} ({});",
                table.qualified, table.path_col
            ),
        );
    }
    for other in &table.referencing {
        r.ok(
            "referenced by",
            format!(
                "{user} may read {} and hold its writers off while deleting",
                other.name
            ),
        );
        if !other.indexed {
            r.warn(
                "referenced-by index",
                format!(
                    "no index leads with {}: each cleanup batch would scan {} for references",
                    other.name, other.qualified
                ),
                format!(
                    "CREATE INDEX CONCURRENTLY ON {} ({});",
                    other.qualified, other.column
                ),
            );
        }
    }
    other_references(&client, cfg, &table, r).await?;
    if crate::pipeline::throttle::may_monitor(&client).await? {
        let seen = crate::pipeline::throttle::replicas_seen(&client).await?;
        r.ok(
            "database health",
            format!(
                "{user} may read replica lag and autovacuum progress (run --max-replica-lag, \
                 the autovacuum pause); replicas streaming: {}",
                if seen.is_empty() {
                    "none".to_owned()
                } else {
                    seen.join(", ")
                }
            ),
        );
    } else {
        r.warn(
            "database health",
            format!(
                "{user} may not read other sessions' replication lag or vacuum progress: \
                 run --max-replica-lag without --replica-url is refused, and the run does \
                 not pause for autovacuum on the table"
            ),
            format!("GRANT pg_monitor TO {role};"),
        );
    }
    let (rows, exact) = db::count_selected(&client, &table, crate::s3::Side::Source).await?;
    r.rows_to_move = Some(rows);
    r.rows_exact = exact;
    r.ok(
        "rows",
        format!(
            "{}{rows} rows under {} to move",
            if exact { "" } else { "about " },
            cfg.source
        ),
    );
    Ok(())
}

/// How long one column's probe for keys under the source prefix may take, and all of
/// them together.
const PROBE_TIMEOUT: &str = "500ms";
const PROBES_BUDGET: std::time::Duration = std::time::Duration::from_secs(15);

/// Other columns whose values look like keys under the source prefix: relocator would
/// delete objects they point at unless they are passed with `--referenced-by`. Every text
/// or varchar column the role can read outside the job's column, one bounded probe each
/// (the first row that starts with the prefix).
async fn other_references(
    client: &tokio_postgres::Client,
    cfg: &JobConfig,
    table: &TableInfo,
    r: &mut Report,
) -> Result<()> {
    let columns = client
        .query(
            "SELECT n.nspname::text, c.relname::text, a.attname::text
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
              WHERE c.relkind IN ('r', 'p')
                AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'relocator')
                AND n.nspname NOT LIKE 'pg_toast%'
                AND a.atttypid IN ('text'::regtype, 'varchar'::regtype)
                AND has_schema_privilege(n.oid, 'USAGE')
                AND has_column_privilege(c.oid, a.attnum, 'SELECT')
              ORDER BY 1, 2, 3",
            &[],
        )
        .await
        .map_err(|e| anyhow::anyhow!("listing the database's text columns: {e}"))?;
    let own: Vec<String> = std::iter::once(&table.path_col)
        .chain(&table.more_cols)
        .map(|c| format!("{}.{c}", table.qualified))
        .collect();
    let given: Vec<&str> = table.referencing.iter().map(|x| x.name.as_str()).collect();
    let mut found = Vec::new();
    let mut unknown = Vec::new();
    let start = std::time::Instant::now();
    client
        .batch_execute(&format!("SET statement_timeout = '{PROBE_TIMEOUT}'"))
        .await?;
    for row in columns {
        let tbl = format!(
            "{}.{}",
            quote_ident(row.get::<_, &str>(0)),
            quote_ident(row.get::<_, &str>(1))
        );
        let col = quote_ident(row.get::<_, &str>(2));
        let name = format!("{tbl}.{col}");
        if own.contains(&name) || given.contains(&name.as_str()) {
            continue;
        }
        if start.elapsed() > PROBES_BUDGET {
            unknown.push(name);
            continue;
        }
        let probe = format!("SELECT 1 FROM {tbl} WHERE starts_with({col}::text, $1) LIMIT 1");
        match client.query_opt(&probe, &[&cfg.source.prefix]).await {
            Ok(Some(_)) => found.push(name),
            Ok(None) => {}
            // Timed out (a large table without a matching row near its start), or refused.
            Err(_) => unknown.push(name),
        }
    }
    client.batch_execute("RESET statement_timeout").await?;
    if !found.is_empty() {
        r.warn(
            "other references",
            format!(
                "{} hold values under the source prefix {:?}: relocator would delete objects \
                 they point at once the job's own rows no longer do",
                found.join(", "),
                cfg.source.prefix
            ),
            found
                .iter()
                .map(|n| format!("--referenced-by {}", shell_word(n)))
                .collect::<Vec<_>>()
                .join(" "),
        );
    } else if unknown.is_empty() {
        r.ok(
            "other references",
            format!(
                "no other readable text column holds a value under {:?}",
                cfg.source.prefix
            ),
        );
    }
    if !unknown.is_empty() {
        r.warn(
            "other references",
            format!(
                "could not tell within {PROBE_TIMEOUT} each (or {}s in all) whether {} hold \
                 values under the source prefix",
                PROBES_BUDGET.as_secs(),
                unknown.join(", ")
            ),
            "check them by hand, and pass those that reference these objects with \
             --referenced-by"
                .into(),
        );
    }
    Ok(())
}

/// A name as one shell word (quoted names carry `"`).
fn shell_word(s: &str) -> String {
    if s.contains('"') {
        format!("'{s}'")
    } else {
        s.to_owned()
    }
}

/// S3: both buckets, then each permission a run (and a rollback) uses, tried for real.
async fn buckets_and_permissions(cfg: &JobConfig, r: &mut Report) -> Result<()> {
    let s3c = S3::for_job(cfg).await;
    let (sc, dc) = (&s3c.src, &s3c.dst);
    let (src, dst) = (&cfg.source, &cfg.dest);
    let mut buckets_ok = true;
    for (flag, loc, c) in [("--source", src, sc), ("--dest", dst, dc)] {
        match c.check_bucket(flag, &loc.bucket).await {
            Ok(()) => r.ok(
                bucket_check(flag),
                format!("bucket {} reachable", loc.bucket),
            ),
            Err(e) => {
                buckets_ok = false;
                r.fail(bucket_check(flag), format!("{e:#}"), None)
            }
        }
    }
    if !buckets_ok {
        return Ok(());
    }
    for (flag, loc, c) in [("--source", src, sc), ("--dest", dst, dc)] {
        versioning(r, flag, &loc.bucket, c).await;
    }
    let arn = |bucket: &str, prefix: &str| format!("arn:aws:s3:::{bucket}/{prefix}*");

    // Source: list, read, delete (a key that does not exist: deleting it changes nothing).
    let sample: Option<(String, ObjectInfo)> = match s3c
        .listing(s3::Side::Source, &src.bucket, &src.prefix, None)
        .page(1)
        .await
    {
        Ok(page) => {
            r.ok("source list", format!("may list {src}"));
            page.into_iter().flatten().next()
        }
        Err(e) => {
            r.fail(
                "source list",
                e.to_string(),
                Some(format!(
                    "allow s3:ListBucket on arn:aws:s3:::{} (prefix {})",
                    src.bucket, src.prefix
                )),
            );
            None
        }
    };
    if let Some((key, _)) = &sample {
        match sc.head(&src.bucket, key).await {
            Ok(_) => r.ok("source read", format!("may read objects under {src}")),
            Err(e) => r.fail(
                "source read",
                e.to_string(),
                Some(format!(
                    "allow s3:GetObject on {}",
                    arn(&src.bucket, &src.prefix)
                )),
            ),
        }
    }
    let probe = format!(".relocator-preflight-{:016x}", rand::random::<u64>());
    let src_probe = format!("{}{probe}", src.prefix);
    match sc.delete_one(&src.bucket, &src_probe).await {
        Ok(()) => r.ok("source delete", format!("may delete objects under {src}")),
        Err(e) => r.fail(
            "source delete",
            format!("{e}: sources could not be removed after their rows are rewritten"),
            Some(format!(
                "allow s3:DeleteObject on {}",
                arn(&src.bucket, &src.prefix)
            )),
        ),
    }

    // Destination: write a probe, read it, copy into the prefix, delete.
    let dst_probe = format!("{}{probe}", dst.prefix);
    let body = b"relocator preflight probe; safe to delete".to_vec();
    if let Err(e) = dc.put(&dst.bucket, &dst_probe, body, "text/plain").await {
        r.fail(
            "dest write",
            format!("{e}: no object could be copied there"),
            Some(format!(
                "allow s3:PutObject on {}",
                arn(&dst.bucket, &dst.prefix)
            )),
        );
        return Ok(());
    }
    r.ok("dest write", format!("may write objects under {dst}"));
    let probe_info = match dc.head(&dst.bucket, &dst_probe).await {
        Ok(Some(i)) => {
            r.ok("dest read", format!("may read objects under {dst}"));
            Some(i)
        }
        Ok(None) => {
            r.fail(
                "dest read",
                format!(
                    "the probe s3://{}/{dst_probe} is not there after writing it",
                    dst.bucket
                ),
                None,
            );
            None
        }
        Err(e) => {
            r.fail(
                "dest read",
                e.to_string(),
                Some(format!(
                    "allow s3:GetObject on {}",
                    arn(&dst.bucket, &dst.prefix)
                )),
            );
            None
        }
    };
    // Copies from the source (or, with nothing to move, of the probe), made the way a run
    // makes them (server-side, or streamed between endpoints): the permission check and
    // the rate sample in one.
    let copy_from = match (&sample, &probe_info) {
        (Some((k, i)), _) => Some((src.bucket.clone(), k.clone(), i.clone(), s3c.clone())),
        (None, Some(i)) => Some((
            dst.bucket.clone(),
            dst_probe.clone(),
            i.clone(),
            s3c.dest_only(),
        )),
        (None, None) => None,
    };
    let mut written = vec![dst_probe.clone()];
    if let Some((from_bucket, from_key, info, via)) = copy_from {
        let keys: Vec<String> = (0..SAMPLE_COPIES)
            .map(|i| format!("{dst_probe}-{i:02}"))
            .collect();
        let started = Instant::now();
        // With the job's write options: the destination must take them too.
        let write = &cfg.write;
        let results: Vec<Result<(), s3::S3Error>> = stream::iter(&keys)
            .map(|k| {
                let (via, from_bucket, from_key, info) = (&via, &from_bucket, &from_key, &info);
                async move {
                    let permit = via.dst.permit(via.reads_first(write, false)).await;
                    let spec = s3::CopySpec {
                        src_bucket: from_bucket,
                        src_key: from_key,
                        src: info,
                        dst_bucket: &dst.bucket,
                        dst_key: k,
                        write,
                    };
                    if via.server_side {
                        via.dst.copy(permit, spec, false).await.map(|_| ())
                    } else {
                        via.stream_copy(permit, spec).await.map(|_| ())
                    }
                }
            })
            .buffered(cfg.concurrency.clamp(1, SAMPLE_COPIES))
            .collect()
            .await;
        let secs = started.elapsed().as_secs_f64().max(0.001);
        written.extend(keys);
        match results.into_iter().find_map(Result::err) {
            None => {
                let rate = SAMPLE_COPIES as f64 / secs;
                r.copies_per_sec = Some(rate);
                r.estimate_secs = r.rows_to_move.map(|n| n as f64 / rate);
                r.ok(
                    "copy",
                    format!(
                        "may copy s3://{from_bucket}/… into {dst} {}",
                        if via.server_side {
                            "server-side"
                        } else {
                            "(streamed between endpoints)"
                        }
                    ),
                );
            }
            Some(e) => r.fail(
                "copy",
                e.to_string(),
                Some(format!(
                    "allow s3:GetObject on {} and s3:PutObject on {}{}",
                    arn(&from_bucket, ""),
                    arn(&dst.bucket, &dst.prefix),
                    match &cfg.write.encryption {
                        Some(s3::Encryption::Kms(_)) => {
                            "; for --sse aws:kms also kms:GenerateDataKey and kms:Decrypt on the key"
                        }
                        _ => "",
                    }
                )),
            ),
        }
    }
    match dc.delete_many(&dst.bucket, &written).await {
        Ok(errors) if errors.is_empty() => r.ok(
            "dest delete",
            format!("may delete objects under {dst} (probes removed)"),
        ),
        Ok(errors) => r.fail(
            "dest delete",
            format!(
                "{} probe objects under {dst} could not be deleted ({}); remove them by hand. \
                 Copies for rows the application changed could not be taken back",
                errors.len(),
                errors[0].1
            ),
            Some(format!(
                "allow s3:DeleteObject on {}",
                arn(&dst.bucket, &dst.prefix)
            )),
        ),
        Err(e) => r.fail(
            "dest delete",
            format!("{e}; remove the probes {dst_probe}* by hand"),
            Some(format!(
                "allow s3:DeleteObject on {}",
                arn(&dst.bucket, &dst.prefix)
            )),
        ),
    }
    Ok(())
}

/// A bucket's versioning and Object Lock, and what a delete means there.
async fn versioning(r: &mut Report, flag: &str, bucket: &str, c: &s3::Endpoint) {
    let name = if flag == "--source" {
        "source versions"
    } else {
        "dest versions"
    };
    match c.versioning(bucket).await {
        Ok(s3::Versioning::Off) => r.ok(
            name,
            format!("bucket {bucket} is not versioned: a delete removes the object"),
        ),
        Ok(state) => {
            let lock = if state == s3::Versioning::EnabledWithObjectLock {
                " Object Lock is on: locked versions stay until their retention ends."
            } else {
                ""
            };
            r.warn(
                name,
                format!(
                    "bucket {bucket} is versioned ({}): a delete (of a moved source, or of \
                     a copy taken back) leaves a delete marker and keeps the object as a \
                     noncurrent version, still stored and billed.{lock}",
                    state.as_str()
                ),
                format!(
                    "to let them go, a lifecycle rule expiring noncurrent versions, e.g. \
                     NoncurrentVersionExpiration {{NoncurrentDays: 30}} on bucket {bucket} \
                     (see the README)"
                ),
            )
        }
        Err(e) => r.ok(
            name,
            format!("bucket {bucket}: the server does not say whether it is versioned ({e})"),
        ),
    }
}

fn bucket_check(flag: &str) -> &'static str {
    if flag == "--source" {
        "source bucket"
    } else {
        "dest bucket"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(42.4), "42 s");
        assert_eq!(human_duration(600.0), "10 min");
        assert_eq!(human_duration(5.0 * 3600.0), "5.0 h");
    }
}
