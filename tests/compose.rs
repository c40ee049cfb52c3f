//! docker-compose.yml cannot run here (no Docker engine); check that it is well formed
//! and lines up with what relocator reads: service names, env names, credentials,
//! buckets, and commands that parse.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use clap::Parser;
use relocator::cli::Cli;
use serde_yaml::Value;

fn compose() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
        .expect("docker-compose.yml exists");
    let mut v: Value = serde_yaml::from_str(&text).expect("docker-compose.yml is valid YAML");
    v.apply_merge().expect("merge keys resolve");
    v
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v:?}"))
}

#[test]
fn compose_services_and_env_line_up_with_relocator() {
    let c = compose();
    let services = &c["services"];
    for name in [
        "postgres",
        "minio",
        "createbuckets",
        "seed",
        "preflight",
        "backup",
        "relocate",
        "verify",
    ] {
        assert!(services.get(name).is_some(), "service {name} missing");
    }
    let pg = &services["postgres"]["environment"];
    let minio = &services["minio"]["environment"];
    let expected_url = format!(
        "postgres://{}:{}@postgres:5432/{}",
        s(&pg["POSTGRES_USER"]),
        s(&pg["POSTGRES_PASSWORD"]),
        s(&pg["POSTGRES_DB"])
    );
    let buckets = s(&services["createbuckets"]["entrypoint"]).to_owned();
    for job in ["seed", "preflight", "backup", "relocate", "verify"] {
        let env = &services[job]["environment"];
        // Exactly the variables relocator reads (clap env + the standard AWS chain).
        let mut names: Vec<&str> = env
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "AWS_ACCESS_KEY_ID",
                "AWS_ENDPOINT_URL",
                "AWS_REGION",
                "AWS_SECRET_ACCESS_KEY",
                "DATABASE_URL"
            ]
        );
        assert_eq!(s(&env["DATABASE_URL"]), expected_url, "{job}");
        assert_eq!(s(&env["AWS_ENDPOINT_URL"]), "http://minio:9000");
        assert_eq!(s(&env["AWS_ACCESS_KEY_ID"]), s(&minio["MINIO_ROOT_USER"]));
        assert_eq!(
            s(&env["AWS_SECRET_ACCESS_KEY"]),
            s(&minio["MINIO_ROOT_PASSWORD"])
        );

        let args: Vec<String> = services[job]["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| s(a).to_owned())
            .collect();
        // The command parses with relocator's real CLI (env supplies DATABASE_URL).
        let mut argv = vec![
            "relocator".to_owned(),
            args[0].clone(),
            "--database-url".into(),
            expected_url.clone(),
        ];
        argv.extend(args[1..].iter().cloned());
        Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{job}: {e}"));
        for a in &args {
            if let Some(rest) = a.strip_prefix("s3://") {
                let bucket = rest.split('/').next().unwrap();
                assert!(
                    buckets.contains(&format!("local/{bucket}")),
                    "{job} uses bucket {bucket} that createbuckets does not create"
                );
            }
        }
    }
}

/// Compose's database and S3 are not on localhost, so `run` there must follow a backup:
/// the one the backup service writes, on a volume both services mount.
#[test]
fn compose_relocate_follows_the_backup_service() {
    let c = compose();
    let args = |svc: &str| -> Vec<String> {
        c["services"][svc]["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| s(a).to_owned())
            .collect()
    };
    let after = |v: &[String], flag: &str| -> String {
        let i = v
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{flag} missing"));
        v[i + 1].clone()
    };
    let out = after(&args("backup"), "--out");
    assert_eq!(after(&args("relocate"), "--backup"), out);
    for svc in ["backup", "relocate"] {
        let vols = &c["services"][svc]["volumes"];
        assert!(
            vols.as_sequence()
                .unwrap()
                .iter()
                .any(|v| s(v) == "backups:/backups"),
            "{svc} mounts the backups volume"
        );
    }
    assert!(out.starts_with("/backups/"));
}
