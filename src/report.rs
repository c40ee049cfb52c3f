//! Outcomes, the per-row CSV report and the final summary.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

/// What happened to (or, for `plan`, would happen to) one selected row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Rewritten; its object is at the new key (copied now, or an identical object was
    /// already there).
    Moved,
    /// Rewritten by an earlier, interrupted run; this run finished its cleanup.
    AlreadyMoved,
    /// The row's object is not in the source bucket. Row left unchanged.
    MissingSource,
    /// A different object already sits at the destination key. Nothing overwritten.
    Conflict,
    /// Another row with a different source maps to the same destination key.
    Collision,
    /// The application changed the row while it was being moved. Left as the app wrote it.
    ChangedByApp,
    /// `--rewrite` does not match this path. Row left unchanged.
    Unmatched,
    /// The source path or the destination key is not a usable key.
    InvalidKey,
    /// S3 refused this object (e.g. access denied), or the copy could not be confirmed.
    Error,
    /// `rollback`: the row points at its old key again, whose object exists.
    RolledBack,
    /// The new value does not fit the column: longer than its declared length, or
    /// refused by a CHECK constraint on it. Found before anything is copied; row
    /// unchanged.
    TooLong,
    /// The copied object's MD5 is not the row's `--checksum-column`: the bytes at the
    /// source are not what the application stored. Row unchanged; the copy is taken
    /// back.
    ChecksumMismatch,
    /// The table refused the row's new value (column too short, a CHECK, a unique
    /// index, a foreign key, row-level security, a trigger). Row unchanged; a copy made
    /// for it is taken back.
    Rejected,
    /// Rewritten, but the application replaced the object at the old key after it was
    /// copied: the new upload was kept at the old key, and the row points at the copy of
    /// the object it referenced when relocator read it.
    SourceChanged,
    /// Another reference the row holds (a field of its JSON document) cannot move: the
    /// row is rewritten only with all of them, so it is left unchanged; a copy made for
    /// this one is taken back.
    HeldBack,
}

impl Outcome {
    /// Whether this outcome makes the run finish with exit code 3.
    pub fn needs_attention(self) -> bool {
        !matches!(
            self,
            Outcome::Moved | Outcome::AlreadyMoved | Outcome::RolledBack
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Moved => "moved",
            Outcome::AlreadyMoved => "already_moved",
            Outcome::MissingSource => "missing_source",
            Outcome::Conflict => "conflict",
            Outcome::Collision => "collision",
            Outcome::ChangedByApp => "changed_by_app",
            Outcome::Unmatched => "unmatched",
            Outcome::InvalidKey => "invalid_key",
            Outcome::Error => "error",
            Outcome::RolledBack => "rolled_back",
            Outcome::SourceChanged => "source_changed",
            Outcome::HeldBack => "held_back",
            Outcome::Rejected => "rejected",
            Outcome::TooLong => "too_long",
            Outcome::ChecksumMismatch => "checksum_mismatch",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct ReportLine {
    pub id: String,
    pub old_path: String,
    pub new_path: String,
    pub outcome: Outcome,
    pub detail: String,
}

/// Counters a run keeps besides the outcomes.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counters {
    /// CopyObject requests that created a destination object.
    pub s3_copies: u64,
    /// Source objects deleted after their rows committed.
    pub sources_deleted: u64,
    /// Sources kept because some row still references them.
    pub sources_kept_referenced: u64,
    /// Sources (or copies) kept because the application replaced or removed them after
    /// relocator copied them: they are no longer the object copied.
    pub sources_changed: u64,
    /// Source deletes S3 refused; the ledger keeps them pending for the next run.
    pub delete_failures: u64,
    /// How long the cleanups held the table's SHARE lock (the application's writes to
    /// the table wait that long): the longest once, and all together, in milliseconds.
    pub writers_paused_ms_max: u64,
    pub writers_paused_ms_total: u64,
    /// Copies relocator made and took back (their row was changed by the app).
    pub copies_removed: u64,
    pub batches: u64,
    pub bytes_copied: u64,
    /// S3 read requests (HEAD) and write requests (COPY, DELETE) sent.
    pub s3_reads: u64,
    pub s3_writes: u64,
    /// Statements sent to PostgreSQL.
    pub db_round_trips: u64,
}

impl Counters {
    /// The counts of a cleanup that took back relocator's own copies (the shared cleanup
    /// counts sources): removed copies are `copies_removed`; one still in use by a row, or
    /// replaced since, is no source kept, and is not counted.
    pub fn as_taken_back(self) -> Counters {
        Counters {
            copies_removed: self.copies_removed + self.sources_deleted,
            sources_deleted: 0,
            sources_kept_referenced: 0,
            sources_changed: 0,
            ..self
        }
    }

    /// Add another stage's counts.
    pub fn add(&mut self, o: &Counters) {
        self.s3_copies += o.s3_copies;
        self.sources_deleted += o.sources_deleted;
        self.sources_kept_referenced += o.sources_kept_referenced;
        self.sources_changed += o.sources_changed;
        self.delete_failures += o.delete_failures;
        self.copies_removed += o.copies_removed;
        self.writers_paused_ms_max = self.writers_paused_ms_max.max(o.writers_paused_ms_max);
        self.writers_paused_ms_total += o.writers_paused_ms_total;
        self.batches += o.batches;
        self.bytes_copied += o.bytes_copied;
        self.s3_reads += o.s3_reads;
        self.s3_writes += o.s3_writes;
        self.db_round_trips += o.db_round_trips;
    }
}

/// The final summary, also written as JSON with `--summary-json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub command: &'static str,
    pub run_id: Option<i64>,
    pub outcomes: BTreeMap<Outcome, u64>,
    pub counters: Counters,
    pub rows_seen: u64,
    pub duration_secs: f64,
    pub rows_per_sec: f64,
    pub interrupted: bool,
    /// `run`: rows under the source prefix when the run finished that this process did
    /// not report — written after the run had passed their place (an id, or a key, below
    /// where it had got to; a rerun moves them), or reported by another process of the
    /// run.
    pub rows_left_unreported: u64,
}

impl Summary {
    /// Exit code 3: an outcome that needs attention, a failed delete, or rows left under
    /// the source that this process did not report (another, killed process of the run
    /// reported them, or the application wrote them behind the run): the table is not
    /// done, whatever this process saw.
    pub fn needs_attention(&self) -> bool {
        self.counters.delete_failures > 0
            || self.rows_left_unreported > 0
            || self
                .outcomes
                .iter()
                .any(|(o, n)| *n > 0 && o.needs_attention())
    }

    pub fn count(&self, o: Outcome) -> u64 {
        self.outcomes.get(&o).copied().unwrap_or(0)
    }

    /// The one line printed at the end.
    pub fn one_line(&self) -> String {
        let outcomes = self
            .outcomes
            .iter()
            .map(|(o, n)| format!("{}={n}", o.as_str()))
            .collect::<Vec<_>>()
            .join(" ");
        format!(
            "{}{}: {} rows in {:.1}s ({:.0} rows/s); {}; copies={} deleted={} kept_referenced={} copies_removed={} delete_failures={}",
            self.command,
            self.run_id.map(|r| format!(" (run {r})")).unwrap_or_default(),
            self.rows_seen,
            self.duration_secs,
            self.rows_per_sec,
            if outcomes.is_empty() { "nothing to do".to_owned() } else { outcomes },
            self.counters.s3_copies,
            self.counters.sources_deleted,
            self.counters.sources_kept_referenced,
            self.counters.copies_removed,
            self.counters.delete_failures,
        )
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let f = File::create(path)
            .with_context(|| format!("creating the summary file {}", path.display()))?;
        serde_json::to_writer_pretty(f, self)
            .with_context(|| format!("writing the summary file {}", path.display()))
    }
}

/// Collects outcomes as they happen and streams the CSV (memory grows only with the rows
/// that need attention).
pub struct Report {
    command: &'static str,
    csv: Option<csv::Writer<File>>,
    outcomes: BTreeMap<Outcome, u64>,
    pub counters: Counters,
    started: Instant,
    rows_seen: u64,
    /// (id, path) of the rows reported as needing attention: a row is judged once per
    /// run, so a later phase passes over it while it still holds that path.
    judged: HashSet<(String, String)>,
    /// The ids of those rows (a row holding several references has a line per key).
    judged_ids: HashSet<String>,
}

impl Report {
    pub fn new(command: &'static str, csv_path: Option<&Path>) -> Result<Report> {
        let csv = match csv_path {
            Some(p) => {
                let mut w = csv::Writer::from_path(p)
                    .with_context(|| format!("creating the report {}", p.display()))?;
                w.write_record(["id", "old_path", "new_path", "outcome", "detail"])?;
                w.flush()?;
                Some(w)
            }
            None => None,
        };
        Ok(Report {
            command,
            csv,
            outcomes: BTreeMap::new(),
            counters: Counters::default(),
            started: Instant::now(),
            rows_seen: 0,
            judged: HashSet::new(),
            judged_ids: HashSet::new(),
        })
    }

    pub fn record(&mut self, line: ReportLine) -> Result<()> {
        if line.outcome.needs_attention() {
            self.judged.insert((line.id.clone(), line.old_path.clone()));
            self.judged_ids.insert(line.id.clone());
        }
        *self.outcomes.entry(line.outcome).or_default() += 1;
        self.rows_seen += 1;
        if let Some(w) = &mut self.csv {
            w.write_record([
                line.id.as_str(),
                line.old_path.as_str(),
                line.new_path.as_str(),
                line.outcome.as_str(),
                line.detail.as_str(),
            ])
            .context("writing the report")?;
        }
        Ok(())
    }

    /// A later outcome for a row already recorded as `was` in this run (its source
    /// cleanup found something): the count moves from `was` to the new outcome, the row
    /// is not counted again, and the CSV gets a line that supersedes the earlier one.
    pub fn amend(&mut self, was: Outcome, line: ReportLine) -> Result<()> {
        if let Some(n) = self.outcomes.get_mut(&was).filter(|n| **n > 0) {
            *n -= 1;
            self.rows_seen -= 1;
        }
        self.record(line)
    }

    /// Whether this run already reported the row, holding this path, as needing
    /// attention (phase 1 did; phase 2 then passes over it: one line per row per run).
    /// How many rows were reported as needing attention.
    pub fn judged_count(&self) -> usize {
        self.judged.len()
    }

    pub fn judged(&self, id: &str, path: &str) -> bool {
        self.judged.contains(&(id.to_owned(), path.to_owned()))
    }

    /// Whether a line of this run reported the row `id` as needing attention, whatever
    /// key it named.
    pub fn judged_row(&self, id: &str) -> bool {
        self.judged_ids.contains(id)
    }

    /// Flush after each batch so a killed run leaves a report of what it committed.
    pub fn flush(&mut self) -> Result<()> {
        if let Some(w) = &mut self.csv {
            w.flush().context("writing the report")?;
        }
        Ok(())
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn rows_seen(&self) -> u64 {
        self.rows_seen
    }

    pub fn finish(mut self, run_id: Option<i64>, interrupted: bool) -> Result<Summary> {
        self.flush()?;
        (self.counters.s3_reads, self.counters.s3_writes) = crate::s3::REQUESTS.get();
        self.counters.db_round_trips =
            crate::db::ROUND_TRIPS.load(std::sync::atomic::Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64();
        Ok(Summary {
            command: self.command,
            run_id,
            rows_per_sec: if secs > 0.0 {
                self.rows_seen as f64 / secs
            } else {
                0.0
            },
            outcomes: self.outcomes,
            counters: self.counters,
            rows_seen: self.rows_seen,
            duration_secs: secs,
            interrupted,
            rows_left_unreported: 0,
        })
    }
}

/// What a backup file holds, as printed and recorded in the ledger.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BackupInfo {
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
}

impl BackupInfo {
    pub fn one_line(&self) -> String {
        format!(
            "backup {}: {} rows, {} bytes, sha256 {}",
            self.file, self.rows, self.bytes, self.sha256
        )
    }
}
