//! The service shape (`--service-column`): Rails Active Storage's `active_storage_blobs`,
//! built with the DDL of Rails 6.1's own migration. A blob is `(key, service_name)`: the
//! same key in another bucket once its service changes. Each promise for this shape, and
//! a kill-and-rerun.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::ClientExt;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    exits, killed_until_done, planned, read_outcomes, read_summary, reported,
    run_while_the_application_writes, until_a_session_waits_for_a_lock, TestEnv,
};

/// `active_storage_blobs` as Rails 6.1's migration creates it
/// (20170806125915_create_active_storage_tables.rb), with or without its unique index
/// on `key` (without it the run sweeps the table by id, phase 2).
async fn blobs_table(env: &TestEnv, key_index: bool) {
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE active_storage_blobs (
             id bigserial PRIMARY KEY,
             key character varying NOT NULL,
             filename character varying NOT NULL,
             content_type character varying,
             metadata text,
             service_name character varying NOT NULL,
             byte_size bigint NOT NULL,
             checksum character varying NOT NULL,
             created_at timestamp(6) without time zone NOT NULL)",
    )
    .await
    .unwrap();
    if key_index {
        db.batch_execute(
            "CREATE UNIQUE INDEX index_active_storage_blobs_on_key ON active_storage_blobs (key)",
        )
        .await
        .unwrap();
    }
}

/// A blob as Active Storage writes it: the object at `key` in `bucket`, and its row.
async fn blob(env: &TestEnv, bucket: &str, key: &str, service: &str, body: &[u8]) {
    env.s3
        .ep()
        .put(bucket, key, body.to_vec(), "image/png")
        .await
        .unwrap();
    let checksum = base64_md5(body);
    env.db()
        .await
        .execute(
            "INSERT INTO active_storage_blobs
                 (key, filename, content_type, metadata, service_name, byte_size, checksum,
                  created_at)
             VALUES ($1, 'a.png', 'image/png', '{\"identified\":true}', $2, $3, $4, now())",
            &[&key, &service, &(body.len() as i64), &checksum],
        )
        .await
        .unwrap();
}

/// Active Storage's `checksum`: the base64 of the MD5 of the bytes.
fn base64_md5(body: &[u8]) -> String {
    use md5::Digest;
    aws_smithy_types::base64::encode(md5::Md5::digest(body))
}

/// Keys the way Active Storage makes them: 28 lower-case letters and digits, at the
/// bucket's root.
fn key(n: usize) -> String {
    format!("{n:0>4}k2f9m3q8w7e6r5t4y3u2i1o0p")
}

/// The job's options: every blob of service `legacy` in the source bucket goes to
/// service `production` in the destination bucket, under the same key, each copy checked
/// against the blob's `checksum`.
fn job(env: &TestEnv) -> Vec<String> {
    [
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
    ]
    .into_iter()
    .map(String::from)
    .chain([
        "--source".into(),
        format!("s3://{}/", env.src_bucket),
        "--dest".into(),
        format!("s3://{}/", env.dst_bucket),
    ])
    .collect()
}

/// (key, service) of every blob, in id order.
async fn blobs(env: &TestEnv) -> Vec<(String, String)> {
    env.db()
        .await
        .query(
            "SELECT key, service_name FROM active_storage_blobs ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn body(n: usize) -> Vec<u8> {
    format!("blob {n} ").repeat(n * 31 + 1).into_bytes()
}

/// #18 item 3, on Rails' own schema (the unique index on `key`: the run finds rows by
/// key, phase 1). Five blobs of service `legacy` (one with a key under `variants/`), one
/// already `production`, one of a third service. `plan`
/// predicts `run`; the five get service `production` with the same key, their objects
/// byte-identical in the new bucket (the `checksum` column matches), their sources
/// deleted; the others and an untracked variant's object are left alone; `verify` finds
/// all in place; `rollback` returns rows and objects; the job then runs again.
#[tokio::test(flavor = "multi_thread")]
async fn blobs_move_to_the_new_service_under_the_same_key() {
    let env = TestEnv::new("active-storage").await;
    blobs_table(&env, true).await;
    let (src, dst) = (env.src_bucket.clone(), env.dst_bucket.clone());
    for n in 0..4 {
        blob(&env, &src, &key(n), "legacy", &body(n)).await;
    }
    let variant = format!("variants/{}/4f6b2c", key(0));
    blob(&env, &src, &variant, "legacy", &body(9)).await;
    blob(&env, &dst, &key(5), "production", &body(5)).await;
    blob(&env, &src, &key(6), "mirror", &body(6)).await;
    // A variant Active Storage made without tracking it: an object at
    // variants/<blob key>/<digest>, no row.
    let untracked = format!("variants/{}/9d8e7f", key(1));
    env.s3
        .ep()
        .put(&src, &untracked, b"untracked".to_vec(), "image/png")
        .await
        .unwrap();
    let before = blobs(&env).await;

    planned(&env, &job(&env), 0);
    assert_eq!(blobs(&env).await, before, "plan changed nothing");
    reported(&env, &job(&env), 0);
    let predicted = read_outcomes(&env.path("plan.csv"));
    let outcomes = read_outcomes(&env.path("run.csv"));
    assert_eq!(predicted, outcomes, "plan predicts run");
    assert_eq!(outcomes.len(), 5, "{outcomes:?}");
    assert!(outcomes.values().all(|(o, _)| o == "moved"), "{outcomes:?}");

    let after = blobs(&env).await;
    for (i, ((k0, s0), (k1, s1))) in before.iter().zip(&after).enumerate() {
        assert_eq!(k0, k1, "the key stays");
        let want = if s0 == "legacy" { "production" } else { s0 };
        assert_eq!(s1, want, "blob {}", i + 1);
    }
    let db = env.db().await;
    for r in db
        .query(
            "SELECT key, checksum FROM active_storage_blobs WHERE service_name = 'production'",
            &[],
        )
        .await
        .unwrap()
    {
        let (k, checksum): (String, String) = (r.get(0), r.get(1));
        let bytes = env.s3.ep().get_bytes(&dst, &k).await.unwrap();
        assert_eq!(
            base64_md5(&bytes),
            checksum,
            "{k}: the blob's checksum holds"
        );
    }
    let mut left = env.keys(&src, "").await;
    left.sort();
    assert_eq!(
        left,
        [key(6), untracked.clone()],
        "sources deleted; others kept"
    );

    exits(
        env.cmd()
            .arg("verify")
            .args(job(&env))
            .args(["--out", &env.path("verify.csv")]),
        0,
    );

    exits(
        env.cmd()
            .arg("rollback")
            .args(job(&env))
            .args(["--report", &env.path("back.csv")]),
        0,
    );
    assert_eq!(blobs(&env).await, before, "rollback returns every row");
    for (n, k) in [(0, key(0)), (1, key(1)), (9, variant.clone())] {
        let bytes = env.s3.ep().get_bytes(&src, &k).await.unwrap();
        assert_eq!(bytes, body(n), "{k} back in the old bucket");
    }
    let mut made = env.keys(&dst, "").await;
    made.sort();
    assert_eq!(made, [key(5)], "rollback removed its copies");

    let again = env.cmd().arg("run").args(job(&env)).output().unwrap();
    assert_eq!(again.status.code(), Some(0));
    assert_eq!(
        blobs(&env).await,
        after,
        "the job runs again after a rollback"
    );
}

/// Without a unique index on `key` two rows may share one: a blob of a third service
/// (a mirror, whose bucket relocator does not know) holding a `legacy` blob's key keeps
/// that source object; a `production` row holding it does not. Killed with SIGKILL at
/// random moments and rerun (table swept by id: phase 2), the job converges.
#[tokio::test(flavor = "multi_thread")]
async fn a_third_service_keeps_its_key_and_kills_converge() {
    let env = TestEnv::new("active-storage-kill").await;
    blobs_table(&env, false).await;
    let (src, dst) = (env.src_bucket.clone(), env.dst_bucket.clone());
    let n = 60;
    for i in 0..n {
        blob(&env, &src, &key(i), "legacy", &body(i % 7)).await;
    }
    let db = env.db().await;
    db.execute(
        "INSERT INTO active_storage_blobs
             (key, filename, service_name, byte_size, checksum, created_at)
         SELECT key, filename, 'mirror', byte_size, checksum, now()
           FROM active_storage_blobs WHERE key = $1",
        &[&key(3)],
    )
    .await
    .unwrap();
    let kills = killed_until_done(&env, &job(&env), "4").await;
    let rows = blobs(&env).await;
    for (i, (k, s)) in rows.iter().enumerate().take(n) {
        assert_eq!((k, s.as_str()), (&key(i), "production"), "blob {}", i + 1);
        let bytes = env.s3.ep().get_bytes(&dst, k).await.unwrap();
        assert_eq!(bytes, body(i % 7), "{k} byte-identical");
    }
    assert_eq!(rows[n], (key(3), "mirror".to_owned()));
    assert_eq!(
        env.keys(&src, "").await,
        [key(3)],
        "only the mirror's key is kept (after {kills} kills)"
    );
    let s = read_summary(&env.path("s.json"));
    assert_eq!(s["outcomes"]["moved"].as_u64().unwrap_or(0), 0, "{s}");
}

/// Promise 3 for this shape: the application re-points a blob at another service while
/// relocator's commit waits on the row (a row lock held by a second session). The
/// compare-and-swap covers the service too: the row is not rewritten and its objects are
/// left alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_blob_the_application_moves_meanwhile_is_left_alone() {
    let env = TestEnv::new("active-storage-cas").await;
    blobs_table(&env, true).await;
    let src = env.src_bucket.clone();
    for n in 0..3 {
        blob(&env, &src, &key(n), "legacy", &body(n)).await;
    }
    run_while_the_application_writes(
        &env,
        &job(&env),
        "UPDATE active_storage_blobs SET service_name = 'archive' WHERE id = 2",
    )
    .await;
    let outcomes = read_outcomes(&env.path("run.csv"));
    assert_eq!(outcomes["2"].0, "changed_by_app", "{outcomes:?}");
    assert_eq!(
        blobs(&env).await,
        [
            (key(0), "production".to_owned()),
            (key(1), "archive".to_owned()),
            (key(2), "production".to_owned()),
        ]
    );
    assert_eq!(env.keys(&src, "").await, [key(1)], "its source is kept");
    // The copy made for it stays: a row of a service relocator does not know the bucket
    // of holds its key, and might use it.
    let mut made = env.keys(&env.dst_bucket, "").await;
    made.sort();
    assert_eq!(made, [key(0), key(1), key(2)]);
}

/// Bad combinations of the service options: exit 2, nothing changed.
#[tokio::test(flavor = "multi_thread")]
async fn service_options_that_make_the_job_ambiguous_are_refused() {
    let env = TestEnv::new("active-storage-usage").await;
    blobs_table(&env, true).await;
    blob(&env, &env.src_bucket, &key(0), "legacy", &body(0)).await;
    let src = format!("s3://{}/", env.src_bucket);
    let dst = format!("s3://{}/", env.dst_bucket);
    let base = ["--table", "active_storage_blobs", "--path-column", "key"];
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--source", &src, "--dest", &dst],
            "overlap", // no service column: the same key in two buckets is ambiguous
        ),
        (
            vec![
                "--service-column",
                "service_name",
                "--source-service",
                "legacy",
                "--dest-service",
                "legacy",
                "--source",
                &src,
                "--dest",
                &dst,
            ],
            "both \"legacy\"",
        ),
        (
            vec![
                "--service-column",
                "service_name",
                "--source-service",
                "legacy",
                "--dest-service",
                "production",
                "--source",
                &src,
                "--dest",
                &format!("s3://{}/new/", env.src_bucket),
            ],
            "overlap", // one bucket: the service column does not tell it apart
        ),
        (
            vec![
                "--service-column",
                "service",
                "--source-service",
                "legacy",
                "--dest-service",
                "production",
                "--source",
                &src,
                "--dest",
                &dst,
            ],
            "no column \"service\"",
        ),
    ]
    .into_iter()
    .map(|(a, m)| (a.into_iter().map(String::from).collect(), m))
    .collect();
    for (args, says) in cases {
        let out = env
            .cmd()
            .arg("run")
            .args(base)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?} says {says:?}: {err}");
    }
    // A service value with spaces around it is no service name.
    let out = env
        .cmd()
        .arg("run")
        .args(base)
        .args([
            "--service-column",
            "service_name",
            "--source-service",
            "legacy",
        ])
        .args([
            "--dest-service",
            " production",
            "--source",
            &src,
            "--dest",
            &dst,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // Under a nondeterministic collation `legacy` would select `Legacy` rows too.
    let db = env.db().await;
    db.batch_execute(
        "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
         ALTER TABLE active_storage_blobs ALTER COLUMN service_name TYPE varchar COLLATE ci",
    )
    .await
    .unwrap();
    let out = env
        .cmd()
        .arg("run")
        .args(base)
        .args([
            "--service-column",
            "service_name",
            "--source-service",
            "legacy",
        ])
        .args([
            "--dest-service",
            "production",
            "--source",
            &src,
            "--dest",
            &dst,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("nondeterministic"), "{err}");
    // clap: one of the three without the others.
    let out = env
        .cmd()
        .arg("run")
        .args(base)
        .args(["--service-column", "service_name", "--source", &src])
        .args(["--dest", &dst])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        blobs(&env).await,
        [(key(0), "legacy".to_owned())],
        "nothing changed"
    );
    assert_eq!(env.keys(&env.dst_bucket, "").await, Vec::<String>::new());
}

/// #18 item 3, the `checksum`: a blob whose object is no longer the bytes Active Storage
/// stored (replaced behind its back) is `checksum_mismatch` in `plan` and `run`: not
/// rewritten, its source kept, the copy made for it taken back. The other blob moves.
#[tokio::test(flavor = "multi_thread")]
async fn a_blob_whose_bytes_do_not_match_its_checksum_is_left_alone() {
    let env = TestEnv::new("active-storage-md5").await;
    blobs_table(&env, true).await;
    let src = env.src_bucket.clone();
    for n in 0..3 {
        blob(&env, &src, &key(n), "legacy", &body(n)).await;
    }
    env.s3
        .ep()
        .put(
            &src,
            &key(1),
            b"not what was uploaded".to_vec(),
            "image/png",
        )
        .await
        .unwrap();
    // Large enough to be copied in parts (so the copy's ETag is no MD5), uploaded in one
    // (so the source's is): checked against the source's.
    env.s3
        .ep()
        .put(&src, &key(2), vec![7u8; 6 << 20], "image/png")
        .await
        .unwrap();
    // moto answers a copy made in parts with a checksum that is not the object's (a
    // 4-byte value labelled CRC64NVME), which relocator does not take as confirmed: on
    // moto the object is copied in one request.
    let parts: &[&str] = if common::on_moto() {
        &[]
    } else {
        &["--multipart-threshold", "5MiB", "--part-size", "5MiB"]
    };
    exits(
        env.cmd()
            .arg("plan")
            .args(job(&env))
            .args(parts)
            .args(["--out", &env.path("plan.csv")]),
        3,
    );
    exits(
        env.cmd()
            .arg("run")
            .args(job(&env))
            .args(parts)
            .args(["--report", &env.path("run.csv")]),
        3,
    );
    let predicted = read_outcomes(&env.path("plan.csv"));
    let outcomes = read_outcomes(&env.path("run.csv"));
    assert_eq!(outcomes["1"].0, "moved", "{outcomes:?}");
    assert_eq!(outcomes["2"].0, "checksum_mismatch", "{outcomes:?}");
    assert_eq!(outcomes["3"].0, "checksum_mismatch", "{outcomes:?}");
    assert_eq!(predicted, outcomes, "plan predicts run");
    assert_eq!(
        blobs(&env).await,
        [
            (key(0), "production".to_owned()),
            (key(1), "legacy".to_owned()),
            (key(2), "legacy".to_owned()),
        ]
    );
    let mut kept = env.keys(&src, "").await;
    kept.sort();
    assert_eq!(kept, [key(1), key(2)], "their sources are kept");
    assert_eq!(
        env.keys(&env.dst_bucket, "").await,
        [key(0)],
        "the copies made for them were taken back"
    );

    // verify checks the checksum of the rows it finds moved.
    env.db()
        .await
        .execute(
            "UPDATE active_storage_blobs SET checksum = $1 WHERE id = 1",
            &[&base64_md5(b"something else")],
        )
        .await
        .unwrap();
    let verify = env
        .cmd()
        .arg("verify")
        .args(job(&env))
        .args(["--out", &env.path("verify.csv")])
        .output()
        .unwrap();
    let found = std::fs::read_to_string(env.path("verify.csv")).unwrap();
    assert_ne!(verify.status.code(), Some(0), "{found}");
    assert!(found.contains("checksum_mismatch"), "{found}");
}

/// Promise 3 with `--checksum-column`, from the service-shape review: the application
/// replaces a blob's bytes and its checksum while relocator's commit waits on the row.
/// The commit's compare-and-swap guards the checksum it read too: the row is
/// `changed_by_app`, left alone, and the new upload is kept. On the code before, the row
/// was rewritten to a copy of the old bytes under the new checksum.
#[tokio::test(flavor = "multi_thread")]
async fn a_checksum_the_application_changes_meanwhile_is_guarded() {
    let env = TestEnv::new("active-storage-cas-md5").await;
    blobs_table(&env, true).await;
    let src = env.src_bucket.clone();
    for n in 0..2 {
        blob(&env, &src, &key(n), "legacy", &body(n)).await;
    }
    let mut app = env.db().await;
    let tx = app.transaction().await.unwrap();
    tx.execute(
        "UPDATE active_storage_blobs SET checksum = $1 WHERE id = 2",
        &[&base64_md5(b"new bytes")],
    )
    .await
    .unwrap();
    let child = env
        .cmd()
        .arg("run")
        .args(job(&env))
        .args(["--report", &env.path("run.csv")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    until_a_session_waits_for_a_lock(&env).await;
    env.s3
        .ep()
        .put(&src, &key(1), b"new bytes".to_vec(), "image/png")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outcomes = read_outcomes(&env.path("run.csv"));
    assert_eq!(outcomes["2"].0, "changed_by_app", "{outcomes:?}");
    assert_eq!(
        blobs(&env).await,
        [
            (key(0), "production".to_owned()),
            (key(1), "legacy".to_owned()),
        ]
    );
    assert_eq!(
        env.s3.ep().get_bytes(&src, &key(1)).await.unwrap(),
        b"new bytes",
        "the application's upload is kept"
    );
}

/// A job that puts a service in another bucket than an earlier run on the table did is
/// ambiguous (the cleanup trusts that a service names one bucket): refused, exit 2.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_an_earlier_run_put_in_another_bucket_is_refused() {
    let env = TestEnv::new("active-storage-agree").await;
    blobs_table(&env, true).await;
    blob(&env, &env.src_bucket, &key(0), "legacy", &body(0)).await;
    let out = env.cmd().arg("run").args(job(&env)).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    // `production` is in the destination bucket; this job says it is in the source's.
    let out = env
        .cmd()
        .arg("run")
        .args([
            "--table",
            "active_storage_blobs",
            "--path-column",
            "key",
            "--service-column",
            "service_name",
            "--source-service",
            "production",
            "--dest-service",
            "archive",
        ])
        .args(["--source", &format!("s3://{}/", env.src_bucket)])
        .args(["--dest", &format!("s3://{}/", env.dst_bucket)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("\"production\" in bucket"), "{err}");
    assert_eq!(blobs(&env).await, [(key(0), "production".to_owned())]);
}

/// The fixes round's review (1): rollback tried the rows the table refuses with the
/// forward rewrite's probe (`legacy` → `production`), which matches no row of a
/// rollback, so one blob the table refuses to take back made every rollback exit 1.
/// Now that blob is `rejected` and the others are rolled back.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_the_table_refuses_for_one_blob_rolls_back_the_others() {
    let env = TestEnv::new("active-storage-back").await;
    blobs_table(&env, true).await;
    let src = env.src_bucket.clone();
    for n in 0..3 {
        blob(&env, &src, &key(n), "legacy", &body(n)).await;
    }
    let out = env.cmd().arg("run").args(job(&env)).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    env.db()
        .await
        .batch_execute(&format!(
            "CREATE FUNCTION no_way_back() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.key = '{}' AND NEW.service_name = 'legacy' THEN
                     RAISE EXCEPTION 'this blob may not go back';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER no_way_back BEFORE UPDATE ON active_storage_blobs
                 FOR EACH ROW EXECUTE FUNCTION no_way_back();",
            key(1)
        ))
        .await
        .unwrap();
    exits(
        env.cmd()
            .arg("rollback")
            .args(job(&env))
            .args(["--report", &env.path("back.csv")]),
        3,
    );
    let outcomes = read_outcomes(&env.path("back.csv"));
    assert_eq!(outcomes["2"].0, "rejected", "{outcomes:?}");
    assert_eq!(
        blobs(&env).await,
        [
            (key(0), "legacy".to_owned()),
            (key(1), "production".to_owned()),
            (key(2), "legacy".to_owned()),
        ]
    );
    for n in [0, 2] {
        assert_eq!(env.s3.ep().get_bytes(&src, &key(n)).await.unwrap(), body(n));
    }
}

/// The fixes round's review (3): two jobs putting `production` in different buckets,
/// started together, both passed the check of earlier runs (made before either had
/// registered) and both ran, splitting the blobs across two buckets. The check is made
/// again inside the registration, one job at a time per table: the second is refused.
/// The interleaving is forced: the ledger's runs table is locked until both have passed
/// the first check.
#[tokio::test(flavor = "multi_thread")]
async fn two_jobs_putting_a_service_in_two_buckets_cannot_both_start() {
    let env = TestEnv::new("active-storage-race").await;
    blobs_table(&env, true).await;
    for n in 0..4 {
        blob(&env, &env.src_bucket, &key(n), "legacy", &body(n)).await;
    }
    // The ledger, made by a job on another table.
    let db = env.db().await;
    db.batch_execute("CREATE TABLE other (id int PRIMARY KEY, path text)")
        .await
        .unwrap();
    let out = env
        .cmd()
        .args(["run", "--table", "other", "--source", &env.source()])
        .args(["--dest", &env.dest()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let third = format!("{}-third", env.name);
    env.s3.create_bucket().bucket(&third).send().await.unwrap();

    let mut hold = env.db().await;
    let tx = hold.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE relocator.runs IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let start = |dest: String| {
        env.cmd()
            .arg("run")
            .args([
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
            ])
            .args(["--source", &format!("s3://{}/", env.src_bucket)])
            .args(["--dest", &dest])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let x = start(format!("s3://{}/", env.dst_bucket));
    let y = start(format!("s3://{third}/"));
    // Both past the check at their start, waiting to register.
    let started = Instant::now();
    loop {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type IN ('Lock')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n >= 2 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "both wait");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tx.commit().await.unwrap();
    let (x, y) = (x.wait_with_output().unwrap(), y.wait_with_output().unwrap());
    let mut codes = [x.status.code(), y.status.code()];
    codes.sort();
    assert_eq!(
        codes,
        [Some(0), Some(2)],
        "one runs, the other is refused: {} / {}",
        String::from_utf8_lossy(&x.stderr),
        String::from_utf8_lossy(&y.stderr)
    );
    let refused = if x.status.code() == Some(2) { &x } else { &y };
    assert!(String::from_utf8_lossy(&refused.stderr).contains("in bucket"));
    let in_dst = env.keys(&env.dst_bucket, "").await.len();
    let in_third = env.keys(&third, "").await.len();
    assert!(
        (in_dst, in_third) == (4, 0) || (in_dst, in_third) == (0, 4),
        "every blob in one bucket: {in_dst} / {in_third}"
    );
}
