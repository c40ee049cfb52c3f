//! The S3 adapter, and the only way relocator reaches S3: one shared client per endpoint
//! ([`Endpoint`]), through which every request waits for `--max-rps` and is counted; the
//! handful of calls relocator makes; one listing ([`S3::listing`]); the S3 error codes
//! callers branch on mapped to [`S3Error`]. Large copies are in `multipart.rs`, copies
//! streamed through relocator in `stream.rs`, what a write sets in `options.rs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, EncodingType, ObjectIdentifier};
use aws_sdk_s3::Client;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::config::S3Settings;

#[macro_use]
mod options;
mod multipart;
mod stream;

pub use multipart::Parts;
pub use options::{Checksum, Encryption, Headers, Metadata, WriteOptions};

/// DeleteObjects takes at most this many keys per request.
pub const DELETE_BATCH: usize = 1000;

/// Why a bucket cannot be used ([`Endpoint::check_bucket`]). `input`: the operator's to
/// fix — a missing bucket, denied access, a wrong region or endpoint — so the command
/// exits 2; else the server is failing, and a rerun later may pass.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BucketError {
    pub message: String,
    pub input: bool,
}

/// What callers branch on. Everything else is `Other`, with the S3 code and message.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("not found")]
    NotFound,
    /// A conditional request's condition failed (e.g. the source changed during the copy).
    #[error("precondition failed")]
    PreconditionFailed,
    /// A create-only write (`If-None-Match: *`, sent once) was refused: something is at
    /// the destination by now.
    #[error("the destination was taken meanwhile")]
    DestinationTaken,
    /// The server refused this object for a reason that concerns only it (4xx): the row
    /// is reported, the run goes on.
    #[error("{0}")]
    Rejected(String),
    /// No answer says whether the request was carried out (network, timeout, 5xx,
    /// throttling). A request a look decided ([`once`]) is not retried by the SDK: the
    /// caller looks again before another attempt.
    #[error("{0}")]
    Unanswered(String),
    /// Anything else: the run stops, rerun later.
    #[error("{0}")]
    Other(String),
}

/// The override that sends a request once, without the SDK's retries: for a write or a
/// delete a look decided (the destination was free, the source still the object copied).
/// A retry the SDK made seconds later — after its backoff, or after a timed-out attempt
/// — would act on a look gone stale meanwhile: overwrite an object put there since, or
/// delete a source uploaded again. The caller gets [`S3Error::Unanswered`] and looks again.
pub fn once() -> aws_sdk_s3::config::Builder {
    aws_sdk_s3::config::Builder::new().retry_config(RetryConfig::disabled())
}

/// The wait before attempt `attempt + 1` of a request sent [`once`]: the SDK's own
/// backoff (100 ms doubling, at most 10 s).
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64 << attempt.min(7)).min(Duration::from_secs(10))
}

/// An object's identity as far as relocator compares them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The ETag without quotes.
    pub etag: String,
    pub size: i64,
    /// The version looked at, in a versioned bucket (HEAD's `x-amz-version-id`, or the
    /// latest version in ListObjectVersions): a copy takes exactly this version.
    pub version: Option<String>,
}

impl ObjectInfo {
    /// Same bytes, as far as S3 tells without reading them: ETag (MD5 for single-part
    /// uploads) and size both equal.
    pub fn same_content(&self, other: &ObjectInfo) -> bool {
        self.etag == other.etag && self.size == other.size
    }

    /// Whether this is the object with `etag` — and, where both name one, `version`.
    pub fn is(&self, etag: &str, version: Option<&str>) -> bool {
        self.etag == etag
            && match (version, &self.version) {
                (Some(v), Some(now)) => v == now,
                _ => true,
            }
    }

    /// A multipart upload's ETag (`md5-of-md5s-N`) is not an MD5 of the bytes, and a copy
    /// of such an object gets a different one; only the size can be compared then.
    pub fn is_multipart(&self) -> bool {
        self.etag.contains('-')
    }
}

/// Build the shared client. Credentials and region come from the standard AWS chain;
/// the endpoint, when given, switches to path-style addressing (MinIO, Garage).
pub async fn client(settings: &S3Settings) -> Client {
    let mut loader = aws_config::from_env();
    if let Some(p) = &settings.profile {
        loader = loader.profile_name(p);
    }
    if let Some(r) = &settings.region {
        loader = loader.region(aws_sdk_s3::config::Region::new(r.clone()));
    }
    if let Some(c) = &settings.credentials {
        loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
            &c.access_key_id,
            c.secret_access_key(),
            None,
            None,
            "relocator-env",
        ));
    }
    let shared = loader.load().await;
    let mut b = aws_sdk_s3::config::Builder::from(&shared)
        // Recent SDKs add CRC32 checksums (trailers) to every upload by default. Garage
        // 2.5 accepts them (checked against the local stack), but some S3-compatible
        // providers reject them (OVH, UpCloud, older gateways), so send and validate
        // checksums only where the API requires them (DeleteObjects). Copies are checked
        // by ETag and size instead.
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        // Adaptive mode: on throttling answers (503 SlowDown, 429) the SDK's client-side
        // token bucket cuts the request rate and grows it back slowly, on top of the
        // exponential backoff of each retry.
        .retry_config(
            RetryConfig::adaptive()
                .with_max_attempts(settings.max_attempts)
                .with_initial_backoff(Duration::from_millis(100))
                .with_max_backoff(Duration::from_secs(10)),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .operation_attempt_timeout(settings.timeout)
                .build(),
        );
    if let Some(endpoint) = &settings.endpoint_url {
        b = b.endpoint_url(endpoint).force_path_style(true);
    }
    Client::from_conf(b.build())
}

/// Which side of a job a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Dest,
}

type Limiter = governor::DefaultDirectRateLimiter;

/// One S3 endpoint as relocator reaches it: the SDK client and the job's `--max-rps`
/// cap. Every request goes through [`Endpoint::read`] or [`Endpoint::write`] — the only
/// way to the client — which wait for the cap and count the request, so no command and
/// no call can send one unpaced.
#[derive(Clone)]
pub struct Endpoint {
    client: Client,
    limiter: Option<Arc<Limiter>>,
}

/// A copy's rate permits, taken before relocator looks at the destination, so that
/// `--max-rps` never waits between the look and the copy it decides
/// ([`Endpoint::permit`]): the write, and the reads the copy makes before it that are
/// already paid for.
#[must_use]
pub struct Permit {
    reads: u32,
}

impl From<Client> for Endpoint {
    /// An endpoint without a rate cap (seeding, the benchmark, tests).
    fn from(client: Client) -> Endpoint {
        Endpoint {
            client,
            limiter: None,
        }
    }
}

impl Endpoint {
    /// Before a read request (HEAD, GET, LIST): wait for the rate cap, count it.
    async fn read(&self) -> &Client {
        REQUESTS.reads.fetch_add(1, Ordering::Relaxed);
        self.wait().await;
        &self.client
    }

    /// Before a write request (COPY, PUT, DELETE, an upload's steps): wait for the rate
    /// cap, count it.
    async fn write(&self) -> &Client {
        REQUESTS.writes.fetch_add(1, Ordering::Relaxed);
        self.wait().await;
        &self.client
    }

    /// A copy's permits now, for a copy decided by a look that follows: its write, and
    /// the source read it makes first where it makes one (`reads_first`: a streamed or
    /// multipart copy, or a server-side one with extra metadata; see [`S3::reads_first`]).
    pub async fn permit(&self, reads_first: bool) -> Permit {
        let reads = u32::from(reads_first);
        REQUESTS.writes.fetch_add(1, Ordering::Relaxed);
        REQUESTS
            .reads
            .fetch_add(u64::from(reads), Ordering::Relaxed);
        for _ in 0..=reads {
            self.wait().await;
        }
        Permit { reads }
    }

    /// The client for a read the permit has paid for, else one that waits its turn.
    pub(super) async fn paid_read(&self, permit: &mut Permit) -> &Client {
        if permit.reads > 0 {
            permit.reads -= 1;
            &self.client
        } else {
            self.read().await
        }
    }

    /// Whether requests wait for `--max-rps`.
    pub fn paced(&self) -> bool {
        self.limiter.is_some()
    }

    /// This endpoint with the rate permits of `n` requests paid now, for requests that
    /// must follow each other without a `--max-rps` wait between them (a cleanup's looks
    /// and the deletes they decide). The endpoint returned counts its requests but waits
    /// no more: use it for those `n` only.
    pub async fn prepaid(&self, n: usize) -> Endpoint {
        if self.limiter.is_some() {
            for _ in 0..n {
                self.wait().await;
            }
        }
        Endpoint {
            client: self.client.clone(),
            limiter: None,
        }
    }

    async fn wait(&self) {
        if let Some(l) = &self.limiter {
            l.until_ready().await;
        }
    }
}

impl Permit {
    /// The client, for the one write this permit was taken for.
    fn spend(self, e: &Endpoint) -> &Client {
        &e.client
    }
}

/// One copy: the source as relocator saw it, where it goes, and how it is written.
#[derive(Debug, Clone, Copy)]
pub struct CopySpec<'a> {
    pub src_bucket: &'a str,
    pub src_key: &'a str,
    /// The source's identity when it was looked at: the copy is made only while the
    /// source still has this ETag, and from the version looked at where it has one.
    pub src: &'a ObjectInfo,
    pub dst_bucket: &'a str,
    pub dst_key: &'a str,
    pub write: &'a WriteOptions,
}

impl CopySpec<'_> {
    /// The `x-amz-copy-source` of this copy: the version looked at, where the source has
    /// versions, so a version written since (which a server ignoring
    /// `x-amz-copy-source-if-match`, like moto, would copy) never slips in.
    pub fn copy_source(&self) -> String {
        let source = copy_source(self.src_bucket, self.src_key);
        match &self.src.version {
            Some(v) => format!("{source}?versionId={}", utf8_percent_encode(v, COPY_SOURCE)),
            None => source,
        }
    }
}

/// The S3 side of a job: one endpoint per side (the same client when both sides are one
/// endpoint with one set of credentials; cloned cheaply into every worker) sharing the
/// optional `--max-rps` cap.
#[derive(Clone)]
pub struct S3 {
    pub src: Endpoint,
    pub dst: Endpoint,
    /// Both sides are one endpoint with one set of credentials: copies are server-side
    /// (CopyObject); else they are streamed GET → PUT.
    pub server_side: bool,
    /// The destination refuses a CopyObject onto an existing key when the request says
    /// `If-None-Match: *` (AWS S3 does; Garage, MinIO and moto ignore it): learned per run
    /// by [`S3::learn_create_only`], never assumed. When true every server-side copy is
    /// create-only, so a different object put at the destination after relocator looked
    /// is never overwritten.
    pub create_only: bool,
    /// The destination refuses a PutObject or CompleteMultipartUpload onto an existing key
    /// when the request says `If-None-Match: *` (AWS S3 and moto do; Garage ignores it):
    /// learned by [`S3::learn_create_only`]. When true, streamed and multipart copies are
    /// create-only too.
    pub create_only_put: bool,
    /// Where the multipart uploads relocator starts are noted; None: nothing is known as
    /// relocator's, so no incomplete upload is ever aborted but the one in hand.
    pub uploads: Option<Arc<dyn Uploads>>,
    /// Which listed keys [`S3::list_page`] returns.
    pub held: HeldKeys,
    /// The source bucket keeps versions: its listings read ListObjectVersions, so each
    /// listed object names the version a copy takes. Learned by [`S3::learn_versions`].
    pub versions: bool,
    /// The server refuses (412) a CopyObject whose `x-amz-copy-source-if-match` names
    /// another ETag than the source's (Garage and AWS S3 do; moto ignores it): a copy
    /// made from an old look at the source is then the object looked at, or nothing.
    /// Learned by [`S3::learn_create_only`]'s probe.
    pub copy_checks_source: bool,
}

/// Which listed keys a job can work with. PostgreSQL's text holds no NUL character, and
/// a database not encoded in UTF-8 (or SQL_ASCII) may not hold every character: no row
/// can reference such a key, and a statement given one as a parameter fails, which would
/// stop every run at that page of the listing. Listings leave those keys out (phase 2
/// still finds every row, by id).
#[derive(Debug, Clone, Copy, Default)]
pub struct HeldKeys {
    /// The database is not encoded in UTF-8: keep ASCII keys only.
    pub ascii_only: bool,
}

impl HeldKeys {
    pub fn holds(self, key: &str) -> bool {
        !key.contains('\0') && (!self.ascii_only || key.is_ascii())
    }
}

/// A note of the multipart uploads relocator started (kept by the job in its ledger),
/// so that it aborts only its own: an incomplete upload a killed attempt left at a key
/// is relocator's to abort, an application's upload in progress there never is.
pub trait Uploads: Send + Sync {
    /// Noted right after CreateMultipartUpload, before the first part.
    fn started<'a>(&'a self, bucket: &'a str, key: &'a str, id: &'a str) -> BoxFuture<'a>;
    /// Completed or aborted: no longer relocator's to abort.
    fn ended<'a>(&'a self, bucket: &'a str, key: &'a str, id: &'a str) -> BoxFuture<'a>;
    /// The upload ids at `key` noted and not ended.
    fn ours<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
    ) -> futures::future::BoxFuture<'a, anyhow::Result<Vec<String>>>;
}

/// What [`Uploads`] returns.
pub type BoxFuture<'a> = futures::future::BoxFuture<'a, anyhow::Result<()>>;

impl S3 {
    /// One endpoint for both sides.
    pub fn new(endpoint: Endpoint) -> S3 {
        S3 {
            src: endpoint.clone(),
            dst: endpoint,
            server_side: true,
            create_only: false,
            create_only_put: false,
            uploads: None,
            held: HeldKeys::default(),
            versions: false,
            copy_checks_source: false,
        }
    }

    pub fn pair(
        src: Client,
        dst: Client,
        server_side: bool,
        max_rps: Option<std::num::NonZeroU32>,
    ) -> S3 {
        let limiter = max_rps.map(|n| {
            Arc::new(governor::RateLimiter::direct(
                governor::Quota::per_second(n).allow_burst(std::num::NonZeroU32::MIN),
            ))
        });
        let endpoint = |client| Endpoint {
            client,
            limiter: limiter.clone(),
        };
        S3 {
            src: endpoint(src),
            dst: endpoint(dst),
            server_side,
            create_only: false,
            create_only_put: false,
            uploads: None,
            held: HeldKeys::default(),
            versions: false,
            copy_checks_source: false,
        }
    }

    /// Both sides' clients, for a job's settings.
    pub async fn for_job(cfg: &crate::config::JobConfig) -> S3 {
        S3::for_sides(&cfg.source_s3, &cfg.dest_s3).await
    }

    /// A client per side, the same one where both sides' settings are equal.
    pub async fn for_sides(source: &S3Settings, dest: &S3Settings) -> S3 {
        let src = client(source).await;
        let same = source == dest;
        let dst = if same {
            src.clone()
        } else {
            client(dest).await
        };
        S3::pair(src, dst, same, source.max_rps)
    }

    pub fn side(&self, side: Side) -> &Endpoint {
        match side {
            Side::Source => &self.src,
            Side::Dest => &self.dst,
        }
    }

    /// Whether a copy of `src` reads the source before its write: streamed and multipart
    /// copies do (GET, HEAD), a server-side one only to add `--set-metadata`.
    pub fn reads_first(&self, write: &WriteOptions, in_parts: bool) -> bool {
        !self.server_side || in_parts || !write.metadata.is_empty()
    }

    /// Both sides the destination's endpoint (copies within it: preflight's probes).
    pub fn dest_only(&self) -> S3 {
        S3 {
            src: self.dst.clone(),
            server_side: true,
            ..self.clone()
        }
    }

    /// Source and destination swapped (rollback copies back), sharing the rate cap.
    pub fn reversed(&self) -> S3 {
        S3 {
            src: self.dst.clone(),
            dst: self.src.clone(),
            // What was learned of the destination holds for the source only on one server.
            create_only: self.create_only && self.server_side,
            create_only_put: self.create_only_put && self.server_side,
            ..self.clone()
        }
    }

    /// Ask whether the source bucket keeps versions (GetBucketVersioning): if it does (or
    /// did: suspended), its listings name each object's version, so every copy takes the
    /// version looked at. Unreadable (no `s3:GetBucketVersioning`): listings name none, and
    /// copies rest on `x-amz-copy-source-if-match` and a HEAD's version alone.
    pub async fn learn_versions(&mut self, bucket: &str) {
        self.versions = match self.src.versioning(bucket).await {
            Ok(v) => v != Versioning::Off,
            Err(e) => {
                tracing::warn!(bucket, error = %e, "cannot read the source bucket's versioning; \
                               copies from a listing are not pinned to a version");
                false
            }
        };
    }

    /// Ask the destination whether it honours `If-None-Match: *` on PutObject and on
    /// CopyObject, with probe objects of relocator's own under the destination prefix
    /// (written with the job's write options, as every write): the first put again
    /// create-only, and (server-side copies) a copy of it made create-only onto an earlier
    /// copy — each refused (412) where honoured. Both are removed again. Any other answer
    /// leaves the flag false, the safe assumption. (Server-side copies) also whether a copy
    /// naming a wrong ETag in `x-amz-copy-source-if-match` is refused.
    pub async fn learn_create_only(&mut self, bucket: &str, prefix: &str, write: &WriteOptions) {
        self.create_only = false;
        self.create_only_put = false;
        self.copy_checks_source = false;
        let tag = format!("{:016x}", rand::random::<u64>());
        let (a, b) = (
            format!("{prefix}.relocator-probe-{tag}-a"),
            format!("{prefix}.relocator-probe-{tag}-b"),
        );
        let what = format!("probing s3://{bucket}/{prefix}.relocator-probe-{tag}");
        let put = |client: &Client, create_only: bool| {
            with_write_options!(client.put_object().bucket(bucket).key(&a), write)
                .body(ByteStream::from_static(b"relocator probe"))
                .set_if_none_match(create_only.then(|| "*".to_owned()))
        };
        let copy = |client: &Client, create_only: bool| {
            with_write_options!(
                client
                    .copy_object()
                    .copy_source(copy_source(bucket, &a))
                    .bucket(bucket)
                    .key(&b),
                write
            )
            .set_if_none_match(create_only.then(|| "*".to_owned()))
        };
        let first = put(self.dst.write().await, false)
            .send()
            .await
            .map_err(|e| classify(&what, e));
        if let Err(e) = first {
            tracing::warn!(error = %e, "could not probe whether the destination honours \
                           If-None-Match; assuming it does not");
        } else {
            let again = put(self.dst.write().await, true)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify(&what, e));
            self.create_only_put = honoured(again, "PutObject");
            if self.server_side {
                let answer = async {
                    copy(self.dst.write().await, false)
                        .send()
                        .await
                        .map_err(|e| classify(&what, e))?;
                    copy(self.dst.write().await, true)
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(|e| classify(&what, e))
                }
                .await;
                self.create_only = honoured(answer, "CopyObject");
                let wrong_etag = copy(self.dst.write().await, false)
                    .copy_source_if_match("\"00000000000000000000000000000000\"")
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify(&what, e));
                self.copy_checks_source = matches!(wrong_etag, Err(S3Error::PreconditionFailed));
                tracing::info!(
                    honoured = self.copy_checks_source,
                    "whether the server refuses a copy whose source is no longer the one looked at"
                );
            }
        }
        for k in [&a, &b] {
            if let Err(e) = self.dst.delete_one(bucket, k).await {
                tracing::warn!(error = %e, key = %k, "could not remove relocator's probe object");
            }
        }
    }
}

/// Whether a create-only probe's answer says the server honours `If-None-Match: *` on
/// `what`: only a 412 does. 501 NotImplemented, a 400 for an unknown header, or a probe
/// that failed: not known to be honoured, so writes look right before they are made.
fn honoured(answer: Result<(), S3Error>, what: &str) -> bool {
    let honours = match answer {
        Ok(()) => false,
        Err(S3Error::PreconditionFailed) => true,
        Err(e) => {
            tracing::warn!(error = %e, "could not learn whether the destination honours \
                           If-None-Match on {what}; assuming it does not");
            false
        }
    };
    tracing::info!(
        "the destination {} If-None-Match on {what}",
        if honours { "honours" } else { "ignores" }
    );
    honours
}

/// S3 requests a job sent, by kind (process-wide; for the summary and the benchmark).
pub struct RequestCounts {
    reads: AtomicU64,
    writes: AtomicU64,
}

pub static REQUESTS: RequestCounts = RequestCounts {
    reads: AtomicU64::new(0),
    writes: AtomicU64::new(0),
};

impl RequestCounts {
    /// (reads, writes) so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.reads.load(Ordering::Relaxed),
            self.writes.load(Ordering::Relaxed),
        )
    }
}

/// Characters left as they are in an `x-amz-copy-source` value: RFC 3986 unreserved ones
/// and `/`. Everything else (space, `+`, `%`, `#`, `?`, non-ASCII) is percent-encoded,
/// as S3 requires.
const COPY_SOURCE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// The `x-amz-copy-source` header value for `bucket/key`.
pub fn copy_source(bucket: &str, key: &str) -> String {
    format!("{bucket}/{}", utf8_percent_encode(key, COPY_SOURCE))
}

fn strip_quotes(etag: &str) -> String {
    etag.trim_matches('"').to_owned()
}

/// Map the error of a create-only write (`If-None-Match: *`): its 412 means the
/// destination was taken meanwhile.
fn create_only_refused<E>(what: &str, err: SdkError<E>) -> S3Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match classify(what, err) {
        S3Error::PreconditionFailed => S3Error::DestinationTaken,
        other => other,
    }
}

/// Map an SDK error: 404 and 412 to their variants, other 4xx to `Rejected`, the rest to
/// `Other`. The message carries the S3 code and message, never credentials.
fn classify<E>(what: &str, err: SdkError<E>) -> S3Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    match &err {
        SdkError::ServiceError(se) => {
            let e = se.err();
            let code = e.code().unwrap_or("unknown");
            let msg = e.message().unwrap_or("");
            match status {
                // The upload is gone, not the object: someone ended it (see
                // `copy::copy_free`).
                Some(404) if code == "NoSuchUpload" => {
                    S3Error::Other(format!("{what}: the upload was ended meanwhile ({code})"))
                }
                Some(404) => S3Error::NotFound,
                Some(412) => S3Error::PreconditionFailed,
                Some(s) if (400..500).contains(&s) && s != 408 && s != 429 => {
                    S3Error::Rejected(format!("{what}: {code} (HTTP {s}) {msg}"))
                }
                Some(s) => S3Error::Unanswered(format!("{what}: {code} (HTTP {s}) {msg}")),
                None => S3Error::Unanswered(format!("{what}: {code} {msg}")),
            }
        }
        _ => S3Error::Unanswered(format!(
            "{what}: {}",
            aws_smithy_types::error::display::DisplayErrorContext(&err)
        )),
    }
}

/// What a HEAD with checksum mode tells about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub info: ObjectInfo,
    /// The headers a copy keeps.
    pub headers: Headers,
    /// Its full-object checksum, where the server keeps one.
    pub checksum: Option<Checksum>,
}

/// A bucket's versioning, as GetBucketVersioning and GetObjectLockConfiguration say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versioning {
    /// Never enabled: a delete removes the object.
    Off,
    Enabled,
    /// Was enabled: old versions stay; new writes replace the null version.
    Suspended,
    EnabledWithObjectLock,
}

impl Versioning {
    pub fn as_str(self) -> &'static str {
        match self {
            Versioning::Off => "off",
            Versioning::Enabled => "enabled",
            Versioning::Suspended => "suspended",
            Versioning::EnabledWithObjectLock => "enabled, with Object Lock",
        }
    }
}

/// A key as a listing answered it. Listings are asked for `encoding-type=url` because XML
/// 1.0 cannot carry every key (a control character makes Garage answer 500; a carriage
/// return comes back as a line feed from AWS); a server that honours the request says so
/// with `EncodingType` and encodes every key, one that ignores it sends keys as they are.
/// AWS encodes a space as `+` and Garage as `%20`; both encode `+` itself as `%2B`.
pub fn listed_key(encoding: Option<&EncodingType>, key: &str) -> Result<String, S3Error> {
    if encoding != Some(&EncodingType::Url) {
        return Ok(key.to_owned());
    }
    percent_decode_str(&key.replace('+', " "))
        .decode_utf8()
        .map(|k| k.into_owned())
        .map_err(|_| S3Error::Other(format!("the listing sent a key that is not UTF-8: {key:?}")))
}

impl Endpoint {
    /// HEAD an object: `Ok(None)` when it does not exist.
    pub async fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectInfo>, S3Error> {
        match self
            .read()
            .await
            .head_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectInfo {
                etag: out.e_tag().map(strip_quotes).unwrap_or_default(),
                size: out.content_length().unwrap_or(0),
                version: out.version_id().map(str::to_owned),
            })),
            Err(e) => match classify(&format!("HEAD s3://{bucket}/{key}"), e) {
                S3Error::NotFound => Ok(None),
                other => Err(other),
            },
        }
    }

    /// HEAD an object with the headers a copy keeps and its checksum: `Ok(None)` when it
    /// does not exist.
    pub async fn head_object(&self, bucket: &str, key: &str) -> Result<Option<Head>, S3Error> {
        Endpoint::head_object_with(self.read().await, bucket, key, None).await
    }

    /// The same for one `version` of the object (the current one if None).
    pub(super) async fn head_object_with(
        client: &Client,
        bucket: &str,
        key: &str,
        version: Option<&str>,
    ) -> Result<Option<Head>, S3Error> {
        let req = client
            .head_object()
            .bucket(bucket)
            .key(key)
            .set_version_id(version.map(str::to_owned))
            .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled);
        match req.send().await {
            Ok(out) => Ok(Some(Head {
                info: ObjectInfo {
                    etag: out.e_tag().map(strip_quotes).unwrap_or_default(),
                    size: out.content_length().unwrap_or(0),
                    version: out.version_id().map(str::to_owned),
                },
                headers: headers_of!(out),
                checksum: checksum_of!(out),
            })),
            Err(e) => match classify(&format!("HEAD s3://{bucket}/{key}"), e) {
                S3Error::NotFound => Ok(None),
                other => Err(other),
            },
        }
    }

    /// Server-side copy of `src` (which must still have the ETag it was seen with) to `dst`,
    /// keeping its headers, with the job's [`WriteOptions`]; with extra metadata, the
    /// source's headers are read and the copy's replaced by them plus the extra (S3 copies
    /// metadata as is, or replaces all of it). The result is checked: a response without an
    /// ETag — including a `200 OK` whose body is an `<Error>` — is a failure, and the new
    /// ETag must match the source's where both are MD5s of the bytes. `Ok(false)`: they are
    /// not (a multipart source, an SSE-KMS copy), and the caller confirms the size instead.
    /// `permit`: the copy's, taken before the look that found the destination free. Sent
    /// [`once`]: after [`S3Error::Unanswered`] the caller looks again.
    pub async fn copy(
        &self,
        mut permit: Permit,
        spec: CopySpec<'_>,
        create_only: bool,
    ) -> Result<bool, S3Error> {
        let CopySpec {
            src_bucket,
            src_key,
            src,
            dst_bucket,
            dst_key,
            write,
        } = spec;
        let what = format!("COPY s3://{src_bucket}/{src_key} -> s3://{dst_bucket}/{dst_key}");
        let mut req = with_write_options!(
            self.client
                .copy_object()
                .copy_source(spec.copy_source())
                .copy_source_if_match(format!("\"{}\"", src.etag))
                .bucket(dst_bucket)
                .key(dst_key),
            write
        );
        if create_only {
            // Refused (412) if anything is at the destination by now.
            req = req.if_none_match("*");
        }
        if !write.metadata.is_empty() {
            let client = self.paid_read(&mut permit).await;
            let h = Endpoint::head_object_with(client, src_bucket, src_key, src.version.as_deref())
                .await?
                .ok_or(S3Error::NotFound)?
                .headers;
            req = with_headers!(
                req.metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace),
                h.with(&write.metadata)
            );
        }
        let out = req
            .customize()
            .config_override(once())
            .send()
            .await
            .map_err(|e| classify(&what, e))?;
        let etag = out
            .copy_object_result()
            .and_then(|r| r.e_tag())
            .map(strip_quotes)
            .filter(|e| !e.is_empty())
            .ok_or_else(|| {
                S3Error::Other(format!(
                    "{what}: the response carried no ETag; the copy is not confirmed"
                ))
            })?;
        let comparable = !src.is_multipart() && write.etag_is_md5(out.server_side_encryption());
        if comparable && etag != src.etag {
            return Err(S3Error::Other(format!(
                "{what}: the copy's ETag {etag} differs from the source's {}",
                src.etag
            )));
        }
        Ok(comparable)
    }

    /// The bucket's versioning and Object Lock state.
    pub async fn versioning(&self, bucket: &str) -> Result<Versioning, S3Error> {
        use aws_sdk_s3::types::{BucketVersioningStatus, ObjectLockEnabled};
        let state = match self
            .read()
            .await
            .get_bucket_versioning()
            .bucket(bucket)
            .send()
            .await
        {
            Ok(out) => match out.status() {
                Some(BucketVersioningStatus::Enabled) => Versioning::Enabled,
                Some(BucketVersioningStatus::Suspended) => Versioning::Suspended,
                _ => Versioning::Off,
            },
            // A `200` the SDK cannot read: moto names the document's root element
            // GetBucketVersioningResponse where AWS documents VersioningConfiguration
            // (checked against it). The Status element is the same.
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 200) => {
                let body = e
                    .raw_response()
                    .and_then(|r| r.body().bytes())
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                if body.contains("<Status>Enabled</Status>") {
                    Versioning::Enabled
                } else if body.contains("<Status>Suspended</Status>") {
                    Versioning::Suspended
                } else {
                    Versioning::Off
                }
            }
            Err(e) => return Err(classify(&format!("GET versioning of s3://{bucket}"), e)),
        };
        if state == Versioning::Off {
            return Ok(state);
        }
        // No configuration is an error (ObjectLockConfigurationNotFoundError): no lock.
        let locked = self
            .read()
            .await
            .get_object_lock_configuration()
            .bucket(bucket)
            .send()
            .await
            .ok()
            .and_then(|o| o.object_lock_configuration().cloned())
            .is_some_and(|c| c.object_lock_enabled() == Some(&ObjectLockEnabled::Enabled));
        Ok(if locked {
            Versioning::EnabledWithObjectLock
        } else {
            state
        })
    }

    /// Incomplete multipart uploads under `prefix`: (key, upload id).
    pub async fn list_uploads(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, S3Error> {
        let mut found = Vec::new();
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let out = self
                .read()
                .await
                .list_multipart_uploads()
                .bucket(bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone())
                .encoding_type(EncodingType::Url)
                .send()
                .await
                .map_err(|e| classify(&format!("LIST uploads s3://{bucket}/{prefix}"), e))?;
            let encoding = out.encoding_type();
            for u in out.uploads() {
                if let (Some(key), Some(id)) = (u.key(), u.upload_id()) {
                    found.push((listed_key(encoding, key)?, id.to_owned()));
                }
            }
            if !out.is_truncated().unwrap_or(false) {
                return Ok(found);
            }
            key_marker = match out.next_key_marker() {
                Some(k) => Some(listed_key(encoding, k)?),
                None => None,
            };
            id_marker = out.next_upload_id_marker().map(str::to_owned);
            if key_marker.is_none() {
                return Ok(found);
            }
        }
    }

    /// Delete up to [`DELETE_BATCH`] keys in one request, with the SDK's retries: keys no
    /// look decided (relocator's own probe objects, a seed's or a benchmark's prefix).
    /// Returns the keys S3 reported as not deleted, with the reason (the per-key errors
    /// inside a `200` response). A key that does not exist counts as deleted.
    pub async fn delete_many(
        &self,
        bucket: &str,
        keys: &[String],
    ) -> Result<Vec<(String, String)>, S3Error> {
        let keys: Vec<(String, Option<String>)> = keys.iter().map(|k| (k.clone(), None)).collect();
        self.delete_objects(bucket, &keys, false).await
    }

    /// Delete keys a look found still the objects relocator may delete: sent [`once`], and
    /// each key deleted only while it has the ETag given with it, where the server
    /// honours a DeleteObjects entry's ETag (AWS S3 does, answering a per-key
    /// `PreconditionFailed`; Garage accepts and ignores it — checked against it).
    pub async fn delete_many_if(
        &self,
        bucket: &str,
        keys: &[(String, Option<String>)],
    ) -> Result<Vec<(String, String)>, S3Error> {
        self.delete_objects(bucket, keys, true).await
    }

    async fn delete_objects(
        &self,
        bucket: &str,
        keys: &[(String, Option<String>)],
        once_only: bool,
    ) -> Result<Vec<(String, String)>, S3Error> {
        debug_assert!(keys.len() <= DELETE_BATCH);
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let objects = keys
            .iter()
            .map(|(k, etag)| {
                ObjectIdentifier::builder()
                    .key(k)
                    .set_e_tag(etag.as_ref().map(|e| format!("\"{e}\"")))
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| S3Error::Other(format!("building DeleteObjects: {e}")))?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(|e| S3Error::Other(format!("building DeleteObjects: {e}")))?;
        let mut req = self
            .write()
            .await
            .delete_objects()
            .bucket(bucket)
            .delete(delete)
            .customize();
        if once_only {
            req = req.config_override(once());
        }
        let out = req
            .send()
            .await
            .map_err(|e| classify(&format!("DELETE {} keys in s3://{bucket}", keys.len()), e))?;
        Ok(out
            .errors()
            .iter()
            .map(|e| {
                (
                    e.key().unwrap_or_default().to_owned(),
                    format!(
                        "{} {}",
                        e.code().unwrap_or("unknown"),
                        e.message().unwrap_or("")
                    ),
                )
            })
            .collect())
    }

    /// Delete one object: relocator's probes, and its copies through [`Endpoint::take_back`].
    /// Sent [`once`].
    pub async fn delete_one(&self, bucket: &str, key: &str) -> Result<(), S3Error> {
        self.write()
            .await
            .delete_object()
            .bucket(bucket)
            .key(key)
            .customize()
            .config_override(once())
            .send()
            .await
            .map_err(|e| classify(&format!("DELETE s3://{bucket}/{key}"), e))?;
        Ok(())
    }

    /// Upload a small object (probes, tests).
    pub async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<(), S3Error> {
        let headers = Headers {
            content_type: Some(content_type.to_owned()),
            ..Headers::default()
        };
        self.put_with(bucket, key, body, &headers).await
    }

    /// Upload an object with these headers and user metadata (seeding, tests), and a
    /// CRC64NVME checksum the server keeps, as AWS gives every new object by default.
    pub async fn put_with(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        h: &Headers,
    ) -> Result<(), S3Error> {
        with_headers!(
            self.write().await.put_object().bucket(bucket).key(key),
            h.clone()
        )
        .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Crc64Nvme)
        .body(ByteStream::from(body))
        .customize()
        .config_override(
            aws_sdk_s3::config::Builder::default()
                .request_checksum_calculation(RequestChecksumCalculation::WhenSupported),
        )
        .send()
        .await
        .map_err(|e| classify(&format!("PUT s3://{bucket}/{key}"), e))?;
        Ok(())
    }

    /// Check that a bucket exists and these credentials reach it. Errors are worded for a
    /// person: which bucket, what S3 said, what to check.
    pub async fn check_bucket(&self, flag: &str, bucket: &str) -> Result<(), BucketError> {
        match self.read().await.head_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                let detail = aws_smithy_types::error::display::DisplayErrorContext(&e).to_string();
                let why = match status {
                    Some(404) => format!("bucket {bucket:?} does not exist; create it or fix {flag}"),
                    Some(403) => format!(
                        "access to bucket {bucket:?} is denied; check AWS_ACCESS_KEY_ID / AWS_PROFILE \
                         and the key's permissions on that bucket"
                    ),
                    Some(400) | Some(301) => format!(
                        "bucket {bucket:?} answered HTTP {}; check AWS_REGION (the bucket's region) \
                         and the endpoint",
                        status.unwrap_or(0)
                    ),
                    Some(s) if s >= 500 => {
                        // Not bad input: the server is failing or throttling. Exit 1, rerun.
                        return Err(BucketError {
                            message: format!(
                                "{flag}: bucket {bucket:?} answered HTTP {s} after retries (the \
                                 S3 server is failing or throttling); nothing was changed, rerun \
                                 later"
                            ),
                            input: false,
                        });
                    }
                    Some(s) => format!("bucket {bucket:?} answered HTTP {s}: {detail}"),
                    None => format!(
                        "cannot reach S3 for bucket {bucket:?}: {detail}. Check --endpoint-url / \
                         AWS_ENDPOINT_URL, AWS_REGION and the credentials"
                    ),
                };
                Err(BucketError {
                    message: format!("{flag}: {why}"),
                    input: true,
                })
            }
        }
    }

    /// Read a whole object (tests and verification of small objects).
    pub async fn get_bytes(&self, bucket: &str, key: &str) -> Result<Vec<u8>> {
        let out = self
            .read()
            .await
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| anyhow!(classify(&format!("GET s3://{bucket}/{key}"), e)))?;
        let bytes = out
            .body
            .collect()
            .await
            .with_context(|| format!("reading s3://{bucket}/{key}"))?;
        Ok(bytes.into_bytes().to_vec())
    }

    /// Whether the object at `key` is still the copy relocator just made (ETag `etag`): the
    /// application may have put its own there since, and only relocator's own copy is
    /// removed again.
    pub async fn still_there(&self, bucket: &str, key: &str, etag: &str) -> Result<bool, S3Error> {
        Ok(self
            .head(bucket, key)
            .await?
            .is_some_and(|d| d.etag == etag))
    }

    /// Attempts a request gets (`--s3-max-attempts`): the SDK's, or relocator's own for a
    /// request sent [`once`].
    pub fn max_attempts(&self) -> u32 {
        self.client
            .config()
            .retry_config()
            .map_or(1, |r| r.max_attempts())
    }

    /// Remove a copy relocator just made (a check of it failed) while it is still that
    /// copy (ETag `etag`); whether it was removed. The one way a copy is taken back
    /// during a run: both requests are paid for before the look, so no `--max-rps` wait
    /// falls between it and the delete, and the delete is sent [`once`].
    pub async fn take_back(&self, bucket: &str, key: &str, etag: &str) -> Result<bool, S3Error> {
        let ep = self.prepaid(2).await;
        if !ep.still_there(bucket, key, etag).await? {
            return Ok(false);
        }
        ep.delete_one(bucket, key).await?;
        Ok(true)
    }
}

/// One listing request's answer: the objects listed, the last key listed (objects left
/// out included), and whether more follow.
type Listed = (Vec<(String, ObjectInfo)>, Option<String>, bool);

/// The objects under a prefix after a key, in S3's (byte) order, one ListObjectsV2 page
/// at a time: the one listing every command reads ([`S3::listing`]).
pub struct Listing<'a> {
    s3c: &'a S3,
    side: Side,
    bucket: &'a str,
    prefix: &'a str,
    after: Option<String>,
    done: bool,
    buf: std::collections::VecDeque<(String, ObjectInfo)>,
}

impl Listing<'_> {
    /// The next page of at most `max` keys, `None` once the listing is done.
    pub async fn page(&mut self, max: i32) -> Result<Option<Vec<(String, ObjectInfo)>>, S3Error> {
        if !self.buf.is_empty() {
            let n = self.buf.len().min(max.max(1) as usize);
            return Ok(Some(self.buf.drain(..n).collect()));
        }
        if self.done {
            return Ok(None);
        }
        let (page, more) = self
            .s3c
            .list_page(
                self.side,
                self.bucket,
                self.prefix,
                self.after.as_deref(),
                max,
            )
            .await?;
        self.after = page.last().map(|(k, _)| k.clone());
        self.done = !more || self.after.is_none();
        Ok((!page.is_empty()).then_some(page))
    }

    /// The next object, `None` once the listing is done.
    pub async fn next(&mut self) -> Result<Option<(String, ObjectInfo)>, S3Error> {
        if self.buf.is_empty() {
            match self.page(1000).await? {
                Some(page) => self.buf.extend(page),
                None => return Ok(None),
            }
        }
        Ok(self.buf.pop_front())
    }
}

impl S3 {
    /// The keys under `prefix` of one side's `bucket` after `after` (exclusive) that the
    /// job can work with ([`HeldKeys`]), with their identity.
    pub fn listing<'a>(
        &'a self,
        side: Side,
        bucket: &'a str,
        prefix: &'a str,
        after: Option<String>,
    ) -> Listing<'a> {
        Listing {
            s3c: self,
            side,
            bucket,
            prefix,
            after,
            done: false,
            buf: Default::default(),
        }
    }

    /// One listing page under `prefix`, after `start_after` (exclusive), in S3's byte
    /// order: (key, identity) pairs of the keys the job can work with ([`HeldKeys`]), and
    /// whether more follow. Never empty while more follow: a page of keys left out is
    /// listed past.
    async fn list_page(
        &self,
        side: Side,
        bucket: &str,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: i32,
    ) -> Result<(Vec<(String, ObjectInfo)>, bool), S3Error> {
        let mut after = start_after.map(str::to_owned);
        loop {
            let (listed, last, more) = if side == Side::Source && self.versions {
                self.list_versions(bucket, prefix, after.as_deref(), max_keys)
                    .await?
            } else {
                self.list_objects(side, bucket, prefix, after.as_deref(), max_keys)
                    .await?
            };
            after = last.or(after);
            let objects: Vec<_> = listed
                .into_iter()
                .filter(|(key, _)| self.held.holds(key))
                .collect();
            if !objects.is_empty() || !more || after.is_none() {
                return Ok((objects, more));
            }
        }
    }

    /// One ListObjectsV2 request.
    async fn list_objects(
        &self,
        side: Side,
        bucket: &str,
        prefix: &str,
        after: Option<&str>,
        max_keys: i32,
    ) -> Result<Listed, S3Error> {
        let out = self
            .side(side)
            .read()
            .await
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_start_after(after.map(str::to_owned))
            .max_keys(max_keys)
            .encoding_type(EncodingType::Url)
            .send()
            .await
            .map_err(|e| classify(&format!("LIST s3://{bucket}/{prefix}"), e))?;
        let mut objects = Vec::with_capacity(out.contents().len());
        for o in out.contents() {
            let Some(key) = o.key() else { continue };
            let info = ObjectInfo {
                etag: o.e_tag().map(strip_quotes).unwrap_or_default(),
                size: o.size().unwrap_or(0),
                version: None,
            };
            objects.push((listed_key(out.encoding_type(), key)?, info));
        }
        let last = objects.last().map(|(k, _)| k.clone());
        Ok((objects, last, out.is_truncated().unwrap_or(false)))
    }

    /// One ListObjectVersions page on a versioned source, of keys after `after`: each
    /// key's latest version (a key whose latest is a delete marker has no object), the last
    /// key listed, and whether more follow. A key's latest version comes first among its
    /// versions, so resuming after a key misses nothing but its older versions. Servers
    /// differ on a key-marker alone: AWS starts after the key, moto within it (its older
    /// versions, checked against it); entries of keys up to `after` are skipped, and a
    /// page holding only those is followed by the server's next markers, never asked for
    /// again.
    async fn list_versions(
        &self,
        bucket: &str,
        prefix: &str,
        after: Option<&str>,
        max_keys: i32,
    ) -> Result<Listed, S3Error> {
        let past = |key: &str| after.is_none_or(|a| key > a);
        let (mut key_marker, mut version_marker) = (after.map(str::to_owned), None);
        loop {
            let out = self
                .src
                .read()
                .await
                .list_object_versions()
                .bucket(bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.clone())
                .set_version_id_marker(version_marker.clone())
                .max_keys(max_keys)
                .encoding_type(EncodingType::Url)
                .send()
                .await
                .map_err(|e| classify(&format!("LIST versions of s3://{bucket}/{prefix}"), e))?;
            let encoding = out.encoding_type();
            let mut last: Option<String> = None;
            let markers = out.delete_markers().iter().filter_map(|m| m.key());
            for key in out.versions().iter().filter_map(|v| v.key()).chain(markers) {
                let key = listed_key(encoding, key)?;
                if past(&key) && last.as_ref().is_none_or(|l| key > *l) {
                    last = Some(key);
                }
            }
            let mut objects = Vec::new();
            for v in out.versions() {
                let (Some(key), Some(true)) = (v.key(), v.is_latest()) else {
                    continue;
                };
                let key = listed_key(encoding, key)?;
                if past(&key) {
                    let info = ObjectInfo {
                        etag: v.e_tag().map(strip_quotes).unwrap_or_default(),
                        size: v.size().unwrap_or(0),
                        version: v.version_id().map(str::to_owned),
                    };
                    objects.push((key, info));
                }
            }
            let more = out.is_truncated().unwrap_or(false);
            let next = out
                .next_key_marker()
                .map(|k| listed_key(encoding, k))
                .transpose()?;
            match (&last, more, next) {
                // Only entries up to `after` (older versions of the key resumed after):
                // go on from where the server says, unless it says nowhere new.
                (None, true, Some(k))
                    if (Some(&k), out.next_version_id_marker())
                        != (key_marker.as_ref(), version_marker.as_deref()) =>
                {
                    key_marker = Some(k);
                    version_marker = out.next_version_id_marker().map(str::to_owned);
                }
                _ => {
                    let more = more && last.is_some();
                    return Ok((objects, last, more));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_the_database_cannot_hold_are_left_out() {
        let utf8 = HeldKeys::default();
        assert!(utf8.holds("image/日本 é.png"));
        assert!(!utf8.holds("image/a\0b"));
        let latin1 = HeldKeys { ascii_only: true };
        assert!(latin1.holds("image/a b+c.png"));
        assert!(!latin1.holds("image/é.png"));
    }

    #[test]
    fn listed_keys_are_decoded_only_when_the_server_encoded_them() {
        let url = Some(&EncodingType::Url);
        // AWS's spelling (space as `+`) and Garage's (`%20`) of the same key.
        for sent in ["a/x+y%2Bz%25%0D%C3%A9", "a/x%20y%2Bz%25%0D%C3%A9"] {
            assert_eq!(listed_key(url, sent).unwrap(), "a/x y+z%\ré");
        }
        // A server that ignored the request sends the key as it is.
        assert_eq!(listed_key(None, "a/x+y%2B").unwrap(), "a/x+y%2B");
        assert!(listed_key(url, "a/%C3%28").is_err(), "not UTF-8");
    }

    #[test]
    fn copy_source_encodes_awkward_keys() {
        assert_eq!(copy_source("b", "image/a b.png"), "b/image/a%20b.png");
        assert_eq!(copy_source("b", "image/a+b.png"), "b/image/a%2Bb.png");
        assert_eq!(copy_source("b", "image/100%.png"), "b/image/100%25.png");
        assert_eq!(copy_source("b", "image/#1?.png"), "b/image/%231%3F.png");
        assert_eq!(copy_source("b", "image/é.png"), "b/image/%C3%A9.png");
        assert_eq!(copy_source("b", "a-b_c.d~e/f"), "b/a-b_c.d~e/f");
    }

    #[test]
    fn a_copy_names_the_version_looked_at() {
        let write = WriteOptions::default();
        let named = |version: Option<&str>| {
            let src = ObjectInfo {
                etag: "e".into(),
                size: 1,
                version: version.map(str::to_owned),
            };
            CopySpec {
                src_bucket: "b",
                src_key: "image/a b.png",
                src: &src,
                dst_bucket: "d",
                dst_key: "k",
                write: &write,
            }
            .copy_source()
        };
        assert_eq!(named(None), "b/image/a%20b.png");
        assert_eq!(
            named(Some("3/L4kqtJl+")),
            "b/image/a%20b.png?versionId=3/L4kqtJl%2B"
        );
    }

    #[test]
    fn an_object_is_the_one_copied_by_etag_and_where_both_name_one_version() {
        let now = |version: Option<&str>| ObjectInfo {
            etag: "e".into(),
            size: 1,
            version: version.map(str::to_owned),
        };
        assert!(now(Some("v1")).is("e", Some("v1")));
        assert!(!now(Some("v2")).is("e", Some("v1")));
        assert!(!now(Some("v1")).is("f", Some("v1")));
        assert!(now(None).is("e", Some("v1")));
        assert!(now(Some("v1")).is("e", None));
    }

    #[test]
    fn multipart_etags_are_recognised() {
        let single = ObjectInfo {
            etag: "d41d8cd98f00b204e9800998ecf8427e".into(),
            size: 0,
            version: None,
        };
        let multi = ObjectInfo {
            etag: "9b2cf535f27731c974343645a3985328-3".into(),
            size: 0,
            version: None,
        };
        assert!(!single.is_multipart());
        assert!(multi.is_multipart());
    }
}
