//! Side-by-side benchmark: anotador's engine, the whole daemon and onnxruntime on
//! the same bundle, the same tensors and the same thread count, in one run.
//!
//!     cargo bench --bench compare -- [--model DIR]... [--ort PYTHON] [--max-batch N]
//!         [--messages FILE] [--json FILE] [--kernels LIST] [--no-daemon]
//!         [--profile BxS [--seconds N]]   # one shape only, for `perf record`
//!
//! Per model, and per int8 kernel (`--kernels`, a comma list of kernel names and
//! `dequantize`; default every kernel this CPU runs and `dequantize`, all in this one
//! process so their ratios are free of run-to-run noise), one row each:
//! - engine: tract on fixed shapes (1×16, 1×64, 1×128, 8×64; real Spanish tokens,
//!   cut from `benches/messages-es.txt`), median of repeated runs, one thread;
//! - messages: the 40 ParlaMint paragraphs of `benches/messages-es.txt` (8–350 words)
//!   through the engine alone (their windows' tensors: what onnxruntime runs) and
//!   through the whole task path (tokenize, windows, engine, post-processing);
//! - onnxruntime (with `--ort PYTHON`, a Python with `onnxruntime` and `numpy`, e.g.
//!   the pinned `models/requirements.txt`): the bare model on exactly the tensors
//!   the engine ran, 1 intra-op thread, via `benches/ort_bench.py`, taking turns
//!   with each kernel (5 turns per shape, 5 passes over the messages); a ratio is
//!   the median of the turns' ratios;
//! - daemon (`--no-daemon` skips it): the same messages over MQTT loopback
//!   (Mosquitto, as in the tests) with 1 worker for every int8 path and 2 workers
//!   for the first, messages/s from first publish to last answer, and the daemon's
//!   RSS once loaded and its peaks at load and under load: memory per path, each in
//!   its own process.
//!
//! Ratios are within this run only, and to onnxruntime within the same seconds:
//! on a shared machine absolute timings drift 2× in minutes. Rerun, and say which
//! CPU (`lscpu`) gave them.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anotador::bench::Candidate;
use anotador::engine::{Batch, EngineState};
use anotador::tasks::batch::{annotate_batch, Item};
use anotador::{Annotator, Bundle, TaskOptions};
use common::*;
use serde_json::{json, Value};

const SHAPES: [(usize, usize); 5] = [(1, 16), (8, 16), (1, 64), (1, 128), (8, 64)];
/// Each shape runs about this long per engine, in `ROUNDS` turns with
/// onnxruntime (at least `MIN_REPS` runs a turn).
const SHAPE_BUDGET: Duration = Duration::from_secs(3);
const ROUNDS: usize = 5;
const MIN_REPS: usize = 3;
/// Passes over the messages, each engine's taking turns with onnxruntime's.
const MESSAGE_PASSES: usize = 5;
/// Messages published to the daemon: the 40 paragraphs, this many times.
const DAEMON_ROUNDS: usize = 3;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == name)
            .map(|w| w[1].clone())
            .collect()
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut models: Vec<PathBuf> = flag("--model").into_iter().map(PathBuf::from).collect();
    if models.is_empty() {
        models.push(root.join("models/ner-es"));
    }
    let ort = flag("--ort").pop();
    let json_out = flag("--json").pop();
    let max_batch: usize = flag("--max-batch")
        .pop()
        .map_or(8, |n| n.parse().expect("--max-batch N"));
    let paths: Vec<Candidate> = flag("--kernels")
        .pop()
        .map_or_else(Candidate::all_here, |list| {
            list.split(',')
                .map(|p| p.parse().expect("--kernels: kernel names and dequantize"))
                .collect()
        });
    let daemon = !args.iter().any(|a| a == "--no-daemon");
    let messages_file = flag("--messages")
        .pop()
        .map_or_else(|| root.join("benches/messages-es.txt"), PathBuf::from);
    let messages: Vec<String> = std::fs::read_to_string(&messages_file)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();

    println!("CPU: {}", cpu_name());
    if let Some(shape) = flag("--profile").pop() {
        let seconds = flag("--seconds")
            .pop()
            .map_or(10, |s| s.parse().expect("--seconds N"));
        for model in &models {
            profile(model, &messages, &paths, &shape, seconds);
        }
        return;
    }
    println!(
        "SIMD level: {:?}; kernels: {}",
        anotador::engine::simd::detected(),
        paths
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut report = Vec::new();
    for model in &models {
        let model = std::fs::canonicalize(model).unwrap();
        println!("\n## {}", model.display());
        report.push(bench_model(
            &model,
            &messages,
            ort.as_deref(),
            max_batch,
            &paths,
            daemon,
        ));
    }
    if let Some(path) = json_out {
        std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        println!("\nwrote {path}");
    }
}

/// The CPU model and the features the kernel choice depends on.
fn cpu_name() -> String {
    anotador::engine::simd::cpu_line()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time_run(state: &mut EngineState, batch: &Batch) -> f64 {
    let t = Instant::now();
    state.run(batch).unwrap();
    t.elapsed().as_secs_f64() * 1e3
}

fn batch_json(b: &Batch) -> Value {
    let rows = |v: &[i64]| -> Vec<Vec<i64>> { v.chunks(b.seq_len).map(<[i64]>::to_vec).collect() };
    json!({
        "input_ids": rows(&b.input_ids),
        "attention_mask": rows(&b.attention_mask),
        "token_type_ids": rows(&b.token_type_ids),
    })
}

/// `rows` windows of `seq` real tokens cut from `text`.
fn shape_batch(bundle: &Arc<Bundle>, text: &str, rows: usize, seq: usize) -> Batch {
    let options = TaskOptions {
        window: Some(seq),
        stride: Some(seq / 4),
        max_windows: Some(1000),
        ..TaskOptions::default()
    };
    let annotator = Annotator::new(bundle.clone(), &options).unwrap();
    let windows = annotator.windower().encode(text, None).unwrap();
    assert!(windows.len() > rows, "text too short for {rows}x{seq}");
    annotator.windower().batch(&windows[..rows], seq)
}

/// `--profile BxS`: one shape, run for `seconds` on the kernels in turn and
/// nothing else, for `perf record` to see where its time goes.
fn profile(model: &Path, messages: &[String], paths: &[Candidate], shape: &str, seconds: u64) {
    let (rows, seq) = shape
        .split_once('x')
        .and_then(|(b, s)| Some((b.parse().ok()?, s.parse().ok()?)))
        .expect("--profile BxS, e.g. 8x64");
    let long = messages.join(" ");
    let mut engines = Vec::new();
    for &path in paths {
        let bundle = load(model, path);
        let state = bundle.engine.state().unwrap();
        let batch = shape_batch(&bundle, &long, rows, seq);
        engines.push((path, state, batch, Vec::new()));
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        // Kernels in turns of 200 ms, so that each sees the same noise.
        for (_, state, batch, times) in engines.iter_mut() {
            let block = Instant::now();
            while block.elapsed() < Duration::from_millis(200) {
                times.push(time_run(state, batch));
            }
        }
    }
    for (path, _, _, times) in engines {
        // The minimum too: on a shared host, steal time only ever adds.
        println!(
            "{} {shape}: {:.2} ms (median of {}), min {:.2}",
            path.name(),
            median(times.clone()),
            times.len(),
            times.iter().copied().fold(f64::INFINITY, f64::min)
        );
    }
}

/// One kernel's engine figures.
struct EngineRun {
    path: Candidate,
    /// The kernels its matrices ran on, as the load reported them.
    kernels: String,
    packed_mib: f64,
    /// Per shape: our median ms and, with onnxruntime, its median ms and the
    /// median of the turns' ratios (ours / its).
    shapes: Vec<(f64, Option<(f64, f64)>)>,
    /// Messages/s through the whole task path, and through the engine alone (the
    /// same tensors onnxruntime runs).
    msgs_per_s: f64,
    model_msgs_per_s: f64,
    ort_messages: Option<OrtMessages>,
    batched_msgs_per_s: f64,
    two_threads_msgs_per_s: f64,
    message_ms_median: f64,
}

/// onnxruntime over the messages, in the same turns as one kernel.
#[derive(Clone, Copy)]
struct OrtMessages {
    msgs_per_s: f64,
    /// Median ratios of pass times, ours / its: whole task path, engine alone.
    whole_ratio: f64,
    engine_ratio: f64,
}

/// The fixed shapes' batches (real tokens) and every message's batches: the same
/// tensors for every kernel and for onnxruntime.
struct Inputs {
    shapes: Vec<(String, Batch)>,
    message_batches: Vec<Vec<Batch>>,
}

impl Inputs {
    /// Tokenization does not depend on the kernel: any path's bundle cuts them.
    fn new(bundle: &Arc<Bundle>, messages: &[String]) -> Inputs {
        let max = bundle.config.max_length;
        // Real tokens for the fixed shapes: windows of the longest paragraphs.
        let long = messages
            .join(" ")
            .repeat(1 + 8000 / messages.iter().map(String::len).sum::<usize>());
        let shapes = SHAPES
            .iter()
            .filter(|&&(_, seq)| seq <= max)
            .map(|&(rows, seq)| {
                (
                    format!("{rows}x{seq}"),
                    shape_batch(bundle, &long, rows, seq),
                )
            })
            .collect();
        let annotator = Annotator::new(bundle.clone(), &TaskOptions::default()).unwrap();
        let message_batches = messages
            .iter()
            .map(|m| annotator.batches(&annotator.windower().encode(m, None).unwrap()))
            .collect();
        Inputs {
            shapes,
            message_batches,
        }
    }
}

/// onnxruntime in a child Python (`benches/ort_bench.py`), run turn about with our
/// engine: on a shared machine the speed of both drifts by 2× within minutes, so
/// only ratios taken in the same seconds mean anything.
struct Ort {
    child: std::process::Child,
    requests: std::process::ChildStdin,
    replies: std::io::BufReader<std::process::ChildStdout>,
    version: String,
    _dir: TempDir,
}

impl Ort {
    fn start(python: &str, model: &Path, inputs: &Inputs) -> Ort {
        use std::process::{Command, Stdio};
        let dir = TempDir::new("ort");
        let spec = dir.0.join("inputs.json");
        let spec_json = json!({
            "model": model.join("model.onnx"),
            "threads": 1,
            "shapes": inputs.shapes.iter().map(|(name, b)| json!({"name": name, "batch": batch_json(b)})).collect::<Vec<_>>(),
            "messages": inputs.message_batches.iter().map(|bs| bs.iter().map(batch_json).collect::<Vec<_>>()).collect::<Vec<_>>(),
        });
        std::fs::write(&spec, spec_json.to_string()).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/ort_bench.py");
        let mut child = Command::new(python)
            .arg(&script)
            .arg(&spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run the onnxruntime script");
        let requests = child.stdin.take().unwrap();
        let replies = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut ort = Ort {
            child,
            requests,
            replies,
            version: String::new(),
            _dir: dir,
        };
        ort.version = ort.reply()["onnxruntime"]
            .as_str()
            .expect("ort_bench.py: no version line")
            .to_string();
        ort
    }

    fn reply(&mut self) -> Value {
        use std::io::BufRead;
        let mut line = String::new();
        self.replies.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "ort_bench.py ended (its error is above)");
        serde_json::from_str(&line).unwrap()
    }

    fn ask(&mut self, request: &str) -> Value {
        use std::io::Write;
        writeln!(self.requests, "{request}").unwrap();
        self.requests.flush().unwrap();
        self.reply()
    }

    /// `reps` runs of a shape, ms each.
    fn shape(&mut self, name: &str, reps: usize) -> Vec<f64> {
        serde_json::from_value(self.ask(&format!("shape {name} {reps}"))["ms"].clone()).unwrap()
    }

    /// One pass over the messages, seconds.
    fn pass(&mut self) -> f64 {
        self.ask("pass")["s"].as_f64().unwrap()
    }
}

impl Drop for Ort {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn load(model: &Path, path: Candidate) -> Arc<Bundle> {
    Arc::new(Bundle::load_with(model, path.rewrites().unwrap()).unwrap())
}

fn bench_engine(
    bundle: Arc<Bundle>,
    messages: &[String],
    max_batch: usize,
    path: Candidate,
    inputs: &Inputs,
    mut ort: Option<&mut Ort>,
) -> EngineRun {
    let info = bundle.engine.info().clone();
    let mut state = bundle.engine.state().unwrap();

    let mut shapes = Vec::new();
    for (name, batch) in &inputs.shapes {
        let warm: Vec<f64> = (0..2).map(|_| time_run(&mut state, batch)).collect();
        let turn = SHAPE_BUDGET.as_secs_f64() * 1e3 / ROUNDS as f64;
        let reps = MIN_REPS.max((turn / warm[1].max(0.01)) as usize);
        let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let o: Vec<f64> = (0..reps).map(|_| time_run(&mut state, batch)).collect();
            if let Some(ort) = ort.as_deref_mut() {
                let t = ort.shape(name, reps);
                ratios.push(median(o.clone()) / median(t.clone()));
                theirs.extend(t);
            }
            ours.extend(o);
        }
        shapes.push((
            median(ours),
            ort.is_some().then(|| (median(theirs), median(ratios))),
        ));
    }

    // Messages through the whole task path; onnxruntime runs the bare model on the
    // tensors that path ran.
    let annotator = Annotator::new(bundle.clone(), &TaskOptions::default()).unwrap();
    let mut per_message = vec![Vec::new(); messages.len()];
    for m in messages {
        annotator.annotate(&mut state, m, None).unwrap(); // warm-up
    }
    let (mut pass_totals, mut model_totals) = (Vec::new(), Vec::new());
    let (mut ort_totals, mut pass_ratios, mut model_ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..MESSAGE_PASSES {
        let started = Instant::now();
        for (i, m) in messages.iter().enumerate() {
            let t = Instant::now();
            annotator.annotate(&mut state, m, None).unwrap();
            per_message[i].push(t.elapsed().as_secs_f64() * 1e3);
        }
        let ours = started.elapsed().as_secs_f64();
        // The bare model on the same windows: what onnxruntime's pass runs.
        let started = Instant::now();
        for batch in inputs.message_batches.iter().flatten() {
            state.run(batch).unwrap();
        }
        let model = started.elapsed().as_secs_f64();
        if let Some(ort) = ort.as_deref_mut() {
            let theirs = ort.pass();
            ort_totals.push(theirs);
            pass_ratios.push(ours / theirs);
            model_ratios.push(model / theirs);
        }
        pass_totals.push(ours);
        model_totals.push(model);
    }
    let ort_messages = ort.is_some().then(|| OrtMessages {
        msgs_per_s: messages.len() as f64 / median(ort_totals),
        whole_ratio: median(pass_ratios),
        engine_ratio: median(model_ratios),
    });
    let model_msgs_per_s = messages.len() as f64 / median(model_totals);
    let msgs_per_s = messages.len() as f64 / median(pass_totals);
    // The same messages as micro-batches of `max_batch` (what the daemon's workers do
    // with a queue), through the same engine state.
    let mut batch_totals = Vec::new();
    for _ in 0..MESSAGE_PASSES {
        let started = Instant::now();
        for group in messages.chunks(max_batch) {
            let items: Vec<Item> = group
                .iter()
                .map(|m| Item {
                    annotator: &annotator,
                    text: m,
                    pair: None,
                })
                .collect();
            for r in annotate_batch(&mut state, &items) {
                r.unwrap();
            }
        }
        batch_totals.push(started.elapsed().as_secs_f64());
    }
    let batched_msgs_per_s = messages.len() as f64 / median(batch_totals);
    // Compute-only scaling: two threads, one engine state each, both running the
    // message set at once. What two daemon workers could reach if MQTT, the broker
    // and the client cost nothing; the gap to it is their share of the two cores.
    let mut pair_states = [
        bundle.engine.state().unwrap(),
        bundle.engine.state().unwrap(),
    ];
    let mut pair_totals = Vec::new();
    for _ in 0..MESSAGE_PASSES {
        let started = Instant::now();
        std::thread::scope(|scope| {
            for state in pair_states.iter_mut() {
                let annotator = &annotator;
                scope.spawn(move || {
                    for m in messages {
                        annotator.annotate(state, m, None).unwrap();
                    }
                });
            }
        });
        pair_totals.push(started.elapsed().as_secs_f64());
    }
    let two_threads_msgs_per_s = 2.0 * messages.len() as f64 / median(pair_totals);
    EngineRun {
        path,
        kernels: if info.rewrites.int8_kernels.is_empty() {
            "fp32 (tract)".into()
        } else {
            info.rewrites
                .int8_kernels
                .iter()
                .map(|(k, n)| format!("{n} × {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        },
        packed_mib: info.rewrites.packed_weight_bytes as f64 / 1048576.0,
        shapes,
        msgs_per_s,
        model_msgs_per_s,
        ort_messages,
        batched_msgs_per_s,
        two_threads_msgs_per_s,
        message_ms_median: median(per_message.into_iter().map(median).collect()),
    }
}

fn bench_model(
    model: &Path,
    messages: &[String],
    ort: Option<&str>,
    max_batch: usize,
    paths: &[Candidate],
    daemon: bool,
) -> Value {
    let first = load(model, paths[0]);
    let inputs = Inputs::new(&first, messages);
    let windows_total: usize = inputs
        .message_batches
        .iter()
        .map(|bs| bs.iter().map(|b| b.rows).sum::<usize>())
        .sum();
    let mut ort = ort.map(|python| Ort::start(python, model, &inputs));
    let runs: Vec<EngineRun> = paths
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            // One load per kernel; the first serves the inputs too.
            let bundle = if i == 0 {
                first.clone()
            } else {
                load(model, p)
            };
            bench_engine(bundle, messages, max_batch, p, &inputs, ort.as_mut())
        })
        .collect();
    let ort_version = ort.map(|o| o.version.clone());

    let daemons: Vec<DaemonRun> = if daemon {
        paths
            .iter()
            .map(|&p| daemon_throughput(model, messages, 1, max_batch, p))
            .collect()
    } else {
        Vec::new()
    };
    let daemon2 = daemon.then(|| daemon_throughput(model, messages, 2, max_batch, paths[0]));

    // The table: a row per kernel, ratios to onnxruntime (taken turn about) in
    // brackets; onnxruntime's row is from its turns beside the first kernel.
    let ratio = |x: Option<f64>| x.map_or(String::new(), |r| format!(" ({r:.2})"));
    print!("| engine |");
    for (name, _) in &inputs.shapes {
        print!(" {name} ms |");
    }
    println!(
        " {} messages ({windows_total} windows): engine, msg/s | whole task path, msg/s |",
        messages.len()
    );
    println!("|---|{}---|---|", "---|".repeat(inputs.shapes.len()));
    if let Some(version) = &ort_version {
        print!("| onnxruntime {version} int8 |");
        for (_, o) in &runs[0].shapes {
            print!(" {:.2} |", o.unwrap().0);
        }
        println!(" {:.1} | – |", runs[0].ort_messages.unwrap().msgs_per_s);
    }
    for r in &runs {
        print!("| {} ({}) |", r.path.name(), r.packed_mib_label());
        for (ms, o) in &r.shapes {
            print!(" {ms:.2}{} |", ratio(o.map(|o| o.1)));
        }
        println!(
            " {:.1}{} | {:.1}{} |",
            r.model_msgs_per_s,
            ratio(r.ort_messages.map(|o| o.engine_ratio)),
            r.msgs_per_s,
            ratio(r.ort_messages.map(|o| o.whole_ratio))
        );
    }
    for r in &runs {
        println!("{}: {}", r.path.name(), r.kernels);
    }
    for r in &runs {
        println!(
            "{}: micro-batches of {max_batch}: {:.1} msg/s = {:.2} × one by one; 2 threads: {:.1} msg/s = {:.2} × 1 thread",
            r.path.name(),
            r.batched_msgs_per_s,
            r.batched_msgs_per_s / r.msgs_per_s,
            r.two_threads_msgs_per_s,
            r.two_threads_msgs_per_s / r.msgs_per_s,
        );
    }
    for (r, d) in runs.iter().zip(&daemons) {
        println!(
            "daemon ({}) over MQTT, 1 worker: {:.1} msg/s = {:.2} × engine-only; RSS {:.1} MiB loaded, peak {:.1} at load, {:.1} under load",
            r.path.name(),
            d.msgs_per_s,
            d.msgs_per_s / r.msgs_per_s,
            d.load_rss_mib,
            d.load_peak_mib,
            d.run_peak_mib
        );
    }
    if let (Some(d1), Some(d2)) = (daemons.first(), &daemon2) {
        println!(
            "daemon ({}), 2 workers: {:.1} msg/s = {:.2} × 1 worker; RSS {:.1} MiB loaded, peak {:.1} at load, {:.1} under load",
            runs[0].path.name(),
            d2.msgs_per_s,
            d2.msgs_per_s / d1.msgs_per_s,
            d2.load_rss_mib,
            d2.load_peak_mib,
            d2.run_peak_mib
        );
    }
    json!({
        "model": model,
        "cpu": cpu_name(),
        "messages": messages.len(),
        "windows": windows_total,
        "max_batch": max_batch,
        "onnxruntime": ort_version,
        "paths": runs.iter().map(|r| json!({
            "kernel": r.path.name(),
            "matrices_on": r.kernels,
            "packed_weight_mib": r.packed_mib,
            "shapes": r.shapes.iter().zip(&inputs.shapes).map(|((ms, o), (name, _))| json!({"shape": name, "anotador_ms": ms, "ort_ms": o.map(|o| o.0), "ratio": o.map(|o| o.1)})).collect::<Vec<_>>(),
            "engine_messages_per_s": r.msgs_per_s,
            "ort_messages_per_s": r.ort_messages.map(|o| o.msgs_per_s),
            "messages_ratio": r.ort_messages.map(|o| o.whole_ratio),
            "engine_only_messages_per_s": r.model_msgs_per_s,
            "engine_only_messages_ratio": r.ort_messages.map(|o| o.engine_ratio),
            "engine_batched_messages_per_s": r.batched_msgs_per_s,
            "engine_2_threads_messages_per_s": r.two_threads_msgs_per_s,
            "message_ms_median": r.message_ms_median,
        })).collect::<Vec<_>>(),
        "daemon_1_worker": daemons.iter().map(DaemonRun::json).collect::<Vec<_>>(),
        "daemon_2_workers": daemon2.as_ref().map(DaemonRun::json),
    })
}

impl EngineRun {
    fn packed_mib_label(&self) -> String {
        if self.packed_mib > 0.0 {
            format!("{:.1} MiB int8 weights", self.packed_mib)
        } else {
            "fp32 weights".into()
        }
    }
}

struct DaemonRun {
    msgs_per_s: f64,
    /// Resident once loaded and connected, before the first message.
    load_rss_mib: f64,
    load_peak_mib: f64,
    run_peak_mib: f64,
}

impl DaemonRun {
    fn json(&self) -> Value {
        json!({"messages_per_s": self.msgs_per_s, "rss_loaded_mib": self.load_rss_mib, "peak_rss_load_mib": self.load_peak_mib, "peak_rss_run_mib": self.run_peak_mib})
    }
}

fn daemon_throughput(
    model: &Path,
    messages: &[String],
    workers: usize,
    max_batch: usize,
    kernel: Candidate,
) -> DaemonRun {
    let total = messages.len() * DAEMON_ROUNDS;
    let broker = start_broker_with(&format!("max_queued_messages {}\n", total * 2));
    let dir = TempDir::new("compare");
    let config = bench_config(
        &dir,
        broker.port,
        &model.display().to_string(),
        &format!(
            "workers = {workers}\nmax_batch = {max_batch}\n{}",
            match kernel {
                Candidate::Kernel(k) => format!("kernel = \"{k}\""),
                Candidate::Dequantize => "int8 = \"dequantize\"".into(),
            }
        ),
    );
    let device = Device::connect(broker.port, "bench-device");
    let daemon = Daemon::start(&config);
    let pid = daemon.0.id();
    wait_online(&device);
    let (load_rss, load_hwm) = rss_of(pid).unwrap();
    let started = Instant::now();
    for i in 0..total {
        let text = serde_json::to_string(&messages[i % messages.len()]).unwrap();
        device.publish("in/bench", format!(r#"{{"id": {i}, "text": {text}}}"#));
    }
    let mut answered = 0;
    let deadline = Instant::now() + Duration::from_secs(1800);
    while answered < total && Instant::now() < deadline {
        if let Ok((topic, _, _)) = device.rx.recv_timeout(Duration::from_millis(200)) {
            if topic.starts_with("out/") {
                answered += 1;
            }
            assert!(!topic.starts_with("err/"), "error outcome on {topic}");
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(answered, total, "every message answered");
    let (_, run_hwm) = rss_of(pid).unwrap();
    let mib = |b: u64| b as f64 / 1048576.0;
    DaemonRun {
        msgs_per_s: total as f64 / elapsed,
        load_rss_mib: mib(load_rss),
        load_peak_mib: mib(load_hwm),
        run_peak_mib: mib(run_hwm),
    }
}
