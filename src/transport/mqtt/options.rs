//! The client's connection options, from the `[broker]` section: credentials, TLS
//! through rustls with the `ring` provider, and what the daemon tells the broker
//! about itself (how many messages and how large a packet it takes, its last will).

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::LastWill;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::MqttOptions;
use rumqttc::{TlsConfiguration, Transport};

use crate::config::Broker;

#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
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

/// What the daemon announces about itself when it connects.
pub struct Session {
    /// Unacknowledged messages the broker may send (MQTT 5 Receive Maximum).
    pub receive_maximum: usize,
    /// The largest packet the daemon reads (MQTT 5 Maximum Packet Size).
    pub max_packet_bytes: usize,
    /// The retained status the broker publishes if the connection dies.
    pub will_topic: String,
    pub will_payload: Vec<u8>,
}

/// MQTT 5 options. Version 5 for one reason above all: Receive Maximum, which
/// tells the broker how many unacknowledged messages it may send us. With 3.1.1 the
/// broker's own in-flight setting decides (Mosquitto 2 sends far more than its
/// documented 20), and the backlog would pile up in the daemon instead of the broker.
/// Where the daemon's client connects: the external broker's `[broker]` host and
/// port, or the embedded one's address and, where it asks for them, the daemon's
/// own credentials for this run (`broker::auth`).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
}

pub fn options(
    broker: &Broker,
    endpoint: &Endpoint,
    session: Session,
) -> Result<MqttOptions, OptionsError> {
    let b = broker;
    let mut opts = MqttOptions::new(&b.client_id, &endpoint.host, endpoint.port);
    opts.set_keep_alive(Duration::from_secs(b.keep_alive_s.max(5)));
    // Persistent session + manual acks: an input is acknowledged only once its
    // result is handed to the client, and a restarted daemon gets what it had not
    // acknowledged.
    opts.set_clean_start(b.clean_session);
    if !b.clean_session {
        opts.set_session_expiry_interval(Some(b.session_expiry_s));
    }
    opts.set_manual_acks(true);
    let queue = u16::try_from(session.receive_maximum).unwrap_or(u16::MAX);
    opts.set_receive_maximum(Some(queue));
    // rumqttc sizes its table of our unacknowledged publishes by this limit up front,
    // and its default (65,535 slots) is 14 MiB: most of an idle daemon's heap. The
    // broker's CONNACK lowers it further (Mosquitto: 20); beyond it rumqttc holds
    // publishes back until acks come, which is flow control, not loss.
    opts.set_outgoing_inflight_upper_limit(outgoing_inflight(session.receive_maximum));
    // The receive cap, not the payload cap: a broker drops a message larger than
    // this unseen, so it must be far above the largest payload the daemon answers.
    let max = u32::try_from(session.max_packet_bytes).unwrap_or(u32::MAX);
    opts.set_max_packet_size(Some(max));
    opts.set_last_will(LastWill::new(
        session.will_topic,
        session.will_payload,
        QoS::AtLeastOnce,
        true,
        None,
    ));
    if let Some((user, password)) = &endpoint.credentials {
        opts.set_credentials(user, password);
    } else if let Some(user) = &b.username {
        let password = b
            .password()
            .map_err(OptionsError::Password)?
            .unwrap_or_default();
        opts.set_credentials(user, password);
    }
    if let Some(tls) = &b.tls {
        install_crypto_provider();
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| OptionsError::TlsFile {
                path: p.display().to_string(),
                source,
            })
        };
        let ca = read(&tls.ca_file)?;
        let client_auth = match (&tls.client_cert, &tls.client_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => {
                return Err(OptionsError::Tls(
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
