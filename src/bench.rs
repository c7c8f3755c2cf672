//! `anotador bench`: how fast each int8 kernel this CPU runs, and the dequantized
//! path, annotate a built-in set of Spanish messages with one bundle on one thread,
//! so that a user on a Raspberry Pi (or any machine we never measured) learns which
//! is fastest there and can write it into the configuration.
//!
//! Each candidate runs in a process of its own (this binary again, `--one`), so the
//! memory it reports is its own; where the binary cannot start itself (qemu-user
//! without binfmt) they run one after another in this process instead.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::engine::{Int8Path, KernelKind, Rewrites};
use crate::error::{Error, Result};
use crate::{Annotator, Bundle, TaskOptions};

/// The messages timed: the 40 ParlaMint-ES paragraphs of `benches/messages-es.txt`
/// (8–350 words, parliament speech; CC BY 4.0), the same the `compare` benchmark uses.
pub const MESSAGES: &str = include_str!("../benches/messages-es.txt");

/// What is timed: an int8 kernel, or fp32 weights expanded at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Candidate {
    Kernel(KernelKind),
    Dequantize,
}

impl Candidate {
    pub fn name(self) -> &'static str {
        match self {
            Candidate::Kernel(k) => k.name(),
            Candidate::Dequantize => "dequantize",
        }
    }

    /// Every kernel this CPU runs, then `dequantize`.
    pub fn all_here() -> Vec<Candidate> {
        KernelKind::available_here()
            .into_iter()
            .map(Candidate::Kernel)
            .chain([Candidate::Dequantize])
            .collect()
    }

    /// The load-time rewrites that run it.
    pub fn rewrites(self) -> Result<Rewrites> {
        match self {
            Candidate::Kernel(k) => Rewrites::for_model(Int8Path::Native, Some(k)),
            Candidate::Dequantize => Rewrites::for_model(Int8Path::Dequantize, None),
        }
        .map_err(Error::Kernel)
    }
}

impl std::str::FromStr for Candidate {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Candidate, String> {
        match s {
            "dequantize" => Ok(Candidate::Dequantize),
            name => name.parse().map(Candidate::Kernel),
        }
    }
}

/// One candidate's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measure {
    pub candidate: String,
    /// The kernels its matrices ran on (name → matrices), from the load.
    pub kernels: BTreeMap<String, usize>,
    pub messages: usize,
    /// Tokens per pass over the messages (windows' tokens, special ones included).
    pub tokens: usize,
    pub passes: usize,
    /// The median pass, per message.
    pub ms_per_message: f64,
    pub tokens_per_s: f64,
    pub load_s: f64,
    /// Resident memory once loaded, and the highest it reached.
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
}

/// Loads `model` for `candidate` and times passes over [`MESSAGES`] on this thread:
/// one pass to warm up, then passes until `budget` is spent (at least three). `limit`
/// takes only the first messages.
pub fn measure(
    model: &Path,
    candidate: Candidate,
    budget: Duration,
    limit: Option<usize>,
) -> Result<Measure> {
    let started = Instant::now();
    let bundle = Arc::new(Bundle::load_with(model, candidate.rewrites()?)?);
    let load_s = started.elapsed().as_secs_f64();
    let kernels = if matches!(candidate, Candidate::Dequantize) {
        BTreeMap::from([(
            "fp32 (tract)".to_string(),
            bundle.engine.info().rewrites.weights_dequantized,
        )])
    } else {
        bundle.engine.info().rewrites.int8_kernels.clone()
    };
    let qa = bundle.config.task == crate::bundle::Task::QuestionAnswering;
    let annotator = Annotator::new(bundle, &TaskOptions::default())?;
    let rss_mib = crate::memory::rss_bytes().unwrap_or(0) as f64 / 1048576.0;
    let mut state = annotator.bundle().engine.state()?;
    let messages: Vec<&str> = MESSAGES
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(limit.unwrap_or(usize::MAX).max(1))
        .collect();
    let mut pass = || -> Result<(Duration, usize)> {
        let t = Instant::now();
        let mut tokens = 0;
        for m in &messages {
            // A question-answering model reads each message as the context.
            let (text, pair) = if qa {
                ("¿De qué se habla?", Some(*m))
            } else {
                (*m, None)
            };
            tokens += annotator.annotate(&mut state, text, pair)?.tokens;
        }
        Ok((t.elapsed(), tokens))
    };
    let (_, tokens) = pass()?;
    let mut times = Vec::new();
    let spent = Instant::now();
    while times.len() < 3 || spent.elapsed() < budget {
        times.push(pass()?.0);
    }
    times.sort();
    let median = times[times.len() / 2].as_secs_f64();
    Ok(Measure {
        candidate: candidate.name().to_string(),
        kernels,
        messages: messages.len(),
        tokens,
        passes: times.len(),
        ms_per_message: median * 1e3 / messages.len() as f64,
        tokens_per_s: tokens as f64 / median,
        load_s,
        rss_mib,
        peak_rss_mib: crate::memory::peak_rss_bytes().unwrap_or(0) as f64 / 1048576.0,
    })
}

/// The results as a Markdown table, fastest first, with the CPU line above it.
pub fn table(cpu: &str, measures: &[Measure]) -> String {
    let mut sorted: Vec<&Measure> = measures.iter().collect();
    sorted.sort_by(|a, b| a.ms_per_message.total_cmp(&b.ms_per_message));
    let best = sorted.first().map_or(1.0, |m| m.ms_per_message);
    let mut out = format!(
        "CPU: {cpu}\nSIMD level: {:?}\n\n| kernel | ms per message | tokens/s | vs fastest | RSS loaded / peak MiB | matrices on |\n|---|---|---|---|---|---|\n",
        crate::engine::simd::detected()
    );
    for m in sorted {
        let on: Vec<String> = m
            .kernels
            .iter()
            .map(|(k, n)| format!("{n} × {k}"))
            .collect();
        out += &format!(
            "| {} | {:.2} | {:.0} | {:.2} | {:.1} / {:.1} | {} |\n",
            m.candidate,
            m.ms_per_message,
            m.tokens_per_s,
            m.ms_per_message / best,
            m.rss_mib,
            m.peak_rss_mib,
            on.join(", ")
        );
    }
    out
}

/// The fastest candidate of `measures`.
pub fn fastest(measures: &[Measure]) -> Option<Candidate> {
    measures
        .iter()
        .min_by(|a, b| a.ms_per_message.total_cmp(&b.ms_per_message))
        .and_then(|m| m.candidate.parse().ok())
}

/// Writes `choice` into `[models.NAME]` of the configuration at `path` (`kernel`,
/// and `int8` where it must change), keeping everything else, comments included.
pub fn write_choice(path: &Path, name: &str, choice: Candidate) -> Result<()> {
    let text = std::fs::read_to_string(path)?;
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| Error::InvalidRequest(format!("{}: not TOML: {e}", path.display())))?;
    let model = doc
        .get_mut("models")
        .and_then(|m| m.get_mut(name))
        .and_then(|m| m.as_table_like_mut())
        .ok_or_else(|| {
            Error::InvalidRequest(format!("{}: no [models.{name}] section", path.display()))
        })?;
    match choice {
        Candidate::Kernel(k) => {
            model.insert("kernel", toml_edit::value(k.name()));
            if model.get("int8").and_then(|v| v.as_str()) == Some("dequantize") {
                model.insert("int8", toml_edit::value("native"));
            }
        }
        Candidate::Dequantize => {
            model.insert("int8", toml_edit::value("dequantize"));
            model.remove("kernel");
        }
    }
    std::fs::write(path, doc.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_is_written_into_the_model_and_nothing_else_changes() {
        let dir = std::env::temp_dir().join(format!("anotador-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        let before = "# the daemon\n[daemon]\nname = \"x\"\n\n[models.ner]\n# where\npath = \"m\"\nint8 = \"dequantize\"\n\n[models.pos]\npath = \"p\"\n";
        std::fs::write(&path, before).unwrap();
        write_choice(&path, "ner", Candidate::Kernel(KernelKind::Tract)).unwrap();
        let after = std::fs::read_to_string(&path).unwrap();
        assert!(
            after.contains("# the daemon") && after.contains("# where"),
            "{after}"
        );
        let parsed: toml::Value = toml::from_str(&after).unwrap();
        assert_eq!(parsed["models"]["ner"]["kernel"].as_str(), Some("tract"));
        assert_eq!(parsed["models"]["ner"]["int8"].as_str(), Some("native"));
        assert!(parsed["models"]["pos"].get("kernel").is_none());
        write_choice(&path, "ner", Candidate::Dequantize).unwrap();
        let parsed: toml::Value = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(parsed["models"]["ner"]["int8"].as_str(), Some("dequantize"));
        assert!(parsed["models"]["ner"].get("kernel").is_none());
        let err = write_choice(&path, "nope", Candidate::Dequantize).unwrap_err();
        assert!(err.to_string().contains("[models.nope]"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn candidates_parse_and_cover_this_cpu() {
        let all = Candidate::all_here();
        assert_eq!(all.last(), Some(&Candidate::Dequantize));
        assert!(all.contains(&Candidate::Kernel(KernelKind::Tract)));
        for c in all {
            assert_eq!(c.name().parse::<Candidate>(), Ok(c));
        }
    }
}
