//! One file per command: what it reads, what it prints, its exit code. `run` is the
//! pipeline's entry ([`crate::pipeline::run`]); the others stand on their own.

pub mod backup;
pub mod plan;
pub mod preflight;
pub mod rollback;
pub mod seed;
pub mod status;
pub mod verify;

use tokio_util::sync::CancellationToken;

use crate::cli::Command;
use crate::config::{JobConfig, RunPolicy};
use crate::pipeline::{self, RunOptions};
use crate::report::Summary;
use crate::{exit, exit_code};
use seed::SeedConfig;

/// Run one command to its end: the exit code it finished with, or the error that stopped
/// it (see [`crate::error_exit_code`]).
pub async fn dispatch(cmd: Command, cancel: CancellationToken) -> anyhow::Result<i32> {
    match cmd {
        Command::Run(a) => {
            let cfg = JobConfig::from_args(&a.job)?;
            let policy = RunPolicy::from_args(&a, &cfg)?;
            let backup = match &policy.backup {
                Some(path) => Some(backup::check(&cfg, path)?),
                None => None,
            };
            let opts = RunOptions {
                report: a.report.as_deref(),
                workers: policy.workers,
                lease_ttl: policy.lease_ttl,
                backup,
                health: policy.health,
            };
            let summary = pipeline::run(&cfg, &opts, cancel).await?;
            finish(&summary, a.summary_json.as_deref())
        }
        Command::Plan(a) => {
            let cfg = JobConfig::from_args(&a.job)?;
            let summary = plan::plan(&cfg, &a.out, cancel).await?;
            finish(&summary, a.summary_json.as_deref())
        }
        Command::Verify(a) => {
            let cfg = JobConfig::from_args(&a.job)?;
            let s = verify::verify(&cfg, a.out.as_deref(), a.orphans).await?;
            if let Some(p) = &a.summary_json {
                write_json(p, &s)?;
            }
            eprintln!("{}", s.one_line());
            Ok(if s.all_ok() {
                exit::OK
            } else {
                exit::ATTENTION
            })
        }
        Command::Status(a) => {
            let cfg = JobConfig::from_args(&a.job)?;
            let s = status::status(&cfg).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", s.render());
            }
            Ok(exit::OK)
        }
        Command::Preflight(a) => {
            let cfg = JobConfig::from_args(&a.job)?;
            let r = preflight::preflight(&cfg).await?;
            if let Some(p) = &a.summary_json {
                write_json(p, &r)?;
            }
            print!("{}", r.render());
            Ok(if r.passed() { exit::OK } else { exit::USAGE })
        }
        Command::Backup(a) => {
            let cfg = JobConfig::from_args(&a.job)?;
            let b = backup::backup(&cfg, &a.out).await?;
            if let Some(p) = &a.summary_json {
                write_json(p, &b)?;
            }
            println!("{}", b.one_line());
            Ok(exit::OK)
        }
        Command::Rollback(a) => {
            let cfg = JobConfig::from_args(&a.job)?;
            let opts = rollback::RollbackOptions {
                run: a.run,
                report: a.report.as_deref(),
            };
            let summary = rollback::rollback(&cfg, &opts, cancel).await?;
            finish(&summary, a.summary_json.as_deref())
        }
        Command::Seed(a) => {
            let cfg = SeedConfig::from_args(&a)?;
            let s = seed::seed(&cfg).await?;
            eprintln!(
                "seeded {} rows, {} objects ({} bytes) into {} and {}",
                s.rows, s.objects, s.bytes, cfg.table, cfg.target
            );
            Ok(exit::OK)
        }
    }
}

fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    use anyhow::Context;
    let f = std::fs::File::create(path)
        .with_context(|| format!("creating the summary file {}", path.display()))?;
    serde_json::to_writer_pretty(f, value)
        .with_context(|| format!("writing the summary file {}", path.display()))
}

fn finish(summary: &Summary, json: Option<&std::path::Path>) -> anyhow::Result<i32> {
    if let Some(p) = json {
        summary.write_json(p)?;
    }
    eprintln!("{}", summary.one_line());
    let code = exit_code(summary);
    match code {
        exit::ATTENTION => eprintln!("some rows need attention: see the report (exit 3)"),
        exit::INTERRUPTED => eprintln!("interrupted: rerun the same command to resume (exit 130)"),
        _ => {}
    }
    Ok(code)
}
