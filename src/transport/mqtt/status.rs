//! What the daemon says about itself: the retained status (`online` with its
//! models, `offline`) and the periodic counters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use serde_json::{json, Value};

use crate::service::Models;

/// The retained `online` status: who, since when, which models, and how the last
/// reload went.
pub fn online(name: &str, started: u64, models: &Models, reload: Option<&Value>) -> Vec<u8> {
    let models: BTreeMap<&String, Value> = models
        .loaded
        .iter()
        .map(|(key, l)| {
            let b = &l.bundle;
            let model = json!({
                "bundle": b.name,
                "path": b.dir,
                "task": b.config.task.as_str(),
                "labels": b.config.labels.len(),
                "engine": b.engine.info(),
            });
            (key, model)
        })
        .collect();
    let mut status = json!({
        "status": "online",
        "name": name,
        "version": env!("CARGO_PKG_VERSION"),
        "started": started,
        "models": models,
    });
    if let Some(reload) = reload {
        status["reload"] = reload.clone();
    }
    serde_json::to_vec(&status).expect("status serializes")
}

/// The retained status after a clean stop, and the last will.
pub fn offline(name: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"status": "offline", "name": name})).expect("status serializes")
}

/// Counters for the stats topic.
#[derive(Default)]
pub struct Stats {
    pub received: AtomicU64,
    /// Deliveries flagged DUP by the broker (redelivered after a reconnect).
    pub redelivered: AtomicU64,
    /// Messages left unacknowledged because the waiting list was full.
    pub deferred: AtomicU64,
    pub published: AtomicU64,
    pub results: AtomicU64,
    /// Messages taken and not yet answered.
    pub queue_depth: AtomicUsize,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Recent end-to-end latencies (ms), a bounded ring.
    latencies: Mutex<(Vec<f64>, usize)>,
}

const LATENCY_WINDOW: usize = 1024;

impl Stats {
    pub fn record(&self, error: Option<&'static str>, latency_ms: f64) {
        self.published.fetch_add(1, Ordering::Relaxed);
        match error {
            None => {
                self.results.fetch_add(1, Ordering::Relaxed);
            }
            Some(code) => *self.errors.lock().unwrap().entry(code).or_default() += 1,
        }
        let mut ring = self.latencies.lock().unwrap();
        let (values, next) = &mut *ring;
        if values.len() < LATENCY_WINDOW {
            values.push(latency_ms);
        } else {
            values[*next] = latency_ms;
        }
        *next = (*next + 1) % LATENCY_WINDOW;
    }

    fn snapshot(&self) -> Value {
        let mut l = self.latencies.lock().unwrap().0.clone();
        l.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            l.get(((l.len() as f64 - 1.0) * p).round() as usize)
                .copied()
        };
        json!({
            "received": self.received.load(Ordering::Relaxed),
            "redelivered": self.redelivered.load(Ordering::Relaxed),
            "deferred": self.deferred.load(Ordering::Relaxed),
            "published": self.published.load(Ordering::Relaxed),
            "results": self.results.load(Ordering::Relaxed),
            "errors": *self.errors.lock().unwrap(),
            "queue_depth": self.queue_depth.load(Ordering::Relaxed),
            "latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "window": l.len()},
            "rss_bytes": rss_bytes(),
        })
    }
}

pub use crate::memory::rss_bytes;

/// Publishes the counters every `every` (QoS 0: a lost sample is replaced by the next).
pub async fn publish_stats(client: AsyncClient, topic: String, every: Duration, stats: Arc<Stats>) {
    if topic.is_empty() {
        return;
    }
    let mut interval = tokio::time::interval(every);
    interval.tick().await;
    loop {
        interval.tick().await;
        let payload = serde_json::to_vec(&stats.snapshot()).expect("stats serialize");
        if client
            .publish(topic.clone(), QoS::AtMostOnce, false, payload)
            .await
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    /// The kernel's page size, as it reports it for this process's first mapping.
    fn kernel_page_size() -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let kb: u64 = smaps
            .lines()
            .find_map(|l| l.strip_prefix("KernelPageSize:"))
            .unwrap()
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap();
        kb * 1024
    }

    #[test]
    fn rss_counts_pages_of_the_kernels_size() {
        let rss = super::rss_bytes().expect("Linux /proc");
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        // Read a moment apart: allow a few pages of drift.
        let expected = pages * kernel_page_size();
        let drift = rss.abs_diff(expected) as f64 / expected as f64;
        assert!(
            drift < 0.05,
            "RSS {rss} B, but {pages} resident pages of {} B",
            kernel_page_size()
        );
    }
}
