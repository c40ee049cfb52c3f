//! What relocator writes and how it knows a copy is right: `--verify-content` against a
//! server that returns wrong bytes (a copy relocator made is removed again, an object
//! already at the destination is never touched), and the destination write options
//! (`--storage-class`, `--sse`, `--sse-kms-key-id`) on every kind of write.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use common::proxy::{Fault, FaultProxy, Seen};
use common::{read_summary, var, TestEnv};
use relocator::s3;

/// The destination key of a seeded source key.
fn moved(path: &str) -> String {
    format!("avatar/{}", path.strip_prefix("image/").unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_content_removes_a_copy_that_reads_back_wrong_and_never_an_existing_object() {
    let env = TestEnv::new("verify-content").await;
    let seeded = env.seed(20, 0).await;
    let before = env.rows().await;
    let mut sources = env.keys(&env.src_bucket, "image/").await;
    sources.sort();
    // An identical object already at one destination, as an interrupted run leaves it.
    let kept = moved(&seeded[0].path);
    env.s3
        .copy_object()
        .copy_source(s3::copy_source(&env.src_bucket, &seeded[0].path))
        .bucket(&env.dst_bucket)
        .key(&kept)
        .send()
        .await
        .unwrap();
    // Every read of a destination object returns other bytes than were stored.
    let dst_objects = format!("/{}/avatar/", env.dst_bucket);
    let proxy = FaultProxy::start(
        &var("AWS_ENDPOINT_URL"),
        Box::new(move |_, method, path| {
            if method == "GET" && path.starts_with(&dst_objects) {
                Fault::Corrupt
            } else {
                Fault::Forward
            }
        }),
    )
    .await;
    let summary = env.path("s.json");
    let out = env
        .run_cmd(&["--verify-content", "--summary-json", &summary])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "rows need attention: {err}");
    let s = read_summary(&summary);
    let rows_on_kept = seeded.iter().filter(|r| r.path == seeded[0].path).count() as u64;
    // (Phase 2 tries again what phase 1 gave up on: each row is reported once or twice.)
    let count = |o: &str| s["outcomes"][o].as_u64().unwrap_or(0);
    assert!(
        count("conflict") >= rows_on_kept,
        "the existing object reads back other bytes: a conflict, left alone: {s}"
    );
    assert!(
        count("error") >= seeded.len() as u64 - rows_on_kept,
        "every copy relocator made read back wrong: {s}"
    );
    assert_eq!(count("moved"), 0, "{s}");
    assert!(proxy.faults_served() >= seeded.len());
    assert_eq!(env.rows().await, before, "nothing committed");
    assert_eq!(
        env.keys(&env.dst_bucket, "avatar/").await,
        vec![kept.clone()],
        "the copies were removed again, the existing object was not"
    );
    let mut left = env.keys(&env.src_bucket, "image/").await;
    left.sort();
    assert_eq!(left, sources, "no source deleted");

    // With honest reads, the same command moves everything, the existing object included.
    let (code, err) = env.run(&["--verify-content"]);
    assert_eq!(code, 0, "{err}");
    for ((_, path), s) in env.rows().await.iter().zip(&seeded) {
        assert_eq!(path, &moved(&s.path));
    }
    assert!(env.keys(&env.src_bucket, "image/").await.is_empty());
}

/// The destination writes among the requests the proxy saw: PutObject, CopyObject and
/// CreateMultipartUpload (the requests that create an object and take its options), not
/// UploadPart(Copy) or CompleteMultipartUpload.
fn object_writes(seen: &[Seen], bucket: &str) -> Vec<Seen> {
    let prefix = format!("/{bucket}/");
    seen.iter()
        .filter(|r| r.target.starts_with(&prefix))
        .filter(|r| {
            (r.method == "PUT" && !r.target.contains("partNumber="))
                || (r.method == "POST" && r.target.ends_with("?uploads"))
        })
        .cloned()
        .collect()
}

fn header<'a>(r: &'a Seen, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_class_and_encryption_go_with_every_write() {
    const BIG: usize = 12 << 20;
    let parts = ["--multipart-threshold", "5MiB", "--part-size", "5MiB"];
    let proxy =
        FaultProxy::start(&var("AWS_ENDPOINT_URL"), Box::new(|_, _, _| Fault::Forward)).await;

    // Server-side (both sides through the proxy): CopyObject and an UploadPartCopy upload.
    let env = TestEnv::new("write-options-copy").await;
    let seeded = env.seed(30, 0).await;
    env.put_row("image/big.bin", vec![5u8; BIG]).await;
    let args = [
        &parts[..],
        &["--storage-class", "STANDARD_IA", "--sse", "AES256"],
    ]
    .concat();
    let out = env
        .run_cmd(&args)
        .env("AWS_ENDPOINT_URL", proxy.url())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let writes = object_writes(&proxy.seen.lock().unwrap(), &env.dst_bucket);
    let distinct = env_distinct(&seeded) + 1;
    assert!(
        writes.len() >= distinct,
        "{} object writes for {distinct} objects",
        writes.len()
    );
    assert!(
        writes.iter().any(|r| r.method == "POST"),
        "the large one in parts"
    );
    for w in &writes {
        assert_eq!(
            header(w, "x-amz-storage-class"),
            Some("STANDARD_IA"),
            "{w:?}"
        );
        assert_eq!(
            header(w, "x-amz-server-side-encryption"),
            Some("AES256"),
            "{w:?}"
        );
    }
    assert!(env.keys(&env.src_bucket, "image/").await.is_empty());

    // Streamed (the destination through the proxy, under another URL than the source):
    // PutObject and an UploadPart upload, with SSE-KMS and its key. KMS ETags are not
    // MD5s, so each copy is confirmed by a HEAD of its size instead.
    let env = TestEnv::new("write-options-stream").await;
    let seeded = env.seed(30, 0).await;
    env.put_row("image/big.bin", vec![5u8; BIG]).await;
    proxy.seen.lock().unwrap().clear();
    let url = proxy.url();
    let args = [
        &parts[..],
        &["--storage-class", "ONEZONE_IA", "--sse", "aws:kms"],
        &["--sse-kms-key-id", "alias/uploads"],
        &["--dest-endpoint-url", &url],
    ]
    .concat();
    let (code, err) = env.run(&args);
    assert_eq!(code, 0, "{err}");
    let seen = proxy.seen.lock().unwrap().clone();
    let writes = object_writes(&seen, &env.dst_bucket);
    let distinct = env_distinct(&seeded) + 1;
    assert!(writes.len() >= distinct, "{} writes", writes.len());
    assert!(
        writes.iter().any(|r| r.method == "POST"),
        "the large one in parts"
    );
    for w in &writes {
        assert_eq!(
            header(w, "x-amz-storage-class"),
            Some("ONEZONE_IA"),
            "{w:?}"
        );
        assert_eq!(
            header(w, "x-amz-server-side-encryption"),
            Some("aws:kms"),
            "{w:?}"
        );
        assert_eq!(
            header(w, "x-amz-server-side-encryption-aws-kms-key-id"),
            Some("alias/uploads"),
            "{w:?}"
        );
    }
    let heads = seen
        .iter()
        .filter(|r| {
            r.method == "HEAD"
                && r.target
                    .starts_with(&format!("/{}/avatar/", env.dst_bucket))
        })
        .count();
    assert!(
        heads >= distinct - 1,
        "each single-part copy confirmed by a HEAD ({heads} for {distinct})"
    );
    assert!(env.keys(&env.src_bucket, "image/").await.is_empty());
}

/// Objects the seeded rows point at (rows may share one).
fn env_distinct(seeded: &[relocator::commands::seed::SeedRow]) -> usize {
    seeded
        .iter()
        .map(|r| r.path.as_str())
        .collect::<std::collections::HashSet<_>>()
        .len()
}
