//! MQTT at the edge: `anotador run`'s transport. [`serve`] waits on I/O (the
//! client, finished messages, timers, signals, a reload) and hands each event to
//! the session ([`state`]), which decides; [`Io`] carries the decisions out.
//!
//! - The loop never blocks: inference runs on worker threads, publishing in tasks.
//! - An input is acknowledged only after its one outcome (result or error) has been
//!   handed to the client at QoS 1, so a crash at any point leaves it
//!   unacknowledged and the broker redelivers it (at-least-once).
//! - At most `daemon.queue` messages are taken and unanswered at a time; the rest
//!   waits in a bounded list or at the broker: memory does not grow with the input rate.

pub mod ask;
mod backlog;
mod intake;
mod link;
mod options;
mod publisher;
pub mod state;
mod status;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::AsyncClient;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::pool::{Closed, Health};
use crate::service::{self, Models, Next};
use intake::{Answered, Intake};
use link::{Link, Polled};
use publisher::{Control, Ticket};
use state::{Action, Event, Limits, Mode, Session};
use status::Stats;

pub use options::{install_crypto_provider, options, outgoing_inflight, Endpoint, OptionsError};
pub use state::backoff;
pub use status::rss_bytes;

use super::Signal;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error(transparent)]
    Options(#[from] OptionsError),
    #[error(transparent)]
    Start(#[from] crate::Error),
}

/// Serves `models` over MQTT, through the broker at `address`, until a
/// [`Signal::Shutdown`]; `path` is read again on [`Signal::Reload`]. Returns within
/// `shutdown_timeout_s` + 1 s of the shutdown signal, whatever the broker does.
/// The broker may be external or the daemon's own ([`super::broker`]): the
/// client, and so delivery, is the same.
pub async fn serve(
    path: PathBuf,
    config: Config,
    address: Endpoint,
    models: Models,
    health: Arc<Health>,
    mut signals: mpsc::UnboundedReceiver<Signal>,
) -> Result<(), MqttError> {
    let mut session = Session::new(Limits::of(&config), seed());
    let mut io = Io::start(path, config, address, models, health)?;
    while session.mode() != Mode::Stopped {
        let wake = session.wake_at(Instant::now());
        let event = tokio::select! {
            Some(polled) = io.link.events.recv() => io.polled(polled, session.receiving()),
            Some(()) = io.done.recv() => Event::Finished,
            _ = sleep_until(wake), if wake.is_some() => Event::Tick,
            signal = signals.recv() => match signal {
                Some(Signal::Reload) => Event::ReloadRequested,
                Some(Signal::Shutdown) | None => Event::Shutdown,
            },
            Some(next) = io.reloaded.recv() => io.loaded(next),
        };
        for action in session.handle(event, Instant::now()) {
            io.act(action, &session);
        }
        io.stats
            .queue_depth
            .store(session.in_flight(), Ordering::Relaxed);
    }
    io.close();
    Ok(())
}

impl Limits {
    fn of(config: &Config) -> Limits {
        Limits {
            queue: config.daemon.queue,
            backlog_bytes: config.daemon.backlog_bytes,
            shutdown_timeout: Duration::from_secs(config.daemon.shutdown_timeout_s),
            reconnect_min_ms: config.broker.reconnect_min_ms,
            reconnect_max_ms: config.broker.reconnect_max_ms,
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

fn seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A received message and when it came (for the latency counters).
type Received = (Publish, Instant);

/// Everything the loop does I/O with, and the running configuration.
struct Io {
    path: PathBuf,
    config: Config,
    /// The broker's address, as connected to.
    address: Endpoint,
    health: Arc<Health>,
    link: Link,
    intake: Intake,
    stats: Arc<Stats>,
    /// A ticket's drop: one taken message is done.
    done: mpsc::UnboundedReceiver<()>,
    done_tx: mpsc::UnboundedSender<()>,
    outbox: mpsc::UnboundedSender<Control>,
    reloaded: mpsc::UnboundedReceiver<Result<Next<Answered>, String>>,
    reloaded_tx: mpsc::UnboundedSender<Result<Next<Answered>, String>>,
    /// A reload's outcome, between its arrival and the session's decision.
    pending: Option<Result<Next<Answered>, String>>,
    /// The last reload, for the status.
    last_reload: Option<serde_json::Value>,
    /// Filters of routes a reload removed: unsubscribed on every connection, in
    /// case the broker kept them in the session.
    retired: BTreeSet<String>,
    /// Pools a reload replaced, answering what they had taken.
    retiring: Vec<Closed>,
    started: u64,
    tasks: Vec<JoinHandle<()>>,
}

impl Io {
    fn start(
        path: PathBuf,
        config: Config,
        address: Endpoint,
        models: Models,
        health: Arc<Health>,
    ) -> Result<Io, MqttError> {
        let d = &config.daemon;
        let opts = options(
            &config.broker,
            &address,
            options::Session {
                receive_maximum: d.queue,
                max_packet_bytes: d.max_packet_bytes,
                will_topic: d.status_topic(),
                will_payload: status::offline(&d.name),
            },
        )?;
        let (client, eventloop) = AsyncClient::new(opts, outgoing_inflight(d.queue).into());
        let stats = Arc::new(Stats::default());
        let (deliveries, deliveries_rx) = mpsc::unbounded_channel();
        let (outbox, outbox_rx) = mpsc::unbounded_channel();
        let (done_tx, done) = mpsc::unbounded_channel();
        let (reloaded_tx, reloaded) = mpsc::unbounded_channel();
        let intake = Intake::start(&config, models, &health, deliveries)?;
        let every = Duration::from_secs(d.stats_interval_s.max(1));
        let tasks = vec![
            tokio::spawn(publisher::publish(
                client.clone(),
                deliveries_rx,
                stats.clone(),
            )),
            tokio::spawn(publisher::outbox(
                client.clone(),
                d.status_topic(),
                outbox_rx,
            )),
            tokio::spawn(status::publish_stats(
                client,
                d.stats_topic(),
                every,
                stats.clone(),
            )),
        ];
        Ok(Io {
            path,
            health,
            link: Link::spawn(eventloop),
            intake,
            stats,
            done,
            done_tx,
            outbox,
            reloaded,
            reloaded_tx,
            pending: None,
            last_reload: None,
            retired: BTreeSet::new(),
            retiring: Vec::new(),
            started: unix_now(),
            tasks,
            config,
            address,
        })
    }

    /// The session's view of what the client did.
    fn polled(&self, polled: Polled, receiving: bool) -> Event<Received> {
        match polled {
            Polled::ConnAck { session_present } => {
                let Endpoint { host, port, .. } = &self.address;
                log::info!("connected to {host}:{port} (session present: {session_present})");
                Event::Connected { session_present }
            }
            Polled::Publish(publish) => {
                if receiving {
                    self.stats.received.fetch_add(1, Ordering::Relaxed);
                    if publish.dup {
                        self.stats.redelivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let bytes = publish.payload.len() + publish.topic.len();
                Event::Message {
                    message: (publish, Instant::now()),
                    bytes,
                }
            }
            Polled::DisconnectSent => Event::DisconnectSent,
            Polled::Failed(error) => Event::ConnectionLost { error },
        }
    }

    fn loaded(&mut self, next: Result<Next<Answered>, String>) -> Event<Received> {
        let ok = next.is_ok();
        self.pending = Some(next);
        Event::Reloaded { ok }
    }

    fn control(&self, request: Control) {
        let _ = self.outbox.send(request);
    }

    fn online(&self) -> Vec<u8> {
        let name = &self.config.daemon.name;
        status::online(
            name,
            self.started,
            self.intake.models(),
            self.last_reload.as_ref(),
        )
    }

    fn act(&mut self, action: Action<Received>, session: &Session<Received>) {
        self.retiring.retain(|c| !c.finished());
        let daemon = &self.config.daemon;
        match action {
            Action::Intake((publish, received)) => {
                self.intake
                    .take(publish, received, Ticket::new(&self.done_tx));
            }
            Action::Defer { first } => {
                self.stats.deferred.fetch_add(1, Ordering::Relaxed);
                if first {
                    log::warn!(
                        "the broker sent more than daemon.backlog_bytes ({}) of unacknowledged messages: deferring the rest until the backlog drains",
                        daemon.backlog_bytes
                    );
                }
            }
            Action::Announce { .. } => {
                if !self.retired.is_empty() {
                    self.control(Control::Unsubscribe(self.retired.iter().cloned().collect()));
                }
                self.control(Control::Subscribe(self.intake.subscriptions()));
                let payload = self.online();
                self.control(Control::Status {
                    payload,
                    ready: true,
                });
            }
            Action::Resume { deferred } => {
                log::info!("caught up: resuming the session to fetch {deferred} deferred messages");
                self.control(Control::Disconnect);
            }
            Action::Reconnect { resuming } => {
                if resuming {
                    log::info!("session resume: reconnecting");
                }
                self.link.reconnect();
            }
            Action::Backoff { after, error } => {
                log::warn!(
                    "broker connection: {error}; retrying in {} ms",
                    after.as_millis()
                );
            }
            Action::Stopping { .. } => {
                log::info!(
                    "shutting down: finishing in-flight messages (up to {} s)",
                    daemon.shutdown_timeout_s
                );
                crate::systemd::notify("STOPPING=1");
            }
            Action::Leave { unfinished } => {
                if unfinished > 0 {
                    log::warn!(
                        "shutdown timeout: {unfinished} messages unfinished; the broker will redeliver them"
                    );
                }
                let offline = status::offline(&daemon.name);
                self.control(Control::Leave { offline });
            }
            Action::StartReload => self.start_reload(),
            Action::ApplyReload => self.apply_reload(),
            Action::ReloadFailed => {
                let Some(Err(error)) = self.pending.take() else {
                    return;
                };
                log::error!("reload failed; still running the previous configuration: {error}");
                self.last_reload = Some(json!({"ok": false, "at": unix_now(), "error": error}));
                self.control(Control::Status {
                    payload: self.online(),
                    ready: false,
                });
                crate::systemd::notify("READY=1\nSTATUS=reload failed, previous configuration kept");
            }
            Action::DiscardReload => self.pending = None,
            Action::ReloadIgnored => log::info!("reload ignored: shutting down"),
            Action::Exit { offline: true } => log::info!("disconnected"),
            Action::Exit { offline: false } => log::warn!(
                "broker unreachable while shutting down: exiting without publishing offline ({} in flight left unacknowledged)",
                session.in_flight()
            ),
        }
    }

    /// Reads and loads the configuration again off the loop.
    fn start_reload(&self) {
        log::info!("reloading {}", self.path.display());
        crate::systemd::notify("RELOADING=1");
        let (path, config, models, health, tx) = (
            self.path.clone(),
            self.config.clone(),
            self.intake.models().clone(),
            self.health.clone(),
            self.reloaded_tx.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("reload".into())
            .spawn(move || {
                let _ = tx.send(service::reload(&path, &config, &models, &health));
            });
        if let Err(e) = spawned {
            let _ = self
                .reloaded_tx
                .send(Err(format!("cannot start a thread: {e}")));
        }
    }

    /// Switches routes and models between two messages; the connection stays.
    fn apply_reload(&mut self) {
        let Some(Ok(next)) = self.pending.take() else {
            return;
        };
        let before: BTreeSet<String> = self.intake.subscriptions().into_iter().collect();
        self.config = next.config.clone();
        self.retiring.extend(self.intake.switch(next));
        let after: BTreeSet<String> = self.intake.subscriptions().into_iter().collect();
        self.retired.extend(before.difference(&after).cloned());
        self.retired.retain(|f| !after.contains(f));
        let gone: Vec<String> = before.difference(&after).cloned().collect();
        if !gone.is_empty() {
            self.control(Control::Unsubscribe(gone));
        }
        let new: Vec<String> = after.difference(&before).cloned().collect();
        if !new.is_empty() {
            self.control(Control::Subscribe(new));
        }
        self.last_reload = Some(json!({"ok": true, "at": unix_now()}));
        self.control(Control::Status {
            payload: self.online(),
            ready: false,
        });
        let models: Vec<String> = self
            .intake
            .models()
            .loaded
            .iter()
            .map(|(k, l)| format!("{k}: {}", l.bundle.name))
            .collect();
        log::info!("reloaded: {}", models.join(", "));
        // The replaced routes' annotators are gone; their pools free the rest.
        crate::memory::trim();
        crate::systemd::notify("READY=1\nSTATUS=configuration reloaded");
    }

    /// Stops everything: the client, the tasks, the workers (what they hold is left
    /// unacknowledged). Waits a little for the workers, never for long.
    fn close(self) {
        self.link.stop();
        for task in &self.tasks {
            task.abort();
        }
        let deadline = Instant::now() + Duration::from_millis(200);
        for closed in self.intake.stop().into_iter().chain(self.retiring) {
            closed.join(deadline);
        }
    }
}
