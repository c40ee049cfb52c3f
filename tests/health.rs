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

/// The tests take turns: those that pause the one replica, and the one that measures the
/// cluster's WAL (which the others' would add to).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

/// What `relocator status` prints for the test's job.
fn status(env: &TestEnv) -> String {
    let out = env
        .cmd()
        .args(["status", "--source", &env.source(), "--dest", &env.dest()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    let shown = status(env);
    assert!(
        shown.contains("WAITING") && shown.contains("replica lag"),
        "status says nothing of the wait: {shown}"
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
    assert!(!status(env).contains("WAITING"));
}

/// One test for both ways of reading the lag: they pause the one replica in turn.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_waits_while_a_replica_lags_and_goes_on_when_it_catches_up() {
    let _turn = ONE_AT_A_TIME.lock().await;
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
    let _turn = ONE_AT_A_TIME.lock().await;
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

/// Lag the replica until the primary reports it over 1.5 s.
async fn lag(db: &tokio_postgres::Client) -> Paused {
    let paused = Paused::start().await;
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS lag_noise (x int); INSERT INTO lag_noise VALUES (1)",
    )
    .await
    .unwrap();
    let t = Instant::now();
    while primary_lag(db).await <= 1.5 {
        assert!(t.elapsed() < Duration::from_secs(30), "no lag reported");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    paused
}

/// A rerun first finishes the source cleanups an earlier, killed run left: those deletes
/// wait for the database's health too (they went ahead before). And a run stopped while
/// waiting leaves no wait behind in `status` (it showed one forever before).
#[tokio::test(flavor = "multi_thread")]
async fn earlier_cleanups_wait_too_and_a_stopped_wait_is_not_shown() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = TestEnv::new("replica-earlier").await;
    env.seed(40, 0).await;
    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    // Five moves committed whose sources were not deleted yet, as a kill leaves them.
    let db = env.db().await;
    let pending: Vec<(String, String)> = db
        .query(
            "UPDATE relocator.moves SET cleaned_at = NULL, cleanup = NULL
              WHERE move_id IN (SELECT min(move_id) FROM relocator.moves
                                 GROUP BY old_path ORDER BY 1 LIMIT 5)
              RETURNING old_path, new_path",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(pending.len(), 5);
    for (old, new) in &pending {
        env.s3
            .copy_object()
            .copy_source(format!("{}/{new}", env.dst_bucket))
            .bucket(&env.src_bucket)
            .key(old)
            .send()
            .await
            .unwrap();
    }
    let paused = lag(&db).await;
    let mut child = env
        .cmd()
        .args(["run", "--source", &env.source(), "--dest", &env.dest()])
        .args(["--max-replica-lag", "1s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let left = env.keys(&env.src_bucket, "image/").await.len();
    let shown = status(&env);
    // Stopped during the wait (SIGTERM): the wait is over, status must not show it.
    sigterm(&child);
    let code = child.wait().unwrap().code();
    let after = status(&env);
    paused.resume().await;
    assert_eq!(left, 5, "sources deleted while the replica lagged");
    assert!(shown.contains("WAITING"), "{shown}");
    assert_eq!(code, Some(130));
    assert!(
        !after.contains("WAITING"),
        "a stopped run still shown waiting: {after}"
    );
    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(env.keys(&env.src_bucket, "image/").await.is_empty());
}

fn sigterm(child: &std::process::Child) {
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// plan keeps its claims in a temporary table: a role that may not create one is told
/// so before anything is written (it got exit 1 and "rerun to resume" before).
#[tokio::test(flavor = "multi_thread")]
async fn plan_without_the_temporary_privilege_is_refused_with_the_grant() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = TestEnv::new("plan-notemp").await;
    env.seed(5, 0).await;
    let db = env.db().await;
    let dbname = env.database_url.rsplit('/').next().unwrap().to_owned();
    db.batch_execute(&format!(
        "REVOKE TEMPORARY ON DATABASE \"{dbname}\" FROM PUBLIC;
         DROP ROLE IF EXISTS \"{dbname}_nt\";
         CREATE ROLE \"{dbname}_nt\" LOGIN PASSWORD 'nt-secret';
         GRANT SELECT, UPDATE ON avatars TO \"{dbname}_nt\""
    ))
    .await
    .unwrap();
    let mut url = url::Url::parse(&env.database_url).unwrap();
    url.set_username(&format!("{dbname}_nt")).unwrap();
    url.set_password(Some("nt-secret")).unwrap();
    let out = env
        .cmd()
        .env("DATABASE_URL", url.as_str())
        .args(["plan", "--source", &env.source(), "--dest", &env.dest()])
        .args(["--out", &env.path("plan.csv")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    db.batch_execute(&format!(
        "DROP OWNED BY \"{dbname}_nt\"; DROP ROLE \"{dbname}_nt\""
    ))
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("GRANT TEMPORARY ON DATABASE"), "{err}");
    assert!(!err.contains("nt-secret"), "{err}");
    assert!(!std::path::Path::new(&env.path("plan.csv")).exists());
}

/// `--max-wal-rate` holds the run to the cluster's WAL rate given (averaged over 10 s):
/// with a tiny limit the run waits, says why, goes on, and still finishes.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_over_the_wal_rate_waits_and_still_finishes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = TestEnv::new("wal-rate").await;
    let seeded = env.seed(60, 0).await;
    let db = env.db().await;
    let before: f64 = db
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::float8", &[])
        .await
        .unwrap()
        .get(0);
    let t = Instant::now();
    let out = env
        .cmd()
        .env("RUST_LOG", "info")
        .args(["run", "--source", &env.source(), "--dest", &env.dest()])
        .args(["--batch-size", "10", "--max-wal-rate", "32KiB"])
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let after: f64 = db
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::float8", &[])
        .await
        .unwrap()
        .get(0);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("WAL written at") && err.contains("over --max-wal-rate 32.00 KiB/s"),
        "{err}"
    );
    assert!(err.contains("database healthy again"), "{err}");
    // Held to the limit on average: what the whole cluster wrote, over the run's time and
    // one window, plus the one batch a verdict lets through.
    let limit = 32.0 * 1024.0;
    assert!(
        after - before <= limit * (secs + 10.0) + 200_000.0,
        "{} bytes of WAL in {secs:.1} s",
        after - before
    );
    env.assert_converged(&seeded).await;
}
