//! TLS to PostgreSQL, against the stack's TLS-only cluster (certificates from a throwaway
//! CA, the server's naming `localhost` only): a whole job over `sslmode=verify-full`
//! with the URL `psql` accepts, and each way the settings can be wrong refused with exit
//! 2, the setting to change named, the password in no message, nothing changed.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::process::Command;

use common::{var, TestEnv};

/// A role of the TLS cluster with a password no other string contains.
const ROLE: &str = "tls_job";
const PASSWORD: &str = "tls-Secret-9d2f";

/// The test's database on the TLS cluster.
fn db_name(env: &TestEnv) -> String {
    format!("tls_{}", env.name.replace('-', "_"))
}

fn url(env: &TestEnv, host: &str, query: &str) -> String {
    format!(
        "postgres://{ROLE}:{PASSWORD}@{host}:{}/{}?{query}",
        var("RELOCATOR_TEST_TLS_PORT"),
        db_name(env)
    )
}

fn ca(file: &str) -> String {
    format!("{}/{file}", var("RELOCATOR_TEST_TLS_DIR"))
}

/// A new database `db` on the TLS cluster, owned by `owner`.
fn fresh_db(db: &str, owner: &str) {
    psql(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
    psql(&format!("CREATE DATABASE {db} OWNER {owner}"));
}

/// `psql` with the stack's own role, over TLS.
fn psql(sql: &str) {
    let admin = format!(
        "postgres://relocator:relocator@localhost:{}/relocator?sslmode=verify-full&sslrootcert={}",
        var("RELOCATOR_TEST_TLS_PORT"),
        ca("ca.crt")
    );
    let out = Command::new("psql")
        .args([&admin, "-v", "ON_ERROR_STOP=1", "-qc", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_whole_job_over_verify_full_and_each_wrong_setting_refused() {
    let env = TestEnv::new("tls").await;
    let table = format!("tls_{}", env.name.replace('-', "_"));
    let db = db_name(&env);
    psql(&format!(
        "DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}') THEN
                 CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}';
             END IF;
         END $$;"
    ));
    fresh_db(&db, ROLE);
    let good = url(
        &env,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", ca("ca.crt")),
    );
    // The same URL works with psql.
    let out = Command::new("psql")
        .args([
            &good,
            "-tAc",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t");

    let seeded = env
        .cmd()
        .args(["seed", "--database-url", &good, "--table", &table])
        .args(["--rows", "50", "--target", &env.source()])
        .output()
        .unwrap();
    assert!(
        seeded.status.success(),
        "{}",
        String::from_utf8_lossy(&seeded.stderr)
    );
    let job = |database_url: &str| {
        let mut c = env.cmd();
        c.args(["run", "--database-url", database_url, "--table", &table])
            .args(["--source", &env.source(), "--dest", &env.dest()]);
        c
    };

    for (database_url, needle) in [
        // A CA that did not sign the server's certificate.
        (
            url(
                &env,
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={}", ca("wrong-ca.crt")),
            ),
            "set sslrootcert to the CA that signed it",
        ),
        // A host name the certificate does not carry.
        (
            url(
                &env,
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={}", ca("ca.crt")),
            ),
            "use sslmode=verify-ca",
        ),
        // No TLS against a server that accepts TLS only.
        (
            url(&env, "localhost", "sslmode=disable"),
            "set sslmode=require",
        ),
        // Verification asked for without a CA.
        (
            url(&env, "localhost", "sslmode=verify-full"),
            "set sslrootcert=FILE",
        ),
    ] {
        let out = job(&database_url).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{database_url}: {err}");
        assert!(err.contains(needle), "{database_url}: {needle:?} in {err}");
        assert!(!err.contains(PASSWORD), "the password leaked: {err}");
    }
    // A server without TLS (the stack's main cluster): TLS required is refused, also
    // when the URL says sslmode twice (the last one counts, as in libpq) or
    // percent-encodes the key.
    for query in ["sslmode=disable&sslmode=require", "%73slmode=require"] {
        let plain = format!("{}?{query}", env.database_url);
        let out = job(&plain).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{query}: {err}");
        assert!(err.contains("does not offer TLS"), "{query}: {err}");
    }
    // A CA file given without sslmode (prefer) checks the certificate, as libpq does.
    let out = job(&url(
        &env,
        "localhost",
        &format!("sslrootcert={}", ca("wrong-ca.crt")),
    ))
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // The same through PGSSLMODE, as libpq reads it.
    let out = job(&url(&env, "localhost", ""))
        .env("PGSSLMODE", "disable")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    // The job over verify-full. Nothing was moved before.
    let summary = env.path("s.json");
    let out = job(&good)
        .args(["--summary-json", &summary])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = common::read_summary(&summary);
    assert_eq!(
        s["counters"]["s3_copies"], 50,
        "every row moved by this run: {s}"
    );

    // verify-ca checks the CA only: 127.0.0.1 is fine.
    let verify_ca = url(
        &env,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={}", ca("ca.crt")),
    );
    let out = env
        .cmd()
        .args(["verify", "--database-url", &verify_ca, "--table", &table])
        .args([
            "--source",
            &env.source(),
            "--dest",
            &env.dest(),
            "--orphans",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    psql(&format!("DROP DATABASE {db} WITH (FORCE)"));
}

/// A role that logs in with a client certificate (`cert` authentication): `sslcert` and
/// `sslkey`, here from `PGSSLCERT` / `PGSSLKEY` as libpq reads them, and a whole job.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_logs_in() {
    let env = TestEnv::new("tls-cert").await;
    let table = format!("tls_{}", env.name.replace('-', "_"));
    let db = db_name(&env);
    fresh_db(&db, "tls_cert");
    let database_url = format!(
        "postgres://tls_cert@localhost:{}/{db}?sslmode=verify-full&sslrootcert={}",
        var("RELOCATOR_TEST_TLS_PORT"),
        ca("ca.crt")
    );
    let with_cert = |c: &mut Command| {
        c.env("PGSSLCERT", ca("client.crt"))
            .env("PGSSLKEY", ca("client.key"));
    };
    let mut seed = env.cmd();
    seed.args(["seed", "--database-url", &database_url, "--table", &table])
        .args(["--rows", "10", "--target", &env.source()]);
    with_cert(&mut seed);
    let out = seed.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut run = env.cmd();
    run.args(["run", "--database-url", &database_url, "--table", &table])
        .args(["--source", &env.source(), "--dest", &env.dest()]);
    with_cert(&mut run);
    let out = run.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the certificate the server refuses the role: exit 2.
    let mut bare = env.cmd();
    bare.args(["status", "--database-url", &database_url, "--table", &table])
        .args(["--source", &env.source(), "--dest", &env.dest()]);
    let out = bare.output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    psql(&format!("DROP DATABASE {db} WITH (FORCE)"));
}
