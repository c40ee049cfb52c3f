//! Shared test harness: every test gets a fresh database and fresh, uniquely named
//! buckets on the running local stack, dropped afterwards. A test that cannot reach the
//! stack fails and says how to start it — it never skips.
#![allow(dead_code)]

pub mod proxy;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use aws_sdk_s3::types::EncodingType;
use aws_sdk_s3::Client;
use relocator::commands::seed::{self, SeedConfig};
use relocator::config::{DatabaseUrl, S3Location, S3Settings, TableName};
use relocator::s3;

/// relocator's own S3 calls on a test's client (no rate cap).
pub trait ClientExt {
    fn ep(&self) -> s3::Endpoint;
}

impl ClientExt for Client {
    fn ep(&self) -> s3::Endpoint {
        s3::Endpoint::from(self.clone())
    }
}

pub const HOW_TO_START: &str =
    "the local stack is not reachable: start it with `scripts/stack.sh up` (the README's test \
     command does this for you)";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The stack's settings: from the environment when `eval "$(scripts/stack.sh env)"` was
/// done, else read from `scripts/stack.sh env` directly.
pub fn stack_env() -> &'static HashMap<String, String> {
    static ENV: OnceLock<HashMap<String, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let names = [
            "DATABASE_URL",
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
            "RELOCATOR_TEST_READONLY_KEY_ID",
            "RELOCATOR_TEST_READONLY_SECRET",
            "RELOCATOR_TEST_JOB_KEY_ID",
            "RELOCATOR_TEST_JOB_SECRET",
            "RELOCATOR_TEST_SECOND_ENDPOINT",
            "RELOCATOR_TEST_SECOND_KEY_ID",
            "RELOCATOR_TEST_SECOND_SECRET",
        ];
        let mut m = HashMap::new();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
        let out = Command::new("bash").arg(&script).arg("env").output();
        if let Ok(out) = out {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some((k, v)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) {
                    m.insert(k.to_owned(), v.trim_matches('\'').to_owned());
                }
            }
        }
        for n in names {
            if let Ok(v) = std::env::var(n) {
                m.entry(n.to_owned()).or_insert(v);
            }
        }
        assert!(
            m.contains_key("DATABASE_URL") && m.contains_key("AWS_ENDPOINT_URL"),
            "{HOW_TO_START}"
        );
        m
    })
}

pub fn var(name: &str) -> String {
    if let Some(v) = moto_var(name) {
        return v;
    }
    stack_env()
        .get(name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} is not set: {HOW_TO_START}"))
}

/// `RELOCATOR_TEST_S3=moto`: the tests' S3 server is the stack's moto instead of Garage
/// (any key works there; buckets, objects and versioning in memory).
pub fn on_moto() -> bool {
    std::env::var("RELOCATOR_TEST_S3").is_ok_and(|v| v == "moto")
}

fn moto_var(name: &str) -> Option<String> {
    if !on_moto() {
        return None;
    }
    Some(match name {
        "AWS_ENDPOINT_URL" => stack_env()
            .get("RELOCATOR_TEST_MOTO_ENDPOINT")
            .cloned()
            .unwrap_or_else(|| panic!("RELOCATOR_TEST_MOTO_ENDPOINT is not set: {HOW_TO_START}")),
        "AWS_ACCESS_KEY_ID" => "moto".into(),
        "AWS_SECRET_ACCESS_KEY" => "moto-secret".into(),
        "AWS_REGION" => "us-east-1".into(),
        _ => return None,
    })
}

/// The URL of another database on the same server.
pub fn url_for_db(base: &str, db: &str) -> String {
    let mut u = url::Url::parse(base).expect("DATABASE_URL is a URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

pub async fn admin() -> tokio_postgres::Client {
    connect(&var("DATABASE_URL")).await
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL: {e}. {HOW_TO_START}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

pub fn s3_settings() -> S3Settings {
    S3Settings {
        endpoint_url: Some(var("AWS_ENDPOINT_URL")),
        timeout: std::time::Duration::from_secs(30),
        max_attempts: 3,
        max_rps: None,
        profile: None,
        region: None,
        credentials: None,
    }
}

/// A client with the stack's main key (the same the binary gets through the env).
pub async fn s3_client() -> Client {
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", var("AWS_ACCESS_KEY_ID")),
        ("AWS_SECRET_ACCESS_KEY", var("AWS_SECRET_ACCESS_KEY")),
        ("AWS_REGION", var("AWS_REGION")),
    ] {
        // Tests in one binary share the process env; every test sets the same values.
        std::env::set_var(k, v);
    }
    std::env::remove_var("AWS_CA_BUNDLE");
    s3::client(&s3_settings()).await
}

/// A client for the stack's second, independent S3 endpoint, with its own key.
pub async fn second_s3_client() -> Client {
    s3_client().await; // the shared env first
    std::env::set_var(
        "RELOCATOR_TEST_SECOND_AWS_ACCESS_KEY_ID",
        var("RELOCATOR_TEST_SECOND_KEY_ID"),
    );
    std::env::set_var(
        "RELOCATOR_TEST_SECOND_AWS_SECRET_ACCESS_KEY",
        var("RELOCATOR_TEST_SECOND_SECRET"),
    );
    s3::client(&S3Settings {
        endpoint_url: Some(var("RELOCATOR_TEST_SECOND_ENDPOINT")),
        credentials: relocator::config::Credentials::from_env("RELOCATOR_TEST_SECOND")
            .expect("both of the second endpoint's keys"),
        ..s3_settings()
    })
    .await
}

/// One test's private world: database, source bucket, destination bucket.
pub struct TestEnv {
    pub name: String,
    pub database_url: String,
    pub src_bucket: String,
    pub dst_bucket: String,
    pub s3: Client,
    pub dir: PathBuf,
    pub seed: u64,
}

impl TestEnv {
    pub async fn new(tag: &str) -> TestEnv {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name =
            format!("t{}-{}-{}", std::process::id(), n, tag.replace('_', "-")).to_lowercase();
        let name: String = name.chars().take(40).collect();
        let db = format!("reloc_{}", name.replace('-', "_"));
        let admin = admin().await;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .await
            .expect("drop old test database");
        admin
            .batch_execute(&format!("CREATE DATABASE \"{db}\""))
            .await
            .unwrap_or_else(|e| panic!("creating the test database: {e}. {HOW_TO_START}"));
        let s3 = s3_client().await;
        let src_bucket = format!("{name}-src");
        let dst_bucket = format!("{name}-dst");
        for b in [&src_bucket, &dst_bucket] {
            s3.create_bucket()
                .bucket(b)
                .send()
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "creating bucket {b}: {}. {HOW_TO_START}",
                        aws_smithy_types::error::display::DisplayErrorContext(&e)
                    )
                });
        }
        let dir = std::env::temp_dir().join(format!("relocator-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TestEnv {
            database_url: url_for_db(&var("DATABASE_URL"), &db),
            name,
            src_bucket,
            dst_bucket,
            s3,
            dir,
            seed: 42,
        }
    }

    pub async fn db(&self) -> tokio_postgres::Client {
        connect(&self.database_url).await
    }

    pub fn source(&self) -> String {
        format!("s3://{}/image/", self.src_bucket)
    }

    pub fn dest(&self) -> String {
        format!("s3://{}/avatar/", self.dst_bucket)
    }

    /// Seed `rows` avatars (with `missing` of them lacking their object) into `avatars`.
    pub async fn seed(&self, rows: usize, missing: usize) -> Vec<seed::SeedRow> {
        self.seed_at(&self.source(), rows, missing).await
    }

    /// The same, with the objects under `target` (an s3:// URL) instead.
    pub async fn seed_at(&self, target: &str, rows: usize, missing: usize) -> Vec<seed::SeedRow> {
        let loc = S3Location::parse("--target", target).unwrap();
        let cfg = SeedConfig {
            database_url: DatabaseUrl::new(&self.database_url).unwrap(),
            table: TableName::parse("avatars").unwrap(),
            target: loc.clone(),
            rows,
            missing,
            seed: self.seed,
            sizes: 100..4096,
            concurrency: 32,
            clear: Vec::new(),
            s3: s3_settings(),
        };
        seed::seed(&cfg).await.expect("seeding");
        seed::rows(&loc.prefix, rows, missing, self.seed)
    }

    /// Each of `names` moved byte for byte: `avatar/<name>` at the destination holds
    /// what `image/<name>` held (`body` of that key).
    pub async fn assert_moved<N: AsRef<str>>(
        &self,
        names: impl IntoIterator<Item = N>,
        body: impl Fn(&str) -> Vec<u8>,
    ) {
        for n in names {
            let n = n.as_ref();
            let got = self
                .s3
                .ep()
                .get_bytes(&self.dst_bucket, &format!("avatar/{n}"))
                .await
                .unwrap_or_else(|e| panic!("avatar/{n}: {e}"));
            assert!(
                got == body(&format!("image/{n}")),
                "avatar/{n} is not byte-identical"
            );
        }
    }

    /// The real binary, with this test's database and the stack's S3 settings.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(assert_cmd::cargo::cargo_bin("relocator"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &self.database_url)
            .env("AWS_ENDPOINT_URL", var("AWS_ENDPOINT_URL"))
            .env("AWS_ACCESS_KEY_ID", var("AWS_ACCESS_KEY_ID"))
            .env("AWS_SECRET_ACCESS_KEY", var("AWS_SECRET_ACCESS_KEY"))
            .env("AWS_REGION", var("AWS_REGION"))
            .env("RUST_LOG", "warn");
        c
    }

    /// The job options as the command line gives them for this test's table, source and
    /// destination (defaults otherwise), for tests that build a job in process.
    pub fn job_args(&self) -> relocator::cli::JobArgs {
        relocator::cli::JobArgs {
            database_url: self.database_url.clone(),
            table: "avatars".into(),
            id_column: "id".into(),
            path_column: vec!["path".into()],
            referenced_by: Vec::new(),
            source: self.source(),
            dest: self.dest(),
            service_column: None,
            source_service: None,
            dest_service: None,
            source_url: Vec::new(),
            dest_url: None,
            url_column: Vec::new(),
            json_key: Vec::new(),
            json_set: Vec::new(),
            checksum_column: None,
            rewrite: None,
            to: None,
            batch_size: 5000,
            concurrency: 4,
            batch_timeout: 600,
            multipart_threshold: None,
            set_metadata: Vec::new(),
            storage_class: None,
            sse: None,
            sse_kms_key_id: None,
            verify_content: false,
            part_size: "256MiB".into(),
            source_endpoint_url: None,
            source_profile: None,
            source_region: None,
            dest_endpoint_url: None,
            dest_profile: None,
            dest_region: None,
            s3: relocator::cli::S3Args {
                endpoint_url: Some(var("AWS_ENDPOINT_URL")),
                s3_timeout: 30,
                s3_max_attempts: 3,
                max_rps: None,
            },
        }
    }

    /// `relocator run` with the test's source and destination, plus `extra`.
    pub fn run_cmd(&self, extra: &[&str]) -> Command {
        let mut c = self.cmd();
        c.args(["run", "--source", &self.source(), "--dest", &self.dest()])
            .args(extra);
        c
    }

    /// Run the binary to completion; returns (exit code, stderr).
    pub fn run(&self, extra: &[&str]) -> (i32, String) {
        let out = self.run_cmd(extra).output().expect("running relocator");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    /// Put `body` at `key` in the source bucket with the seed's headers, and a row
    /// pointing at it.
    pub async fn put_row(&self, key: &str, body: Vec<u8>) {
        self.s3
            .ep()
            .put_with(&self.src_bucket, key, body, &seed::headers(self.seed, key))
            .await
            .unwrap_or_else(|e| panic!("putting {key}: {e}"));
        self.db()
            .await
            .execute("INSERT INTO avatars (path) VALUES ($1)", &[&key])
            .await
            .expect("inserting the row");
    }

    /// Wait until the run has loaded `keys` source keys into its listing in the ledger
    /// (`relocator.runs.listed_keys`), at most 30 s.
    pub async fn wait_listed(&self, keys: i64) {
        let db = self.db().await;
        let t = std::time::Instant::now();
        loop {
            let listed: Option<i64> = db
                .query_opt("SELECT listed_keys FROM relocator.runs", &[])
                .await
                .ok()
                .flatten()
                .and_then(|r| r.get(0));
            if listed == Some(keys) {
                return;
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(30),
                "the run never listed {keys} keys"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// All (id, path) rows of `avatars`, by id.
    pub async fn rows(&self) -> Vec<(i32, String)> {
        self.db()
            .await
            .query("SELECT id, path FROM avatars ORDER BY id", &[])
            .await
            .expect("reading avatars")
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// Keys under `prefix` in `bucket`.
    pub async fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut pages = self
            .s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .encoding_type(EncodingType::Url)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.expect("listing");
            let encoding = page.encoding_type();
            keys.extend(
                page.contents().iter().filter_map(|o| {
                    Some(s3::listed_key(encoding, o.key()?).expect("a listed key"))
                }),
            );
        }
        keys
    }

    /// The bucket a path lives in, by its prefix.
    pub fn bucket_of(&self, path: &str) -> &str {
        if path.starts_with("avatar/") {
            &self.dst_bucket
        } else {
            &self.src_bucket
        }
    }

    /// Every row points at an existing object whose bytes are `expected(row's original
    /// key)`; and nothing is left under the legacy prefix for moved rows.
    pub async fn assert_converged(&self, seeded: &[seed::SeedRow]) {
        let rows = self.rows().await;
        assert_eq!(rows.len(), seeded.len());
        for ((id, path), s) in rows.iter().zip(seeded) {
            if !s.has_object {
                assert_eq!(path, &s.path, "row {id} without an object must stay");
                continue;
            }
            let expect_new = format!("avatar/{}", s.path.strip_prefix("image/").unwrap());
            assert_eq!(path, &expect_new, "row {id} was not moved");
            let bytes = self
                .s3
                .ep()
                .get_bytes(&self.dst_bucket, path)
                .await
                .unwrap_or_else(|e| panic!("row {id} points at a missing object {path}: {e:#}"));
            assert_eq!(
                bytes,
                seed::object_bytes(self.seed, &s.path, &(100..4096)),
                "row {id}: bytes differ at {path}"
            );
        }
        let left = self.keys(&self.src_bucket, "image/").await;
        assert!(left.is_empty(), "legacy objects left: {left:?}");
    }

    /// Apply sql/roles.sql to this test's database; returns DATABASE_URL for the
    /// least-privilege role it creates.
    pub fn least_privilege_url(&self) -> String {
        let roles = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/roles.sql");
        let out = Command::new("psql")
            .arg(&self.database_url)
            .args([
                "-v",
                "ON_ERROR_STOP=1",
                "-v",
                "password='job-pw'",
                "-qf",
                roles,
            ])
            .output()
            .expect("psql is installed with the stack");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut url = url::Url::parse(&self.database_url).unwrap();
        url.set_username("relocator_job").unwrap();
        url.set_password(Some("job-pw")).unwrap();
        url.into()
    }

    /// The ledger after a job that was interrupted and rerun: no row rewritten twice,
    /// every committed move cleaned up.
    pub async fn assert_ledger_clean(&self) {
        let db = self.db().await;
        let twice: i64 = db
            .query_one(
                "SELECT count(*) FROM (SELECT row_id FROM relocator.moves
                                        GROUP BY row_id HAVING count(*) > 1) d",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(twice, 0, "no row was rewritten twice");
        let pending: i64 = db
            .query_one(
                "SELECT count(*) FROM relocator.moves WHERE cleaned_at IS NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(pending, 0, "every committed move was cleaned up");
    }

    /// At any instant, every row points at an object that exists, in the bucket its
    /// prefix implies (promise 4's invariant, checked after kills and faults).
    pub async fn assert_no_row_dangles(&self) {
        let src: std::collections::HashSet<String> =
            self.keys(&self.src_bucket, "").await.into_iter().collect();
        let dst: std::collections::HashSet<String> =
            self.keys(&self.dst_bucket, "").await.into_iter().collect();
        for (id, path) in self.rows().await {
            let exists = if path.starts_with("avatar/") {
                dst.contains(&path)
            } else {
                src.contains(&path)
            };
            assert!(exists, "row {id} points at a missing object {path}");
        }
    }

    async fn cleanup(name: String, src: String, dst: String, dir: PathBuf) {
        let s3 = s3_client().await;
        for b in [&src, &dst] {
            let mut pages = s3
                .list_objects_v2()
                .bucket(b)
                .encoding_type(EncodingType::Url)
                .into_paginator()
                .send();
            while let Some(Ok(page)) = pages.next().await {
                let encoding = page.encoding_type();
                for o in page.contents() {
                    if let Some(Ok(k)) = o.key().map(|k| s3::listed_key(encoding, k)) {
                        let _ = s3.delete_object().bucket(b).key(k).send().await;
                    }
                }
            }
            let _ = s3.delete_bucket().bucket(b).send().await;
        }
        let db = format!("reloc_{}", name.replace('-', "_"));
        if let Ok((client, conn)) =
            tokio_postgres::connect(&var("DATABASE_URL"), tokio_postgres::NoTls).await
        {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                .await;
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let (name, src, dst, dir) = (
            self.name.clone(),
            self.src_bucket.clone(),
            self.dst_bucket.clone(),
            self.dir.clone(),
        );
        // Drop cannot be async: clean up on a runtime of its own, on a thread of its own.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(TestEnv::cleanup(name, src, dst, dir));
            }
        })
        .join();
    }
}

/// Wait for the child, sampling its peak resident memory (VmHWM) as it goes: (exit
/// code, peak bytes).
pub fn wait_peak_rss(child: &mut std::process::Child) -> (i32, u64) {
    let status = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status) {
            if let Some(kb) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak_kb = peak_kb.max(kb);
            }
        }
        if let Some(s) = child.try_wait().expect("waiting for the child") {
            return (s.code().unwrap_or(-1), peak_kb * 1024);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Read a report/plan CSV as id → (outcome, new_path).
pub fn read_outcomes(path: &str) -> HashMap<String, (String, String)> {
    let mut r = csv::Reader::from_path(path).expect("report exists");
    r.records()
        .map(|rec| {
            let rec = rec.expect("csv record");
            (rec[0].to_owned(), (rec[3].to_owned(), rec[2].to_owned()))
        })
        .collect()
}

pub fn read_summary(path: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("summary exists")).expect("json")
}

/// Wait until some session of this test's database waits for a lock (relocator's
/// commit behind a held row lock, or its cleanup behind an open writer), at most 60 s.
pub async fn until_a_session_waits_for_a_lock(env: &TestEnv) {
    let db = env.db().await;
    let start = std::time::Instant::now();
    loop {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .expect("reading pg_stat_activity")
            .get(0);
        if n > 0 {
            return;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "relocator never waited for the lock held by the test"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Run `cmd` to completion and assert its exit code (its stderr shown otherwise); its
/// output.
pub fn exits(cmd: &mut Command, code: i32) -> std::process::Output {
    let out = cmd.output().expect("running relocator");
    assert_eq!(
        out.status.code(),
        Some(code),
        "relocator's exit code; its stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `relocator plan` with `args`, exiting `code`: the path of its `--out` file.
pub fn planned(env: &TestEnv, args: &[String], code: i32) -> String {
    let out = env.path("plan.csv");
    exits(env.cmd().arg("plan").args(args).args(["--out", &out]), code);
    out
}

/// `relocator run` with `args`, exiting `code`: the path of its `--report` file.
pub fn reported(env: &TestEnv, args: &[String], code: i32) -> String {
    let out = env.path("run.csv");
    exits(
        env.cmd().arg("run").args(args).args(["--report", &out]),
        code,
    );
    out
}

/// `relocator status` with `args` says `n` rows moved (rows, not references).
pub fn assert_rows_moved(env: &TestEnv, args: &[String], n: usize) {
    let out = exits(env.cmd().arg("status").args(args), 0);
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains(&format!(" {n} rows moved")), "{status}");
}

/// `relocator verify` with `args` finds each `avatar/<name>` ok: its CSV.
pub fn assert_verified(env: &TestEnv, args: &[String], names: &[&str]) -> String {
    let out = env
        .cmd()
        .arg("verify")
        .args(args)
        .args(["--out", &env.path("verify.csv")])
        .output()
        .expect("running relocator");
    let checks = std::fs::read_to_string(env.path("verify.csv")).expect("verify's CSV");
    for n in names {
        assert!(
            checks.contains(&format!("avatar/{n},ok")),
            "{n}: {checks}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    checks
}

/// `relocator rollback` with `args` exits 0, every source is back (`sources`, sorted)
/// and nothing is left at the destination. The caller checks the rows.
pub async fn assert_rolled_back(env: &TestEnv, args: &[String], sources: &[&str]) {
    exits(
        env.cmd()
            .arg("rollback")
            .args(args)
            .args(["--report", &env.path("back.csv")]),
        0,
    );
    let mut back = env.keys(&env.src_bucket, "").await;
    back.sort();
    assert_eq!(back, sources, "every source is back");
    assert!(
        env.keys(&env.dst_bucket, "").await.is_empty(),
        "nothing left at the destination"
    );
}

/// Promise 5's drill: each case (extra options for `cmd`, words its error must contain)
/// exits 2 naming the problem. The caller then checks that nothing changed.
pub fn assert_refused<E: AsRef<[&'static str]> + std::fmt::Debug>(
    cmd: impl Fn(&[&str]) -> Command,
    cases: impl IntoIterator<Item = (E, &'static str)>,
) {
    for (extra, says) in cases {
        let out = exits(&mut cmd(extra.as_ref()), 2);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{extra:?}: {err}");
    }
}

/// Promise 4's drill: `relocator run` with `args` (small batches), killed with SIGKILL
/// at rising moments (150 ms, then 97 ms later each time) until a run ends on its own
/// (or a minute has passed), then run once more to its end; asserts that one exits 0
/// after at least one kill. Returns the number of kills.
pub async fn killed_until_done(env: &TestEnv, args: &[String], batch: &str) -> usize {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let mut kills = 0;
    let start = Instant::now();
    let mut ms = 150;
    loop {
        let mut child = env
            .cmd()
            .arg("run")
            .args(args)
            .args(["--batch-size", batch, "--concurrency", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting relocator");
        tokio::time::sleep(Duration::from_millis(ms)).await;
        if child.try_wait().unwrap().is_some() || start.elapsed() > Duration::from_secs(60) {
            child.wait().unwrap();
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        ms += 97;
    }
    let out = env
        .cmd()
        .arg("run")
        .args(args)
        .args(["--summary-json", &env.path("s.json")])
        .output()
        .expect("running relocator");
    assert_eq!(
        out.status.code(),
        Some(0),
        "after {kills} kills: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(kills > 0, "the run was killed at least once");
    kills
}

/// Promise 3's drill: the application runs `update` in a transaction it holds open while
/// `relocator run` with `args` (and `--report run.csv`) starts and reaches a row lock;
/// then it commits. Asserts the run exits 3 (the changed row needs attention).
pub async fn run_while_the_application_writes(env: &TestEnv, args: &[String], update: &str) {
    use std::process::Stdio;
    let mut app = env.db().await;
    let tx = app.transaction().await.unwrap();
    tx.batch_execute(update)
        .await
        .expect("the application's update");
    let child = env
        .cmd()
        .arg("run")
        .args(args)
        .args(["--report", &env.path("run.csv")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting relocator");
    until_a_session_waits_for_a_lock(env).await;
    tx.commit().await.unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
