//! MQTT at the edge: connection options (credentials, TLS through rustls with the
//! `ring` provider), topic filters and templates. The event loop itself lives in
//! `daemon`, which wires transport to the pipeline.

pub mod topic;

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::LastWill;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::MqttOptions;
use rumqttc::{TlsConfiguration, Transport};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("broker password: {0}")]
    Password(std::io::Error),
    #[error("TLS: cannot read {path}: {source}")]
    TlsFile {
        path: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
}

/// The payload of the retained status topic's last will.
pub fn offline_payload(name: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"status": "offline", "name": name})).unwrap()
}

pub fn status_topic(config: &Config) -> String {
    config
        .daemon
        .status_topic
        .replace("{name}", &config.daemon.name)
}

pub fn stats_topic(config: &Config) -> String {
    config
        .daemon
        .stats_topic
        .replace("{name}", &config.daemon.name)
}

/// MQTT 5 options. Version 5 for one reason above all: Receive Maximum, which
/// tells the broker how many unacknowledged messages it may send us. With 3.1.1 the
/// broker's own in-flight setting decides (Mosquitto 2 sends far more than its
/// documented 20), and the backlog would pile up in the daemon instead of the broker.
pub fn options(config: &Config) -> Result<MqttOptions, TransportError> {
    let b = &config.broker;
    let mut opts = MqttOptions::new(&b.client_id, &b.host, b.port);
    opts.set_keep_alive(Duration::from_secs(b.keep_alive_s.max(5)));
    // Persistent session + manual acks: an input is acknowledged only once its
    // result is handed to the client, and a restarted daemon gets what it had not
    // acknowledged.
    opts.set_clean_start(b.clean_session);
    if !b.clean_session {
        opts.set_session_expiry_interval(Some(b.session_expiry_s));
    }
    opts.set_manual_acks(true);
    let queue = u16::try_from(config.daemon.queue).unwrap_or(u16::MAX);
    opts.set_receive_maximum(Some(queue));
    // rumqttc sizes its table of our unacknowledged publishes by this limit up front,
    // and its default (65,535 slots) is 14 MiB: most of an idle daemon's heap. The
    // broker's CONNACK lowers it further (Mosquitto: 20); beyond it rumqttc holds
    // publishes back until acks come, which is flow control, not loss.
    opts.set_outgoing_inflight_upper_limit(outgoing_inflight(config.daemon.queue));
    let max = config.daemon.max_payload_bytes.max(1024) + 4096;
    opts.set_max_packet_size(Some(max as u32));
    opts.set_last_will(LastWill::new(
        status_topic(config),
        offline_payload(&config.daemon.name),
        QoS::AtLeastOnce,
        true,
        None,
    ));
    if let Some(user) = &b.username {
        let password = config
            .password()
            .map_err(TransportError::Password)?
            .unwrap_or_default();
        opts.set_credentials(user, password);
    }
    if let Some(tls) = &b.tls {
        install_crypto_provider();
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| TransportError::TlsFile {
                path: p.display().to_string(),
                source,
            })
        };
        let ca = read(&tls.ca_file)?;
        let client_auth = match (&tls.client_cert, &tls.client_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => {
                return Err(TransportError::Tls(
                    "client_cert and client_key go together".into(),
                ))
            }
        };
        opts.set_transport(Transport::Tls(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth,
        }));
    }
    Ok(opts)
}

/// One result or error publish per queued message, plus status and stats.
pub fn outgoing_inflight(queue: usize) -> u16 {
    u16::try_from(queue.saturating_mul(2).saturating_add(16)).unwrap_or(u16::MAX)
}

/// rustls needs one process-wide crypto provider; ring builds for armv7 where
/// aws-lc does not.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Jittered exponential backoff: full jitter over `[min, min·2^attempt]`, capped.
pub fn backoff(attempt: u32, min_ms: u64, max_ms: u64, seed: u64) -> Duration {
    let ceiling = min_ms
        .saturating_mul(1u64 << attempt.min(20))
        .min(max_ms)
        .max(min_ms);
    // splitmix64 of the seed: cheap, and no RNG crate for one number.
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    Duration::from_millis(min_ms + z % (ceiling - min_ms + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_within_bounds() {
        for attempt in 0..30 {
            for seed in 0..50 {
                let d = backoff(attempt, 100, 5_000, seed).as_millis() as u64;
                let ceiling = (100u64 << attempt.min(20)).min(5_000);
                assert!((100..=ceiling).contains(&d), "attempt {attempt}: {d}");
            }
        }
        let late: Vec<u64> = (0..50)
            .map(|s| backoff(10, 100, 5_000, s).as_millis() as u64)
            .collect();
        assert!(
            late.iter().any(|&d| d > 2_000),
            "later attempts wait longer"
        );
        assert!(
            late.iter().collect::<std::collections::HashSet<_>>().len() > 10,
            "jittered"
        );
    }
}
