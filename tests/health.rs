//! Throttling on the database's health, against the stack's streaming replica: replay is
//! held back on the replica (`pg_wal_replay_pause()`) until its lag is over
//! `--max-replica-lag`; while it is, the run rewrites no row, deletes nothing and copies
//! at most one batch ahead, says so (log, `status`); once replay resumes it ends in the
//! exact final state.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{connect, url_for_db, var, TestEnv};

const BATCH: usize = 20;

fn replica_url(db: &str) -> String {
    let mut u = url::Url::parse(&url_for_db(&var("DATABASE_URL"), db)).unwrap();
    u.set_port(Some(var("RELOCATOR_TEST_REPLICA_PORT").parse().unwrap()))
        .unwrap();
    u.to_string()
}

/// The replica's replay, paused for as long as this lives.
struct Paused(tokio_postgres::Client);

impl Paused {
    async fn start() -> Paused {
        let c = connect(&replica_url("postgres")).await;
        c.batch_execute("SELECT pg_wal_replay_pause()")
            .await
            .unwrap();
        Paused(c)
    }

    async fn resume(self) {
        self.0
            .batch_execute("SELECT pg_wal_replay_resume()")
            .await
            .unwrap();
    }
}

/// The largest lag the primary reports for its replicas, in seconds.
async fn primary_lag(db: &tokio_postgres::Client) -> f64 {
    db.query_one(
        "SELECT coalesce(max(extract(epoch FROM greatest(write_lag, flush_lag, replay_lag))), 0)::float8
           FROM pg_stat_replication",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

async fn waits_while_the_replica_lags(env: &TestEnv, extra: &[&str]) {
    let seeded = env.seed(120, 0).await;
    let db = env.db().await;
    let paused = Paused::start().await;
    // WAL the replica receives but does not replay, until the lag is over the limit.
    db.batch_execute("CREATE TABLE lag_noise AS SELECT 1 AS x")
        .await
        .unwrap();
    if extra.is_empty() {
        let t = Instant::now();
        while primary_lag(&db).await <= 1.5 {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the primary never reported the paused replica's lag"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    } else {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let err_path = env.path("run.err");
    let mut child = env
        .cmd()
        .env("RUST_LOG", "info")
        .args(["run", "--source", &env.source(), "--dest", &env.dest()])
        .args([
            "--batch-size",
            &BATCH.to_string(),
            "--max-replica-lag",
            "1s",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run ended while the replica lagged: {}",
        std::fs::read_to_string(&err_path).unwrap()
    );
    let rows = env.rows().await;
    assert!(
        rows.iter().all(|(_, p)| p.starts_with("image/")),
        "a row was rewritten while the replica lagged"
    );
    let copies = env.keys(&env.dst_bucket, "avatar/").await.len();
    assert!(
        copies <= BATCH,
        "{copies} copies made ahead (one batch is {BATCH})"
    );
    let status = env
        .cmd()
        .args(["status", "--source", &env.source(), "--dest", &env.dest()])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.contains("WAITING") && status.contains("replica lag"),
        "status says nothing of the wait: {status}"
    );

    paused.resume().await;
    let t = Instant::now();
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the run did not go on once replay resumed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let err = std::fs::read_to_string(&err_path).unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("database under stress") && err.contains("replica lag"),
        "no log line says why the run waited: {err}"
    );
    assert!(err.contains("database healthy again"), "{err}");
    assert!(
        !err.contains(":relocator@"),
        "a password-bearing URL leaked: {err}"
    );
    env.assert_converged(&seeded).await;
    let status = env
        .cmd()
        .args(["status", "--source", &env.source(), "--dest", &env.dest()])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&status.stdout).contains("WAITING"));
}

/// One test for both ways of reading the lag: they pause the one replica in turn.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_waits_while_a_replica_lags_and_goes_on_when_it_catches_up() {
    // Read on the primary (pg_stat_replication).
    let env = TestEnv::new("replica-lag").await;
    waits_while_the_replica_lags(&env, &[]).await;
    // Read on the replica itself.
    let env = TestEnv::new("replica-lag-url").await;
    let url = replica_url(env.database_url.rsplit('/').next().unwrap());
    waits_while_the_replica_lags(&env, &["--replica-url", &url]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_url_that_is_no_replica_is_refused_before_anything_changes() {
    let env = TestEnv::new("replica-not").await;
    env.seed(5, 0).await;
    let out = env
        .cmd()
        .args(["run", "--source", &env.source(), "--dest", &env.dest()])
        .args([
            "--max-replica-lag",
            "10s",
            "--replica-url",
            &env.database_url,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is not a replica"), "{err}");
    assert!(!err.contains(":relocator@"), "the password leaked: {err}");
    let ledger: bool = env
        .db()
        .await
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'relocator')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!ledger, "the ledger was created by a refused run");
    assert!(env
        .rows()
        .await
        .iter()
        .all(|(_, p)| p.starts_with("image/")));
}
