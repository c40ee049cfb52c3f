//! A real Rails 6.1 application, not SQL standing in for one (tests/rails/roundtrip.rb,
//! Debian's Rails packages): Active Storage's own migration makes its tables, blobs are
//! uploaded through Active Storage to service `legacy`, relocator moves them to service
//! `production` in another bucket, and Active Storage reads every blob back from there,
//! checking it against its `checksum`.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::Path;
use std::process::Command;

use common::{exits, read_outcomes, var, TestEnv, HOW_TO_START};

/// Run tests/rails/roundtrip.rb `command` as the application would, on this test's
/// database and buckets; its standard output.
fn rails(env: &TestEnv, command: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rails/roundtrip.rb");
    let out = Command::new("ruby")
        .arg(script)
        .args([command, &env.src_bucket, &env.dst_bucket])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &env.database_url)
        .env("AWS_ENDPOINT_URL", var("AWS_ENDPOINT_URL"))
        .env("AWS_ACCESS_KEY_ID", var("AWS_ACCESS_KEY_ID"))
        .env("AWS_SECRET_ACCESS_KEY", var("AWS_SECRET_ACCESS_KEY"))
        .env("AWS_REGION", var("AWS_REGION"))
        .output()
        .unwrap_or_else(|e| panic!("running Rails' side ({e}): {HOW_TO_START}"));
    assert!(
        out.status.success(),
        "Rails' {command} failed ({HOW_TO_START}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Blob keys by the service Active Storage read them from (and `unreadable`).
fn check(env: &TestEnv) -> serde_json::Value {
    serde_json::from_str(&rails(env, "check")).unwrap()
}

/// #18: Active Storage's round trip. Twelve blobs uploaded through Rails, `plan` predicts
/// `run`, every blob then reads back through Active Storage from `production` (its
/// checksum verified by Rails), and the old bucket is empty.
#[tokio::test(flavor = "multi_thread")]
async fn blobs_uploaded_through_rails_read_back_from_the_new_service() {
    let env = TestEnv::new("rails").await;
    rails(&env, "upload");
    let before = check(&env);
    assert_eq!(before["legacy"].as_array().unwrap().len(), 12, "{before}");

    let source = format!("s3://{}/", env.src_bucket);
    let dest = format!("s3://{}/", env.dst_bucket);
    let job = [
        "--table",
        "active_storage_blobs",
        "--path-column",
        "key",
        "--service-column",
        "service_name",
        "--source-service",
        "legacy",
        "--dest-service",
        "production",
        "--checksum-column",
        "checksum",
        "--source",
        &source,
        "--dest",
        &dest,
    ];
    exits(
        env.cmd()
            .arg("plan")
            .args(job)
            .args(["--out", &env.path("plan.csv")]),
        0,
    );
    exits(
        env.cmd()
            .arg("run")
            .args(job)
            .args(["--report", &env.path("run.csv")]),
        0,
    );
    assert_eq!(
        read_outcomes(&env.path("plan.csv")),
        read_outcomes(&env.path("run.csv")),
        "plan predicts run"
    );

    let after = check(&env);
    assert_eq!(after["production"], before["legacy"], "{after}");
    assert!(after.get("unreadable").is_none(), "{after}");
    assert!(after.get("legacy").is_none(), "{after}");
    assert!(env.keys(&env.src_bucket, "").await.is_empty());
}
