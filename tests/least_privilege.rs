//! The whole job — preflight, backup, run, verify, status, rollback — as the
//! least-privilege role of sql/roles.sql and with the stack's "job" S3 key, which may read
//! and write the buckets but not administer them (Garage's nearest match to the README's
//! IAM policy: s3:ListBucket, s3:GetObject, s3:PutObject, s3:DeleteObject).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use common::{var, TestEnv};

/// Empty `bucket` under `prefix` (with the main key).
async fn clear(env: &TestEnv, bucket: &str, prefix: &str) {
    for k in env.keys(bucket, prefix).await {
        env.s3
            .delete_object()
            .bucket(bucket)
            .key(k)
            .send()
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_whole_job_works_as_the_least_privilege_role_with_the_iam_policy_key() {
    let env = TestEnv::new("least-priv").await;
    // The job key's grants cover the stack's buckets: this test's data lives there,
    // under prefixes of its own.
    let p = format!("lp-{}", env.name);
    let (src, dst) = (
        format!("s3://legacy-s3/{p}/image/"),
        format!("s3://production-s3/{p}/avatar/"),
    );
    let seeded = env.seed_at(&src, 150, 0).await;

    let url = url::Url::parse(&env.least_privilege_url()).unwrap();

    let job = |sub: &str, extra: &[&str]| -> (i32, String) {
        let out = env
            .cmd()
            .env("DATABASE_URL", url.as_str())
            .env("AWS_ACCESS_KEY_ID", var("RELOCATOR_TEST_JOB_KEY_ID"))
            .env("AWS_SECRET_ACCESS_KEY", var("RELOCATOR_TEST_JOB_SECRET"))
            .args([sub, "--source", &src, "--dest", &dst])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let before = env.path("before.csv");
    let after = env.path("after.csv");
    let steps: Vec<(&str, Vec<&str>, i32)> = vec![
        ("preflight", vec![], 0),
        ("backup", vec!["--out", &before], 0),
        ("plan", vec!["--out", "/dev/null"], 0),
        ("run", vec!["--backup", &before], 0),
        ("verify", vec!["--orphans"], 0),
        ("status", vec![], 0),
        ("rollback", vec![], 0),
        ("backup", vec!["--out", &after], 0),
    ];
    let mut failures = Vec::new();
    for (sub, extra, want) in &steps {
        let (code, text) = job(sub, extra);
        if code != *want {
            failures.push(format!("{sub} exited {code}, not {want}:\n{text}"));
            break;
        }
    }
    let rows = env.rows().await;
    clear(&env, "legacy-s3", &format!("{p}/")).await;
    clear(&env, "production-s3", &format!("{p}/")).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        std::fs::read(&before).unwrap(),
        std::fs::read(&after).unwrap(),
        "rolled back to the backup"
    );
    assert_eq!(rows.len(), seeded.len());
    // And the role really is limited.
    let limited = common::connect(url.as_str()).await;
    assert!(limited.execute("DELETE FROM avatars", &[]).await.is_err());
    assert!(limited
        .execute("INSERT INTO avatars (path) VALUES ('x')", &[])
        .await
        .is_err());
}
