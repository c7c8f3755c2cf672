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
//!   through the whole task path (tokenize, windows, engine, post-processing);
//! - onnxruntime (with `--ort PYTHON`, a Python with `onnxruntime` and `numpy`, e.g.
//!   the pinned `models/requirements.txt`): the bare model on exactly the tensors
//!   the engine ran, 1 intra-op thread, via `benches/ort_bench.py`;
//! - daemon (`--no-daemon` skips it): the same messages over MQTT loopback
//!   (Mosquitto, as in the tests) with 1 worker for every int8 path and 2 workers
//!   for the first, messages/s from first publish to last answer, and the daemon's
//!   RSS once loaded and its peaks at load and under load: memory per path, each in
//!   its own process.
//!
//! Ratios are within this run only. Timings from a shared or throttled machine are
//! noisy: compare ratios, rerun, and say which CPU (`lscpu`) gave them.

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
/// Repetitions per shape stop after this long (and at least `MIN_REPS` runs).
const SHAPE_BUDGET: Duration = Duration::from_secs(3);
const MIN_REPS: usize = 5;
const MESSAGE_PASSES: usize = 3;
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

/// `--profile BxS`: one shape, run for `seconds` on each kernel and nothing else,
/// for `perf record` to see where its time goes.
fn profile(model: &Path, messages: &[String], paths: &[Candidate], shape: &str, seconds: u64) {
    let (rows, seq) = shape
        .split_once('x')
        .and_then(|(b, s)| Some((b.parse().ok()?, s.parse().ok()?)))
        .expect("--profile BxS, e.g. 8x64");
    let long = messages.join(" ");
    for &path in paths {
        let bundle = Arc::new(Bundle::load_with(model, path.rewrites().unwrap()).unwrap());
        let mut state = bundle.engine.state().unwrap();
        let batch = shape_batch(&bundle, &long, rows, seq);
        let started = Instant::now();
        let mut times = Vec::new();
        while started.elapsed() < Duration::from_secs(seconds) {
            times.push(time_run(&mut state, &batch));
        }
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
    shapes: Vec<(String, Batch, f64)>,
    message_batches: Vec<Vec<Batch>>,
    msgs_per_s: f64,
    batched_msgs_per_s: f64,
    two_threads_msgs_per_s: f64,
    message_ms_median: f64,
}

fn bench_engine(model: &Path, messages: &[String], max_batch: usize, path: Candidate) -> EngineRun {
    let bundle = Arc::new(Bundle::load_with(model, path.rewrites().unwrap()).unwrap());
    let info = bundle.engine.info().clone();
    let max = bundle.config.max_length;
    let mut state = bundle.engine.state().unwrap();
    // Real tokens for the fixed shapes: windows of the longest paragraphs.
    let long = messages
        .join(" ")
        .repeat(1 + 8000 / messages.iter().map(String::len).sum::<usize>());

    let mut shapes = Vec::new();
    for (rows, seq) in SHAPES {
        if seq > max {
            continue;
        }
        let batch = shape_batch(&bundle, &long, rows, seq);
        for _ in 0..2 {
            time_run(&mut state, &batch);
        }
        let started = Instant::now();
        let mut times = Vec::new();
        while times.len() < MIN_REPS || started.elapsed() < SHAPE_BUDGET {
            times.push(time_run(&mut state, &batch));
        }
        shapes.push((format!("{rows}x{seq}"), batch, median(times)));
    }

    // Messages through the whole task path, and the exact tensors that path ran.
    let annotator = Annotator::new(bundle.clone(), &TaskOptions::default()).unwrap();
    let mut per_message = vec![Vec::new(); messages.len()];
    let mut message_batches = Vec::new();
    for m in messages {
        let windows = annotator.windower().encode(m, None).unwrap();
        message_batches.push(annotator.batches(&windows));
        annotator.annotate(&mut state, m, None).unwrap(); // warm-up
    }
    let mut pass_totals = Vec::new();
    for _ in 0..MESSAGE_PASSES {
        let started = Instant::now();
        for (i, m) in messages.iter().enumerate() {
            let t = Instant::now();
            annotator.annotate(&mut state, m, None).unwrap();
            per_message[i].push(t.elapsed().as_secs_f64() * 1e3);
        }
        pass_totals.push(started.elapsed().as_secs_f64());
    }
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
        message_batches,
        msgs_per_s,
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
    let runs: Vec<EngineRun> = paths
        .iter()
        .map(|&p| bench_engine(model, messages, max_batch, p))
        .collect();
    // Every path ran the same windows: onnxruntime gets the first one's tensors.
    let (shapes, message_batches) = (&runs[0].shapes, &runs[0].message_batches);
    let windows_total: usize = message_batches
        .iter()
        .map(|bs| bs.iter().map(|b| b.rows).sum::<usize>())
        .sum();

    // onnxruntime on the same tensors.
    let ort_result = ort.map(|python| {
        let dir = TempDir::new("ort");
        let spec = dir.0.join("inputs.json");
        let spec_json = json!({
            "model": model.join("model.onnx"),
            "threads": 1,
            "shape_budget_s": SHAPE_BUDGET.as_secs_f64(),
            "min_reps": MIN_REPS,
            "passes": MESSAGE_PASSES,
            "shapes": shapes.iter().map(|(name, b, _)| json!({"name": name, "batch": batch_json(b)})).collect::<Vec<_>>(),
            "messages": message_batches.iter().map(|bs| bs.iter().map(batch_json).collect::<Vec<_>>()).collect::<Vec<_>>(),
        });
        std::fs::write(&spec, spec_json.to_string()).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/ort_bench.py");
        let out = std::process::Command::new(python)
            .arg(&script)
            .arg(&spec)
            .output()
            .expect("run the onnxruntime script");
        assert!(
            out.status.success(),
            "ort_bench.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    });

    let daemons: Vec<DaemonRun> = if daemon {
        paths
            .iter()
            .map(|&p| daemon_throughput(model, messages, 1, max_batch, p))
            .collect()
    } else {
        Vec::new()
    };
    let daemon2 = daemon.then(|| daemon_throughput(model, messages, 2, max_batch, paths[0]));

    // The table: a row per kernel, ratios to onnxruntime in brackets.
    let ort_ms = |name: &str| ort_result.as_ref().and_then(|r| r["shapes"][name].as_f64());
    let ort_msgs = ort_result
        .as_ref()
        .and_then(|r| r["messages_per_s"].as_f64());
    let ratio = |x: Option<f64>| x.map_or(String::new(), |r| format!(" ({r:.2})"));
    print!("| engine |");
    for (name, _, _) in shapes {
        print!(" {name} ms |");
    }
    println!(
        " {} messages ({windows_total} windows), msg/s |",
        messages.len()
    );
    println!("|---|{}---|", "---|".repeat(shapes.len()));
    print!("| onnxruntime int8 |");
    for (name, _, _) in shapes {
        print!(
            " {} |",
            ort_ms(name).map_or("–".into(), |o| format!("{o:.2}"))
        );
    }
    println!(
        " {} (bare model) |",
        ort_msgs.map_or("–".into(), |o| format!("{o:.1}"))
    );
    for r in &runs {
        print!("| {} ({}) |", r.path.name(), r.packed_mib_label());
        for (ix, (name, _, _)) in shapes.iter().enumerate() {
            let ms = r.shapes[ix].2;
            print!(" {ms:.2}{} |", ratio(ort_ms(name).map(|o| ms / o)));
        }
        println!(
            " {:.1}{} |",
            r.msgs_per_s,
            ratio(ort_msgs.map(|o| o / r.msgs_per_s))
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
        "ort": ort_result,
        "paths": runs.iter().map(|r| json!({
            "kernel": r.path.name(),
            "matrices_on": r.kernels,
            "packed_weight_mib": r.packed_mib,
            "shapes": r.shapes.iter().map(|(name, _, ms)| json!({"shape": name, "anotador_ms": ms, "ort_ms": ort_ms(name)})).collect::<Vec<_>>(),
            "engine_messages_per_s": r.msgs_per_s,
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
