//! The command line as typed: clap derive only. Validation happens in [`crate::config`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const EXIT_CODES: &str = "\
Exit codes:
  0    everything selected was relocated (or there was nothing to do)
  1    failed; rerun the same command to resume
  2    usage or configuration error; nothing was changed
  3    finished, but some rows need attention (see the report)
  130  interrupted by SIGINT/SIGTERM; rerun the same command to resume";

/// Move the S3 objects a PostgreSQL table points at, rewriting each row to its new key.
///
/// A source object is deleted only after the row rewrite has committed and no row still
/// references it; an existing different destination object is never overwritten; a row the
/// application changed meanwhile is not rewritten. Kill it at any moment and rerun it.
#[derive(Debug, Parser)]
#[command(name = "relocator", version, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log format on stderr. RUST_LOG filters (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Relocate: copy each object, rewrite its row, delete the source after the commit.
    #[command(after_help = EXIT_CODES)]
    Run(RunArgs),
    /// Dry run: compute exactly what `run` would do, change nothing. Rows the table would
    /// refuse are found by trying each batch's rewrites in a transaction rolled back.
    #[command(after_help = EXIT_CODES)]
    Plan(PlanArgs),
    /// Check that every row points at an existing object that is the one its move left
    /// there (ok / replaced / corrupt with --verify-content / still_legacy / missing /
    /// legacy_leftover, and orphans with --orphans). Exit 0 when all rows are ok, 3 if not
    /// (or if nothing was checked).
    Verify(VerifyArgs),
    /// What the ledger says about this job: runs, leases, rows moved, cleanups pending,
    /// rate, rows left, ETA. Read-only.
    Status(StatusArgs),
    /// Before a run: check the table, the role's privileges, both buckets and the S3
    /// permissions (with a probe object removed again), count the rows and estimate the
    /// duration. Exit 0 only when a run can succeed; each failed check names the fix.
    Preflight(PreflightArgs),
    /// Stream (id, path) of the selected rows to a CSV file (COPY); print rows and SHA-256.
    Backup(BackupArgs),
    /// Undo a job's moves from the ledger: each object back at its old key, each row
    /// rewritten back (compare-and-swap), the new objects removed. Resumable like run.
    #[command(after_help = EXIT_CODES)]
    Rollback(RollbackArgs),
    /// Create demo rows and their objects in the source bucket.
    Seed(SeedArgs),
}

/// Where the rows are and where their objects go: shared by every job command.
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// PostgreSQL connection URL (the password is never logged).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// The table holding the paths; may be schema-qualified (app.avatars) and quoted
    /// ("Weird"."Name").
    #[arg(long, default_value = "avatars")]
    pub table: String,

    /// Primary-key column: integer, bigint, uuid or text, unique.
    #[arg(long, default_value = "id")]
    pub id_column: String,

    /// Column holding the object key (text or varchar; json/jsonb with --json-key).
    /// Repeatable, for several columns per row (users(avatar_path, banner_path)), each
    /// holding a key: a row is rewritten once, when every one of its objects is in place.
    #[arg(long, default_value = "path", value_name = "NAME")]
    pub path_column: Vec<String>,

    /// Another column that holds keys of these objects (TABLE.COLUMN or
    /// SCHEMA.TABLE.COLUMN, quoted as for --table; repeatable): an object is deleted only
    /// when neither the job's column nor any of these references it. A job remembers
    /// the columns it was given in its ledger, for every later process.
    #[arg(long, value_name = "TABLE.COLUMN")]
    pub referenced_by: Vec<String>,

    /// Where the objects are now: s3://BUCKET/PREFIX. Rows whose path starts with PREFIX
    /// are selected.
    #[arg(long, value_name = "S3_URL")]
    pub source: String,

    /// Where the objects go: s3://BUCKET/PREFIX.
    #[arg(long, value_name = "S3_URL")]
    pub dest: String,

    /// A column naming the bucket each row's key is in (Rails Active Storage's
    /// `service_name`): rows are selected by --source-service, and a move rewrites it to
    /// --dest-service in the same compare-and-swap as the key. The key may stay the same
    /// (--source and --dest with one prefix, in different buckets).
    #[arg(long, value_name = "NAME", requires_all = ["source_service", "dest_service"])]
    pub service_column: Option<String>,

    /// The --service-column value of rows whose objects are in --source's bucket.
    #[arg(long, value_name = "VALUE", requires = "service_column")]
    pub source_service: Option<String>,

    /// The --service-column value a moved row gets: its objects are in --dest's bucket.
    #[arg(long, value_name = "VALUE", requires = "service_column")]
    pub dest_service: Option<String>,

    /// The path column holds URLs: rows whose value starts with PREFIX (repeatable: the
    /// same location spelled with http and https, path-style and virtual-hosted, a CDN)
    /// reference objects under --source; the key is --source's prefix followed by the rest
    /// of the URL's path, percent-decoded. E.g. https://cdn.example.com/image/ with
    /// --source s3://legacy-s3/image/. Rows under no PREFIX are not selected.
    #[arg(long, value_name = "PREFIX", requires = "dest_url")]
    pub source_url: Vec<String>,

    /// What a moved row holds: PREFIX, then the new key's rest after --dest's prefix,
    /// encoded as the old URL was, then the old URL's query string or fragment.
    #[arg(long, value_name = "PREFIX", requires = "source_url")]
    pub dest_url: Option<String>,

    /// With several --path-column: one of them that holds URLs (repeatable), to which
    /// --source-url and --dest-url apply; the others hold keys (users(avatar_url,
    /// banner_path)).
    #[arg(long, value_name = "NAME", requires = "source_url")]
    pub url_column: Vec<String>,

    /// The path column is a json or jsonb document (Shrine's attachment data): PATH, a
    /// dot-separated field path (repeatable, e.g. id and derivatives.thumb.id), holds a
    /// key. Only those fields change; a row moves once every one of them under --source
    /// is in place.
    #[arg(long, value_name = "PATH")]
    pub json_key: Vec<String>,

    /// With --json-key: set FIELD to the string VALUE next to each moved key, in the same
    /// rewrite (e.g. storage=store).
    #[arg(long, value_name = "FIELD=VALUE", requires = "json_key")]
    pub json_set: Vec<String>,

    /// A column holding each object's MD5 in base64 (Active Storage's `checksum`):
    /// checked against the copied object before the row is rewritten, where the ETag is
    /// an MD5 (single-part, not SSE-KMS). A row that does not match is
    /// `checksum_mismatch` and left alone.
    #[arg(long, value_name = "NAME")]
    pub checksum_column: Option<String>,

    /// Optional regex applied to the part of the path after the source prefix. Rows it
    /// does not match are left alone and reported as `unmatched`.
    #[arg(long, value_name = "REGEX", requires = "to")]
    pub rewrite: Option<String>,

    /// Replacement for --rewrite's first match ($1, ${name}).
    #[arg(long, value_name = "TEMPLATE", requires = "rewrite")]
    pub to: Option<String>,

    /// Rows (or source keys) per batch: one lookup, one rewrite statement, one cleanup
    /// each.
    #[arg(long, default_value_t = 5000)]
    pub batch_size: usize,

    /// S3 requests in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,

    /// The source's S3 endpoint, when it is not --endpoint-url. Its credentials: the
    /// standard chain, --source-profile, or RELOCATOR_SOURCE_AWS_ACCESS_KEY_ID /
    /// RELOCATOR_SOURCE_AWS_SECRET_ACCESS_KEY. When the two sides differ in endpoint or
    /// credentials, objects are streamed GET → PUT instead of copied server-side.
    #[arg(long, env = "RELOCATOR_SOURCE_ENDPOINT_URL", value_name = "URL")]
    pub source_endpoint_url: Option<String>,

    /// AWS profile for the source side.
    #[arg(long, value_name = "NAME")]
    pub source_profile: Option<String>,

    /// Region of the source side.
    #[arg(long, value_name = "REGION")]
    pub source_region: Option<String>,

    /// The destination's S3 endpoint, when it is not --endpoint-url. Its credentials: the
    /// standard chain, --dest-profile, or RELOCATOR_DEST_AWS_ACCESS_KEY_ID /
    /// RELOCATOR_DEST_AWS_SECRET_ACCESS_KEY.
    #[arg(long, env = "RELOCATOR_DEST_ENDPOINT_URL", value_name = "URL")]
    pub dest_endpoint_url: Option<String>,

    /// AWS profile for the destination side.
    #[arg(long, value_name = "NAME")]
    pub dest_profile: Option<String>,

    /// Region of the destination side.
    #[arg(long, value_name = "REGION")]
    pub dest_region: Option<String>,

    /// Objects larger than this are copied in parts, in parallel: UploadPartCopy
    /// server-side, ranged GET → UploadPart when streaming between endpoints. Default:
    /// 5GiB server-side (the most one CopyObject may copy), 64MiB streamed (a failure
    /// then repeats one part, not the object). Bytes, or with a KiB / MiB / GiB suffix.
    #[arg(long, value_name = "SIZE")]
    pub multipart_threshold: Option<String>,

    /// Part size of a multipart copy (raised when an object would need more than 10,000
    /// parts). Bytes, or with a KiB / MiB / GiB suffix.
    #[arg(long, default_value = "256MiB", value_name = "SIZE")]
    pub part_size: String,

    /// Add (or overwrite) this user metadata (x-amz-meta-KEY) on every object copied;
    /// repeatable. The other headers are kept.
    #[arg(long, value_name = "KEY=VALUE")]
    pub set_metadata: Vec<String>,

    /// Storage class of the objects written at the destination: STANDARD, STANDARD_IA,
    /// ONEZONE_IA, INTELLIGENT_TIERING, GLACIER_IR, ... Default: the bucket's.
    #[arg(long, value_name = "CLASS")]
    pub storage_class: Option<String>,

    /// Server-side encryption of the objects written at the destination: AES256 (SSE-S3)
    /// or aws:kms (SSE-KMS). Default: the bucket's.
    #[arg(long, value_name = "MODE")]
    pub sse: Option<String>,

    /// The KMS key for --sse aws:kms (key id, ARN or alias). Default: the account's
    /// aws/s3 key.
    #[arg(long, value_name = "KEY")]
    pub sse_kms_key_id: Option<String>,

    /// After each copy (and for an identical object found at the destination), read both
    /// objects back and compare their SHA-256: certainty over speed (doubles the reads).
    #[arg(long)]
    pub verify_content: bool,

    /// Seconds one batch may take (its copies; each statement of run and rollback is
    /// limited to the same through statement_timeout). A batch over it stops the run
    /// with exit 1 and nothing of the batch committed; rerun to resume.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub batch_timeout: u64,

    #[command(flatten)]
    pub s3: S3Args,
}

/// S3 connection: the standard AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
/// AWS_PROFILE, AWS_REGION) plus an optional endpoint for S3-compatible servers.
#[derive(Debug, Clone, Args)]
pub struct S3Args {
    /// S3 endpoint (MinIO, Garage, ...). Path-style addressing is used when it is set.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,

    /// Per-request timeout in seconds (each retry gets its own).
    #[arg(long, default_value_t = 60)]
    pub s3_timeout: u64,

    /// Attempts per S3 request before giving up (exponential backoff between them;
    /// throttling answers also slow the client down adaptively). A copy or delete a look
    /// decided is sent once, and relocator looks again before each further attempt.
    #[arg(long, default_value_t = 6)]
    pub s3_max_attempts: u32,

    /// Cap on S3 requests per second for this process (all kinds, all workers).
    #[arg(long, value_name = "N")]
    pub max_rps: Option<u32>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub job: JobArgs,

    /// Pipelines in this process. Several processes (on any machines) pointed at the same
    /// table and job also share the work: each takes leases on id ranges.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,

    /// Seconds without a heartbeat after which another worker may take over a lease whose
    /// owner still holds its database session (a hung worker; a live one renews its
    /// heartbeat three times per TTL). A worker whose process died loses its lease at
    /// once. The TTL belongs to the run: the process that starts it sets it (default
    /// 120), later processes adopt it, and one that asks for another value is refused.
    #[arg(long, value_name = "SECONDS")]
    pub lease_ttl: Option<u64>,

    /// Write one CSV line per row acted on or needing attention.
    #[arg(long, value_name = "FILE.csv")]
    pub report: Option<PathBuf>,

    /// Write the final counts as JSON, for automation.
    #[arg(long, value_name = "FILE.json")]
    pub summary_json: Option<PathBuf>,

    /// The backup this run follows (made by `relocator backup`): checked and recorded
    /// in the ledger. A run against a non-local database or S3 endpoint needs this or
    /// --no-backup.
    #[arg(long, value_name = "FILE.csv", conflicts_with = "no_backup")]
    pub backup: Option<PathBuf>,

    /// Run without a backup even though the database or S3 endpoint is not local.
    #[arg(long)]
    pub no_backup: bool,

    /// Wait while a replica lags more than this (e.g. 10s, 500ms, 2m): before each
    /// batch's copies, commit and deletes, the lag is read from pg_stat_replication on
    /// the primary (the role needs pg_monitor), or on each --replica-url.
    #[arg(long, value_name = "DURATION")]
    pub max_replica_lag: Option<String>,

    /// A streaming replica whose lag --max-replica-lag reads (repeatable): the lag as the
    /// replica sees it, for replicas the primary does not list (cascading, logical).
    #[arg(long = "replica-url", value_name = "URL")]
    pub replica_urls: Vec<String>,

    /// Do not pause while autovacuum works on the job's table (by default the run waits
    /// for it, where the role may see it: pg_monitor).
    #[arg(long)]
    pub no_autovacuum_pause: bool,

    /// Wait while the database writes WAL faster than this many bytes per second (e.g.
    /// 32MiB, measured with pg_current_wal_lsn() once a second, all writers counted).
    #[arg(long, value_name = "BYTES/s")]
    pub max_wal_rate: Option<String>,
}

#[derive(Debug, Args)]
pub struct PreflightArgs {
    #[command(flatten)]
    pub job: JobArgs,

    /// Write the checks as JSON.
    #[arg(long, value_name = "FILE.json")]
    pub summary_json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub job: JobArgs,

    /// The CSV file to write (written under a temporary name, then renamed).
    #[arg(long, value_name = "FILE.csv")]
    pub out: PathBuf,

    /// Write rows, bytes and SHA-256 as JSON.
    #[arg(long, value_name = "FILE.json")]
    pub summary_json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub job: JobArgs,

    /// Undo only this run (see `relocator status`); default: every run of the job.
    #[arg(long, value_name = "RUN_ID")]
    pub run: Option<i64>,

    /// Write one CSV line per row acted on or needing attention.
    #[arg(long, value_name = "FILE.csv")]
    pub report: Option<PathBuf>,

    /// Write the final counts as JSON, for automation.
    #[arg(long, value_name = "FILE.json")]
    pub summary_json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub job: JobArgs,

    /// The plan as CSV: id, old path, new path, predicted outcome, detail.
    #[arg(long, value_name = "FILE.csv")]
    pub out: PathBuf,

    /// Write the predicted counts as JSON.
    #[arg(long, value_name = "FILE.json")]
    pub summary_json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub job: JobArgs,

    /// One CSV line per row and per object found wanting: id, bucket, key, check.
    #[arg(long, value_name = "FILE.csv")]
    pub out: Option<PathBuf>,

    /// Also list objects under either prefix that no row references.
    #[arg(long)]
    pub orphans: bool,

    /// Write the counts as JSON.
    #[arg(long, value_name = "FILE.json")]
    pub summary_json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub job: JobArgs,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SeedArgs {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Table to create (if missing) and fill.
    #[arg(long, default_value = "avatars")]
    pub table: String,

    /// Where to put the objects: s3://BUCKET/PREFIX.
    #[arg(long, default_value = "s3://legacy-s3/image/", value_name = "S3_URL")]
    pub target: String,

    /// How many rows to create.
    #[arg(long, default_value_t = 10_000)]
    pub rows: usize,

    /// How many of those rows get no object (to exercise `missing_source`).
    #[arg(long, default_value_t = 0)]
    pub missing: usize,

    /// Random seed: the same seed gives the same keys, sizes and bytes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Object size range in bytes, MIN..MAX.
    #[arg(long, default_value = "200..8192")]
    pub sizes: String,

    /// Uploads in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,

    /// Demo reruns: first delete every object under this S3 URL (repeatable). Deletes
    /// data; meant for demo buckets only.
    #[arg(long, value_name = "S3_URL")]
    pub clear: Vec<String>,

    #[command(flatten)]
    pub s3: S3Args,
}
