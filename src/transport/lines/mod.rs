//! Lines in, lines out: the transport of `anotador annotate`. Each input line is
//! parsed as the daemon parses a payload and handed, with a reply handle, to the
//! same worker pool the daemon runs ([`Pool`]); the answers are written in input
//! order, one line each.
//!
//! Three threads of its own besides the pool's workers:
//! - the reader reads and parses lines; before each it takes a slot, so at most
//!   `threads × IN_FLIGHT_PER_WORKER` lines are read and not yet written, whatever
//!   the file's size (memory: that many lines and envelopes, plus the engine
//!   states);
//! - the workers annotate and build each envelope, and send it back tagged with
//!   its line number;
//! - the caller's thread puts envelopes back in order, writes them, frees their
//!   slots, checkpoints the output and draws the progress line.
//!
//! Reading runs on its own thread so that a line read from a pipe is answered as
//! soon as it is done, not when the next line arrives.

pub mod files;
pub mod progress;

use std::collections::BTreeMap;
use std::io::{self, BufRead};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::message::{self, PayloadFormat, Request, Source};
use crate::pool::{self, Health, Job, Pool, Reply};
use crate::tasks::{Annotation, Annotator};
use files::{Input, Output};
use progress::{Progress, Summary};

/// Lines each worker may have read and not yet written. More than one, so a
/// worker always finds the next line queued while the writer waits for a slow
/// one; few, because a line may be `max_bytes` long.
pub const IN_FLIGHT_PER_WORKER: usize = 8;

/// How often the writer wakes with nothing to write (progress, checkpoints).
const TICK: Duration = Duration::from_millis(250);

/// One run of `annotate`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `None`: stdin.
    pub input: Option<PathBuf>,
    /// `None`: stdout.
    pub output: Option<PathBuf>,
    /// Workers, each with its own engine state.
    pub threads: usize,
    pub format: PayloadFormat,
    /// Longer lines get `payload_too_large`, and are never held whole in memory.
    pub max_bytes: usize,
    /// Keep the complete lines of an existing output and skip the input lines
    /// they answer.
    pub resume: bool,
    /// Replace an existing output.
    pub overwrite: bool,
    /// Draw the progress line on stderr.
    pub progress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LinesError {
    #[error("{}: {source}", path.display())]
    File { path: PathBuf, source: io::Error },
    #[error("reading the input: {0}")]
    Read(io::Error),
    #[error("writing the output: {0}")]
    Write(io::Error),
    #[error("{} exists: --resume to continue it, or --overwrite to start again", .0.display())]
    OutputExists(PathBuf),
    #[error("--resume needs --output FILE: the output file is the checkpoint")]
    ResumeNeedsOutput,
    #[error(
        "{} already answers {done} lines but the input has {input}: is it this input's output?",
        path.display()
    )]
    OutputAhead {
        path: PathBuf,
        done: u64,
        input: u64,
    },
    #[error("starting the workers: {0}")]
    Start(Error),
    #[error("a worker stopped without answering input line {0}")]
    WorkerLost(u64),
}

impl LinesError {
    fn file(path: &Path, source: io::Error) -> LinesError {
        LinesError::File {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What reaches the writer.
enum Event {
    /// The envelope of input line `seq` (0-based), and its error code if it is one.
    Line {
        seq: u64,
        envelope: Vec<u8>,
        error: Option<&'static str>,
    },
    /// The reply handle of line `seq` was dropped unanswered: its worker died.
    Lost(u64),
    /// The input has `lines` lines in all.
    End(u64),
    Failed(io::Error),
}

/// The reply handle of one line: the worker builds its envelope (in parallel,
/// off the writer's thread) and sends it back with its line number.
struct Ordered {
    seq: u64,
    events: Option<Sender<Event>>,
}

impl Reply for Ordered {
    fn send(
        mut self,
        annotator: &Annotator,
        request: &Request,
        outcome: crate::Result<Annotation>,
    ) {
        let source = Source {
            model: &annotator.bundle().name,
            task: annotator.task(),
            topic: None,
        };
        let envelope =
            message::envelope(source, request.id.as_ref(), &request.meta, outcome.as_ref());
        let error = outcome.as_ref().err().map(Error::code);
        if let Some(events) = self.events.take() {
            let _ = events.send(Event::Line {
                seq: self.seq,
                envelope,
                error,
            });
        }
    }
}

impl Drop for Ordered {
    /// A line must never be waited for in vain: a handle dropped unanswered says so.
    fn drop(&mut self) {
        if let Some(events) = self.events.take() {
            let _ = events.send(Event::Lost(self.seq));
        }
    }
}

/// Envelopes that came back early, until every line before them is written.
struct Reorder {
    next: u64,
    waiting: BTreeMap<u64, (Vec<u8>, Option<&'static str>)>,
}

impl Reorder {
    fn new(first: u64) -> Reorder {
        Reorder {
            next: first,
            waiting: BTreeMap::new(),
        }
    }

    fn insert(&mut self, seq: u64, envelope: Vec<u8>, error: Option<&'static str>) {
        debug_assert!(seq >= self.next, "line {seq} answered twice");
        self.waiting.insert(seq, (envelope, error));
    }

    /// The next line in input order, if it is back.
    fn pop(&mut self) -> Option<(Vec<u8>, Option<&'static str>)> {
        let line = self.waiting.remove(&self.next)?;
        self.next += 1;
        Some(line)
    }
}

/// Annotates every line of the input into the output, in order; see the module.
pub fn run(annotator: Arc<Annotator>, settings: &Settings) -> Result<Summary, LinesError> {
    let started = Instant::now();
    let (mut output, done) = Output::open(
        settings.output.as_deref(),
        settings.resume,
        settings.overwrite,
    )?;
    let mut input = Input::open(settings.input.as_deref())?;
    let skipped = skip(&mut *input.reader, done).map_err(LinesError::Read)?;
    if skipped < done {
        return Err(LinesError::OutputAhead {
            path: settings.output.clone().unwrap_or_default(),
            done,
            input: skipped,
        });
    }

    let threads = settings.threads.max(1);
    let capacity = threads * IN_FLIGHT_PER_WORKER;
    let pool_settings = pool::Settings {
        workers: threads,
        max_batch: 1,
        batch_wait: Duration::ZERO,
    };
    let pool: Pool<Ordered> = Pool::start(
        "annotate",
        annotator.bundle().clone(),
        pool_settings,
        capacity,
        &Health::new(),
    )
    .map_err(LinesError::Start)?;
    let pool = Arc::new(pool);

    let (events_tx, events) = mpsc::channel();
    let (slots_tx, slots) = mpsc::sync_channel(capacity);
    let reader = {
        let reading = Reading {
            pool: pool.clone(),
            annotator,
            format: settings.format,
            max_bytes: settings.max_bytes,
            slots: slots_tx,
            events: events_tx,
        };
        let source = input.reader;
        std::thread::Builder::new()
            .name("annotate-input".into())
            .spawn(move || reading.run(source, done))
            .map_err(|e| LinesError::Start(Error::Io(e)))?
    };

    let mut progress = settings
        .progress
        .then(|| Progress::new(input.size, input.position.clone()));
    let mut summary = Summary {
        lines: 0,
        resumed: done,
        results: 0,
        errors: BTreeMap::new(),
        seconds: 0.0,
        threads,
    };
    let written = write_in_order(
        &events,
        &slots,
        done,
        &mut output,
        &mut summary,
        progress.as_mut(),
    );
    if let Some(progress) = &progress {
        progress.clear();
    }
    written?;
    output.finish().map_err(LinesError::Write)?;
    let _ = reader.join();
    // Every line is answered: the reader is gone, so this is the last handle.
    if let Ok(pool) = Arc::try_unwrap(pool) {
        pool.close().join(Instant::now() + Duration::from_secs(10));
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// The writer: waits for envelopes, writes them in input order, frees a slot for
/// each; returns when every line of the input is written.
fn write_in_order(
    events: &Receiver<Event>,
    slots: &Receiver<()>,
    first: u64,
    output: &mut Output,
    summary: &mut Summary,
    mut progress: Option<&mut Progress>,
) -> Result<(), LinesError> {
    let mut order = Reorder::new(first);
    let mut end = None;
    loop {
        if end == Some(order.next) {
            return Ok(());
        }
        match events.recv_timeout(TICK) {
            Ok(Event::Line {
                seq,
                envelope,
                error,
            }) => order.insert(seq, envelope, error),
            Ok(Event::End(lines)) => end = Some(lines),
            Ok(Event::Lost(seq)) => return Err(LinesError::WorkerLost(seq + 1)),
            Ok(Event::Failed(e)) => return Err(LinesError::Read(e)),
            Err(RecvTimeoutError::Timeout) => {}
            // The reader and every handle are gone without the end of the input.
            Err(RecvTimeoutError::Disconnected) => {
                return Err(LinesError::WorkerLost(order.next + 1))
            }
        }
        let mut wrote = false;
        while let Some((envelope, error)) = order.pop() {
            output.line(&envelope).map_err(LinesError::Write)?;
            summary.lines += 1;
            match error {
                None => summary.results += 1,
                Some(code) => *summary.errors.entry(code).or_insert(0) += 1,
            }
            // The reader took this slot before reading the line.
            let _ = slots.try_recv();
            wrote = true;
        }
        if wrote {
            output.checkpoint().map_err(LinesError::Write)?;
        }
        if let Some(progress) = progress.as_deref_mut() {
            progress.tick(summary.lines);
        }
    }
}

/// What the reader thread needs.
struct Reading {
    pool: Arc<Pool<Ordered>>,
    annotator: Arc<Annotator>,
    format: PayloadFormat,
    max_bytes: usize,
    slots: SyncSender<()>,
    events: Sender<Event>,
}

impl Reading {
    /// Reads lines from line `first` on; parses each and submits it, or sends its
    /// error envelope straight to the writer.
    fn run(self, mut input: Box<dyn BufRead + Send>, first: u64) {
        let task = self.annotator.task();
        let source = Source {
            model: &self.annotator.bundle().name,
            task,
            topic: None,
        };
        let mut line = Vec::new();
        let mut seq = first;
        loop {
            let size = match read_line(&mut *input, &mut line, self.max_bytes) {
                Ok(Some(size)) => size,
                Ok(None) => {
                    let _ = self.events.send(Event::End(seq));
                    return;
                }
                Err(e) => {
                    let _ = self.events.send(Event::Failed(e));
                    return;
                }
            };
            // Blocks while the writer is a full window behind; fails when it is gone.
            if self.slots.send(()).is_err() {
                return;
            }
            let parsed = if size > self.max_bytes {
                Err((
                    None,
                    Error::PayloadTooLarge {
                        size,
                        limit: self.max_bytes,
                    },
                ))
            } else {
                message::parse(&line, self.format, task, self.max_bytes)
            };
            match parsed {
                Ok(request) => self.pool.submit(Job {
                    annotator: self.annotator.clone(),
                    request,
                    reply: Ordered {
                        seq,
                        events: Some(self.events.clone()),
                    },
                }),
                Err((id, error)) => {
                    let envelope =
                        message::envelope(source, id.as_ref(), &Default::default(), Err(&error));
                    let _ = self.events.send(Event::Line {
                        seq,
                        envelope,
                        error: Some(error.code()),
                    });
                }
            }
            seq += 1;
        }
    }
}

/// Reads one line (without its newline) into `line`, keeping at most
/// `max + 1` bytes of it; returns its full length in bytes, or `None` at the end
/// of the input. A last line without a newline is a line.
fn read_line(input: &mut dyn BufRead, line: &mut Vec<u8>, max: usize) -> io::Result<Option<usize>> {
    line.clear();
    let (mut len, mut any) = (0usize, false);
    loop {
        let buf = match input.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(any.then_some(len));
        }
        any = true;
        let newline = buf.iter().position(|&b| b == b'\n');
        let chunk = &buf[..newline.unwrap_or(buf.len())];
        let room = (max + 1).saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        len += chunk.len();
        let used = newline.map_or(buf.len(), |i| i + 1);
        input.consume(used);
        if newline.is_some() {
            return Ok(Some(len));
        }
    }
}

/// Skips `n` lines; returns how many there were.
fn skip(input: &mut dyn BufRead, n: u64) -> io::Result<u64> {
    let mut line = Vec::new();
    for i in 0..n {
        if read_line(input, &mut line, 0)?.is_none() {
            return Ok(i);
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_out_in_input_order_whatever_order_they_finish_in() {
        let mut order = Reorder::new(10);
        let mut out = Vec::new();
        for seq in [12u64, 11, 15, 10, 13, 14] {
            order.insert(seq, seq.to_string().into_bytes(), None);
            while let Some((line, _)) = order.pop() {
                out.push(String::from_utf8(line).unwrap());
            }
            if seq == 12 || seq == 11 {
                assert!(out.is_empty(), "nothing before line 10 is back");
            }
        }
        assert_eq!(out, ["10", "11", "12", "13", "14", "15"]);
        assert!(order.waiting.is_empty());
    }

    #[test]
    fn long_lines_are_measured_not_held() {
        let text = format!("{}\nshort\r\n\nlast", "x".repeat(100_000));
        let mut input = io::BufReader::with_capacity(64, text.as_bytes());
        let mut line = Vec::new();
        assert_eq!(read_line(&mut input, &mut line, 10).unwrap(), Some(100_000));
        assert_eq!(line.len(), 11, "at most max + 1 bytes kept");
        assert_eq!(read_line(&mut input, &mut line, 10).unwrap(), Some(6));
        assert_eq!(line, b"short\r");
        assert_eq!(read_line(&mut input, &mut line, 10).unwrap(), Some(0));
        assert_eq!(read_line(&mut input, &mut line, 10).unwrap(), Some(4));
        assert_eq!(line, b"last");
        assert_eq!(read_line(&mut input, &mut line, 10).unwrap(), None);
        let mut input = io::BufReader::new("a\nb\nc".as_bytes());
        assert_eq!(skip(&mut input, 2).unwrap(), 2);
        assert_eq!(skip(&mut input, 5).unwrap(), 1);
    }
}
