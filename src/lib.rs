//! relocator moves the S3 objects a PostgreSQL table points at, rewrites each row to the
//! new key, and deletes the old object — safely on a live table, resumably at any instant.
//!
//! # The promises, each enforced in one place
//!
//! 1. **A source object is deleted only after the row rewrite that stops referencing it
//!    has committed, and only when no row still references that key** —
//!    [`pipeline::cleanup::delete_sources`], fed only from ledger rows written in the
//!    rewrite's own transaction, deleting under a SHARE lock on every referencing column.
//! 2. **A different object already at the destination is never overwritten** —
//!    [`pipeline::copy`]: a copy is made only onto a [`pipeline::copy::Destination`],
//!    which only a HEAD or the batch's listing can build and which found the key free;
//!    an identical object counts as copied, a different one is a `conflict`. Every write
//!    or delete a look decided is sent once ([`s3::once`]): no SDK retry acts on a look
//!    gone stale; relocator looks again first.
//! 3. **A row the application changed meanwhile is not rewritten** —
//!    [`pipeline::commit`]: the UPDATE is guarded by the old value (compare-and-swap); a
//!    copy made for such a row is taken back only if relocator created it and nothing
//!    references it.
//! 4. **Kill it at any instant, rerun it, and it converges** — the ledger
//!    (`relocator.moves`) is written in the same transaction as the rewrite, so after a
//!    crash a rerun first finishes the cleanups the ledger says are pending, then resumes
//!    at the leases' frontiers ([`pipeline::lease`]). Moved rows no longer match the
//!    source prefix, so nothing is copied twice.
//! 5. **Bad input changes nothing** — [`config`] validates every option once (the job's
//!    in [`config::JobConfig`], `run`'s policy in [`config::RunPolicy`]), then the
//!    catalog and the buckets are checked before the first write; all of it maps to exit
//!    code 2 ([`error_exit_code`]). Secrets (the database password, AWS keys) are never
//!    logged: see [`config::DatabaseUrl`].
//!
//! # Where things are
//!
//! Imports run one way: [`commands`] → [`pipeline`] → ([`db`], [`ledger`], [`s3`]) →
//! [`config`].
//!
//! - [`cli`] the command line as typed → [`config`] every option validated once.
//! - [`commands`] one file per command, and [`commands::dispatch`], which `main` calls.
//! - [`pipeline`] `run`: the table lock, the workers, the channels between the stages
//!   [`pipeline::plan`] (pure: destination keys, collisions, each row's outcome) →
//!   [`pipeline::copy`] (S3) → [`pipeline::commit`] (one transaction) →
//!   [`pipeline::cleanup`] (delete after commit); [`pipeline::lease`] shares a run among
//!   workers and processes.
//! - [`db`] the pool, TLS ([`db::tls`]), table introspection and the user-table queries;
//!   [`ledger`] relocator's own schema and the multipart uploads it started;
//!   [`s3`] the only way to reach S3 (rate cap, counters, one listing, typed errors).
//! - [`reference`] what a row's reference is (a key; a key and a service column; a URL;
//!   a JSON document's fields; several columns): the keys a value holds, the value a
//!   row gets, and the conditions every statement on the job's table takes from it.
//! - [`rewrite`] the pure key arithmetic; [`report`] the outcomes, CSV and summary;
//!   [`progress`] the bar.

pub mod cli;
pub mod commands;
pub mod config;
pub mod db;
pub mod ledger;
pub mod pipeline;
pub mod progress;
pub mod reference;
pub mod report;
pub mod rewrite;
pub mod s3;

/// Process exit codes, as documented in `--help` and the README.
pub mod exit {
    /// Everything selected was relocated, or there was nothing to do.
    pub const OK: i32 = 0;
    /// Failed; rerun to resume.
    pub const FAILED: i32 = 1;
    /// Usage or configuration error; nothing was changed.
    pub const USAGE: i32 = 2;
    /// Finished, but some rows need attention (see the report).
    pub const ATTENTION: i32 = 3;
    /// Interrupted by SIGINT/SIGTERM; rerun to resume.
    pub const INTERRUPTED: i32 = 130;
}

/// The exit code for a finished command's summary.
pub fn exit_code(summary: &report::Summary) -> i32 {
    if summary.interrupted {
        exit::INTERRUPTED
    } else if summary.needs_attention() {
        exit::ATTENTION
    } else {
        exit::OK
    }
}

/// The exit code for an error: configuration problems are 2, everything else 1.
pub fn error_exit_code(err: &anyhow::Error) -> i32 {
    let input = |e: &(dyn std::error::Error + 'static)| {
        e.is::<config::ConfigError>()
            || e.downcast_ref::<s3::BucketError>().is_some_and(|b| b.input)
    };
    if err.chain().any(input) {
        exit::USAGE
    } else {
        exit::FAILED
    }
}
