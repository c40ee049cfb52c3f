//! Parse, then validate once: the raw [`crate::cli`] arguments become a [`JobConfig`]
//! whose every field is known good, and which is passed down by reference.
//!
//! Every problem found here is a [`ConfigError`], which the binary maps to exit code 2:
//! nothing has been changed when one is returned.

use std::fmt;
use std::time::Duration;

use regex::Regex;

use crate::cli::{JobArgs, S3Args};
use crate::rewrite::Rewrite;

/// Bad input: the message names the problem and the fix. Exit code 2, nothing changed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Shorthand for returning a [`ConfigError`] from anything that returns `anyhow::Result`.
pub fn config_error(msg: impl Into<String>) -> anyhow::Error {
    ConfigError(msg.into()).into()
}

/// `s3://bucket/prefix`, with the prefix normalised to end in `/` (unless empty) so that
/// `image` never selects `images/...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    pub prefix: String,
}

impl S3Location {
    pub fn parse(flag: &str, s: &str) -> Result<Self, ConfigError> {
        let rest = s.strip_prefix("s3://").ok_or_else(|| {
            ConfigError(format!(
                "{flag} {s:?} is not an S3 URL; write it as s3://BUCKET/PREFIX, e.g. s3://legacy-s3/image/"
            ))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        validate_bucket(bucket).map_err(|why| {
            ConfigError(format!(
                "{flag}: bucket name {bucket:?} is not valid: {why}"
            ))
        })?;
        if prefix.starts_with('/') {
            return Err(ConfigError(format!(
                "{flag}: the prefix {prefix:?} starts with '/'; write s3://{bucket}/{}",
                prefix.trim_start_matches('/')
            )));
        }
        if let Err(e) = crate::rewrite::validate_source(prefix) {
            return Err(ConfigError(format!("{flag}: the prefix {prefix:?}: {e}")));
        }
        if prefix.split('/').any(|seg| seg == "." || seg == "..") {
            return Err(ConfigError(format!(
                "{flag}: the prefix {prefix:?} has a '.' or '..' segment"
            )));
        }
        let mut prefix = prefix.to_owned();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(S3Location {
            bucket: bucket.to_owned(),
            prefix,
        })
    }
}

impl fmt::Display for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// S3 bucket naming rules (the common subset every provider accepts).
fn validate_bucket(b: &str) -> Result<(), &'static str> {
    if b.len() < 3 || b.len() > 63 {
        return Err("it must be 3 to 63 characters long");
    }
    if !b
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
    {
        return Err("only lowercase letters, digits, '-' and '.' are allowed");
    }
    let first = b.as_bytes()[0];
    let last = b.as_bytes()[b.len() - 1];
    if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
        return Err("it must start and end with a letter or digit");
    }
    Ok(())
}

/// A possibly schema-qualified table name, split into its parts the way PostgreSQL reads
/// it: bare parts fold to lower case, `"quoted"` parts are taken as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: Option<String>,
    pub name: String,
}

impl TableName {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let parts = split_identifier(s)?;
        match parts.as_slice() {
            [name] => Ok(TableName {
                schema: None,
                name: name.clone(),
            }),
            [schema, name] => Ok(TableName {
                schema: Some(schema.clone()),
                name: name.clone(),
            }),
            _ => Err(ConfigError(format!(
                "--table {s:?} has {} dot-separated parts; write TABLE or SCHEMA.TABLE",
                parts.len()
            ))),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{}.{}", quote_ident(s), quote_ident(&self.name)),
            None => write!(f, "{}", quote_ident(&self.name)),
        }
    }
}

/// A single column name, parsed like a table-name part.
pub fn parse_column(flag: &str, s: &str) -> Result<String, ConfigError> {
    let parts = split_identifier(s).map_err(|e| ConfigError(format!("{flag}: {e}")))?;
    match parts.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(ConfigError(format!(
            "{flag} {s:?} must be a single column name"
        ))),
    }
}

/// A column of another table that references the same objects (`--referenced-by`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnRef {
    pub table: TableName,
    pub column: String,
}

impl ColumnRef {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = |e: String| ConfigError(format!("--referenced-by {s:?}: {e}"));
        let mut parts = split_identifier(s).map_err(|e| bad(e.0))?;
        if !(2..=3).contains(&parts.len()) {
            return Err(bad(
                "write TABLE.COLUMN or SCHEMA.TABLE.COLUMN (quote names with dots)".into(),
            ));
        }
        let column = parts.pop().unwrap_or_default();
        let name = parts.pop().unwrap_or_default();
        Ok(ColumnRef {
            table: TableName {
                schema: parts.pop(),
                name,
            },
            column,
        })
    }
}

impl fmt::Display for ColumnRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.table, quote_ident(&self.column))
    }
}

/// Split `a.b` / `"a.b"."c"` into identifier parts. Bare parts must be plain SQL
/// identifiers; anything else has to be quoted, so a typo never turns into SQL.
fn split_identifier(s: &str) -> Result<Vec<String>, ConfigError> {
    let mut parts = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => {
                        return Err(ConfigError(format!(
                            "identifier {s:?} has an unterminated quote"
                        )))
                    }
                }
            }
            if part.is_empty() {
                return Err(ConfigError(format!("identifier {s:?} has an empty part")));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                part.push(c);
                chars.next();
            }
            let plain = part
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
            if !plain {
                return Err(ConfigError(format!(
                    "{part:?} (in {s:?}) is not a plain SQL identifier; if that really is the name, \
                     quote it: '\"{}\"'",
                    part.replace('"', "\"\"")
                )));
            }
            part = part.to_lowercase();
        }
        if part.len() > 63 {
            return Err(ConfigError(format!(
                "identifier {part:?} is longer than PostgreSQL's 63 bytes"
            )));
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => continue,
            Some(c) => {
                return Err(ConfigError(format!(
                    "unexpected {c:?} after a quoted identifier in {s:?}"
                )))
            }
        }
    }
}

/// Quote an identifier for SQL: always double-quoted, inner quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The DATABASE_URL, with the password kept out of every `Debug`/`Display`.
#[derive(Clone)]
pub struct DatabaseUrl {
    /// As given: shown redacted.
    raw: String,
    /// Without the TLS settings: what tokio-postgres parses.
    conn: String,
    /// `sslmode`, `sslrootcert`, ... (see [`crate::db::tls`]).
    pub tls: crate::db::tls::TlsSettings,
    /// SQL every session of the job runs first (a shape's temporary function).
    pub session_sql: Option<&'static str>,
}

impl DatabaseUrl {
    pub fn new(raw: &str) -> Result<Self, ConfigError> {
        let (conn, tls) = crate::db::tls::split(raw).map_err(|e| {
            ConfigError(format!(
                "--database-url / DATABASE_URL {}: {}",
                redact_url(raw),
                scrub(&e.0, raw)
            ))
        })?;
        let s = conn.as_str();
        let invalid = |why: &str| {
            ConfigError(format!(
                "--database-url / DATABASE_URL {} is not a valid PostgreSQL URL ({why}); \
                 expected postgres://USER:PASSWORD@HOST:PORT/DBNAME (percent-encode a \
                 password's / # ? @ : as %2F %23 %3F %40 %3A)",
                redact_url(s)
            ))
        };
        // The parser's own message is scrubbed too: it must not echo a value.
        let pg = s
            .parse::<tokio_postgres::Config>()
            .map_err(|e| invalid(&scrub(&e.to_string(), s)))?;
        // An unencoded `@` in the password splits the URL at the first `@`: the rest of
        // the password would be taken for the host (and printed as one).
        let split_password = pg.get_hosts().iter().any(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.contains('@'),
            #[allow(unreachable_patterns)]
            _ => false,
        });
        if split_password {
            return Err(invalid(
                "the host holds an '@', so the password has an unencoded '@'",
            ));
        }
        Ok(DatabaseUrl {
            raw: raw.to_owned(),
            conn,
            tls,
            session_sql: None,
        })
    }

    /// The real URL without its TLS settings, for the connection only.
    pub fn expose(&self) -> &str {
        &self.conn
    }
}

impl PartialEq for DatabaseUrl {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

impl Eq for DatabaseUrl {}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", redact_url(&self.raw))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", redact_url(&self.raw))
    }
}

/// Replace the password of a connection string with `***`, whether or not it parses:
/// people paste URLs whose password holds an unescaped `/`, `#`, `?` or `@`, or whose
/// port has a typo, and those are exactly the ones printed in an error.
///
/// URL form: everything between the `:` after the user name and the **last** `@` is the
/// password (a host never holds `@`; should a query value hold one, more is hidden, never
/// less). Key=value form and URL query: the value of every `password=`.
pub fn redact_url(s: &str) -> String {
    redact_with_secrets(s).0
}

/// `text` with every password found in the connection string `conn` replaced by `***`.
pub fn scrub(text: &str, conn: &str) -> String {
    let mut out = text.to_owned();
    for secret in redact_with_secrets(conn).1 {
        if !secret.is_empty() {
            out = out.replace(&secret, "***");
        }
    }
    out
}

/// The redacted string and the secrets it hid.
fn redact_with_secrets(s: &str) -> (String, Vec<String>) {
    let mut secrets = Vec::new();
    let mut out = match s.split_once("://") {
        Some((scheme, rest)) => match rest.rfind('@') {
            Some(at) => {
                let (userinfo, host) = (&rest[..at], &rest[at..]);
                match userinfo.split_once(':') {
                    Some((user, password)) => {
                        secrets.push(password.to_owned());
                        format!("{scheme}://{user}:***{host}")
                    }
                    None => s.to_owned(),
                }
            }
            None => s.to_owned(),
        },
        None => s.to_owned(),
    };
    let re =
        Regex::new(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^&\s]*)").expect("static regex");
    for c in re.captures_iter(s) {
        let v = c.get(2).map_or("", |m| m.as_str());
        secrets.push(v.trim_matches('\'').to_owned());
    }
    out = re.replace_all(&out, "${1}***").into_owned();
    (out, secrets)
}

/// S3 client settings, validated: one endpoint with one set of credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    pub endpoint_url: Option<String>,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub max_rps: Option<std::num::NonZeroU32>,
    /// AWS profile (shared config files) instead of the default chain's.
    pub profile: Option<String>,
    pub region: Option<String>,
    /// This side's own key pair, where `RELOCATOR_SOURCE_…` / `RELOCATOR_DEST_…` give one;
    /// else the standard chain's.
    pub credentials: Option<Credentials>,
}

/// An access key pair read from `{prefix}_AWS_ACCESS_KEY_ID` and
/// `{prefix}_AWS_SECRET_ACCESS_KEY` — the one place relocator reads its own credential
/// variables. Its `Debug` never shows the secret. Pairs from different prefixes never
/// compare equal, so a side given its own keys is its own endpoint (copies are streamed).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    prefix: &'static str,
    pub access_key_id: String,
    secret_access_key: String,
}

impl Credentials {
    /// The pair under `prefix`, if set; one of the two without the other is bad input.
    pub fn from_env(prefix: &'static str) -> Result<Option<Credentials>, ConfigError> {
        let var = |name: &str| std::env::var(format!("{prefix}_{name}")).ok();
        match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(access_key_id), Some(secret_access_key)) => Ok(Some(Credentials {
                prefix,
                access_key_id,
                secret_access_key,
            })),
            (None, None) => Ok(None),
            _ => Err(ConfigError(format!(
                "set both {prefix}_AWS_ACCESS_KEY_ID and {prefix}_AWS_SECRET_ACCESS_KEY, or \
                 neither"
            ))),
        }
    }

    pub fn secret_access_key(&self) -> &str {
        &self.secret_access_key
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"***")
            .finish()
    }
}

/// `flag`'s value must be an http(s) URL.
fn check_endpoint(flag: &str, e: &str) -> Result<(), ConfigError> {
    let u = url::Url::parse(e).map_err(|err| {
        ConfigError(format!(
            "{flag} {e:?} is not a URL ({err}); e.g. http://127.0.0.1:9000"
        ))
    })?;
    if u.scheme() != "http" && u.scheme() != "https" {
        return Err(ConfigError(format!(
            "{flag} {e:?} must start with http:// or https://"
        )));
    }
    Ok(())
}

impl S3Settings {
    pub fn from_args(a: &S3Args) -> Result<Self, ConfigError> {
        if let Some(e) = &a.endpoint_url {
            check_endpoint("--endpoint-url / AWS_ENDPOINT_URL", e)?;
        }
        if a.s3_timeout == 0 {
            return Err(ConfigError("--s3-timeout must be at least 1 second".into()));
        }
        if a.s3_max_attempts == 0 {
            return Err(ConfigError("--s3-max-attempts must be at least 1".into()));
        }
        let max_rps = match a.max_rps {
            None => None,
            Some(n) => Some(std::num::NonZeroU32::new(n).ok_or_else(|| {
                ConfigError("--max-rps must be at least 1 (leave it out for no cap)".into())
            })?),
        };
        Ok(S3Settings {
            endpoint_url: a.endpoint_url.clone().filter(|s| !s.is_empty()),
            timeout: Duration::from_secs(a.s3_timeout),
            max_attempts: a.s3_max_attempts,
            max_rps,
            profile: None,
            region: None,
            credentials: None,
        })
    }

    /// One side of a job: these settings with that side's own endpoint, profile, region
    /// and credentials where given (`side`: "source" or "dest", for the messages).
    fn side(
        &self,
        side: &str,
        endpoint: &Option<String>,
        profile: &Option<String>,
        region: &Option<String>,
        credentials_env: &'static str,
    ) -> Result<S3Settings, ConfigError> {
        if let Some(e) = endpoint {
            check_endpoint(&format!("--{side}-endpoint-url"), e)?;
        }
        let credentials = Credentials::from_env(credentials_env)?;
        Ok(S3Settings {
            endpoint_url: endpoint.clone().or_else(|| self.endpoint_url.clone()),
            profile: profile.clone(),
            region: region.clone(),
            credentials,
            ..self.clone()
        })
    }
}

/// User metadata (x-amz-meta-*, without the prefix).
pub type Metadata = std::collections::BTreeMap<String, String>;

/// How relocator writes destination objects beyond the source's own headers:
/// `--set-metadata`, `--storage-class`, `--sse` / `--sse-kms-key-id`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// User metadata added to (or replacing same-named entries of) the source's.
    pub metadata: Metadata,
    pub storage_class: Option<aws_sdk_s3::types::StorageClass>,
    pub encryption: Option<Encryption>,
}

impl WriteOptions {
    /// Whether the ETag of an object written with these options — whose write was
    /// answered with `answered` encryption, if known — is the MD5 of its bytes: S3
    /// documents that SSE-KMS (and DSSE-KMS) objects' ETags are not.
    pub fn etag_is_md5(&self, answered: Option<&aws_sdk_s3::types::ServerSideEncryption>) -> bool {
        use aws_sdk_s3::types::ServerSideEncryption as Sse;
        !matches!(self.encryption, Some(Encryption::Kms(_)))
            && !matches!(answered, Some(Sse::AwsKms | Sse::AwsKmsDsse))
    }
}

/// Server-side encryption of the objects relocator writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encryption {
    /// SSE-S3 (`AES256`).
    S3,
    /// SSE-KMS with this key (id, ARN or alias); `None`: the account's `aws/s3` key.
    Kms(Option<String>),
}

/// What `run` takes beyond the job, validated: the policy a run follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPolicy {
    /// Pipelines in this process (1 to 256).
    pub workers: usize,
    /// `--lease-ttl`, at least a second; None: the run's, or the default.
    pub lease_ttl: Option<Duration>,
    /// The backup file the run follows, to be checked and recorded; None only where the
    /// job looks local or the operator said `--no-backup`.
    pub backup: Option<std::path::PathBuf>,
    /// When the run waits for the database.
    pub health: Health,
}

/// When a run waits for the database's health (see [`crate::pipeline::throttle`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Health {
    pub max_replica_lag: Option<Duration>,
    /// Replicas to read the lag on; empty: `pg_stat_replication` on the primary.
    pub replica_urls: Vec<DatabaseUrl>,
    pub autovacuum_pause: bool,
    /// Bytes of WAL per second.
    pub max_wal_rate: Option<u64>,
}

impl Health {
    /// Whether anything is to be read at all.
    pub fn asks_anything(&self) -> bool {
        self.max_replica_lag.is_some() || self.autovacuum_pause || self.max_wal_rate.is_some()
    }

    fn from_args(a: &crate::cli::RunArgs) -> Result<Health, ConfigError> {
        let max_replica_lag = a
            .max_replica_lag
            .as_deref()
            .map(|s| parse_duration("--max-replica-lag", s))
            .transpose()?;
        if max_replica_lag.is_none() && !a.replica_urls.is_empty() {
            return Err(ConfigError(
                "--replica-url names a replica whose lag --max-replica-lag limits; give \
                 --max-replica-lag too (e.g. 10s)"
                    .into(),
            ));
        }
        let replica_urls = a
            .replica_urls
            .iter()
            .map(|u| DatabaseUrl::new(u))
            .collect::<Result<Vec<_>, _>>()?;
        let max_wal_rate = a
            .max_wal_rate
            .as_deref()
            .map(|s| parse_size("--max-wal-rate", s.trim().trim_end_matches("/s")))
            .transpose()?;
        if max_wal_rate == Some(0) {
            return Err(ConfigError(
                "--max-wal-rate 0 would wait forever; give bytes per second, e.g. 32MiB".into(),
            ));
        }
        Ok(Health {
            max_replica_lag,
            replica_urls,
            autovacuum_pause: !a.no_autovacuum_pause,
            max_wal_rate,
        })
    }
}

/// A duration: `10s`, `500ms`, `2m`, `1h`, or a number of seconds.
fn parse_duration(flag: &str, s: &str) -> Result<Duration, ConfigError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let secs: Option<f64> = match unit.trim() {
        "" | "s" => Some(1.0),
        "ms" => Some(0.001),
        "m" | "min" => Some(60.0),
        "h" => Some(3600.0),
        _ => None,
    };
    num.parse::<f64>()
        .ok()
        .zip(secs)
        .map(|(n, u)| n * u)
        .filter(|d| d.is_finite() && *d > 0.0 && *d < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            ConfigError(format!(
                "{flag} {s:?} is not a duration above zero; write e.g. 10s, 500ms or 2m"
            ))
        })
}

impl RunPolicy {
    pub fn from_args(a: &crate::cli::RunArgs, cfg: &JobConfig) -> Result<Self, ConfigError> {
        if a.workers == 0 || a.workers > 256 {
            return Err(ConfigError(format!(
                "--workers {} is out of range; use 1 to 256",
                a.workers
            )));
        }
        if a.lease_ttl == Some(0) {
            return Err(ConfigError(
                "--lease-ttl 0 would let any worker take any lease at once; give at least 1 \
                 second (default 120)"
                    .into(),
            ));
        }
        if let (None, false, Some(why)) = (&a.backup, a.no_backup, cfg.production_reason()) {
            return Err(ConfigError(format!(
                "this run looks like production ({why}) and follows no backup. Back up the \
                 selected rows first with `relocator backup --out FILE.csv` (same options), \
                 then pass --backup FILE.csv; or say --no-backup"
            )));
        }
        Ok(RunPolicy {
            workers: a.workers,
            lease_ttl: a.lease_ttl.map(Duration::from_secs),
            backup: a.backup.clone(),
            health: Health::from_args(a)?,
        })
    }
}

/// Everything a job command needs, validated. Built once in `main`, passed by reference.
#[derive(Debug, Clone)]
pub struct JobConfig {
    pub database_url: DatabaseUrl,
    pub table: TableName,
    pub id_column: String,
    pub path_column: String,
    /// Further `--path-column`s: each row holds a key in every one of them.
    pub more_columns: Vec<String>,
    /// `--referenced-by`: other columns whose references keep an object.
    pub referenced_by: Vec<ColumnRef>,
    pub source: S3Location,
    pub dest: S3Location,
    /// `--service-column`: the rows name their bucket.
    pub service: Option<ServiceColumn>,
    /// `--source-url`/`--dest-url`: the rows hold URLs.
    pub urls: Option<UrlColumn>,
    /// `--json-key`/`--json-set`: the rows hold JSON documents.
    pub json: Option<JsonDocument>,
    /// `--checksum-column`: each row's object MD5, in base64.
    pub checksum_column: Option<String>,
    pub rewrite: Rewrite,
    /// The `--rewrite`/`--to` pair as typed, for the job's fingerprint in the ledger.
    pub rewrite_spec: Option<(String, String)>,
    pub batch_size: usize,
    pub concurrency: usize,
    /// Each side's endpoint and credentials. Equal: one endpoint, one set of
    /// credentials, so copies are server-side; else they are streamed GET → PUT.
    pub source_s3: S3Settings,
    pub dest_s3: S3Settings,
    /// See `--batch-timeout`.
    pub batch_timeout: Duration,
    /// `--set-metadata`, `--storage-class`, `--sse`, `--sse-kms-key-id`, validated.
    pub write: WriteOptions,
    pub verify_content: bool,
    /// `--multipart-threshold` if given; see [`JobConfig::multipart_threshold`].
    pub multipart_threshold: Option<u64>,
    pub part_size: u64,
}

impl JobConfig {
    pub fn from_args(a: &JobArgs) -> Result<Self, ConfigError> {
        let mut database_url = DatabaseUrl::new(&a.database_url)?;
        let table = TableName::parse(&a.table).map_err(|e| ConfigError(format!("--table: {e}")))?;
        let id_column = parse_column("--id-column", &a.id_column)?;
        let mut columns: Vec<String> = Vec::new();
        for c in &a.path_column {
            let c = parse_column("--path-column", c)?;
            if columns.contains(&c) {
                return Err(ConfigError(format!("--path-column {c:?} is given twice")));
            }
            columns.push(c);
        }
        let Some((path_column, more_columns)) = columns.split_first() else {
            return Err(ConfigError("--path-column names no column".into()));
        };
        let (path_column, more_columns) = (path_column.clone(), more_columns.to_vec());
        if columns.contains(&id_column) {
            return Err(ConfigError(
                "--id-column and --path-column name the same column".into(),
            ));
        }
        let mut referenced_by = Vec::new();
        for r in &a.referenced_by {
            let r = ColumnRef::parse(r)?;
            if !referenced_by.contains(&r) {
                referenced_by.push(r);
            }
        }
        let source = S3Location::parse("--source", &a.source)?;
        let dest = S3Location::parse("--dest", &a.dest)?;
        let service = ServiceColumn::from_args(a, &id_column, &path_column)?;
        let checksum_column = a
            .checksum_column
            .as_deref()
            .map(|c| parse_column("--checksum-column", c))
            .transpose()?;
        if let Some(c) = &checksum_column {
            if *c == path_column || service.as_ref().is_some_and(|s| s.column == *c) {
                return Err(ConfigError(format!(
                    "--checksum-column {c:?} is also the --path-column or --service-column; \
                     name the column holding the base64 MD5 (e.g. checksum)"
                )));
            }
        }
        let urls = UrlColumn::from_args(a, &columns)?;
        let json = JsonDocument::from_args(a)?;
        if json.is_some() {
            database_url.session_sql = Some(crate::reference::JSON_SESSION_SQL);
        }
        let shapes: Vec<&str> = [
            (service.is_some(), "--service-column"),
            (urls.is_some(), "--source-url/--dest-url"),
            (json.is_some(), "--json-key"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect();
        if shapes.len() > 1 {
            return Err(ConfigError(format!(
                "{} describe different shapes of reference; give one of them",
                shapes.join(" and ")
            )));
        }
        // Several columns: each holds a key, or (--url-column) a URL.
        let mixed = urls.as_ref().is_some_and(|u| !u.columns.is_empty());
        if !more_columns.is_empty() && urls.is_some() && !mixed {
            return Err(ConfigError(
                "several --path-column, and --source-url: say which of them hold URLs with \
                 --url-column NAME (the others hold keys)"
                    .into(),
            ));
        }
        if !more_columns.is_empty() && checksum_column.is_some() {
            return Err(ConfigError(
                "--checksum-column checks one object per row; with several --path-column a \
                 row holds several. Give one --path-column, or leave --checksum-column out"
                    .into(),
            ));
        }
        if !more_columns.is_empty()
            && ((!shapes.is_empty() && !mixed) || shapes.len() > 1 || checksum_column.is_some())
        {
            return Err(ConfigError(format!(
                "several --path-column hold keys each; {} reads one column. Give one \
                 --path-column, or leave that option out",
                shapes.first().copied().unwrap_or("--checksum-column")
            )));
        }
        if let Some(c) = more_columns.iter().find(|c| {
            service.as_ref().is_some_and(|s| s.column == **c)
                || checksum_column.as_ref() == Some(*c)
        }) {
            return Err(ConfigError(format!(
                "--path-column {c:?} is also the --service-column or --checksum-column"
            )));
        }
        if json.is_some() && checksum_column.is_some() {
            return Err(ConfigError(
                "--checksum-column checks one object per row; with --json-key a row holds \
                 several. Leave one of them out"
                    .into(),
            ));
        }
        // Rows tell the buckets apart by a service, or by URLs; not by a key column.
        check_locations(
            &source,
            &dest,
            service.is_some() || (urls.is_some() && more_columns.is_empty()),
        )?;
        let rule = match (&a.rewrite, &a.to) {
            (Some(re), Some(to)) => {
                let compiled = Regex::new(re).map_err(|e| {
                    ConfigError(format!("--rewrite {re:?} is not a valid regex:\n{e}"))
                })?;
                check_template(&compiled, to)?;
                Some((compiled, to.clone()))
            }
            (None, None) => None,
            _ => {
                return Err(ConfigError(
                    "--rewrite and --to go together: give both or neither".into(),
                ))
            }
        };
        if a.batch_size == 0 || a.batch_size > 100_000 {
            return Err(ConfigError(format!(
                "--batch-size {} is out of range; use 1 to 100000 (default 5000)",
                a.batch_size
            )));
        }
        if a.concurrency == 0 || a.concurrency > 4096 {
            return Err(ConfigError(format!(
                "--concurrency {} is out of range; use 1 to 4096 (default 64)",
                a.concurrency
            )));
        }
        if a.batch_timeout == 0 {
            return Err(ConfigError(
                "--batch-timeout must be at least 1 second (default 600)".into(),
            ));
        }
        let multipart_threshold = a
            .multipart_threshold
            .as_deref()
            .map(|t| parse_size("--multipart-threshold", t))
            .transpose()?;
        let part_size = parse_size("--part-size", &a.part_size)?;
        for (flag, v) in [
            (
                "--multipart-threshold",
                multipart_threshold.unwrap_or(MIN_PART),
            ),
            ("--part-size", part_size),
        ] {
            if !(MIN_PART..=MAX_SINGLE_COPY).contains(&v) {
                return Err(ConfigError(format!(
                    "{flag} {v} bytes is out of range: S3 parts are 5MiB to 5GiB"
                )));
            }
        }
        let common = S3Settings::from_args(&a.s3)?;
        let source_s3 = common.side(
            "source",
            &a.source_endpoint_url,
            &a.source_profile,
            &a.source_region,
            "RELOCATOR_SOURCE",
        )?;
        let dest_s3 = common.side(
            "dest",
            &a.dest_endpoint_url,
            &a.dest_profile,
            &a.dest_region,
            "RELOCATOR_DEST",
        )?;
        let write = WriteOptions {
            metadata: a
                .set_metadata
                .iter()
                .map(|kv| parse_metadata(kv))
                .collect::<Result<_, _>>()?,
            storage_class: a
                .storage_class
                .as_deref()
                .map(parse_storage_class)
                .transpose()?,
            encryption: parse_encryption(a.sse.as_deref(), a.sse_kms_key_id.as_deref())?,
        };
        Ok(JobConfig {
            write,
            verify_content: a.verify_content,
            source_s3,
            dest_s3,
            batch_timeout: Duration::from_secs(a.batch_timeout),
            multipart_threshold,
            part_size,
            database_url,
            table,
            id_column,
            path_column,
            more_columns,
            referenced_by,
            rewrite: Rewrite::new(&source.prefix, &dest.prefix, rule),
            rewrite_spec: a.rewrite.clone().zip(a.to.clone()),
            source,
            dest,
            service,
            urls,
            json,
            checksum_column,
            batch_size: a.batch_size,
            concurrency: a.concurrency,
        })
    }

    /// Why this job looks like production — a database or S3 endpoint not on this
    /// machine — or `None` for a local stack. Such a run must follow a backup.
    pub fn production_reason(&self) -> Option<String> {
        let mut remote = Vec::new();
        if let Ok(pg) = self.database_url.expose().parse::<tokio_postgres::Config>() {
            for h in pg.get_hosts() {
                if let tokio_postgres::config::Host::Tcp(name) = h {
                    if !is_local_host(name) {
                        remote.push(format!("database host {name}"));
                    }
                }
            }
        }
        // Each side's own endpoint: a remote --dest-endpoint-url beside a local
        // --endpoint-url is production too.
        let sides: &[(&str, &S3Settings)] =
            if self.source_s3.endpoint_url == self.dest_s3.endpoint_url {
                &[("", &self.source_s3)]
            } else {
                &[("source ", &self.source_s3), ("dest ", &self.dest_s3)]
            };
        for (side, s) in sides {
            let why = match &s.endpoint_url {
                None => format!("{side}S3 on AWS (no endpoint URL)"),
                Some(e) => {
                    let host = url::Url::parse(e)
                        .ok()
                        .and_then(|u| u.host_str().map(str::to_owned))
                        .unwrap_or_default();
                    if is_local_host(&host) {
                        continue;
                    }
                    format!("{side}S3 endpoint {host}")
                }
            };
            remote.push(why);
        }
        (!remote.is_empty()).then(|| remote.join(", "))
    }

    /// Objects larger than this are copied in parts: `--multipart-threshold`, else 5 GiB
    /// for a server-side copy and 64 MiB for a streamed one.
    pub fn multipart_threshold(&self, server_side: bool) -> u64 {
        self.multipart_threshold.unwrap_or(if server_side {
            MAX_SINGLE_COPY
        } else {
            64 << 20
        })
    }

    /// The same job with source and destination swapped: what a rollback copies back
    /// through (the copy stage reads only the two locations).
    pub fn reversed(&self) -> JobConfig {
        JobConfig {
            source: self.dest.clone(),
            dest: self.source.clone(),
            source_s3: self.dest_s3.clone(),
            dest_s3: self.source_s3.clone(),
            // Objects go back as they were: the options were for the destination.
            write: WriteOptions::default(),
            ..self.clone()
        }
    }

    /// `--service-column` as the ledger remembers it for the table's later jobs:
    /// `{"column": ..., "buckets": {service: bucket}}`.
    pub fn services_json(&self) -> Option<serde_json::Value> {
        self.service.as_ref().map(|s| {
            serde_json::json!({
                "column": s.column,
                "buckets": {
                    s.source.as_str(): self.source.bucket,
                    s.dest.as_str(): self.dest.bucket,
                },
            })
        })
    }

    /// The `--path-column`s, sorted: in any order they are the same job, and a row's
    /// value lists them so.
    pub fn columns(&self) -> Vec<String> {
        let mut all: Vec<String> = std::iter::once(&self.path_column)
            .chain(&self.more_columns)
            .cloned()
            .collect();
        all.sort();
        all
    }

    /// Identifies "the same job" across reruns, so an interrupted run is resumed.
    pub fn fingerprint(&self) -> String {
        let (re, to) = self
            .rewrite_spec
            .clone()
            .unwrap_or_else(|| (String::new(), String::new()));
        let service = self
            .service
            .as_ref()
            .map(|s| format!("|{}|{}|{}", s.column, s.source, s.dest))
            .unwrap_or_default()
            + &self
                .urls
                .as_ref()
                .map(|u| {
                    // The same prefixes in another order are the same job.
                    let mut source = u.source.clone();
                    source.sort();
                    let columns = if u.columns.is_empty() {
                        String::new()
                    } else {
                        format!("|{}", u.columns.join(","))
                    };
                    format!("|urls|{}|{}{columns}", source.join(" "), u.dest)
                })
                .unwrap_or_default()
            + &self
                .json
                .as_ref()
                .map(|j| {
                    // The same fields in another order are the same job.
                    let (mut keys, mut set) = (j.keys.clone(), j.set.clone());
                    keys.sort();
                    set.sort();
                    format!("|json|{keys:?}|{set:?}")
                })
                .unwrap_or_default();
        format!(
            "{}|{}|{}|{}|{}|{}|{}{service}",
            self.table,
            self.id_column,
            self.columns().join(","),
            self.source,
            self.dest,
            re,
            to
        )
    }
}

/// `KEY=VALUE` for x-amz-meta-KEY: the key a lower-case HTTP token, the value printable
/// ASCII (what every S3 implementation stores unchanged).
fn parse_metadata(kv: &str) -> Result<(String, String), ConfigError> {
    let bad = || {
        ConfigError(format!(
            "--set-metadata {kv:?}: write KEY=VALUE, the key of letters, digits and '-' \
             (stored as x-amz-meta-KEY), the value printable ASCII"
        ))
    };
    let (k, v) = kv.split_once('=').ok_or_else(bad)?;
    let key_ok = !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let value_ok = v.bytes().all(|b| (0x20..0x7f).contains(&b));
    if !key_ok || !value_ok {
        return Err(bad());
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// `--storage-class`: one S3 knows. The archive classes are refused: their objects cannot
/// be read back without a restore, so a copy could be neither verified nor rolled back.
fn parse_storage_class(s: &str) -> Result<aws_sdk_s3::types::StorageClass, ConfigError> {
    use aws_sdk_s3::types::StorageClass;
    let known = StorageClass::values();
    if !known.contains(&s) {
        return Err(ConfigError(format!(
            "--storage-class {s:?} is not an S3 storage class; use one of {}",
            known.join(", ")
        )));
    }
    if matches!(s, "GLACIER" | "DEEP_ARCHIVE") {
        return Err(ConfigError(format!(
            "--storage-class {s}: objects in an archive class cannot be read back without a \
             restore, so relocator could not verify or roll back its copies; move them with \
             STANDARD (or GLACIER_IR), then let a lifecycle rule archive them"
        )));
    }
    Ok(StorageClass::from(s))
}

/// `--sse` and `--sse-kms-key-id`.
fn parse_encryption(
    sse: Option<&str>,
    kms_key: Option<&str>,
) -> Result<Option<Encryption>, ConfigError> {
    match (sse, kms_key) {
        (None, None) => Ok(None),
        (Some("AES256"), None) => Ok(Some(Encryption::S3)),
        (Some("aws:kms"), key) => match key {
            Some("") => Err(ConfigError(
                "--sse-kms-key-id is empty; give a key id, ARN or alias, or leave it out for \
                 the account's aws/s3 key"
                    .into(),
            )),
            key => Ok(Some(Encryption::Kms(key.map(str::to_owned)))),
        },
        (Some("AES256") | None, Some(_)) => Err(ConfigError(
            "--sse-kms-key-id goes with --sse aws:kms".into(),
        )),
        (Some(other), _) => Err(ConfigError(format!(
            "--sse {other:?} is not a server-side encryption S3 takes here; use AES256 \
             (SSE-S3) or aws:kms (SSE-KMS, with --sse-kms-key-id)"
        ))),
    }
}

/// S3's smallest part (except the last) and largest single copy.
const MIN_PART: u64 = 5 << 20;
const MAX_SINGLE_COPY: u64 = 5 << 30;

/// A size in bytes: `1048576`, `8MiB`, `5GiB`, `512KiB` (also MB/GB/KB, read as binary).
fn parse_size(flag: &str, s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => 0,
    };
    num.parse::<u64>()
        .ok()
        .filter(|_| mult > 0)
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            ConfigError(format!(
                "{flag} {s:?} is not a size; write bytes or e.g. 8MiB, 5GiB"
            ))
        })
}

/// localhost or a loopback address (IPv6 possibly in brackets).
fn is_local_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// `--service-column` with its two values: the column naming each row's bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceColumn {
    pub column: String,
    /// The value of rows whose objects are in `--source`'s bucket.
    pub source: String,
    /// The value a moved row gets.
    pub dest: String,
}

impl ServiceColumn {
    fn from_args(
        a: &JobArgs,
        id_column: &str,
        path_column: &str,
    ) -> Result<Option<Self>, ConfigError> {
        let (column, source, dest) = match (&a.service_column, &a.source_service, &a.dest_service) {
            (None, None, None) => return Ok(None),
            (Some(c), Some(s), Some(d)) => (c, s, d),
            _ => {
                return Err(ConfigError(
                    "--service-column, --source-service and --dest-service go together: give \
                     all three or none"
                        .into(),
                ))
            }
        };
        let column = parse_column("--service-column", column)?;
        if column == id_column || column == path_column {
            return Err(ConfigError(format!(
                "--service-column {column:?} is also the --id-column or --path-column; name \
                 the column holding the service (e.g. service_name)"
            )));
        }
        for (flag, v) in [("--source-service", source), ("--dest-service", dest)] {
            if v.is_empty() || v.chars().any(char::is_control) || v.trim() != v {
                return Err(ConfigError(format!(
                    "{flag} {v:?} must be a non-empty value without control characters or \
                     spaces around it (the service's name as config/storage.yml has it)"
                )));
            }
        }
        if source == dest {
            return Err(ConfigError(format!(
                "--source-service and --dest-service are both {source:?}: a moved row would \
                 still be selected. Give the destination's service name"
            )));
        }
        Ok(Some(ServiceColumn {
            column,
            source: source.clone(),
            dest: dest.clone(),
        }))
    }
}

/// `--source-url` (one or more) with `--dest-url`: the path column holds URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlColumn {
    /// What rows hold for objects under `--source`, each a prefix of the value.
    pub source: Vec<String>,
    /// What a moved row holds for objects under `--dest`.
    pub dest: String,
    /// With several `--path-column`s, those holding URLs (`--url-column`), sorted; the
    /// others hold keys. Empty with one `--path-column`: it holds URLs.
    pub columns: Vec<String>,
}

impl UrlColumn {
    fn from_args(a: &JobArgs, path_columns: &[String]) -> Result<Option<Self>, ConfigError> {
        let dest = match (&a.dest_url, a.source_url.is_empty()) {
            (None, true) if a.url_column.is_empty() => return Ok(None),
            (None, true) => {
                return Err(ConfigError(
                    "--url-column names a column holding URLs: give --source-url and \
                     --dest-url with it"
                        .into(),
                ))
            }
            (Some(d), false) => d,
            _ => {
                return Err(ConfigError(
                    "--source-url and --dest-url go together: give at least one --source-url \
                     and one --dest-url, or neither"
                        .into(),
                ))
            }
        };
        let mut source: Vec<String> = Vec::new();
        for u in &a.source_url {
            check_url_prefix("--source-url", u)?;
            if !source.contains(u) {
                source.push(u.clone());
            }
        }
        check_url_prefix("--dest-url", dest)?;
        // One value must name one location: a prefix inside another would select a
        // row for both (or a moved row again).
        let all: Vec<(&str, &String)> = source
            .iter()
            .map(|u| ("--source-url", u))
            .chain([("--dest-url", dest)])
            .collect();
        // Scheme and host are compared in lower case: they name the same place in any.
        let folded = |u: &str| {
            let at = u.find("://").map_or(0, |i| i + 3);
            let end = at + u[at..].find('/').unwrap_or(u.len() - at);
            format!("{}{}", u[..end].to_ascii_lowercase(), &u[end..])
        };
        for (i, (f1, u1)) in all.iter().enumerate() {
            for (f2, u2) in &all[i + 1..] {
                let (a, b) = (folded(u1), folded(u2));
                if a.starts_with(&b) || b.starts_with(&a) {
                    return Err(ConfigError(format!(
                        "{f1} {u1:?} and {f2} {u2:?} overlap: one starts with the other, so a \
                         value under both could not be told apart (and a moved row would be \
                         selected again). Give prefixes where neither starts with the other"
                    )));
                }
            }
        }
        let mut columns: Vec<String> = Vec::new();
        for c in &a.url_column {
            let c = parse_column("--url-column", c)?;
            if !path_columns.contains(&c) {
                return Err(ConfigError(format!(
                    "--url-column {c:?} is not a --path-column: give it as --path-column \
                     too (--url-column says which of them hold URLs)"
                )));
            }
            if !columns.contains(&c) {
                columns.push(c);
            }
        }
        // One column: it holds the URLs, whether --url-column says so or not.
        if path_columns.len() < 2 {
            columns.clear();
        }
        columns.sort();
        Ok(Some(UrlColumn {
            source,
            dest: dest.clone(),
            columns,
        }))
    }
}

/// `--json-key` (one or more) with `--json-set`: the path column holds JSON documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonDocument {
    /// The field paths holding keys, each split at its dots.
    pub keys: Vec<Vec<String>>,
    /// Fields set next to each moved key: (name, string value).
    pub set: Vec<(String, String)>,
}

impl JsonDocument {
    fn from_args(a: &JobArgs) -> Result<Option<Self>, ConfigError> {
        if a.json_key.is_empty() {
            if !a.json_set.is_empty() {
                return Err(ConfigError(
                    "--json-set goes with --json-key: name the fields holding keys".into(),
                ));
            }
            return Ok(None);
        }
        let mut keys: Vec<Vec<String>> = Vec::new();
        for k in &a.json_key {
            let path: Vec<String> = k.split('.').map(str::to_owned).collect();
            if path
                .iter()
                .any(|p| p.is_empty() || p.chars().any(char::is_control))
            {
                return Err(ConfigError(format!(
                    "--json-key {k:?} is not a field path: write field names separated by dots, \
                     e.g. id or derivatives.thumb.id"
                )));
            }
            if !keys.contains(&path) {
                keys.push(path);
            }
        }
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                if a.starts_with(b) || b.starts_with(a) {
                    return Err(ConfigError(format!(
                        "--json-key {:?} and {:?}: one is inside the other, so a field would \
                         be both a key and an object holding one",
                        a.join("."),
                        b.join(".")
                    )));
                }
            }
        }
        let mut set: Vec<(String, String)> = Vec::new();
        for kv in &a.json_set {
            let bad = |why: &str| {
                ConfigError(format!(
                    "--json-set {kv:?} {why}; write FIELD=VALUE, e.g. storage=store"
                ))
            };
            let (field, value) = kv.split_once('=').ok_or_else(|| bad("has no '='"))?;
            if field.is_empty() || field.contains('.') || field.chars().any(char::is_control) {
                return Err(bad(
                    "needs a field name without dots (it is set next to each key)",
                ));
            }
            if value.chars().any(char::is_control) {
                return Err(bad("has a control character in its value"));
            }
            // A field on the way to a key, or the key's own, would be overwritten.
            if keys.iter().any(|k| k.iter().any(|seg| seg == field)) {
                return Err(bad("names a field --json-key moves or reads through"));
            }
            if set.iter().any(|(f, _)| f == field) {
                return Err(bad("sets a field another --json-set sets"));
            }
            set.push((field.to_owned(), value.to_owned()));
        }
        Ok(Some(JsonDocument { keys, set }))
    }
}

/// A URL prefix: http(s)://HOST/ and a path, with no query string or fragment.
fn check_url_prefix(flag: &str, u: &str) -> Result<(), ConfigError> {
    let bad = |why: &str| {
        ConfigError(format!(
            "{flag} {u:?} {why}; write the start of what the rows hold, scheme and host \
             included, up to a '/', e.g. https://cdn.example.com/image/"
        ))
    };
    let Some((scheme, rest)) = u.split_once("://") else {
        return Err(bad("is not a URL"));
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(bad("is not an http or https URL"));
    }
    let Some((host, _)) = rest.split_once('/') else {
        return Err(bad("has no path after the host (not even '/')"));
    };
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    // --source and --dest prefixes end with '/': a URL prefix without it would glue the
    // key's rest onto its last segment.
    if !u.ends_with('/') {
        return Err(bad("does not end with '/'"));
    }
    if u.contains(['?', '#', '%']) || u.chars().any(|c| c.is_control() || c == ' ') {
        return Err(bad(
            "has a '?', '#', '%', space or control character (a prefix is matched as \
             written, before any decoding)",
        ));
    }
    Ok(())
}

/// Refuse moves a rerun would repeat: the same location, or, within one bucket, one
/// prefix inside the other (moved keys would be selected again, or sources would collide
/// with destinations).
/// With a `--service-column` or URL columns in different buckets, the rows tell the
/// buckets apart: the prefixes may overlap, even be one (the key stays, the bucket
/// changes).
fn check_locations(src: &S3Location, dst: &S3Location, service: bool) -> Result<(), ConfigError> {
    if src == dst {
        return Err(ConfigError(format!(
            "--source and --dest are both {src}; nothing would move and the cleanup would delete \
             what the rows point at. Give a different destination"
        )));
    }
    if service && src.bucket != dst.bucket {
        return Ok(());
    }
    // Rows hold keys, not buckets: rows are selected by the source prefix alone, so a
    // destination prefix inside it (or around it) selects moved rows again — in any
    // bucket — and copies whatever the source bucket holds at that key onto them.
    if dst.prefix.starts_with(&src.prefix) || src.prefix.starts_with(&dst.prefix) {
        let place = if src.bucket == dst.bucket {
            "in the same bucket"
        } else {
            "in different buckets, but rows hold only the key"
        };
        return Err(ConfigError(format!(
            "--dest {dst} and --source {src} overlap ({place}): one prefix contains the \
             other, so a moved row's new key would still match --source and be selected and \
             moved again. Choose prefixes where neither starts with the other (e.g. image/ \
             and avatar/)"
        )));
    }
    Ok(())
}

/// Catch `$2` in a template whose regex has one group before any row is touched.
fn check_template(re: &Regex, to: &str) -> Result<(), ConfigError> {
    let group_ref = Regex::new(r"\$(?:\{([^}]*)\}|([A-Za-z0-9_]+))").expect("static regex");
    for cap in group_ref.captures_iter(to) {
        let name = cap
            .get(1)
            .or_else(|| cap.get(2))
            .map(|m| m.as_str())
            .unwrap_or("");
        let known = match name.parse::<usize>() {
            Ok(n) => n < re.captures_len(),
            Err(_) => re.capture_names().flatten().any(|n| n == name),
        };
        if !known {
            return Err(ConfigError(format!(
                "--to {to:?} refers to ${name}, which --rewrite {:?} does not capture \
                 (write ${{1}}x rather than $1x when a name follows)",
                re.as_str()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `relocator run` with these options after the job's own.
    fn run_args(extra: &[&str]) -> crate::cli::RunArgs {
        use clap::Parser;
        let mut argv = vec![
            "relocator",
            "run",
            "--database-url",
            "postgres://u:secret@127.0.0.1/db",
            "--table",
            "avatars",
            "--source",
            "s3://legacy-s3/image/",
            "--dest",
            "s3://production-s3/avatar/",
            "--endpoint-url",
            "http://127.0.0.1:9000",
        ];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(argv) {
            Ok(crate::cli::Cli {
                command: crate::cli::Command::Run(a),
                ..
            }) => a,
            other => panic!("not a run: {other:?}"),
        }
    }

    fn policy(extra: &[&str]) -> Result<RunPolicy, ConfigError> {
        let a = run_args(extra);
        let cfg = JobConfig::from_args(&a.job).expect("a valid job");
        RunPolicy::from_args(&a, &cfg)
    }

    #[test]
    fn the_same_shape_options_in_another_order_are_the_same_job() {
        let job = |extra: &[&str]| {
            JobConfig::from_args(&run_args(extra).job)
                .expect("a valid job")
                .fingerprint()
        };
        let (a, b, d) = (
            "https://a.example/i/",
            "http://b.example/",
            "https://n.example/a/",
        );
        assert_eq!(
            job(&["--source-url", a, "--source-url", b, "--dest-url", d]),
            job(&["--source-url", b, "--source-url", a, "--dest-url", d])
        );
        assert_ne!(
            job(&["--source-url", a, "--dest-url", d]),
            job(&["--source-url", b, "--dest-url", d])
        );
        let (k1, k2) = ("id", "derivatives.thumb.id");
        assert_eq!(
            job(&[
                "--json-key",
                k1,
                "--json-key",
                k2,
                "--json-set",
                "s=1",
                "--json-set",
                "t=2"
            ]),
            job(&[
                "--json-key",
                k2,
                "--json-key",
                k1,
                "--json-set",
                "t=2",
                "--json-set",
                "s=1"
            ])
        );
        // Which columns hold URLs is part of the job; their order is not.
        let cols = |order: [&'static str; 3], urls: &[&'static str]| {
            let mut extra = vec!["--source-url", a, "--dest-url", d];
            for c in order {
                extra.extend(["--path-column", c]);
            }
            for c in urls {
                extra.extend(["--url-column", *c]);
            }
            job(&extra)
        };
        assert_eq!(
            cols(["x", "y", "z"], &["x", "z"]),
            cols(["z", "x", "y"], &["z", "x"])
        );
        assert_ne!(cols(["x", "y", "z"], &["x"]), cols(["x", "y", "z"], &["y"]));
    }

    #[test]
    fn a_run_on_any_remote_endpoint_must_follow_a_backup() {
        assert_eq!(
            policy(&[]).map(|p| p.backup),
            Ok(None),
            "a local stack needs no backup"
        );
        // Both sides on one remote endpoint: named once.
        let e = policy(&[
            "--source-endpoint-url",
            "https://s3.example.com",
            "--dest-endpoint-url",
            "https://s3.example.com",
        ])
        .expect_err("remote");
        assert!(e.0.contains("(S3 endpoint s3.example.com)"), "{e}");
        // A remote destination beside a local shared endpoint: production.
        let e = policy(&["--dest-endpoint-url", "https://s3.eu-west-1.amazonaws.com"])
            .expect_err("a remote destination needs a backup");
        assert!(
            e.0.contains("dest S3 endpoint s3.eu-west-1.amazonaws.com"),
            "{e}"
        );
        assert!(e.0.contains("--backup FILE.csv"), "{e}");
        let e = policy(&["--source-endpoint-url", "https://minio.example.com"])
            .expect_err("a remote source needs a backup");
        assert!(e.0.contains("source S3 endpoint minio.example.com"), "{e}");
        assert!(policy(&[
            "--dest-endpoint-url",
            "https://s3.eu-west-1.amazonaws.com",
            "--no-backup"
        ])
        .is_ok());
        assert_eq!(
            policy(&[
                "--dest-endpoint-url",
                "https://s3.eu-west-1.amazonaws.com",
                "--backup",
                "b.csv"
            ])
            .map(|p| p.backup),
            Ok(Some("b.csv".into()))
        );
    }

    #[test]
    fn run_options_out_of_range_are_refused() {
        for (extra, names) in [
            (&["--workers", "0"][..], "--workers 0"),
            (&["--workers", "257"][..], "--workers 257"),
            (&["--lease-ttl", "0"][..], "--lease-ttl 0"),
            (&["--max-replica-lag", "0s"][..], "--max-replica-lag \"0s\""),
            (
                &["--max-replica-lag", "10 seconds"][..],
                "--max-replica-lag",
            ),
            (&["--max-wal-rate", "lots"][..], "--max-wal-rate \"lots\""),
            (&["--max-wal-rate", "0"][..], "--max-wal-rate 0"),
            (
                &["--replica-url", "postgres://r/db"][..],
                "--max-replica-lag too",
            ),
        ] {
            let e = policy(extra).expect_err(names);
            assert!(e.0.contains(names), "{e}");
        }
        assert_eq!(
            policy(&["--workers", "4", "--lease-ttl", "30"]),
            Ok(RunPolicy {
                workers: 4,
                lease_ttl: Some(Duration::from_secs(30)),
                backup: None,
                health: Health {
                    autovacuum_pause: true,
                    ..Health::default()
                },
            })
        );
        let p = policy(&[
            "--max-replica-lag",
            "1.5s",
            "--replica-url",
            "postgres://u:secret@replica/db",
            "--max-wal-rate",
            "32MiB/s",
            "--no-autovacuum-pause",
        ])
        .unwrap();
        assert_eq!(p.health.max_replica_lag, Some(Duration::from_millis(1500)));
        assert_eq!(p.health.max_wal_rate, Some(32 << 20));
        assert!(!p.health.autovacuum_pause);
        assert!(!format!("{:?}", p.health).contains("secret"));
    }

    #[test]
    fn s3_urls_normalise_the_prefix() {
        let l = S3Location::parse("--source", "s3://legacy-s3/image").unwrap();
        assert_eq!(l.prefix, "image/");
        assert_eq!(l.to_string(), "s3://legacy-s3/image/");
        let whole = S3Location::parse("--source", "s3://legacy-s3").unwrap();
        assert_eq!(whole.prefix, "");
        assert!(S3Location::parse("--source", "legacy-s3/image/").is_err());
        assert!(S3Location::parse("--source", "s3://Legacy_S3/image/").is_err());
        assert!(S3Location::parse("--source", "s3://legacy-s3//image/").is_err());
        assert!(S3Location::parse("--source", "s3://legacy-s3/../x/").is_err());
    }

    #[test]
    fn same_or_nested_locations_are_refused() {
        let loc = |s| S3Location::parse("x", s).unwrap();
        assert!(check_locations(&loc("s3://a-b/image/"), &loc("s3://a-b/image/"), false).is_err());
        assert!(
            check_locations(&loc("s3://a-b/image/"), &loc("s3://a-b/image/new/"), false).is_err()
        );
        assert!(check_locations(&loc("s3://a-b/image/"), &loc("s3://a-b"), false).is_err());
        assert!(check_locations(&loc("s3://a-b/image/"), &loc("s3://a-b/avatar/"), false).is_ok());
        // Rows hold keys only: overlapping prefixes are ambiguous across buckets too.
        assert!(check_locations(&loc("s3://a-b/image/"), &loc("s3://c-d/image/"), false).is_err());
        assert!(check_locations(&loc("s3://a-b/te/"), &loc("s3://c-d/te/new/"), false).is_err());
        assert!(check_locations(&loc("s3://a-b/te/new/"), &loc("s3://c-d/te/"), false).is_err());
        assert!(check_locations(&loc("s3://a-b/image/"), &loc("s3://c-d/avatar/"), false).is_ok());
        // With a service column in different buckets the rows tell the buckets apart.
        assert!(check_locations(&loc("s3://a-b/"), &loc("s3://c-d/"), true).is_ok());
        assert!(check_locations(&loc("s3://a-b/x/"), &loc("s3://c-d/x/y/"), true).is_ok());
        assert!(check_locations(&loc("s3://a-b/x/"), &loc("s3://a-b/x/y/"), true).is_err());
        assert!(check_locations(&loc("s3://a-b/"), &loc("s3://a-b/"), true).is_err());
    }

    #[test]
    fn identifiers_are_parsed_like_postgres() {
        assert_eq!(
            TableName::parse("App.Avatars").unwrap(),
            TableName {
                schema: Some("app".into()),
                name: "avatars".into()
            }
        );
        let weird = TableName::parse(r#""we""ird"."na.me""#).unwrap();
        assert_eq!(weird.schema.as_deref(), Some("we\"ird"));
        assert_eq!(weird.name, "na.me");
        assert_eq!(weird.to_string(), r#""we""ird"."na.me""#);
        let err = TableName::parse("avatars; DROP TABLE x").unwrap_err();
        assert!(err.to_string().contains("quote it"), "{err}");
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("\"open").is_err());
        assert!(parse_column("--id-column", "a.b").is_err());
        let r = ColumnRef::parse(r#"Posts."Image""#).unwrap();
        assert_eq!((r.table.schema, r.table.name.as_str()), (None, "posts"));
        assert_eq!(r.column, "Image");
        let r = ColumnRef::parse(r#"app."a.b".c"#).unwrap();
        assert_eq!(r.to_string(), r#""app"."a.b"."c""#);
        for bad in ["posts", "a.b.c.d", "posts.image; --"] {
            let err = ColumnRef::parse(bad).unwrap_err().to_string();
            assert!(err.contains("--referenced-by"), "{err}");
        }
    }

    #[test]
    fn templates_may_only_use_captured_groups() {
        let re = Regex::new(r"^(\d+)-(?P<name>.*)$").unwrap();
        assert!(check_template(&re, "$1/${name}").is_ok());
        assert!(check_template(&re, "$3").is_err());
        assert!(check_template(&re, "${other}").is_err());
    }

    #[test]
    fn metadata_pairs_are_checked() {
        assert_eq!(
            parse_metadata("migrated-by=relocator 1.0").unwrap(),
            ("migrated-by".into(), "relocator 1.0".into())
        );
        assert!(parse_metadata("novalue").is_err());
        assert!(parse_metadata("Upper=x").is_err());
        assert!(parse_metadata("a=\u{e9}").is_err());
        assert!(parse_metadata("=x").is_err());
    }

    #[test]
    fn storage_classes_and_encryption_are_checked() {
        assert_eq!(
            parse_storage_class("STANDARD_IA").unwrap().as_str(),
            "STANDARD_IA"
        );
        assert!(parse_storage_class("standard_ia").is_err());
        let e = parse_storage_class("DEEP_ARCHIVE").unwrap_err().0;
        assert!(e.contains("restore"), "{e}");
        assert_eq!(parse_encryption(None, None).unwrap(), None);
        assert_eq!(
            parse_encryption(Some("AES256"), None).unwrap(),
            Some(Encryption::S3)
        );
        assert_eq!(
            parse_encryption(Some("aws:kms"), Some("alias/uploads")).unwrap(),
            Some(Encryption::Kms(Some("alias/uploads".into())))
        );
        assert_eq!(
            parse_encryption(Some("aws:kms"), None).unwrap(),
            Some(Encryption::Kms(None))
        );
        assert!(parse_encryption(None, Some("k")).is_err());
        assert!(parse_encryption(Some("AES256"), Some("k")).is_err());
        assert!(parse_encryption(Some("aws:kms"), Some("")).is_err());
        assert!(parse_encryption(Some("aes256"), None).is_err());
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("x", "8MiB").unwrap(), 8 << 20);
        assert_eq!(parse_size("x", "5GiB").unwrap(), 5 << 30);
        assert_eq!(parse_size("x", "1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("x", "64 mb").unwrap(), 64 << 20);
        assert!(parse_size("x", "lots").is_err());
        assert!(parse_size("x", "8XB").is_err());
        assert!(parse_size("x", "99999999999999999999GiB").is_err());
    }

    #[test]
    fn local_hosts_are_recognised() {
        for h in ["localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]"] {
            assert!(is_local_host(h), "{h}");
        }
        for h in [
            "db.example.com",
            "10.0.0.5",
            "s3.amazonaws.com",
            "minio",
            "",
        ] {
            assert!(!is_local_host(h), "{h}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        let r = redact_url("postgres://bob:s3cret@db:5432/app?sslmode=require");
        assert!(!r.contains("s3cret"));
        assert!(r.contains("bob"));
        let r = redact_url("postgres://bob@db/app?password=s3cret");
        assert!(!r.contains("s3cret"), "{r}");
        let r = redact_url("host=db user=bob password=s3cret dbname=app");
        assert!(!r.contains("s3cret"), "{r}");
        let url = DatabaseUrl::new("postgres://bob:s3cret@db/app").unwrap();
        assert!(!format!("{url:?} {url}").contains("s3cret"));
    }

    /// Redaction must not depend on the string parsing: the ones that do not parse are
    /// the ones printed in errors.
    #[test]
    fn passwords_are_redacted_in_strings_that_do_not_parse() {
        for (conn, secret) in [
            ("postgres://app:pw-port@127.0.0.1:543299/prod", "pw-port"),
            ("postgres://app:sl/ash@127.0.0.1:5432/prod", "sl/ash"),
            ("postgres://app:ha#sh@127.0.0.1:5432/prod", "ha#sh"),
            ("postgres://app:qu?est@127.0.0.1:5432/prod", "qu?est"),
            ("postgres://app:a@t@127.0.0.1:5432/prod", "a@t"),
            (
                "postgres://app:hunter2@MyS3cretTail@127.0.0.1:5432/prod",
                "MyS3cretTail",
            ),
            ("postgresql://app:v6pw@[::1]:5432/prod", "v6pw"),
            (
                "postgres://app:all/#?@x@[2001:db8::1]:99999/p?sslmode=require",
                "all/#?@x",
            ),
            ("postgres://app@db/prod?password=qpw&sslmode=require", "qpw"),
            ("host=db user=app password=kvpw dbname=prod", "kvpw"),
            ("host=db user=app password='kv pw' dbname=prod", "kv pw"),
            (
                "host=db port=99999999 user=app password = spaced dbname=prod",
                "spaced",
            ),
        ] {
            let r = redact_url(conn);
            assert!(!r.contains(secret), "{conn} -> {r}");
            assert!(r.contains("app"), "the user stays visible: {r}");
            let shown = match DatabaseUrl::new(conn) {
                Ok(u) => format!("{u} {u:?}"),
                Err(e) => e.to_string(),
            };
            assert!(!shown.contains(secret), "{conn} -> {shown}");
        }
        // An unencoded `@` would leave part of the password in the "host", printed by
        // later messages: refused at once.
        assert!(DatabaseUrl::new("postgres://app:hunter2@MyS3cretTail@127.0.0.1:5432/p").is_err());
    }
}
