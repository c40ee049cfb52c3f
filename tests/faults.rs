//! Real faults between relocator and the S3 server, injected by a proxy: throttling,
//! errors, resets, stalls and `200` answers carrying an `<Error>`.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use common::proxy::{Fault, FaultProxy};
use common::TestEnv;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn slowdown_for_a_while_is_backed_off_and_the_run_completes() {
    let env = TestEnv::new("slowdown").await;
    let seeded = env.seed(300, 0).await;
    // Once the copies begin (the first look at a destination key, after the start-up
    // checks and the first batch's listings), 40 requests in a row are throttled,
    // whatever they are.
    let from = std::sync::atomic::AtomicU64::new(u64::MAX);
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(move |n, method, path| {
            use std::sync::atomic::Ordering::SeqCst;
            if method == "HEAD" && path.contains("/avatar/") {
                let _ = from.compare_exchange(u64::MAX, n, SeqCst, SeqCst);
            }
            let from = from.load(SeqCst);
            if n >= from && n - from < 40 {
                Fault::SlowDown
            } else {
                Fault::Forward
            }
        }),
    )
    .await;
    let out = env
        .run_cmd(&[
            "--s3-max-attempts",
            "10",
            "--summary-json",
            &env.path("s.json"),
        ])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(proxy.faults_served(), 40, "the throttling was seen");
    env.assert_converged(&seeded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_percent_faults_complete_with_zero_loss() {
    let env = TestEnv::new("faults10").await;
    let seeded = env.seed(2000, 0).await;
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        FaultProxy::random(0.10, 7),
    )
    .await;
    let out = env
        .run_cmd(&[
            "--s3-timeout",
            "2",
            "--s3-max-attempts",
            "10",
            "--batch-size",
            "500",
        ])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let faults = proxy.faults.lock().unwrap().clone();
    eprintln!(
        "10% faults: {} requests, {} faults ({} in-200 errors, {} resets, {} stalls)",
        proxy.requests.load(std::sync::atomic::Ordering::SeqCst),
        faults.len(),
        faults.iter().filter(|f| **f == Fault::ErrorIn200).count(),
        faults.iter().filter(|f| **f == Fault::Reset).count(),
        faults
            .iter()
            .filter(|f| matches!(f, Fault::Stall(_)))
            .count(),
    );
    assert!(faults.len() > 50, "faults were injected");
    env.assert_converged(&seeded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_total_outage_stops_with_exit_1_and_a_rerun_completes() {
    let env = TestEnv::new("outage").await;
    let seeded = env.seed(600, 0).await;
    // Healthy for the start-up checks and a little work, then every request fails.
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(|n, _, _| {
            if n < 120 {
                Fault::Forward
            } else {
                Fault::Internal
            }
        }),
    )
    .await;
    let out = env
        .run_cmd(&["--batch-size", "100", "--s3-max-attempts", "3"])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("InternalError") && err.contains("rerun"),
        "a clear message: {err}"
    );
    env.assert_no_row_dangles().await;

    proxy.set_plan(Box::new(|_, _, _| Fault::Forward));
    let out = env
        .run_cmd(&[])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.assert_converged(&seeded).await;
}

/// A server that stops answering copies mid-run: the batch in hand gives up at
/// --batch-timeout (not hanging for per-request timeouts × retries), exit 1, nothing of
/// it committed; the rerun completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_batch_stops_at_the_batch_timeout_and_the_rerun_completes() {
    let env = TestEnv::new("batch-timeout").await;
    let seeded = env.seed(300, 0).await;
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(|n, method, _| {
            if n > 60 && method == "PUT" {
                Fault::Stall(Duration::from_secs(30))
            } else {
                Fault::Forward
            }
        }),
    )
    .await;
    let started = std::time::Instant::now();
    let out = env
        .run_cmd(&["--batch-size", "50", "--batch-timeout", "3"])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--batch-timeout 3s"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "it did not hang"
    );
    env.assert_no_row_dangles().await;

    proxy.set_plan(Box::new(|_, _, _| Fault::Forward));
    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    env.assert_converged(&seeded).await;
}
