//! PostgreSQL faults against the real stack: relocator's backends terminated
//! (`pg_terminate_backend`) at random moments of a run and in the middle of its commit
//! statement. Zero loss, no source deleted for an uncommitted rewrite (no row ever points
//! at a missing object), and a rerun completes with nothing done twice.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::TestEnv;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Terminate every backend of the test's database except `own`.
async fn terminate_all(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn backends_terminated_at_random_moments_lose_nothing() {
    let env = TestEnv::new("pg-terminate").await;
    let seeded = env.seed(2000, 0).await;
    let killer = env.db().await;
    let mut rng = StdRng::seed_from_u64(0x7e57);
    let mut cut = 0;
    for _ in 0..8 {
        let mut child = env
            .run_cmd(&[
                "--batch-size",
                "40",
                "--concurrency",
                "16",
                "--max-rps",
                "300",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..900))).await;
        // Cut its sessions until it gives up (a run may lose one and finish its batch on
        // the others first).
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "the run did not stop without its database"
            );
            terminate_all(&killer).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        match status.code() {
            Some(0) => break, // it finished before the cut
            Some(1) => cut += 1,
            other => panic!("a lost database connection must exit 1, got {other:?}"),
        }
        env.assert_no_row_dangles().await;
    }
    assert!(cut >= 6, "only {cut} runs were cut before the job finished");
    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    env.assert_converged(&seeded).await;
    env.assert_ledger_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_terminated_inside_its_commit_statement_rewrites_nothing_of_that_batch() {
    let env = TestEnv::new("pg-commit").await;
    let seeded = env.seed(1200, 0).await;
    let admin = env.db().await;
    let mut hits = 0;
    for round in 0..4 {
        // Hold one not-yet-moved row: the commit statement of the batch that holds it
        // blocks inside its UPDATE (earlier rows of the batch already updated in its
        // transaction), and is terminated right there.
        let mut locker = env.db().await;
        let tx = locker.transaction().await.unwrap();
        let target: Option<i32> = tx
            .query_opt(
                "SELECT id FROM avatars WHERE path LIKE 'image/%'
                  ORDER BY path COLLATE \"C\" OFFSET 150 LIMIT 1 FOR UPDATE",
                &[],
            )
            .await
            .unwrap()
            .map(|r| r.get(0));
        let Some(target) = target else { break };
        let before: String = tx
            .query_one("SELECT path FROM avatars WHERE id = $1", &[&target])
            .await
            .unwrap()
            .get(0);
        let mut child = env
            .run_cmd(&["--batch-size", "100"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut terminated = false;
        while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            let n: i64 = admin
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                      WHERE datname = current_database() AND state = 'active'
                        AND wait_event_type = 'Lock'
                        AND query LIKE '%UPDATE relocator.leases SET last_id%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if n > 0 {
                terminated = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            terminated,
            "round {round}: the commit never blocked on the held row"
        );
        hits += 1;
        let status = child.wait().unwrap();
        assert_eq!(
            status.code(),
            Some(1),
            "round {round}: exit 1, rerun to resume"
        );
        tx.rollback().await.unwrap();
        // Nothing of the terminated batch was committed: the held row is unchanged, no
        // ledger row names it, and its object is still at the old key.
        let after: String = admin
            .query_one("SELECT path FROM avatars WHERE id = $1", &[&target])
            .await
            .unwrap()
            .get(0);
        assert_eq!(after, before, "round {round}");
        let ledgered: i64 = admin
            .query_one(
                "SELECT count(*) FROM relocator.moves WHERE row_id = $1",
                &[&target.to_string()],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(ledgered, 0, "round {round}");
        env.assert_no_row_dangles().await;
    }
    assert_eq!(hits, 4);
    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    env.assert_converged(&seeded).await;
    env.assert_ledger_clean().await;
}
