//! PostgreSQL restarted in the middle of a run (fast shutdown: every session is cut).
//! Alone in its own test binary, because the restart cuts every test's sessions; cargo
//! runs test binaries one after another.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::TestEnv;

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarted_mid_run_loses_nothing_and_the_rerun_completes() {
    let env = TestEnv::new("pg-restart").await;
    let seeded = env.seed(2000, 0).await;
    let mut child = env
        .run_cmd(&[
            "--batch-size",
            "40",
            "--concurrency",
            "8",
            "--max-rps",
            "400",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Restart once some batches have committed (on a loaded machine that takes a while).
    let start = std::time::Instant::now();
    loop {
        if moved(&env).await > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no batch committed within a minute"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run finished before the restart; slow it down"
    );
    let stack = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack.sh");
    let restart = Command::new(stack).arg("pg-restart").output().unwrap();
    assert!(
        restart.status.success(),
        "{}",
        String::from_utf8_lossy(&restart.stderr)
    );
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit 1 after losing the database: {err}"
    );
    assert!(err.contains("rerun"), "{err}");

    env.assert_no_row_dangles().await;
    let moved = moved(&env).await;
    assert!(
        moved > 0 && moved < 2000,
        "the restart landed mid-run ({moved} moved)"
    );
    let (code, err) = env.run(&["--summary-json", &env.path("rerun.json")]);
    assert_eq!(code, 0, "{err}");
    env.assert_converged(&seeded).await;
    let s = common::read_summary(&env.path("rerun.json"));
    assert_eq!(
        s["outcomes"]["moved"].as_i64().unwrap(),
        2000 - moved,
        "the rerun moved exactly the rows left, none twice"
    );
}

/// Rows rewritten so far.
async fn moved(env: &TestEnv) -> i64 {
    env.db()
        .await
        .query_one(
            "SELECT count(*) FROM avatars WHERE path LIKE 'avatar/%'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}
