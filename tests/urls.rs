//! The URL shape (`--source-url`, `--dest-url`): the path column holds URLs, spelled
//! several ways, percent-encoded, some with a query string or a fragment. Each promise
//! for this shape, and a kill-and-rerun.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::ClientExt;

use common::{
    assert_refused, exits, killed_until_done, planned, read_outcomes, read_summary, reported,
    run_while_the_application_writes, TestEnv,
};

const LEGACY: &str = "https://legacy-s3.s3.eu-west-1.amazonaws.com/image/";
const CDN: &str = "http://cdn.example.com/";
const NEW: &str = "https://new-cdn.example.com/avatar/";

async fn urls_table(env: &TestEnv) {
    env.db()
        .await
        .batch_execute("CREATE TABLE avatars (id serial PRIMARY KEY, avatar_url text, note text)")
        .await
        .unwrap();
}

/// A row holding `url`, and (when `key` is given) the object it names.
async fn url_row(env: &TestEnv, url: &str, key: Option<&str>) {
    if let Some(key) = key {
        env.s3
            .ep()
            .put(&env.src_bucket, key, body(key), "image/png")
            .await
            .unwrap();
    }
    env.db()
        .await
        .execute("INSERT INTO avatars (avatar_url) VALUES ($1)", &[&url])
        .await
        .unwrap();
}

fn body(key: &str) -> Vec<u8> {
    format!("bytes of {key} ")
        .repeat(key.len() * 13)
        .into_bytes()
}

/// The job's options: rows under either legacy spelling move to the new CDN's.
fn job(env: &TestEnv) -> Vec<String> {
    [
        "--table",
        "avatars",
        "--path-column",
        "avatar_url",
        "--source-url",
        LEGACY,
        "--source-url",
        CDN,
        "--dest-url",
        NEW,
    ]
    .into_iter()
    .map(String::from)
    .chain(["--source".into(), env.source(), "--dest".into(), env.dest()])
    .collect()
}

async fn values(env: &TestEnv) -> Vec<String> {
    env.db()
        .await
        .query("SELECT avatar_url FROM avatars ORDER BY id", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

/// #18 item 1. Rows spell their objects with either --source-url, percent-encoded, with
/// a query string or a fragment; one row is under no prefix, one is malformed, one names
/// a missing object, two spell one object two ways, and one object is also named by a
/// URL no --source-url covers (another CDN). `plan` predicts `run`; moved rows hold the
/// new URL with the old encoding and query; the objects are byte-identical under their
/// decoded keys; every source is deleted except the one the other CDN's row still
/// references; `verify` finds the moved rows in place; `rollback` returns every row to
/// its exact old value and the objects to the old bucket; the job then runs again.
#[tokio::test(flavor = "multi_thread")]
async fn url_rows_move_with_their_encoding_and_query() {
    let env = TestEnv::new("urls").await;
    urls_table(&env).await;
    let rows: [(String, Option<&str>); 13] = [
        (format!("{LEGACY}a%20b.png"), Some("image/a b.png")),
        (format!("{CDN}c.png?v=3"), Some("image/c.png")),
        (
            format!("{LEGACY}%C3%A9t%C3%A9.png#top"),
            Some("image/été.png"),
        ),
        ("https://elsewhere.example.com/other.png".into(), None),
        (format!("{CDN}100%.png"), None),
        (format!("{LEGACY}missing.png"), None),
        (format!("{LEGACY}shared.png"), Some("image/shared.png")),
        (format!("{CDN}shared.png?s=1"), None),
        (format!("{LEGACY}kept.png"), Some("image/kept.png")),
        // Not selected (no --source-url covers it), but it references image/kept.png.
        ("https://other-cdn.example.com/image/kept.png".into(), None),
        (
            format!("{CDN}sub/dir/x+y.png"),
            Some("image/sub/dir/x+y.png"),
        ),
        (format!("{CDN}kept2.png"), Some("image/kept2.png")),
        // The CDN under another scheme and host case: not selected, it references
        // image/kept2.png.
        ("https://CDN.example.com/kept2.png".into(), None),
    ];
    for (url, key) in &rows {
        url_row(&env, url, *key).await;
    }
    let before = values(&env).await;

    planned(&env, &job(&env), 3);
    assert_eq!(values(&env).await, before, "plan changed nothing");
    reported(&env, &job(&env), 3);
    let predicted = read_outcomes(&env.path("plan.csv"));
    let outcomes = read_outcomes(&env.path("run.csv"));
    assert_eq!(predicted, outcomes, "plan predicts run");
    let outcome = |id: usize| outcomes[&id.to_string()].0.as_str();
    for id in [1, 2, 3, 7, 8, 9, 11, 12] {
        assert_eq!(outcome(id), "moved", "row {id}: {outcomes:?}");
    }
    assert_eq!(outcome(5), "invalid_key");
    assert_eq!(outcome(6), "missing_source");
    // Rows under no --source-url are reported, not moved: another spelling the command
    // may have missed.
    for id in [4, 10, 13] {
        assert_eq!(outcome(id), "unmatched", "row {id}");
    }

    let after = values(&env).await;
    let want = [
        format!("{NEW}a%20b.png"),
        format!("{NEW}c.png?v=3"),
        format!("{NEW}%C3%A9t%C3%A9.png#top"),
        before[3].clone(),
        before[4].clone(),
        before[5].clone(),
        format!("{NEW}shared.png"),
        format!("{NEW}shared.png?s=1"),
        format!("{NEW}kept.png"),
        before[9].clone(),
        format!("{NEW}sub/dir/x+y.png"),
        format!("{NEW}kept2.png"),
        before[12].clone(),
    ];
    assert_eq!(after, want);
    env.assert_moved(
        [
            "a b.png",
            "c.png",
            "été.png",
            "shared.png",
            "kept.png",
            "sub/dir/x+y.png",
            "kept2.png",
        ],
        body,
    )
    .await;
    assert_eq!(
        env.keys(&env.src_bucket, "").await,
        ["image/kept.png", "image/kept2.png"],
        "every source deleted but those another spelling's row still references"
    );

    let out = env
        .cmd()
        .arg("verify")
        .args(job(&env))
        .args(["--out", &env.path("verify.csv")])
        .output()
        .unwrap();
    let checks = std::fs::read_to_string(env.path("verify.csv")).unwrap();
    for key in [
        "a b.png",
        "c.png",
        "été.png",
        "shared.png",
        "kept.png",
        "sub/dir/x+y.png",
    ] {
        assert!(
            checks.contains(&format!("avatar/{key},ok")),
            "{key} verified: {checks}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The row naming a missing object is still on the source side; the malformed one
    // names none (not `missing`).
    assert!(checks.contains("image/missing.png,missing"), "{checks}");
    assert!(!checks.contains("100"), "{checks}");

    exits(
        env.cmd()
            .arg("rollback")
            .args(job(&env))
            .args(["--report", &env.path("back.csv")]),
        0,
    );
    assert_eq!(
        values(&env).await,
        before,
        "rollback returns every value exactly"
    );
    let mut back = env.keys(&env.src_bucket, "").await;
    back.sort();
    assert_eq!(
        back,
        [
            "image/a b.png",
            "image/c.png",
            "image/kept.png",
            "image/kept2.png",
            "image/shared.png",
            "image/sub/dir/x+y.png",
            "image/été.png"
        ]
    );
    // The copies are removed, but those a row the job did not select may still use:
    // rows 10 and 13 end in kept.png and kept2.png, which a CDN serving avatar/ might
    // spell so. Kept rather than lost.
    let mut made = env.keys(&env.dst_bucket, "").await;
    made.sort();
    assert_eq!(made, ["avatar/kept.png", "avatar/kept2.png"]);

    exits(env.cmd().arg("run").args(job(&env)), 3);
    assert_eq!(
        values(&env).await,
        after,
        "the job runs again after a rollback"
    );
}

/// Promise 1 for this shape (found by review): a row the job does not select may spell
/// a source object some other way — protocol-relative, a path alone, a bare key with a
/// query, a CDN at a path the command does not name, the named prefix with an encoded
/// character, `s3://`, path-style. Each keeps its object; the object only a moved row
/// referenced is deleted. On the code before, the first five were deleted.
#[tokio::test(flavor = "multi_thread")]
async fn every_spelling_of_a_source_keeps_it() {
    let env = TestEnv::new("urls-spellings").await;
    urls_table(&env).await;
    let src = env.src_bucket.clone();
    let others = [
        "//legacy-s3.s3.eu-west-1.amazonaws.com/image/s1.png".to_owned(),
        "/image/s2.png".to_owned(),
        "image/s3.png?v=1".to_owned(),
        "https://static.example.com/media/s4.png".to_owned(),
        "https://legacy-s3.s3.eu-west-1.amazonaws.com/%69mage/s5.png".to_owned(),
        format!("s3://{src}/image/s6.png"),
        format!("https://s3.eu-west-1.amazonaws.com/{src}/image/s7.png"),
        // Encoded in the last segment: a '/' and a '.'.
        "https://static.example.com/image%2Fs8.png".to_owned(),
        "https://static.example.com/x/s9%2Epng".to_owned(),
        // As a browser reads them: '\' as '/', trailing spaces and line breaks dropped.
        r"https://static.example.com\image\s10.png".to_owned(),
        "https://static.example.com/media/s11.png ".to_owned(),
        "https://static.example.com/media/s12.png\n".to_owned(),
    ];
    url_row(&env, &format!("{LEGACY}s0.png"), Some("image/s0.png")).await;
    for (n, other) in others.iter().enumerate() {
        let key = format!("image/s{}.png", n + 1);
        url_row(&env, &format!("{LEGACY}s{}.png", n + 1), Some(&key)).await;
        url_row(&env, other, None).await;
    }
    reported(&env, &job(&env), 3);
    let outcomes = read_outcomes(&env.path("run.csv"));
    assert_eq!(outcomes.len(), 1 + 2 * others.len(), "{outcomes:?}");
    for (id, (o, _)) in &outcomes {
        let id: u32 = id.parse().unwrap();
        // Row 1 and each even row are selected spellings; each odd row after is another.
        let want = if id == 1 || id.is_multiple_of(2) {
            "moved"
        } else {
            "unmatched"
        };
        assert_eq!(o, want, "row {id}: {outcomes:?}");
    }
    let mut left = env.keys(&src, "").await;
    left.sort();
    let mut kept: Vec<String> = (1..=others.len())
        .map(|n| format!("image/s{n}.png"))
        .collect();
    kept.sort();
    assert_eq!(left, kept, "each source another spelling names is kept");
    let v = values(&env).await;
    for other in &others {
        assert!(v.contains(other), "{other} left as it was");
    }
}

/// Found by review: an `s3://` URI has no query or fragment, so its `?` and `#` belong to
/// the key. The reference check cut them off as a query and a fragment: on the code
/// before, both sources were deleted while these URIs still named them.
#[tokio::test(flavor = "multi_thread")]
async fn an_s3_uri_keeps_a_key_with_a_question_mark_or_a_hash() {
    let env = TestEnv::new("urls-s3-uri").await;
    urls_table(&env).await;
    let src = env.src_bucket.clone();
    url_row(&env, &format!("{LEGACY}q%3F1.png"), Some("image/q?1.png")).await;
    url_row(&env, &format!("{LEGACY}h%232.png"), Some("image/h#2.png")).await;
    url_row(&env, &format!("s3://{src}/image/q?1.png"), None).await;
    url_row(&env, &format!("s3://{src}/image/h#2.png"), None).await;
    reported(&env, &job(&env), 3);
    let v = values(&env).await;
    assert!(v.contains(&format!("{NEW}q%3F1.png")), "{v:?}");
    let mut left = env.keys(&src, "").await;
    left.sort();
    assert_eq!(left, ["image/h#2.png", "image/q?1.png"]);
}

/// A `--rewrite` changes the key's rest: the new URL encodes it as the old one was
/// encoded (a space the old URL encoded is encoded, a '+' it carried stays), characters
/// it gives no example of by RFC 3986.
#[tokio::test(flavor = "multi_thread")]
async fn a_rewritten_key_is_encoded_like_the_old_url() {
    let env = TestEnv::new("urls-rewrite").await;
    urls_table(&env).await;
    url_row(
        &env,
        &format!("{LEGACY}a%20b+c.png?x=1"),
        Some("image/a b+c.png"),
    )
    .await;
    url_row(&env, &format!("{CDN}%c3%a9.png"), Some("image/é.png")).await;
    exits(
        env.cmd().arg("run").args(job(&env)).args([
            "--rewrite",
            r"^(.*)\.png$",
            "--to",
            "$1 [big]+ü.png",
        ]),
        0,
    );
    assert_eq!(
        values(&env).await,
        [
            format!("{NEW}a%20b+c%20%5Bbig%5D+%C3%BC.png?x=1"),
            format!("{NEW}%c3%a9%20%5bbig%5d%2b%c3%bc.png"),
        ]
    );
    for key in ["a b+c [big]+ü.png", "é [big]+ü.png"] {
        assert!(
            env.s3
                .ep()
                .head(&env.dst_bucket, &format!("avatar/{key}"))
                .await
                .unwrap()
                .is_some(),
            "{key}"
        );
    }
}

/// Promise 3: the application rewrites a row (a new query string: the same object)
/// while relocator's commit waits on it. The compare-and-swap is on the whole old value:
/// the row is not rewritten, and its object is kept, since the application's new value
/// still references it.
#[tokio::test(flavor = "multi_thread")]
async fn a_url_the_application_changes_meanwhile_is_left_alone() {
    let env = TestEnv::new("urls-cas").await;
    urls_table(&env).await;
    for n in 0..3 {
        let key = format!("image/{n}.png");
        url_row(&env, &format!("{LEGACY}{n}.png"), Some(&key)).await;
    }
    run_while_the_application_writes(
        &env,
        &job(&env),
        "UPDATE avatars SET avatar_url = avatar_url || '?v=2' WHERE id = 2",
    )
    .await;
    let outcomes = read_outcomes(&env.path("run.csv"));
    assert_eq!(outcomes["2"].0, "changed_by_app", "{outcomes:?}");
    assert_eq!(
        values(&env).await,
        [
            format!("{NEW}0.png"),
            format!("{LEGACY}1.png?v=2"),
            format!("{NEW}2.png"),
        ]
    );
    assert_eq!(
        env.keys(&env.src_bucket, "").await,
        ["image/1.png"],
        "its source is kept"
    );
}

/// Promise 4: killed with SIGKILL at rising moments and rerun, the job converges: every
/// row holds its new URL, every object is byte-identical at its new key, no source is
/// left.
#[tokio::test(flavor = "multi_thread")]
async fn killed_url_runs_converge() {
    let env = TestEnv::new("urls-kill").await;
    urls_table(&env).await;
    let n = 50;
    for i in 0..n {
        let (url, key) = if i % 2 == 0 {
            (format!("{LEGACY}n%20{i}.png"), format!("image/n {i}.png"))
        } else {
            (
                format!("{CDN}n%20{i}.png?i={i}"),
                format!("image/n {i}.png"),
            )
        };
        url_row(&env, &url, Some(&key)).await;
    }
    let kills = killed_until_done(&env, &job(&env), "4").await;
    for (i, v) in values(&env).await.iter().enumerate() {
        let want = if i % 2 == 0 {
            format!("{NEW}n%20{i}.png")
        } else {
            format!("{NEW}n%20{i}.png?i={i}")
        };
        assert_eq!(v, &want, "row {}", i + 1);
        let bytes = env
            .s3
            .ep()
            .get_bytes(&env.dst_bucket, &format!("avatar/n {i}.png"))
            .await
            .unwrap();
        assert_eq!(bytes, body(&format!("image/n {i}.png")));
    }
    assert!(
        env.keys(&env.src_bucket, "").await.is_empty(),
        "no source left (after {kills} kills)"
    );
    let s = read_summary(&env.path("s.json"));
    assert_eq!(s["outcomes"]["moved"].as_u64().unwrap_or(0), 0, "{s}");
}

/// Bad URL options: exit 2, a message naming the problem, nothing changed.
#[tokio::test(flavor = "multi_thread")]
async fn url_options_that_make_the_job_ambiguous_are_refused() {
    let env = TestEnv::new("urls-usage").await;
    urls_table(&env).await;
    url_row(&env, &format!("{LEGACY}a.png"), Some("image/a.png")).await;
    let base = |extra: &[&str]| {
        let mut c = env.cmd();
        c.args(["run", "--table", "avatars", "--path-column", "avatar_url"])
            .args(["--source", &env.source(), "--dest", &env.dest()])
            .args(extra);
        c
    };
    let cases: [(&[&str], &str); 7] = [
        (
            &[
                "--source-url",
                LEGACY,
                "--dest-url",
                "https://new-cdn.example.com/avatar",
            ],
            "does not end with '/'",
        ),
        (&["--source-url", LEGACY], "--dest-url"),
        (&["--dest-url", NEW], "--source-url"),
        (
            &[
                "--source-url",
                LEGACY,
                "--source-url",
                "https://legacy-s3.s3.eu-west-1.amazonaws.com/",
                "--dest-url",
                NEW,
            ],
            "overlap",
        ),
        (&["--source-url", LEGACY, "--dest-url", LEGACY], "overlap"),
        (
            &["--source-url", "legacy-s3/image/", "--dest-url", NEW],
            "is not a URL",
        ),
        (
            &[
                "--source-url",
                LEGACY,
                "--dest-url",
                NEW,
                "--service-column",
                "note",
                "--source-service",
                "a",
                "--dest-service",
                "b",
            ],
            "--service-column",
        ),
    ];
    assert_refused(base, cases);
    assert_eq!(values(&env).await, [format!("{LEGACY}a.png")]);
    assert_eq!(env.keys(&env.src_bucket, "").await, ["image/a.png"]);
}
