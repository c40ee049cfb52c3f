//! The JSON document shape (`--json-key`, `--json-set`): Shrine's attachment data, a
//! `jsonb` or `json` column whose `id` and `derivatives.<name>.id` fields hold keys.
//! Several references in one row, rewritten together. Each promise for this shape, and a
//! kill-and-rerun.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::ClientExt;

use common::{
    assert_refused, assert_rows_moved, assert_verified, exits, killed_until_done, planned,
    read_summary, reported, run_while_the_application_writes, TestEnv,
};

async fn photos_table(env: &TestEnv, ty: &str) {
    env.db()
        .await
        .batch_execute(&format!(
            "CREATE TABLE photos (id serial PRIMARY KEY, image_data {ty})"
        ))
        .await
        .unwrap();
}

fn body(key: &str) -> Vec<u8> {
    format!("bytes of {key} ")
        .repeat(key.len() * 11)
        .into_bytes()
}

async fn object(env: &TestEnv, key: &str) {
    env.s3
        .ep()
        .put(&env.src_bucket, key, body(key), "image/png")
        .await
        .unwrap();
}

/// A row holding `doc` (as the column's type has it: a json column keeps its text).
async fn photo(env: &TestEnv, doc: &str) {
    let db = env.db().await;
    let ty: String = db
        .query_one(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = 'photos'::regclass AND attname = 'image_data'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    db.execute(
        &format!("INSERT INTO photos (image_data) VALUES ($1::text::{ty})"),
        &[&doc],
    )
    .await
    .unwrap_or_else(|e| panic!("{doc}: {e}"));
}

/// Shrine's data for an upload at `key`, with a `thumb` derivative at `thumb` if given.
fn shrine(key: &str, thumb: Option<&str>) -> String {
    let meta = r#""metadata": {"size": 512, "filename": "a.png", "mime_type": "image/png"}"#;
    match thumb {
        Some(t) => format!(
            r#"{{"id": "{key}", "storage": "legacy", {meta}, "derivatives": {{"thumb": {{"id": "{t}", "storage": "legacy", "metadata": {{"size": 64}}}}}}}}"#
        ),
        None => format!(r#"{{"id": "{key}", "storage": "legacy", {meta}}}"#),
    }
}

/// The job: `id` and `derivatives.thumb.id` hold keys; a moved one gets storage=store.
fn job(env: &TestEnv) -> Vec<String> {
    [
        "--table",
        "photos",
        "--path-column",
        "image_data",
        "--json-key",
        "id",
        "--json-key",
        "derivatives.thumb.id",
        "--json-set",
        "storage=store",
    ]
    .into_iter()
    .map(String::from)
    .chain(["--source".into(), env.source(), "--dest".into(), env.dest()])
    .collect()
}

/// Each row's document as text (json: as stored; jsonb: PostgreSQL's form).
async fn docs(env: &TestEnv) -> Vec<String> {
    env.db()
        .await
        .query("SELECT image_data::text FROM photos ORDER BY id", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

/// Report lines as (id, outcome, detail), in file order.
fn lines(path: &str) -> Vec<(String, String, String)> {
    let mut r = csv::Reader::from_path(path).unwrap();
    r.records()
        .map(|rec| {
            let rec = rec.unwrap();
            (rec[0].to_owned(), rec[3].to_owned(), rec[4].to_owned())
        })
        .collect()
}

/// #18 item 2, on a `jsonb` or `json` column. Rows: a photo with a thumb; one without
/// derivatives; one whose thumb object is missing (its `id` is `held_back`); one under
/// another prefix (not selected); one whose thumb is already at the destination; one whose
/// document names another row's object in a field the command does not list. `plan`
/// predicts `run` line for line; moved keys and `storage` change and nothing else in the
/// document; objects are byte-identical at their new keys; the sources go except the one
/// the unlisted field names; `verify` finds every moved key; `rollback` returns every
/// document exactly.
async fn documents_move_field_by_field(ty: &str) {
    let env = TestEnv::new(&format!("json-{ty}")).await;
    photos_table(&env, ty).await;
    for k in [
        "image/a.png",
        "image/a_t.png",
        "image/b.png",
        "image/c.png",
        "image/e.png",
    ] {
        object(&env, k).await;
    }
    env.s3
        .ep()
        .put(
            &env.dst_bucket,
            "avatar/e_t.png",
            body("image/e_t.png"),
            "image/png",
        )
        .await
        .unwrap();
    // A json or text column keeps the text as written: odd spacing, a number spelled
    // 1.50e2.
    let first = if ty != "jsonb" {
        r#"{ "id":"image/a.png" ,"storage":"legacy","metadata":{"size":1.50e2},
 "derivatives":{"thumb":{"id":"image/a_t.png","storage":"legacy"}}}"#
            .to_owned()
    } else {
        shrine("image/a.png", Some("image/a_t.png"))
    };
    photo(&env, &first).await;
    photo(&env, &shrine("image/b.png", None)).await;
    photo(&env, &shrine("image/c.png", Some("image/c_t.png"))).await;
    photo(&env, &shrine("other/d.png", None)).await;
    photo(&env, &shrine("image/e.png", Some("avatar/e_t.png"))).await;
    photo(
        &env,
        r#"{"id": "elsewhere/f.png", "derivatives": {"large": {"id": "image/b.png"}}}"#,
    )
    .await;
    if ty == "text" {
        // A text column may hold a value that is no JSON: not selected, left alone.
        photo(&env, r#"{"id": "elsewhere/z.png", oops"#).await;
    }
    let before = docs(&env).await;

    planned(&env, &job(&env), 3);
    assert_eq!(docs(&env).await, before, "plan changed nothing");
    reported(&env, &job(&env), 3);
    let mut predicted = lines(&env.path("plan.csv"));
    let mut got = lines(&env.path("run.csv"));
    for l in predicted.iter_mut().chain(got.iter_mut()) {
        l.2 = l.2.split(':').next().unwrap().to_owned();
    }
    predicted.sort();
    got.sort();
    assert_eq!(predicted, got, "plan predicts run, line for line");
    let outcome = |id: &str, at: &str| {
        got.iter()
            .find(|(i, _, d)| i == id && d == at)
            .map(|(_, o, _)| o.clone())
            .unwrap_or_else(|| panic!("no line for row {id} {at}: {got:?}"))
    };
    assert_eq!(outcome("1", "id"), "moved");
    assert_eq!(outcome("1", "derivatives.thumb.id"), "moved");
    assert_eq!(outcome("2", "id"), "moved");
    assert_eq!(outcome("3", "id"), "held_back");
    assert_eq!(outcome("3", "derivatives.thumb.id"), "missing_source");
    assert_eq!(outcome("5", "id"), "moved");
    assert_eq!(got.len(), 6, "{got:?}");

    let after = docs(&env).await;
    if ty != "jsonb" {
        assert_eq!(
            after[0],
            r#"{ "id":"avatar/a.png" ,"storage":"store","metadata":{"size":1.50e2},
 "derivatives":{"thumb":{"id":"avatar/a_t.png","storage":"store"}}}"#,
            "only the keys and storage change, byte for byte"
        );
    } else {
        let want: serde_json::Value = serde_json::from_str(
            &shrine("avatar/a.png", Some("avatar/a_t.png")).replace("legacy", "store"),
        )
        .unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&after[0]).unwrap(),
            want
        );
    }
    let value = |i: usize| serde_json::from_str::<serde_json::Value>(&after[i]).unwrap();
    assert_eq!(value(1)["id"], "avatar/b.png");
    assert_eq!(value(1)["storage"], "store");
    assert_eq!(value(1)["metadata"]["filename"], "a.png");
    assert_eq!(after[2], before[2], "held back: unchanged");
    assert_eq!(after[3], before[3], "not selected");
    assert_eq!(value(4)["id"], "avatar/e.png");
    assert_eq!(
        value(4)["derivatives"]["thumb"]["storage"],
        "legacy",
        "a derivative already at the destination is not touched"
    );
    assert_eq!(after[5], before[5]);
    env.assert_moved(["a.png", "a_t.png", "b.png", "e.png"], body)
        .await;
    let mut left = env.keys(&env.src_bucket, "").await;
    left.sort();
    assert_eq!(
        left,
        ["image/b.png", "image/c.png"],
        "sources go, except one a field the command does not list names, and the held row's"
    );
    let made = env.keys(&env.dst_bucket, "").await;
    assert!(
        !made.contains(&"avatar/c.png".to_owned()),
        "the held-back row's copy is taken back: {made:?}"
    );

    assert_verified(
        &env,
        &job(&env),
        &["a.png", "a_t.png", "b.png", "e.png", "e_t.png"],
    );

    exits(
        env.cmd()
            .arg("rollback")
            .args(job(&env))
            .args(["--report", &env.path("back.csv")]),
        0,
    );
    assert_eq!(
        docs(&env).await,
        before,
        "rollback returns every document exactly"
    );
    let mut back = env.keys(&env.src_bucket, "").await;
    back.sort();
    assert_eq!(
        back,
        [
            "image/a.png",
            "image/a_t.png",
            "image/b.png",
            "image/c.png",
            "image/e.png"
        ]
    );
    assert_eq!(
        env.keys(&env.dst_bucket, "").await,
        ["avatar/e_t.png"],
        "the copies are removed; the object that was there stays"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn jsonb_documents_move_field_by_field() {
    documents_move_field_by_field("jsonb").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn json_documents_move_field_by_field_byte_for_byte() {
    documents_move_field_by_field("json").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn documents_in_a_text_column_move_byte_for_byte() {
    documents_move_field_by_field("text").await;
}

/// Promise 3: the application changes a document (its metadata, not its keys) while
/// relocator's commit waits on the row. The compare-and-swap is on the whole document:
/// the row is not rewritten, and its objects are kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_document_the_application_changes_meanwhile_is_left_alone() {
    let env = TestEnv::new("json-cas").await;
    photos_table(&env, "jsonb").await;
    for n in 0..3 {
        let (k, t) = (format!("image/{n}.png"), format!("image/{n}_t.png"));
        object(&env, &k).await;
        object(&env, &t).await;
        photo(&env, &shrine(&k, Some(&t))).await;
    }
    run_while_the_application_writes(
        &env,
        &job(&env),
        "UPDATE photos SET image_data = jsonb_set(image_data, '{metadata,size}', '513')
          WHERE id = 2",
    )
    .await;
    let got = lines(&env.path("run.csv"));
    let changed: Vec<_> = got.iter().filter(|(id, _, _)| id == "2").collect();
    assert_eq!(changed.len(), 2, "{got:?}");
    assert!(
        changed.iter().all(|(_, o, _)| o == "changed_by_app"),
        "{got:?}"
    );
    let d: serde_json::Value = serde_json::from_str(&docs(&env).await[1]).unwrap();
    assert_eq!(d["id"], "image/1.png");
    assert_eq!(d["metadata"]["size"], 513);
    let mut left = env.keys(&env.src_bucket, "").await;
    left.sort();
    assert_eq!(
        left,
        ["image/1.png", "image/1_t.png"],
        "its sources are kept"
    );
}

/// Promise 4: killed with SIGKILL at rising moments and rerun, the job converges: every
/// document holds its new keys, every object is at its new key byte for byte, no source
/// is left.
#[tokio::test(flavor = "multi_thread")]
async fn killed_document_runs_converge() {
    let env = TestEnv::new("json-kill").await;
    photos_table(&env, "jsonb").await;
    let n = 30;
    for i in 0..n {
        let (k, t) = (format!("image/{i}.png"), format!("image/{i}_t.png"));
        object(&env, &k).await;
        object(&env, &t).await;
        photo(&env, &shrine(&k, Some(&t))).await;
    }
    let kills = killed_until_done(&env, &job(&env), "3").await;
    for (i, d) in docs(&env).await.iter().enumerate() {
        let d: serde_json::Value = serde_json::from_str(d).unwrap();
        assert_eq!(d["id"], format!("avatar/{i}.png"));
        assert_eq!(d["derivatives"]["thumb"]["id"], format!("avatar/{i}_t.png"));
        env.assert_moved([format!("{i}.png"), format!("{i}_t.png")], body)
            .await;
    }
    assert!(
        env.keys(&env.src_bucket, "").await.is_empty(),
        "no source left (after {kills} kills)"
    );
    let s = read_summary(&env.path("s.json"));
    assert_eq!(s["outcomes"]["moved"].as_u64().unwrap_or(0), 0, "{s}");
}

/// Bad JSON options: exit 2, a message naming the problem, nothing changed.
#[tokio::test(flavor = "multi_thread")]
async fn json_options_that_make_the_job_ambiguous_are_refused() {
    let env = TestEnv::new("json-usage").await;
    photos_table(&env, "jsonb").await;
    env.db()
        .await
        .batch_execute("ALTER TABLE photos ADD COLUMN n integer, ADD COLUMN checksum text")
        .await
        .unwrap();
    object(&env, "image/a.png").await;
    photo(&env, &shrine("image/a.png", None)).await;
    let base = |extra: &[&str]| {
        let mut c = env.cmd();
        c.args(["run", "--table", "photos"])
            .args(["--source", &env.source(), "--dest", &env.dest()])
            .args(extra);
        c
    };
    let cases: [(&[&str], &str); 8] = [
        (&["--path-column", "image_data"], "--json-key"),
        (&["--path-column", "n", "--json-key", "id"], "json/jsonb"),
        (
            &[
                "--path-column",
                "image_data",
                "--json-key",
                "derivatives.thumb.id",
                "--json-set",
                "derivatives=x",
            ],
            "reads through",
        ),
        (
            &[
                "--path-column",
                "image_data",
                "--json-key",
                "a",
                "--json-key",
                "a.id",
            ],
            "one is inside the other",
        ),
        (
            &["--path-column", "image_data", "--json-set", "storage=store"],
            "--json-key",
        ),
        (
            &[
                "--path-column",
                "image_data",
                "--json-key",
                "id",
                "--json-set",
                "id=x",
            ],
            "names a field --json-key moves",
        ),
        (
            &[
                "--path-column",
                "image_data",
                "--json-key",
                "id",
                "--checksum-column",
                "checksum",
            ],
            "--checksum-column",
        ),
        (
            &[
                "--path-column",
                "image_data",
                "--json-key",
                "id",
                "--source-url",
                "https://a.example/",
                "--dest-url",
                "https://b.example/",
            ],
            "different shapes",
        ),
    ];
    assert_refused(base, cases);
    assert_eq!(docs(&env).await.len(), 1);
    assert_eq!(env.keys(&env.src_bucket, "").await, ["image/a.png"]);
}

/// Found by review: a `json` document `jsonb` cannot hold (a number beyond `numeric`,
/// `\u0000`) made every statement reading the column fail, for good; then, read as NULL,
/// it was not selected at all, so `run`, `status` and `verify` said nothing was left while
/// it still named a source. It is found by its text now (a listed field's name, then a
/// string under the prefix, its `/` written `/` or `\/`), read by relocator, and moved;
/// a key only in an unlisted field of such a document still keeps its object.
#[tokio::test(flavor = "multi_thread")]
async fn a_json_document_jsonb_cannot_hold_moves_and_keeps_what_it_names() {
    let env = TestEnv::new("json-huge").await;
    photos_table(&env, "json").await;
    for k in ["image/a.png", "image/b.png", "image/c.png", "image/d.png"] {
        object(&env, k).await;
    }
    photo(&env, r#"{"id": "image/a.png"}"#).await;
    photo(&env, r#"{"id": "image/b.png", "n": 1e999999}"#).await;
    photo(&env, r#"{"id": "image/c.png"}"#).await;
    photo(&env, r#"{"x": 1e999999, "other": "image/a.png"}"#).await;
    photo(&env, r#"{"id" : "image\/d.png", "s": "a\u0000b"}"#).await;
    planned(&env, &job(&env), 0);
    reported(&env, &job(&env), 0);
    let got = lines(&env.path("run.csv"));
    let outcomes = |l: &[(String, String, String)]| -> Vec<(String, String)> {
        l.iter().map(|(id, o, _)| (id.clone(), o.clone())).collect()
    };
    let planned = lines(&env.path("plan.csv"));
    assert_eq!(outcomes(&planned), outcomes(&got), "plan predicts run");
    assert_eq!(got.len(), 4, "{got:?}");
    assert!(got.iter().all(|(_, o, _)| o == "moved"), "{got:?}");
    let after = docs(&env).await;
    assert_eq!(
        after[1],
        r#"{"id": "avatar/b.png", "n": 1e999999, "storage": "store"}"#
    );
    assert_eq!(after[3], r#"{"x": 1e999999, "other": "image/a.png"}"#);
    assert_eq!(
        after[4],
        r#"{"id" : "avatar/d.png", "s": "a\u0000b", "storage": "store"}"#
    );
    env.assert_moved(["a.png", "b.png", "c.png", "d.png"], body)
        .await;
    assert_eq!(
        env.keys(&env.src_bucket, "").await,
        ["image/a.png"],
        "a.png is named in a document jsonb cannot read"
    );
    assert_rows_moved(&env, &job(&env), 4);
    exits(
        env.cmd()
            .arg("verify")
            .args(job(&env))
            .args(["--out", &env.path("verify.csv")]),
        0,
    );
    let checks = std::fs::read_to_string(env.path("verify.csv")).unwrap();
    for k in ["a.png", "b.png", "c.png", "d.png"] {
        assert!(checks.contains(&format!("avatar/{k},ok")), "{k}: {checks}");
    }
    assert!(
        checks.contains("image/a.png,kept_referenced"),
        "a source an unlisted field names is kept on purpose: {checks}"
    );
    assert_eq!(checks.lines().count(), 6, "one line per key: {checks}");
}

/// Found by review: one object at two fields of a document is one move (one line naming
/// both fields), so its cleanup is finished once; on the code before, two ledger moves
/// were written, one of them left pending, and the next run reported it `already_moved`.
#[tokio::test(flavor = "multi_thread")]
async fn one_object_at_two_fields_is_one_move() {
    let env = TestEnv::new("json-twice").await;
    photos_table(&env, "jsonb").await;
    object(&env, "image/a.png").await;
    photo(&env, &shrine("image/a.png", Some("image/a.png"))).await;
    reported(&env, &job(&env), 0);
    let got = lines(&env.path("run.csv"));
    assert_eq!(got.len(), 1, "{got:?}");
    let d: serde_json::Value = serde_json::from_str(&docs(&env).await[0]).unwrap();
    assert_eq!(d["id"], "avatar/a.png");
    assert_eq!(d["derivatives"]["thumb"]["id"], "avatar/a.png");
    assert!(env.keys(&env.src_bucket, "").await.is_empty());
    exits(
        env.cmd()
            .arg("run")
            .args(job(&env))
            .args(["--report", &env.path("again.csv")]),
        0,
    );
    assert!(
        lines(&env.path("again.csv")).is_empty(),
        "nothing left to report"
    );
}

/// Found by review: the reference check read a `json` or `text` document through its
/// `jsonb` form, or, where `jsonb` cannot read it, looked for the key in its raw text. A
/// key written with JSON escapes (`image\/e.png`, PHP's default; `caf\u00e9`, Python's) in
/// an unlisted field of a document `jsonb` cannot read, and the first of two fields of one
/// name (`jsonb` keeps the last), were invisible to it, as was, in a `text` column, a document cut short
/// inside its last string: on the code before, the other row naming the same key moved
/// and the source was deleted while these rows still named it.
async fn every_string_of_a_document_as_written_keeps_its_object(ty: &str) {
    let env = TestEnv::new(&format!("json-esc-{ty}")).await;
    photos_table(&env, ty).await;
    // (a document naming a key in a way only its text shows, the key)
    let mut named: Vec<(&str, &str)> = vec![
        // A key stored as a field name, and a document stored as a string in another.
        (r#"{"by_key": {"image/g.png": 1}}"#, "image/g.png"),
        (r#"{"meta": "{\"id\": \"image/h.png\"}"}"#, "image/h.png"),
    ];
    if ty != "jsonb" {
        named.extend([
            (r#"{"other": "image\/e.png", "n": 1e999999}"#, "image/e.png"),
            (
                r#"{"other": "image/caf\u00e9.png", "n": 1e999999}"#,
                "image/café.png",
            ),
            (
                r#"{"id": "image/d.png", "id": "image/z.png"}"#,
                "image/d.png",
            ),
        ]);
    }
    if ty == "text" {
        named.extend([
            (r#"no json, but {"id": "image\/f.png"#, "image/f.png"),
            (r#"{"m": "image\u002fi.png\"#, "image/i.png"),
            (r#"x" {"m": "image\/j.png"}"#, "image/j.png"),
        ]);
    }
    let mut kept: Vec<&str> = named.iter().map(|(_, k)| *k).collect();
    kept.sort();
    for k in &kept {
        object(&env, k).await;
    }
    for (doc, _) in &named {
        photo(&env, doc).await;
    }
    for k in &kept {
        photo(&env, &format!(r#"{{"id": "{k}"}}"#)).await;
    }
    // A document with `id` twice, or no JSON, is `invalid_key`: exit 3.
    let code = if ty == "jsonb" { 0 } else { 3 };
    exits(env.cmd().arg("run").args(job(&env)), code);
    let after = docs(&env).await;
    for k in &kept {
        let moved = format!(r#""{}""#, k.replace("image/", "avatar/"));
        assert!(
            after.iter().any(|d| d.contains(&moved)),
            "{k}'s plain row moved: {after:?}"
        );
    }
    let mut left = env.keys(&env.src_bucket, "").await;
    left.sort();
    assert_eq!(left, kept, "every source another row still names is kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_string_of_a_json_document_as_written_keeps_its_object() {
    every_string_of_a_document_as_written_keeps_its_object("json").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_string_of_a_text_document_as_written_keeps_its_object() {
    every_string_of_a_document_as_written_keeps_its_object("text").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_string_of_a_jsonb_document_keeps_its_object() {
    every_string_of_a_document_as_written_keeps_its_object("jsonb").await;
}
