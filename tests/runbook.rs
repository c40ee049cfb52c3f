//! The production runbook against the real stack: preflight names each fix, backup → run
//! → rollback returns the table and the objects exactly (also under SIGKILL), progress
//! is a bar on a terminal and plain lines on a pipe.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::ClientExt;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{read_summary, var, TestEnv};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relocator::commands::seed;

/// `relocator SUB --source … --dest … EXTRA` for this test.
fn job(env: &TestEnv, sub: &str, extra: &[&str]) -> Command {
    let mut c = env.cmd();
    c.args([sub, "--source", &env.source(), "--dest", &env.dest()])
        .args(extra);
    c
}

/// Run to completion: (exit code, stdout, stderr).
fn output(mut c: Command) -> (i32, String, String) {
    let out = c.output().expect("running relocator");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn backup(env: &TestEnv, file: &str) -> serde_json::Value {
    let json = env.path(&format!("{file}.json"));
    let (code, out, err) = output(job(
        env,
        "backup",
        &["--out", &env.path(file), "--summary-json", &json],
    ));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("sha256"), "{out}");
    read_summary(&json)
}

/// Every row is back at its seeded key, whose object has the seeded bytes, and nothing
/// relocator created is left under the destination prefix.
async fn assert_rolled_back(env: &TestEnv, seeded: &[seed::SeedRow]) {
    let rows = env.rows().await;
    assert_eq!(rows.len(), seeded.len());
    for ((id, path), s) in rows.iter().zip(seeded) {
        assert_eq!(path, &s.path, "row {id} is not back at its old key");
        if s.has_object {
            let bytes = env
                .s3
                .ep()
                .get_bytes(&env.src_bucket, path)
                .await
                .unwrap_or_else(|e| panic!("row {id}: no object at its old key {path}: {e:#}"));
            assert_eq!(
                bytes,
                seed::object_bytes(env.seed, &s.path, &(100..4096)),
                "row {id}: bytes differ at {path}"
            );
        }
    }
    let left = env.keys(&env.dst_bucket, "avatar/").await;
    assert!(left.is_empty(), "new objects left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_run_rollback_returns_the_table_to_the_backup_and_every_object_home() {
    let env = TestEnv::new("rollback").await;
    let seeded = env.seed(1500, 10).await;
    let before = backup(&env, "before.csv");
    assert_eq!(before["rows"], 1500);

    let (code, _, err) = output(job(
        &env,
        "run",
        &["--backup", &env.path("before.csv"), "--batch-size", "200"],
    ));
    assert_eq!(code, 3, "10 rows have no object: {err}");
    let recorded: String = env
        .db()
        .await
        .query_one("SELECT backup->>'sha256' FROM relocator.runs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, before["sha256"], "the run records its backup");

    let (code, _, err) = output(job(
        &env,
        "rollback",
        &[
            "--batch-size",
            "170",
            "--summary-json",
            &env.path("rollback.json"),
        ],
    ));
    assert_eq!(code, 0, "{err}");
    let s = read_summary(&env.path("rollback.json"));
    assert_eq!(s["outcomes"]["rolled_back"], 1490, "{s}");

    let after = backup(&env, "after.csv");
    assert_eq!(
        std::fs::read(env.path("before.csv")).unwrap(),
        std::fs::read(env.path("after.csv")).unwrap(),
        "the table is exactly the backup again"
    );
    assert_eq!(after["sha256"], before["sha256"]);
    assert_rolled_back(&env, &seeded).await;

    // A rolled-back job can be run again: a new run, moving everything anew.
    let (code, _, err) = output(job(
        &env,
        "run",
        &["--summary-json", &env.path("again.json")],
    ));
    assert_eq!(code, 3, "{err}");
    assert_eq!(
        read_summary(&env.path("again.json"))["outcomes"]["moved"],
        1490
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_killed_with_sigkill_and_rerun_still_ends_at_the_backup() {
    let env = TestEnv::new("rollback-kill9").await;
    let seeded = env.seed(1500, 0).await;
    backup(&env, "before.csv");
    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    // The application changes one moved row meanwhile: rollback must leave it alone.
    let db = env.db().await;
    db.execute(
        "UPDATE avatars SET path = 'avatar/uploaded-later.png' WHERE id = 7",
        &[],
    )
    .await
    .unwrap();
    env.s3
        .ep()
        .put(
            &env.dst_bucket,
            "avatar/uploaded-later.png",
            b"new upload".to_vec(),
            "image/png",
        )
        .await
        .unwrap();

    let mut rng = StdRng::seed_from_u64(0xb4c4);
    let mut kills = 0;
    for _ in 0..12 {
        let mut child = job(
            &env,
            "rollback",
            &["--batch-size", "25", "--concurrency", "8"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        tokio::time::sleep(Duration::from_millis(rng.random_range(60..500))).await;
        if child.try_wait().unwrap().is_some() {
            break;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        env.assert_no_row_dangles().await;
    }
    assert!(
        kills >= 5,
        "only {kills} kills landed before the rollback finished"
    );

    let (code, _, err) = output(job(
        &env,
        "rollback",
        &["--summary-json", &env.path("last.json")],
    ));
    // Row 7 is reported `changed_by_app` by whichever attempt reaches it: this last one
    // (exit 3) when no killed attempt got that far, as on a loaded machine.
    let outcomes = read_summary(&env.path("last.json"))["outcomes"].clone();
    let others: Vec<(&String, &serde_json::Value)> = outcomes
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, n)| !matches!(k.as_str(), "rolled_back" | "changed_by_app") && **n != 0)
        .collect();
    assert!(others.is_empty(), "{outcomes}: {err}");
    match code {
        0 => assert_eq!(outcomes["changed_by_app"].as_u64().unwrap_or(0), 0, "{err}"),
        3 => assert_eq!(outcomes["changed_by_app"], 1, "{err}"),
        _ => panic!("rollback exited {code}: {err}"),
    }
    let path7: String = db
        .query_one("SELECT path FROM avatars WHERE id = 7", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(path7, "avatar/uploaded-later.png", "the app's write stands");
    db.execute(
        "UPDATE avatars SET path = $1 WHERE id = 7",
        &[&seeded[6].path],
    )
    .await
    .unwrap();
    env.s3
        .delete_object()
        .bucket(&env.dst_bucket)
        .key("avatar/uploaded-later.png")
        .send()
        .await
        .unwrap();
    backup(&env, "after.csv");
    assert_eq!(
        std::fs::read(env.path("before.csv")).unwrap(),
        std::fs::read(env.path("after.csv")).unwrap(),
        "apart from the app's row, the table is exactly the backup again"
    );
    // Row 7's old object was deleted by the run and never restored (its row stayed at the
    // app's key), so only the others are compared byte by byte.
    for ((id, path), s) in env
        .rows()
        .await
        .iter()
        .zip(&seeded)
        .filter(|((id, _), _)| *id != 7)
    {
        let bytes = env.s3.ep().get_bytes(&env.src_bucket, path).await.unwrap();
        assert_eq!(
            bytes,
            seed::object_bytes(env.seed, &s.path, &(100..4096)),
            "row {id}"
        );
    }
    // The app-changed row's objects are left alone: its moved object is the only copy of
    // the original bytes.
    let left = env.keys(&env.dst_bucket, "avatar/").await;
    let moved7 = format!("avatar/{}", seeded[6].path.strip_prefix("image/").unwrap());
    assert_eq!(left, vec![moved7], "nothing else is left behind");
    let pending: i64 = db
        .query_one(
            "SELECT count(*) FROM relocator.moves
              WHERE rolled_back_at IS NULL OR (copied AND rollback = 'restored'
                                               AND rollback_cleaned_at IS NULL)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 0, "every move was undone and cleaned up");
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_refuses_while_a_run_holds_the_table_and_a_run_refuses_during_a_rollback() {
    let env = TestEnv::new("rollback-lock").await;
    env.seed(50, 0).await;
    let (code, err) = env.run(&[]);
    assert_eq!(code, 0, "{err}");
    // A run in progress elsewhere holds the table's lock shared.
    let other = env.db().await;
    other
        .execute(
            "SELECT pg_advisory_lock_shared(x'72656c74'::int, hashtext('public.avatars'))",
            &[],
        )
        .await
        .unwrap();
    let (code, _, err) = output(job(&env, "rollback", &[]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("in progress"), "{err}");
    assert_eq!(
        env.keys(&env.src_bucket, "image/").await.len(),
        0,
        "nothing was restored"
    );
    drop(other);
    // A rollback in progress holds it exclusively.
    let other = env.db().await;
    other
        .execute(
            "SELECT pg_advisory_lock(x'72656c74'::int, hashtext('public.avatars'))",
            &[],
        )
        .await
        .unwrap();
    let (code, err) = env.run(&[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("rollback of public.avatars is in progress"),
        "{err}"
    );
}

/// `--max-rps` caps every S3 request a command sends, not only a run's copies:
/// preflight's bucket checks, probes and its 64 sample copies wait for it too.
#[tokio::test(flavor = "multi_thread")]
async fn preflight_waits_for_max_rps_on_every_request() {
    let env = TestEnv::new("preflight_rps").await;
    env.seed(5, 0).await;
    let started = std::time::Instant::now();
    let (code, out, err) = output(job(
        &env,
        "preflight",
        &["--max-rps", "10", "--summary-json", &env.path("pf.json")],
    ));
    let took = started.elapsed().as_secs_f64();
    assert_eq!(code, 0, "{out}{err}");
    // At least the 64 sample copies and the 2 bucket checks, at 10 a second (one burst).
    assert!(
        took >= 6.5,
        "preflight sent its requests in {took:.1}s, faster than --max-rps 10 allows"
    );
    let pf = read_summary(&env.path("pf.json"));
    assert!(pf["copies_per_sec"].as_f64().unwrap() <= 11.0, "{pf}");
}

#[tokio::test(flavor = "multi_thread")]
async fn preflight_passes_on_a_good_stack_and_names_the_fix_for_each_problem() {
    let env = TestEnv::new("preflight").await;
    env.seed(40, 0).await;
    let (code, out, err) = output(job(
        &env,
        "preflight",
        &["--summary-json", &env.path("pf.json")],
    ));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("checks passed"), "{out}");
    assert!(out.contains("40 rows"), "{out}");
    assert!(out.contains("estimate:"), "{out}");
    let pf = read_summary(&env.path("pf.json"));
    assert!(pf["copies_per_sec"].as_f64().unwrap() > 0.0);
    assert!(
        env.keys(&env.dst_bucket, "").await.is_empty(),
        "the probes were removed"
    );

    assert!(out.contains("ok    other references"), "{out}");

    // Another table points at objects under the source prefix: preflight names it and
    // the option that keeps them; given the option, it checks what the cleanup needs.
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE posts (id int PRIMARY KEY, image text, title varchar(40));
         INSERT INTO posts VALUES (1, 'elsewhere/a.png', 'image/ in a title'),
                                  (2, (SELECT path FROM avatars LIMIT 1), 'x')",
    )
    .await
    .unwrap();
    let (code, out, err) = output(job(&env, "preflight", &[]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("warn  other references"), "{out}");
    assert!(
        out.contains(r#"fix: --referenced-by '"public"."posts"."image"' --referenced-by '"public"."posts"."title"'"#),
        "{out}"
    );
    let (code, out, err) = output(job(
        &env,
        "preflight",
        &[
            "--referenced-by",
            "posts.image",
            "--referenced-by",
            "posts.title",
        ],
    ));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(r#"ok    referenced by    relocator may read "public"."posts"."image""#),
        "{out}"
    );
    assert!(out.contains("warn  referenced-by index"), "{out}");
    assert!(out.contains("ok    other references"), "{out}");

    let fails = |extra: &[&str], env_vars: &[(&str, &str)], expect: &[&str]| {
        let mut c = job(&env, "preflight", extra);
        for (k, v) in env_vars {
            c.env(k, v);
        }
        let (code, out, err) = output(c);
        assert_eq!(code, 2, "{extra:?}: {out}{err}");
        for e in expect {
            assert!(out.contains(e), "{extra:?}: expected {e:?} in\n{out}");
        }
        assert!(out.contains("a run would not succeed"), "{out}");
    };
    fails(
        &["--table", "no_such_table"],
        &[],
        &["FAIL  table", "check --table"],
    );
    fails(
        &["--path-column", "no_such_column"],
        &[],
        &["has no column", "check --path-column"],
    );
    let bad_dest = format!("s3://{}-gone/avatar/", env.name);
    let mut c = env.cmd();
    c.args(["preflight", "--source", &env.source(), "--dest", &bad_dest]);
    let (code, out, _) = output(c);
    assert_eq!(code, 2);
    assert!(
        out.contains("does not exist; create it or fix --dest"),
        "{out}"
    );

    // A role that may read but not update the table.
    let role = format!("ro_{}", env.name.replace('-', "_"));
    db.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'ro-pw';
         GRANT USAGE ON SCHEMA public TO {role};
         GRANT SELECT ON avatars TO {role};"
    ))
    .await
    .unwrap();
    let mut url = url::Url::parse(&env.database_url).unwrap();
    url.set_username(&role).unwrap();
    url.set_password(Some("ro-pw")).unwrap();
    fails(
        &[],
        &[("DATABASE_URL", url.as_str())],
        &[
            "FAIL  update",
            &format!("GRANT UPDATE ON \"public\".\"avatars\" TO \"{role}\";"),
            "FAIL  ledger",
        ],
    );
    db.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();

    // A key that may only read (the stack's second key; it reads the stack's buckets).
    let prefix = format!("preflight-{}", env.name);
    let (src, dst) = (
        format!("s3://legacy-s3/{prefix}/image/"),
        format!("s3://production-s3/{prefix}/avatar/"),
    );
    env.s3
        .ep()
        .put(
            "legacy-s3",
            &format!("{prefix}/image/a.png"),
            b"a".to_vec(),
            "image/png",
        )
        .await
        .unwrap();
    let mut c = env.cmd();
    c.args(["preflight", "--source", &src, "--dest", &dst])
        .env("AWS_ACCESS_KEY_ID", var("RELOCATOR_TEST_READONLY_KEY_ID"))
        .env(
            "AWS_SECRET_ACCESS_KEY",
            var("RELOCATOR_TEST_READONLY_SECRET"),
        );
    let (code, out, err) = output(c);
    env.s3
        .delete_object()
        .bucket("legacy-s3")
        .key(format!("{prefix}/image/a.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.contains("ok    source read"), "{out}");
    assert!(out.contains("FAIL  source delete"), "{out}");
    assert!(
        out.contains(&format!(
            "allow s3:DeleteObject on arn:aws:s3:::legacy-s3/{prefix}/image/*"
        )),
        "{out}"
    );
    assert!(out.contains("allow s3:PutObject"), "{out}");
    assert!(!out.contains(&var("RELOCATOR_TEST_READONLY_SECRET")));
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_is_a_bar_on_a_terminal_and_plain_lines_on_a_pipe() {
    let env = TestEnv::new("progress").await;
    env.seed(400, 0).await;
    // On a pipe: plain log lines, no control characters.
    let mut plan = job(&env, "plan", &["--out", &env.path("plan.csv")]);
    plan.env("RUST_LOG", "info");
    let (code, _, err) = output(plan);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("plan progress"), "{err}");
    assert!(err.contains("total=\"400\""), "{err}");
    assert!(
        !err.contains('\r') && !err.contains('\u{1b}'),
        "control characters on a pipe: {err:?}"
    );

    // On a pseudo-terminal (script(1) gives the command one): the bar.
    let c = job(
        &env,
        "run",
        &[
            "--batch-size",
            "20",
            "--concurrency",
            "4",
            "--max-rps",
            "200",
        ],
    );
    let mut words = vec![c.get_program().to_string_lossy().into_owned()];
    words.extend(c.get_args().map(|a| a.to_string_lossy().into_owned()));
    let line = words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ");
    let envs: Vec<(String, String)> = c
        .get_envs()
        .filter_map(|(k, v)| {
            Some((
                k.to_string_lossy().into_owned(),
                v?.to_string_lossy().into_owned(),
            ))
        })
        .collect();
    let mut script = Command::new("script");
    script
        .args(["-q", "-e", "-c", &line, "/dev/null"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("TERM", "xterm-256color")
        .envs(envs)
        .stdin(Stdio::null());
    let out = script.output().expect("script(1) from util-linux");
    let tty = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{tty}");
    assert!(tty.contains("/400 rows"), "no bar on the terminal: {tty:?}");
    assert!(tty.contains("ETA"), "{tty:?}");
    assert!(
        tty.contains('\r') || tty.contains('\u{1b}'),
        "a bar redraws in place: {tty:?}"
    );
    assert!(
        !tty.contains("run progress"),
        "no plain lines on a terminal: {tty:?}"
    );
}
