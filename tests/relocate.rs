//! The relocation job against the real stack: happy path, attention cases, plan ==
//! run, guarded rewrite, and the committed-but-not-cleaned resume.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::ClientExt;

use std::collections::HashSet;

use common::{read_outcomes, read_summary, TestEnv};
use relocator::config::JobConfig;
use relocator::db::{Queries, Row, TableInfo};
use relocator::pipeline::commit::Committed;
use relocator::pipeline::plan::Move;

#[tokio::test(flavor = "multi_thread")]
async fn moves_2000_awkward_avatars_byte_identical_then_rerun_does_nothing() {
    let env = TestEnv::new("happy").await;
    let seeded = env.seed(2000, 0).await;
    let awkward = seeded
        .iter()
        .filter(|r| r.path.contains(' ') || r.path.contains('+') || r.path.contains('#'))
        .count();
    assert!(awkward > 50, "the seed has awkward keys");

    let (code, err) = env.run(&[
        "--batch-size",
        "300",
        "--report",
        &env.path("run.csv"),
        "--summary-json",
        &env.path("s1.json"),
    ]);
    assert_eq!(code, 0, "{err}");
    env.assert_converged(&seeded).await;

    // Content-Type survived the copy.
    let head = env
        .s3
        .head_object()
        .bucket(&env.dst_bucket)
        .key("avatar/default.png")
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_type(), Some("image/png"));

    let s1 = read_summary(&env.path("s1.json"));
    let distinct: HashSet<&str> = seeded.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        s1["counters"]["s3_copies"],
        distinct.len() as u64,
        "one copy per object"
    );
    assert_eq!(s1["outcomes"]["moved"], 2000);

    let (code, err) = env.run(&["--summary-json", &env.path("s2.json")]);
    assert_eq!(code, 0, "{err}");
    let s2 = read_summary(&env.path("s2.json"));
    assert_eq!(s2["rows_seen"], 0, "a second run finds nothing to do");
    assert_eq!(s2["counters"]["s3_copies"], 0);
}

/// Missing source, a foreign object at the destination, and two sources rewritten onto
/// one key: each reported, exit 3, nothing else disturbed — and `plan` predicted it all.
#[tokio::test(flavor = "multi_thread")]
async fn attention_cases_are_reported_and_plan_predicts_run_exactly() {
    let env = TestEnv::new("attention").await;
    let seeded = env.seed(300, 3).await;
    let db = env.db().await;
    // Two rows whose objects collide under the rewrite below.
    for k in ["image/coll-a.png", "image/coll-b.png"] {
        env.s3
            .ep()
            .put(&env.src_bucket, k, k.as_bytes().to_vec(), "image/png")
            .await
            .unwrap();
        db.execute("INSERT INTO avatars (path) VALUES ($1)", &[&k])
            .await
            .unwrap();
    }
    // A different object already where row 2 would go.
    let victim = &seeded[1].path;
    let victim_dst = format!("avatar/{}", victim.strip_prefix("image/").unwrap());
    env.s3
        .ep()
        .put(
            &env.dst_bucket,
            &victim_dst,
            b"someone else's".to_vec(),
            "text/plain",
        )
        .await
        .unwrap();
    let rewrite = [
        "--rewrite",
        r"^(?:(?P<c>coll)-[ab](?P<e>\.png)|(?P<rest>.+))$",
        "--to",
        "${c}${e}${rest}",
        "--batch-size",
        "100",
    ];

    let before = env.rows().await;
    let mut plan = env.cmd();
    plan.args(["plan", "--source", &env.source(), "--dest", &env.dest()])
        .args(["--out", &env.path("plan.csv")])
        .args(rewrite);
    let out = plan.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        env.rows().await,
        before,
        "plan changed nothing in the table"
    );
    let ledger: bool = db
        .query_one("SELECT to_regclass('relocator.moves') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!ledger, "plan created no ledger");
    assert_eq!(
        env.keys(&env.dst_bucket, "").await,
        vec![victim_dst.clone()]
    );

    let (code, err) = env.run(&[&["--report", &env.path("run.csv")][..], &rewrite[..]].concat());
    assert_eq!(code, 3, "{err}");

    let planned = read_outcomes(&env.path("plan.csv"));
    let done = read_outcomes(&env.path("run.csv"));
    assert_eq!(planned, done, "plan predicts exactly what run does");

    let count = |o: &str| done.values().filter(|(x, _)| x == o).count();
    assert_eq!(count("missing_source"), 3);
    assert_eq!(count("conflict"), 1);
    assert_eq!(count("collision"), 1);
    assert_eq!(count("moved"), 300 - 3 - 1 + 1);

    // The foreign object is untouched, its row and its source too.
    let bytes = env
        .s3
        .ep()
        .get_bytes(&env.dst_bucket, &victim_dst)
        .await
        .unwrap();
    assert_eq!(bytes, b"someone else's");
    let rows = env.rows().await;
    assert_eq!(&rows[1].1, victim);
    assert!(env
        .s3
        .ep()
        .head(&env.src_bucket, victim)
        .await
        .unwrap()
        .is_some());
    // The collision loser keeps its row and its object.
    let loser = rows
        .iter()
        .find(|(_, p)| p.starts_with("image/coll-"))
        .unwrap();
    assert!(env
        .s3
        .ep()
        .head(&env.src_bucket, &loser.1)
        .await
        .unwrap()
        .is_some());
    // Missing-source rows are unchanged.
    assert_eq!(
        rows.iter()
            .filter(|(_, p)| p.starts_with("image/missing-"))
            .count(),
        3
    );

    // After the run, plan still predicts the next run: the collision loser's destination
    // now holds the winner's object, which the ledger says was moved there by another
    // source — a collision, not a foreign object (plan said `conflict` before).
    let mut plan = env.cmd();
    plan.args(["plan", "--source", &env.source(), "--dest", &env.dest()])
        .args(["--out", &env.path("plan2.csv")])
        .args(rewrite);
    assert_eq!(plan.output().unwrap().status.code(), Some(3));
    let (code, err) = env.run(&[&["--report", &env.path("run2.csv")][..], &rewrite[..]].concat());
    assert_eq!(code, 3, "{err}");
    let planned = read_outcomes(&env.path("plan2.csv"));
    let done = read_outcomes(&env.path("run2.csv"));
    assert_eq!(planned, done, "plan predicts the second run too");
    assert_eq!(done.values().filter(|(x, _)| x == "collision").count(), 1);
}

/// The compare-and-swap: a row the application changes between copy and commit is not
/// rewritten, and is reported by the commit stage. And a worker that lost its lease
/// rewrites nothing at all.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_changed_by_the_application_is_not_rewritten() {
    let env = TestEnv::new("cas").await;
    env.seed(5, 0).await;
    let args = relocator::cli::JobArgs {
        batch_size: 10,
        ..env.job_args()
    };
    let cfg = JobConfig::from_args(&args).unwrap();
    let pool = relocator::db::pool(&cfg.database_url, 2, None).unwrap();
    let mut db = pool.get().await.unwrap();
    relocator::ledger::ensure(&mut db).await.unwrap();
    let table = TableInfo::resolve(&db, &cfg).await.unwrap();
    let q = Queries::new(&table);
    let run_id: i64 = db
        .query_one(
            "INSERT INTO relocator.runs (job, table_name, source, dest) VALUES ('t', 'public.avatars', '', '') RETURNING run_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let lease_id: i64 = db
        .query_one(
            "INSERT INTO relocator.leases (run_id, owner) VALUES ($1, 'me') RETURNING lease_id",
            &[&run_id],
        )
        .await
        .unwrap()
        .get(0);
    let rows = relocator::db::scan(&db, &q, None, None, 10).await.unwrap();
    let moves: Vec<Move> = rows
        .iter()
        .map(|r: &Row| {
            let dst_key = format!("avatar/{}", r.path.strip_prefix("image/").unwrap());
            Move {
                row: r.clone(),
                at: String::new(),
                src_key: r.path.clone(),
                new_value: dst_key.clone(),
                dst_key,
            }
        })
        .collect();
    // The application rewrites row 2 after relocator read it.
    db.execute(
        "UPDATE avatars SET path = 'image/app-new.png' WHERE id = 2",
        &[],
    )
    .await
    .unwrap();
    let made = relocator::pipeline::copy::Made {
        created: true,
        src_etag: "etag".into(),
        src_version: None,
        size: 1,
        dst_etag: "etag".into(),
    };
    let none_set_aside = std::collections::HashMap::new();
    let no_checksums = std::collections::HashMap::new();
    let batch = |owner: &'static str| relocator::pipeline::commit::CommitBatch {
        run_id,
        lease_id,
        owner,
        table: &table,
        src_bucket: &env.src_bucket,
        dst_bucket: &env.dst_bucket,
        moves: moves.iter().map(|m| (m, &made)).collect(),
        last_id: "5",
        ends_lease: false,
        holder: "test-batch",
        set_aside: &none_set_aside,
        checksums: &no_checksums,
    };
    // The batch's reservations, one noting a copy it made.
    db.execute(
        "INSERT INTO relocator.reservations (bucket, key, holder, lease_id, creating)
         VALUES ($1, 'avatar/1.png', 'test-batch', $2, true)",
        &[&env.dst_bucket, &lease_id],
    )
    .await
    .unwrap();
    let reserved = || async {
        db.query_one("SELECT count(*) FROM relocator.reservations", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    // Not the lease's owner: nothing is written, and the batch's reservations (with the
    // copy it noted) stay, to become a take-back once the lease is done.
    let r = relocator::pipeline::commit::commit_batch(&db, &q, &batch("someone-else"))
        .await
        .unwrap();
    assert!(matches!(r, Committed::LeaseLost));
    assert!(env
        .rows()
        .await
        .iter()
        .all(|(_, p)| p.starts_with("image/")));
    assert_eq!(
        reserved().await,
        1,
        "a lost lease's commit releases nothing"
    );

    let Committed::Rows(committed, _) =
        relocator::pipeline::commit::commit_batch(&db, &q, &batch("me"))
            .await
            .unwrap()
    else {
        panic!("the owner's commit went through");
    };
    assert_eq!(committed.len(), 4);
    assert!(!committed.keys().any(|(row, _, _)| row == "2"));
    assert_eq!(
        reserved().await,
        0,
        "the owner's commit releases its reservations"
    );
    let rows = env.rows().await;
    assert_eq!(
        rows[1].1, "image/app-new.png",
        "the application's write is kept"
    );
    assert!(rows
        .iter()
        .filter(|(id, _)| *id != 2)
        .all(|(_, p)| p.starts_with("avatar/")));
    let ledger: i64 = db
        .query_one("SELECT count(*) FROM relocator.moves", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ledger, 4, "ledger rows only for committed rewrites");
}

/// Committed but not cleaned up (the process died right after COMMIT): the next run
/// finishes the cleanup first and copies nothing again.
#[tokio::test(flavor = "multi_thread")]
async fn a_rerun_finishes_pending_cleanups_and_recopies_nothing() {
    let env = TestEnv::new("pending").await;
    let seeded = env.seed(400, 0).await;
    let (code, err) = env.run(&["--batch-size", "100"]);
    assert_eq!(code, 0, "{err}");
    // Simulate a crash between COMMIT and cleanup for the last batch: put its sources
    // back and mark its ledger rows pending again.
    let db = env.db().await;
    let pending = db
        .query(
            "UPDATE relocator.moves SET cleaned_at = NULL, cleanup = NULL
              WHERE move_id > (SELECT max(move_id) - 100 FROM relocator.moves)
          RETURNING old_path",
            &[],
        )
        .await
        .unwrap();
    let mut restored = HashSet::new();
    for r in &pending {
        let k: String = r.get(0);
        if restored.insert(k.clone()) {
            let body = relocator::commands::seed::object_bytes(env.seed, &k, &(100..4096));
            env.s3
                .ep()
                .put(&env.src_bucket, &k, body, "image/png")
                .await
                .unwrap();
        }
    }
    let (code, err) = env.run(&["--summary-json", &env.path("s.json")]);
    assert_eq!(code, 0, "{err}");
    let s = read_summary(&env.path("s.json"));
    assert_eq!(s["counters"]["s3_copies"], 0, "nothing copied again");
    assert_eq!(s["outcomes"]["already_moved"], 100);
    env.assert_converged(&seeded).await;
}

/// A schema-qualified table with uuid ids and a text path column: the keyset scan pages
/// through uuids and the guarded UPDATE casts them back.
#[tokio::test(flavor = "multi_thread")]
async fn uuid_ids_in_a_schema_qualified_table() {
    let env = TestEnv::new("uuid").await;
    let seeded = env.seed(250, 0).await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE SCHEMA app;
         CREATE TABLE app.\"User Pics\" (pic_id uuid PRIMARY KEY DEFAULT gen_random_uuid(), url text);
         INSERT INTO app.\"User Pics\" (url) SELECT path FROM avatars;
         DROP TABLE avatars;",
    )
    .await
    .unwrap();
    let (code, err) = env.run(&[
        "--table",
        "app.\"User Pics\"",
        "--id-column",
        "pic_id",
        "--path-column",
        "url",
        "--batch-size",
        "40",
    ]);
    assert_eq!(code, 0, "{err}");
    let left: i64 = db
        .query_one(
            "SELECT count(*) FROM app.\"User Pics\" WHERE url NOT LIKE 'avatar/%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "every row moved");
    let distinct: HashSet<&str> = seeded.iter().map(|r| r.path.as_str()).collect();
    assert!(
        env.keys(&env.src_bucket, "image/").await.is_empty(),
        "sources deleted"
    );
    assert_eq!(
        env.keys(&env.dst_bucket, "avatar/").await.len(),
        distinct.len()
    );
}

/// The whole run works as the least-privilege role of sql/roles.sql.
#[tokio::test(flavor = "multi_thread")]
async fn run_works_as_the_least_privilege_role() {
    let env = TestEnv::new("roles").await;
    let seeded = env.seed(120, 0).await;
    let url = url::Url::parse(&env.least_privilege_url()).unwrap();
    let (code, err) = {
        let out = env
            .run_cmd(&[])
            .env("DATABASE_URL", url.as_str())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(0), "{err}");
    env.assert_converged(&seeded).await;
    // And it really is limited: no DELETE on the table.
    let job = common::connect(url.as_str()).await;
    let denied = job.execute("DELETE FROM avatars", &[]).await;
    assert!(
        denied.is_err(),
        "relocator_job must not be able to delete rows"
    );
}
