//! The copy stage: make each destination object exist, byte-identical, without ever
//! overwriting a different one. Copies in flight are bounded by `--concurrency`.
//!
//! Invariant enforced here: *a different object already at the destination is never
//! overwritten* — [`copy_known`] copies only onto a [`Destination`] found free by a HEAD
//! right before the copy (phase 2, plan, rollback, and phase 1 on servers without
//! create-only copies) or by the batch's listing. Where the server honours
//! `If-None-Match: *` on CopyObject, or on PutObject and CompleteMultipartUpload for
//! streamed and multipart copies (learned per run, [`S3::learn_create_only`]), the write
//! itself is create-only and a 412 means "look at what is there"; where it does not
//! (Garage; moto for CopyObject; see tests/s3_semantics.rs) an object put between that
//! HEAD and the write can still be overwritten: one round trip, or the multipart copy's
//! duration. A write is sent once ([`crate::s3::once`]): unanswered, it is tried again
//! only after a new look.

use std::collections::HashMap;

use anyhow::{anyhow, Result};
use futures::{stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::JobConfig;
use crate::s3::{self, ObjectInfo, Permit, S3Error, WriteOptions, S3};

/// Where a batch notes each copy before it makes it, and a noted copy it did not make
/// after all (kept with the batch's reservation of the key; see
/// [`crate::pipeline::cleanup::BatchIntents`]). After a kill between the copies and their commit,
/// the next attempt still knows which objects at the destination relocator made.
pub trait Intents: Sync {
    fn creating<'a>(&'a self, dst_key: &'a str, src_etag: &'a str) -> BoxFuture<'a>;
    fn not_made<'a>(&'a self, dst_key: &'a str) -> BoxFuture<'a>;
}

/// What [`Intents`] returns.
pub type BoxFuture<'a> = futures::future::BoxFuture<'a, Result<()>>;

/// Parts of one large object copied at once.
const PARTS_IN_FLIGHT: usize = 8;

/// What the copy stage found or did for one (source, destination) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairResult {
    /// The destination holds the source's bytes. `created`: relocator made this copy
    /// (false: an identical object was already there).
    Ready {
        created: bool,
        size: i64,
        /// The source's ETag the copy was made from (or found identical to): recorded
        /// with the move, so the source is deleted only while it still is that object.
        src_etag: String,
        /// The source's version the copy was made from (or found identical to), in a
        /// versioned bucket: recorded with the move, and checked like the ETag.
        src_version: Option<String>,
        /// The destination object's ETag: recorded with the move, so `verify` can tell
        /// it is still the object relocator moved there.
        dst_etag: String,
    },
    MissingSource,
    /// A different object is at the destination.
    Conflict(String),
    /// The destination belongs to another row's (different) source. Decided by the job
    /// from the ledger or the plan, never by this stage.
    Collision(String),
    /// S3 refused this object only (access denied, source changed mid-copy, ...).
    Rejected(String),
}

/// A pair ready to commit: whether relocator created the destination object, and the
/// source ETag it was made from (recorded with the move).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Made {
    pub created: bool,
    pub src_etag: String,
    pub src_version: Option<String>,
    /// The destination object's identity, recorded with the move for `verify`.
    pub size: i64,
    pub dst_etag: String,
}

/// What the destination key held when relocator last looked, and the rate permit of the
/// copy that look may decide (taken before the look, so `--max-rps` never waits between
/// the two). Built only here, from a server's answer: a HEAD ([`Destination::look`]) or
/// the batch's listing ([`Destination::listed`]). Promise 2 rests on it: a copy is made
/// only onto a key one of them found free, and no caller can hand the copy stage a
/// guessed "free".
pub struct Destination {
    found: Option<ObjectInfo>,
    permit: Option<Permit>,
}

impl Destination {
    /// HEAD the key now; with the permits of the copy of `src` first unless only
    /// looking (`plan`).
    async fn look(
        s3c: &S3,
        cfg: &JobConfig,
        src: &ObjectInfo,
        key: &str,
        mode: Mode<'_>,
    ) -> Result<Self, S3Error> {
        let bucket = &cfg.dest.bucket;
        let permit = match mode {
            Mode::DryRun => None,
            Mode::Copy(_) => Some(copy_permit(s3c, cfg, src).await),
        };
        let found = s3c.dst.head(bucket, key).await?;
        Ok(Destination { found, permit })
    }

    /// What the batch's listing, taken before its copies began, said of the key.
    fn listed(found: Option<ObjectInfo>) -> Self {
        Destination {
            found,
            permit: None,
        }
    }
}

/// Copy every pair, at most `concurrency` at once, results in input order. A source
/// `seen` in the run's listing ([`crate::pipeline::listed`]) is not looked at again
/// unless the listing turns out old; any other is HEADed. `Mode::DryRun` only looks
/// and reports what a real run would do.
/// Returns `Ok(None)` when cancelled: nothing of the batch is committed then.
pub async fn copy_all(
    s3c: &S3,
    cfg: &JobConfig,
    pairs: &[(String, String)],
    seen: &HashMap<String, ObjectInfo>,
    mode: Mode<'_>,
    concurrency: usize,
    cancel: &CancellationToken,
) -> Result<Option<Vec<PairResult>>> {
    let copies = pairs.iter().map(|(src, dst)| async move {
        match seen.get(src) {
            Some(listed) => copy_seen(s3c, cfg, src, listed, dst, mode).await,
            None => copy_pair(s3c, cfg, src, dst, mode).await,
        }
    });
    bounded(copies, concurrency, cancel).await
}

/// A source as the run's listing saw it, maybe hours ago. A copy made from it names the
/// listed ETag (or version), so it is the listed object or nothing. Whatever the listing
/// cannot vouch for is decided after a HEAD, as without a listing: a source gone or
/// changed since (the copy refused), and an object already at the destination, the same
/// or not (it is compared with the source as it is now, not as it was listed).
async fn copy_seen(
    s3c: &S3,
    cfg: &JobConfig,
    src_key: &str,
    listed: &ObjectInfo,
    dst_key: &str,
    mode: Mode<'_>,
) -> Result<PairResult> {
    match copy_looking(s3c, cfg, src_key, listed, dst_key, mode).await? {
        made @ PairResult::Ready { created: true, .. } => Ok(made),
        PairResult::Ready { .. } | PairResult::MissingSource | PairResult::Conflict(_) => {
            copy_pair(s3c, cfg, src_key, dst_key, mode).await
        }
        r if r == source_changed() => copy_pair(s3c, cfg, src_key, dst_key, mode).await,
        other => Ok(other),
    }
}

/// Phase 1: copy pairs whose source and destination state a listing taken just before
/// already gives (`src`; `dst` None = the key was free). No HEAD per object.
pub async fn copy_all_known(
    s3c: &S3,
    cfg: &JobConfig,
    pairs: &[(String, ObjectInfo, String, Option<ObjectInfo>)],
    intents: &dyn Intents,
    concurrency: usize,
    cancel: &CancellationToken,
) -> Result<Option<Vec<PairResult>>> {
    let copies = pairs
        .iter()
        .map(|(src_key, src, dst_key, listed)| async move {
            // The listing was taken before the batch's copies began. Where the server does
            // not make the copy itself create-only, look again right before copying a key the
            // listing found free: the window for an object put there meanwhile is then one
            // HEAD→COPY round trip, not the batch's copy time.
            let mode = Mode::Copy(Some(intents));
            // A versioned source: a copy names the listed version, which stays there after a
            // re-upload or a delete, so no copy from the batch's listing would be refused.
            // Look right before copying, as phase 2 does.
            let fresh;
            let src = if s3c.versions {
                fresh = match look_at_source(s3c, cfg, src_key).await {
                    Ok(now) => now,
                    Err(result) => return result,
                };
                &fresh
            } else {
                src
            };
            let dst = match listed {
                None if !s3c.create_only => {
                    match Destination::look(s3c, cfg, src, dst_key, mode).await {
                        Ok(d) => d,
                        Err(e) => return per_object(e),
                    }
                }
                listed => Destination::listed(listed.clone()),
            };
            copy_known(s3c, cfg, src_key, src, dst_key, dst, mode).await
        });
    bounded(copies, concurrency, cancel).await
}

/// The one place copies are driven: at most `concurrency` in flight, results in input
/// order; `None` when cancelled before all were done (the batch is then not committed).
pub(crate) async fn bounded<F>(
    copies: impl ExactSizeIterator<Item = F>,
    concurrency: usize,
    cancel: &CancellationToken,
) -> Result<Option<Vec<PairResult>>>
where
    F: std::future::Future<Output = Result<PairResult>>,
{
    let n = copies.len();
    let results: Vec<Result<PairResult>> = stream::iter(copies)
        .buffered(concurrency.max(1))
        .take_until(cancel.cancelled())
        .collect()
        .await;
    if results.len() < n {
        return Ok(None);
    }
    results.into_iter().collect::<Result<Vec<_>>>().map(Some)
}

/// Phase 2 and plan: HEAD the source and the destination, then act on what they say.
async fn copy_pair(
    s3c: &S3,
    cfg: &JobConfig,
    src_key: &str,
    dst_key: &str,
    mode: Mode<'_>,
) -> Result<PairResult> {
    let src = match look_at_source(s3c, cfg, src_key).await {
        Ok(src) => src,
        Err(result) => return result,
    };
    copy_looking(s3c, cfg, src_key, &src, dst_key, mode).await
}

/// HEAD the source now: its identity, or (Err) what the pair comes to without one — a
/// missing source, or the error.
async fn look_at_source(
    s3c: &S3,
    cfg: &JobConfig,
    src_key: &str,
) -> std::result::Result<ObjectInfo, Result<PairResult>> {
    match s3c.src.head(&cfg.source.bucket, src_key).await {
        Ok(Some(info)) => Ok(info),
        Ok(None) => Err(Ok(PairResult::MissingSource)),
        Err(e) => Err(per_object(e)),
    }
}

/// Copy `src` (seen with this identity) to `dst_key` if a look at the destination, made
/// now, finds it free: phase 2, `plan`, and rollback's copies back.
pub(crate) async fn copy_looking(
    s3c: &S3,
    cfg: &JobConfig,
    src_key: &str,
    src: &ObjectInfo,
    dst_key: &str,
    mode: Mode<'_>,
) -> Result<PairResult> {
    let dst = match Destination::look(s3c, cfg, src, dst_key, mode).await {
        Ok(d) => d,
        Err(e) => return per_object(e),
    };
    copy_known(s3c, cfg, src_key, src, dst_key, dst, mode).await
}

/// Whether a copy is made, and where it is noted first.
#[derive(Clone, Copy)]
pub enum Mode<'a> {
    /// Only look, and say what a real run would do (`plan`).
    DryRun,
    /// Copy, noting each copy first where the job keeps [`Intents`] (rollback's copies
    /// back do not: it keeps track of them itself).
    Copy(Option<&'a dyn Intents>),
}

impl Mode<'_> {
    fn dry_run(self) -> bool {
        matches!(self, Mode::DryRun)
    }
}

/// The one place a destination object is created: only when the destination was found
/// free, from a source that must still have the ETag it was seen with. With
/// `--verify-content` the result is then read back on both sides and compared.
async fn copy_known(
    s3c: &S3,
    cfg: &JobConfig,
    src_key: &str,
    src: &ObjectInfo,
    dst_key: &str,
    dst: Destination,
    mode: Mode<'_>,
) -> Result<PairResult> {
    let dry_run = mode.dry_run();
    let result = make_copy(s3c, cfg, src_key, src, dst_key, dst, mode).await?;
    // An object found at the destination (by the look, or after a create-only copy was
    // refused) that matched the source by size alone.
    let size_only = match &result {
        PairResult::Ready {
            created: false,
            size,
            dst_etag,
            ..
        } => {
            let found = ObjectInfo {
                etag: dst_etag.clone(),
                size: *size,
                version: None,
            };
            !etags_comparable(src, &found, &cfg.write)
        }
        _ => false,
    };
    match result {
        PairResult::Ready { created, .. } if cfg.verify_content && !dry_run => {
            verify_content(s3c, cfg, src_key, dst_key, created, result).await
        }
        // Reads only, so `plan` asks the same question `run` does.
        PairResult::Ready { .. } if size_only => {
            confirm_existing(s3c, cfg, src_key, dst_key, result).await
        }
        other => Ok(other),
    }
}

/// Whether two objects' ETags say whether their bytes are equal: both MD5s of the bytes,
/// which they are not for multipart uploads, nor for objects written with SSE-KMS.
fn etags_comparable(src: &ObjectInfo, existing: &ObjectInfo, write: &WriteOptions) -> bool {
    !src.is_multipart() && !existing.is_multipart() && write.etag_is_md5(None)
}

/// An object already at the destination that matched the source by size only (the ETags
/// are not comparable): that is not enough to delete the source over it. Their
/// full-object checksums decide where both sides keep one of the same algorithm; else
/// their bytes do (SHA-256, as `--verify-content`). Rare: after an interrupted run.
async fn confirm_existing(
    s3c: &S3,
    cfg: &JobConfig,
    src_key: &str,
    dst_key: &str,
    ready: PairResult,
) -> Result<PairResult> {
    let (sb, db) = (&cfg.source.bucket, &cfg.dest.bucket);
    let (a, b) = futures::join!(
        s3c.src.head_object(sb, src_key),
        s3c.dst.head_object(db, dst_key)
    );
    let (a, b) = match (a, b) {
        (Ok(a), Ok(b)) => (a.and_then(|h| h.checksum), b.and_then(|h| h.checksum)),
        (Err(e), _) | (_, Err(e)) => return per_object(e),
    };
    match (a, b) {
        (Some(a), Some(b)) if a.algorithm == b.algorithm => Ok(if a == b {
            ready
        } else {
            PairResult::Conflict(format!(
                "a different object is already at the destination (same size, {} checksum \
                 {} against the source's {}); nothing was overwritten",
                a.algorithm.as_str(),
                b.value,
                a.value
            ))
        }),
        _ => verify_content(s3c, cfg, src_key, dst_key, false, ready).await,
    }
}

/// `--verify-content`: SHA-256 of both objects. A copy relocator made that differs is
/// removed again and the row reported; an existing object that differs is a conflict.
async fn verify_content(
    s3c: &S3,
    cfg: &JobConfig,
    src_key: &str,
    dst_key: &str,
    created: bool,
    ready: PairResult,
) -> Result<PairResult> {
    let (sb, db) = (&cfg.source.bucket, &cfg.dest.bucket);
    let (a, b) = futures::join!(s3c.src.sha256(sb, src_key), s3c.dst.sha256(db, dst_key));
    let (a, b) = match (a, b) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return per_object(e),
    };
    if a == b {
        return Ok(ready);
    }
    if !created {
        return Ok(PairResult::Conflict(
            "the object at the destination has the source's size (and ETag, where \
             comparable) but other bytes; nothing was overwritten"
                .into(),
        ));
    }
    // Removed only while it is the copy this run made: what was read may be an object the
    // application put there since.
    let PairResult::Ready { dst_etag, .. } = &ready else {
        return Ok(ready);
    };
    let still_ours = s3c.dst.take_back(db, dst_key, dst_etag).await?;
    Ok(PairResult::Rejected(format!(
        "the copy at s3://{db}/{dst_key} read back with other bytes than the source \
         (--verify-content); {}",
        if still_ours {
            "it was removed again"
        } else {
            "another object is there by now and was left alone"
        }
    )))
}

async fn make_copy(
    s3c: &S3,
    cfg: &JobConfig,
    src_key: &str,
    src: &ObjectInfo,
    dst_key: &str,
    dst: Destination,
    mode: Mode<'_>,
) -> Result<PairResult> {
    if let Some(existing) = &dst.found {
        if let Mode::Copy(Some(i)) = mode {
            // Noted from the batch's listing, but taken by now: not relocator's.
            i.not_made(dst_key).await?;
        }
        return Ok(compare_existing(src, existing, &cfg.write));
    }
    let intents = match mode {
        Mode::DryRun => {
            return Ok(PairResult::Ready {
                created: true,
                size: src.size,
                src_etag: src.etag.clone(),
                src_version: src.version.clone(),
                dst_etag: src.etag.clone(),
            })
        }
        Mode::Copy(intents) => intents,
    };
    if let Some(i) = intents {
        i.creating(dst_key, &src.etag).await?;
    }
    let permit = match dst.permit {
        Some(p) => p,
        None => copy_permit(s3c, cfg, src).await,
    };
    let made = copy_free(s3c, cfg, permit, src_key, src, dst_key).await;
    if let Some(i) = intents {
        // Not made after all (refused, found taken meanwhile, the source gone or
        // changed): no longer noted as relocator's. (After an error the copy may or may
        // not exist: it stays noted.)
        if !matches!(made, Ok(PairResult::Ready { created: true, .. }) | Err(_)) {
            i.not_made(dst_key).await?;
        }
    }
    made
}

/// Copy to a key found free.
async fn copy_free(
    s3c: &S3,
    cfg: &JobConfig,
    permit: Permit,
    src_key: &str,
    src: &ObjectInfo,
    dst_key: &str,
) -> Result<PairResult> {
    let (sb, db) = (&cfg.source.bucket, &cfg.dest.bucket);
    let in_parts = in_parts(s3c, cfg, src);
    // A multipart or streamed upload that failed stops the run (exit 1) with its copy
    // still noted: it may have completed (an answer lost), or been ended by an object put
    // at the key meanwhile (Garage ends older uploads to a key when a newer write
    // completes: NoSuchUpload). The rerun looks at what is there: its own copy is claimed
    // through the note, anything else is compared with the source like any object found
    // at the destination.
    let spec = s3::CopySpec {
        src_bucket: sb,
        src_key,
        src,
        dst_bucket: db,
        dst_key,
        write: &cfg.write,
    };
    let copied = if in_parts {
        let parts = s3::Parts {
            size: cfg.part_size,
            parallel: PARTS_IN_FLIGHT,
        };
        s3c.copy_multipart(permit, spec, parts)
            .await
            .map(|made| Some(made.etag))
    } else if !s3c.server_side {
        s3c.stream_copy(permit, spec)
            .await
            .map(|made| Some(made.etag))
    } else {
        let create_only = s3c.create_only;
        let mut permit = permit;
        let mut attempt = 1;
        loop {
            match s3c.dst.copy(permit, spec, create_only).await {
                // Refused: either the source changed (copy-source-if-match) or, create-only,
                // something is at the destination by now. Look at what is there.
                Err(S3Error::PreconditionFailed) if create_only => {
                    return look_after_refusal(s3c, cfg, src, dst_key, source_changed()).await;
                }
                // No answer: the copy may or may not have been made. Never another attempt
                // on the old look: look again, and copy only onto a key still free. An
                // object found there now (this attempt's copy, or one put there since) is
                // not shown to be relocator's: it is compared like any object found.
                Err(S3Error::Unanswered(why)) if attempt < s3c.dst.max_attempts() => {
                    warn!(src = %src_key, dst = %dst_key, attempt, error = %why,
                          "a copy went unanswered; looking again before the next attempt");
                    tokio::time::sleep(s3::backoff(attempt)).await;
                    attempt += 1;
                    let again =
                        match Destination::look(s3c, cfg, src, dst_key, Mode::Copy(None)).await {
                            Ok(d) => d,
                            Err(e) => return per_object(e),
                        };
                    match (again.found, again.permit) {
                        (Some(existing), _) => {
                            return Ok(compare_existing(src, &existing, &cfg.write))
                        }
                        (None, Some(p)) => permit = p,
                        (None, None) => permit = copy_permit(s3c, cfg, src).await,
                    }
                }
                other => break other.map(|same_etag| same_etag.then(|| src.etag.clone())),
            }
        }
    };
    // The copy's ETag, where known without a look.
    let dst_etag = match copied {
        // copy_multipart and stream_copy confirm the copy themselves; copy by ETag where
        // it can.
        Ok(Some(etag)) => etag,
        Ok(None) => {
            // The ETags are not comparable (a multipart source, an SSE-KMS copy); confirm
            // the size instead.
            match s3c.dst.head(db, dst_key).await {
                Ok(Some(d)) if d.size == src.size => d.etag,
                Ok(other) => {
                    return Err(anyhow!(
                        "copy of s3://{sb}/{src_key} to s3://{db}/{dst_key} not confirmed: \
                         destination is {other:?}, source size {}",
                        src.size
                    ))
                }
                Err(e) => return per_object(e),
            }
        }
        Err(S3Error::NotFound) => return Ok(PairResult::MissingSource),
        Err(S3Error::PreconditionFailed) => return Ok(source_changed()),
        // A create-only streamed or multipart copy was refused: look at what is there.
        Err(S3Error::DestinationTaken) => {
            let gone = PairResult::Rejected(
                "an object was written at the destination while the copy was made, and is \
                 gone again; rerun to look again"
                    .into(),
            );
            return look_after_refusal(s3c, cfg, src, dst_key, gone).await;
        }
        Err(e) => return per_object(e),
    };
    debug!(src = %src_key, dst = %dst_key, size = src.size, "copied");
    Ok(PairResult::Ready {
        created: true,
        size: src.size,
        src_etag: src.etag.clone(),
        src_version: src.version.clone(),
        dst_etag,
    })
}

/// A create-only write was refused (412): what is at the destination now decides, compared
/// like any object found there; `nothing_there` when the key is free again.
async fn look_after_refusal(
    s3c: &S3,
    cfg: &JobConfig,
    src: &ObjectInfo,
    dst_key: &str,
    nothing_there: PairResult,
) -> Result<PairResult> {
    match s3c.dst.head(&cfg.dest.bucket, dst_key).await {
        Ok(Some(existing)) => Ok(compare_existing(src, &existing, &cfg.write)),
        Ok(None) => Ok(nothing_there),
        Err(e) => per_object(e),
    }
}

/// Whether `src` is copied in parts.
fn in_parts(s3c: &S3, cfg: &JobConfig, src: &ObjectInfo) -> bool {
    src.size.max(0) as u64 > cfg.multipart_threshold(s3c.server_side)
}

/// The rate permits of the copy of `src`: its write, and the source read it starts with.
async fn copy_permit(s3c: &S3, cfg: &JobConfig, src: &ObjectInfo) -> Permit {
    let reads_first = s3c.reads_first(&cfg.write, in_parts(s3c, cfg, src));
    s3c.dst.permit(reads_first).await
}

fn source_changed() -> PairResult {
    PairResult::Rejected(
        "the source object changed since it was looked at; rerun to pick up the new version".into(),
    )
}

/// An existing destination object counts as copied only if it is the same object: same
/// ETag and size, or — where ETags are not comparable — the same size, which
/// [`confirm_existing`] then checks further.
fn compare_existing(src: &ObjectInfo, existing: &ObjectInfo, write: &WriteOptions) -> PairResult {
    let same = if !etags_comparable(src, existing, write) {
        src.size == existing.size
    } else {
        src.same_content(existing)
    };
    if same {
        PairResult::Ready {
            created: false,
            size: src.size,
            src_etag: src.etag.clone(),
            src_version: src.version.clone(),
            dst_etag: existing.etag.clone(),
        }
    } else {
        PairResult::Conflict(format!(
            "a different object is already at the destination (ETag {} size {}; source ETag {} size {}); \
             nothing was overwritten",
            existing.etag, existing.size, src.etag, src.size
        ))
    }
}

/// Object-level refusals become a row outcome; anything else stops the run (exit 1).
pub(crate) fn per_object(e: S3Error) -> Result<PairResult> {
    match e {
        S3Error::Rejected(m) => Ok(PairResult::Rejected(m)),
        other => Err(anyhow!(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(etag: &str, size: i64) -> ObjectInfo {
        ObjectInfo {
            etag: etag.into(),
            size,
            version: None,
        }
    }

    #[test]
    fn identical_destination_counts_as_copied_different_one_is_a_conflict() {
        let plain = WriteOptions::default();
        assert_eq!(
            compare_existing(&info("abc", 5), &info("abc", 5), &plain),
            PairResult::Ready {
                created: false,
                size: 5,
                src_etag: "abc".into(),
                src_version: None,
                dst_etag: "abc".into(),
            }
        );
        assert!(matches!(
            compare_existing(&info("abc", 5), &info("abd", 5), &plain),
            PairResult::Conflict(_)
        ));
        assert!(matches!(
            compare_existing(&info("abc", 5), &info("abc", 6), &plain),
            PairResult::Conflict(_)
        ));
    }

    #[test]
    fn where_etags_are_not_md5s_the_size_decides_first() {
        let kms = WriteOptions {
            encryption: Some(crate::s3::Encryption::Kms(None)),
            ..WriteOptions::default()
        };
        let plain = WriteOptions::default();
        // SSE-KMS copies and multipart uploads: other ETags, same size (then
        // confirm_existing compares checksums or bytes).
        for (src, existing, write) in [
            (info("abc", 5), info("f00", 5), &kms),
            (info("abc-2", 5), info("f00-3", 5), &plain),
            (info("abc", 5), info("f00-3", 5), &plain),
        ] {
            assert!(!etags_comparable(&src, &existing, write));
            assert_eq!(
                compare_existing(&src, &existing, write),
                PairResult::Ready {
                    created: false,
                    size: 5,
                    src_etag: src.etag.clone(),
                    src_version: None,
                    dst_etag: existing.etag.clone(),
                }
            );
        }
        assert!(matches!(
            compare_existing(&info("abc", 5), &info("abc", 6), &kms),
            PairResult::Conflict(_)
        ));
        assert!(etags_comparable(&info("abc", 5), &info("abc", 5), &plain));
    }
}
