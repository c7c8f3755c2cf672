//! The progress line of `annotate` (stderr, only on a terminal) and the summary
//! every run ends with.
//!
//! Written by hand rather than with a progress-bar crate: it is one line redrawn
//! with `\r` a few times a second, and the binary goes onto devices where every
//! megabyte of flash counts.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the line is redrawn.
const REDRAW: Duration = Duration::from_millis(250);

/// The progress line: lines done, lines/s and, when the input's size is known,
/// how far into it the run is and the time left.
pub struct Progress {
    started: Instant,
    drawn: Option<Instant>,
    /// The input's size, and where this run started reading it (after the lines a
    /// resume skipped).
    size: Option<u64>,
    position: Arc<AtomicU64>,
    from: u64,
}

impl Progress {
    pub fn new(size: Option<u64>, position: Arc<AtomicU64>) -> Progress {
        let from = position.load(Ordering::Relaxed);
        Progress {
            started: Instant::now(),
            drawn: None,
            size,
            position,
            from,
        }
    }

    /// Redraws the line if it is time; `done`: lines written by this run.
    pub fn tick(&mut self, done: u64) {
        if self.drawn.is_some_and(|t| t.elapsed() < REDRAW) {
            return;
        }
        self.drawn = Some(Instant::now());
        let at = self.position.load(Ordering::Relaxed);
        let line = line(
            done,
            self.started.elapsed(),
            self.size.map(|size| (at - self.from, at, size)),
        );
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
    }

    /// Removes the line (the summary takes its place).
    pub fn clear(&self) {
        if self.drawn.is_some() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

/// The progress line's text. `bytes`: (read by this run, position, size).
pub fn line(done: u64, elapsed: Duration, bytes: Option<(u64, u64, u64)>) -> String {
    let secs = elapsed.as_secs_f64();
    let mut text = format!("annotate: {done} lines");
    if secs > 0.0 {
        text.push_str(&format!(", {:.1} lines/s", done as f64 / secs));
    }
    if let Some((read, at, size)) = bytes {
        if size > 0 {
            let at = at.min(size);
            text.push_str(&format!(", {:.1} %", at as f64 * 100.0 / size as f64));
            // Not before the first second of lines: the reader's buffer runs ahead
            // of them at first (64 KiB, nothing on a file worth a progress line).
            if read > 0 && done > 0 && secs >= 1.0 {
                let left = (size - at) as f64 / (read as f64 / secs);
                text.push_str(&format!(", ETA {}", clock(left)));
            }
        }
    }
    text
}

/// `3h05m`, `4m12s`, `9s`.
fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// What a run did: the line printed at the end.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Lines annotated by this run.
    pub lines: u64,
    /// Lines a resume found already answered in the output.
    pub resumed: u64,
    pub results: u64,
    pub errors: BTreeMap<&'static str, u64>,
    pub seconds: f64,
    pub threads: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let rate = if self.seconds > 0.0 {
            self.lines as f64 / self.seconds
        } else {
            0.0
        };
        let errors: u64 = self.errors.values().sum();
        write!(
            f,
            "annotate: {} lines in {:.1} s ({rate:.1} lines/s, {} threads): {} results, {errors} errors",
            self.lines, self.seconds, self.threads, self.results
        )?;
        if errors > 0 {
            let codes: Vec<String> = self
                .errors
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            write!(f, " ({})", codes.join(", "))?;
        }
        if self.resumed > 0 {
            write!(f, "; resumed after {} lines already done", self.resumed)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_says_rate_share_and_time_left() {
        let s = Duration::from_secs;
        assert_eq!(line(0, Duration::ZERO, None), "annotate: 0 lines");
        assert_eq!(
            line(0, Duration::from_millis(10), Some((65536, 65536, 1 << 20))),
            "annotate: 0 lines, 0.0 lines/s, 6.2 %",
            "no ETA before lines are done"
        );
        assert_eq!(line(500, s(10), None), "annotate: 500 lines, 50.0 lines/s");
        // 1/4 of the file read in 10 s after a resume started at 0: 30 s left.
        assert_eq!(
            line(500, s(10), Some((250, 250, 1000))),
            "annotate: 500 lines, 50.0 lines/s, 25.0 %, ETA 30s"
        );
        // Resumed at 600 of 1000 bytes, 100 read since in 20 s: 300 bytes, 60 s left.
        assert_eq!(
            line(40, s(20), Some((100, 700, 1000))),
            "annotate: 40 lines, 2.0 lines/s, 70.0 %, ETA 1m00s"
        );
        assert_eq!(clock(3.0 * 3600.0 + 5.0 * 60.0 + 7.0), "3h05m");
    }

    #[test]
    fn summary_counts_errors_by_code() {
        let summary = Summary {
            lines: 1000,
            resumed: 200,
            results: 997,
            errors: [("empty_text", 2), ("invalid_utf8", 1)]
                .into_iter()
                .collect(),
            seconds: 4.0,
            threads: 2,
        };
        assert_eq!(
            summary.to_string(),
            "annotate: 1000 lines in 4.0 s (250.0 lines/s, 2 threads): 997 results, 3 errors \
             (empty_text 2, invalid_utf8 1); resumed after 200 lines already done"
        );
    }
}
