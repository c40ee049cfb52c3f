//! `relocator backup`: the selected rows' `(id, path)` streamed to a CSV file with COPY
//! (constant memory), then its row count and SHA-256. `run --backup FILE` checks the
//! file the same way and records it with the run, so the ledger says which backup a run
//! followed.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use anyhow::{Context, Result};
use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::config::{config_error, JobConfig};
use crate::db::{self, TableInfo};
use crate::progress::Progress;
pub use crate::report::BackupInfo;

/// Counts CSV records and hashes the bytes as they stream past.
struct Digester {
    sha: Sha256,
    csv: csv_core::Reader,
    records: u64,
    bytes: u64,
    scratch: Vec<u8>,
    ends: Vec<usize>,
}

impl Digester {
    fn new() -> Digester {
        Digester {
            sha: Sha256::new(),
            csv: csv_core::Reader::new(),
            records: 0,
            bytes: 0,
            scratch: vec![0; 64 * 1024],
            ends: vec![0; 16],
        }
    }

    fn feed(&mut self, mut input: &[u8]) {
        self.sha.update(input);
        self.bytes += input.len() as u64;
        loop {
            let (res, nin, _, _) = self
                .csv
                .read_record(input, &mut self.scratch, &mut self.ends);
            input = &input[nin..];
            match res {
                csv_core::ReadRecordResult::Record => self.records += 1,
                csv_core::ReadRecordResult::OutputFull => {
                    let n = self.scratch.len() * 2;
                    self.scratch.resize(n, 0);
                }
                csv_core::ReadRecordResult::OutputEndsFull => {
                    let n = self.ends.len() * 2;
                    self.ends.resize(n, 0);
                }
                csv_core::ReadRecordResult::InputEmpty | csv_core::ReadRecordResult::End => {
                    if input.is_empty() {
                        return;
                    }
                }
            }
        }
    }

    /// (data records, i.e. without the header; bytes; hex SHA-256)
    fn finish(mut self) -> (u64, u64, String) {
        // Flush a last record that has no trailing newline.
        if let (csv_core::ReadRecordResult::Record, ..) =
            self.csv.read_record(&[], &mut self.scratch, &mut self.ends)
        {
            self.records += 1;
        }
        (
            self.records.saturating_sub(1),
            self.bytes,
            hex::encode(self.sha.finalize()),
        )
    }
}

/// `relocator backup --out FILE`. The file appears complete or not at all: it is
/// written under a temporary name, synced, then renamed.
pub async fn backup(cfg: &JobConfig, out: &Path) -> Result<BackupInfo> {
    let pool = db::pool(&cfg.database_url, 1, None)?;
    let client = db::connect_checked(&pool, &cfg.database_url).await?;
    let table = TableInfo::resolve(&client, cfg).await?;
    let (total, _) = db::count_selected(&client, &table, crate::s3::Side::Source).await?;
    // COPY takes no parameters: the selection's literals are quoted already.
    let copy = format!(
        "COPY (SELECT t.{id}::text AS {id}, t.{path}::text AS {path}{service} FROM {tbl} AS t
                WHERE {selected} ORDER BY t.{id})
         TO STDOUT (FORMAT csv, HEADER true)",
        id = table.id_col,
        path = table.path_col,
        tbl = table.qualified,
        service = table
            .reference
            .service_column()
            .into_iter()
            .chain(table.more_cols.iter().map(String::as_str))
            .map(|c| format!(", t.{c}::text AS {c}"))
            .collect::<String>(),
        selected = table.reference.selects(crate::s3::Side::Source, "t"),
    );
    let tmp = out.with_file_name(format!(
        ".{}.partial",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "backup.csv".into())
    ));
    let file = File::create(&tmp)
        .with_context(|| format!("creating the backup file {}", tmp.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut digest = Digester::new();
    let progress = Progress::new("backup", Some(total));
    let stream = client
        .copy_out(copy.as_str())
        .await
        .context("starting COPY of the selected rows")?;
    futures::pin_mut!(stream);
    let mut seen = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("reading the rows from PostgreSQL")?;
        w.write_all(&chunk)
            .with_context(|| format!("writing the backup file {}", tmp.display()))?;
        digest.feed(&chunk);
        let rows = digest.records.saturating_sub(1);
        progress.inc(rows - seen, 0);
        seen = rows;
    }
    progress.finish();
    let file = w
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing the backup file {}", tmp.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing the backup file {}", tmp.display()))?;
    std::fs::rename(&tmp, out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    let (rows, bytes, sha256) = digest.finish();
    Ok(BackupInfo {
        file: out.display().to_string(),
        rows,
        bytes,
        sha256,
    })
}

/// Read a backup file back: rows and checksum, and that it holds this job's columns.
/// Any problem is a configuration error (nothing has been changed yet).
pub fn check(cfg: &JobConfig, path: &Path) -> Result<BackupInfo> {
    let mut f = File::open(path).map_err(|e| {
        config_error(format!(
            "--backup {}: {e}. Make one with `relocator backup --out {}` (same options)",
            path.display(),
            path.display()
        ))
    })?;
    let mut digest = Digester::new();
    let mut buf = vec![0; 1 << 20];
    let mut first: Option<Vec<u8>> = None;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading the backup {}", path.display()))?;
        if n == 0 {
            break;
        }
        if first.is_none() {
            first = Some(buf[..n].to_vec());
        }
        digest.feed(&buf[..n]);
    }
    let header = first
        .and_then(|b| {
            csv::Reader::from_reader(b.as_slice())
                .headers()
                .ok()
                .cloned()
        })
        .unwrap_or_default();
    let want: Vec<&str> = [cfg.id_column.as_str(), cfg.path_column.as_str()]
        .into_iter()
        .chain(cfg.service.as_ref().map(|s| s.column.as_str()))
        .chain(cfg.more_columns.iter().map(String::as_str))
        .collect();
    if header.iter().collect::<Vec<_>>() != want {
        return Err(config_error(format!(
            "--backup {} is not a backup of {}({}): its header is {:?}. Give the file \
             `relocator backup` wrote for this table",
            path.display(),
            cfg.table,
            want.join(", "),
            header.iter().collect::<Vec<_>>()
        )));
    }
    let (rows, bytes, sha256) = digest.finish();
    Ok(BackupInfo {
        file: path.display().to_string(),
        rows,
        bytes,
        sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_counted_across_chunks_and_quoted_newlines() {
        let csv = b"id,path\n1,a.png\n2,\"multi\nline\"\n3,\"with \"\"quotes\"\"\"\n4,last";
        for split in 1..csv.len() {
            let mut d = Digester::new();
            d.feed(&csv[..split]);
            d.feed(&csv[split..]);
            let (rows, bytes, sha) = d.finish();
            assert_eq!(rows, 4, "split at {split}");
            assert_eq!(bytes, csv.len() as u64);
            assert_eq!(sha, hex::encode(Sha256::digest(csv)));
        }
    }
}
