//! Versioned buckets, on the stack's moto (Garage has no versioning): preflight says what
//! a delete means there, a run leaves delete markers over noncurrent versions of the
//! moved sources (never deleting a version), a rollback restores every row and object,
//! Object Lock does not stop the run, and a copy takes the version it looked at.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::ClientExt;

use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
use common::proxy::{Fault, FaultProxy};
use common::TestEnv;
use std::time::Duration;

/// This binary's S3 server is moto, whatever the suite's.
fn on_moto() {
    std::env::set_var("RELOCATOR_TEST_S3", "moto");
}

async fn enable_versioning(env: &TestEnv, bucket: &str) {
    env.s3
        .put_bucket_versioning()
        .bucket(bucket)
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .unwrap();
}

/// (key, is a delete marker) of every version under `prefix`.
async fn versions(env: &TestEnv, bucket: &str, prefix: &str) -> (usize, usize) {
    let out = env
        .s3
        .list_object_versions()
        .bucket(bucket)
        .prefix(prefix)
        .send()
        .await
        .unwrap();
    (out.versions().len(), out.delete_markers().len())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_versioned_source_keeps_its_versions_and_rolls_back() {
    on_moto();
    let env = TestEnv::new("versioned").await;
    enable_versioning(&env, &env.src_bucket).await;
    let seeded = env.seed(20, 0).await;
    let distinct: std::collections::HashSet<&str> =
        seeded.iter().map(|r| r.path.as_str()).collect();
    let mut before = std::collections::HashMap::new();
    for key in &distinct {
        let bytes = env.s3.ep().get_bytes(&env.src_bucket, key).await.unwrap();
        before.insert(key.to_string(), bytes);
    }

    let out = env
        .cmd()
        .args([
            "preflight",
            "--source",
            &env.source(),
            "--dest",
            &env.dest(),
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("warn  source versions") && said.contains("is versioned (enabled)"),
        "{said}"
    );
    assert!(said.contains("NoncurrentVersionExpiration"), "{said}");
    assert!(said.contains("ok    dest versions"), "{said}");

    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    env.assert_converged(&seeded).await;
    assert!(env.keys(&env.src_bucket, "image/").await.is_empty());
    assert_eq!(
        versions(&env, &env.src_bucket, "image/").await,
        (distinct.len(), distinct.len()),
        "each source is a noncurrent version under a delete marker"
    );

    let out = env
        .cmd()
        .args(["rollback", "--source", &env.source(), "--dest", &env.dest()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (key, was) in &before {
        let bytes = env.s3.ep().get_bytes(&env.src_bucket, key).await.unwrap();
        assert!(&bytes == was, "{key} back, byte for byte");
    }
    assert!(env
        .rows()
        .await
        .iter()
        .all(|(_, p)| p.starts_with("image/")));
    assert!(env.keys(&env.dst_bucket, "avatar/").await.is_empty());
}

/// The source overwritten between relocator's look at it and its copy: the copy takes the
/// version looked at (its versionId in the copy source), recorded with the move, and the
/// source, no longer that version, is kept. moto ignores `x-amz-copy-source-if-match`, so
/// a copy without the version took the new bytes. Both ways relocator finds the source:
/// by the table (no index on the path column) and by the listing (indexed); in both, the
/// version is the one a HEAD right before the copy saw.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_takes_the_version_it_looked_at_after_a_head() {
    copy_takes_the_version_looked_at(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_takes_the_version_it_looked_at_in_a_listing() {
    copy_takes_the_version_looked_at(true).await;
}

async fn copy_takes_the_version_looked_at(indexed: bool) {
    on_moto();
    let env = TestEnv::new(if indexed { "pin-listed" } else { "pin-head" }).await;
    enable_versioning(&env, &env.src_bucket).await;
    env.seed(0, 0).await; // the table only, with an index on the path
    if !indexed {
        env.db()
            .await
            .batch_execute("DROP INDEX avatars_path_idx")
            .await
            .unwrap();
    }
    env.put_row("image/a.png", b"first bytes".to_vec()).await;
    let looked_at = env
        .s3
        .head_object()
        .bucket(&env.src_bucket)
        .key("image/a.png")
        .send()
        .await
        .unwrap()
        .version_id()
        .unwrap()
        .to_owned();

    // The copy onto avatar/a.png waits in the proxy; meanwhile the source is replaced.
    let copy_path = format!("/{}/avatar/a.png", env.dst_bucket);
    let plan_path = copy_path.clone();
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(move |_, method, path| {
            if method == "PUT" && path == plan_path {
                Fault::Delay(Duration::from_secs(2))
            } else {
                Fault::Forward
            }
        }),
    )
    .await;
    let mut run = env.run_cmd(&["--endpoint-url", &proxy.url()]);
    let child = tokio::task::spawn_blocking(move || run.output().unwrap());
    proxy
        .wait_for("the copy", Duration::from_secs(6), |seen| {
            seen.iter()
                .any(|s| s.method == "PUT" && s.target.starts_with(&copy_path))
        })
        .await;
    env.s3
        .ep()
        .put(
            &env.src_bucket,
            "image/a.png",
            b"second byte".to_vec(),
            "image/png",
        )
        .await
        .unwrap();
    let out = child.await.unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    // Moved, and the source kept for a look: exit 3 (rows need attention).
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(said.contains("source_changed=1"), "{said}");

    {
        let seen = proxy.seen.lock().unwrap();
        let at = seen
            .iter()
            .position(|s| s.method == "PUT" && s.target.starts_with(&copy_path))
            .unwrap();
        let named = seen[at].headers["x-amz-copy-source"].to_str().unwrap();
        assert!(
            named.ends_with(&format!("?versionId={looked_at}")),
            "{named}"
        );
        let looked = |method: &str, target: &str| {
            seen[..at]
                .iter()
                .any(|s| s.method == method && s.target.contains(target))
        };
        let head = format!("/{}/image/a.png", env.src_bucket);
        // Indexed, the batch's keys come from the versions listing; either way a HEAD right
        // before the copy names the version (a listed one may be old by then).
        assert_eq!(
            (looked("GET", "versions"), looked("HEAD", &head)),
            (indexed, true),
            "found by the versions listing (indexed), looked at with a HEAD before the copy"
        );
    }
    assert_eq!(env.rows().await[0].1, "avatar/a.png");
    let copy = env
        .s3
        .ep()
        .get_bytes(&env.dst_bucket, "avatar/a.png")
        .await
        .unwrap();
    assert_eq!(
        copy, b"first bytes",
        "the version looked at, not the new one"
    );
    let recorded: Option<String> = env
        .db()
        .await
        .query_one("SELECT src_version FROM relocator.moves", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded.as_deref(), Some(looked_at.as_str()));
    let source = env
        .s3
        .ep()
        .get_bytes(&env.src_bucket, "image/a.png")
        .await
        .unwrap();
    assert_eq!(source, b"second byte", "replaced since the copy: kept");
}

/// Every source overwritten once (two versions each) and listed three keys at a time:
/// each page ends inside a key's older versions. moto answers a key-marker alone with
/// that key's older versions, so resuming after the last key listed asked for the same
/// page forever (a review saw 1,303 identical listings in 20 s and no row moved). The run
/// ends, every row moved onto a copy of its latest version.
#[tokio::test(flavor = "multi_thread")]
async fn listing_pages_that_end_inside_a_keys_versions_are_followed_to_the_end() {
    on_moto();
    let env = TestEnv::new("versions-paged").await;
    enable_versioning(&env, &env.src_bucket).await;
    env.seed(0, 0).await; // the table only, with an index on the path
    for k in ["a", "b", "c", "d", "e", "f"] {
        let key = format!("image/{k}.png");
        env.put_row(&key, format!("{k} first").into_bytes()).await;
        env.s3
            .ep()
            .put(
                &env.src_bucket,
                &key,
                format!("{k} later").into_bytes(),
                "image/png",
            )
            .await
            .unwrap();
    }
    let mut run = env.run_cmd(&["--batch-size", "3"]).spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            run.kill().unwrap();
            panic!("the run did not end within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(0));
    for (id, path) in env.rows().await {
        let k = path
            .strip_prefix("avatar/")
            .unwrap_or_else(|| panic!("row {id}: {path}"));
        let copy = env.s3.ep().get_bytes(&env.dst_bucket, &path).await.unwrap();
        assert_eq!(copy, format!("{} later", &k[..1]).into_bytes());
    }
}

/// Object Lock on the source: a locked version may not be deleted, but relocator never
/// deletes a version — its delete puts a delete marker, which the lock allows. The run
/// completes and the locked bytes stay as a noncurrent version.
#[tokio::test(flavor = "multi_thread")]
async fn object_lock_on_the_source_does_not_stop_the_run() {
    on_moto();
    let env = TestEnv::new("locked").await;
    let locked = format!("{}-lock", env.src_bucket);
    env.s3
        .create_bucket()
        .bucket(&locked)
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .unwrap();
    env.seed(0, 0).await; // the table only
    let until = aws_sdk_s3::primitives::DateTime::from_secs(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + 86_400,
    );
    env.s3
        .put_object()
        .bucket(&locked)
        .key("image/kept.png")
        .body(b"locked bytes".to_vec().into())
        .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Crc32)
        .object_lock_mode(aws_sdk_s3::types::ObjectLockMode::Compliance)
        .object_lock_retain_until_date(until)
        .send()
        .await
        .unwrap();
    env.db()
        .await
        .execute("INSERT INTO avatars (path) VALUES ('image/kept.png')", &[])
        .await
        .unwrap();
    let source = format!("s3://{locked}/image/");
    let out = env
        .cmd()
        .args(["preflight", "--source", &source, "--dest", &env.dest()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("with Object Lock"), "{said}");
    let out = env
        .cmd()
        .args(["run", "--source", &source, "--dest", &env.dest()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.rows().await[0].1, "avatar/kept.png");
    let copy = env
        .s3
        .ep()
        .get_bytes(&env.dst_bucket, "avatar/kept.png")
        .await
        .unwrap();
    assert_eq!(copy, b"locked bytes");
    assert_eq!(
        versions(&env, &locked, "image/").await,
        (1, 1),
        "the locked version stays, under a delete marker"
    );
}

/// A versioned source: a copy names the version it looked at, and an old version stays
/// there, so a copy from an old look is never refused. The run must look right before
/// each copy, not at a listing taken earlier — the run's listing (no index on the path
/// column) or the batch's (phase 1, indexed): the application re-uploads a source while
/// an earlier copy of the run is held in the proxy, and that source's row ends at a copy
/// of the new bytes.
#[tokio::test(flavor = "multi_thread")]
async fn a_versioned_source_re_uploaded_during_the_run_is_copied_as_it_is_now() {
    reuploaded_during_the_run(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_versioned_source_re_uploaded_during_a_batch_is_copied_as_it_is_now() {
    reuploaded_during_the_run(true).await;
}

async fn reuploaded_during_the_run(indexed: bool) {
    on_moto();
    let env = TestEnv::new(if indexed {
        "reupload-batch"
    } else {
        "reupload-run"
    })
    .await;
    enable_versioning(&env, &env.src_bucket).await;
    env.seed(0, 0).await;
    if !indexed {
        env.db()
            .await
            .batch_execute("DROP INDEX avatars_path_idx")
            .await
            .unwrap();
    }
    env.put_row("image/a.png", b"a, first bytes".to_vec()).await;
    env.put_row("image/b.png", b"b, first bytes".to_vec()).await;

    let held = format!("/{}/avatar/a.png", env.dst_bucket);
    let plan_path = held.clone();
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(move |_, method, path| {
            if method == "PUT" && path == plan_path {
                Fault::Delay(Duration::from_secs(2))
            } else {
                Fault::Forward
            }
        }),
    )
    .await;
    // One row per batch without the index (phase 2 copies batch by batch); one batch of
    // both keys with it (phase 1 copies them in key order).
    let batch = if indexed { "10" } else { "1" };
    let mut run = env.run_cmd(&[
        "--endpoint-url",
        &proxy.url(),
        "--batch-size",
        batch,
        "--concurrency",
        "1",
    ]);
    let child = tokio::task::spawn_blocking(move || run.output().unwrap());
    proxy
        .wait_for("the copy of a", Duration::from_secs(6), |seen| {
            seen.iter()
                .any(|s| s.method == "PUT" && s.target.starts_with(&held))
        })
        .await;
    let new_bytes = b"b, uploaded again during the run".to_vec();
    env.s3
        .ep()
        .put(
            &env.src_bucket,
            "image/b.png",
            new_bytes.clone(),
            "image/png",
        )
        .await
        .unwrap();
    let out = child.await.unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert_eq!(
        env.rows()
            .await
            .iter()
            .map(|(_, p)| p.as_str())
            .collect::<Vec<_>>(),
        ["avatar/a.png", "avatar/b.png"]
    );
    assert_eq!(
        env.s3
            .ep()
            .get_bytes(&env.dst_bucket, "avatar/b.png")
            .await
            .unwrap(),
        new_bytes,
        "b's row points at a copy of what its source held when it was copied"
    );
}
