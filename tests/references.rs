//! How a row's column holds its reference, and what the column accepts: a new key the
//! column cannot hold (longer than its declared length, refused by a CHECK on it) is
//! found before anything is copied.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::ClientExt;

use common::{read_outcomes, read_summary, TestEnv};

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

    let plan = env
        .cmd()
        .args(["plan", "--source", &env.source(), "--dest", &env.dest()])
        .args(["--out", &env.path("plan.csv")])
        .output()
        .unwrap();
    assert_eq!(
        plan.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
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
