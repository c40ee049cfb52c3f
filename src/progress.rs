//! Progress of the long commands: on a terminal, a bar (rows done / total, rows/s, bytes
//! and bytes/s, ETA); elsewhere a plain log line every few seconds and one at the end, with
//! no control characters. Log lines are printed above the bar, never through it.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::info;

/// Every bar of the process; log output suspends them while it prints.
static BARS: LazyLock<MultiProgress> =
    LazyLock::new(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));

/// How often the plain progress line is logged when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// The writer tracing logs through: stderr, with any progress bar cleared while a line
/// is written and redrawn after.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        BARS.suspend(|| std::io::stderr().write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// One command's progress. Cheap to update from many tasks.
pub struct Progress {
    what: &'static str,
    total: Option<u64>,
    rows: AtomicU64,
    bytes: AtomicU64,
    started: Instant,
    bar: Option<ProgressBar>,
    last_line: Mutex<Instant>,
    /// Shows nothing (before the command knows what it is counting).
    silent: bool,
    /// Why the command is waiting (for the database's health), shown with the counts.
    waiting: Mutex<Option<String>>,
}

impl Progress {
    /// `total`: rows expected (a count taken up front, or the planner's estimate).
    pub fn new(what: &'static str, total: Option<u64>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match total {
                Some(n) => ProgressBar::new(n),
                None => ProgressBar::no_length(),
            };
            let style = ProgressStyle::with_template(
                "{prefix} [{bar:30}] {human_pos}/{human_len} rows  {per_sec}  {msg}  ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            let bar = BARS.add(bar.with_style(style).with_prefix(what));
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Progress {
            what,
            total,
            rows: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            started: Instant::now(),
            bar,
            last_line: Mutex::new(Instant::now()),
            silent: false,
            waiting: Mutex::new(None),
        }
    }

    /// Counts, shows nothing.
    pub fn silent() -> Progress {
        Progress {
            what: "",
            total: None,
            rows: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            started: Instant::now(),
            bar: None,
            last_line: Mutex::new(Instant::now()),
            silent: true,
            waiting: Mutex::new(None),
        }
    }

    /// Count rows done and bytes copied.
    pub fn inc(&self, rows: u64, bytes: u64) {
        let rows = self.rows.fetch_add(rows, Ordering::Relaxed) + rows;
        let bytes = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        match &self.bar {
            Some(bar) => {
                bar.set_position(rows);
                bar.set_message(self.bytes_text(bytes));
            }
            None => {
                let due = self
                    .last_line
                    .lock()
                    .map(|mut last| {
                        let due = last.elapsed() >= PLAIN_EVERY;
                        if due {
                            *last = Instant::now();
                        }
                        due
                    })
                    .unwrap_or(false);
                if due {
                    self.line();
                }
            }
        }
    }

    /// Show why the command waits (None: it no longer does).
    pub fn waiting(&self, why: Option<&str>) {
        if let Ok(mut w) = self.waiting.lock() {
            *w = why.map(str::to_owned);
        }
        if let Some(bar) = &self.bar {
            bar.set_message(self.bytes_text(self.bytes.load(Ordering::Relaxed)));
        }
    }

    /// Clear the bar (or log the last plain line).
    pub fn finish(&self) {
        match &self.bar {
            Some(bar) => bar.finish_and_clear(),
            None => self.line(),
        }
    }

    fn bytes_text(&self, bytes: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let waiting = match self.waiting.lock().ok().as_deref().cloned().flatten() {
            Some(why) => format!("  WAITING: {why}"),
            None => String::new(),
        };
        format!(
            "{} ({}/s){waiting}",
            HumanBytes(bytes),
            HumanBytes((bytes as f64 / secs) as u64)
        )
    }

    fn line(&self) {
        if self.silent {
            return;
        }
        let rows = self.rows.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = rows as f64 / secs;
        let eta = match self.total {
            Some(t) if rate > 0.0 && t > rows => format!("{:.0}s", (t - rows) as f64 / rate),
            Some(_) => "0s".to_owned(),
            None => "unknown".to_owned(),
        };
        info!(
            rows,
            total = self.total.map(|t| t.to_string()).unwrap_or_else(|| "?".into()),
            rate = format!("{rate:.0} rows/s"),
            bytes = %self.bytes_text(self.bytes.load(Ordering::Relaxed)),
            eta,
            "{} progress",
            self.what
        );
    }
}
