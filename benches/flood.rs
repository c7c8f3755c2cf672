//! Flood and soak benchmark (not a test). The daemon's RSS is sampled throughout.
//!
//!     cargo bench --bench flood -- [MODEL_DIR] [MESSAGES] [OUTSTANDING] [CSV]
//!
//! Flood (default): MESSAGES (10,000) published as fast as the device can, far
//! faster than inference. Soak: with OUTSTANDING > 0 the device keeps at most that
//! many messages unanswered, a steady load for long runs (e.g. 200,000 messages).
//! Reports RSS after start-up (the baseline, same process), after warm-up (10 % of
//! the messages), at the end and at peak, throughput and latency percentiles, and
//! checks that every message was answered. CSV: `seconds,answered,rss_mib` every 2 s.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;

const SENTENCES: [&str; 6] = [
    "El Real Madrid ganó en Sevilla ante el Betis, según informó EFE.",
    "Gabriel García Márquez nació en Aracataca (Colombia) en 1927.",
    "La Comisión Europea anunció ayer en Bruselas nuevas medidas para el sector agrícola.",
    "El Banco Central de Chile subió la tasa al 11,25 % el 14 de octubre de 2022.",
    "La ONU y la OTAN se reunieron en Nueva York con representantes de Perú y Argentina.",
    "Pedro Sánchez viajó a Barcelona para reunirse con la alcaldesa Ada Colau.",
];

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let model = args.first().cloned().unwrap_or_else(|| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/ner-es")
            .display()
            .to_string()
    });
    // The config lives in a temporary folder: give it an absolute bundle path.
    let model = std::fs::canonicalize(&model)
        .map(|p| p.display().to_string())
        .unwrap_or(model);
    let total: usize = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let outstanding: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(0);
    let csv_path = args.get(3).cloned();

    let broker = start_broker_with(&format!("max_queued_messages {}\n", total * 2));
    let dir = TempDir::new("flood");
    let config = bench_config(&dir, broker.port, &model, "workers = 1");
    let device = Device::connect(broker.port, "flood-device");
    let daemon = Daemon::start(&config);
    let pid = daemon.0.id();
    wait_online(&device);
    std::thread::sleep(Duration::from_millis(500));
    let (baseline, _) = rss_of(pid).expect("/proc");

    let started = Instant::now();
    let mut published = 0usize;
    let publish_up_to = |published: &mut usize, limit: usize| {
        while *published < limit.min(total) {
            let text = SENTENCES[*published % SENTENCES.len()];
            device.publish(
                "in/flood",
                format!(r#"{{"id": {}, "text": "{text}"}}"#, *published),
            );
            *published += 1;
        }
    };
    if outstanding == 0 {
        publish_up_to(&mut published, total);
    }
    let published_in = started.elapsed();

    let mut seen = HashSet::new();
    let mut outcomes = 0usize;
    let mut peak_sampled = baseline;
    let mut warm = None;
    let mut latencies = Vec::new();
    let mut csv = String::from("seconds,answered,rss_mib\n");
    let mut next_sample = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(4 * 3600);
    while seen.len() < total && Instant::now() < deadline {
        if outstanding > 0 {
            publish_up_to(&mut published, seen.len() + outstanding);
        }
        if let Ok((topic, payload, _)) = device.rx.recv_timeout(Duration::from_millis(100)) {
            if topic.starts_with("out/") || topic.starts_with("err/") {
                let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                outcomes += 1;
                seen.insert(v["id"].as_u64().unwrap());
                if let Some(t) = v["timings_ms"]["inference_ms"].as_f64() {
                    if latencies.len() < 100_000 {
                        latencies.push(t);
                    }
                }
            }
        }
        if warm.is_none() && seen.len() >= total / 10 {
            warm = rss_of(pid).map(|(rss, _)| rss);
        }
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(2);
            if let Some((rss, _)) = rss_of(pid) {
                peak_sampled = peak_sampled.max(rss);
                csv.push_str(&format!(
                    "{:.1},{},{:.2}\n",
                    started.elapsed().as_secs_f64(),
                    seen.len(),
                    rss as f64 / 1048576.0
                ));
            }
        }
    }
    let elapsed = started.elapsed();
    let (end_rss, hwm) = rss_of(pid).expect("/proc");
    if let Some(path) = &csv_path {
        std::fs::write(path, &csv).unwrap();
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
    let warm = warm.unwrap_or(baseline);
    let mode = if outstanding == 0 {
        "flood".to_string()
    } else {
        format!("soak (≤ {outstanding} unanswered)")
    };
    println!("{mode}: {total} messages on {model}");
    println!(
        "  device published {} in {:.2} s",
        if outstanding == 0 { total } else { published },
        published_in.as_secs_f64()
    );
    println!(
        "  answered {} distinct ({} outcomes, {} duplicates) in {:.1} s = {:.0} msg/s",
        seen.len(),
        outcomes,
        outcomes - seen.len(),
        elapsed.as_secs_f64(),
        seen.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  inference per message: p50 {:.2} ms, p95 {:.2} ms",
        pct(0.5),
        pct(0.95)
    );
    println!("  RSS after start-up (baseline): {:.1} MiB", mb(baseline));
    println!("  RSS after warm-up (10 %):      {:.1} MiB", mb(warm));
    println!(
        "  RSS at the end:                {:.1} MiB = {:+.1} % vs warm-up",
        mb(end_rss),
        100.0 * (end_rss as f64 / warm as f64 - 1.0)
    );
    println!(
        "  peak RSS (VmHWM):              {:.1} MiB = {:.2}x baseline",
        mb(hwm),
        hwm as f64 / baseline as f64
    );
    println!(
        "  peak sampled VmRSS:            {:.1} MiB",
        mb(peak_sampled)
    );
    assert_eq!(seen.len(), total, "every message answered");
}
