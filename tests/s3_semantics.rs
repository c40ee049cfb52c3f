//! The S3 behaviours relocator relies on, checked against the real server (Garage, and
//! moto with RELOCATOR_TEST_S3=moto) rather than assumed.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::ClientExt;

use aws_sdk_s3::error::SdkError;
use common::TestEnv;
use relocator::s3;

fn status<E>(e: &SdkError<E>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread")]
async fn server_semantics_relocator_depends_on() {
    let env = TestEnv::new("semantics").await;
    let c = &env.s3;
    let (sb, db) = (&env.src_bucket, &env.dst_bucket);
    c.ep()
        .put(sb, "a b+c%#ü.png", b"source".to_vec(), "image/png")
        .await
        .unwrap();
    c.ep()
        .put(db, "taken.png", b"other".to_vec(), "image/png")
        .await
        .unwrap();
    let src = c.ep().head(sb, "a b+c%#ü.png").await.unwrap().unwrap();

    // Copy source with awkward characters, percent-encoded, keeps Content-Type.
    let out = c
        .copy_object()
        .copy_source(s3::copy_source(sb, "a b+c%#ü.png"))
        .bucket(db)
        .key("copied.png")
        .send()
        .await
        .unwrap();
    let etag = out
        .copy_object_result()
        .unwrap()
        .e_tag()
        .unwrap()
        .trim_matches('"')
        .to_owned();
    assert_eq!(etag, src.etag, "single-part copy keeps the MD5 ETag");
    let head = c
        .head_object()
        .bucket(db)
        .key("copied.png")
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_type(), Some("image/png"));

    // x-amz-copy-source-if-match with a stale ETag: 412, nothing written. Server-specific:
    // moto ignores the condition and copies (checked against it); relocator then has the
    // copy's own ETag, compared with the one it looked at (see the README).
    let stale = c
        .copy_object()
        .copy_source(s3::copy_source(sb, "a b+c%#ü.png"))
        .copy_source_if_match("\"0123456789abcdef0123456789abcdef\"")
        .bucket(db)
        .key("stale.png")
        .send()
        .await;
    if common::on_moto() {
        let etag = stale
            .unwrap()
            .copy_object_result()
            .unwrap()
            .e_tag()
            .unwrap()
            .to_owned();
        assert_eq!(
            etag.trim_matches('"'),
            src.etag,
            "the copy says what it copied"
        );
    } else {
        assert_eq!(status(&stale.unwrap_err()), Some(412));
        assert!(c.ep().head(db, "stale.png").await.unwrap().is_none());
    }

    // Copying from a missing source: 404.
    let missing = c
        .copy_object()
        .copy_source(s3::copy_source(sb, "nope.png"))
        .bucket(db)
        .key("x.png")
        .send()
        .await
        .unwrap_err();
    assert_eq!(status(&missing), Some(404));

    // DeleteObjects of keys that do not exist succeeds (a repeated cleanup is harmless).
    let errors = c
        .ep()
        .delete_many(sb, &["never-existed.png".to_owned()])
        .await
        .unwrap();
    assert!(errors.is_empty());

    // Report (not assert) whether CopyObject honours If-None-Match: relocator probes
    // this per endpoint at start and only relies on it when honoured.
    let cond = c
        .copy_object()
        .copy_source(s3::copy_source(sb, "a b+c%#ü.png"))
        .if_none_match("*")
        .bucket(db)
        .key("taken.png")
        .send()
        .await;
    let after = c.ep().get_bytes(db, "taken.png").await.unwrap();
    eprintln!(
        "CopyObject If-None-Match on an existing key: {:?}; destination now {:?}",
        cond.as_ref().map(|_| "200").map_err(status),
        String::from_utf8_lossy(&after)
    );
}
