//! Thin S3 adapter: one shared client per endpoint, the handful of calls relocator makes,
//! and the S3 error codes callers branch on mapped to [`S3Error`].

use std::sync::atomic::{AtomicU64, Ordering};
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

/// DeleteObjects takes at most this many keys per request.
pub const DELETE_BATCH: usize = 1000;

/// The headers a copy keeps, read off a HeadObject or GetObject answer (the two have the
/// same accessors but no common trait).
macro_rules! headers_of {
    ($out:expr) => {
        Headers {
            content_type: $out.content_type().map(str::to_owned),
            cache_control: $out.cache_control().map(str::to_owned),
            content_disposition: $out.content_disposition().map(str::to_owned),
            content_encoding: $out.content_encoding().map(str::to_owned),
            content_language: $out.content_language().map(str::to_owned),
            expires: $out.expires_string().map(str::to_owned),
            metadata: $out
                .metadata()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
        }
    };
}

/// Set `Headers` on a PutObject, CopyObject or CreateMultipartUpload request (the same
/// setters, no common trait): the one place a write gets an object's headers.
macro_rules! with_headers {
    ($req:expr, $h:expr) => {{
        let h: Headers = $h;
        $req.set_content_type(h.content_type)
            .set_cache_control(h.cache_control)
            .set_content_disposition(h.content_disposition)
            .set_content_encoding(h.content_encoding)
            .set_content_language(h.content_language)
            .set_expires(http_date(h.expires.as_deref()))
            .set_metadata(Some(h.metadata.into_iter().collect()))
    }};
}

/// Set the job's [`WriteOptions`] (storage class, encryption) on a PutObject, CopyObject
/// or CreateMultipartUpload request: the one place a write gets them.
macro_rules! with_write_options {
    ($req:expr, $w:expr) => {{
        use aws_sdk_s3::types::ServerSideEncryption as Sse;
        let w: &WriteOptions = $w;
        let (sse, kms_key) = match &w.encryption {
            None => (None, None),
            Some(Encryption::S3) => (Some(Sse::Aes256), None),
            Some(Encryption::Kms(key)) => (Some(Sse::AwsKms), key.clone()),
        };
        $req.set_storage_class(w.storage_class.clone())
            .set_server_side_encryption(sse)
            .set_ssekms_key_id(kms_key)
    }};
}

/// The full-object checksum (x-amz-checksum-*) an answer carries, if any: HeadObject with
/// checksum mode, CompleteMultipartUpload. A composite checksum (of a multipart upload's
/// parts, `value-N`) is not one.
macro_rules! checksum_of {
    ($out:expr) => {{
        use aws_sdk_s3::types::{ChecksumAlgorithm as A, ChecksumType};
        let out = &$out;
        let found = [
            (A::Crc64Nvme, out.checksum_crc64_nvme()),
            (A::Crc32C, out.checksum_crc32_c()),
            (A::Crc32, out.checksum_crc32()),
            (A::Sha256, out.checksum_sha256()),
            (A::Sha1, out.checksum_sha1()),
        ]
        .into_iter()
        .find_map(|(algorithm, v)| {
            v.map(|v| Checksum {
                algorithm,
                value: v.to_owned(),
            })
        });
        found.filter(|c| {
            out.checksum_type() != Some(&ChecksumType::Composite) && !c.value.contains('-')
        })
    }};
}

/// Carry a part's checksums, as an UploadPart or UploadPartCopy answer reports them, into
/// its `CompletedPart`.
macro_rules! with_part_checksum {
    ($part:expr, $out:expr) => {{
        let out = &$out;
        let owned = |v: Option<&str>| v.map(str::to_owned);
        $part
            .set_checksum_crc32(owned(out.checksum_crc32()))
            .set_checksum_crc32_c(owned(out.checksum_crc32_c()))
            .set_checksum_crc64_nvme(owned(out.checksum_crc64_nvme()))
            .set_checksum_sha1(owned(out.checksum_sha1()))
            .set_checksum_sha256(owned(out.checksum_sha256()))
    }};
}

/// What callers branch on. Everything else is `Other`, with the S3 code and message.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("not found")]
    NotFound,
    /// A conditional request's condition failed (e.g. the source changed during the copy).
    #[error("precondition failed")]
    PreconditionFailed,
    /// The server refused this object for a reason that concerns only it (4xx): the row
    /// is reported, the run goes on.
    #[error("{0}")]
    Rejected(String),
    /// Network, 5xx after retries, throttling after retries: the run stops, rerun later.
    #[error("{0}")]
    Other(String),
}

/// An object's identity as far as relocator compares them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The ETag without quotes.
    pub etag: String,
    pub size: i64,
}

impl ObjectInfo {
    /// Same bytes, as far as S3 tells without reading them: ETag (MD5 for single-part
    /// uploads) and size both equal.
    pub fn same_content(&self, other: &ObjectInfo) -> bool {
        self.etag == other.etag && self.size == other.size
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
    if let Some(prefix) = settings.credentials_env {
        let var = |name: &str| std::env::var(format!("{prefix}_{name}")).unwrap_or_default();
        loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
            var("AWS_ACCESS_KEY_ID"),
            var("AWS_SECRET_ACCESS_KEY"),
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

/// The S3 side of a job: one shared client per side (the same one when both sides are
/// one endpoint with one set of credentials; cloned cheaply into every worker) and the
/// optional `--max-rps` cap, which every request of the job waits on.
#[derive(Clone)]
pub struct S3 {
    pub src: Client,
    pub dst: Client,
    /// Both sides are one endpoint with one set of credentials: copies are server-side
    /// (CopyObject); else they are streamed GET → PUT.
    pub server_side: bool,
    /// The destination refuses a CopyObject onto an existing key when the request says
    /// `If-None-Match: *` (AWS S3 does; Garage, MinIO and moto ignore it): learned per run
    /// by [`S3::learn_create_only`], never assumed. When true every server-side copy is
    /// create-only, so a different object put at the destination after relocator looked
    /// is never overwritten.
    pub create_only: bool,
    limiter: Option<std::sync::Arc<governor::DefaultDirectRateLimiter>>,
    /// Where the multipart uploads relocator starts are noted; None: nothing is known as
    /// relocator's, so no incomplete upload is ever aborted but the one in hand.
    pub uploads: Option<std::sync::Arc<dyn Uploads>>,
    /// Which listed keys [`list_page`] returns.
    pub held: HeldKeys,
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
    pub fn new(client: Client, max_rps: Option<std::num::NonZeroU32>) -> S3 {
        S3::pair(client.clone(), client, true, max_rps)
    }

    pub fn pair(
        src: Client,
        dst: Client,
        server_side: bool,
        max_rps: Option<std::num::NonZeroU32>,
    ) -> S3 {
        let limiter = max_rps.map(|n| {
            std::sync::Arc::new(governor::RateLimiter::direct(
                governor::Quota::per_second(n).allow_burst(std::num::NonZeroU32::MIN),
            ))
        });
        S3 {
            src,
            dst,
            server_side,
            create_only: false,
            limiter,
            uploads: None,
            held: HeldKeys::default(),
        }
    }

    /// Both sides' clients, for a job's settings.
    pub async fn for_job(cfg: &crate::config::JobConfig) -> S3 {
        let src = client(&cfg.source_s3).await;
        let same = cfg.source_s3 == cfg.dest_s3;
        let dst = if same {
            src.clone()
        } else {
            client(&cfg.dest_s3).await
        };
        S3::pair(src, dst, same, cfg.s3.max_rps)
    }

    pub fn client(&self, side: Side) -> &Client {
        match side {
            Side::Source => &self.src,
            Side::Dest => &self.dst,
        }
    }

    /// Source and destination swapped (rollback copies back), sharing the rate cap.
    pub fn reversed(&self) -> S3 {
        S3 {
            src: self.dst.clone(),
            dst: self.src.clone(),
            // What was learned of the destination holds for the source only on one server.
            create_only: self.create_only && self.server_side,
            ..self.clone()
        }
    }

    /// Ask the destination whether it honours `If-None-Match: *` on CopyObject: two probe
    /// objects of relocator's own under the destination prefix (written with the job's
    /// write options, as every write), the second copy made create-only onto the first's
    /// copy — refused (412) where honoured. Both are removed again. Any other answer
    /// leaves `create_only` false, the safe assumption. Server-side copies only (streamed
    /// copies PUT, which this does not probe).
    pub async fn learn_create_only(&mut self, bucket: &str, prefix: &str, write: &WriteOptions) {
        self.create_only = false;
        if !self.server_side {
            return;
        }
        let tag = format!("{:016x}", rand::random::<u64>());
        let (a, b) = (
            format!("{prefix}.relocator-probe-{tag}-a"),
            format!("{prefix}.relocator-probe-{tag}-b"),
        );
        let what = format!("probing s3://{bucket}/{b}");
        let copy = |create_only: bool| {
            let req = with_write_options!(
                self.dst
                    .copy_object()
                    .copy_source(copy_source(bucket, &a))
                    .bucket(bucket)
                    .key(&b),
                write
            );
            if create_only {
                req.if_none_match("*")
            } else {
                req
            }
        };
        let answer = async {
            self.ready_write().await;
            with_write_options!(self.dst.put_object().bucket(bucket).key(&a), write)
                .body(ByteStream::from_static(b"relocator probe"))
                .send()
                .await
                .map_err(|e| classify(&what, e))?;
            self.ready_write().await;
            copy(false).send().await.map_err(|e| classify(&what, e))?;
            self.ready_write().await;
            copy(true).send().await.map_err(|e| classify(&what, e))
        }
        .await;
        self.create_only = match answer {
            Ok(_) => false,
            Err(S3Error::PreconditionFailed) => true,
            // 501 NotImplemented, 400 for an unknown header, or the probe failed: not
            // known to be honoured, so copies look right before they write.
            Err(e) => {
                tracing::warn!(error = %e, "could not learn whether the destination honours \
                               If-None-Match on CopyObject; assuming it does not");
                false
            }
        };
        for k in [&a, &b] {
            self.ready_write().await;
            if let Err(e) = delete_one(&self.dst, bucket, k).await {
                tracing::warn!(error = %e, key = %k, "could not remove relocator's probe object");
            }
        }
        tracing::info!(
            create_only = self.create_only,
            "the destination {} If-None-Match on CopyObject",
            if self.create_only {
                "honours"
            } else {
                "ignores"
            }
        );
    }

    /// Before a read request (HEAD, GET, LIST): wait for the rate cap, count it.
    pub async fn ready_read(&self) {
        REQUESTS.reads.fetch_add(1, Ordering::Relaxed);
        self.wait().await;
    }

    /// Before a write request (COPY, PUT, DELETE): wait for the rate cap, count it.
    pub async fn ready_write(&self) {
        REQUESTS.writes.fetch_add(1, Ordering::Relaxed);
        self.wait().await;
    }

    async fn wait(&self) {
        if let Some(l) = &self.limiter {
            l.until_ready().await;
        }
    }
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
                Some(s) => S3Error::Other(format!("{what}: {code} (HTTP {s}) {msg}")),
                None => S3Error::Other(format!("{what}: {code} {msg}")),
            }
        }
        _ => S3Error::Other(format!(
            "{what}: {}",
            aws_smithy_types::error::display::DisplayErrorContext(&err)
        )),
    }
}

/// HEAD an object: `Ok(None)` when it does not exist.
pub async fn head(client: &Client, bucket: &str, key: &str) -> Result<Option<ObjectInfo>, S3Error> {
    match client.head_object().bucket(bucket).key(key).send().await {
        Ok(out) => Ok(Some(ObjectInfo {
            etag: out.e_tag().map(strip_quotes).unwrap_or_default(),
            size: out.content_length().unwrap_or(0),
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
#[allow(clippy::too_many_arguments)]
pub async fn copy(
    client: &Client,
    src_bucket: &str,
    src_key: &str,
    src: &ObjectInfo,
    dst_bucket: &str,
    dst_key: &str,
    write: &WriteOptions,
    create_only: bool,
) -> Result<bool, S3Error> {
    let what = format!("COPY s3://{src_bucket}/{src_key} -> s3://{dst_bucket}/{dst_key}");
    let mut req = with_write_options!(
        client
            .copy_object()
            .copy_source(copy_source(src_bucket, src_key))
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
        let h = head_object(client, src_bucket, src_key)
            .await?
            .ok_or(S3Error::NotFound)?
            .headers;
        req = with_headers!(
            req.metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace),
            h.with(&write.metadata)
        );
    }
    let out = req.send().await.map_err(|e| classify(&what, e))?;
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

/// The headers of an object that a copy keeps. A single CopyObject keeps them by
/// itself; a multipart copy must set them on CreateMultipartUpload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    pub content_type: Option<String>,
    pub cache_control: Option<String>,
    pub content_disposition: Option<String>,
    pub content_encoding: Option<String>,
    pub content_language: Option<String>,
    /// As sent (an HTTP date).
    pub expires: Option<String>,
    /// x-amz-meta-* (without the prefix).
    pub metadata: std::collections::BTreeMap<String, String>,
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

/// A full-object checksum as S3 reports it (base64, x-amz-checksum-*).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    pub algorithm: aws_sdk_s3::types::ChecksumAlgorithm,
    pub value: String,
}

impl Checksum {
    /// A multipart upload can produce this checksum for the whole object (S3's
    /// `FULL_OBJECT` type exists for the CRC algorithms only, not for SHA-1/SHA-256).
    pub fn multipart_capable(&self) -> bool {
        use aws_sdk_s3::types::ChecksumAlgorithm as A;
        matches!(self.algorithm, A::Crc32 | A::Crc32C | A::Crc64Nvme)
    }
}

impl Headers {
    /// These headers with `extra` user metadata added (replacing same-named entries).
    pub fn with(mut self, extra: &Metadata) -> Headers {
        self.metadata
            .extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        self
    }
}

/// An HTTP date header as the SDK takes it (None if absent or unreadable).
fn http_date(s: Option<&str>) -> Option<aws_smithy_types::DateTime> {
    s.and_then(|e| {
        aws_smithy_types::DateTime::from_str(e, aws_smithy_types::date_time::Format::HttpDate).ok()
    })
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

/// HEAD an object with the headers a copy keeps and its checksum: `Ok(None)` when it
/// does not exist.
pub async fn head_object(
    client: &Client,
    bucket: &str,
    key: &str,
) -> Result<Option<Head>, S3Error> {
    let req = client
        .head_object()
        .bucket(bucket)
        .key(key)
        .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled);
    match req.send().await {
        Ok(out) => Ok(Some(Head {
            info: ObjectInfo {
                etag: out.e_tag().map(strip_quotes).unwrap_or_default(),
                size: out.content_length().unwrap_or(0),
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

/// Ask CompleteMultipartUpload to check the finished object against this checksum.
fn expect_checksum(
    req: aws_sdk_s3::operation::complete_multipart_upload::builders::CompleteMultipartUploadFluentBuilder,
    c: &Checksum,
) -> aws_sdk_s3::operation::complete_multipart_upload::builders::CompleteMultipartUploadFluentBuilder
{
    use aws_sdk_s3::types::ChecksumAlgorithm as A;
    let v = c.value.clone();
    match c.algorithm {
        A::Crc32 => req.checksum_crc32(v),
        A::Crc32C => req.checksum_crc32_c(v),
        A::Crc64Nvme => req.checksum_crc64_nvme(v),
        A::Sha1 => req.checksum_sha1(v),
        A::Sha256 => req.checksum_sha256(v),
        _ => req,
    }
}

/// What a streamed part's bytes hashed to on their way through relocator.
#[derive(Debug, Clone)]
struct Digested {
    /// CRC in the source checksum's algorithm (0 when there is none).
    crc: u64,
    md5: [u8; 16],
    len: u64,
}

/// The CRC family member behind an S3 checksum algorithm, where there is one.
fn crc_algorithm(a: &aws_sdk_s3::types::ChecksumAlgorithm) -> Option<crc_fast::CrcAlgorithm> {
    use aws_sdk_s3::types::ChecksumAlgorithm as A;
    use crc_fast::CrcAlgorithm as C;
    match a {
        A::Crc32 => Some(C::Crc32IsoHdlc),
        A::Crc32C => Some(C::Crc32Iscsi),
        A::Crc64Nvme => Some(C::Crc64Nvme),
        _ => None,
    }
}

/// Pass a body through, hashing it (MD5, and a CRC when asked) as it streams: never
/// held whole. The digest is complete once the body has been sent.
fn digesting(
    body: ByteStream,
    expected: u64,
    crc: Option<crc_fast::CrcAlgorithm>,
) -> (ByteStream, std::sync::Arc<std::sync::Mutex<Digested>>) {
    use md5::Digest as _;
    let out = std::sync::Arc::new(std::sync::Mutex::new(Digested {
        crc: 0,
        md5: [0; 16],
        len: 0,
    }));
    let body = Digesting {
        inner: body,
        crc: crc.map(crc_fast::Digest::new),
        md5: md5::Md5::new(),
        len: 0,
        expected,
        out: out.clone(),
    };
    (
        ByteStream::new(aws_smithy_types::body::SdkBody::from_body_1_x(body)),
        out,
    )
}

/// The body [`digesting`] sends.
struct Digesting {
    inner: ByteStream,
    crc: Option<crc_fast::Digest>,
    md5: md5::Md5,
    len: u64,
    /// The body's length (Content-Length).
    expected: u64,
    out: std::sync::Arc<std::sync::Mutex<Digested>>,
}

impl Digesting {
    fn finish(&mut self) {
        use md5::Digest as _;
        if let Ok(mut d) = self.out.lock() {
            *d = Digested {
                crc: self.crc.as_ref().map_or(0, crc_fast::Digest::finalize),
                md5: self.md5.clone().finalize().into(),
                len: self.len,
            };
        }
    }
}

impl http_body::Body for Digesting {
    type Data = bytes::Bytes;
    type Error = aws_smithy_types::byte_stream::error::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use md5::Digest as _;
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.md5.update(&chunk);
                if let Some(c) = &mut this.crc {
                    c.update(&chunk);
                }
                this.len += chunk.len() as u64;
                if this.len >= this.expected {
                    // The HTTP client stops polling once Content-Length bytes are out.
                    this.finish();
                }
                Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            other => other.map(|o| o.map(|r| r.map(http_body::Frame::data))),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let mut hint = http_body::SizeHint::new();
        let (lower, upper) = self.inner.size_hint();
        hint.set_lower(lower);
        if let Some(u) = upper {
            hint.set_upper(u);
        }
        hint
    }
}

/// The whole object's CRC from its parts' (in order), as S3 writes it: base64 of the
/// big-endian value.
fn combined<'a>(algo: crc_fast::CrcAlgorithm, parts: impl Iterator<Item = &'a Digested>) -> String {
    let mut acc: Option<u64> = None;
    for p in parts {
        acc = Some(match acc {
            None => p.crc,
            Some(a) => crc_fast::checksum_combine(algo, a, p.crc, p.len),
        });
    }
    let v = acc.unwrap_or_else(|| crc_fast::checksum(algo, b""));
    let bytes = v.to_be_bytes();
    let width = if matches!(algo, crc_fast::CrcAlgorithm::Crc64Nvme) {
        8
    } else {
        4
    };
    aws_smithy_types::base64::encode(&bytes[8 - width..])
}

/// How a large object is copied in parts.
#[derive(Debug, Clone, Copy)]
pub struct Parts {
    /// Bytes per part (raised when the object would need more than 10,000 parts).
    pub size: u64,
    /// Parts in flight at once, per object.
    pub parallel: usize,
}

/// S3 allows at most this many parts per upload.
const MAX_PARTS: u64 = 10_000;

/// Copy `src`, which must still have the ETag it was seen with, in parts: for objects
/// above the multipart threshold. Server-side (UploadPartCopy) when `s3c.server_side`,
/// else each part streamed from a ranged GET on the source into an UploadPart on the
/// destination (never a whole part in memory). The upload gets the source's headers,
/// user metadata and the job's [`WriteOptions`]; on any failure it is aborted, so no
/// incomplete upload is left behind. An incomplete upload to the same key that a killed
/// earlier attempt left is aborted first.
///
/// The result is checked by size and, where the server keeps a full-object CRC checksum
/// of the source, by checksum: the upload is created with the same algorithm as a
/// `FULL_OBJECT` checksum, CompleteMultipartUpload carries the source's value (the server
/// refuses to complete an upload whose bytes do not match it), and the finished object's
/// checksum is compared again. A multipart ETag is not comparable.
#[allow(clippy::too_many_arguments)]
pub async fn copy_multipart(
    s3c: &S3,
    src_bucket: &str,
    src_key: &str,
    src: &ObjectInfo,
    dst_bucket: &str,
    dst_key: &str,
    parts: Parts,
    write: &WriteOptions,
) -> Result<ObjectInfo, S3Error> {
    use aws_sdk_s3::types::{ChecksumType, CompletedMultipartUpload, CompletedPart};
    use futures::{stream, StreamExt, TryStreamExt};

    let client = &s3c.dst;
    let what = format!("multipart COPY s3://{src_bucket}/{src_key} -> s3://{dst_bucket}/{dst_key}");
    s3c.ready_read().await;
    let now = head_object(&s3c.src, src_bucket, src_key)
        .await?
        .ok_or(S3Error::NotFound)?;
    if now.info.etag != src.etag {
        return Err(S3Error::PreconditionFailed);
    }
    let checksum = now.checksum.filter(Checksum::multipart_capable);
    // Server-side, the upload is created with the source's algorithm as a FULL_OBJECT
    // checksum: the server computes each part's and checks the whole on completion.
    // Streamed, relocator computes it from the bytes it passes on (see `digesting`): an
    // upload with a checksum wants each part's in its request, which a stream could only
    // send as an aws-chunked trailer, and Garage 2.5 refuses those over plain HTTP
    // ("Invalid payload signature", checked against the local stack).
    let algorithm = checksum
        .as_ref()
        .filter(|_| s3c.server_side)
        .map(|c| c.algorithm.clone());
    let crc = checksum.as_ref().and_then(|c| crc_algorithm(&c.algorithm));
    abort_stale_uploads(s3c, dst_bucket, dst_key).await?;
    s3c.ready_write().await;
    let create = with_write_options!(
        client
            .create_multipart_upload()
            .bucket(dst_bucket)
            .key(dst_key)
            .set_checksum_algorithm(algorithm.clone())
            .set_checksum_type(algorithm.as_ref().map(|_| ChecksumType::FullObject)),
        write
    );
    let upload = with_headers!(create, now.headers.with(&write.metadata))
        .send()
        .await
        .map_err(|e| classify(&what, e))?;
    let upload_id = upload
        .upload_id()
        .ok_or_else(|| S3Error::Other(format!("{what}: no upload id in the answer")))?
        .to_owned();
    if let Some(u) = &s3c.uploads {
        if let Err(e) = u.started(dst_bucket, dst_key, &upload_id).await {
            let _ = abort(client, dst_bucket, dst_key, &upload_id).await;
            return Err(S3Error::Other(format!("{what}: noting the upload: {e:#}")));
        }
    }
    let size = src.size.max(0) as u64;
    let part_size = parts.size.max(size.div_ceil(MAX_PARTS)).max(1);
    let ranges: Vec<(i32, u64, u64)> = (0..size.div_ceil(part_size))
        .map(|i| {
            let start = i * part_size;
            ((i + 1) as i32, start, (start + part_size).min(size) - 1)
        })
        .collect();
    let copied: Result<Vec<(CompletedPart, Option<Digested>)>, S3Error> = stream::iter(ranges)
        .map(|(n, first, last)| {
            let (what, upload_id) = (&what, &upload_id);
            async move {
                let range = format!("bytes={first}-{last}");
                let part_what = format!("{what} part {n}");
                let part = CompletedPart::builder().part_number(n);
                let (part, digest) = if s3c.server_side {
                    s3c.ready_write().await;
                    let out = client
                        .upload_part_copy()
                        .bucket(dst_bucket)
                        .key(dst_key)
                        .upload_id(upload_id)
                        .part_number(n)
                        .copy_source(copy_source(src_bucket, src_key))
                        .copy_source_if_match(format!("\"{}\"", src.etag))
                        .copy_source_range(range)
                        .send()
                        .await
                        .map_err(|e| classify(&part_what, e))?;
                    // The part's checksum, where the server reports one (Garage does not).
                    let part = match out.copy_part_result() {
                        Some(r) => {
                            with_part_checksum!(part, r).set_e_tag(r.e_tag().map(str::to_owned))
                        }
                        None => part,
                    };
                    (part, None)
                } else {
                    s3c.ready_read().await;
                    let got = s3c
                        .src
                        .get_object()
                        .bucket(src_bucket)
                        .key(src_key)
                        .if_match(format!("\"{}\"", src.etag))
                        .range(range)
                        .send()
                        .await
                        .map_err(|e| classify(&part_what, e))?;
                    s3c.ready_write().await;
                    let (body, digest) = digesting(got.body, last - first + 1, crc);
                    let out = client
                        .upload_part()
                        .bucket(dst_bucket)
                        .key(dst_key)
                        .upload_id(upload_id)
                        .part_number(n)
                        .content_length((last - first + 1) as i64)
                        .body(body)
                        .send()
                        .await
                        .map_err(|e| classify(&part_what, e))?;
                    let digest = digest
                        .lock()
                        .map(|d| d.clone())
                        .ok()
                        .filter(|d| d.len == last - first + 1)
                        .ok_or_else(|| {
                            S3Error::Other(format!("{part_what}: the part was not sent whole"))
                        })?;
                    // The server's ETag of a part is the MD5 of the bytes it received
                    // (except under SSE-KMS): the part arrived as sent.
                    let sent = hex::encode(digest.md5);
                    let etag = out.e_tag().map(strip_quotes).unwrap_or_default();
                    if write.etag_is_md5(out.server_side_encryption()) && etag != sent {
                        return Err(S3Error::Other(format!(
                            "{part_what}: the server received other bytes than were sent \
                             (part ETag {etag}, MD5 sent {sent})"
                        )));
                    }
                    (
                        with_part_checksum!(part, out).set_e_tag(out.e_tag().map(str::to_owned)),
                        Some(digest),
                    )
                };
                let part = part.build();
                if part.e_tag().is_none() {
                    return Err(S3Error::Other(format!("{part_what}: no ETag")));
                }
                Ok((part, digest))
            }
        })
        .buffered(parts.parallel.max(1))
        .try_collect()
        .await;
    // Streamed: the bytes read must add up to the source's checksum, before completing.
    let copied = copied.and_then(|parts| match (&checksum, crc) {
        (Some(c), Some(algo)) if !s3c.server_side => {
            let read = combined(algo, parts.iter().filter_map(|(_, d)| d.as_ref()));
            if read != c.value {
                return Err(S3Error::Other(format!(
                    "{what}: the bytes read from the source have {} {read}, the source's is {}",
                    c.algorithm.as_str(),
                    c.value
                )));
            }
            Ok(parts)
        }
        _ => Ok(parts),
    });
    let completed = match copied {
        Ok(parts) => {
            let parts: Vec<CompletedPart> = parts.into_iter().map(|(p, _)| p).collect();
            s3c.ready_write().await;
            let mut req = client
                .complete_multipart_upload()
                .bucket(dst_bucket)
                .key(dst_key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                );
            if let Some(c) = checksum.as_ref().filter(|_| algorithm.is_some()) {
                // The server checks the finished object against the source's checksum.
                req = expect_checksum(req, c).checksum_type(ChecksumType::FullObject);
            }
            req.send().await.map_err(|e| classify(&what, e))
        }
        Err(e) => Err(e),
    };
    let made = match completed {
        Ok(out) => out.e_tag().map(strip_quotes).unwrap_or_default(),
        Err(e) => {
            // Best effort: a failed abort is found again by the next attempt on this key.
            if abort(client, dst_bucket, dst_key, &upload_id).await.is_ok() {
                if let Some(u) = &s3c.uploads {
                    let _ = u.ended(dst_bucket, dst_key, &upload_id).await;
                }
            }
            return Err(e);
        }
    };
    if let Some(u) = &s3c.uploads {
        // Best effort: a completed upload is no longer listed, and its note is dropped by
        // the next attempt on this key.
        let _ = u.ended(dst_bucket, dst_key, &upload_id).await;
    }
    // The source must still be the object the parts were read from: a server that
    // ignores x-amz-copy-source-if-match on UploadPartCopy (moto, checked against it)
    // would let a source replaced between two parts make an object of both.
    s3c.ready_read().await;
    let after = head_object(&s3c.src, src_bucket, src_key).await?;
    if after.as_ref().is_none_or(|a| a.info.etag != src.etag) {
        s3c.ready_read().await;
        if head(client, dst_bucket, dst_key)
            .await?
            .is_some_and(|d| d.etag == made)
        {
            s3c.ready_write().await;
            let _ = delete_one(client, dst_bucket, dst_key).await;
        }
        return Err(S3Error::PreconditionFailed);
    }
    s3c.ready_read().await;
    let done = head_object(client, dst_bucket, dst_key).await?;
    let want = checksum.filter(|_| s3c.server_side);
    match done {
        Some(d) if d.info.size == src.size && (want.is_none() || d.checksum == want) => Ok(d.info),
        other => {
            // Removed only while it is the object this upload made: the application may
            // have put its own there since.
            if other.as_ref().is_some_and(|d| d.info.etag == made) {
                s3c.ready_write().await;
                let _ = delete_one(client, dst_bucket, dst_key).await;
            }
            Err(S3Error::Other(format!(
                "{what}: not confirmed, the destination is {:?} (checksum {:?}), the source \
                 {} bytes (checksum {want:?}); the copy was removed again if still there",
                other.as_ref().map(|d| &d.info),
                other.as_ref().and_then(|d| d.checksum.as_ref()),
                src.size
            )))
        }
    }
}

/// Copy across endpoints (or credentials) in one request: GET from the source side, the
/// body streamed straight into a PUT on the destination side (never held whole), with its
/// headers, user metadata and the job's [`WriteOptions`]. Checked like a server-side copy:
/// the new ETag must equal the source's where both are MD5s of the bytes, else the size
/// must; a copy that fails the check is removed again.
pub async fn stream_copy(
    s3c: &S3,
    src_bucket: &str,
    src_key: &str,
    src: &ObjectInfo,
    dst_bucket: &str,
    dst_key: &str,
    write: &WriteOptions,
) -> Result<ObjectInfo, S3Error> {
    let what = format!("streamed COPY s3://{src_bucket}/{src_key} -> s3://{dst_bucket}/{dst_key}");
    s3c.ready_read().await;
    let got = s3c
        .src
        .get_object()
        .bucket(src_bucket)
        .key(src_key)
        .if_match(format!("\"{}\"", src.etag))
        .send()
        .await
        .map_err(|e| classify(&what, e))?;
    let headers = headers_of!(got).with(&write.metadata);
    s3c.ready_write().await;
    let put = with_write_options!(
        s3c.dst
            .put_object()
            .bucket(dst_bucket)
            .key(dst_key)
            .content_length(got.content_length().unwrap_or(src.size)),
        write
    );
    let put = with_headers!(put, headers)
        .body(got.body)
        .send()
        .await
        .map_err(|e| classify(&what, e))?;
    let etag = put.e_tag().map(strip_quotes).unwrap_or_default();
    let confirmed = if src.is_multipart() || !write.etag_is_md5(put.server_side_encryption()) {
        s3c.ready_read().await;
        head(&s3c.dst, dst_bucket, dst_key)
            .await?
            .is_some_and(|d| d.size == src.size)
    } else {
        etag == src.etag
    };
    if !confirmed {
        if still_there(s3c, dst_bucket, dst_key, &etag).await? {
            s3c.ready_write().await;
            let _ = delete_one(&s3c.dst, dst_bucket, dst_key).await;
        }
        return Err(S3Error::Other(format!(
            "{what}: the copy (ETag {etag:?}) does not match the source (ETag {}, {} bytes); \
             it was removed again if still there",
            src.etag, src.size
        )));
    }
    Ok(ObjectInfo {
        etag,
        size: src.size,
    })
}

/// SHA-256 of an object's bytes, read as a stream (`--verify-content`).
pub async fn sha256(client: &Client, bucket: &str, key: &str) -> Result<[u8; 32], S3Error> {
    use sha2::Digest;
    let what = format!("GET s3://{bucket}/{key}");
    let mut body = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| classify(&what, e))?
        .body;
    let mut h = sha2::Sha256::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| S3Error::Other(format!("{what}: {e}")))?;
        h.update(&chunk);
    }
    Ok(h.finalize().into())
}

/// Whether an object's bytes are what its ETag says (`verify --verify-content`): the MD5
/// of the bytes for a single-part upload; for a multipart one (`md5-of-md5s-N`) each
/// part is read on its own (GetObject `partNumber`) and the MD5 of the parts' MD5s
/// compared. Read as a stream, never held whole. `Ok(None)`: the ETag is no MD5 of the
/// bytes (SSE-KMS, SSE-C), so the bytes cannot be checked against it.
pub async fn bytes_match_etag(
    client: &Client,
    bucket: &str,
    key: &str,
    etag: &str,
) -> Result<Option<bool>, S3Error> {
    use md5::Digest as _;
    let what = format!("GET s3://{bucket}/{key}");
    let (want, parts) = match etag.split_once('-') {
        Some((hash, n)) => match n.parse::<i32>() {
            Ok(n) if n > 0 => (hash, Some(n)),
            _ => return Ok(None),
        },
        None => (etag, None),
    };
    if want.len() != 32 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let read = |part: Option<i32>| {
        let what = &what;
        async move {
            let out = client
                .get_object()
                .bucket(bucket)
                .key(key)
                .set_part_number(part)
                .if_match(format!("\"{etag}\""))
                .send()
                .await
                .map_err(|e| classify(what, e))?;
            if matches!(
                out.server_side_encryption(),
                Some(aws_sdk_s3::types::ServerSideEncryption::AwsKms)
                    | Some(aws_sdk_s3::types::ServerSideEncryption::AwsKmsDsse)
            ) || out.sse_customer_algorithm().is_some()
            {
                return Ok(None);
            }
            let mut body = out.body;
            let mut h = md5::Md5::new();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| S3Error::Other(format!("{what}: {e}")))?;
                h.update(&chunk);
            }
            Ok::<_, S3Error>(Some(h.finalize()))
        }
    };
    let got = match parts {
        None => match read(None).await? {
            Some(d) => hex::encode(d),
            None => return Ok(None),
        },
        Some(n) => {
            let mut of_parts = md5::Md5::new();
            for part in 1..=n {
                match read(Some(part)).await? {
                    Some(d) => of_parts.update(d),
                    None => return Ok(None),
                }
            }
            hex::encode(of_parts.finalize())
        }
    };
    Ok(Some(got == want))
}

/// Abort the incomplete multipart uploads to exactly `key` that relocator started (a
/// killed attempt to copy there left them; see [`Uploads`]). Any other upload there (the
/// application's, in progress) is left alone.
async fn abort_stale_uploads(s3c: &S3, bucket: &str, key: &str) -> Result<(), S3Error> {
    let Some(u) = &s3c.uploads else {
        return Ok(());
    };
    let noted = |e: anyhow::Error| S3Error::Other(format!("reading relocator's uploads: {e:#}"));
    let ours = u.ours(bucket, key).await.map_err(noted)?;
    if ours.is_empty() {
        return Ok(());
    }
    let open: Vec<String> = list_uploads(&s3c.dst, bucket, key)
        .await?
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, id)| id)
        .collect();
    for id in &ours {
        if open.contains(id) {
            abort(&s3c.dst, bucket, key, id).await?;
            tracing::info!(
                bucket,
                key,
                "aborted an incomplete upload an earlier attempt left"
            );
        }
        u.ended(bucket, key, id).await.map_err(noted)?;
    }
    Ok(())
}

/// Abort one multipart upload.
async fn abort(client: &Client, bucket: &str, key: &str, id: &str) -> Result<(), S3Error> {
    match client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(id)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        // Ended already (aborted, completed, or ended by a newer write to the key).
        Err(e) if e.code() == Some("NoSuchUpload") => Ok(()),
        Err(e) => Err(classify(&format!("ABORT upload to s3://{bucket}/{key}"), e)),
    }
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

pub async fn versioning(client: &Client, bucket: &str) -> Result<Versioning, S3Error> {
    use aws_sdk_s3::types::{BucketVersioningStatus, ObjectLockEnabled};
    let state = match client.get_bucket_versioning().bucket(bucket).send().await {
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
    let locked = client
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
    client: &Client,
    bucket: &str,
    prefix: &str,
) -> Result<Vec<(String, String)>, S3Error> {
    let mut found = Vec::new();
    let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
    loop {
        let out = client
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

/// One ListObjectsV2 page under `prefix`, after `start_after` (exclusive), in S3's byte
/// order: (key, identity) pairs of the keys the job can work with ([`HeldKeys`]), and
/// whether more follow. Never empty while more follow: a page of keys left out is
/// listed past.
pub async fn list_page(
    s3c: &S3,
    side: Side,
    bucket: &str,
    prefix: &str,
    start_after: Option<&str>,
    max_keys: i32,
) -> Result<(Vec<(String, ObjectInfo)>, bool), S3Error> {
    let mut after = start_after.map(str::to_owned);
    loop {
        s3c.ready_read().await;
        let out = s3c
            .client(side)
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_start_after(after.clone())
            .max_keys(max_keys)
            .encoding_type(EncodingType::Url)
            .send()
            .await
            .map_err(|e| classify(&format!("LIST s3://{bucket}/{prefix}"), e))?;
        let more = out.is_truncated().unwrap_or(false);
        let mut objects = Vec::with_capacity(out.contents().len());
        for o in out.contents() {
            let Some(key) = o.key() else { continue };
            let key = listed_key(out.encoding_type(), key)?;
            let info = ObjectInfo {
                etag: o.e_tag().map(strip_quotes).unwrap_or_default(),
                size: o.size().unwrap_or(0),
            };
            after = Some(key.clone());
            if s3c.held.holds(&key) {
                objects.push((key, info));
            }
        }
        if !objects.is_empty() || !more || after.is_none() {
            return Ok((objects, more));
        }
    }
}

/// Delete up to [`DELETE_BATCH`] keys in one request. Returns the keys S3 reported as not
/// deleted, with the reason (the per-key errors inside a `200` response). A key that does
/// not exist counts as deleted, which makes a repeated cleanup harmless.
pub async fn delete_many(
    client: &Client,
    bucket: &str,
    keys: &[String],
) -> Result<Vec<(String, String)>, S3Error> {
    let keys: Vec<(String, Option<String>)> = keys.iter().map(|k| (k.clone(), None)).collect();
    delete_many_if(client, bucket, &keys).await
}

/// [`delete_many`], each key deleted only while it has the ETag given with it, where the
/// server honours a DeleteObjects entry's ETag (AWS S3 does, answering a per-key
/// `PreconditionFailed`; Garage accepts and ignores it — checked against it).
pub async fn delete_many_if(
    client: &Client,
    bucket: &str,
    keys: &[(String, Option<String>)],
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
    let out = client
        .delete_objects()
        .bucket(bucket)
        .delete(delete)
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

/// Whether the object at `key` of the destination is still the copy relocator just made
/// (ETag `etag`): the application may have put its own there since, and only relocator's
/// own copy is removed again.
pub async fn still_there(s3c: &S3, bucket: &str, key: &str, etag: &str) -> Result<bool, S3Error> {
    s3c.ready_read().await;
    Ok(head(&s3c.dst, bucket, key)
        .await?
        .is_some_and(|d| d.etag == etag))
}

/// Delete one object (used for copies relocator made and must take back).
pub async fn delete_one(client: &Client, bucket: &str, key: &str) -> Result<(), S3Error> {
    client
        .delete_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| classify(&format!("DELETE s3://{bucket}/{key}"), e))?;
    Ok(())
}

/// Upload a small object (probes, tests).
pub async fn put(
    client: &Client,
    bucket: &str,
    key: &str,
    body: Vec<u8>,
    content_type: &str,
) -> Result<(), S3Error> {
    let headers = Headers {
        content_type: Some(content_type.to_owned()),
        ..Headers::default()
    };
    put_with(client, bucket, key, body, &headers).await
}

/// Upload an object with these headers and user metadata (seeding, tests), and a
/// CRC64NVME checksum the server keeps, as AWS gives every new object by default.
pub async fn put_with(
    client: &Client,
    bucket: &str,
    key: &str,
    body: Vec<u8>,
    h: &Headers,
) -> Result<(), S3Error> {
    with_headers!(client.put_object().bucket(bucket).key(key), h.clone())
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
pub async fn check_bucket(client: &Client, flag: &str, bucket: &str) -> Result<()> {
    match client.head_bucket().bucket(bucket).send().await {
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
                    return Err(anyhow!(
                        "{flag}: bucket {bucket:?} answered HTTP {s} after retries (the S3 \
                         server is failing or throttling); nothing was changed, rerun later"
                    ));
                }
                Some(s) => format!("bucket {bucket:?} answered HTTP {s}: {detail}"),
                None => format!(
                    "cannot reach S3 for bucket {bucket:?}: {detail}. Check --endpoint-url / \
                     AWS_ENDPOINT_URL, AWS_REGION and the credentials"
                ),
            };
            Err(crate::config::config_error(format!("{flag}: {why}")))
        }
    }
}

/// Read a whole object (tests and verification of small objects).
pub async fn get_bytes(client: &Client, bucket: &str, key: &str) -> Result<Vec<u8>> {
    let out = client
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
    fn multipart_etags_are_recognised() {
        let single = ObjectInfo {
            etag: "d41d8cd98f00b204e9800998ecf8427e".into(),
            size: 0,
        };
        let multi = ObjectInfo {
            etag: "9b2cf535f27731c974343645a3985328-3".into(),
            size: 0,
        };
        assert!(!single.is_multipart());
        assert!(multi.is_multipart());
    }
}
