//! The fast path on a table whose path column has no index (the application's table as
//! it usually is): the run lists the source once into the ledger and its batches look
//! their sources up there — no HEAD per source before its copy. A listing older than the
//! objects (the application changed them after it) still moves nothing wrong.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::ClientExt;

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::Duration;

use common::proxy::{Fault, FaultProxy, Seen};
use common::{read_summary, TestEnv};

async fn drop_path_index(env: &TestEnv) {
    env.db()
        .await
        .batch_execute("DROP INDEX avatars_path_idx")
        .await
        .unwrap();
}

/// What a request does to a source key: copy it (true: the copy source of a copy) or
/// look at it (false: a HEAD).
fn source_key(s: &Seen, src_bucket: &str) -> Option<(String, bool)> {
    if let Some(from) = s.headers.get("x-amz-copy-source") {
        let from = from.to_str().ok()?.trim_start_matches('/');
        let key = from.strip_prefix(src_bucket)?.trim_start_matches('/');
        return Some((decode(key.split('?').next()?), true));
    }
    let path = s.target.split('?').next()?;
    let key = path.strip_prefix(&format!("/{src_bucket}/"))?;
    (s.method == "HEAD" && !key.is_empty()).then(|| (decode(key), false))
}

/// Undo percent-encoding (the seed's keys have spaces, `+`, non-ASCII letters).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], s.get(i + 1..i + 3)) {
            (b'%', Some(hex)) if u8::from_str_radix(hex, 16).is_ok() => {
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unindexed_table_moves_without_a_head_per_source() {
    let env = TestEnv::new("listing-nohead").await;
    let seeded = env.seed(60, 0).await;
    drop_path_index(&env).await;
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(|_, _, _| Fault::Forward),
    )
    .await;
    let summary = env.path("s.json");
    let out = env
        .run_cmd(&["--batch-size", "20", "--summary-json", &summary])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.assert_converged(&seeded).await;

    // Per source key, in the order the server saw them: its copy comes before any HEAD
    // of it (the HEAD after the copy is the check, right before the delete, that the
    // source is still the object copied).
    let seen = proxy.seen.lock().unwrap().clone();
    let mut copied = HashSet::new();
    let mut heads_before_copy = Vec::new();
    let mut heads: HashMap<String, usize> = HashMap::new();
    for s in &seen {
        match source_key(s, &env.src_bucket) {
            Some((key, true)) => {
                copied.insert(key);
            }
            Some((key, false)) => {
                if !copied.contains(&key) {
                    heads_before_copy.push(key.clone());
                }
                *heads.entry(key).or_default() += 1;
            }
            None => {}
        }
    }
    let mut rows_of: HashMap<&str, usize> = HashMap::new();
    for r in &seeded {
        *rows_of.entry(r.path.as_str()).or_default() += 1;
    }
    let distinct: HashSet<String> = rows_of.keys().map(|k| k.to_string()).collect();
    assert_eq!(copied, distinct, "every source copied");
    assert!(
        heads_before_copy.is_empty(),
        "sources looked at with a HEAD before their copy: {heads_before_copy:?}"
    );
    // One HEAD each: the check before the delete. A key several rows share (their
    // batches find its copy already made) is looked at again by each later batch.
    let more: Vec<_> = heads
        .iter()
        .filter(|(k, n)| **n > 1 && rows_of.get(k.as_str()) == Some(&1))
        .collect();
    assert!(
        more.is_empty(),
        "sources of one row looked at more than once: {more:?}"
    );
    let s = read_summary(&summary);
    let reads = s["counters"]["s3_reads"].as_u64().unwrap();
    // A HEAD per source before its copy made that 3 per row (and 2 after the listing).
    assert!(reads < 2 * 60 + 15, "{reads} S3 reads for 60 rows");

    // The listing is the run's: dropped when it finished.
    let left: i64 = env
        .db()
        .await
        .query_one("SELECT count(*) FROM relocator.listed", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the finished run's listing is dropped");
}

/// The listing is taken, the run is killed before any copy, the application then
/// replaces one object, deletes another and adds a row with a new upload; the rerun
/// resumes the run with its old listing. The replaced object's row ends at a copy of the
/// new bytes (not the listed ones), the deleted one's row is reported and kept, the new
/// row is moved.
#[tokio::test(flavor = "multi_thread")]
async fn a_listing_older_than_the_objects_moves_nothing_wrong() {
    let env = TestEnv::new("listing-stale").await;
    let seeded = env.seed(12, 0).await;
    drop_path_index(&env).await;
    let (replaced, deleted) = (seeded[0].path.clone(), seeded[1].path.clone());

    // Every copy held for a minute (not the destination probe's writes at the start):
    // the run lists, then waits at its first copies.
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(|_, method, path| {
            if method == "PUT" && path.contains("/avatar/") && !path.contains("relocator-probe") {
                Fault::Delay(Duration::from_secs(60))
            } else {
                Fault::Forward
            }
        }),
    )
    .await;
    let mut first = env
        .run_cmd(&[])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    env.wait_listed(12).await;
    first.kill().unwrap();
    first.wait().unwrap();

    let new_bytes = b"uploaded again after the listing".to_vec();
    env.s3
        .ep()
        .put(&env.src_bucket, &replaced, new_bytes.clone(), "image/png")
        .await
        .unwrap();
    env.s3
        .ep()
        .delete_many(&env.src_bucket, std::slice::from_ref(&deleted))
        .await
        .unwrap();
    env.put_row("image/after-the-listing.png", b"new upload".to_vec())
        .await;

    let report = env.path("r.csv");
    let (code, err) = env.run(&["--report", &report]);
    assert_eq!(code, 3, "the deleted source's row needs attention: {err}");
    let rows = env.rows().await;
    // Rows are by id, the seed's first two are the replaced and the deleted one.
    let moved_to = rows[0].1.clone();
    assert_eq!(
        moved_to,
        format!("avatar/{}", replaced.strip_prefix("image/").unwrap())
    );
    assert_eq!(
        env.s3
            .ep()
            .get_bytes(&env.dst_bucket, &moved_to)
            .await
            .unwrap(),
        new_bytes,
        "the row points at a copy of what the source holds now"
    );
    assert_eq!(rows[1].1, deleted, "the row of a deleted source stays");
    assert!(rows
        .iter()
        .any(|(_, p)| p == "avatar/after-the-listing.png"));
    assert_eq!(
        env.s3
            .ep()
            .get_bytes(&env.dst_bucket, "avatar/after-the-listing.png")
            .await
            .unwrap(),
        b"new upload".to_vec()
    );
    let left = env.keys(&env.src_bucket, "image/").await;
    assert!(left.is_empty(), "sources left: {left:?}");
}

/// Before deleting a batch's sources, a listing of their range confirms they are still
/// the objects copied (no HEAD each). The application replaces one of them while that
/// listing is on its way (held in the proxy): the listing shows another ETag, the key
/// gets a HEAD, and the new upload is kept.
#[tokio::test(flavor = "multi_thread")]
async fn sources_are_confirmed_by_a_listing_and_a_replaced_one_is_kept() {
    let env = TestEnv::new("listing-cleanup").await;
    let seeded = env.seed(60, 0).await;
    let src = env.src_bucket.clone();
    let bucket_path = format!("/{src}");
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(move |_, method, path| {
            if method == "GET" && path.trim_end_matches('/') == bucket_path {
                Fault::Delay(Duration::from_millis(1500))
            } else {
                Fault::Forward
            }
        }),
    )
    .await;
    let mut run = env.run_cmd(&[]);
    run.env("AWS_ENDPOINT_URL", proxy.url());
    let child = tokio::task::spawn_blocking(move || run.output().unwrap());

    // The key replaced: one row's, not the range's first.
    let mut rows_of: HashMap<&str, usize> = HashMap::new();
    for r in &seeded {
        *rows_of.entry(r.path.as_str()).or_default() += 1;
    }
    let mut keys: Vec<&str> = rows_of.keys().copied().collect();
    keys.sort_unstable();
    let replaced = keys[5..]
        .iter()
        .find(|k| rows_of[**k] == 1)
        .unwrap()
        .to_string();
    // The cleanup's listing: a listing of the source after the first copy.
    proxy
        .wait_for(
            "a listing before the deletes",
            Duration::from_secs(60),
            |seen| {
                let first_copy = seen
                    .iter()
                    .position(|s| s.headers.contains_key("x-amz-copy-source"));
                first_copy.is_some_and(|at| {
                    seen[at..].iter().any(|s| {
                        s.method == "GET"
                            && s.target.starts_with(&format!("/{src}"))
                            && s.target.contains("start-after=")
                    })
                })
            },
        )
        .await;
    let new_bytes = b"replaced while the cleanup listed".to_vec();
    env.s3
        .ep()
        .put(&src, &replaced, new_bytes.clone(), "image/png")
        .await
        .unwrap();
    let out = child.await.unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(said.contains("source_changed=1"), "{said}");
    assert_eq!(
        env.s3.ep().get_bytes(&src, &replaced).await.unwrap(),
        new_bytes,
        "the application's upload is kept"
    );
    let left = env.keys(&src, "image/").await;
    assert_eq!(left, vec![replaced.clone()], "every other source deleted");

    // HEADs of sources: the listing's first key, and the one it showed changed.
    let seen = proxy.seen.lock().unwrap().clone();
    let headed: HashSet<String> = seen
        .iter()
        .filter_map(|s| source_key(s, &src))
        .filter(|(_, copy)| !copy)
        .map(|(k, _)| k)
        .collect();
    assert!(headed.contains(&replaced), "{headed:?}");
    assert!(headed.len() <= 2, "sources HEADed one by one: {headed:?}");
}

/// Under `--max-rps` the cleanup checks its sources with HEADs paid for before the first
/// of them, not with a listing: a listing's later pages would wait for the rate between
/// a key's confirmation and its delete, and an upload landing in that wait was deleted.
#[tokio::test(flavor = "multi_thread")]
async fn under_max_rps_no_listing_comes_between_a_look_and_the_delete() {
    let env = TestEnv::new("listing-max-rps").await;
    let seeded = env.seed(60, 0).await;
    drop_path_index(&env).await;
    let proxy = FaultProxy::start(
        &common::var("AWS_ENDPOINT_URL"),
        Box::new(|_, _, _| Fault::Forward),
    )
    .await;
    let out = env
        .run_cmd(&["--max-rps", "1000"])
        .env("AWS_ENDPOINT_URL", proxy.url())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.assert_converged(&seeded).await;
    let seen = proxy.seen.lock().unwrap().clone();
    let src = format!("/{}", env.src_bucket);
    let later_listings: Vec<&str> = seen
        .iter()
        .filter(|s| s.method == "GET" && s.target.starts_with(&src))
        .filter(|s| s.target.contains("start-after="))
        .map(|s| s.target.as_str())
        .collect();
    assert!(
        later_listings.is_empty(),
        "source listings after the run's own: {later_listings:?}"
    );
}
