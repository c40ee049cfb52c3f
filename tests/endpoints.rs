//! Two independent S3 endpoints, each with its own credentials (the stack's two Garage
//! servers): objects are streamed GET → PUT — small ones in one request, large ones as a
//! multipart upload of ranged GETs — with every header kept, bytes identical, sources
//! deleted, no incomplete upload left, and memory well below the large object.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::ClientExt;

use std::process::Stdio;

use common::{second_s3_client, var, TestEnv};
use rand::{RngCore, SeedableRng};
use relocator::commands::seed;
use relocator::s3;

#[tokio::test(flavor = "multi_thread")]
async fn objects_are_streamed_between_two_endpoints_with_their_headers() {
    let env = TestEnv::new("two-endpoints").await;
    let seeded = env.seed(300, 0).await;
    let mut big = vec![0u8; 128 << 20];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut big);
    env.s3
        .ep()
        .put_with(
            &env.src_bucket,
            "image/big.bin",
            big.clone(),
            &seed::headers(env.seed, "image/big.bin"),
        )
        .await
        .unwrap();
    let source_checksum = env
        .s3
        .ep()
        .head_object(&env.src_bucket, "image/big.bin")
        .await
        .unwrap()
        .unwrap()
        .checksum;
    // The streamed parts' CRCs are checked against it on the way.
    assert!(source_checksum.is_some(), "the seed's CRC64NVME is kept");
    env.db()
        .await
        .execute("INSERT INTO avatars (path) VALUES ('image/big.bin')", &[])
        .await
        .unwrap();

    let far = second_s3_client().await;
    let far_bucket = format!("{}-far", env.name);
    far.create_bucket()
        .bucket(&far_bucket)
        .send()
        .await
        .unwrap();
    // The source's key cannot see the far bucket: the endpoints are independent.
    assert!(env
        .s3
        .head_bucket()
        .bucket(&far_bucket)
        .send()
        .await
        .is_err());

    let dest = format!("s3://{far_bucket}/avatar/");
    let mut child = env
        .cmd()
        .args(["run", "--source", &env.source(), "--dest", &dest])
        .args([
            "--dest-endpoint-url",
            &var("RELOCATOR_TEST_SECOND_ENDPOINT"),
        ])
        .args(["--multipart-threshold", "8MiB", "--part-size", "8MiB"])
        .args(["--set-metadata", "migrated-by=relocator"])
        .env(
            "RELOCATOR_DEST_AWS_ACCESS_KEY_ID",
            var("RELOCATOR_TEST_SECOND_KEY_ID"),
        )
        .env(
            "RELOCATOR_DEST_AWS_SECRET_ACCESS_KEY",
            var("RELOCATOR_TEST_SECOND_SECRET"),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(env.path("err.log")).unwrap())
        .spawn()
        .unwrap();
    let (code, peak) = common::wait_peak_rss(&mut child);
    let err = std::fs::read_to_string(env.path("err.log")).unwrap_or_default();
    let extra: s3::Metadata = [("migrated-by".to_owned(), "relocator".to_owned())].into();
    let result = async {
        assert_eq!(code, 0, "{err}");
        eprintln!("peak RSS of the streamed run: {} MiB", peak >> 20);
        assert!(
            peak < 64 << 20,
            "peak RSS {} MiB is not well below the 128 MiB object",
            peak >> 20
        );
        for ((id, path), s) in env.rows().await.iter().zip(&seeded) {
            let want = format!("avatar/{}", s.path.strip_prefix("image/").unwrap());
            assert_eq!(path, &want, "row {id}");
        }
        for s in seeded.iter().step_by(37) {
            let key = format!("avatar/{}", s.path.strip_prefix("image/").unwrap());
            let bytes = far.ep().get_bytes(&far_bucket, &key).await.unwrap();
            assert_eq!(
                bytes,
                seed::object_bytes(env.seed, &s.path, &(100..4096)),
                "{key}"
            );
            let h = far
                .ep()
                .head_object(&far_bucket, &key)
                .await
                .unwrap()
                .unwrap()
                .headers;
            assert_eq!(h, seed::headers(env.seed, &s.path).with(&extra), "{key}");
        }
        let copy = far
            .ep()
            .get_bytes(&far_bucket, "avatar/big.bin")
            .await
            .unwrap();
        assert!(copy == big, "the 128 MiB object differs");
        let s3::Head {
            info, headers: h, ..
        } = far
            .ep()
            .head_object(&far_bucket, "avatar/big.bin")
            .await
            .unwrap()
            .unwrap();
        assert!(info.is_multipart(), "streamed in parts: {}", info.etag);
        assert_eq!(h, seed::headers(env.seed, "image/big.bin").with(&extra));
        assert!(far
            .ep()
            .list_uploads(&far_bucket, "")
            .await
            .unwrap()
            .is_empty());
        assert!(
            env.keys(&env.src_bucket, "image/").await.is_empty(),
            "sources deleted"
        );
    }
    .await;
    // The far bucket is not the harness's: empty and remove it either way.
    let mut pages = far
        .list_objects_v2()
        .bucket(&far_bucket)
        .into_paginator()
        .send();
    while let Some(Ok(page)) = pages.next().await {
        for o in page.contents() {
            let _ = far
                .delete_object()
                .bucket(&far_bucket)
                .key(o.key().unwrap())
                .send()
                .await;
        }
    }
    let _ = far.delete_bucket().bucket(&far_bucket).send().await;
    result
}
