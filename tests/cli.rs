//! The real binary on bad input: a clear error naming the problem, exit 2, nothing
//! changed; and secrets never printed.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::ClientExt;

use common::TestEnv;

/// Run with `args` (after `run`) and expect exit 2 with `needle` in the message, and no
/// change: rows as before, no ledger schema, destination bucket empty.
async fn refused(env: &TestEnv, args: &[&str], needle: &str) {
    let before = env.rows().await;
    let out = env.cmd().arg("run").args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "args {args:?}: {err}");
    assert!(
        err.contains(needle),
        "args {args:?}: expected {needle:?} in: {err}"
    );
    assert_eq!(env.rows().await, before, "args {args:?} changed rows");
    let ledger: bool = env
        .db()
        .await
        .query_one("SELECT to_regclass('relocator.moves') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!ledger, "args {args:?} created the ledger");
    assert!(env.keys(&env.dst_bucket, "").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_with_exit_2_and_nothing_changes() {
    let env = TestEnv::new("badinput").await;
    env.seed(20, 0).await;
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE nopk (id int, path text);
         CREATE TABLE intpath (id int PRIMARY KEY, path int);
         CREATE COLLATION IF NOT EXISTS caseless
             (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
         CREATE TABLE caseless (id int PRIMARY KEY, path text COLLATE caseless);
         INSERT INTO caseless VALUES (1, 'image/a.png'), (2, 'IMAGE/A.PNG');",
    )
    .await
    .unwrap();
    let (src, dst) = (env.source(), env.dest());
    let same_bucket_nested = format!("s3://{}/image/new/", env.src_bucket);
    // Rows hold keys, not buckets: a destination prefix inside (or around, or equal to)
    // the source prefix in *another* bucket makes moved rows match --source again.
    let other_bucket_nested = format!("s3://{}/image/new/", env.dst_bucket);
    let other_bucket_same = format!("s3://{}/image/", env.dst_bucket);
    let other_bucket_around = format!("s3://{}/", env.dst_bucket);
    let missing_bucket = "s3://no-such-bucket-relocator/avatar/".to_string();
    let not_a_backup = env.path("not-a-backup.csv");
    std::fs::write(&not_a_backup, "user,avatar\n1,x\n").unwrap();
    let s = |v: &[&str]| -> Vec<String> { v.iter().map(|x| x.to_string()).collect() };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            s(&["--source", &src, "--dest", &src]),
            "--source and --dest are both",
        ),
        (
            s(&["--source", &src, "--dest", &same_bucket_nested]),
            "one prefix contains",
        ),
        (
            s(&["--source", &src, "--dest", &other_bucket_nested]),
            "rows hold only the key",
        ),
        (
            s(&["--source", &src, "--dest", &other_bucket_same]),
            "rows hold only the key",
        ),
        (
            s(&["--source", &src, "--dest", &other_bucket_around]),
            "rows hold only the key",
        ),
        (
            s(&["--source", "legacy/image", "--dest", &dst]),
            "not an S3 URL",
        ),
        (
            s(&["--source", &src, "--dest", &dst, "--table", "missing"]),
            "does not exist",
        ),
        (
            s(&[
                "--source",
                &src,
                "--dest",
                &dst,
                "--table",
                "avatars; DROP TABLE x",
            ]),
            "quote it",
        ),
        (
            s(&[
                "--source",
                &src,
                "--dest",
                &dst,
                "--table",
                "\"weird\".\"name\"",
            ]),
            "does not exist",
        ),
        (
            s(&["--source", &src, "--dest", &dst, "--path-column", "url"]),
            "no column \"url\"",
        ),
        (
            s(&["--source", &src, "--dest", &dst, "--id-column", "nope"]),
            "no column \"nope\"",
        ),
        (
            s(&["--source", &src, "--dest", &dst, "--table", "nopk"]),
            "no unique index",
        ),
        (
            s(&["--source", &src, "--dest", &dst, "--table", "intpath"]),
            "must be text or varchar",
        ),
        (
            s(&["--source", &src, "--dest", &dst, "--referenced-by", "posts"]),
            "write TABLE.COLUMN",
        ),
        (
            s(&[
                "--source",
                &src,
                "--dest",
                &dst,
                "--referenced-by",
                "nosuch.image",
            ]),
            "table \"nosuch\" does not exist",
        ),
        (
            s(&[
                "--source",
                &src,
                "--dest",
                &dst,
                "--referenced-by",
                "intpath.path",
            ]),
            "must be text or varchar",
        ),
        (
            s(&[
                "--source",
                &src,
                "--dest",
                &dst,
                "--referenced-by",
                "intpath.nope",
            ]),
            "has no column \"nope\"",
        ),
        (
            // `=` would take `IMAGE/A.PNG` for `image/a.png`: S3 keys are byte strings.
            s(&["--source", &src, "--dest", &dst, "--table", "caseless"]),
            "nondeterministic collation \"caseless\"",
        ),
        (
            s(&[
                "--source",
                &src,
                "--dest",
                &dst,
                "--rewrite",
                "([a-",
                "--to",
                "x",
            ]),
            "not a valid regex",
        ),
        (
            s(&[
                "--source",
                &src,
                "--dest",
                &dst,
                "--rewrite",
                "(a)",
                "--to",
                "$2",
            ]),
            "does not capture",
        ),
        (
            s(&["--source", &src, "--dest", &missing_bucket]),
            "does not exist",
        ),
        (
            s(&["--source", &src, "--dest", &dst, "--lease-ttl", "0"]),
            "at least 1",
        ),
        (
            s(&["--source", &src, "--dest", &dst, "--batch-size", "0"]),
            "--batch-size",
        ),
        (
            s(&["--source", &src, "--dest", &dst, "--storage-class", "FAST"]),
            "is not an S3 storage class; use one of",
        ),
        (
            s(&[
                "--source",
                &src,
                "--dest",
                &dst,
                "--storage-class",
                "GLACIER",
            ]),
            "cannot be read back without a restore",
        ),
        (
            s(&["--source", &src, "--dest", &dst, "--sse", "aes"]),
            "use AES256 (SSE-S3) or aws:kms",
        ),
        (
            s(&["--source", &src, "--dest", &dst, "--sse-kms-key-id", "k"]),
            "--sse-kms-key-id goes with --sse aws:kms",
        ),
        (
            s(&[
                "--source",
                &src,
                "--dest",
                &dst,
                "--database-url",
                "postgres://relocator:relocator@127.0.0.1:1/none",
            ]),
            "cannot connect to PostgreSQL",
        ),
        (
            s(&[
                "--source",
                &src,
                "--dest",
                &dst,
                "--endpoint-url",
                "http://127.0.0.1:1",
            ]),
            "cannot reach S3",
        ),
        (
            s(&[
                "--source",
                &src,
                "--dest",
                &dst,
                "--database-url",
                "postgres://app:pw@db.example.com/app",
            ]),
            "looks like production (database host db.example.com)",
        ),
        (
            // A remote destination beside the local shared endpoint is production too.
            s(&[
                "--source",
                &src,
                "--dest",
                &dst,
                "--dest-endpoint-url",
                "https://s3.example.invalid",
            ]),
            "looks like production (dest S3 endpoint s3.example.invalid)",
        ),
        (
            s(&[
                "--source",
                &src,
                "--dest",
                &dst,
                "--backup",
                "/no/such/backup.csv",
            ]),
            "--backup /no/such/backup.csv",
        ),
        (
            s(&["--source", &src, "--dest", &dst, "--backup", &not_a_backup]),
            "is not a backup of \"avatars\"(id, path)",
        ),
    ];
    for (args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&env, &args, needle).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_appear_in_output_even_at_trace_level() {
    let env = TestEnv::new("secrets").await;
    env.seed(10, 0).await;
    let password = "relocator"; // the stack's password, in DATABASE_URL
    let secret = common::var("AWS_SECRET_ACCESS_KEY");
    // A failing run (wrong database password) and a full run at trace level.
    let wrong = env.database_url.replace(":relocator@", ":Wr0ngPassw0rd@");
    let out = env
        .cmd()
        .env("DATABASE_URL", &wrong)
        .args(["run", "--source", &env.source(), "--dest", &env.dest()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("Wr0ngPassw0rd"), "{err}");
    assert!(
        err.contains("***") || err.contains("cannot connect"),
        "{err}"
    );

    let out = env
        .run_cmd(&[
            "--report",
            &env.path("r.csv"),
            "--summary-json",
            &env.path("s.json"),
        ])
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let mut all = String::from_utf8_lossy(&out.stderr).into_owned();
    all += &std::fs::read_to_string(env.path("r.csv")).unwrap();
    all += &std::fs::read_to_string(env.path("s.json")).unwrap();
    assert!(!all.contains(&secret), "the AWS secret leaked");
    assert!(
        !all.contains(&format!(":{password}@")),
        "the database password leaked"
    );

    // Every other command, at trace level.
    let job = [
        "--source".to_string(),
        env.source(),
        "--dest".to_string(),
        env.dest(),
    ];
    for (sub, extra) in [
        ("preflight", vec![]),
        ("backup", vec!["--out".to_string(), env.path("b.csv")]),
        ("verify", vec!["--orphans".to_string()]),
        ("status", vec![]),
        ("rollback", vec![]),
        ("plan", vec!["--out".to_string(), env.path("p.csv")]),
    ] {
        let out = env
            .cmd()
            .arg(sub)
            .args(&job)
            .args(&extra)
            .env("RUST_LOG", "trace")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(out.status.code().is_some(), "{sub}: {text}");
        assert!(!text.contains(&secret), "{sub}: the AWS secret leaked");
        assert!(
            !text.contains(&format!(":{password}@")),
            "{sub}: the database password leaked"
        );
    }

    let help = env.cmd().args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(!help.contains(&secret) && !help.contains(&env.database_url));
    assert!(
        help.contains("130") && help.contains("rerun"),
        "exit codes documented"
    );
}

/// Path values a careless application could store: control characters, a `..` segment,
/// a leading `/`, literal percent-escapes. The unusable ones are reported `invalid_key`
/// and left alone (exit 3); the literal one moves as the literal key it is. NUL bytes and
/// invalid UTF-8 cannot reach relocator at all: PostgreSQL refuses them in text.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_path_values_are_reported_and_left_alone() {
    let env = TestEnv::new("hostile-paths").await;
    env.seed(20, 0).await;
    let db = env.db().await;
    let literal = "image/%C3%28 not an escape.png";
    env.s3
        .ep()
        .put(&env.src_bucket, literal, b"literal".to_vec(), "image/png")
        .await
        .unwrap();
    // A leading `/` is refused by the key rules too (rewrite's unit tests): only a
    // whole-bucket source could select it, and a whole-bucket source overlaps every
    // destination prefix (refused with exit 2, tests above).
    let hostile = ["image/ctrl\u{1}char.png", "image/../escape.png"];
    // Objects whose keys XML 1.0 cannot carry (a control character, a carriage return
    // that a parser turns into a line feed), in both buckets, under both prefixes: the
    // listings must still carry them, byte for byte (`encoding-type=url`), or every
    // listing of those prefixes fails and the run can never finish.
    let unlistable = ["image/ctrl\u{1}char.png", "image/cr\rlf\n+ %2B.png"];
    for key in unlistable {
        for (bucket, key) in [
            (&env.src_bucket, key.to_owned()),
            (&env.dst_bucket, key.replacen("image/", "avatar/", 1)),
        ] {
            env.s3
                .ep()
                .put(bucket, &key, b"stray".to_vec(), "image/png")
                .await
                .unwrap();
        }
    }
    // A key no row can hold (PostgreSQL's text has no NUL): left out of the listings, so
    // it cannot fail every statement that would carry it.
    env.s3
        .ep()
        .put(
            &env.src_bucket,
            "image/nul\u{0}byte.png",
            b"stray".to_vec(),
            "image/png",
        )
        .await
        .unwrap();
    for p in hostile.iter().chain([&literal]) {
        db.execute("INSERT INTO avatars (path) VALUES ($1)", &[p])
            .await
            .unwrap();
    }
    for bad in [r"E'image/nul\x00byte'", r"E'image/\xC3\x28.png'"] {
        let refused = db
            .batch_execute(&format!("INSERT INTO avatars (path) VALUES ({bad})"))
            .await;
        assert!(refused.is_err(), "PostgreSQL accepted {bad}");
    }

    let out = env
        .cmd()
        .args(["run", "--source", &env.source(), "--dest", &env.dest()])
        .args(["--report", &env.path("r.csv")])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = common::read_outcomes(&env.path("r.csv"));
    let rows = env.rows().await;
    for p in hostile {
        let (id, path) = rows.iter().find(|(_, path)| path == p).unwrap();
        assert_eq!(path, p, "row {id} left alone");
        assert_eq!(report[&id.to_string()].0, "invalid_key", "{p:?}");
    }
    let (id, path) = rows.iter().find(|(_, p)| p.contains("%C3%28")).unwrap();
    let moved = format!("avatar/{}", literal.strip_prefix("image/").unwrap());
    assert_eq!(path, &moved, "row {id}");
    let bytes = env.s3.ep().get_bytes(&env.dst_bucket, path).await.unwrap();
    assert_eq!(bytes, b"literal");
    for key in unlistable {
        let listed = env.keys(&env.src_bucket, "image/").await;
        assert!(listed.iter().any(|k| k == key), "{key:?} kept: {listed:?}");
    }
    // The stray source object no row references is an orphan.
    let out = env
        .cmd()
        .args([
            "verify",
            "--orphans",
            "--source",
            &env.source(),
            "--dest",
            &env.dest(),
        ])
        .args(["--out", &env.path("v.csv")])
        .output()
        .unwrap();
    // Exit 3: the rows left alone above still point at the legacy bucket.
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let orphans: Vec<String> = csv::Reader::from_path(env.path("v.csv"))
        .unwrap()
        .records()
        .map(|r| r.unwrap())
        .filter(|r| &r[3] == "orphan" && &r[1] == env.src_bucket.as_str())
        .map(|r| r[2].to_owned())
        .collect();
    // (The first one is the hostile row's: still legacy, not an orphan.)
    assert_eq!(orphans, [unlistable[1]], "orphans named byte for byte");
}

/// Wrong S3 credentials and a wrong region are refused before anything is touched.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_s3_credentials_or_region_are_refused_with_exit_2() {
    let env = TestEnv::new("wrong-s3").await;
    env.seed(10, 0).await;
    let before = env.rows().await;
    for (var, value, needle) in [
        ("AWS_SECRET_ACCESS_KEY", "not-the-secret", "denied"),
        ("AWS_ACCESS_KEY_ID", "GK000000000000000000000000", "denied"),
        ("AWS_REGION", "eu-west-3", "bucket"),
    ] {
        let out = env.run_cmd(&[]).env(var, value).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {err}");
        assert!(err.contains(needle), "{var}: {err}");
        assert!(!err.contains("not-the-secret"), "{err}");
    }
    assert_eq!(env.rows().await, before);
    assert!(env.keys(&env.dst_bucket, "").await.is_empty());
}
