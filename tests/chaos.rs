//! Crashes and a live application, against the real binary and the real stack.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::ClientExt;

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::Duration;

use common::TestEnv;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_moments_then_rerun_converges_with_nothing_done_twice() {
    let env = TestEnv::new("kill9").await;
    let seeded = env.seed(2000, 0).await;
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut kills = 0;
    // --max-rps stretches the job so that 20+ kills land at random moments across all of
    // it: planning, copying, committing, deleting.
    for _ in 0..30 {
        let mut child = env
            .run_cmd(&[
                "--batch-size",
                "40",
                "--concurrency",
                "16",
                "--max-rps",
                "250",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn relocator");
        tokio::time::sleep(Duration::from_millis(rng.random_range(40..400))).await;
        if child.try_wait().unwrap().is_some() {
            break; // finished before the kill
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        env.assert_no_row_dangles().await;
    }
    assert!(
        kills >= 20,
        "only {kills} kills landed before the job finished"
    );

    let (code, err) = env.run(&["--summary-json", &env.path("final.json")]);
    assert_eq!(code, 0, "{err}");
    env.assert_converged(&seeded).await;

    env.assert_ledger_clean().await;
}

/// While the job runs, "the application" rewrites 10% of the rows to new uploads (some
/// back under image/, some already under avatar/). No application write is lost and
/// every row ends up pointing at an existing object with the application's bytes.
#[tokio::test(flavor = "multi_thread")]
async fn live_application_writes_are_never_lost() {
    let env = TestEnv::new("live").await;
    let seeded = env.seed(2000, 0).await;
    let mut child = env
        .run_cmd(&["--batch-size", "40", "--concurrency", "8"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn relocator");

    let db = env.db().await;
    let mut rng = StdRng::seed_from_u64(11);
    let mut app: HashMap<i32, String> = HashMap::new();
    while app.len() < 200 {
        let id: i32 = rng.random_range(1..=2000);
        if app.contains_key(&id) {
            continue;
        }
        let (bucket, key) = if app.len().is_multiple_of(2) {
            (&env.src_bucket, format!("image/app-upload-{id}.png"))
        } else {
            (&env.dst_bucket, format!("avatar/app-upload-{id}.png"))
        };
        env.s3
            .ep()
            .put(bucket, &key, format!("app-{id}").into_bytes(), "image/png")
            .await
            .unwrap();
        db.execute("UPDATE avatars SET path = $1 WHERE id = $2", &[&key, &id])
            .await
            .unwrap();
        app.insert(id, key);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = child.wait().unwrap();
    assert!(
        matches!(status.code(), Some(0) | Some(3)),
        "first run: {status:?}"
    );
    // Uploads the scan had already passed are picked up by a rerun.
    let (code, err) = env.run(&["--report", &env.path("r2.csv")]);
    assert_eq!(code, 0, "{err}");

    for (id, path) in env.rows().await {
        let bytes = env
            .s3
            .ep()
            .get_bytes(env.bucket_of(&path), &path)
            .await
            .unwrap_or_else(|e| panic!("row {id} points at a missing object {path}: {e:#}"));
        match app.get(&id) {
            Some(written) => {
                let relocated = written.replacen("image/", "avatar/", 1);
                assert!(
                    path == *written || path == relocated,
                    "row {id}: the application wrote {written}, the row holds {path}"
                );
                assert_eq!(bytes, format!("app-{id}").into_bytes(), "row {id}");
            }
            None => {
                let s = &seeded[(id - 1) as usize];
                assert_eq!(path, s.path.replacen("image/", "avatar/", 1), "row {id}");
                assert_eq!(
                    bytes,
                    relocator::commands::seed::object_bytes(env.seed, &s.path, &(100..4096)),
                    "row {id}"
                );
            }
        }
    }
}

/// SIGTERM: the batch in hand is finished or dropped, exit 130; the rerun completes and
/// copies nothing that was already copied and committed.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_with_130_and_the_rerun_recopies_nothing() {
    let env = TestEnv::new("sigterm").await;
    let seeded = env.seed(1500, 0).await;
    let child = env
        .run_cmd(&["--batch-size", "50", "--summary-json", &env.path("s1.json")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Signal once at least one batch has committed (the ledger has rows), whatever the
    // machine's speed.
    let db = env.db().await;
    for _ in 0..600 {
        let n = db
            .query_one("SELECT count(*) FROM relocator.moves", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0);
        if n > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("rerun"), "{err}");
    let s1 = common::read_summary(&env.path("s1.json"));
    assert_eq!(s1["interrupted"], true);
    let moved1 = s1["outcomes"]["moved"].as_u64().unwrap_or(0);
    assert!(moved1 > 0 && moved1 < 1500, "interrupted mid-way: {moved1}");
    env.assert_no_row_dangles().await;

    let (code, err) = env.run(&["--summary-json", &env.path("s2.json")]);
    assert_eq!(code, 0, "{err}");
    let s2 = common::read_summary(&env.path("s2.json"));
    env.assert_converged(&seeded).await;
    let distinct: HashSet<&str> = seeded.iter().map(|r| r.path.as_str()).collect();
    let copies = s1["counters"]["s3_copies"].as_u64().unwrap()
        + s2["counters"]["s3_copies"].as_u64().unwrap();
    assert!(
        copies <= distinct.len() as u64,
        "{copies} copies for {} objects: something was copied twice",
        distinct.len()
    );
    assert_eq!(moved1 + s2["outcomes"]["moved"].as_u64().unwrap(), 1500);
}
