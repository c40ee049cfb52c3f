//! Create-only writes, on the stack's moto, which honours `If-None-Match: *` on PutObject
//! and CompleteMultipartUpload as AWS S3 does (Garage ignores it; there the window stays
//! the copy's duration, see the README). relocator learns it per run and then makes its
//! streamed and multipart copies create-only: an object the application puts at the
//! destination after relocator looked is never overwritten, and the row is a conflict.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::ClientExt;

use common::proxy::{Fault, FaultProxy};
use common::TestEnv;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// This binary's S3 server is moto, whatever the suite's.
fn on_moto() {
    std::env::set_var("RELOCATOR_TEST_S3", "moto");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_copy_never_overwrites_an_object_put_after_the_look() {
    put_during_copy("create-only-put", b"source bytes".to_vec(), "PUT", &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_multipart_copy_never_overwrites_an_object_put_after_the_look() {
    let big: Vec<u8> = (0..6 << 20).map(|i: u32| (i % 251) as u8).collect();
    let parts = ["--multipart-threshold", "5MiB", "--part-size", "5MiB"];
    put_during_copy("create-only-complete", big, "POST", &parts).await;
}

/// Copy `image/a.png` across two endpoints (streamed); the destination's first `method`
/// request to the key (the PUT, or CreateMultipartUpload) waits 2 s in the proxy while
/// the application puts its own object there.
async fn put_during_copy(tag: &str, body: Vec<u8>, method: &'static str, extra: &[&str]) {
    on_moto();
    let env = TestEnv::new(tag).await;
    env.seed(0, 0).await; // the table only
    env.put_row("image/a.png", body.clone()).await;
    let key = format!("/{}/avatar/a.png", env.dst_bucket);
    let held = Arc::new(AtomicBool::new(false));
    let (plan_key, plan_held) = (key.clone(), held.clone());
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(move |_, m, path| {
            if m == method && path == plan_key && !plan_held.swap(true, Ordering::SeqCst) {
                Fault::Delay(Duration::from_secs(2))
            } else {
                Fault::Forward
            }
        }),
    )
    .await;
    // The destination through the proxy: another endpoint, so copies are streamed.
    let mut run = env.run_cmd(&[&["--dest-endpoint-url", &proxy.url()], extra].concat());
    let child = tokio::task::spawn_blocking(move || run.output().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !held.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the copy never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let theirs = b"the application's object".to_vec();
    env.s3
        .ep()
        .put(&env.dst_bucket, "avatar/a.png", theirs.clone(), "image/png")
        .await
        .unwrap();
    let out = child.await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("conflict=1"), "{err}");
    let there = env
        .s3
        .ep()
        .get_bytes(&env.dst_bucket, "avatar/a.png")
        .await
        .unwrap();
    assert!(there == theirs, "never overwritten");
    assert_eq!(env.rows().await[0].1, "image/a.png");
    let source = env
        .s3
        .ep()
        .get_bytes(&env.src_bucket, "image/a.png")
        .await
        .unwrap();
    assert!(source == body, "the source stays");
    assert!(
        env.s3
            .ep()
            .list_uploads(&env.dst_bucket, "")
            .await
            .unwrap()
            .is_empty(),
        "no incomplete upload left"
    );
}
