//! Bytes through relocator: a copy across endpoints streamed GET → PUT, hashed on the way
//! (MD5 and CRC, never held whole), and reading objects back to check them.

use aws_sdk_s3::primitives::ByteStream;

use super::{classify, strip_quotes, CopySpec, Endpoint, ObjectInfo, Permit, S3Error, S3};

/// What a streamed part's bytes hashed to on their way through relocator.
#[derive(Debug, Clone)]
pub(super) struct Digested {
    /// CRC in the source checksum's algorithm (0 when there is none).
    crc: u64,
    pub(super) md5: [u8; 16],
    pub(super) len: u64,
}

/// The CRC family member behind an S3 checksum algorithm, where there is one.
pub(super) fn crc_algorithm(
    a: &aws_sdk_s3::types::ChecksumAlgorithm,
) -> Option<crc_fast::CrcAlgorithm> {
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
pub(super) fn digesting(
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
pub(super) fn combined<'a>(
    algo: crc_fast::CrcAlgorithm,
    parts: impl Iterator<Item = &'a Digested>,
) -> String {
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

impl S3 {
    /// Copy across endpoints (or credentials) in one request: GET from the source side, the
    /// body streamed straight into a PUT on the destination side (never held whole), with its
    /// headers, user metadata and the job's [`WriteOptions`]. Checked like a server-side copy:
    /// the new ETag must equal the source's where both are MD5s of the bytes, else the size
    /// must; a copy that fails the check is removed again.
    pub async fn stream_copy(
        &self,
        mut permit: Permit,
        spec: CopySpec<'_>,
    ) -> Result<ObjectInfo, S3Error> {
        let CopySpec {
            src_bucket,
            src_key,
            src,
            dst_bucket,
            dst_key,
            write,
        } = spec;
        let what =
            format!("streamed COPY s3://{src_bucket}/{src_key} -> s3://{dst_bucket}/{dst_key}");
        let got = self
            .src
            .paid_read(&mut permit)
            .await
            .get_object()
            .bucket(src_bucket)
            .key(src_key)
            .set_version_id(src.version.clone())
            .if_match(format!("\"{}\"", src.etag))
            .send()
            .await
            .map_err(|e| classify(&what, e))?;
        let headers = headers_of!(got).with(&write.metadata);
        let put = with_write_options!(
            permit
                .spend(&self.dst)
                .put_object()
                .bucket(dst_bucket)
                .key(dst_key)
                .content_length(got.content_length().unwrap_or(src.size)),
            write
        );
        // Create-only where the destination honours it: an object put there since the
        // look is never overwritten. (A streamed body is not retried by the SDK, so a 412
        // is never relocator's own earlier attempt.)
        let put = with_headers!(put, headers)
            .set_if_none_match(self.create_only_put.then(|| "*".to_owned()))
            .body(got.body)
            .send()
            .await
            .map_err(|e| super::create_only_refused(&what, e))?;
        let etag = put.e_tag().map(strip_quotes).unwrap_or_default();
        let confirmed = if src.is_multipart() || !write.etag_is_md5(put.server_side_encryption()) {
            self.dst
                .head(dst_bucket, dst_key)
                .await?
                .is_some_and(|d| d.size == src.size)
        } else {
            etag == src.etag
        };
        if !confirmed {
            let _ = self.dst.take_back(dst_bucket, dst_key, &etag).await;
            return Err(S3Error::Other(format!(
                "{what}: the copy (ETag {etag:?}) does not match the source (ETag {}, {} bytes); \
                 it was removed again if still there",
                src.etag, src.size
            )));
        }
        Ok(ObjectInfo {
            etag,
            size: src.size,
            version: None,
        })
    }
}

impl Endpoint {
    /// SHA-256 of an object's bytes, read as a stream (`--verify-content`).
    pub async fn sha256(&self, bucket: &str, key: &str) -> Result<[u8; 32], S3Error> {
        use sha2::Digest;
        let what = format!("GET s3://{bucket}/{key}");
        let mut body = self
            .read()
            .await
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
        &self,
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
                let out = self
                    .read()
                    .await
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
}
