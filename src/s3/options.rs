//! What relocator writes besides the bytes: an object's headers and user metadata, the
//! job's storage class and encryption ([`WriteOptions`], validated in
//! [`crate::config`]), full-object checksums — and the macros that read them off an
//! answer or set them on a request (the SDK's request and answer types share these
//! accessors but no trait).

pub use crate::config::{Encryption, Metadata, WriteOptions};

/// The headers a copy keeps, read off a HeadObject or GetObject answer (the two have the
/// same accessors but no common trait).
macro_rules! headers_of {
    ($out:expr) => {
        $crate::s3::Headers {
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
        let h: $crate::s3::Headers = $h;
        $req.set_content_type(h.content_type)
            .set_cache_control(h.cache_control)
            .set_content_disposition(h.content_disposition)
            .set_content_encoding(h.content_encoding)
            .set_content_language(h.content_language)
            .set_expires($crate::s3::options::http_date(h.expires.as_deref()))
            .set_metadata(Some(h.metadata.into_iter().collect()))
    }};
}

/// Set the job's [`WriteOptions`] (storage class, encryption) on a PutObject, CopyObject
/// or CreateMultipartUpload request: the one place a write gets them.
macro_rules! with_write_options {
    ($req:expr, $w:expr) => {{
        use aws_sdk_s3::types::ServerSideEncryption as Sse;
        let w: &$crate::s3::WriteOptions = $w;
        let (sse, kms_key) = match &w.encryption {
            None => (None, None),
            Some($crate::s3::Encryption::S3) => (Some(Sse::Aes256), None),
            Some($crate::s3::Encryption::Kms(key)) => (Some(Sse::AwsKms), key.clone()),
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
            v.map(|v| $crate::s3::Checksum {
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
pub(super) fn http_date(s: Option<&str>) -> Option<aws_smithy_types::DateTime> {
    s.and_then(|e| {
        aws_smithy_types::DateTime::from_str(e, aws_smithy_types::date_time::Format::HttpDate).ok()
    })
}
