//! `--checksum-column`: a column holding each object's MD5 in base64 (Rails Active
//! Storage's `checksum`, which it checks on every download). Before a batch's rows are
//! rewritten, each row's checksum is compared with its object's MD5 — the source's ETag
//! the copy was made from, or the copy's, whichever is an MD5 of the bytes (a
//! single-part object, not encrypted with a KMS key): a row whose object does not match
//! is `checksum_mismatch`, not rewritten, and the copy made for it is taken back like any
//! row not rewritten. `plan` reports the same. The checksum read is guarded by the
//! commit's compare-and-swap too.
//!
//! A row without a checksum (or with one that is no base64 MD5), or an object uploaded
//! in parts or with SSE-KMS, is not checked.

use std::collections::HashMap;

use anyhow::{Context, Result};

use super::copy::Made;
use super::plan::Move;
use crate::config::JobConfig;
use crate::db::{self, Queries};

/// The batch's rows' checksums as read before the commit, and the rows whose object
/// does not match theirs.
#[derive(Debug, Default)]
pub struct Checked {
    /// Row id → the checksum read: the commit's compare-and-swap guards it too, so a
    /// row whose checksum the application changes meanwhile is not rewritten.
    pub read: HashMap<String, Option<String>>,
    /// Row id → why it does not match.
    pub mismatched: HashMap<String, String>,
}

/// Read the ready rows' checksums and compare each with its object: the source's ETag
/// the copy was made from, or the copy's, whichever is an MD5 (an object copied in parts
/// from a single-part source still has the source's). Nothing without
/// `--checksum-column`.
pub async fn check(
    db: &deadpool_postgres::Client,
    q: &Queries,
    cfg: &JobConfig,
    ready: &[(&Move, &Made)],
) -> Result<Checked> {
    let Some(sql) = &q.checksums else {
        return Ok(Checked::default());
    };
    if ready.is_empty() {
        return Ok(Checked::default());
    }
    let ids: Vec<&str> = ready.iter().map(|(m, _)| m.row.id.as_str()).collect();
    db::rt(1);
    let read: HashMap<String, Option<String>> = db
        .query(sql.as_str(), &[&ids])
        .await
        .context("reading the rows' checksums")?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Objects written with a KMS key have ETags that are no MD5 of their bytes.
    let md5s = cfg.write.etag_is_md5(None);
    let mismatched = ready
        .iter()
        .filter(|_| md5s)
        .filter_map(|(m, made)| {
            let checksum = read.get(&m.row.id)?.as_deref()?;
            let etag = [&made.src_etag, &made.dst_etag]
                .into_iter()
                .find(|e| md5_of_etag(e).is_some())?;
            mismatch(checksum, etag).map(|why| (m.row.id.clone(), why))
        })
        .collect();
    Ok(Checked { read, mismatched })
}

/// Why an object with ETag `etag` is not the one `checksum` (base64 MD5) names, if it
/// is not; `None` when it is, or when either is no MD5.
pub fn mismatch(checksum: &str, etag: &str) -> Option<String> {
    let md5 = md5_of_etag(etag)?;
    let want = md5_of_checksum(checksum)?;
    (want != md5).then(|| {
        format!(
            "the object's MD5 is {md5}, the row's checksum {checksum:?} says {want}: the bytes \
             are not what the application stored"
        )
    })
}

/// The MD5 an ETag is, in lower-case hex, if it is one (a single-part object's ETag,
/// quoted or not); `None` for a multipart ETag (`…-N`) or anything else.
fn md5_of_etag(etag: &str) -> Option<String> {
    let e = etag.trim_matches('"');
    (e.len() == 32 && e.bytes().all(|b| b.is_ascii_hexdigit())).then(|| e.to_ascii_lowercase())
}

/// The MD5 a base64 checksum holds, in lower-case hex; `None` if it holds no MD5.
fn md5_of_checksum(checksum: &str) -> Option<String> {
    let bytes = aws_smithy_types::base64::decode(checksum.trim()).ok()?;
    (bytes.len() == 16).then(|| hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_and_checksums_compare_as_md5() {
        // MD5("hello") = 5d41402abc4b2a76b9719d911017c592.
        assert_eq!(
            md5_of_checksum("XUFAKrxLKna5cZ2REBfFkg==").as_deref(),
            Some("5d41402abc4b2a76b9719d911017c592")
        );
        assert_eq!(
            md5_of_etag("\"5D41402ABC4B2A76B9719D911017C592\"").as_deref(),
            Some("5d41402abc4b2a76b9719d911017c592")
        );
        assert_eq!(md5_of_etag("\"5d41402abc4b2a76b9719d911017c592-2\""), None);
        assert_eq!(md5_of_checksum("not base64!"), None);
        assert_eq!(md5_of_checksum("aGVsbG8="), None, "not 16 bytes");
    }
}
