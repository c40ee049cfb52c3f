//! Copying a large object in parts: server-side (UploadPartCopy) or streamed (ranged GET
//! into UploadPart), checked by size and full-object checksum; relocator's own incomplete
//! uploads found and aborted.

use aws_sdk_s3::error::ProvideErrorMetadata;

use super::stream::{combined, crc_algorithm, digesting, Digested};
use super::{
    classify, strip_quotes, Checksum, CopySpec, Endpoint, ObjectInfo, Permit, S3Error, S3,
};

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

impl S3 {
    /// Copy `src`, which must still have the ETag it was seen with, in parts: for objects
    /// above the multipart threshold. Server-side (UploadPartCopy) when `self.server_side`,
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
    pub async fn copy_multipart(
        &self,
        mut permit: Permit,
        spec: CopySpec<'_>,
        parts: Parts,
    ) -> Result<ObjectInfo, S3Error> {
        let CopySpec {
            src_bucket,
            src_key,
            src,
            dst_bucket,
            dst_key,
            write,
        } = spec;
        use aws_sdk_s3::types::{ChecksumType, CompletedMultipartUpload, CompletedPart};
        use futures::{stream, StreamExt, TryStreamExt};

        let what =
            format!("multipart COPY s3://{src_bucket}/{src_key} -> s3://{dst_bucket}/{dst_key}");
        let now = Endpoint::head_object_with(
            self.src.paid_read(&mut permit).await,
            src_bucket,
            src_key,
            src.version.as_deref(),
        )
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
            .filter(|_| self.server_side)
            .map(|c| c.algorithm.clone());
        let crc = checksum.as_ref().and_then(|c| crc_algorithm(&c.algorithm));
        self.abort_stale_uploads(dst_bucket, dst_key).await?;
        let create = with_write_options!(
            permit
                .spend(&self.dst)
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
        if let Some(u) = &self.uploads {
            if let Err(e) = u.started(dst_bucket, dst_key, &upload_id).await {
                let _ = self.dst.abort(dst_bucket, dst_key, &upload_id).await;
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
                    let (part, digest) = if self.server_side {
                        let out = self
                            .dst
                            .write()
                            .await
                            .upload_part_copy()
                            .bucket(dst_bucket)
                            .key(dst_key)
                            .upload_id(upload_id)
                            .part_number(n)
                            .copy_source(spec.copy_source())
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
                        let got = self
                            .src
                            .read()
                            .await
                            .get_object()
                            .bucket(src_bucket)
                            .key(src_key)
                            .set_version_id(src.version.clone())
                            .if_match(format!("\"{}\"", src.etag))
                            .range(range)
                            .send()
                            .await
                            .map_err(|e| classify(&part_what, e))?;
                        let (body, digest) = digesting(got.body, last - first + 1, crc);
                        let out = self
                            .dst
                            .write()
                            .await
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
                            with_part_checksum!(part, out)
                                .set_e_tag(out.e_tag().map(str::to_owned)),
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
            (Some(c), Some(algo)) if !self.server_side => {
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
                let mut req = self
                    .dst
                    .write()
                    .await
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
                if self.create_only_put {
                    // Create-only where the destination honours it, and sent once: a 412
                    // then means another object is there by now, never this upload's own
                    // completion retried.
                    req.if_none_match("*")
                        .customize()
                        .config_override(super::once())
                        .send()
                        .await
                        .map_err(|e| super::create_only_refused(&what, e))
                } else {
                    req.send().await.map_err(|e| classify(&what, e))
                }
            }
            Err(e) => Err(e),
        };
        let made = match completed {
            Ok(out) => out.e_tag().map(strip_quotes).unwrap_or_default(),
            Err(e) => {
                // Best effort: a failed abort is found again by the next attempt on this key.
                if self
                    .dst
                    .abort(dst_bucket, dst_key, &upload_id)
                    .await
                    .is_ok()
                {
                    if let Some(u) = &self.uploads {
                        let _ = u.ended(dst_bucket, dst_key, &upload_id).await;
                    }
                }
                return Err(e);
            }
        };
        if let Some(u) = &self.uploads {
            // Best effort: a completed upload is no longer listed, and its note is dropped by
            // the next attempt on this key.
            let _ = u.ended(dst_bucket, dst_key, &upload_id).await;
        }
        // The source must still be the object the parts were read from: a server that
        // ignores x-amz-copy-source-if-match on UploadPartCopy (moto, checked against it)
        // would let a source replaced between two parts make an object of both. (Parts
        // that name the source's version are all of that version.)
        if src.version.is_none() {
            let after = self.src.head_object(src_bucket, src_key).await?;
            if after.as_ref().is_none_or(|a| a.info.etag != src.etag) {
                // Taken back, or no longer this copy: the source changed. Not taken back
                // (the delete failed): an error, so the copy stays noted as relocator's
                // and the rerun deals with it.
                self.dst.take_back(dst_bucket, dst_key, &made).await?;
                return Err(S3Error::PreconditionFailed);
            }
        }
        let done = self.dst.head_object(dst_bucket, dst_key).await?;
        let want = checksum.filter(|_| self.server_side);
        match done {
            Some(d) if d.info.size == src.size && (want.is_none() || d.checksum == want) => {
                Ok(d.info)
            }
            other => {
                // Removed only while it is the object this upload made: the application may
                // have put its own there since.
                if other.as_ref().is_some_and(|d| d.info.etag == made) {
                    let _ = self.dst.take_back(dst_bucket, dst_key, &made).await;
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

    /// Abort the incomplete multipart uploads to exactly `key` that relocator started (a
    /// killed attempt to copy there left them; see [`Uploads`]). Any other upload there (the
    /// application's, in progress) is left alone.
    async fn abort_stale_uploads(&self, bucket: &str, key: &str) -> Result<(), S3Error> {
        let Some(u) = &self.uploads else {
            return Ok(());
        };
        let noted =
            |e: anyhow::Error| S3Error::Other(format!("reading relocator's uploads: {e:#}"));
        let ours = u.ours(bucket, key).await.map_err(noted)?;
        if ours.is_empty() {
            return Ok(());
        }
        let open: Vec<String> = self
            .dst
            .list_uploads(bucket, key)
            .await?
            .into_iter()
            .filter(|(k, _)| k == key)
            .map(|(_, id)| id)
            .collect();
        for id in &ours {
            if open.contains(id) {
                self.dst.abort(bucket, key, id).await?;
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
}

impl Endpoint {
    /// Abort one multipart upload.
    pub(super) async fn abort(&self, bucket: &str, key: &str, id: &str) -> Result<(), S3Error> {
        match self
            .write()
            .await
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
}
