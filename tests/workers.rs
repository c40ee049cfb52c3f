//! Many workers on one table: processes and threads share a run through leases, no row
//! is processed twice, a killed worker's lease is finished by another; and the request
//! rate cap holds.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{read_outcomes, TestEnv};

async fn ledger_i64(env: &TestEnv, sql: &str) -> i64 {
    env.db().await.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_with_two_workers_each_share_the_table_without_double_processing() {
    let env = TestEnv::new("workers").await;
    let seeded = env.seed(3000, 0).await;
    let spawn = |n: usize| {
        env.run_cmd(&[
            "--workers",
            "2",
            "--batch-size",
            "50",
            "--report",
            &env.path(&format!("r{n}.csv")),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let (a, b) = (spawn(1), spawn(2));
    for p in [a, b] {
        let out = p.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    env.assert_converged(&seeded).await;

    let moves = ledger_i64(&env, "SELECT count(*) FROM relocator.moves").await;
    let distinct = ledger_i64(&env, "SELECT count(DISTINCT row_id) FROM relocator.moves").await;
    assert_eq!(
        (moves, distinct),
        (3000, 3000),
        "every row rewritten exactly once"
    );
    let owners = ledger_i64(&env, "SELECT count(DISTINCT owner) FROM relocator.leases").await;
    assert!(
        owners >= 3,
        "the work was shared: {owners} workers took leases"
    );
    let (r1, r2) = (
        read_outcomes(&env.path("r1.csv")),
        read_outcomes(&env.path("r2.csv")),
    );
    assert!(
        !r1.is_empty() && !r2.is_empty(),
        "both processes did part of the work"
    );
    for (id, (outcome, _)) in r1.iter().chain(r2.iter()) {
        assert_eq!(outcome, "moved", "row {id}");
    }
    assert_eq!(r1.len() + r2.len(), 3000, "no row reported by both");
}

#[tokio::test(flavor = "multi_thread")]
// A panic in the loop ends the test process; the child is killed or reaped with it.
#[allow(clippy::zombie_processes)]
async fn a_killed_workers_lease_is_finished_by_another() {
    let env = TestEnv::new("takeover").await;
    let seeded = env.seed(600, 0).await;
    // A slow worker (rate-capped, 20-key leases): kill it while it holds a lease it has
    // not finished. If the kill lands just after a commit, try again with a new one.
    let db = env.db().await;
    let started = Instant::now();
    let mut found = None;
    while found.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "never caught a worker mid-lease"
        );
        let mut slow = env
            .run_cmd(&["--batch-size", "20", "--max-rps", "25"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        loop {
            let moved: i64 = db
                .query_one("SELECT count(*) FROM relocator.moves", &[])
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            let open = if moved >= 40 {
                db.query_opt(
                    "SELECT lease_id, owner FROM relocator.leases WHERE NOT done ORDER BY lease_id LIMIT 1",
                    &[],
                )
                .await
                .unwrap()
            } else {
                None
            };
            if let Some(r) = open {
                slow.kill().unwrap();
                slow.wait().unwrap();
                let id: i64 = r.get(0);
                let still: bool = db
                    .query_one(
                        "SELECT NOT done FROM relocator.leases WHERE lease_id = $1",
                        &[&id],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if still {
                    found = Some((id, r.get::<_, String>(1)));
                }
                break;
            }
            if started.elapsed() > Duration::from_secs(120) {
                slow.kill().ok();
                slow.wait().ok();
                panic!("the slow worker made no progress");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (lease, owner) = found.unwrap();

    let out = env.run_cmd(&[]).env("RUST_LOG", "info").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("took over a lease"), "{err}");
    let r = env
        .db()
        .await
        .query_one(
            "SELECT owner, done FROM relocator.leases WHERE lease_id = $1",
            &[&lease],
        )
        .await
        .unwrap();
    let (new_owner, done): (String, bool) = (r.get(0), r.get(1));
    assert_ne!(new_owner, owner, "the lease changed hands");
    assert!(done, "and was finished");
    env.assert_converged(&seeded).await;
    let twice = ledger_i64(
        &env,
        "SELECT count(*) FROM (SELECT row_id FROM relocator.moves GROUP BY 1 HAVING count(*) > 1) d",
    )
    .await;
    assert_eq!(twice, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn max_rps_caps_the_request_rate() {
    let env = TestEnv::new("maxrps").await;
    let seeded = env.seed(60, 0).await;
    let started = Instant::now();
    let (code, err) = env.run(&["--max-rps", "20", "--summary-json", &env.path("s.json")]);
    let took = started.elapsed();
    assert_eq!(code, 0, "{err}");
    let s = common::read_summary(&env.path("s.json"));
    let requests =
        s["counters"]["s3_reads"].as_u64().unwrap() + s["counters"]["s3_writes"].as_u64().unwrap();
    assert!(
        requests >= 60,
        "at least one request per object: {requests}"
    );
    // At 20 requests per second, R requests cannot take less than (R - 1) / 20 seconds.
    let floor = Duration::from_secs_f64((requests - 1) as f64 / 20.0);
    assert!(
        took >= floor,
        "{requests} requests at 20/s took only {took:?}"
    );
    env.assert_converged(&seeded).await;
}
