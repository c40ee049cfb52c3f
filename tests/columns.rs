//! Several reference columns per row (`--path-column` repeated): `users(avatar_path,
//! banner_path)`, each column holding a key. A row is rewritten once, when every one of
//! its objects is in place; a source goes only when no column of any row references it.
//! Each promise for this shape, and a kill-and-rerun.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::ClientExt;

use common::{
    assert_refused, assert_rolled_back, assert_rows_moved, assert_verified, exits,
    killed_until_done, planned, read_summary, reported, run_while_the_application_writes, TestEnv,
};

async fn users_table(env: &TestEnv) {
    env.db()
        .await
        .batch_execute(
            "CREATE TABLE users (id serial PRIMARY KEY, avatar_path text,
                                 banner_path varchar(200), name text)",
        )
        .await
        .unwrap();
}

fn body(key: &str) -> Vec<u8> {
    format!("bytes of {key} ")
        .repeat(key.len() * 9)
        .into_bytes()
}

async fn object(env: &TestEnv, key: &str) {
    env.s3
        .ep()
        .put(&env.src_bucket, key, body(key), "image/png")
        .await
        .unwrap();
}

async fn user(env: &TestEnv, avatar: Option<&str>, banner: Option<&str>) {
    env.db()
        .await
        .execute(
            "INSERT INTO users (avatar_path, banner_path, name) VALUES ($1, $2, 'n')",
            &[&avatar, &banner],
        )
        .await
        .unwrap();
}

fn job(env: &TestEnv) -> Vec<String> {
    [
        "--table",
        "users",
        "--path-column",
        "avatar_path",
        "--path-column",
        "banner_path",
    ]
    .into_iter()
    .map(String::from)
    .chain(["--source".into(), env.source(), "--dest".into(), env.dest()])
    .collect()
}

async fn columns(env: &TestEnv) -> Vec<(Option<String>, Option<String>)> {
    env.db()
        .await
        .query(
            "SELECT avatar_path, banner_path FROM users ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Report lines as (id, outcome, the column its detail names), sorted.
fn lines(path: &str) -> Vec<(String, String, String)> {
    let mut r = csv::Reader::from_path(path).unwrap();
    let mut all: Vec<_> = r
        .records()
        .map(|rec| {
            let rec = rec.unwrap();
            let at = rec[4].split(':').next().unwrap().to_owned();
            (rec[0].to_owned(), rec[3].to_owned(), at)
        })
        .collect();
    all.sort();
    all
}

fn s(v: &str) -> Option<String> {
    Some(v.to_owned())
}

/// #18 item 4. Rows: both columns under the source; one column NULL; a banner whose
/// object is missing (the row is held back, its avatar too); a banner naming another
/// row's avatar object (one copy); a banner naming the held-back row's avatar object
/// (it moves, and the object stays: the held-back row's avatar still references it).
/// `plan` predicts `run` line for line, one line per (row, column); `verify` finds every
/// moved key; `rollback` returns every column exactly.
#[tokio::test(flavor = "multi_thread")]
async fn columns_of_a_row_move_together() {
    let env = TestEnv::new("columns").await;
    users_table(&env).await;
    for k in ["image/a.png", "image/a-b.png", "image/b.png", "image/c.png"] {
        object(&env, k).await;
    }
    user(&env, Some("image/a.png"), Some("image/a-b.png")).await;
    user(&env, Some("image/b.png"), None).await;
    user(&env, Some("image/c.png"), Some("image/missing.png")).await;
    user(&env, Some("other/x.png"), Some("image/a.png")).await;
    user(&env, None, Some("image/c.png")).await;
    let before = columns(&env).await;

    planned(&env, &job(&env), 3);
    assert_eq!(columns(&env).await, before, "plan changed nothing");
    reported(&env, &job(&env), 3);
    let got = lines(&env.path("run.csv"));
    assert_eq!(lines(&env.path("plan.csv")), got, "plan predicts run");
    let line = |id: &str, o: &str, at: &str| (id.to_owned(), o.to_owned(), at.to_owned());
    assert_eq!(
        got,
        [
            line("1", "moved", "avatar_path"),
            line("1", "moved", "banner_path"),
            line("2", "moved", "avatar_path"),
            line("3", "held_back", "avatar_path"),
            line("3", "missing_source", "banner_path"),
            line("4", "moved", "banner_path"),
            line("5", "moved", "banner_path"),
        ]
    );
    assert_eq!(
        columns(&env).await,
        [
            (s("avatar/a.png"), s("avatar/a-b.png")),
            (s("avatar/b.png"), None),
            (s("image/c.png"), s("image/missing.png")),
            (s("other/x.png"), s("avatar/a.png")),
            (None, s("avatar/c.png")),
        ]
    );
    env.assert_moved(["a.png", "a-b.png", "b.png", "c.png"], body)
        .await;
    assert_eq!(
        env.keys(&env.src_bucket, "").await,
        ["image/c.png"],
        "a source goes only when no column of any row references it"
    );

    // Rows, not references: 4 rows moved (6 references).
    assert_rows_moved(&env, &job(&env), 4);

    assert_verified(&env, &job(&env), &["a.png", "a-b.png", "b.png", "c.png"]);

    assert_rolled_back(
        &env,
        &job(&env),
        &["image/a-b.png", "image/a.png", "image/b.png", "image/c.png"],
    )
    .await;
    assert_eq!(columns(&env).await, before, "rollback returns every column");
}

/// Promise 3: the application changes one column of a row while relocator's commit
/// waits on it. The compare-and-swap covers every column: the row is not rewritten (both
/// lines `changed_by_app`) and its objects are kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_the_application_changes_meanwhile_is_left_alone() {
    let env = TestEnv::new("columns-cas").await;
    users_table(&env).await;
    for n in 0..3 {
        let (a, b) = (format!("image/{n}a.png"), format!("image/{n}b.png"));
        object(&env, &a).await;
        object(&env, &b).await;
        user(&env, Some(&a), Some(&b)).await;
    }
    let mut args = job(&env);
    args.extend(["--summary-json".into(), env.path("s.json")]);
    run_while_the_application_writes(
        &env,
        &args,
        "UPDATE users SET banner_path = 'image/1b.png?' WHERE id = 2",
    )
    .await;
    // Every row still under the source was reported (on the code before, its lines
    // named keys and the row's value did not match them: "1 row not reported").
    let summary = read_summary(&env.path("s.json"));
    assert_eq!(summary["rows_left_unreported"], 0, "{summary}");
    let got = lines(&env.path("run.csv"));
    let row2: Vec<_> = got.iter().filter(|(id, _, _)| id == "2").collect();
    assert_eq!(row2.len(), 2, "{got:?}");
    assert!(
        row2.iter().all(|(_, o, _)| o == "changed_by_app"),
        "{got:?}"
    );
    assert_eq!(
        columns(&env).await[1],
        (s("image/1a.png"), s("image/1b.png?"))
    );
    assert_eq!(
        env.keys(&env.src_bucket, "").await,
        ["image/1a.png", "image/1b.png"],
        "its sources are kept"
    );
}

/// Promise 4: killed with SIGKILL at rising moments and rerun, the job converges.
#[tokio::test(flavor = "multi_thread")]
async fn killed_column_runs_converge() {
    let env = TestEnv::new("columns-kill").await;
    users_table(&env).await;
    let n = 30;
    for i in 0..n {
        let (a, b) = (format!("image/{i}a.png"), format!("image/{i}b.png"));
        object(&env, &a).await;
        object(&env, &b).await;
        user(&env, Some(&a), Some(&b)).await;
    }
    let kills = killed_until_done(&env, &job(&env), "3").await;
    for (i, (a, b)) in columns(&env).await.into_iter().enumerate() {
        assert_eq!(a, Some(format!("avatar/{i}a.png")));
        assert_eq!(b, Some(format!("avatar/{i}b.png")));
        env.assert_moved([format!("{i}a.png"), format!("{i}b.png")], body)
            .await;
    }
    assert!(
        env.keys(&env.src_bucket, "").await.is_empty(),
        "no source left (after {kills} kills)"
    );
    let s = read_summary(&env.path("s.json"));
    assert_eq!(s["outcomes"]["moved"].as_u64().unwrap_or(0), 0, "{s}");
}

/// Bad combinations: exit 2, a message naming the problem, nothing changed.
#[tokio::test(flavor = "multi_thread")]
async fn column_options_that_make_the_job_ambiguous_are_refused() {
    let env = TestEnv::new("columns-usage").await;
    users_table(&env).await;
    env.db()
        .await
        .batch_execute("ALTER TABLE users ADD COLUMN n integer, ADD COLUMN checksum text")
        .await
        .unwrap();
    object(&env, "image/a.png").await;
    user(&env, Some("image/a.png"), None).await;
    let base = |extra: &[&str]| {
        let mut c = env.cmd();
        c.args(["run", "--table", "users"])
            .args(["--source", &env.source(), "--dest", &env.dest()])
            .args(extra);
        c
    };
    let two = [
        "--path-column",
        "avatar_path",
        "--path-column",
        "banner_path",
    ];
    let with = |more: &[&'static str]| -> Vec<&'static str> {
        two.iter().copied().chain(more.iter().copied()).collect()
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--path-column",
                "avatar_path",
                "--path-column",
                "avatar_path",
            ],
            "given twice",
        ),
        (
            vec!["--path-column", "avatar_path", "--path-column", "n"],
            "text or varchar",
        ),
        (
            vec!["--path-column", "avatar_path", "--path-column", "nope"],
            "no column",
        ),
        (with(&["--json-key", "id"]), "reads one column"),
        (
            with(&["--checksum-column", "checksum"]),
            "--checksum-column checks one object per row",
        ),
        (
            with(&[
                "--source-url",
                "https://a.example/",
                "--dest-url",
                "https://b.example/",
                "--url-column",
                "avatar_path",
                "--checksum-column",
                "checksum",
            ]),
            "--checksum-column checks one object per row",
        ),
        (
            with(&[
                "--source-url",
                "https://a.example/",
                "--dest-url",
                "https://b.example/",
            ]),
            "--url-column",
        ),
        (
            with(&[
                "--source-url",
                "https://a.example/",
                "--dest-url",
                "https://b.example/",
                "--url-column",
                "name",
            ]),
            "is not a --path-column",
        ),
        (with(&["--url-column", "avatar_path"]), "--source-url"),
        (
            with(&[
                "--source-url",
                "https://a.example/",
                "--dest-url",
                "https://b.example/",
                "--url-column",
                "avatar_path",
                "--json-key",
                "id",
            ]),
            "different shapes",
        ),
    ];
    assert_refused(base, cases);
    // Across two buckets a key column cannot tell the sides apart: one prefix is refused.
    let out = exits(
        env.cmd()
            .args(["run", "--table", "users"])
            .args(two)
            .args(["--url-column", "avatar_path"])
            .args([
                "--source-url",
                "https://a.example/",
                "--dest-url",
                "https://b.example/",
            ])
            .args(["--source", &env.source()])
            .args(["--dest", &format!("s3://{}/image/", env.dst_bucket)]),
        2,
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("overlap"));
    assert_eq!(columns(&env).await, [(s("image/a.png"), None)]);
    assert_eq!(env.keys(&env.src_bucket, "").await, ["image/a.png"]);
}

/// Found by review: two columns of one row whose keys a `--rewrite` maps onto one
/// destination are a `collision` (as `plan` says), not two copies onto one key. On the
/// code before, the second copy overwrote the first and both sources were deleted.
#[tokio::test(flavor = "multi_thread")]
async fn two_columns_of_a_row_mapped_onto_one_key_collide() {
    let env = TestEnv::new("columns-collide").await;
    users_table(&env).await;
    object(&env, "image/u1.png").await;
    object(&env, "image/u1_banner.png").await;
    user(&env, Some("image/u1.png"), Some("image/u1_banner.png")).await;
    let rewrite = ["--rewrite", r"^([a-z0-9]+).*\.png$", "--to", "$1.png"];
    exits(
        env.cmd()
            .arg("plan")
            .args(job(&env))
            .args(rewrite)
            .args(["--out", &env.path("plan.csv")]),
        3,
    );
    exits(
        env.cmd()
            .arg("run")
            .args(job(&env))
            .args(rewrite)
            .args(["--report", &env.path("run.csv")]),
        3,
    );
    let got = lines(&env.path("run.csv"));
    assert_eq!(lines(&env.path("plan.csv")), got, "plan predicts run");
    assert!(got.iter().any(|(_, o, _)| o == "collision"), "{got:?}");
    assert_eq!(
        columns(&env).await,
        [(s("image/u1.png"), s("image/u1_banner.png"))]
    );
    let mut left = env.keys(&env.src_bucket, "").await;
    left.sort();
    assert_eq!(left, ["image/u1.png", "image/u1_banner.png"]);
    assert!(env.keys(&env.dst_bucket, "").await.is_empty());
}

/// Found by review: a rollback goes back a row at a time, whatever its batch size (a row's
/// moves are never split across two batches), and with the columns given in another
/// order. On the code before, `--batch-size 1` restored one column's object only and
/// left the other column pointing at a deleted key; the other order restored nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_returns_whole_rows_in_any_batch_size_and_column_order() {
    let env = TestEnv::new("columns-rollback").await;
    users_table(&env).await;
    for n in 0..3 {
        let (a, b) = (format!("image/{n}a.png"), format!("image/{n}b.png"));
        object(&env, &a).await;
        object(&env, &b).await;
        user(&env, Some(&a), Some(&b)).await;
    }
    let before = columns(&env).await;
    exits(env.cmd().arg("run").args(job(&env)), 0);
    exits(
        env.cmd()
            .args(["rollback", "--table", "users"])
            .args([
                "--path-column",
                "banner_path",
                "--path-column",
                "avatar_path",
            ])
            .args(["--source", &env.source(), "--dest", &env.dest()])
            .args(["--batch-size", "1"]),
        0,
    );
    assert_eq!(columns(&env).await, before);
    for n in 0..3 {
        for k in [format!("image/{n}a.png"), format!("image/{n}b.png")] {
            let bytes = env.s3.ep().get_bytes(&env.src_bucket, &k).await.unwrap();
            assert_eq!(bytes, body(&k), "{k} back");
        }
    }
    assert!(env.keys(&env.dst_bucket, "").await.is_empty());
}

/// Found by review: a row one of whose objects cannot go back (the application put its
/// own object at that old key since) stays whole at its new keys; the other reference
/// is `held_back`. On the code before, the row was restored whole and pointed at the
/// application's object.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_one_of_whose_objects_cannot_go_back_stays_whole() {
    let env = TestEnv::new("columns-rollback-held").await;
    users_table(&env).await;
    object(&env, "image/a.png").await;
    object(&env, "image/b.png").await;
    user(&env, Some("image/a.png"), Some("image/b.png")).await;
    exits(env.cmd().arg("run").args(job(&env)), 0);
    env.s3
        .ep()
        .put(
            &env.src_bucket,
            "image/b.png",
            b"the app's".to_vec(),
            "image/png",
        )
        .await
        .unwrap();
    exits(
        env.cmd()
            .arg("rollback")
            .args(job(&env))
            .args(["--report", &env.path("back.csv")]),
        3,
    );
    let back = lines(&env.path("back.csv"));
    assert!(back.iter().any(|(_, o, _)| o == "conflict"), "{back:?}");
    assert!(back.iter().any(|(_, o, _)| o == "held_back"), "{back:?}");
    assert_eq!(
        columns(&env).await,
        [(s("avatar/a.png"), s("avatar/b.png"))]
    );
    assert_eq!(
        env.s3
            .ep()
            .get_bytes(&env.src_bucket, "image/b.png")
            .await
            .unwrap(),
        b"the app's"
    );
    assert!(
        env.s3
            .ep()
            .get_bytes(&env.src_bucket, "image/a.png")
            .await
            .is_err(),
        "the copy made back for the held reference is taken back"
    );
    env.assert_moved(["a.png", "b.png"], body).await;
}

/// #18 item 5 with several columns: each column's declared length is checked against the
/// key it would get, by `plan` and `run`, before anything is copied. Row 1's banner fits
/// `varchar(23)` under `image/` but not under `avatar/`: the banner is `too_long` and the
/// avatar `held_back` with it, nothing of the row is copied or changed; row 2 moves. On the code before, no length
/// was checked with several columns: row 1's objects were copied and its commit refused.
#[tokio::test(flavor = "multi_thread")]
async fn each_columns_length_is_checked_before_any_copy() {
    let env = TestEnv::new("columns-long").await;
    users_table(&env).await;
    env.db()
        .await
        .batch_execute("ALTER TABLE users ALTER banner_path TYPE varchar(23)")
        .await
        .unwrap();
    let long = "image/b1-0123456789.png";
    assert_eq!(long.len(), 23);
    for k in ["image/u1.png", long, "image/u2.png", "image/b2.png"] {
        object(&env, k).await;
    }
    user(&env, Some("image/u1.png"), Some(long)).await;
    user(&env, Some("image/u2.png"), Some("image/b2.png")).await;
    planned(&env, &job(&env), 3);
    reported(&env, &job(&env), 3);
    let got = lines(&env.path("run.csv"));
    assert_eq!(lines(&env.path("plan.csv")), got, "plan predicts run");
    let want = |id: &str, o: &str, at: &str| (id.to_owned(), o.to_owned(), at.to_owned());
    assert_eq!(
        got,
        [
            want("1", "held_back", "avatar_path"),
            want("1", "too_long", "banner_path"),
            want("2", "moved", "avatar_path"),
            want("2", "moved", "banner_path"),
        ]
    );
    assert_eq!(
        columns(&env).await,
        [
            (s("image/u1.png"), s(long)),
            (s("avatar/u2.png"), s("avatar/b2.png"))
        ]
    );
    let mut copied = env.keys(&env.dst_bucket, "").await;
    copied.sort();
    assert_eq!(
        copied,
        ["avatar/b2.png", "avatar/u2.png"],
        "nothing of row 1 copied"
    );
}

/// What rows hold for objects under `--source` and `--dest` in the URL column.
const CDN_OLD: &str = "https://cdn.example.com/image/";
const CDN_NEW: &str = "https://cdn.example.com/avatar/";

/// `people(avatar_url, banner_path)`: a URL column beside a key column.
async fn people_table(env: &TestEnv) {
    env.db()
        .await
        .batch_execute(
            "CREATE TABLE people (id serial PRIMARY KEY, avatar_url text,
                                  banner_path varchar(40))",
        )
        .await
        .unwrap();
}

async fn person(env: &TestEnv, url: Option<&str>, banner: Option<&str>) {
    env.db()
        .await
        .execute(
            "INSERT INTO people (avatar_url, banner_path) VALUES ($1, $2)",
            &[&url, &banner],
        )
        .await
        .unwrap();
}

async fn people(env: &TestEnv) -> Vec<(Option<String>, Option<String>)> {
    env.db()
        .await
        .query(
            "SELECT avatar_url, banner_path FROM people ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The job: `avatar_url` holds URLs (`--url-column`), `banner_path` keys.
fn mixed_job(env: &TestEnv) -> Vec<String> {
    [
        "--table",
        "people",
        "--path-column",
        "banner_path",
        "--path-column",
        "avatar_url",
        "--url-column",
        "avatar_url",
        "--source-url",
        CDN_OLD,
        "--dest-url",
        CDN_NEW,
    ]
    .into_iter()
    .map(String::from)
    .chain(["--source".into(), env.source(), "--dest".into(), env.dest()])
    .collect()
}

/// #18 item 4, "each with its own shape options where they differ": a URL column beside
/// a key column. Rows: both move (the URL's encoding and query kept); a URL of no
/// `--source-url` (left as it is) beside a key that moves; a URL whose object is missing
/// (the row is held back, its banner too); a URL naming the held-back row's banner object
/// (it moves, and the object stays: the other row's key column still references it).
/// `plan` predicts `run`; objects are byte-identical; `verify` finds every moved key;
/// `rollback` returns every column exactly.
#[tokio::test(flavor = "multi_thread")]
async fn a_url_column_beside_a_key_column_moves_with_it() {
    let env = TestEnv::new("columns-mixed").await;
    people_table(&env).await;
    for k in ["image/a b.png", "image/b.png", "image/c.png", "image/e.png"] {
        object(&env, k).await;
    }
    person(
        &env,
        Some(&format!("{CDN_OLD}a%20b.png?v=1")),
        Some("image/b.png"),
    )
    .await;
    person(
        &env,
        Some("https://other.example/x.png"),
        Some("image/c.png"),
    )
    .await;
    person(&env, Some(&format!("{CDN_OLD}d.png")), Some("image/e.png")).await;
    person(&env, Some(&format!("{CDN_OLD}e.png")), None).await;
    person(&env, None, None).await;
    let before = people(&env).await;

    planned(&env, &mixed_job(&env), 3);
    assert_eq!(people(&env).await, before, "plan changed nothing");
    reported(&env, &mixed_job(&env), 3);
    let got = lines(&env.path("run.csv"));
    assert_eq!(lines(&env.path("plan.csv")), got, "plan predicts run");
    let line = |id: &str, o: &str, at: &str| (id.to_owned(), o.to_owned(), at.to_owned());
    assert_eq!(
        got,
        [
            line("1", "moved", "avatar_url"),
            line("1", "moved", "banner_path"),
            line("2", "moved", "banner_path"),
            line("3", "held_back", "banner_path"),
            line("3", "missing_source", "avatar_url"),
            line("4", "moved", "avatar_url"),
        ]
    );
    assert_eq!(
        people(&env).await,
        [
            (s(&format!("{CDN_NEW}a%20b.png?v=1")), s("avatar/b.png")),
            (s("https://other.example/x.png"), s("avatar/c.png")),
            (s(&format!("{CDN_OLD}d.png")), s("image/e.png")),
            (s(&format!("{CDN_NEW}e.png")), None),
            (None, None),
        ]
    );
    env.assert_moved(["a b.png", "b.png", "c.png", "e.png"], body)
        .await;
    assert_eq!(
        env.keys(&env.src_bucket, "").await,
        ["image/e.png"],
        "a source goes only when no column of any row, of either shape, references it"
    );
    assert_rows_moved(&env, &mixed_job(&env), 3);

    assert_verified(
        &env,
        &mixed_job(&env),
        &["a b.png", "b.png", "c.png", "e.png"],
    );

    assert_rolled_back(
        &env,
        &mixed_job(&env),
        &["image/a b.png", "image/b.png", "image/c.png", "image/e.png"],
    )
    .await;
    assert_eq!(people(&env).await, before, "rollback returns every column");
}

/// Promise 3 for a URL column beside a key column: the application changes the URL of
/// a row while the commit waits on it. The row is left alone (both lines
/// `changed_by_app`) and its objects are kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_mixed_row_the_application_changes_meanwhile_is_left_alone() {
    let env = TestEnv::new("columns-mixed-cas").await;
    people_table(&env).await;
    mixed_people(&env, 3).await;
    run_while_the_application_writes(
        &env,
        &mixed_job(&env),
        &format!("UPDATE people SET avatar_url = '{CDN_OLD}1a.png?new' WHERE id = 2"),
    )
    .await;
    let got = lines(&env.path("run.csv"));
    let row2: Vec<_> = got.iter().filter(|(id, _, _)| id == "2").collect();
    assert!(
        row2.len() == 2 && row2.iter().all(|(_, o, _)| o == "changed_by_app"),
        "{got:?}"
    );
    assert_eq!(
        people(&env).await[1],
        (s(&format!("{CDN_OLD}1a.png?new")), s("image/1b.png"))
    );
    assert_eq!(
        env.keys(&env.src_bucket, "").await,
        ["image/1a.png", "image/1b.png"],
        "its sources are kept"
    );
}

/// `n` people, each with a URL and a banner whose objects exist.
async fn mixed_people(env: &TestEnv, n: usize) {
    for i in 0..n {
        let (a, b) = (format!("image/{i}a.png"), format!("image/{i}b.png"));
        object(env, &a).await;
        object(env, &b).await;
        person(env, Some(&format!("{CDN_OLD}{i}a.png")), Some(&b)).await;
    }
}

/// Promise 4 for a URL column beside a key column: killed with SIGKILL at rising moments
/// and rerun, the job converges.
#[tokio::test(flavor = "multi_thread")]
async fn killed_mixed_column_runs_converge() {
    let env = TestEnv::new("columns-mixed-kill").await;
    people_table(&env).await;
    mixed_people(&env, 30).await;
    let kills = killed_until_done(&env, &mixed_job(&env), "3").await;
    for (i, (a, b)) in people(&env).await.into_iter().enumerate() {
        assert_eq!(a, Some(format!("{CDN_NEW}{i}a.png")));
        assert_eq!(b, Some(format!("avatar/{i}b.png")));
        env.assert_moved([format!("{i}a.png"), format!("{i}b.png")], body)
            .await;
    }
    assert!(
        env.keys(&env.src_bucket, "").await.is_empty(),
        "no source left (after {kills} kills)"
    );
}
