//! `--checksum-column`: a column holding each object's MD5 in base64 (Rails Active
//! Storage's `checksum`, which it checks on every download). Before a batch's rows are
//! rewritten, each copied object's ETag is compared with its row's checksum where the
//! ETag is an MD5 of the bytes (a single-part object, not encrypted with a KMS key): a row
//! whose object does not match is `checksum_mismatch`, not rewritten, and the copy made
//! for it is taken back like any row not rewritten. `plan` reports the same from the
//! source's ETag.
//!
//! A row without a checksum, or an object whose ETag is no MD5 (multipart, SSE-KMS), is
//! not checked.

use std::collections::HashMap;

use anyhow::{Context, Result};

use super::copy::Made;
use super::plan::Move;
use crate::config::JobConfig;
use crate::db::{self, Queries};

/// Row id → why, for the ready rows whose copied object does not match their checksum.
/// Empty without `--checksum-column`.
pub async fn mismatches(
    db: &deadpool_postgres::Client,
    q: &Queries,
    cfg: &JobConfig,
    ready: &[(&Move, &Made)],
) -> Result<HashMap<String, String>> {
    let Some(sql) = &q.checksums else {
        return Ok(HashMap::new());
    };
    // Objects written with a KMS key have ETags that are no MD5 of their bytes.
    if !cfg.write.etag_is_md5(None) {
        return Ok(HashMap::new());
    }
    let checkable: Vec<(&Move, String)> = ready
        .iter()
        .filter_map(|(m, made)| Some((*m, md5_of_etag(&made.dst_etag)?)))
        .collect();
    if checkable.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<&str> = checkable.iter().map(|(m, _)| m.row.id.as_str()).collect();
    db::rt(1);
    let stored: HashMap<String, Option<String>> = db
        .query(sql.as_str(), &[&ids])
        .await
        .context("reading the rows' checksums")?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(checkable
        .into_iter()
        .filter_map(|(m, md5)| {
            let checksum = stored.get(&m.row.id)?.as_deref()?;
            let want = md5_of_checksum(checksum)?;
            (want != md5).then(|| {
                (
                    m.row.id.clone(),
                    format!(
                        "the object's MD5 is {md5}, the row's checksum {checksum:?} says {want}: \
                         the bytes at the source are not what the application stored"
                    ),
                )
            })
        })
        .collect())
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
