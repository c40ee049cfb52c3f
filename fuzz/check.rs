//! The property the `rewrite_key` fuzz target checks, shared with the stable-toolchain
//! test `tests/fuzz_rewrite.rs`: for any job options and any path, validation and the
//! rewrite never panic, and every key they produce is one relocator may write.

use relocator::cli::{JobArgs, S3Args};
use relocator::config::JobConfig;
use relocator::rewrite::{validate_remainder, Mapped, MAX_KEY_BYTES};

/// `data` is split on 0xFF into source prefix, dest prefix, regex, template and path.
pub fn check(data: &[u8]) {
    let mut parts = data.split(|b| *b == 0xff).map(String::from_utf8_lossy);
    let mut next = || parts.next().map(|p| p.into_owned()).unwrap_or_default();
    let (src, dst, re, to, path) = (next(), next(), next(), next(), next());
    // Keep regex compilation cheap; its own limits are the regex crate's business.
    let rule = (!re.is_empty() && re.len() <= 64).then_some((re, to));
    let args = JobArgs {
        database_url: "postgres://fuzz@127.0.0.1/fuzz".into(),
        table: "avatars".into(),
        id_column: "id".into(),
        path_column: vec!["path".into()],
        referenced_by: Vec::new(),
        source: format!("s3://legacy-s3/{src}"),
        dest: format!("s3://production-s3/{dst}"),
        service_column: None,
        source_service: None,
        dest_service: None,
        source_url: Vec::new(),
        dest_url: None,
        url_column: Vec::new(),
        json_key: Vec::new(),
        json_set: Vec::new(),
        checksum_column: None,
        rewrite: rule.as_ref().map(|(r, _)| r.clone()),
        to: rule.as_ref().map(|(_, t)| t.clone()),
        batch_size: 100,
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
        s3: S3Args {
            endpoint_url: None,
            s3_timeout: 60,
            s3_max_attempts: 3,
            max_rps: None,
        },
    };
    let Ok(cfg) = JobConfig::from_args(&args) else {
        return; // refused up front: fine, as long as it did not panic
    };
    let r = &cfg.rewrite;
    match r.map(&path) {
        Mapped::To(key) => {
            assert!(r.selects(&path), "an unselected path was mapped: {path:?}");
            assert!(
                key.starts_with(r.dest_prefix()),
                "{key:?} escapes the prefix"
            );
            assert!(key.len() <= MAX_KEY_BYTES, "{key:?} is too long");
            let rest = &key[r.dest_prefix().len()..];
            assert_eq!(validate_remainder(rest), Ok(()), "{key:?}");
            assert!(!key.chars().any(char::is_control), "{key:?}");
            if cfg.rewrite_spec.is_none() {
                let tail = &path[r.source_prefix().len()..];
                assert_eq!(rest, tail, "the prefix swap changed the remainder");
            }
        }
        Mapped::Unmatched => {}
        Mapped::Invalid(e) => {
            let _ = e.to_string();
        }
    }
}
