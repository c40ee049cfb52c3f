//! A real Django project, not SQL standing in for one: files uploaded through a model's
//! `FileField` on django-storages' S3 storage (tests/django), relocated by relocator,
//! then read back through the model with the storage pointed at the new bucket. Django
//! and django-storages come from the stack's tools virtualenv (`scripts/stack.sh up`).
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::Path;
use std::process::Command;

use common::{exits, read_outcomes, var, TestEnv, HOW_TO_START};

/// Run tests/django/roundtrip.py `command` against `bucket`, as the application would,
/// on this test's database; its standard output.
fn django(env: &TestEnv, command: &str, bucket: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/django/roundtrip.py");
    let out = Command::new(var("RELOCATOR_TOOLS_PYTHON"))
        .arg(script)
        .args([command, bucket])
        .env_clear()
        .env("DATABASE_URL", &env.database_url)
        .env("AWS_ENDPOINT_URL", var("AWS_ENDPOINT_URL"))
        .env("AWS_ACCESS_KEY_ID", var("AWS_ACCESS_KEY_ID"))
        .env("AWS_SECRET_ACCESS_KEY", var("AWS_SECRET_ACCESS_KEY"))
        .env("AWS_REGION", var("AWS_REGION"))
        .env("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| panic!("running Django's side ({e}): {HOW_TO_START}"));
    assert!(
        out.status.success(),
        "Django's {command} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What Django read back: (identical, different, unreadable) file names.
fn check(env: &TestEnv, bucket: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
    let found: serde_json::Value = serde_json::from_str(&django(env, "check", bucket)).unwrap();
    let names = |k: &str| -> Vec<String> {
        found[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    (names("identical"), names("different"), names("unreadable"))
}

/// #18: Django's `FileField` (a `varchar(100)` holding the key relative to the storage).
/// Fifteen files uploaded through Django; `plan` predicts, `run` moves fourteen and finds
/// the one whose new key would not fit the 100 characters `too_long` before copying it;
/// Django, with the storage on the new bucket, reads every moved file back identical.
#[tokio::test(flavor = "multi_thread")]
async fn files_uploaded_through_django_read_back_identical_after_the_move() {
    let env = TestEnv::new("django").await;
    django(&env, "upload", &env.src_bucket);
    let (before, _, _) = check(&env, &env.src_bucket);
    assert_eq!(before.len(), 15, "Django uploaded and reads its files");

    let job = [
        "--table",
        "gallery_photo",
        "--path-column",
        "file",
        "--source",
        &env.source(),
        "--dest",
        &env.dest(),
    ];
    exits(
        env.cmd()
            .arg("plan")
            .args(job)
            .args(["--out", &env.path("plan.csv")]),
        3,
    );
    exits(
        env.cmd()
            .arg("run")
            .args(job)
            .args(["--report", &env.path("run.csv")]),
        3,
    );
    let predicted = read_outcomes(&env.path("plan.csv"));
    let outcomes = read_outcomes(&env.path("run.csv"));
    assert_eq!(outcomes.len(), 15, "{outcomes:?}");
    for (id, (outcome, _)) in &outcomes {
        let want = if id == "15" { "too_long" } else { "moved" };
        assert_eq!(outcome, want, "row {id}: {outcomes:?}");
        assert_eq!(&predicted[id].0, want, "plan, row {id}: {predicted:?}");
    }

    let (identical, different, unreadable) = check(&env, &env.dst_bucket);
    assert!(different.is_empty(), "{different:?}");
    assert_eq!(identical.len(), 14, "{identical:?} {unreadable:?}");
    assert!(identical.iter().all(|n| n.starts_with("avatar/")));
    assert!(identical.contains(&"avatar/résumé.pdf".to_owned()));
    // The row whose key does not fit still points at its old object, which is kept.
    assert_eq!(unreadable.len(), 1, "{unreadable:?}");
    let long = format!("image/{}.png", "a".repeat(90));
    assert!(unreadable[0].starts_with(&long), "{unreadable:?}");
    let left = env.keys(&env.src_bucket, "image/").await;
    assert_eq!(left, [long], "only the row left behind keeps its source");
    let (at_source, _, _) = check(&env, &env.src_bucket);
    assert_eq!(at_source, left, "Django reads it from the old bucket");
}
