//! Where `annotate` reads and writes: stdin or a file, stdout or a file, gzip by
//! the `.gz` extension, and the output file as the checkpoint of `--resume`.
//!
//! Checkpoints. A plain output is flushed to the kernel after every write and
//! `fsync`ed every [`SYNC_EVERY`], so a killed process loses only what it had not
//! written and a power cut at most that much more. A gzip output is written as a
//! series of gzip members (a valid `.gz` that gzip, zcat and flate2's
//! `MultiGzDecoder` read as one stream), each ending on a line boundary: a member
//! is closed and synced every [`MEMBER_LINES`] lines or [`SYNC_EVERY`], so a kill
//! leaves whole members plus one cut short, and resuming decodes what the cut
//! one still holds instead of throwing it away.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use flate2::Compression;

use super::LinesError;

/// How often a file output is made durable (fsync; a gzip member closed).
pub const SYNC_EVERY: Duration = Duration::from_secs(10);
/// Lines per gzip member at most: what a resume may have to decode again.
pub const MEMBER_LINES: u64 = 1000;

pub fn is_gzip(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
}

/// Counts the bytes read through it: the input's position for progress (the
/// compressed position for gzip, which is what the file size measures).
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The input lines, with how far into the file the reader is.
pub struct Input {
    pub reader: Box<dyn BufRead + Send>,
    /// Bytes of the file (compressed, for `.gz`) read so far.
    pub position: Arc<AtomicU64>,
    /// The file's size, when it is a regular file (stdin redirected from one too).
    pub size: Option<u64>,
}

impl Input {
    /// `path`, or stdin when `None`.
    pub fn open(path: Option<&Path>) -> Result<Input, LinesError> {
        let position = Arc::new(AtomicU64::new(0));
        let Some(path) = path else {
            let counting = Counting {
                inner: io::stdin(),
                count: position.clone(),
            };
            return Ok(Input {
                reader: Box::new(BufReader::with_capacity(1 << 16, counting)),
                position,
                size: stdin_size(),
            });
        };
        let file = File::open(path).map_err(|e| LinesError::file(path, e))?;
        let size = file
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len());
        let counting = Counting {
            inner: file,
            count: position.clone(),
        };
        let reader: Box<dyn BufRead + Send> = if is_gzip(path) {
            // Multi-member: what anotador writes, and what pigz and `cat a.gz b.gz` make.
            let decoder = flate2::read::MultiGzDecoder::new(counting);
            Box::new(BufReader::with_capacity(1 << 16, decoder))
        } else {
            Box::new(BufReader::with_capacity(1 << 16, counting))
        };
        Ok(Input {
            reader,
            position,
            size,
        })
    }
}

/// The size of the file stdin is redirected from (`< big.txt`), if it is one.
fn stdin_size() -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        let fd = io::stdin().as_fd().try_clone_to_owned().ok()?;
        let metadata = File::from(fd).metadata().ok()?;
        metadata.is_file().then_some(metadata.len())
    }
    #[cfg(not(unix))]
    None
}

enum Sink {
    Stdout(BufWriter<io::Stdout>),
    Plain(BufWriter<File>),
    /// The member being written; `None` between members.
    Gzip(Option<GzEncoder<File>>, File),
}

/// The output lines, checkpointed as the module says.
pub struct Output {
    sink: Sink,
    /// Lines in the current gzip member.
    member_lines: u64,
    /// Lines written by this process.
    written: u64,
    /// The last fsync (plain) or the start of the current member (gzip).
    since: Instant,
}

impl Output {
    /// Opens the output (`None`: stdout) and returns it with the number of input
    /// lines it already answers: 0, or with `resume` the complete lines of an
    /// existing file, which is first cut back to them.
    pub fn open(
        path: Option<&Path>,
        resume: bool,
        overwrite: bool,
    ) -> Result<(Output, u64), LinesError> {
        let Some(path) = path else {
            if resume {
                return Err(LinesError::ResumeNeedsOutput);
            }
            return Ok((Output::new(Sink::Stdout(BufWriter::new(io::stdout()))), 0));
        };
        let exists = path.exists();
        if exists && !resume && !overwrite {
            return Err(LinesError::OutputExists(path.to_path_buf()));
        }
        let gzip = is_gzip(path);
        let done = if resume && exists {
            let recovered = if gzip {
                recover_gzip(path)
            } else {
                recover_plain(path)
            };
            recovered.map_err(|e| LinesError::file(path, e))?
        } else {
            File::create(path).map_err(|e| LinesError::file(path, e))?;
            0
        };
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| LinesError::file(path, e))?;
        let sink = if gzip {
            Sink::Gzip(None, file)
        } else {
            Sink::Plain(BufWriter::with_capacity(1 << 16, file))
        };
        Ok((Output::new(sink), done))
    }

    fn new(sink: Sink) -> Output {
        Output {
            sink,
            member_lines: 0,
            written: 0,
            since: Instant::now(),
        }
    }

    /// Writes one line (`bytes` and a newline).
    pub fn line(&mut self, bytes: &[u8]) -> io::Result<()> {
        let out: &mut dyn Write = match &mut self.sink {
            Sink::Stdout(w) => w,
            Sink::Plain(w) => w,
            Sink::Gzip(member, file) => {
                if member.is_none() {
                    let file = file.try_clone()?;
                    *member = Some(GzEncoder::new(file, Compression::default()));
                    self.since = Instant::now();
                }
                self.member_lines += 1;
                member.as_mut().expect("a member is open")
            }
        };
        out.write_all(bytes)?;
        out.write_all(b"\n")?;
        self.written += 1;
        Ok(())
    }

    /// After a run of lines: hands them to the kernel (plain), and makes the file
    /// durable when it is time (see the module).
    pub fn checkpoint(&mut self) -> io::Result<()> {
        match &mut self.sink {
            Sink::Stdout(w) => w.flush(),
            Sink::Plain(w) => {
                w.flush()?;
                if self.since.elapsed() >= SYNC_EVERY {
                    w.get_ref().sync_data()?;
                    self.since = Instant::now();
                }
                Ok(())
            }
            Sink::Gzip(..) => {
                if self.member_lines >= MEMBER_LINES
                    || (self.member_lines > 0 && self.since.elapsed() >= SYNC_EVERY)
                {
                    self.close_member()?;
                }
                Ok(())
            }
        }
    }

    fn close_member(&mut self) -> io::Result<()> {
        if let Sink::Gzip(member, file) = &mut self.sink {
            if let Some(encoder) = member.take() {
                encoder.finish()?;
                file.sync_data()?;
            }
            self.member_lines = 0;
        }
        Ok(())
    }

    /// Ends the output: flushed, the last member closed, synced.
    pub fn finish(mut self) -> io::Result<()> {
        match &mut self.sink {
            Sink::Stdout(w) => w.flush(),
            Sink::Plain(w) => {
                w.flush()?;
                w.get_ref().sync_data()
            }
            Sink::Gzip(member, file) => {
                if member.is_none() && file.metadata()?.len() == 0 {
                    // No line at all: still a valid (empty) gzip file.
                    GzEncoder::new(file.try_clone()?, Compression::default()).finish()?;
                }
                self.close_member()
            }
        }
    }
}

/// A line anotador wrote: JSON, newline-terminated. A line that is not (a cut
/// write, or the zeros some file systems leave after a power cut) ends what a
/// resume keeps.
fn complete(line: &[u8]) -> bool {
    line.ends_with(b"\n") && serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok()
}

/// Keeps the complete lines of a plain output (a partial last line, from a kill
/// in the middle of a write, is cut off) and returns how many there are.
fn recover_plain(path: &Path) -> io::Result<u64> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let (mut lines, mut keep) = (0u64, 0u64);
    let mut reader = BufReader::with_capacity(1 << 16, &file);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || !complete(&line) {
            break;
        }
        lines += 1;
        keep += n as u64;
    }
    drop(reader);
    file.set_len(keep)?;
    file.sync_all()?;
    Ok(lines)
}

/// One gzip member as far as it decodes: its complete lines (count, and decoded
/// bytes up to the end of the last), and whether it ended cleanly after them.
struct Member {
    lines: u64,
    keep: u64,
    whole: bool,
}

fn decode_member(reader: &mut impl BufRead) -> Member {
    let decoder = flate2::bufread::GzDecoder::new(reader);
    let mut decoded = BufReader::with_capacity(1 << 16, decoder);
    let mut m = Member {
        lines: 0,
        keep: 0,
        whole: false,
    };
    let mut line = Vec::new();
    loop {
        line.clear();
        match decoded.read_until(b'\n', &mut line) {
            Ok(0) => {
                m.whole = true;
                return m;
            }
            Ok(n) if complete(&line) => {
                m.lines += 1;
                m.keep += n as u64;
            }
            // Cut short (a kill, a power cut), not gzip at all (garbage after the
            // last member) or not a line anotador wrote: kept up to here.
            Ok(_) | Err(_) => return m,
        }
    }
}

/// Keeps the complete lines of a gzip output: whole members as they are, and the
/// complete lines of a member cut short compressed again into a member of their
/// own (through a temporary file beside it, so memory stays bounded). Returns how
/// many lines the file holds.
fn recover_gzip(path: &Path) -> io::Result<u64> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut lines = 0u64;
    let mut cut: Option<(u64, u64, u64)> = None;
    loop {
        if reader.fill_buf()?.is_empty() {
            break;
        }
        let start = reader.stream_position()?;
        let member = decode_member(&mut reader);
        if member.whole {
            lines += member.lines;
            continue;
        }
        cut = Some((start, member.keep, member.lines));
        break;
    }
    drop(reader);
    let Some((start, keep, kept_lines)) = cut else {
        return Ok(lines);
    };
    let salvage = PathBuf::from(format!("{}.resume", path.display()));
    if keep > 0 {
        let mut from = BufReader::new(File::open(path)?);
        from.seek(SeekFrom::Start(start))?;
        let mut complete = flate2::bufread::GzDecoder::new(from).take(keep);
        let mut encoder = GzEncoder::new(File::create(&salvage)?, Compression::default());
        // The decoder stops with an error where the member was cut, after `keep`.
        io::copy(&mut complete, &mut encoder)?;
        encoder.finish()?.sync_all()?;
    }
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(start)?;
    if keep > 0 {
        let mut file = OpenOptions::new().append(true).open(path)?;
        io::copy(&mut File::open(&salvage)?, &mut file)?;
        file.sync_all()?;
        std::fs::remove_file(&salvage)?;
        lines += kept_lines;
    } else {
        file.sync_all()?;
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("anotador-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        path
    }

    fn gunzip(path: &Path) -> String {
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(File::open(path).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        text
    }

    fn numbered(range: std::ops::Range<u64>) -> String {
        range.map(|i| format!("{{\"line\":{i}}}\n")).collect()
    }

    #[test]
    fn plain_resume_drops_a_partial_last_line() {
        let path = temp("partial.jsonl");
        std::fs::write(&path, format!("{}{{\"line\":3,\"res", numbered(0..3))).unwrap();
        let torn = temp("torn.jsonl");
        // A power cut's zeros before a newline end what is kept too.
        std::fs::write(
            &torn,
            format!("{}\0\0\0\n{}", numbered(0..2), numbered(2..3)),
        )
        .unwrap();
        assert_eq!(recover_plain(&torn).unwrap(), 2);
        assert_eq!(std::fs::read_to_string(&torn).unwrap(), numbered(0..2));
        let (mut out, done) = Output::open(Some(&path), true, false).unwrap();
        assert_eq!(done, 3);
        out.line(b"{\"line\":3}").unwrap();
        out.finish().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), numbered(0..4));
        // Without --resume an existing output is not overwritten by accident.
        assert!(matches!(
            Output::open(Some(&path), false, false),
            Err(LinesError::OutputExists(_))
        ));
        assert_eq!(Output::open(Some(&path), false, true).unwrap().1, 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    /// Writes `n` lines through `Output` with members closed every `MEMBER_LINES`.
    fn write_gzip(path: &Path, n: u64) {
        let (mut out, _) = Output::open(Some(path), false, true).unwrap();
        for i in 0..n {
            out.line(format!("{{\"line\":{i}}}").as_bytes()).unwrap();
            out.checkpoint().unwrap();
        }
        out.finish().unwrap();
    }

    #[test]
    fn gzip_output_is_members_that_gzip_reads_as_one() {
        let path = temp("members.jsonl.gz");
        write_gzip(&path, 2 * MEMBER_LINES + 5);
        assert_eq!(gunzip(&path), numbered(0..2 * MEMBER_LINES + 5));
        let empty = temp("empty.jsonl.gz");
        write_gzip(&empty, 0);
        assert_eq!(gunzip(&empty), "");
        // And read back as input.
        let mut input = Input::open(Some(&path)).unwrap();
        let mut text = String::new();
        input.reader.read_to_string(&mut text).unwrap();
        assert_eq!(text, numbered(0..2 * MEMBER_LINES + 5));
        assert_eq!(
            input.position.load(Ordering::Relaxed),
            std::fs::metadata(&path).unwrap().len()
        );
    }

    #[test]
    fn gzip_resume_keeps_whole_members_and_salvages_a_cut_one() {
        let path = temp("cut.jsonl.gz");
        write_gzip(&path, 2 * MEMBER_LINES + 500);
        let bytes = std::fs::read(&path).unwrap();
        // Cut inside the last member, as a kill would; then also followed by
        // zeros, as a power cut may leave.
        for zeros in [0, 64] {
            let mut damaged = bytes[..bytes.len() - 200].to_vec();
            damaged.resize(damaged.len() + zeros, 0);
            std::fs::write(&path, &damaged).unwrap();
            let (out, done) = Output::open(Some(&path), true, false).unwrap();
            out.finish().unwrap();
            assert!(
                done > 2 * MEMBER_LINES && done < 2 * MEMBER_LINES + 500,
                "{done}: the whole members and part of the cut one"
            );
            assert_eq!(gunzip(&path), numbered(0..done), "{zeros} zeros");
        }
        // Whole file plus garbage: every line kept, the garbage cut off.
        let mut garbage = bytes.clone();
        garbage.extend_from_slice(&[0; 64]);
        std::fs::write(&path, &garbage).unwrap();
        let (mut out, done) = Output::open(Some(&path), true, false).unwrap();
        assert_eq!(done, 2 * MEMBER_LINES + 500);
        out.line(b"{\"line\":2500}").unwrap();
        out.finish().unwrap();
        assert_eq!(gunzip(&path), numbered(0..2 * MEMBER_LINES + 501));
        assert!(!PathBuf::from(format!("{}.resume", path.display())).exists());
    }
}
