//! Large objects: copied in parts (UploadPartCopy) above --multipart-threshold, with
//! every header kept on both copy paths, no incomplete upload left behind — also when the
//! job is killed in the middle of a multipart copy — and memory well below the object.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::TestEnv;
use rand::{RngCore, SeedableRng};
use relocator::{s3, seed};

const BIG: usize = 64 << 20;
const PARTS: [&str; 4] = ["--multipart-threshold", "8MiB", "--part-size", "8MiB"];
const EXTRA: [&str; 2] = ["--set-metadata", "migrated-by=relocator"];

/// The seed's headers plus the metadata EXTRA adds.
fn expected(env: &TestEnv, key: &str) -> s3::Headers {
    let extra: s3::Metadata = [("migrated-by".to_owned(), "relocator".to_owned())].into();
    seed::headers(env.seed, key).with(&extra)
}

fn big_body() -> Vec<u8> {
    let mut body = vec![0u8; BIG];
    rand::rngs::StdRng::seed_from_u64(64).fill_bytes(&mut body);
    body
}

/// Put the 64 MiB object with the seed's headers and a row pointing at it.
async fn big_row(env: &TestEnv, key: &str) -> Vec<u8> {
    let body = big_body();
    s3::put_with(
        &env.s3,
        &env.src_bucket,
        key,
        body.clone(),
        &seed::headers(env.seed, key),
    )
    .await
    .unwrap();
    env.db()
        .await
        .execute("INSERT INTO avatars (path) VALUES ($1)", &[&key])
        .await
        .unwrap();
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn a_64_mib_object_is_copied_in_parts_with_every_header_kept_and_verified() {
    let env = TestEnv::new("multipart").await;
    env.seed(30, 0).await;
    let body = big_row(&env, "image/big one.bin").await;

    let mut child = env
        .run_cmd(
            &[
                &PARTS[..],
                &EXTRA,
                &["--verify-content", "--summary-json", &env.path("s.json")],
            ]
            .concat(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (code, peak) = common::wait_peak_rss(&mut child);
    assert_eq!(code, 0);
    assert!(
        peak < (BIG as u64) * 3 / 4,
        "peak RSS {} MiB is not well below the 64 MiB object",
        peak >> 20
    );
    eprintln!("peak RSS of the run: {} MiB", peak >> 20);
    let summary = common::read_summary(&env.path("s.json"));
    let (reads, copies) = (
        summary["counters"]["s3_reads"].as_u64().unwrap(),
        summary["counters"]["s3_copies"].as_u64().unwrap(),
    );
    assert!(
        reads >= 2 * copies,
        "--verify-content read both sides: {summary}"
    );

    let copy = s3::get_bytes(&env.s3, &env.dst_bucket, "avatar/big one.bin")
        .await
        .unwrap();
    assert!(copy == body, "the 64 MiB copy differs");
    let (info, headers) = s3::head_headers(&env.s3, &env.dst_bucket, "avatar/big one.bin")
        .await
        .unwrap()
        .unwrap();
    assert!(
        info.is_multipart(),
        "it was copied in parts: ETag {}",
        info.etag
    );
    assert_eq!(headers, expected(&env, "image/big one.bin"));
    // The single-CopyObject path keeps them too.
    let small = env
        .rows()
        .await
        .into_iter()
        .find(|(_, p)| p.starts_with("avatar/") && p.ends_with(".png"))
        .unwrap()
        .1;
    let (_, small_headers) = s3::head_headers(&env.s3, &env.dst_bucket, &small)
        .await
        .unwrap()
        .unwrap();
    let original = format!("image/{}", small.strip_prefix("avatar/").unwrap());
    assert_eq!(small_headers, expected(&env, &original));
    assert!(s3::list_uploads(&env.s3, &env.dst_bucket, "")
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_in_the_middle_of_a_multipart_copy_then_rerun_completes() {
    let env = TestEnv::new("multipart-kill9").await;
    env.seed(0, 0).await; // the table only
    let body = big_row(&env, "image/big.bin").await;

    // --max-rps 3 paces the parts, so the kill lands mid-upload.
    let mut child = env
        .run_cmd(&[&PARTS[..], &["--max-rps", "3"]].concat())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while s3::list_uploads(&env.s3, &env.dst_bucket, "")
        .await
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "no multipart upload started");
        assert!(child.try_wait().unwrap().is_none(), "the run ended first");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await; // a part or two in
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(
        s3::list_uploads(&env.s3, &env.dst_bucket, "")
            .await
            .unwrap()
            .len(),
        1,
        "the killed run left its upload incomplete"
    );
    assert_eq!(env.rows().await[0].1, "image/big.bin", "nothing committed");
    assert!(s3::head(&env.s3, &env.dst_bucket, "avatar/big.bin")
        .await
        .unwrap()
        .is_none());

    let (code, err) = env.run(&PARTS);
    assert_eq!(code, 0, "{err}");
    assert_eq!(env.rows().await[0].1, "avatar/big.bin");
    let copy = s3::get_bytes(&env.s3, &env.dst_bucket, "avatar/big.bin")
        .await
        .unwrap();
    assert!(copy == body, "the copy differs");
    assert!(
        s3::list_uploads(&env.s3, &env.dst_bucket, "")
            .await
            .unwrap()
            .is_empty(),
        "no incomplete upload left after the rerun"
    );
    assert!(env.keys(&env.src_bucket, "").await.is_empty());
}

/// Parts that keep failing: the multipart upload is aborted (none left incomplete), the
/// run stops with exit 1 and nothing committed, and the rerun completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_multipart_copy_is_aborted_and_the_rerun_completes() {
    use common::proxy::{Fault, FaultProxy};
    let env = TestEnv::new("multipart-abort").await;
    env.seed(0, 0).await; // the table only
    let body = big_row(&env, "image/big.bin").await;
    // Every part upload (a PUT to the destination key) fails; the rest goes through.
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(|_, method, path| {
            if method == "PUT" && path.ends_with("/avatar/big.bin") {
                Fault::Internal
            } else {
                Fault::Forward
            }
        }),
    )
    .await;
    let out = env
        .run_cmd(&[&PARTS[..], &["--s3-max-attempts", "2"]].concat())
        .env("AWS_ENDPOINT_URL", proxy.url())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        s3::list_uploads(&env.s3, &env.dst_bucket, "")
            .await
            .unwrap()
            .is_empty(),
        "the failed upload was aborted"
    );
    assert_eq!(env.rows().await[0].1, "image/big.bin", "nothing committed");

    proxy.set_plan(Box::new(|_, _, _| Fault::Forward));
    let (code, err) = env.run(&PARTS);
    assert_eq!(code, 0, "{err}");
    let copy = s3::get_bytes(&env.s3, &env.dst_bucket, "avatar/big.bin")
        .await
        .unwrap();
    assert!(copy == body, "the copy differs");
}
