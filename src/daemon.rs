//! `anotador run`: the configured models served over MQTT, with the process's
//! signals wired in (SIGTERM / SIGINT: shut down; SIGHUP: reload) and the systemd
//! watchdog fed while no inference is stuck.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::{Config, ConfigError};
use crate::pool::Health;
use crate::service::Models;
use crate::transport::{mqtt, Signal};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Load(#[from] crate::Error),
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[cfg(feature = "broker")]
    #[error(transparent)]
    Broker(#[from] crate::transport::broker::BrokerError),
}

/// Loads the configuration at `path` and its models, then serves until SIGTERM.
pub fn run(path: &Path) -> Result<(), DaemonError> {
    let config = Config::load(path)?;
    let models = Models::load(&config, None)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let served = runtime.block_on(async {
        let health = Health::new();
        if let Some(interval) = crate::systemd::watchdog_interval() {
            tokio::spawn(feed_watchdog(interval, health.clone()));
        }
        let signals = signals()?;
        let (address, embedded) = broker(&config).await?;
        #[cfg(feature = "broker")]
        let signals = match &embedded {
            Some(b) => reload_broker_on_hup(signals, path.to_path_buf(), b.reloadable()),
            None => signals,
        };
        let served = mqtt::serve(path.to_path_buf(), config, address, models, health, signals)
            .await
            .map_err(DaemonError::from);
        // After the daemon's goodbye: its broker goes last. The whole stop stays
        // within shutdown_timeout_s + 1 s: the goodbye over loopback is quick.
        if let Some(embedded) = embedded {
            #[cfg(feature = "broker")]
            embedded.stop(Duration::from_millis(250)).await;
            #[cfg(not(feature = "broker"))]
            match embedded {}
        }
        served
    });
    // Nothing left to wait for: a task still pending is dropped, not awaited.
    runtime.shutdown_timeout(Duration::from_millis(100));
    served
}

#[cfg(feature = "broker")]
type Embedded = crate::transport::broker::Broker;
#[cfg(not(feature = "broker"))]
type Embedded = std::convert::Infallible;

/// The broker to connect to: the embedded one, started here (`[broker.embedded]`),
/// or the external one of `[broker]`.
async fn broker(config: &Config) -> Result<(mqtt::Endpoint, Option<Embedded>), DaemonError> {
    #[cfg(feature = "broker")]
    if let Some(embedded) = &config.broker.embedded {
        let broker = crate::transport::broker::Broker::start(embedded, &config.daemon).await?;
        let (host, port) = broker.client_address();
        let endpoint = mqtt::Endpoint {
            host,
            port,
            credentials: broker.client_credentials(),
        };
        return Ok((endpoint, Some(broker)));
    }
    let (host, port) = config.broker.address();
    Ok((
        mqtt::Endpoint {
            host,
            port,
            credentials: None,
        },
        None,
    ))
}

/// Passes the signals on, and on SIGHUP first has the embedded broker read its
/// password and ACL files again (the transport then reloads the rest). A bad file
/// fails the configuration's check there too, so both keep what they had.
#[cfg(feature = "broker")]
fn reload_broker_on_hup(
    mut signals: mpsc::UnboundedReceiver<Signal>,
    path: std::path::PathBuf,
    broker: crate::transport::broker::Reloadable,
) -> mpsc::UnboundedReceiver<Signal> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(signal) = signals.recv().await {
            if matches!(signal, Signal::Reload) {
                let outcome = match Config::load(&path) {
                    Ok(c) => match &c.broker.embedded {
                        Some(e) => broker.reload(e).await,
                        None => Ok(()),
                    },
                    Err(e) => Err(e.to_string()),
                };
                if let Err(why) = outcome {
                    log::error!(
                        "embedded broker: users, rights and certificates not reloaded, the ones in force stay: {why}"
                    );
                }
            }
            if tx.send(signal).is_err() {
                return;
            }
        }
    });
    rx
}

/// The process's signals as a stream the transport selects on.
fn signals() -> std::io::Result<mpsc::UnboundedReceiver<Signal>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let signal = tokio::select! {
                _ = term.recv() => Signal::Shutdown,
                _ = int.recv() => Signal::Shutdown,
                _ = hup.recv() => Signal::Reload,
            };
            if tx.send(signal).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Pings the systemd watchdog at half its interval, unless an inference has been
/// running longer than the interval: then the pings stop and systemd restarts us.
async fn feed_watchdog(interval: Duration, health: Arc<Health>) {
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tick.tick().await;
        if health.stuck(interval) {
            log::error!(
                "an inference has run for over {} ms: letting the watchdog restart the daemon",
                interval.as_millis()
            );
        } else {
            crate::systemd::notify("WATCHDOG=1");
        }
    }
}
