//! Fault suite against a real Mosquitto, bounded in count and time: the daemon
//! SIGKILLed at several points of a 5,000-message QoS 1 stream, the broker
//! restarted, the network path cut for 30 s, SIGTERM under load. Every input must be
//! answered at least once; duplicates are counted and reported, losses must be 0.
//!
//! `ANOTADOR_FAULT_CUT_S` shortens the network cut (default 30 s).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

/// Answers seen per input id, from results on `out/`.
#[derive(Default)]
struct Tally(HashMap<u64, usize>);

impl Tally {
    fn add(&mut self, got: &[(String, serde_json::Value)]) {
        for (t, v) in got {
            if t.starts_with("out/") {
                *self.0.entry(v["id"].as_u64().unwrap()).or_default() += 1;
            }
        }
    }

    fn pump(&mut self, device: &Device, timeout: Duration, until: usize) {
        let mut seen = self.0.len();
        let got = device.collect(timeout, |g| {
            let new = g
                .iter()
                .filter(|(t, v)| {
                    t.starts_with("out/")
                        && !self.0.contains_key(&v["id"].as_u64().unwrap_or(u64::MAX))
                })
                .map(|(_, v)| v["id"].as_u64())
                .collect::<std::collections::HashSet<_>>()
                .len();
            seen = self.0.len() + new;
            seen >= until
        });
        self.add(&got);
    }

    fn report(&self, what: &str, total: usize) -> usize {
        let lost = (0..total as u64)
            .filter(|i| !self.0.contains_key(i))
            .count();
        let duplicates: usize = self.0.values().map(|n| n - 1).sum();
        println!(
            "{what}: sent {total}, answered {}, duplicated {duplicates}, lost {lost}",
            self.0.len()
        );

        lost
    }
}

fn publish_stream(device: &Device, from: usize, to: usize) {
    for i in from..to {
        device.publish(
            "in/ner/f",
            format!(r#"{{"id": {i}, "text": "Mensaje {i}: la ONU se reunió en Lima."}}"#),
        );
    }
}

#[test]
fn sigkill_at_three_points_of_5000_messages_loses_nothing() {
    let broker = start_broker();
    let dir = TempDir::new("kill");
    let config = write_config(&dir.0, broker.port, "fault-kill", "");
    let device = Device::connect(broker.port, "kill-device");
    let total = 5000;
    let mut daemon = Daemon::start(&config);
    wait_online(&device);
    publish_stream(&device, 0, total);
    let mut tally = Tally::default();
    // Three kill points drawn from a seeded generator (printed, so a failure can be
    // replayed with ANOTADOR_FAULT_SEED).
    let seed: u64 = std::env::var("ANOTADOR_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261126);
    let mut x = seed;
    let mut points: Vec<usize> = (0..3)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            i * 1500 + 200 + (x % 1200) as usize
        })
        .collect();
    points.sort();
    println!("SIGKILL after {points:?} answers (seed {seed})");
    for kill_at in points {
        tally.pump(&device, Duration::from_secs(120), kill_at);
        daemon.kill();
        daemon = Daemon::start(&config);
    }
    tally.pump(&device, Duration::from_secs(180), total);
    // Late duplicates still in flight are counted too.
    tally.add(&device.collect(Duration::from_millis(500), |_| false));
    assert_eq!(tally.report("SIGKILL x3", total), 0);
}

#[test]
fn broker_restart_loses_nothing() {
    let mut broker = start_broker_with(
        "persistence true\npersistence_location PLACEHOLDER/\nautosave_interval 1\n",
    );
    // Point persistence at the broker's own temp folder.
    let conf = broker.dir.0.join("mosquitto.conf");
    let text = std::fs::read_to_string(&conf)
        .unwrap()
        .replace("PLACEHOLDER", &broker.dir.0.display().to_string());
    std::fs::write(&conf, text.replace("persistence false\n", "")).unwrap();
    broker.restart();
    let dir = TempDir::new("brestart");
    let config = write_config(&dir.0, broker.port, "fault-broker", "");
    let device = Device::connect_persistent(broker.port, "broker-device");
    let _daemon = Daemon::start(&config);
    wait_online(&device);
    let total = 1500;
    publish_stream(&device, 0, total);
    let mut tally = Tally::default();
    tally.pump(&device, Duration::from_secs(60), 300);
    broker.restart();
    tally.pump(&device, Duration::from_secs(180), total);
    tally.add(&device.collect(Duration::from_millis(500), |_| false));
    assert_eq!(tally.report("broker restart", total), 0);
}

#[test]
fn network_cut_for_30_s_loses_nothing() {
    let cut_s: u64 = std::env::var("ANOTADOR_FAULT_CUT_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let broker = start_broker();
    let proxy = Proxy::start(broker.port);
    let dir = TempDir::new("cut");
    // The daemon reaches the broker through the proxy; the device directly.
    // A tiny backlog budget: the broker's whole backlog arrives after the cut, so this
    // also exercises deferring and fetching again by session resume.
    let config = write_config(&dir.0, proxy.port, "fault-cut", "backlog_bytes = 1024");
    let device = Device::connect(broker.port, "cut-device");
    let daemon = Daemon::start(&config);
    wait_online(&device);
    let total = 1000;
    publish_stream(&device, 0, total);
    let mut tally = Tally::default();
    tally.pump(&device, Duration::from_secs(60), 200);
    proxy.cut();
    std::thread::sleep(Duration::from_secs(cut_s));
    proxy.restore();
    tally.pump(&device, Duration::from_secs(120), total);
    tally.add(&device.collect(Duration::from_millis(500), |_| false));
    let log = daemon.stderr();
    assert!(
        log.contains("retrying in"),
        "the daemon backed off while cut off:\n{log}"
    );
    assert_eq!(tally.report(&format!("network cut {cut_s} s"), total), 0);
}

#[test]
fn sigterm_under_load_finishes_what_it_took() {
    let broker = start_broker();
    let dir = TempDir::new("term");
    let config = write_config(&dir.0, broker.port, "fault-term", "");
    let device = Device::connect(broker.port, "term-device");
    let mut daemon = Daemon::start(&config);
    wait_online(&device);
    let total = 2000;
    publish_stream(&device, 0, total);
    let mut tally = Tally::default();
    tally.pump(&device, Duration::from_secs(60), 400);
    let status = daemon.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    let log = daemon.stderr();
    assert!(
        !log.contains("shutdown timeout"),
        "in-flight work finished within the timeout:\n{log}"
    );
    let _daemon = Daemon::start(&config);
    tally.pump(&device, Duration::from_secs(120), total);
    tally.add(&device.collect(Duration::from_millis(500), |_| false));
    assert_eq!(tally.report("SIGTERM under load", total), 0);
}

#[test]
fn flood_keeps_memory_within_the_configured_budget() {
    let broker = start_broker();
    let dir = TempDir::new("flood");
    // 8 in flight × 2 KiB payloads + a 128 KiB waiting list.
    let config = write_config(&dir.0, broker.port, "fault-flood", "backlog_bytes = 131072");
    let device = Device::connect(broker.port, "flood-device");
    let daemon = Daemon::start(&config);
    wait_online(&device);
    let pid = daemon.0.id();
    // Warm the engine states and allocator first: the baseline is a daemon at work.
    publish_stream(&device, 0, 50);
    let mut tally = Tally::default();
    tally.pump(&device, Duration::from_secs(60), 50);
    let (warm, _) = rss_of(pid).unwrap();
    let total = 4000;
    publish_stream(&device, 50, total);
    let mut peak = warm;
    // RSS sampled every 200 answers or 2 s; given up only after a minute with none.
    let mut progress = std::time::Instant::now();
    while tally.0.len() < total && progress.elapsed() < Duration::from_secs(60) {
        let before = tally.0.len();
        tally.pump(&device, Duration::from_secs(2), (before + 200).min(total));
        peak = peak.max(rss_of(pid).unwrap().0);
        if tally.0.len() > before {
            progress = std::time::Instant::now();
        }
    }
    let grew = peak.saturating_sub(warm) as f64 / 1048576.0;
    println!(
        "flood: RSS after warm-up {:.1} MiB, peak {:.1} MiB (+{grew:.1} MiB)",
        warm as f64 / 1048576.0,
        peak as f64 / 1048576.0
    );
    assert_eq!(tally.report("flood", total), 0);
    // The message budget is 8 × 2 KiB + 128 KiB; allow 8 MiB for allocator and
    // runtime slack. Holding the broker's 4,000-message backlog would not fit.
    assert!(grew < 8.0, "RSS grew by {grew:.1} MiB under the flood");
}
