//! What the embedded broker's durability costs (not a test):
//!
//!     cargo bench --bench broker -- [MESSAGES] [ROUNDS]
//!
//! A sensor publishes MESSAGES (2,000) QoS 1 messages of ~200 bytes with 20 in flight
//! (paho's default) to a reader on a persistent session that is connected and
//! acknowledging, as the daemon is. Messages per second from the first publish to
//! the last PUBACK, and to the last delivery, for: the embedded broker in memory, with
//! `data_dir` (each message written before its PUBACK, left to the kernel's write-back),
//! with `sync = "always"` (also fsynced), and Mosquitto with persistence on (a snapshot
//! every `autosave_interval`, 1,800 s by default: nothing written per message).
//! Configurations alternate within each round; medians of ROUNDS (3). The disk is the
//! one under the system's temporary folder; say which CPU and disk gave the figures.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use anotador::config::{Daemon as DaemonConfig, Embedded};
use anotador::transport::broker::Broker;
use common::*;
use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};

/// One broker under test, running until dropped.
enum Running {
    Embedded(tokio::runtime::Runtime, Option<Broker>),
    Mosquitto(common::Broker),
}

impl Running {
    fn port(&self) -> u16 {
        match self {
            Running::Embedded(_, broker) => broker.as_ref().unwrap().address.port(),
            Running::Mosquitto(b) => b.port,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Running::Embedded(runtime, broker) = self {
            if let Some(broker) = broker.take() {
                runtime.block_on(broker.stop(Duration::from_secs(5)));
            }
        }
    }
}

fn start(kind: &str, dir: &TempDir) -> Running {
    let data = dir.0.join(kind);
    let embedded = |extra: &str| {
        let toml = format!("listen = \"127.0.0.1:0\"\n{extra}");
        let config: Embedded = toml::from_str(&toml).unwrap();
        // Two workers, as the daemon's runtime has on a 2-core machine.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let broker = runtime
            .block_on(Broker::start(&config, &DaemonConfig::default()))
            .unwrap();
        Running::Embedded(runtime, Some(broker))
    };
    match kind {
        "embedded, memory" => embedded(""),
        "embedded, data_dir" => embedded(&format!("data_dir = \"{}\"", data.display())),
        "embedded, data_dir, sync = always" => embedded(&format!(
            "data_dir = \"{}\"\nsync = \"always\"",
            data.display()
        )),
        _ => {
            std::fs::create_dir_all(&data).unwrap();
            Running::Mosquitto(start_broker_with(&format!(
                "persistence true\npersistence_location {}/\n",
                data.display()
            )))
        }
    }
}

/// Seconds until every PUBACK, and until every delivery.
fn run(port: u16, total: usize, round: usize) -> (f64, f64) {
    let reader_id = format!("bench-reader-{round}");
    let mut opts = MqttOptions::new(&reader_id, "127.0.0.1", port);
    opts.set_clean_session(false);
    let (reader, mut connection) = Client::new(opts, 100);
    reader.subscribe("bench/#", QoS::AtLeastOnce).unwrap();
    let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
    let (delivered_tx, delivered) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut got = 0;
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Incoming::SubAck(_))) => {
                    let _ = subscribed_tx.send(());
                }
                Ok(Event::Incoming(Incoming::Publish(_))) => {
                    got += 1;
                    if got == total {
                        let _ = delivered_tx.send(Instant::now());
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("reader: {e}"),
            }
        }
    });
    subscribed.recv_timeout(Duration::from_secs(10)).unwrap();

    let mut opts = MqttOptions::new(format!("bench-sensor-{round}"), "127.0.0.1", port);
    opts.set_inflight(20);
    let (sensor, mut connection) = Client::new(opts, 100);
    let payload = "x".repeat(200);
    let started = Instant::now();
    let publisher = std::thread::spawn(move || {
        for i in 0..total {
            sensor
                .publish(
                    format!("bench/{}", i % 8),
                    QoS::AtLeastOnce,
                    false,
                    payload.clone(),
                )
                .unwrap();
        }
        sensor
    });
    let mut acked = 0;
    for event in connection.iter() {
        match event {
            Ok(Event::Incoming(Incoming::PubAck(_))) => {
                acked += 1;
                if acked == total {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("sensor: {e}"),
        }
    }
    let all_acked = started.elapsed().as_secs_f64();
    let sensor = publisher.join().unwrap();
    let last = delivered.recv_timeout(Duration::from_secs(120)).unwrap();
    let _ = sensor.disconnect();
    let _ = reader.disconnect();
    (all_acked, (last - started).as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let total: usize = args.first().and_then(|n| n.parse().ok()).unwrap_or(2_000);
    let rounds: usize = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(3);
    println!("CPU: {}", cpu_line());
    let dir = TempDir::new("broker-bench");
    println!(
        "disk: {} ({})",
        dir.0.display(),
        filesystem_of(&dir.0).unwrap_or_else(|| "unknown".into())
    );
    let kinds = [
        "embedded, memory",
        "embedded, data_dir",
        "embedded, data_dir, sync = always",
        "Mosquitto, persistence true (autosave_interval 1800 s)",
    ];
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); kinds.len()];
    for round in 0..rounds {
        for (i, kind) in kinds.iter().enumerate() {
            let running = start(kind, &dir);
            let (acked, delivered) = run(running.port(), total, round);
            results[i].0.push(total as f64 / acked);
            results[i].1.push(total as f64 / delivered);
        }
    }
    println!("\n{total} QoS 1 messages, 20 in flight, medians of {rounds} rounds");
    println!("| broker | PUBACKs/s | delivered/s | vs memory |");
    println!("|---|---|---|---|");
    let memory = median(results[0].0.clone());
    for (kind, (acked, delivered)) in kinds.iter().zip(results) {
        let acked = median(acked);
        println!(
            "| {kind} | {acked:.0} | {:.0} | {:.2} |",
            median(delivered),
            acked / memory
        );
    }
}

/// The CPU's model name and whether it has AVX-512, from /proc/cpuinfo.
fn cpu_line() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown");
    format!(
        "{model}, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

/// The device and type of the filesystem holding `path`, from /proc/mounts.
fn filesystem_of(path: &std::path::Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && path.starts_with(f[1]))
                .then(|| (f[1].len(), format!("{} {} on {}", f[0], f[2], f[1])))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, s)| s)
}
