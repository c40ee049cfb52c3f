//! How a row's column holds its reference, and what the column accepts: a new key the
//! column cannot hold (longer than its declared length, refused by a CHECK on it) is
//! found before anything is copied.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::ClientExt;

use common::{exits, read_outcomes, read_summary, TestEnv};

/// Django's shape of the table: a `varchar` of a declared length, with CHECKs on the path
/// column, one of them also reading another column. Rows (id, path, kind, what happens):
const ROWS: [(&str, &str, &str); 5] = [
    ("image/ok.png", "user", "moved"),
    // 20 characters; 21 once moved.
    ("image/abcdefghij.png", "user", "too_long"),
    // Fits the length; the CHECK on the path refuses it.
    ("image/forbidden.png", "user", "too_long"),
    // The CHECK reading `kind` refuses it.
    ("image/locked.png", "locked", "too_long"),
    // 16 characters, 21 bytes: the length counts characters, as varchar(n) does.
    ("image/ééééé.png", "user", "moved"),
];

async fn limited_table(env: &TestEnv, path_index: bool) {
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE avatars (
             id serial PRIMARY KEY,
             kind text NOT NULL DEFAULT 'user',
             path varchar(20) CONSTRAINT not_forbidden CHECK (path NOT LIKE 'avatar/forbidden%'),
             CONSTRAINT locked_stays CHECK (kind <> 'locked' OR path LIKE 'image/%'))",
    )
    .await
    .unwrap();
    if path_index {
        db.batch_execute("CREATE INDEX avatars_path_idx ON avatars (path)")
            .await
            .unwrap();
    }
    for (path, kind, _) in ROWS {
        env.s3
            .ep()
            .put(&env.src_bucket, path, path.as_bytes().to_vec(), "image/png")
            .await
            .unwrap();
        db.execute(
            "INSERT INTO avatars (path, kind) VALUES ($1, $2)",
            &[&path, &kind],
        )
        .await
        .unwrap();
    }
}

/// #18 item 5: `plan` and `run` find the rows whose new key the column cannot hold
/// before anything is copied (`too_long`, naming the limit and the fix); the other rows
/// move. On the code before, all five were copied, and the three the table refused were
/// `rejected` at the commit, their copies taken back afterwards.
async fn too_long_before_any_copy(path_index: bool) {
    let env = TestEnv::new(if path_index { "limits-idx" } else { "limits" }).await;
    limited_table(&env, path_index).await;

    exits(
        env.cmd()
            .args(["plan", "--source", &env.source(), "--dest", &env.dest()])
            .args(["--out", &env.path("plan.csv")]),
        3,
    );
    let predicted = read_outcomes(&env.path("plan.csv"));

    let (code, err) = env.run(&[
        "--report",
        &env.path("r.csv"),
        "--summary-json",
        &env.path("s.json"),
    ]);
    assert_eq!(code, 3, "{err}");
    let outcomes = read_outcomes(&env.path("r.csv"));
    for (i, (path, _, want)) in ROWS.iter().enumerate() {
        let id = (i + 1).to_string();
        assert_eq!(outcomes[&id].0, *want, "row {id} ({path}): {outcomes:?}");
        assert_eq!(
            predicted[&id].0, *want,
            "plan, row {id} ({path}): {predicted:?}"
        );
    }
    let report = std::fs::read_to_string(env.path("r.csv")).unwrap();
    for named in ["character varying(20)", "not_forbidden", "locked_stays"] {
        assert!(
            report.contains(named),
            "{named} named in the report:\n{report}"
        );
    }
    let s = read_summary(&env.path("s.json"));
    assert_eq!(
        s["counters"]["s3_copies"], 2,
        "only the two rows that fit were copied: {s}"
    );
    let rows = env.rows().await;
    let now: Vec<&str> = rows.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(
        now,
        [
            "avatar/ok.png",
            ROWS[1].0,
            ROWS[2].0,
            ROWS[3].0,
            "avatar/ééééé.png"
        ]
    );
    let mut made = env.keys(&env.dst_bucket, "avatar/").await;
    made.sort();
    assert_eq!(made, ["avatar/ok.png", "avatar/ééééé.png"]);
    for (path, _, want) in ROWS {
        let kept = env.s3.ep().get_bytes(&env.src_bucket, path).await.is_ok();
        assert_eq!(
            kept,
            want == "too_long",
            "{path}: source kept only if not moved"
        );
    }
    env.assert_no_row_dangles().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_the_column_cannot_hold_is_too_long_before_any_copy() {
    too_long_before_any_copy(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_the_column_cannot_hold_is_too_long_before_any_copy_indexed() {
    too_long_before_any_copy(true).await;
}

/// Run `plan` then `run` with `extra` options; (plan's outcomes, run's outcomes, run's
/// stderr), each command's exit code asserted to be `code`.
async fn plan_and_run(
    env: &TestEnv,
    extra: &[&str],
    code: i32,
) -> (
    std::collections::HashMap<String, (String, String)>,
    std::collections::HashMap<String, (String, String)>,
    String,
) {
    let plan = env
        .cmd()
        .args(["plan", "--source", &env.source(), "--dest", &env.dest()])
        .args(["--out", &env.path("plan.csv")])
        .args(extra)
        .output()
        .unwrap();
    assert_eq!(
        plan.status.code(),
        Some(code),
        "plan: {}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let predicted = read_outcomes(&env.path("plan.csv"));
    let report = env.path("r.csv");
    let args: Vec<&str> = ["--report", report.as_str()]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let (got, err) = env.run(&args);
    assert_eq!(got, code, "run: {err}");
    (predicted, read_outcomes(&report), err)
}

/// The review of the precheck: a CHECK whose function raises for one row's new value
/// made every run exit 1 (the whole batch's evaluation failed), and one reading the whole
/// row gave SQL that does not stand alone (exit 1 as well); a CHECK's function with side
/// effects left them behind a `plan`. Now the raising row is `too_long` with the
/// function's message, the others move, the whole-row constraint is left to the commit,
/// and `plan` leaves nothing behind.
#[tokio::test(flavor = "multi_thread")]
async fn checks_that_raise_or_read_the_whole_row_do_not_stop_the_run() {
    let env = TestEnv::new("limits-raise").await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE audit (k text);
         CREATE FUNCTION valid_key(p text) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
         BEGIN
             IF length(p) > 19 THEN RAISE EXCEPTION 'key % is longer than the CDN allows', p; END IF;
             RETURN true;
         END $$;
         CREATE FUNCTION audited(p text) RETURNS boolean LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO audit VALUES (p); RETURN true; END $$;
         CREATE TABLE avatars (
             id serial PRIMARY KEY,
             path text CONSTRAINT key_ok CHECK (valid_key(path))
                       CONSTRAINT audited CHECK (audited(path)));
         CREATE FUNCTION whole_ok(a avatars) RETURNS boolean LANGUAGE sql IMMUTABLE AS
             $$ SELECT a.path NOT LIKE '%.exe' $$;
         ALTER TABLE avatars ADD CONSTRAINT whole CHECK (path <> '' AND whole_ok(avatars));",
    )
    .await
    .unwrap();
    for p in ["image/1.png", "image/123456789.png", "image/3.png"] {
        env.put_row(p, p.as_bytes().to_vec()).await;
    }
    db.batch_execute("TRUNCATE audit").await.unwrap();
    let (predicted, outcomes, _) = plan_and_run(&env, &[], 3).await;
    for (id, want) in [("1", "moved"), ("2", "too_long"), ("3", "moved")] {
        assert_eq!(outcomes[id].0, want, "row {id}: {outcomes:?}");
        assert_eq!(predicted[id].0, want, "plan, row {id}: {predicted:?}");
    }
    let report = std::fs::read_to_string(env.path("r.csv")).unwrap();
    assert!(report.contains("longer than the CDN allows"), "{report}");
    let audited: Vec<String> = db
        .query("SELECT k FROM audit ORDER BY k", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        audited
            .iter()
            .all(|k| k == "avatar/1.png" || k == "avatar/3.png"),
        "only the run's own rewrites ran the CHECK's function for good: {audited:?}"
    );
}

/// The review of the precheck: a row found `too_long` still claimed its destination,
/// making the row after it (same new key) a `collision`; now that row moves.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_that_cannot_move_claims_no_destination() {
    let env = TestEnv::new("limits-claims").await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE avatars (
             id serial PRIMARY KEY,
             locked boolean NOT NULL DEFAULT false,
             path text COLLATE \"en-x-icu\" CONSTRAINT lower_case CHECK (path = lower(path)),
             CONSTRAINT locked_stays CHECK (NOT locked OR path LIKE 'image/%'))",
    )
    .await
    .unwrap();
    for p in ["image/a/x.png", "image/b/x.png"] {
        env.put_row(p, p.as_bytes().to_vec()).await;
    }
    db.batch_execute("UPDATE avatars SET locked = true WHERE id = 1")
        .await
        .unwrap();
    let rewrite = ["--rewrite", "^[ab]/(.*)$", "--to", "all/$1"];
    let (predicted, outcomes, _) = plan_and_run(&env, &rewrite, 3).await;
    for (id, want) in [("1", "too_long"), ("2", "moved")] {
        assert_eq!(outcomes[id].0, want, "row {id}: {outcomes:?}");
        assert_eq!(predicted[id].0, want, "plan, row {id}: {predicted:?}");
    }
}

/// The review of the precheck: the new value was tried under the database's collation
/// ("C"), not the column's: with `COLLATE "en-x-icu"` and `CHECK (path = lower(path))`,
/// `Été/a.png` passed and was copied, then `rejected` at the commit.
#[tokio::test(flavor = "multi_thread")]
async fn the_column_collation_counts() {
    let env = TestEnv::new("limits-collation-2").await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE avatars (
             id serial PRIMARY KEY,
             path text COLLATE \"en-x-icu\" CONSTRAINT lower_case CHECK (path = lower(path)))",
    )
    .await
    .unwrap();
    env.put_row("image/a.png", b"a".to_vec()).await;
    let dest = format!("s3://{}/Été/", env.dst_bucket);
    exits(
        env.cmd()
            .args(["run", "--source", &env.source(), "--dest", &dest])
            .args(["--report", &env.path("r.csv")])
            .args(["--summary-json", &env.path("s.json")]),
        3,
    );
    let outcomes = read_outcomes(&env.path("r.csv"));
    assert_eq!(outcomes["1"].0, "too_long", "{outcomes:?}");
    assert_eq!(
        read_summary(&env.path("s.json"))["counters"]["s3_copies"],
        0
    );
}
