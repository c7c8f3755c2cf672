//! The embedded broker (`[broker.embedded]`): an MQTT 3.1.1 and 5 broker on the
//! daemon's own tokio runtime, for a device that has no broker. The daemon then
//! connects to it over loopback exactly as to an external one (same client, same
//! persistent session, same acknowledgements): nothing in delivery knows which.
//!
//! It is [mqtt5](https://crates.io/crates/mqtt5)'s broker. What the daemon relies on
//! (Receive Maximum honoured, PUBACKs in any order, persistent sessions, `$share`,
//! retained messages, wills, 3.1.1 and 5 on one port) is tested against it in
//! `tests/embedded.rs`.
//!
//! Durability with `data_dir`: sessions (subscriptions) are written and fsynced
//! before they are acknowledged, and so is every QoS 1/2 publish: mqtt5 as patched
//! in vendor/mqtt5 (ANOTADOR.md there) routes it to its subscribers' stored queues
//! and sends the PUBACK only once those rows are written (group-committed with
//! whatever else arrived meanwhile). A killed daemon, whose broker dies with it,
//! so loses nothing it acknowledged; `sync = "always"` also fsyncs each write,
//! for a power cut (docs/broker.md: "The embedded broker").

pub mod auth;
pub mod tls;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mqtt5::broker::config::{StorageBackend, StorageConfig, TlsConfig};
use mqtt5::broker::{BrokerConfig, BrokerShutdownHandle, MqttBroker};
use tokio::task::JoinHandle;

use crate::config::{Daemon, Embedded, SyncWrites};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded broker: cannot listen on {listen}: {reason}")]
    Start { listen: SocketAddr, reason: String },
    #[error("embedded broker: {0}")]
    Run(String),
}

/// Bytes the broker may add to a message it forwards (a subscription
/// identifier, the packet header growing by a byte): the broker's own cap sits
/// this far below the daemon's, so that everything it accepts reaches the daemon.
const FORWARD_HEADROOM: usize = 64;

/// A running embedded broker.
pub struct Broker {
    /// Where it listens (the port chosen when `listen` asked for port 0).
    pub address: SocketAddr,
    /// The daemon's own user and this run's secret, where clients must authenticate.
    credentials: Option<(String, String)>,
    /// Who may connect, replaced on SIGHUP; `None` where anyone may.
    access: Option<Arc<auth::Access>>,
    /// The TLS listener, whose certificates SIGHUP replaces.
    tls: Option<tls::Listener>,
    shutdown: BrokerShutdownHandle,
    task: JoinHandle<()>,
}

impl Broker {
    /// Binds `config.listen`, recovers the sessions in `data_dir` and starts
    /// accepting. Returns once clients can connect.
    pub async fn start(config: &Embedded, daemon: &Daemon) -> Result<Broker, BrokerError> {
        let storage = match &config.data_dir {
            Some(dir) => StorageConfig::new()
                .with_backend(StorageBackend::File)
                .with_base_dir(dir.clone())
                .with_write_through(true, config.sync == SyncWrites::Always),
            None => StorageConfig::new().with_backend(StorageBackend::Memory),
        }
        // Memory-only still needs the storage layer: it is where a persistent
        // session's messages wait while its client is away.
        .with_persistence(true)
        .with_max_queued_messages_per_client(config.max_queued_messages)
        .with_max_queued_bytes_per_client(config.max_queued_bytes);
        let mut broker_config = BrokerConfig::new()
            .with_bind_address(config.listen)
            .with_max_clients(config.max_clients)
            .with_server_receive_maximum(config.max_inflight)
            .with_max_packet_size(daemon.max_packet_bytes.saturating_sub(FORWARD_HEADROOM))
            .with_max_retained_messages(config.max_retained_messages)
            .with_max_retained_message_size(daemon.max_packet_bytes)
            .with_storage(storage);
        // Topic aliases let a publisher send a packet smaller than the one the
        // broker forwards (with the whole topic), which could then exceed the
        // daemon's Maximum Packet Size and be dropped unseen.
        broker_config.topic_alias_maximum = 0;
        if let Some(addr) = config.tls_listen {
            let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) else {
                unreachable!("config validation: tls_listen needs cert_file and key_file");
            };
            let mut tls = TlsConfig::new(cert.clone(), key.clone()).with_bind_address(addr);
            if let Some(ca) = &config.client_ca_file {
                tls = tls.with_ca_file(ca.clone()).with_require_client_cert(true);
            }
            broker_config = broker_config.with_tls(tls);
        }
        let anonymous = config
            .allow_anonymous
            .unwrap_or(config.password_file.is_none());
        let start_error = |reason: String| BrokerError::Start {
            listen: config.listen,
            reason,
        };
        let users = auth::users(config).await.map_err(start_error)?;
        let mut broker = MqttBroker::with_config(broker_config)
            .await
            .map_err(|e| start_error(e.to_string()))?;
        let tls = match (config.tls_listen, broker.tls_acceptor_handle()) {
            (Some(configured), Some(handle)) => Some(tls::Listener {
                handle,
                mutual: config.client_ca_file.is_some(),
                configured,
            }),
            _ => None,
        };
        let (access, credentials) = match users {
            Some(users) => {
                let secret = auth::daemon_secret().map_err(|e| start_error(e.to_string()))?;
                let access = Arc::new(auth::Access::new(users, secret.clone()));
                broker = broker.with_auth_provider(access.clone());
                (Some(access), Some((auth::DAEMON_USER.to_string(), secret)))
            }
            None => (None, None),
        };
        let address = broker
            .local_addr()
            .ok_or_else(|| BrokerError::Run("no listening socket".into()))?;
        let tls_address = broker.tls_local_addr();
        let shutdown = broker.shutdown_handle();
        let mut ready = broker.ready_receiver();
        let (failed_tx, failed) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            if let Err(e) = broker.run().await {
                log::error!("embedded broker stopped: {e}");
                let _ = failed_tx.send(e.to_string());
            }
        });
        // Sessions in data_dir are recovered before the broker accepts anyone.
        tokio::select! {
            ok = ready.wait_for(|r| *r) => {
                ok.map_err(|_| BrokerError::Run("stopped while starting".into()))?;
            }
            Ok(reason) = failed => return Err(BrokerError::Run(reason)),
        }
        let storage = match &config.data_dir {
            Some(dir) => format!(
                "sessions and messages written to {} before they are acknowledged{}",
                dir.display(),
                if config.sync == SyncWrites::Always {
                    ", fsynced"
                } else {
                    ""
                }
            ),
            None => "in memory only".into(),
        };
        let who = match (&config.password_file, anonymous) {
            (Some(f), false) => format!("users of {}", f.display()),
            (Some(f), true) => format!("users of {} and anonymous clients", f.display()),
            (None, _) => "anonymous clients".into(),
        };
        let rights = match &config.acl_file {
            Some(f) => format!(", rights from {}", f.display()),
            None => String::new(),
        };
        log::info!(
            "embedded broker listening on {address} (MQTT 3.1.1 and 5; {storage}; {who}{rights})"
        );
        if let Some(tls) = tls_address {
            log::info!(
                "embedded broker listening for TLS on {tls} ({})",
                if config.client_ca_file.is_some() {
                    "client certificates required"
                } else {
                    "server certificate only"
                }
            );
        }
        let open =
            !address.ip().is_loopback() || tls_address.is_some_and(|a| !a.ip().is_loopback());
        if anonymous && open {
            log::warn!(
                "embedded broker: allow_anonymous = true on {address}: any client that reaches it can read every message and publish into every route"
            );
        }
        Ok(Broker {
            address,
            credentials,
            access,
            tls,
            shutdown,
            task,
        })
    }

    /// Where the daemon's own client connects: the bound address, with loopback
    /// for an unspecified one (`0.0.0.0` listens everywhere, but is no
    /// destination).
    pub fn client_address(&self) -> (String, u16) {
        let ip = match self.address.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        (ip.to_string(), self.address.port())
    }

    /// The user and password the daemon's own client connects with, where the broker
    /// asks for them (`password_file` or `acl_file`); see [`auth`].
    pub fn client_credentials(&self) -> Option<(String, String)> {
        self.credentials.clone()
    }

    /// Who may connect and the TLS certificates, for SIGHUP ([`Reloadable::reload`]).
    pub fn reloadable(&self) -> Reloadable {
        Reloadable {
            access: self.access.clone(),
            tls: self.tls.clone(),
        }
    }

    /// Stops accepting, closes the connections and writes out what is pending in
    /// `data_dir`; waits at most `within`.
    pub async fn stop(self, within: Duration) {
        self.shutdown.shutdown();
        let mut task = self.task;
        if tokio::time::timeout(within, &mut task).await.is_err() {
            log::warn!("embedded broker did not stop within {within:?}");
            task.abort();
        }
    }
}

/// What SIGHUP replaces in the running embedded broker: its users and rights, and
/// the TLS listener's certificates.
#[derive(Clone)]
pub struct Reloadable {
    access: Option<Arc<auth::Access>>,
    tls: Option<tls::Listener>,
}

impl Reloadable {
    /// SIGHUP: reads `password_file`, `acl_file` and the TLS listener's `cert_file`,
    /// `key_file` and `client_ca_file` again from the reloaded `config`. All or
    /// nothing: a file that fails its check keeps every one in force (and says why).
    /// Turning authentication or TLS on or off, moving the TLS listener or switching
    /// client certificates on or off needs a restart.
    pub async fn reload(&self, config: &Embedded) -> Result<(), String> {
        tls::Listener::check_unchanged(self.tls.as_ref(), config)?;
        let tls_config =
            tls::server_config(config).map_err(|(key, why)| format!("{key}: {why}"))?;
        let users = match &self.access {
            None if config.password_file.is_some() || config.acl_file.is_some() => {
                return Err("password_file / acl_file added: restart the daemon to apply".into())
            }
            None => None,
            Some(_) => match auth::users(config).await? {
                Some(users) => Some(users),
                None => {
                    return Err(
                        "password_file and acl_file removed: restart the daemon to apply".into(),
                    )
                }
            },
        };
        let mut read = Vec::new();
        if let (Some(access), Some(users)) = (&self.access, users) {
            access.replace(users);
            read.push("users and rights");
        }
        if let (Some(listener), Some(tls_config)) = (&self.tls, tls_config) {
            listener.handle.replace(Arc::new(tls_config));
            read.push("TLS certificates");
        }
        if !read.is_empty() {
            log::info!("embedded broker: {} read again", read.join(" and "));
        }
        Ok(())
    }
}
