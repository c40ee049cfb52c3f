//! The promises under forced interleavings: a second session holding a row lock or an
//! open INSERT, the application replacing an object at the right moment, a second job on
//! the same table, a stray key in the listing, a slow but live worker. Each test names
//! what it protects; each failed on the code before its fix.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::ClientExt;

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proxy::{Fault, FaultProxy};
use common::{read_summary, until_a_session_waits_for_a_lock, TestEnv};

/// The table as the application has it, without the seeder: `avatars(id, path)`, with
/// or without the index on `path` (without it the run takes phase 2: HEAD per object,
/// batches of ids).
async fn table(env: &TestEnv, path_index: bool) {
    let db = env.db().await;
    db.batch_execute("CREATE TABLE avatars (id serial PRIMARY KEY, path varchar)")
        .await
        .unwrap();
    if path_index {
        db.batch_execute("CREATE INDEX avatars_path_idx ON avatars (path)")
            .await
            .unwrap();
    }
}

async fn put(env: &TestEnv, bucket: &str, key: &str, body: &[u8]) {
    env.s3
        .ep()
        .put(bucket, key, body.to_vec(), "image/png")
        .await
        .unwrap_or_else(|e| panic!("putting {key}: {e}"));
}

async fn bytes(env: &TestEnv, bucket: &str, key: &str) -> Option<Vec<u8>> {
    env.s3.ep().get_bytes(bucket, key).await.ok()
}

/// Start the binary in the background.
fn spawn(env: &TestEnv, extra: &[&str]) -> Child {
    env.run_cmd(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> (i32, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Safety #1. Rows 1 and 3 share a key, batches {1,2} and {3,4}. Batch 1 copies it; the
/// application changes row 1 while batch 1's commit waits; batch 2 meanwhile finds the
/// copy identical and relies on it, and its commit is held (row 3 locked) until batch 1's
/// cleanup is over. The copy made for row 1 must not be taken back while batch 2 still
/// commits row 3 onto it.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_a_later_batch_relies_on_is_never_taken_back() {
    let env = TestEnv::new("takeback-race").await;
    table(&env, false).await;
    let shared = b"shared avatar bytes".as_slice();
    put(&env, &env.src_bucket, "image/shared.png", shared).await;
    put(&env, &env.src_bucket, "image/two.png", b"two").await;
    put(&env, &env.src_bucket, "image/four.png", b"four").await;
    put(
        &env,
        &env.src_bucket,
        "image/app-chose-another.png",
        b"app's",
    )
    .await;
    let db = env.db().await;
    db.batch_execute(
        "INSERT INTO avatars (path) VALUES ('image/shared.png'), ('image/two.png'),
                                           ('image/shared.png'), ('image/four.png')",
    )
    .await
    .unwrap();

    // The application holds row 1 while it decides what to do with it, and row 3.
    let mut app = env.db().await;
    let tx = app.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM avatars WHERE id = 1 FOR UPDATE", &[])
        .await
        .unwrap();
    let mut other = env.db().await;
    let holds_row_3 = other.transaction().await.unwrap();
    holds_row_3
        .execute("SELECT 1 FROM avatars WHERE id = 3 FOR UPDATE", &[])
        .await
        .unwrap();
    let child = spawn(&env, &["--batch-size", "2"]);
    until_a_session_waits_for_a_lock(&env).await;
    // Batch 2 is copied (HEAD finds the identical copy) while batch 1 waits.
    tokio::time::sleep(Duration::from_secs(2)).await;
    tx.execute(
        "UPDATE avatars SET path = 'image/app-chose-another.png' WHERE id = 1",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    // Batch 1 commits without row 1 and is cleaned up; batch 2 waits for row 3.
    tokio::time::sleep(Duration::from_secs(3)).await;
    holds_row_3.rollback().await.unwrap();
    let (code, err) = finish(child);
    assert_eq!(code, 3, "row 1 changed by the app needs attention: {err}");

    let rows = env.rows().await;
    assert_eq!(rows[2].1, "avatar/shared.png", "row 3 was moved");
    assert_eq!(
        bytes(&env, &env.dst_bucket, "avatar/shared.png")
            .await
            .as_deref(),
        Some(shared),
        "row 3 points at the copy, which must still be there"
    );
    env.assert_no_row_dangles().await;
}

/// Safety #3. Phase 1 lists the destination range of a page of source keys. A stray
/// source object no row references whose key cannot be mapped (too long once moved)
/// sorts last: the listing must still cover every pair copied, so the different object
/// already at a row's destination is found and never overwritten.
#[tokio::test(flavor = "multi_thread")]
async fn a_stray_unmappable_key_does_not_blind_the_destination_listing() {
    let env = TestEnv::new("stray-key").await;
    table(&env, true).await;
    env.put_row("image/a.png", b"the row's avatar".to_vec())
        .await;
    let stray = format!("image/{}", "z".repeat(1018)); // 1025 bytes under avatar/
    put(&env, &env.src_bucket, &stray, b"nobody's").await;
    let foreign = b"someone else's object".as_slice();
    put(&env, &env.dst_bucket, "avatar/a.png", foreign).await;
    let (code, err) = env.run(&["--report", &env.path("r.csv")]);
    assert_eq!(code, 3, "{err}");
    assert_eq!(
        bytes(&env, &env.dst_bucket, "avatar/a.png")
            .await
            .as_deref(),
        Some(foreign),
        "the different object at the destination was overwritten"
    );
    assert_eq!(env.rows().await[0].1, "image/a.png", "the row stays");
    assert!(bytes(&env, &env.src_bucket, "image/a.png").await.is_some());
    let outcomes = common::read_outcomes(&env.path("r.csv"));
    assert_eq!(outcomes["1"].0, "conflict");
}

/// Safety #4. Job A (column `path`) commits and dies before its cleanup. A row of the
/// application then references A's legacy key again. Job B on the same table but another
/// column must not finish A's cleanup (it would check references in its own column and
/// delete what `path` still references); A's own rerun finds the reference and keeps it.
#[tokio::test(flavor = "multi_thread")]
async fn another_job_on_the_table_never_finishes_this_jobs_cleanup() {
    let env = TestEnv::new("other-job").await;
    table(&env, true).await;
    let db = env.db().await;
    db.batch_execute("ALTER TABLE avatars ADD COLUMN thumb varchar")
        .await
        .unwrap();
    env.put_row("image/k.png", b"legacy default".to_vec()).await;

    // A's DeleteObjects fail: it exits 1 after its commit, the cleanup pending.
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(|_, method, path| {
            // DeleteObjects: POST to the bucket itself (path-style, no key).
            if method == "POST" && path.trim_matches('/').split('/').count() == 1 {
                Fault::Internal
            } else {
                Fault::Forward
            }
        }),
    )
    .await;
    let out = env
        .run_cmd(&["--s3-max-attempts", "1"])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.rows().await[0].1, "avatar/k.png", "A committed");

    // The application signs someone up with the legacy default.
    db.batch_execute("INSERT INTO avatars (path) VALUES ('image/k.png')")
        .await
        .unwrap();
    let mut b = env.cmd();
    b.args(["run", "--path-column", "thumb"])
        .args(["--source", &format!("s3://{}/thumbs/", env.src_bucket)])
        .args(["--dest", &format!("s3://{}/thumbs-new/", env.dst_bucket)]);
    let out = b.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        bytes(&env, &env.src_bucket, "image/k.png").await.is_some(),
        "job B deleted an object the path column still references"
    );

    // A's rerun finishes its cleanup (k is referenced by the new row: kept), then moves
    // the new row too.
    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    env.assert_no_row_dangles().await;
    // A's rerun finished its own cleanup; no row was rewritten twice.
    env.assert_ledger_clean().await;
}

/// Safety #6. The application re-uploads the object at the legacy key after relocator
/// copied it (the row is unchanged, so its rewrite commits). The cleanup must see that
/// the source is no longer the object copied, keep the new upload and report it.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_replaced_after_its_copy_is_kept_and_reported() {
    let env = TestEnv::new("src-replaced").await;
    table(&env, true).await;
    env.put_row("image/user-1.png", b"old face".to_vec()).await;
    env.put_row("image/user-2.png", b"other".to_vec()).await;
    let db = env.db().await;
    // Row 2 is held, so the batch's commit waits after the copies are made.
    let mut app = env.db().await;
    let tx = app.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM avatars WHERE id = 2 FOR UPDATE", &[])
        .await
        .unwrap();
    let child = spawn(
        &env,
        &[
            "--report",
            &env.path("r.csv"),
            "--summary-json",
            &env.path("s.json"),
        ],
    );
    until_a_session_waits_for_a_lock(&env).await;
    let new_face = b"new face, uploaded during the move".as_slice();
    put(&env, &env.src_bucket, "image/user-1.png", new_face).await;
    tx.rollback().await.unwrap();
    let (code, err) = finish(child);
    assert_eq!(code, 3, "a replaced source needs attention: {err}");
    assert_eq!(
        bytes(&env, &env.src_bucket, "image/user-1.png")
            .await
            .as_deref(),
        Some(new_face),
        "the application's new upload was deleted"
    );
    assert!(
        bytes(&env, &env.src_bucket, "image/user-2.png")
            .await
            .is_none(),
        "an unchanged source is still deleted"
    );
    let s = read_summary(&env.path("s.json"));
    assert_eq!(s["outcomes"]["source_changed"], 1, "{s}");
    assert_eq!(s["outcomes"]["moved"], 1, "{s}");
    assert_eq!(s["rows_seen"], 2, "one count per row: {s}");
    let cleanup: String = db
        .query_one(
            "SELECT cleanup FROM relocator.moves WHERE row_id = '1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cleanup, "changed");
}

/// Round two #1. An application transaction that inserts a row referencing the legacy
/// key is open while the cleanup checks references: the cleanup must wait for it (and
/// then see the row), not delete the object under it.
#[tokio::test(flavor = "multi_thread")]
async fn a_reference_being_written_during_the_cleanup_is_seen() {
    let env = TestEnv::new("inflight-ref").await;
    table(&env, true).await;
    env.put_row("image/default.png", b"the default avatar".to_vec())
        .await;
    // A sign-up in flight: its row points at the legacy default, not committed yet.
    let mut app = env.db().await;
    let tx = app.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO avatars (path) VALUES ('image/default.png')",
        &[],
    )
    .await
    .unwrap();
    let child = spawn(&env, &[]);
    // The cleanup waits for the open writer. (Before the fix the run did not wait at all:
    // it finished, deleting the object, and this wait timed out.)
    let waited = tokio::time::timeout(
        Duration::from_secs(30),
        until_a_session_waits_for_a_lock(&env),
    )
    .await;
    tx.commit().await.unwrap();
    let (code, err) = finish(child);
    assert!(waited.is_ok(), "the cleanup did not wait for the writer");
    assert_eq!(code, 0, "{err}");
    // The new row was seen: its key kept, or the row moved along with it.
    env.assert_no_row_dangles().await;
}

/// Safety #7. A slow batch (rate-limited far below its work) outlives --lease-ttl: the
/// live worker keeps its lease through heartbeats, so no second worker copies the same
/// batch and records relocator's copies as not its own; rollback then removes every
/// object relocator made.
#[tokio::test(flavor = "multi_thread")]
async fn a_live_worker_keeps_its_lease_through_a_slow_batch() {
    let env = TestEnv::new("heartbeat").await;
    let seeded = env.seed(24, 0).await;
    // Phase 2: one lease of id ranges holds both batches of 12 rows, each batch ~36
    // requests at 6/s — far longer than the TTL; the second worker waits for leases.
    env.db()
        .await
        .batch_execute("DROP INDEX avatars_path_idx")
        .await
        .unwrap();
    let (code, err) = env.run(&[
        "--workers",
        "2",
        "--lease-ttl",
        "2",
        "--max-rps",
        "6",
        "--batch-size",
        "12",
        "--summary-json",
        &env.path("s.json"),
    ]);
    assert_eq!(code, 0, "{err}");
    env.assert_converged(&seeded).await;
    let db = env.db().await;
    let not_ours: i64 = db
        .query_one("SELECT count(*) FROM relocator.moves WHERE NOT copied", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        not_ours, 0,
        "every object relocator made is known as its own"
    );
    let distinct: std::collections::HashSet<&str> =
        seeded.iter().map(|r| r.path.as_str()).collect();
    let s = read_summary(&env.path("s.json"));
    assert_eq!(
        s["counters"]["s3_copies"],
        distinct.len() as u64,
        "no batch was copied twice"
    );
    rollback(&env);
    let left = env.keys(&env.dst_bucket, "avatar/").await;
    assert!(
        left.is_empty(),
        "rollback left relocator's copies: {left:?}"
    );
}

/// Round two #2. Rows the table refuses — a unique index (23505), a trigger that raises
/// (P0001) — are each that row's outcome `rejected`, with PostgreSQL's reason; the rest
/// of the batch commits, the copies made for the refused rows are taken back, the run
/// ends with exit 3. Rows too long for `varchar(40)` or refused by a CHECK on the path
/// are `too_long`, found before their copy (#18).
#[tokio::test(flavor = "multi_thread")]
async fn rows_the_table_refuses_are_rejected_and_the_rest_of_the_batch_moves() {
    let env = TestEnv::new("refused").await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE avatars (
             id serial PRIMARY KEY,
             path varchar(40) UNIQUE CHECK (path NOT LIKE 'avatar/forbidden%'));
         CREATE FUNCTION no_trigger_me() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.path LIKE '%trigger-me%' THEN
                 RAISE EXCEPTION 'the application refuses %', NEW.path;
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER no_trigger_me BEFORE UPDATE ON avatars
             FOR EACH ROW EXECUTE FUNCTION no_trigger_me();",
    )
    .await
    .unwrap();
    let long = format!("image/{}.png", "l".repeat(30)); // 40 characters; 41 once moved
    let rows = [
        "image/ok-1.png",
        long.as_str(),
        "image/forbidden.png",
        "image/trigger-me.png",
        "image/dup.png",
        "avatar/dup.png",
        "image/ok-2.png",
    ];
    for p in rows {
        let bucket = if p.starts_with("avatar/") {
            &env.dst_bucket
        } else {
            &env.src_bucket
        };
        let body = if p.ends_with("dup.png") { "dup" } else { p };
        put(&env, bucket, p, body.as_bytes()).await;
        db.execute("INSERT INTO avatars (path) VALUES ($1)", &[&p])
            .await
            .unwrap();
    }
    // plan predicts each refusal (trying the rewrites in a transaction it rolls back),
    // and changes nothing.
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
    let predicted = common::read_outcomes(&env.path("plan.csv"));
    assert_eq!(
        env.rows()
            .await
            .iter()
            .map(|(_, p)| p.as_str())
            .collect::<Vec<_>>(),
        rows,
        "plan changed nothing"
    );
    let (code, err) = env.run(&["--report", &env.path("r.csv")]);
    assert_eq!(code, 3, "{err}");
    let outcomes = common::read_outcomes(&env.path("r.csv"));
    for id in ["1", "2", "3", "4", "5", "7"] {
        assert_eq!(
            predicted[id].0, outcomes[id].0,
            "plan predicted row {id} as run did: {predicted:?}"
        );
    }
    // Too long for the column, and refused by its CHECK: found before the copy (#18).
    let report = std::fs::read_to_string(env.path("r.csv")).unwrap();
    for (id, named) in [("2", "character varying(40)"), ("3", "avatars_path_check")] {
        assert_eq!(outcomes[id].0, "too_long", "row {id}: {outcomes:?}");
        assert!(
            report.contains(named),
            "{named} named in the report:\n{report}"
        );
    }
    for (id, sqlstate) in [("4", "P0001"), ("5", "23505")] {
        assert_eq!(outcomes[id].0, "rejected", "row {id}: {outcomes:?}");
        let detail = std::fs::read_to_string(env.path("r.csv")).unwrap();
        assert!(
            detail.contains(sqlstate),
            "{sqlstate} named in the report:\n{detail}"
        );
    }
    let now = env.rows().await;
    assert_eq!(now[0].1, "avatar/ok-1.png");
    assert_eq!(now[6].1, "avatar/ok-2.png");
    for (i, p) in rows.iter().enumerate().skip(1).take(5) {
        assert_eq!(&now[i].1, p, "refused row {} is unchanged", i + 1);
    }
    // Sources of refused rows kept; copies made for them taken back; the object another
    // row already pointed at (not relocator's) left alone.
    for p in &rows[1..5] {
        assert!(bytes(&env, &env.src_bucket, p).await.is_some(), "{p} kept");
    }
    let left = env.keys(&env.dst_bucket, "avatar/").await;
    let mut left: Vec<&str> = left.iter().map(String::as_str).collect();
    left.sort_unstable();
    assert_eq!(
        left,
        ["avatar/dup.png", "avatar/ok-1.png", "avatar/ok-2.png"]
    );
    env.assert_no_row_dangles().await;
}

/// Round two #5. The stack's login role is named `relocator`, so "$user" in the default
/// search_path finds the ledger's schema first: an unqualified `--table moves` would name
/// relocator's own ledger. Refused with exit 2, nothing changed.
#[tokio::test(flavor = "multi_thread")]
async fn the_ledger_is_never_a_jobs_table() {
    let env = TestEnv::new("ledger-table").await;
    let seeded = env.seed(3, 0).await;
    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    env.assert_converged(&seeded).await;
    let before: i64 = env
        .db()
        .await
        .query_one("SELECT count(*) FROM relocator.moves", &[])
        .await
        .unwrap()
        .get(0);
    for table in ["moves", "relocator.moves"] {
        let out = env
            .cmd()
            .args(["run", "--table", table, "--id-column", "move_id"])
            .args(["--path-column", "new_path"])
            .args(["--source", &format!("s3://{}/avatar/", env.dst_bucket)])
            .args(["--dest", &format!("s3://{}/elsewhere/", env.src_bucket)])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--table {table}: {err}");
        assert!(err.contains("relocator's own ledger"), "{err}");
    }
    let after: i64 = env
        .db()
        .await
        .query_one("SELECT count(*) FROM relocator.moves", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(before, after);
    env.assert_converged(&seeded).await;
}

/// Round two #1, in rollback: the application copies a moved row's new key onto a new
/// row (`INSERT … SELECT path`) in a transaction still open while the rollback removes the
/// new object. The rollback's cleanup must wait for it and keep the object.
#[tokio::test(flavor = "multi_thread")]
async fn a_reference_being_written_during_the_rollback_cleanup_is_seen() {
    let env = TestEnv::new("inflight-rollback").await;
    table(&env, true).await;
    env.put_row("image/a.png", b"a face".to_vec()).await;
    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(env.rows().await[0].1, "avatar/a.png");

    let mut app = env.db().await;
    let tx = app.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO avatars (path) SELECT path FROM avatars WHERE id = 1",
        &[],
    )
    .await
    .unwrap();
    let child = env
        .cmd()
        .args(["rollback", "--source", &env.source(), "--dest", &env.dest()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let waited = tokio::time::timeout(
        Duration::from_secs(30),
        until_a_session_waits_for_a_lock(&env),
    )
    .await;
    tx.commit().await.unwrap();
    let (code, err) = finish(child);
    assert!(
        waited.is_ok(),
        "the rollback's cleanup did not wait for the writer"
    );
    assert_eq!(code, 0, "{err}");
    let rows = env.rows().await;
    assert_eq!(rows[0].1, "image/a.png", "row 1 rolled back");
    assert_eq!(rows[1].1, "avatar/a.png", "the application's row");
    env.assert_no_row_dangles().await;
}

/// Safety #5. Where the server honours `If-None-Match: *` on CopyObject (learned by the
/// run's probe), every copy is create-only: an object put at the destination between
/// relocator's look and its copy makes the server refuse the copy (412), and relocator
/// then looks at what is there — a different object is a `conflict`, never overwritten.
/// Staged with the proxy: the probe's create-only copy and the row's copy answered 412,
/// the row's first HEAD answered 404 while a different object is there.
#[tokio::test(flavor = "multi_thread")]
async fn a_create_only_copy_refused_by_the_server_is_a_conflict() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let env = TestEnv::new("create-only").await;
    table(&env, false).await;
    env.put_row("image/a.png", b"the row's avatar".to_vec())
        .await;
    let foreign = b"put by the application meanwhile".as_slice();
    put(&env, &env.dst_bucket, "avatar/a.png", foreign).await;
    let (probe_copies, heads) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (pc, hd) = (probe_copies.clone(), heads.clone());
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(move |_, method, path| {
            if method == "PUT" && path.contains("relocator-probe") && path.ends_with("-b") {
                // The second copy onto the probe is the create-only one.
                if pc.fetch_add(1, Ordering::SeqCst) == 1 {
                    return Fault::PreconditionFailed;
                }
            }
            if path.ends_with("/avatar/a.png") {
                match method {
                    "HEAD" if hd.fetch_add(1, Ordering::SeqCst) == 0 => return Fault::NotFound,
                    "PUT" => return Fault::PreconditionFailed,
                    _ => {}
                }
            }
            Fault::Forward
        }),
    )
    .await;
    let out = env
        .run_cmd(&["--report", &env.path("r.csv")])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("honours If-None-Match"), "{err}");
    let copy = proxy
        .seen
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.method == "PUT" && r.target.contains("/avatar/a.png"))
        .cloned()
        .expect("the row's copy was sent");
    assert_eq!(
        copy.headers
            .get("if-none-match")
            .map(|v| v.to_str().unwrap()),
        Some("*"),
        "the copy was create-only"
    );
    let outcomes = common::read_outcomes(&env.path("r.csv"));
    assert_eq!(outcomes["1"].0, "conflict", "{outcomes:?}");
    assert_eq!(
        bytes(&env, &env.dst_bucket, "avatar/a.png")
            .await
            .as_deref(),
        Some(foreign)
    );
    assert_eq!(env.rows().await[0].1, "image/a.png");

    // Against the stack's Garage itself (no proxy) the probe finds it ignored.
    let out = env.run_cmd(&[]).env("RUST_LOG", "info").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ignores If-None-Match"), "{err}");
}

/// A unique id column may hold NULLs: such a row can be neither paged to nor rewritten
/// by id. Refused with exit 2 and the fix, nothing changed (before: a panic, exit 101).
#[tokio::test(flavor = "multi_thread")]
async fn rows_without_an_id_are_refused_up_front() {
    let env = TestEnv::new("null-id").await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE avatars (id int UNIQUE, path varchar);
         INSERT INTO avatars VALUES (1, 'image/a.png'), (NULL, 'image/b.png');",
    )
    .await
    .unwrap();
    put(&env, &env.src_bucket, "image/a.png", b"a").await;
    put(&env, &env.src_bucket, "image/b.png", b"b").await;
    let (code, err) = env.run(&[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("NULL in some rows"), "{err}");
    assert!(env.keys(&env.dst_bucket, "").await.is_empty());
    assert!(bytes(&env, &env.src_bucket, "image/a.png").await.is_some());
}

/// Safety, found by review: job 1 (image/ → avatar/) has found `avatar/d` identical and
/// relies on it for row 6, while another object of the same batch is still being copied
/// (the proxy stalls that copy). Job 2 (avatar/ → pics/) meanwhile moves row 1 off
/// `avatar/d`; no row references it at that instant. Job 2 must not delete it: job 1's
/// batch reserved it before looking, and a delete never takes a reserved key.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_a_batch_in_flight_relies_on_is_not_deleted_by_another_job() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let env = TestEnv::new("reserved").await;
    table(&env, false).await;
    let db = env.db().await;
    let d = b"shared d".as_slice();
    put(&env, &env.src_bucket, "image/d.png", d).await;
    for k in ["b", "c", "e", "f", "slow"] {
        put(
            &env,
            &env.src_bucket,
            &format!("image/{k}.png"),
            k.as_bytes(),
        )
        .await;
    }
    db.batch_execute(
        "INSERT INTO avatars (path) VALUES ('image/d.png'), ('image/b.png'), ('image/c.png'),
             ('image/e.png'), ('image/f.png'), ('image/d.png'), ('image/slow.png')",
    )
    .await
    .unwrap();
    let stalls = Arc::new(AtomicUsize::new(0));
    let st = stalls.clone();
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(move |_, method, path| {
            if method == "PUT"
                && path.ends_with("/avatar/slow.png")
                && st.fetch_add(1, Ordering::SeqCst) == 0
            {
                Fault::Stall(Duration::from_secs(10))
            } else {
                Fault::Forward
            }
        }),
    )
    .await;
    let job1 = env
        .run_cmd(&["--batch-size", "5", "--s3-max-attempts", "3"])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Batch 1 (rows 1-5) commits; batch 2 (rows 6, 7) relies on avatar/d.png and waits
    // for its stalled copy.
    let start = Instant::now();
    while env.rows().await[0].1 != "avatar/d.png" {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "batch 1 never committed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = env
        .cmd()
        .args(["run", "--source", &env.dest()])
        .args(["--dest", &format!("s3://{}/pics/", env.dst_bucket)])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stalls.load(Ordering::SeqCst) == 1,
        "job 2 ran while job 1 was stalled"
    );
    let (code, err) = finish(job1);
    assert_eq!(code, 0, "{err}");
    let rows = env.rows().await;
    assert_eq!(rows[5].1, "avatar/d.png", "row 6 moved by job 1");
    for (id, path) in rows {
        let bucket = if path.starts_with("image/") {
            &env.src_bucket
        } else {
            &env.dst_bucket
        };
        assert!(
            bytes(&env, bucket, &path).await.is_some(),
            "row {id} points at a missing object {path}"
        );
    }
}

/// Safety, found by review: a trigger that rewrites NEW.path (lower-cases it, or keeps
/// the old value) must not leave a row pointing at a key no object is at, nor be
/// reported `moved`: the commit checks what the table stored, and the row is `rejected`.
#[tokio::test(flavor = "multi_thread")]
async fn a_trigger_that_rewrites_the_new_value_is_a_rejection() {
    let env = TestEnv::new("trigger-rewrites").await;
    table(&env, true).await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE FUNCTION normalise() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF OLD.path LIKE '%keep%' THEN NEW.path := OLD.path;
             ELSE NEW.path := lower(NEW.path);
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER normalise BEFORE UPDATE ON avatars
             FOR EACH ROW EXECUTE FUNCTION normalise();",
    )
    .await
    .unwrap();
    for p in ["image/ABC.png", "image/keep.png", "image/fine.png"] {
        put(&env, &env.src_bucket, p, p.as_bytes()).await;
        db.execute("INSERT INTO avatars (path) VALUES ($1)", &[&p])
            .await
            .unwrap();
    }
    let (code, err) = env.run(&["--report", &env.path("r.csv")]);
    assert_eq!(code, 3, "{err}");
    let outcomes = common::read_outcomes(&env.path("r.csv"));
    assert_eq!(outcomes["1"].0, "rejected", "{outcomes:?}");
    assert_eq!(outcomes["2"].0, "rejected", "{outcomes:?}");
    assert_eq!(outcomes["3"].0, "moved", "{outcomes:?}");
    let rows = env.rows().await;
    assert_eq!(rows[0].1, "image/ABC.png");
    assert_eq!(rows[1].1, "image/keep.png");
    assert_eq!(rows[2].1, "avatar/fine.png");
    env.assert_no_row_dangles().await;
}

/// Safety, found by review: the application re-uploads the source while the cleanup
/// waits for the table's writers. The look at the source is made anew on every try, so
/// the new upload is seen and kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_replaced_while_the_cleanup_waits_is_kept() {
    let env = TestEnv::new("replaced-in-wait").await;
    table(&env, true).await;
    env.put_row("image/user-1.png", b"old face".to_vec()).await;
    // Some application write in flight on the table (unrelated row).
    let mut app = env.db().await;
    let tx = app.transaction().await.unwrap();
    tx.execute("INSERT INTO avatars (path) VALUES ('elsewhere/x.png')", &[])
        .await
        .unwrap();
    let child = spawn(&env, &["--summary-json", &env.path("s.json")]);
    until_a_session_waits_for_a_lock(&env).await;
    let new_face = b"new face, uploaded while relocator waited".as_slice();
    put(&env, &env.src_bucket, "image/user-1.png", new_face).await;
    // Past one lock timeout and the pause before the next try.
    tokio::time::sleep(Duration::from_secs(4)).await;
    tx.rollback().await.unwrap();
    let (code, err) = finish(child);
    assert_eq!(code, 3, "{err}");
    assert_eq!(
        bytes(&env, &env.src_bucket, "image/user-1.png")
            .await
            .as_deref(),
        Some(new_face)
    );
    let s = read_summary(&env.path("s.json"));
    assert_eq!(s["outcomes"]["source_changed"], 1, "{s}");
}

/// Round two #5. The lease TTL belongs to the run: a second process asking for a
/// smaller one (which would take over the live first worker's lease during any long
/// batch) is refused with exit 2; one that leaves it out adopts the run's.
#[tokio::test(flavor = "multi_thread")]
async fn a_process_joining_a_run_cannot_bring_another_lease_ttl() {
    let env = TestEnv::new("ttl-per-run").await;
    table(&env, true).await;
    env.put_row("image/a.png", b"a".to_vec()).await;
    env.put_row("image/b.png", b"b".to_vec()).await;
    let mut app = env.db().await;
    let tx = app.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM avatars WHERE id = 2 FOR UPDATE", &[])
        .await
        .unwrap();
    let first = spawn(&env, &["--lease-ttl", "30"]);
    until_a_session_waits_for_a_lock(&env).await;
    let (code, err) = env.run(&["--lease-ttl", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("uses --lease-ttl 30"), "{err}");
    tx.rollback().await.unwrap();
    let (code, err) = finish(first);
    assert_eq!(code, 0, "{err}");
    env.assert_no_row_dangles().await;
}

type Meanwhile = Box<dyn Fn(&str, &str) + Send + Sync>;

/// Nothing happens meanwhile.
fn quiet() -> Meanwhile {
    Box::new(|_, _| {})
}

/// The application puts `body` at `key` of `bucket`, waiting for it to land (from inside
/// the proxy: the request that triggered it is answered after).
fn app_puts(bucket: &str, key: &str, body: &[u8]) {
    let (bucket, key, body) = (bucket.to_owned(), key.to_owned(), body.to_vec());
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let c = common::s3_client().await;
            c.ep().put(&bucket, &key, body, "image/png").await.unwrap();
        })
    })
    .join()
    .unwrap();
}

/// Start a run whose copy of `image/slow.png` hangs, wait until `copied` keys are at the
/// destination and the hanging copy was sent, and SIGKILL it: the batch never commits.
/// `meanwhile` sees each request (method, path) before it is forwarded: the application
/// acting at that moment.
async fn run_killed_while_copying(env: &TestEnv, copied: usize, meanwhile: Meanwhile) {
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(move |_, method, path| {
            meanwhile(method, path);
            if method == "PUT" && path.ends_with("/avatar/slow.png") {
                Fault::Stall(Duration::from_secs(120))
            } else {
                Fault::Forward
            }
        }),
    )
    .await;
    let mut job = env
        .run_cmd(&["--s3-max-attempts", "1"])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while proxy.faults.lock().unwrap().is_empty()
        || env.keys(&env.dst_bucket, "avatar/").await.len() < copied
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the first run never got to its copies"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The batch's other requests (the HEADs before its copies) are done by then.
    tokio::time::sleep(Duration::from_millis(500)).await;
    job.kill().unwrap(); // SIGKILL
    job.wait().unwrap();
    assert!(
        env.rows()
            .await
            .iter()
            .all(|(_, p)| p.starts_with("image/")),
        "nothing was committed before the kill"
    );
}

/// The application's object at `key` in the destination is still there, with `body`.
async fn assert_kept(env: &TestEnv, key: &str, body: &[u8]) {
    assert_eq!(
        bytes(env, &env.dst_bucket, key).await.as_deref(),
        Some(body),
        "relocator removed an object it did not make"
    );
}

/// `relocator rollback` of the test's job, to completion (exit 0).
fn rollback(env: &TestEnv) {
    rollback_with(env, &[]);
}

/// The same, with `extra` options.
fn rollback_with(env: &TestEnv, extra: &[&str]) {
    let out = env
        .cmd()
        .args(["rollback", "--source", &env.source(), "--dest", &env.dest()])
        .args(extra)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Safety #7 (second half). A run killed between its copies and their commit: the rerun
/// finds those copies already at the destination, and must still know relocator made
/// them, so `rollback` removes every object relocator created (and nothing else).
#[tokio::test(flavor = "multi_thread")]
async fn copies_made_before_a_kill_are_still_known_as_relocators_own() {
    let env = TestEnv::new("kill-before-commit").await;
    table(&env, false).await;
    for k in ["a", "b", "c", "slow"] {
        env.put_row(&format!("image/{k}.png"), k.as_bytes().to_vec())
            .await;
    }
    run_killed_while_copying(&env, 3, quiet()).await;

    let report = env.path("r.csv");
    let (code, err) = env.run(&["--report", &report]);
    assert_eq!(code, 0, "{err}");
    // Reported as they are: the copies are relocator's, and no source was kept (the
    // killed batch's copies, in use by their rows now, are not sources kept referenced).
    assert!(err.contains("deleted=4 kept_referenced=0"), "{err}");
    let mut lines = csv::Reader::from_path(&report).unwrap();
    let details: Vec<(String, String)> = lines
        .records()
        .map(|r| r.unwrap())
        .map(|r| (r[3].to_owned(), r[4].to_owned()))
        .collect();
    assert_eq!(details, vec![("moved".into(), "copied".into()); 4]);
    let not_ours: Vec<String> = env
        .db()
        .await
        .query(
            "SELECT new_path FROM relocator.moves WHERE NOT copied ORDER BY new_path",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        not_ours.is_empty(),
        "copies the killed run made are recorded as not relocator's: {not_ours:?}"
    );

    rollback(&env);
    assert_eq!(
        env.keys(&env.dst_bucket, "avatar/").await,
        Vec::<String>::new(),
        "rollback left copies relocator made behind"
    );
    for (id, path) in env.rows().await {
        assert!(path.starts_with("image/"), "row {id} rolled back");
        assert!(
            bytes(&env, &env.src_bucket, &path).await.is_some(),
            "row {id} points at a missing object {path}"
        );
    }
}

/// Only what is ours: an identical object the application had at the destination before
/// the run is not relocator's copy, even after a killed batch reserved its key; rollback
/// leaves it.
#[tokio::test(flavor = "multi_thread")]
async fn an_identical_object_that_was_there_before_is_never_taken_as_ours() {
    let env = TestEnv::new("identical-not-ours").await;
    table(&env, false).await;
    env.put_row("image/a.png", b"a".to_vec()).await;
    env.put_row("image/slow.png", b"slow".to_vec()).await;
    put(&env, &env.dst_bucket, "avatar/a.png", b"a").await;
    run_killed_while_copying(&env, 1, quiet()).await;

    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    rollback(&env);
    assert_kept(&env, "avatar/a.png", b"a").await;
    assert_eq!(
        env.keys(&env.dst_bucket, "avatar/").await,
        vec!["avatar/a.png".to_string()],
        "rollback left a copy relocator made behind"
    );
}

/// Safety #8: a row phase 1 reports (here a conflict) is one line and one count in the
/// run's report, not reported again by phase 2's sweep of the table.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_that_needs_attention_is_reported_once_per_run() {
    let env = TestEnv::new("reported-once").await;
    table(&env, true).await;
    env.put_row("image/a.png", b"a".to_vec()).await;
    env.put_row("image/b.png", b"b".to_vec()).await;
    put(&env, &env.dst_bucket, "avatar/b.png", b"someone else's b").await;
    let (code, err) = env.run(&[
        "--report",
        &env.path("r.csv"),
        "--summary-json",
        &env.path("s.json"),
    ]);
    assert_eq!(code, 3, "{err}");
    let s = read_summary(&env.path("s.json"));
    assert_eq!(s["outcomes"]["conflict"], 1, "{s}");
    assert_eq!(s["outcomes"]["moved"], 1, "{s}");
    let lines = std::fs::read_to_string(env.path("r.csv")).unwrap();
    assert_eq!(
        lines.lines().filter(|l| l.contains("image/b.png")).count(),
        1,
        "{lines}"
    );
}

/// Only what is ours: an incomplete multipart upload the application has in progress at
/// the destination key is not aborted by relocator's multipart copy to that key (only
/// uploads relocator noted as its own are; `large` shows a killed copy's are). Garage
/// itself drops an upload once another version of its key is complete, so the test
/// looks at what relocator asked for, through a recording proxy.
#[tokio::test(flavor = "multi_thread")]
async fn the_applications_upload_in_progress_is_never_aborted() {
    let env = TestEnv::new("app-upload").await;
    table(&env, false).await;
    let big: Vec<u8> = (0..6 << 20).map(|i: u32| (i % 253) as u8).collect();
    env.put_row("image/big.bin", big).await;
    let app = env
        .s3
        .create_multipart_upload()
        .bucket(&env.dst_bucket)
        .key("avatar/big.bin")
        .send()
        .await
        .unwrap();
    let app_id = app.upload_id().unwrap().to_string();
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(|_, _, _| Fault::Forward),
    )
    .await;
    let out = env
        .run_cmd(&["--multipart-threshold", "5MiB", "--part-size", "5MiB"])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = proxy.seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|r| r.method == "POST" && r.target.contains("uploads")),
        "relocator copied in parts"
    );
    let aborted: Vec<_> = seen
        .iter()
        .filter(|r| r.method == "DELETE" && r.target.contains(&app_id))
        .collect();
    assert!(
        aborted.is_empty(),
        "the application's upload was aborted: {aborted:?}"
    );
}

/// Safety round two, item 2 (rollback's twin): a row the table refuses to rewrite back
/// (a CHECK added after the run; a trigger that stores another value) is `rejected`, the
/// rest of the batch is rolled back, and the refused rows keep pointing at their (still
/// existing) new objects; their copies back at the old keys are taken back again.
#[tokio::test(flavor = "multi_thread")]
async fn rows_the_table_refuses_to_rewrite_back_are_rejected_and_the_rest_rolls_back() {
    let env = TestEnv::new("rollback-refused").await;
    table(&env, true).await;
    for k in ["a", "b", "c"] {
        env.put_row(&format!("image/{k}.png"), k.as_bytes().to_vec())
            .await;
    }
    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    env.db()
        .await
        .batch_execute(
            "ALTER TABLE avatars ADD CONSTRAINT no_b CHECK (path <> 'image/b.png');
             CREATE FUNCTION keep_c() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF OLD.path = 'avatar/c.png' THEN NEW.path := upper(NEW.path); END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER keep_c BEFORE UPDATE ON avatars
                 FOR EACH ROW EXECUTE FUNCTION keep_c();",
        )
        .await
        .unwrap();
    let out = env
        .cmd()
        .args(["rollback", "--source", &env.source(), "--dest", &env.dest()])
        .args(["--report", &env.path("r.csv")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let outcomes = common::read_outcomes(&env.path("r.csv"));
    assert_eq!(outcomes["1"].0, "rolled_back", "{outcomes:?}");
    assert_eq!(outcomes["2"].0, "rejected", "{outcomes:?}");
    assert_eq!(outcomes["3"].0, "rejected", "{outcomes:?}");
    let rows = env.rows().await;
    assert_eq!(rows[0].1, "image/a.png");
    assert_eq!(rows[1].1, "avatar/b.png");
    assert_eq!(rows[2].1, "avatar/c.png");
    env.assert_no_row_dangles().await;
    assert_eq!(
        env.keys(&env.src_bucket, "image/").await,
        vec!["image/a.png".to_string()],
        "copies back for the refused rows were taken back"
    );
}

/// Only what is ours (found by review): a killed batch that found a *different* object at
/// a key reserved it but made no copy there; the application then puts the source's
/// bytes there itself. The rerun finds an identical object and must not take it for
/// relocator's copy: rollback leaves it.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_a_killed_batch_found_taken_is_never_claimed() {
    let env = TestEnv::new("taken-not-claimed").await;
    table(&env, false).await;
    env.put_row("image/a.png", b"a".to_vec()).await;
    env.put_row("image/slow.png", b"slow".to_vec()).await;
    put(&env, &env.dst_bucket, "avatar/a.png", b"the application's").await;
    run_killed_while_copying(&env, 1, quiet()).await;
    put(&env, &env.dst_bucket, "avatar/a.png", b"a").await;

    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    rollback(&env);
    assert_kept(&env, "avatar/a.png", b"a").await;
}

/// Safety #7 with a rollback instead of a rerun (found by review): the killed run's
/// reservations are void once it is rolled back, and the copies its killed batch made
/// are removed with it; nothing of relocator's is left at the destination.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_killed_mid_batch_and_rolled_back_leaves_nothing_behind() {
    let env = TestEnv::new("kill-then-rollback").await;
    table(&env, false).await;
    for k in ["a", "b", "c", "slow"] {
        env.put_row(&format!("image/{k}.png"), k.as_bytes().to_vec())
            .await;
    }
    run_killed_while_copying(&env, 3, quiet()).await;
    rollback(&env);
    assert_eq!(
        env.keys(&env.dst_bucket, "avatar/").await,
        Vec::<String>::new(),
        "the killed batch's copies were left behind"
    );
    let reservations: i64 = env
        .db()
        .await
        .query_one("SELECT count(*) FROM relocator.reservations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        reservations, 0,
        "the rolled-back run's reservations are void"
    );
    env.assert_no_row_dangles().await;
}

/// Only what is ours (found by review): a run, its rollback (which removes the copy),
/// then the application puts its own object at the destination key, with the same
/// bytes; the job runs again and finds it already there (not copied). Its rollback must
/// leave that object: the earlier move that copied to this key had its copy removed,
/// so it no longer makes the object there relocator's. On the code before, the second
/// rollback deleted it.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_after_an_earlier_rollback_keeps_the_applications_object() {
    let env = TestEnv::new("rollback-twice").await;
    table(&env, false).await;
    env.put_row("image/k.png", b"the bytes".to_vec()).await;
    assert_eq!(env.run(&[]).0, 0);
    rollback(&env);
    assert!(bytes(&env, &env.dst_bucket, "avatar/k.png").await.is_none());
    env.s3
        .ep()
        .put(
            &env.dst_bucket,
            "avatar/k.png",
            b"the bytes".to_vec(),
            "image/png",
        )
        .await
        .unwrap();
    let (code, err) = env.run(&["--report", &env.path("again.csv")]);
    assert_eq!(code, 0, "{err}");
    let again = std::fs::read_to_string(env.path("again.csv")).unwrap();
    assert!(again.contains("already at the destination"), "{again}");
    rollback(&env);
    assert_eq!(env.rows().await, [(1, "image/k.png".to_owned())]);
    assert_kept(&env, "avatar/k.png", b"the bytes").await;
}

/// Only what is ours (found by review): `--verify-content` reads a fresh copy back; the
/// application puts its own object at that key between the copy and the read. The
/// mismatch must not make relocator delete the application's object.
#[tokio::test(flavor = "multi_thread")]
async fn verify_content_never_removes_an_object_the_application_put_meanwhile() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let env = TestEnv::new("verify-content-app").await;
    table(&env, false).await;
    env.put_row("image/a.png", b"a".to_vec()).await;
    let (bucket, once) = (env.dst_bucket.clone(), Arc::new(AtomicBool::new(false)));
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(move |_, method, path| {
            if method == "GET"
                && path.ends_with("/avatar/a.png")
                && !once.swap(true, Ordering::SeqCst)
            {
                // The application's upload lands before relocator's read-back is answered.
                app_puts(&bucket, "avatar/a.png", b"app");
            }
            Fault::Forward
        }),
    )
    .await;
    let out = env
        .run_cmd(&["--verify-content"])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_kept(&env, "avatar/a.png", b"app").await;
    assert_eq!(env.rows().await[0].1, "image/a.png");
    env.assert_no_row_dangles().await;
}

/// Only what is ours, all of it (found by review): two rows share a key and are moved in
/// two batches, the first copying it, the second finding the copy. Rolled back in two
/// batches, the copy must still go once neither row points at it.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_two_rows_share_is_removed_by_the_rollback_of_both() {
    let env = TestEnv::new("rollback-shared").await;
    table(&env, false).await;
    env.put_row("image/a.png", b"a".to_vec()).await;
    env.db()
        .await
        .execute("INSERT INTO avatars (path) VALUES ('image/a.png')", &[])
        .await
        .unwrap();
    let (code, err) = env.run(&["--batch-size", "1"]);
    assert_eq!(code, 0, "{err}");
    rollback_with(&env, &["--batch-size", "1"]);
    assert_eq!(
        env.keys(&env.dst_bucket, "avatar/").await,
        Vec::<String>::new(),
        "rollback left relocator's copy behind"
    );
    env.assert_no_row_dangles().await;
}

/// Only what is ours (found by review): job X (avatars) copies `avatar/a.png`; job Y
/// (covers, another source prefix, same destination, same bytes) finds it there and
/// points its row at it. Rolling back job X must not delete the object covers relies on.
#[tokio::test(flavor = "multi_thread")]
async fn rolling_back_one_job_keeps_an_object_another_tables_rows_were_moved_onto() {
    let env = TestEnv::new("cross-job").await;
    table(&env, false).await;
    env.put_row("image/a.png", b"a".to_vec()).await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE covers (id serial PRIMARY KEY, path varchar);
         INSERT INTO covers (path) VALUES ('img/a.png');",
    )
    .await
    .unwrap();
    put(&env, &env.src_bucket, "img/a.png", b"a").await;
    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    let covers = env
        .cmd()
        .args(["run", "--table", "covers"])
        .args(["--source", &format!("s3://{}/img/", env.src_bucket)])
        .args(["--dest", &env.dest()])
        .output()
        .unwrap();
    assert_eq!(
        covers.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&covers.stderr)
    );
    rollback(&env);
    let path: String = db
        .query_one("SELECT path FROM covers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(path, "avatar/a.png");
    assert_eq!(
        bytes(&env, &env.dst_bucket, "avatar/a.png")
            .await
            .as_deref(),
        Some(b"a".as_slice()),
        "the object covers points at was deleted by avatars' rollback"
    );
}

/// Only what is ours, phase 1: the batch's listing found `avatar/a.png` free and noted
/// the copy up front; the application puts the source's bytes there before relocator's
/// look right before the copy. The batch is killed. The note must have been withdrawn:
/// the rerun does not take the application's object for relocator's, and rollback
/// leaves it.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_taken_after_the_listing_is_not_noted_as_relocators() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let env = TestEnv::new("listing-then-taken").await;
    table(&env, true).await;
    env.put_row("image/a.png", b"a".to_vec()).await;
    env.put_row("image/slow.png", b"slow".to_vec()).await;
    let (bucket, once) = (env.dst_bucket.clone(), AtomicBool::new(false));
    run_killed_while_copying(
        &env,
        1,
        Box::new(move |method, path| {
            if method == "HEAD"
                && path.ends_with("/avatar/a.png")
                && !once.swap(true, Ordering::SeqCst)
            {
                app_puts(&bucket, "avatar/a.png", b"a");
            }
        }),
    )
    .await;
    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    rollback(&env);
    assert_kept(&env, "avatar/a.png", b"a").await;
}

/// Safety #12 (suspected: a takeover that skips the advisory lock). Worker 1 hangs
/// (SIGSTOP) holding its lease's lock; worker 2 takes the lease over when the heartbeat
/// expires, without the lock. When worker 1 then dies and its lock goes with it, the
/// lease must not look abandoned: a third worker leaves it to worker 2, who is alive.
#[tokio::test(flavor = "multi_thread")]
async fn a_lease_taken_from_a_hung_worker_stays_with_its_new_owner() {
    let env = TestEnv::new("hung-takeover").await;
    table(&env, false).await;
    for i in 0..40u8 {
        env.put_row(&format!("image/{i:02}.png"), vec![i; 10]).await;
    }
    let args = ["--lease-ttl", "2", "--batch-size", "10", "--max-rps", "8"];
    let signal = |sig: &str, child: &Child| {
        let ok = std::process::Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    let db = env.db().await;
    let open_lease = || async {
        db.query_opt(
            "SELECT lease_id, owner FROM relocator.leases WHERE NOT done ORDER BY lease_id LIMIT 1",
            &[],
        )
        .await
        .ok() // the ledger may not exist yet
        .flatten()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
    };
    let owner_of = |lease: i64| {
        let db = &db;
        async move {
            let r = db
                .query_one(
                    "SELECT owner, done FROM relocator.leases WHERE lease_id = $1",
                    &[&lease],
                )
                .await
                .unwrap();
            (r.get::<_, String>(0), r.get::<_, bool>(1))
        }
    };
    let until = |what: &str, start: Instant| {
        assert!(start.elapsed() < Duration::from_secs(60), "{what}");
    };

    let mut first = spawn(&env, &args);
    let start = Instant::now();
    let (lease, hung) = loop {
        if let Some(l) = open_lease().await {
            break l;
        }
        until("worker 1 never took a lease", start);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    signal("-STOP", &first);
    let second = spawn(&env, &args);
    let start = Instant::now();
    let taker = loop {
        let (owner, done) = owner_of(lease).await;
        assert!(!done, "the hung worker's lease was finished");
        if owner != hung {
            break owner;
        }
        until("worker 2 never took the hung worker's lease over", start);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    signal("-KILL", &first);
    first.wait().unwrap();
    let third = spawn(&env, &args);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let (owner, done) = owner_of(lease).await;
        if done {
            break;
        }
        assert_eq!(
            owner, taker,
            "the lease was taken from its live new owner once the hung worker's lock went"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for child in [second, third] {
        let (code, err) = finish(child);
        assert_eq!(code, 0, "{err}");
    }
    env.assert_no_row_dangles().await;
}

/// Safety round two, item 2, SQLSTATE 42501: a row-level-security policy whose WITH CHECK
/// refuses the new value (relocator running as the least-privilege role, to which the
/// policy applies) makes that row `rejected`; the other row moves.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_level_security_refusal_is_a_rejection() {
    let env = TestEnv::new("rls").await;
    table(&env, true).await;
    env.put_row("image/ok.png", b"ok".to_vec()).await;
    env.put_row("image/forbidden.png", b"no".to_vec()).await;
    let url = env.least_privilege_url();
    env.db()
        .await
        .batch_execute(
            "ALTER TABLE avatars ENABLE ROW LEVEL SECURITY;
             CREATE POLICY see ON avatars FOR SELECT USING (true);
             CREATE POLICY change ON avatars FOR UPDATE USING (true)
                 WITH CHECK (path NOT LIKE 'avatar/forbidden%');",
        )
        .await
        .unwrap();
    let out = env
        .run_cmd(&["--report", &env.path("r.csv")])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let outcomes = common::read_outcomes(&env.path("r.csv"));
    assert_eq!(outcomes["1"].0, "moved", "{outcomes:?}");
    assert_eq!(outcomes["2"].0, "rejected", "{outcomes:?}");
    let report = std::fs::read_to_string(env.path("r.csv")).unwrap();
    assert!(report.contains("42501"), "{report}");
    let rows = env.rows().await;
    assert_eq!(rows[1].1, "image/forbidden.png");
    env.assert_no_row_dangles().await;
}

/// Another table references some of the job's objects (a post reusing an avatar): with
/// `--referenced-by` those sources are kept and counted, the rest deleted. The job
/// remembers the column: a later process of it that was not given the option honours it
/// too (before, only the job's own column was looked at).
#[tokio::test(flavor = "multi_thread")]
async fn objects_another_table_references_are_kept() {
    let env = TestEnv::new("referenced-by").await;
    table(&env, true).await;
    for i in 0..4 {
        env.put_row(&format!("image/a{i}.png"), format!("a{i}").into_bytes())
            .await;
    }
    let db = env.db().await;
    db.batch_execute(
        "CREATE SCHEMA blog;
         CREATE TABLE blog.\"Posts\" (id serial PRIMARY KEY, \"Image\" text);
         INSERT INTO blog.\"Posts\" (\"Image\") VALUES ('image/a1.png'), ('elsewhere/x.png')",
    )
    .await
    .unwrap();
    let summary = env.path("s.json");
    let (code, err) = env.run(&[
        "--referenced-by",
        r#"blog."Posts"."Image""#,
        "--summary-json",
        &summary,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("no index leads with --referenced-by"),
        "the missing index is named: {err}"
    );
    let s = common::read_summary(&summary);
    assert_eq!(s["counters"]["sources_kept_referenced"], 1, "{s}");
    assert_eq!(
        env.keys(&env.src_bucket, "image/").await,
        ["image/a1.png"],
        "only the source the post references is kept"
    );
    assert!(env
        .rows()
        .await
        .iter()
        .all(|(_, p)| p.starts_with("avatar/")));

    // Review: for a role named like the ledger's schema, an unqualified name finds the
    // ledger's table first (`relocator.uploads` before the application's `uploads`).
    db.batch_execute("CREATE TABLE public.uploads (key text)")
        .await
        .unwrap();
    let (code, err) = env.run(&["--referenced-by", "uploads.key"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("relocator's own ledger"), "{err}");

    // A later process of the same job, not given the option: the application added a row
    // whose object a post references too.
    env.put_row("image/a9.png", b"a9".to_vec()).await;
    db.execute(
        "INSERT INTO blog.\"Posts\" (\"Image\") VALUES ('image/a9.png')",
        &[],
    )
    .await
    .unwrap();
    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    let mut kept = env.keys(&env.src_bucket, "image/").await;
    kept.sort();
    assert_eq!(kept, ["image/a1.png", "image/a9.png"], "remembered");
    env.assert_no_row_dangles().await;

    // verify: the kept sources are neither leftovers nor orphans.
    let job = ["--source", &env.source(), "--dest", &env.dest()];
    let out = env
        .cmd()
        .arg("verify")
        .args(job)
        .arg("--orphans")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("kept_referenced=2"), "{said}");
    assert!(
        !said.contains("orphan") && !said.contains("leftover"),
        "{said}"
    );

    // rollback: a post that took up a new key keeps its object.
    db.execute(
        "INSERT INTO blog.\"Posts\" (\"Image\") VALUES ('avatar/a2.png')",
        &[],
    )
    .await
    .unwrap();
    let out = env.cmd().arg("rollback").args(job).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        env.keys(&env.dst_bucket, "avatar/").await,
        ["avatar/a2.png"],
        "the new object a post references is kept"
    );
    assert!(env
        .rows()
        .await
        .iter()
        .all(|(_, p)| p.starts_with("image/")));
}

/// An application transaction that inserts a post referencing a legacy key is open while
/// the cleanup checks references: the cleanup waits for it (it holds the other table's
/// writers off too) and then sees the post.
#[tokio::test(flavor = "multi_thread")]
async fn a_reference_being_written_in_another_table_during_the_cleanup_is_seen() {
    let env = TestEnv::new("inflight-other").await;
    table(&env, true).await;
    env.put_row("image/shared.png", b"shared".to_vec()).await;
    let mut app = env.db().await;
    app.batch_execute(
        "CREATE TABLE posts (id serial PRIMARY KEY, image text);
         CREATE INDEX ON posts (image)",
    )
    .await
    .unwrap();
    let tx = app.transaction().await.unwrap();
    tx.execute("INSERT INTO posts (image) VALUES ('image/shared.png')", &[])
        .await
        .unwrap();
    let child = spawn(&env, &["--referenced-by", "posts.image"]);
    let waited = tokio::time::timeout(
        Duration::from_secs(30),
        until_a_session_waits_for_a_lock(&env),
    )
    .await;
    tx.commit().await.unwrap();
    let (code, err) = finish(child);
    assert!(waited.is_ok(), "the cleanup did not wait for the writer");
    assert_eq!(code, 0, "{err}");
    assert!(
        env.s3
            .ep()
            .head(&env.src_bucket, "image/shared.png")
            .await
            .unwrap()
            .is_some(),
        "the object the new post references is kept"
    );
    assert_eq!(env.rows().await[0].1, "avatar/shared.png");
}

/// Review: row-level security that hides rows from relocator's role (a tenant policy)
/// would make the reference check blind: the object a hidden row still uses was deleted.
/// Refused up front (exit 2, nothing changed), on the job's table and on a
/// `--referenced-by` table; an all-seeing SELECT policy is fine (the rejection test above).
#[tokio::test(flavor = "multi_thread")]
async fn row_level_security_that_hides_rows_is_refused() {
    let env = TestEnv::new("rls-hides").await;
    table(&env, true).await;
    env.put_row("image/shared.png", b"shared".to_vec()).await;
    let url = env.least_privilege_url();
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE public.other (id int PRIMARY KEY, tenant int, path text);
         INSERT INTO public.other VALUES (1, 2, 'image/shared.png');
         GRANT SELECT, UPDATE ON public.other TO relocator_job;
         ALTER TABLE public.other ENABLE ROW LEVEL SECURITY;
         CREATE POLICY tenant ON public.other FOR SELECT USING (tenant = 1);",
    )
    .await
    .unwrap();
    let out = env
        .run_cmd(&["--referenced-by", "other.path"])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("row-level security on public.other"), "{err}");

    db.batch_execute(
        "ALTER TABLE public.avatars ADD COLUMN tenant int DEFAULT 1;
         ALTER TABLE public.avatars ENABLE ROW LEVEL SECURITY;
         CREATE POLICY tenant ON public.avatars USING (tenant = 1);",
    )
    .await
    .unwrap();
    let out = env.run_cmd(&[]).env("DATABASE_URL", &url).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("row-level security on public.avatars"),
        "{err}"
    );
    assert_eq!(env.rows().await[0].1, "image/shared.png", "nothing changed");
    assert!(env
        .s3
        .ep()
        .head(&env.src_bucket, "image/shared.png")
        .await
        .unwrap()
        .is_some());
}

/// Review: two processes of one job start together, one with `--referenced-by`, one
/// without; both resolve their columns before either registers the run (a session holds
/// the job's registration lock). The run must keep the column, and neither process may
/// delete an object the column references (before: the second process erased the run's
/// column, and it and every later process deleted such objects).
#[tokio::test(flavor = "multi_thread")]
async fn a_process_that_was_not_given_the_column_deletes_nothing_it_references() {
    let env = TestEnv::new("refby-race").await;
    table(&env, true).await;
    for i in 0..6 {
        env.put_row(&format!("image/n{i}.png"), format!("n{i}").into_bytes())
            .await;
    }
    let mut db = env.db().await;
    db.batch_execute(
        "CREATE TABLE other (id int PRIMARY KEY, path text);
         INSERT INTO other VALUES (1, 'image/n1.png'), (2, 'image/n4.png');",
    )
    .await
    .unwrap();
    // The job's registration lock (lease::begin_run), held by this session.
    let args = env.job_args();
    let job = relocator::config::JobConfig::from_args(&args)
        .unwrap()
        .fingerprint();
    let hold = db.transaction().await.unwrap();
    hold.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&job])
        .await
        .unwrap();
    let with = spawn(
        &env,
        &["--batch-size", "2", "--referenced-by", "other.path"],
    );
    let without = spawn(&env, &["--batch-size", "2"]);
    let waiting = env.db().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = waiting
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "both processes wait to register");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hold.commit().await.unwrap();
    let (a, a_err) = finish(with);
    let (b, b_err) = finish(without);
    assert!(a == 0 || a == 1, "{a_err}");
    assert!(b == 0 || b == 1, "{b_err}");
    for key in ["image/n1.png", "image/n4.png"] {
        assert!(
            env.s3
                .ep()
                .head(&env.src_bucket, key)
                .await
                .unwrap()
                .is_some(),
            "{key} is referenced by other.path: kept\n{a_err}\n{b_err}"
        );
    }
    let stored: Vec<String> = db
        .query_one(
            "SELECT referenced_by FROM relocator.runs ORDER BY run_id DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        stored,
        [r#""public"."other"."path""#],
        "the run keeps the column"
    );
    // A later process without the option converges and still keeps them.
    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    let mut kept = env.keys(&env.src_bucket, "image/").await;
    kept.sort();
    assert_eq!(kept, ["image/n1.png", "image/n4.png"]);
    env.assert_no_row_dangles().await;
}

/// Two jobs on one table: the first moves `path` and keeps what `thumb` references; the
/// second moves `thumb` itself. The column the first job remembers is the second job's
/// own: its cleanup checks it (as its own column) and is not refused for "not checking"
/// it.
#[tokio::test(flavor = "multi_thread")]
async fn a_remembered_column_that_is_another_jobs_own_column_is_checked() {
    let env = TestEnv::new("refby-own").await;
    table(&env, true).await;
    let db = env.db().await;
    db.batch_execute("ALTER TABLE avatars ADD COLUMN thumb text")
        .await
        .unwrap();
    for i in 0..3 {
        let (img, th) = (format!("image/p{i}.png"), format!("thumbs/p{i}.png"));
        for key in [&img, &th] {
            put(&env, &env.src_bucket, key, key.as_bytes()).await;
        }
        db.execute(
            "INSERT INTO avatars (path, thumb) VALUES ($1, $2)",
            &[&img, &th],
        )
        .await
        .unwrap();
    }
    let (code, err) = env.run(&["--referenced-by", "avatars.thumb"]);
    assert_eq!(code, 0, "{err}");
    let thumbs_src = format!("s3://{}/thumbs/", env.src_bucket);
    let thumbs_dst = format!("s3://{}/thumbs2/", env.dst_bucket);
    let out = env
        .cmd()
        .args(["run", "--path-column", "thumb"])
        .args(["--source", &thumbs_src, "--dest", &thumbs_dst])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        env.keys(&env.src_bucket, "").await.is_empty(),
        "both jobs cleaned up"
    );
}

/// Review: row-level security enabled on a `--referenced-by` table while a run works
/// (after its start-up check) would hide the row that references an object from the
/// cleanup: it is looked at again inside every cleanup, which then deletes nothing
/// (exit 2, the fix named) and keeps the delete pending.
#[tokio::test(flavor = "multi_thread")]
async fn row_level_security_turned_on_during_a_run_stops_the_cleanup() {
    let env = TestEnv::new("rls-midrun").await;
    table(&env, true).await;
    env.put_row("image/a.png", b"a".to_vec()).await;
    let url = env.least_privilege_url();
    let mut db = env.db().await;
    db.batch_execute(
        "CREATE TABLE public.other (id int PRIMARY KEY, path text);
         INSERT INTO public.other VALUES (1, 'image/a.png');
         GRANT SELECT, UPDATE ON public.other TO relocator_job;
         CREATE POLICY nobody ON public.other FOR SELECT USING (false);",
    )
    .await
    .unwrap();
    // The row held, so the run waits at its commit while the policy is switched on.
    let tx = db.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM avatars WHERE id = 1 FOR UPDATE", &[])
        .await
        .unwrap();
    let mut child = env.run_cmd(&["--referenced-by", "public.other.path"]);
    let child = child
        .env("DATABASE_URL", &url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        until_a_session_waits_for_a_lock(&env),
    )
    .await
    .expect("the run waits at its commit");
    env.db()
        .await
        .batch_execute("ALTER TABLE public.other ENABLE ROW LEVEL SECURITY")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let (code, err) = finish(child);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("row-level security on public.other"), "{err}");
    assert!(
        env.s3
            .ep()
            .head(&env.src_bucket, "image/a.png")
            .await
            .unwrap()
            .is_some(),
        "the object other.path references is kept"
    );
}

/// Safety #12, suspected case: uuid ids on a live table. A row the application inserts
/// with an id below where the run has got to is not visited by that run; the run must not
/// claim the table whole: it says how many rows it left under the source prefix
/// unreported, and the rerun moves them.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_written_behind_the_run_is_counted_not_claimed() {
    let env = TestEnv::new("behind").await;
    let mut db = env.db().await;
    db.batch_execute("CREATE TABLE avatars (id uuid PRIMARY KEY, path varchar)")
        .await
        .unwrap();
    for (id, key) in [
        ("80000000-0000-0000-0000-000000000001", "image/a.png"),
        ("80000000-0000-0000-0000-000000000002", "image/b.png"),
    ] {
        put(&env, &env.src_bucket, key, key.as_bytes()).await;
        db.execute(
            "INSERT INTO avatars VALUES ($1::text::uuid, $2)",
            &[&id, &key],
        )
        .await
        .unwrap();
    }
    // The second row held: the run waits at its second commit, past the first id.
    let tx = db.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM avatars WHERE id = '80000000-0000-0000-0000-000000000002' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let summary = env.path("s.json");
    let child = spawn(&env, &["--batch-size", "1", "--summary-json", &summary]);
    tokio::time::timeout(
        Duration::from_secs(30),
        until_a_session_waits_for_a_lock(&env),
    )
    .await
    .expect("the run waits at its second commit");
    put(&env, &env.src_bucket, "image/early.png", b"early").await;
    env.db()
        .await
        .execute(
            "INSERT INTO avatars VALUES ('00000000-0000-0000-0000-000000000001', 'image/early.png')",
            &[],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let (code, err) = finish(child);
    assert_eq!(code, 3, "a row left behind is not done: {err}");
    assert_eq!(read_summary(&summary)["rows_left_unreported"], 1, "{err}");
    assert!(err.contains("did not report"), "{err}");

    let (code, err) = env.run(&["--summary-json", &summary]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(read_summary(&summary)["rows_left_unreported"], 0);
    assert!(env.keys(&env.src_bucket, "image/").await.is_empty());
    let paths: Vec<String> = env
        .db()
        .await
        .query("SELECT path FROM avatars ORDER BY path", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(paths, ["avatar/a.png", "avatar/b.png", "avatar/early.png"]);
}

/// `--max-rps` never waits inside a window a promise depends on: between the look at a
/// destination key and the copy it decides (here a multipart copy, which reads the source
/// first), and between the cleanup's look at each source (still the object copied?) and
/// the delete. Each wait there is time for the application to put an object the copy
/// would overwrite, or to replace a source the delete would remove. The proxy only notes
/// when each request arrives.
#[tokio::test(flavor = "multi_thread")]
async fn max_rps_waits_before_a_look_never_between_it_and_the_write() {
    let env = TestEnv::new("rps-window").await;
    table(&env, false).await;
    let big: Vec<u8> = (0..6 << 20).map(|i: u32| (i % 251) as u8).collect();
    env.put_row("image/big.bin", big).await;
    for k in ["a", "b", "c"] {
        env.put_row(&format!("image/{k}.png"), k.as_bytes().to_vec())
            .await;
    }
    let started = std::time::Instant::now();
    let arrivals: Arc<std::sync::Mutex<Vec<(f64, String, String)>>> = Default::default();
    let noted = arrivals.clone();
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(move |_, method, path| {
            let at = started.elapsed().as_secs_f64();
            if let Ok(mut n) = noted.lock() {
                n.push((at, method.to_owned(), path.to_owned()));
            }
            Fault::Forward
        }),
    )
    .await;
    let out = env
        .run_cmd(&[
            "--max-rps",
            "2",
            "--multipart-threshold",
            "5MiB",
            "--part-size",
            "5MiB",
        ])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = arrivals.lock().unwrap().clone();
    let (src, dst) = (&env.src_bucket, &env.dst_bucket);
    let first = |method: &str, path: &str| {
        seen.iter()
            .find(|(_, m, p)| m == method && p.trim_end_matches('/') == path)
            .map(|(t, _, _)| *t)
            .unwrap_or_else(|| panic!("no {method} {path} in {seen:#?}"))
    };
    // The look at the big object's destination, then CreateMultipartUpload.
    let look = first("HEAD", &format!("/{dst}/avatar/big.bin"));
    let create = first("POST", &format!("/{dst}/avatar/big.bin"));
    assert!(
        create - look < 0.4,
        "{:.2}s between the look at the destination and the copy's first write",
        create - look
    );
    // The cleanup: the DeleteObjects, and the last look at each source before it.
    let delete = first("POST", &format!("/{src}"));
    let looks: Vec<f64> = ["big.bin", "a.png", "b.png", "c.png"]
        .iter()
        .map(|k| {
            seen.iter()
                .filter(|(t, m, p)| *t < delete && m == "HEAD" && *p == format!("/{src}/image/{k}"))
                .map(|(t, _, _)| *t)
                .fold(f64::NAN, f64::max)
        })
        .collect();
    let earliest = looks.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        delete - earliest < 0.4,
        "{:.2}s between the cleanup's first look at a source and the delete ({looks:?})",
        delete - earliest
    );
    assert_eq!(env.keys(src, "image/").await, Vec::<String>::new());
}

/// Start a run through a proxy that answers the first request `first` (method, path)
/// with nothing for 2 s and then a 503, without forwarding it; once that request has
/// arrived, `meanwhile` runs. Returns the run's exit code and stderr.
async fn with_first_unanswered<F: std::future::Future<Output = ()>>(
    env: &TestEnv,
    first: (&'static str, String),
    meanwhile: F,
) -> (Option<i32>, String) {
    with_first(env, first, Fault::Stall(Duration::from_secs(2)), meanwhile).await
}

/// The same with another `fault` for that first request.
async fn with_first<F: std::future::Future<Output = ()>>(
    env: &TestEnv,
    first: (&'static str, String),
    fault: Fault,
    meanwhile: F,
) -> (Option<i32>, String) {
    let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let once = stalled.clone();
    let (method, path) = first.clone();
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(move |_, m, p| {
            if m == method
                && p.trim_end_matches('/') == path
                && !once.swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                fault
            } else {
                Fault::Forward
            }
        }),
    )
    .await;
    let mut run = env.run_cmd(&["--endpoint-url", &proxy.url()]);
    let child = tokio::task::spawn_blocking(move || run.output().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stalled.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "no {} {} came", first.0, first.1);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    meanwhile.await;
    let out = child.await.unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A CopyObject goes unanswered (the proxy holds it 2 s, then answers 503, never
/// forwarding it) and the application puts its own object at the destination key
/// meanwhile. The SDK used to retry the copy after its backoff, on the look taken before
/// — and overwrote the application's object. Now the copy is sent once; relocator looks
/// again, finds the key taken, and reports a conflict.
#[tokio::test(flavor = "multi_thread")]
async fn an_unanswered_copy_is_never_retried_onto_an_object_put_since() {
    let env = TestEnv::new("unanswered-copy").await;
    table(&env, false).await;
    env.put_row("image/a.png", b"source".to_vec()).await;
    let copy = ("PUT", format!("/{}/avatar/a.png", env.dst_bucket));
    let (code, err) = with_first_unanswered(&env, copy, async {
        put(&env, &env.dst_bucket, "avatar/a.png", b"the application's").await;
    })
    .await;
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("conflict=1"), "{err}");
    assert_eq!(
        bytes(&env, &env.dst_bucket, "avatar/a.png").await.unwrap(),
        b"the application's",
        "never overwritten"
    );
    assert_eq!(env.rows().await[0].1, "image/a.png");
    assert_eq!(
        bytes(&env, &env.src_bucket, "image/a.png").await.unwrap(),
        b"source"
    );
}

/// The cleanup's DeleteObjects goes unanswered, and the application uploads a new file
/// at the legacy key meanwhile. The SDK used to retry the delete on the look taken
/// before, and deleted the new upload (reported `moved`). Now the delete is sent once;
/// the cleanup looks again and keeps the source, which is no longer the object copied.
#[tokio::test(flavor = "multi_thread")]
async fn an_unanswered_delete_is_never_retried_onto_a_source_uploaded_since() {
    let env = TestEnv::new("unanswered-delete").await;
    table(&env, false).await;
    env.put_row("image/a.png", b"source".to_vec()).await;
    let delete = ("POST", format!("/{}", env.src_bucket));
    let (code, err) = with_first_unanswered(&env, delete, async {
        put(&env, &env.src_bucket, "image/a.png", b"uploaded again").await;
    })
    .await;
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("source_changed=1"), "{err}");
    assert_eq!(env.rows().await[0].1, "avatar/a.png");
    assert_eq!(
        bytes(&env, &env.dst_bucket, "avatar/a.png").await.unwrap(),
        b"source"
    );
    assert_eq!(
        bytes(&env, &env.src_bucket, "image/a.png").await.unwrap(),
        b"uploaded again",
        "the new upload stays"
    );
}

/// The cleanup's DeleteObjects is carried out, but its answer is lost (the proxy closes
/// the connection). The cleanup looks again and finds the source gone: relocator deleted
/// it, and says so (`deleted`, not `gone`). (Review: reported `deleted=0`, marked `gone`.)
#[tokio::test(flavor = "multi_thread")]
async fn a_delete_carried_out_whose_answer_is_lost_is_reported_deleted() {
    let env = TestEnv::new("delete-answer-lost").await;
    table(&env, false).await;
    env.put_row("image/a.png", b"source".to_vec()).await;
    let delete = ("POST", format!("/{}", env.src_bucket));
    let (code, err) = with_first(&env, delete, Fault::Lost, async {}).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("deleted=1"), "{err}");
    let cleanup: String = env
        .db()
        .await
        .query_one("SELECT cleanup FROM relocator.moves", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(cleanup, "deleted");
    assert!(bytes(&env, &env.src_bucket, "image/a.png").await.is_none());
}

/// `--verify-content` reads a copy back with other bytes (the proxy corrupts the read)
/// and takes the copy back: the look at it (still relocator's copy?) and the delete must
/// not have a `--max-rps` wait between them, or an object the application put there in
/// that wait is deleted (a review reproduced it at `--max-rps 1`).
#[tokio::test(flavor = "multi_thread")]
async fn max_rps_never_waits_between_the_look_at_a_copy_and_taking_it_back() {
    let env = TestEnv::new("rps-take-back").await;
    table(&env, false).await;
    env.put_row("image/a.png", b"source".to_vec()).await;
    let started = Instant::now();
    let arrivals: Arc<std::sync::Mutex<Vec<(f64, String, String)>>> = Default::default();
    let noted = arrivals.clone();
    let copy = format!("/{}/avatar/a.png", env.dst_bucket);
    let read_back = copy.clone();
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(move |_, method, path| {
            if let Ok(mut n) = noted.lock() {
                n.push((
                    started.elapsed().as_secs_f64(),
                    method.to_owned(),
                    path.to_owned(),
                ));
            }
            if method == "GET" && path == read_back {
                Fault::Corrupt
            } else {
                Fault::Forward
            }
        }),
    )
    .await;
    let out = env
        .run_cmd(&["--max-rps", "2", "--verify-content"])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let seen = arrivals.lock().unwrap().clone();
    let delete = seen
        .iter()
        .find(|(_, m, p)| m == "DELETE" && *p == copy)
        .map(|(t, _, _)| *t)
        .unwrap_or_else(|| panic!("the copy was not taken back: {seen:#?}"));
    let look = seen
        .iter()
        .filter(|(t, m, p)| *t < delete && m == "HEAD" && *p == copy)
        .map(|(t, _, _)| *t)
        .fold(f64::NAN, f64::max);
    assert!(
        delete - look < 0.4,
        "{:.2}s between the look at the copy and its delete",
        delete - look
    );
    assert!(bytes(&env, &env.dst_bucket, "avatar/a.png").await.is_none());
    assert_eq!(env.rows().await[0].1, "image/a.png");
}

/// Found while reviewing #18: two rows share a source key, and a unique index (here a
/// partial one, on the new prefix only) makes their two new keys duplicates. No row is
/// refused alone, so the batch's statement failed on every attempt: plan predicted
/// `moved` for both, and every run exited 1 without moving anything. Now the rows are
/// tried one after the other: the second is `rejected` (23505), the others move, and the
/// shared source stays for the row still pointing at it.
#[tokio::test(flavor = "multi_thread")]
async fn rows_that_conflict_only_with_each_other_do_not_block_the_batch() {
    let env = TestEnv::new("refused-together").await;
    table(&env, false).await;
    env.db()
        .await
        .batch_execute(
            "CREATE UNIQUE INDEX no_dup_new ON avatars (path) WHERE path LIKE 'avatar/%'",
        )
        .await
        .unwrap();
    put(&env, &env.src_bucket, "image/u.png", b"shared").await;
    put(&env, &env.src_bucket, "image/v.png", b"v").await;
    env.db()
        .await
        .batch_execute(
            "INSERT INTO avatars (path) VALUES ('image/u.png'), ('image/u.png'), ('image/v.png')",
        )
        .await
        .unwrap();
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
    let (code, err) = env.run(&["--report", &env.path("r.csv")]);
    assert_eq!(code, 3, "{err}");
    let predicted = common::read_outcomes(&env.path("plan.csv"));
    let outcomes = common::read_outcomes(&env.path("r.csv"));
    for (id, want) in [("1", "moved"), ("2", "rejected"), ("3", "moved")] {
        assert_eq!(outcomes[id].0, want, "row {id}: {outcomes:?}");
        assert_eq!(predicted[id].0, want, "plan, row {id}: {predicted:?}");
    }
    assert!(std::fs::read_to_string(env.path("r.csv"))
        .unwrap()
        .contains("23505"));
    let rows: Vec<String> = env.rows().await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(rows, ["avatar/u.png", "image/u.png", "avatar/v.png"]);
    assert_eq!(
        bytes(&env, &env.src_bucket, "image/u.png").await.as_deref(),
        Some(b"shared".as_slice()),
        "the shared source stays for row 2"
    );
    assert!(bytes(&env, &env.src_bucket, "image/v.png").await.is_none());
    env.assert_no_row_dangles().await;
}

/// The fixes round's review (2): a deferred unique constraint is checked only at the
/// commit, so the rows the table refuses were looked for in vain (each row tried with
/// the constraint deferred passed) and every run exited 1, with `plan` predicting
/// `moved`. The rows are now tried with the constraints immediate: the row whose new
/// key exists is `rejected`, the others move.
#[tokio::test(flavor = "multi_thread")]
async fn a_deferred_constraint_refuses_its_row_not_the_batch() {
    let env = TestEnv::new("refused-deferred").await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE avatars (
             id serial PRIMARY KEY,
             path text CONSTRAINT upath UNIQUE DEFERRABLE INITIALLY DEFERRED);
         INSERT INTO avatars (path)
             VALUES ('image/a1.png'), ('image/a2.png'), ('image/a3.png'), ('avatar/a2.png');",
    )
    .await
    .unwrap();
    for p in ["image/a1.png", "image/a2.png", "image/a3.png"] {
        put(&env, &env.src_bucket, p, p.as_bytes()).await;
    }
    put(&env, &env.dst_bucket, "avatar/a2.png", b"image/a2.png").await;
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
    let (code, err) = env.run(&["--report", &env.path("r.csv")]);
    assert_eq!(code, 3, "{err}");
    let predicted = common::read_outcomes(&env.path("plan.csv"));
    let outcomes = common::read_outcomes(&env.path("r.csv"));
    for (id, want) in [("1", "moved"), ("2", "rejected"), ("3", "moved")] {
        assert_eq!(outcomes[id].0, want, "row {id}: {outcomes:?}");
        assert_eq!(predicted[id].0, want, "plan, row {id}: {predicted:?}");
    }
    let rows: Vec<String> = env.rows().await.into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        rows,
        [
            "avatar/a1.png",
            "image/a2.png",
            "avatar/a3.png",
            "avatar/a2.png"
        ]
    );
}

/// The fixes round's review (4): the probe for the rows the table refuses did not guard
/// the checksum the commit guards (`--checksum-column`). A row the application changed
/// while the commit waited stayed written in the probe, so the next row sharing its key
/// looked like a duplicate under a unique index and was `rejected`. Now that row moves.
#[tokio::test(flavor = "multi_thread")]
async fn the_probe_for_refused_rows_guards_what_the_commit_guards() {
    let env = TestEnv::new("refused-checksum").await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE avatars (id serial PRIMARY KEY, path text, checksum varchar);
         CREATE UNIQUE INDEX new_once ON avatars (path) WHERE path LIKE 'avatar/%';
         CREATE FUNCTION no_bad() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.path LIKE 'avatar/bad%' THEN RAISE EXCEPTION 'refused %', NEW.path; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER no_bad BEFORE UPDATE ON avatars FOR EACH ROW EXECUTE FUNCTION no_bad();",
    )
    .await
    .unwrap();
    let md5 = |b: &[u8]| {
        use md5::Digest;
        aws_smithy_types::base64::encode(md5::Md5::digest(b))
    };
    for p in ["image/s.png", "image/bad.png"] {
        put(&env, &env.src_bucket, p, p.as_bytes()).await;
    }
    for p in ["image/s.png", "image/s.png", "image/bad.png"] {
        db.execute(
            "INSERT INTO avatars (path, checksum) VALUES ($1, $2)",
            &[&p, &md5(p.as_bytes())],
        )
        .await
        .unwrap();
    }
    let mut app = env.db().await;
    let tx = app.transaction().await.unwrap();
    tx.execute(
        "UPDATE avatars SET checksum = 'AAAAAAAAAAAAAAAAAAAAAA==' WHERE id = 1",
        &[],
    )
    .await
    .unwrap();
    let child = spawn(
        &env,
        &[
            "--checksum-column",
            "checksum",
            "--report",
            &env.path("r.csv"),
        ],
    );
    until_a_session_waits_for_a_lock(&env).await;
    tx.commit().await.unwrap();
    let (code, err) = finish(child);
    assert_eq!(code, 3, "{err}");
    let outcomes = common::read_outcomes(&env.path("r.csv"));
    for (id, want) in [("1", "changed_by_app"), ("2", "moved"), ("3", "rejected")] {
        assert_eq!(outcomes[id].0, want, "row {id}: {outcomes:?}");
    }
}

/// Found by review: the cleanup looked at each source (is it still the object copied?)
/// before it waited for the table's writers (`LOCK TABLE … IN SHARE MODE`, up to 2 s),
/// then deleted. An application that replaced the object during that wait lost its new
/// upload on a server that does not honour the ETag in a delete (Garage ignores it). Here
/// an unrelated row's update holds the cleanup at the lock while the application uploads
/// a new object at the source key; then it commits. The look is taken again after the
/// wait: the new upload is kept and reported. On the code before, it was deleted.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_replaced_while_the_cleanup_waits_for_writers_is_kept() {
    let env = TestEnv::new("src-replaced-lock").await;
    table(&env, true).await;
    env.put_row("image/user-1.png", b"old face".to_vec()).await;
    env.db()
        .await
        .batch_execute("INSERT INTO avatars (path) VALUES ('elsewhere/unrelated.png')")
        .await
        .unwrap();
    // The application writes another row and holds its transaction open.
    let mut app = env.db().await;
    let tx = app.transaction().await.unwrap();
    tx.execute("UPDATE avatars SET path = path WHERE id = 2", &[])
        .await
        .unwrap();
    let child = spawn(&env, &["--summary-json", &env.path("s.json")]);
    until_a_session_waits_for_a_lock(&env).await;
    let new_face = b"new face, uploaded while the cleanup waited".as_slice();
    put(&env, &env.src_bucket, "image/user-1.png", new_face).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    tx.commit().await.unwrap();
    let (code, err) = finish(child);
    assert_eq!(code, 3, "a replaced source needs attention: {err}");
    assert_eq!(
        bytes(&env, &env.src_bucket, "image/user-1.png")
            .await
            .as_deref(),
        Some(new_face),
        "the application's new upload was deleted"
    );
    assert_eq!(env.rows().await[0].1, "avatar/user-1.png");
    let s = read_summary(&env.path("s.json"));
    assert_eq!(s["outcomes"]["source_changed"], 1, "{s}");
}
