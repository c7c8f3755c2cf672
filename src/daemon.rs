//! `anotador run`: the MQTT daemon, wiring transport → intake → queue → workers →
//! publisher.
//!
//! - The event loop task only polls and routes: parsing is cheap and bounded by the
//!   payload cap; inference runs on worker threads.
//! - An input is acknowledged only after its one outcome (result or error) has been
//!   handed to the client at QoS 1, so a crash at any point leaves it unacknowledged
//!   and the broker redelivers it (at-least-once).
//! - Every accepted input holds a permit of `daemon.queue` until its outcome is out:
//!   the daemon's memory does not grow with the input rate.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, Incoming};
use rumqttc::Outgoing;
use serde_json::json;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::bundle::Bundle;
use crate::config::Config;
use crate::message;
use crate::pipeline::{error_outcome, Health, Job, ModelWorkers, Outcome};
use crate::tasks::Annotator;
use crate::transport::{self, topic};

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
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Recent end-to-end latencies (ms), a bounded ring.
    latencies: Mutex<(Vec<f64>, usize)>,
}

const LATENCY_WINDOW: usize = 1024;

impl Stats {
    fn record(&self, error: Option<&'static str>, latency_ms: f64) {
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

    fn snapshot(&self, queue_depth: usize) -> serde_json::Value {
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
            "queue_depth": queue_depth,
            "latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "window": l.len()},
            "rss_bytes": rss_bytes(),
        })
    }
}

/// Resident set size from /proc (Linux); None elsewhere.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

struct RouteRuntime {
    filter: topic::Filter,
    model: String,
    format: message::PayloadFormat,
    task: crate::bundle::Task,
    output: String,
    errors: String,
}

/// Loads every model and checks every route: what `anotador check --config` runs.
pub fn load(config: &Config) -> crate::Result<(BTreeMap<String, Arc<Bundle>>, Vec<Annotator>)> {
    let mut bundles = BTreeMap::new();
    for (name, m) in &config.models {
        let started = Instant::now();
        if let Some(expected) = &m.sha256 {
            crate::bundle::verify_sha256(&m.path, expected)?;
        }
        let bundle = Arc::new(Bundle::load(&m.path)?);
        log::info!(
            "model {name}: {} ({}, {} labels) loaded in {:.2} s, int8 path: {}",
            m.path.display(),
            bundle.config.task.as_str(),
            bundle.config.labels.len(),
            started.elapsed().as_secs_f64(),
            bundle.engine.info().int8_path
        );
        bundles.insert(name.clone(), bundle);
    }
    let mut annotators = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        let task = bundles[&route.model].config.task;
        if task == crate::bundle::Task::QuestionAnswering
            && route.format == message::PayloadFormat::Text
        {
            return Err(crate::Error::InvalidRequest(format!(
                "routes[{i}]: model {} answers questions: its payloads are JSON {{\"question\", \"context\"}}, so format = \"text\" cannot feed it",
                route.model
            )));
        }
        let options = config.task_options(&route.model, Some(&route.options));
        // Window and stride live under the model's key: name it, as for every other
        // configuration problem.
        let annotator = Annotator::new(bundles[&route.model].clone(), &options)
            .map_err(|e| crate::Error::InvalidRequest(format!("models.{}: {e}", route.model)))?;
        annotators.push(annotator);
    }
    Ok((bundles, annotators))
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Load(#[from] crate::Error),
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    #[error("MQTT client: {0}")]
    Client(#[from] rumqttc::v5::ClientError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub fn run(config: Config) -> Result<(), DaemonError> {
    let (bundles, annotators) = load(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(serve(config, bundles, annotators))
}

async fn serve(
    config: Config,
    bundles: BTreeMap<String, Arc<Bundle>>,
    annotators: Vec<Annotator>,
) -> Result<(), DaemonError> {
    let name = config.daemon.name.clone();
    let opts = transport::options(&config)?;
    let (client, mut eventloop) = AsyncClient::new(
        opts,
        transport::outgoing_inflight(config.daemon.queue).into(),
    );
    let stats = Arc::new(Stats::default());
    let permits = Arc::new(Semaphore::new(config.daemon.queue));

    let routes: Vec<RouteRuntime> = config
        .routes
        .iter()
        .zip(&annotators)
        .map(|(r, a)| RouteRuntime {
            filter: topic::Filter::parse(&r.topic).expect("validated at load"),
            model: r.model.clone(),
            format: r.format,
            task: a.task(),
            output: r.output.clone(),
            errors: r.errors.clone(),
        })
        .collect();

    let (outcome_tx, outcome_rx) = mpsc::unbounded_channel::<Outcome<Publish>>();
    let health = Health::new(config.models.values().map(|m| m.workers).sum());
    let mut first_worker = 0;
    let annotators: Vec<Option<Annotator>> = annotators.into_iter().map(Some).collect();
    let mut workers = BTreeMap::new();
    for (model, m) in &config.models {
        let mine: Vec<Option<Annotator>> = annotators
            .iter()
            .zip(&config.routes)
            .map(|(a, r)| if &r.model == model { a.clone() } else { None })
            .collect();
        workers.insert(
            model.clone(),
            ModelWorkers::start(
                model,
                m.workers,
                config.daemon.queue,
                Arc::new(mine),
                outcome_tx.clone(),
                health.clone(),
                first_worker,
                crate::pipeline::Batching {
                    max_batch: m.max_batch,
                    wait: Duration::from_millis(m.batch_wait_ms),
                },
            )?,
        );
        first_worker += m.workers;
    }
    if let Some(interval) = crate::systemd::watchdog_interval() {
        tokio::spawn(feed_watchdog(interval, health.clone()));
    }

    let ctx = Intake {
        routes,
        workers,
        permits: permits.clone(),
        outcomes: outcome_tx,
        name: name.clone(),
        max_bytes: config.daemon.max_payload_bytes,
    };
    let publisher = tokio::spawn(publish_outcomes(client.clone(), outcome_rx, stats.clone()));
    let stats_task = tokio::spawn(publish_stats(
        client.clone(),
        transport::stats_topic(&config),
        Duration::from_secs(config.daemon.stats_interval_s.max(1)),
        stats.clone(),
        permits.clone(),
        config.daemon.queue,
    ));

    let status = json!({
        "status": "online",
        "name": name,
        "version": env!("CARGO_PKG_VERSION"),
        "started": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "models": bundles.iter().map(|(k, b)| (k.clone(), json!({
            "task": b.config.task.as_str(),
            "labels": b.config.labels.len(),
            "engine": b.engine.info(),
        }))).collect::<BTreeMap<_, _>>(),
    });
    let status_topic = transport::status_topic(&config);

    let mut shutdown = Box::pin(shutdown_signal());
    // Messages received while every permit is taken. The event loop must keep
    // polling (pings, acknowledgements and results all go through it), so it never
    // waits for a permit. Brokers are asked for at most `queue` unacknowledged
    // messages (MQTT 5 Receive Maximum) but not all obey (Mosquitto 2.0 sends its
    // whole backlog), so the list holds at most `daemon.backlog_bytes`: beyond that
    // a message is deferred, left unacknowledged, and fetched again through a
    // session resume once the daemon has caught up. Memory stays bounded whatever
    // the broker does.
    let mut waiting = Waiting::new(config.daemon.backlog_bytes);
    let mut deferred = 0u64;
    let mut resyncing = false;
    let mut attempt = 0u32;
    let mut draining: Option<Instant> = None;
    let timeout = Duration::from_secs(config.daemon.shutdown_timeout_s);
    loop {
        // Deferred messages are fetched again once everything held is answered:
        // nothing waiting, every permit back. Then a disconnect; the next poll
        // resumes the session and the broker delivers them again.
        let caught_up =
            waiting.is_empty() && ctx.permits.available_permits() == config.daemon.queue;
        if deferred > 0 && caught_up && !resyncing && draining.is_none() {
            resyncing = true;
            log::info!("caught up: resuming the session to fetch {deferred} deferred messages");
            let client = client.clone();
            tokio::spawn(async move {
                let _ = client.disconnect().await;
            });
        }
        let event = tokio::select! {
            event = eventloop.poll() => event,
            // Wakes the loop to re-check `caught_up` while messages are deferred.
            _ = tokio::time::sleep(Duration::from_millis(20)), if deferred > 0 && !resyncing => continue,
            permit = ctx.permits.clone().acquire_owned(), if !waiting.is_empty() && draining.is_none() && !resyncing => {
                let (publish, received) = waiting.pop().expect("not empty");
                intake(publish, permit.expect("semaphore never closed"), received, &ctx);
                continue;
            }
            _ = &mut shutdown, if draining.is_none() => {
                log::info!("shutting down: finishing in-flight messages (up to {} s)", timeout.as_secs());
                crate::systemd::notify("STOPPING=1");
                draining = Some(Instant::now());
                spawn_drain(client.clone(), permits.clone(), config.daemon.queue, timeout, status_topic.clone(), transport::offline_payload(&name));
                continue;
            }
        };
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                attempt = 0;
                log::info!(
                    "connected to {}:{} (session present: {})",
                    config.broker.host,
                    config.broker.port,
                    ack.session_present
                );
                // Subscribing again on every ConnAck: a broker that lost the session
                // (restart without persistence) would otherwise send nothing. From a
                // task of its own: the request channel may be full of results queued
                // while disconnected, and only this loop's polling drains it.
                let subscriptions: Vec<String> = ctx
                    .routes
                    .iter()
                    .map(|r| r.filter.subscription.clone())
                    .collect();
                let (client, status_topic, status) = (
                    client.clone(),
                    status_topic.clone(),
                    serde_json::to_vec(&status).unwrap(),
                );
                tokio::spawn(async move {
                    for s in subscriptions {
                        if client.subscribe(s, QoS::AtLeastOnce).await.is_err() {
                            return;
                        }
                    }
                    if client
                        .publish(status_topic, QoS::AtLeastOnce, true, status)
                        .await
                        .is_ok()
                    {
                        crate::systemd::notify("READY=1\nSTATUS=connected to the broker");
                    }
                });
            }
            Ok(Event::Incoming(Incoming::Publish(publish))) => {
                if draining.is_some() {
                    // Left unacknowledged: the broker delivers it again after restart.
                    continue;
                }
                stats.received.fetch_add(1, Ordering::Relaxed);
                if publish.dup {
                    stats.redelivered.fetch_add(1, Ordering::Relaxed);
                }
                let received = Instant::now();
                match ctx.permits.clone().try_acquire_owned() {
                    // While a session resume is pending, take nothing new: its
                    // acknowledgement could miss the disconnect.
                    _ if resyncing => {
                        deferred += 1;
                        stats.deferred.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(permit) if waiting.is_empty() => intake(publish, permit, received, &ctx),
                    // Older messages are waiting: keep the order, queue behind them.
                    Ok(permit) => {
                        drop(permit);
                        waiting.push(publish, received);
                    }
                    Err(_) if waiting.fits(&publish) => waiting.push(publish, received),
                    Err(_) => {
                        if deferred == 0 {
                            log::warn!(
                                "the broker sent more than daemon.backlog_bytes ({}) of unacknowledged messages: deferring the rest until the backlog drains",
                                config.daemon.backlog_bytes
                            );
                        }
                        deferred += 1;
                        stats.deferred.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) if resyncing && draining.is_none() => {
                // The next poll reconnects; the resumed session redelivers the
                // deferred messages.
                resyncing = false;
                attempt = 0;
                deferred = 0;
                waiting.clear();
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                log::info!("disconnected");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                if let Some(since) = draining {
                    if since.elapsed() > timeout + Duration::from_secs(2) {
                        log::warn!("broker unreachable while shutting down: {e}");
                        break;
                    }
                }
                let wait = transport::backoff(
                    attempt,
                    config.broker.reconnect_min_ms,
                    config.broker.reconnect_max_ms,
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0),
                );
                attempt = attempt.saturating_add(1);
                log::warn!(
                    "broker connection: {e}; retrying in {} ms",
                    wait.as_millis()
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
    stats_task.abort();
    let Intake {
        workers, outcomes, ..
    } = ctx;
    drop(outcomes);
    for (_, w) in workers {
        let _ = tokio::task::spawn_blocking(move || w.join()).await;
    }
    publisher.abort();
    Ok(())
}

/// Received messages waiting for a permit, in arrival order, within a byte budget.
struct Waiting {
    items: std::collections::VecDeque<(Publish, Instant)>,
    bytes: usize,
    budget: usize,
}

impl Waiting {
    fn new(budget: usize) -> Waiting {
        Waiting {
            items: Default::default(),
            bytes: 0,
            budget,
        }
    }

    fn size(publish: &Publish) -> usize {
        publish.payload.len() + publish.topic.len()
    }

    /// Within the budget; one message always fits, so a single large one still flows.
    fn fits(&self, publish: &Publish) -> bool {
        self.items.is_empty() || self.bytes + Self::size(publish) <= self.budget
    }

    fn push(&mut self, publish: Publish, received: Instant) {
        self.bytes += Self::size(&publish);
        self.items.push_back((publish, received));
    }

    fn pop(&mut self) -> Option<(Publish, Instant)> {
        let item = self.items.pop_front()?;
        self.bytes -= Self::size(&item.0);
        Some(item)
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Dropped unacknowledged: the resumed session delivers them again.
    fn clear(&mut self) {
        self.items.clear();
        self.bytes = 0;
    }
}

/// What the event loop needs to accept a message.
struct Intake {
    routes: Vec<RouteRuntime>,
    workers: BTreeMap<String, ModelWorkers<Publish>>,
    permits: Arc<Semaphore>,
    outcomes: mpsc::UnboundedSender<Outcome<Publish>>,
    name: String,
    max_bytes: usize,
}

/// Routes, parses and validates one publish; hands a job to the model's workers, or
/// an error outcome straight to the publisher.
fn intake(publish: Publish, permit: OwnedSemaphorePermit, received: Instant, ctx: &Intake) {
    let (routes, workers, outcomes, name) =
        (&ctx.routes, &ctx.workers, &ctx.outcomes, ctx.name.as_str());
    // MQTT topics are UTF-8 by the protocol; a broker that sent anything else gets
    // the replacement character rather than a crash.
    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
    let matched = routes
        .iter()
        .enumerate()
        .find_map(|(i, r)| r.filter.captures(&topic).map(|c| (i, r, c)));
    let Some((index, route, captures)) = matched else {
        log::warn!("message on {topic} matches no route; acknowledged and dropped");
        let _ = outcomes.send(Outcome {
            topic: String::new(),
            payload: Vec::new(),
            error: Some("no_route"),
            ack: publish,
            permit: Some(permit),
            received,
        });
        return;
    };
    let output = topic::render(&route.output, &topic, &captures, &route.model, name);
    let errors = topic::render(&route.errors, &topic, &captures, &route.model, name);
    match message::parse(&publish.payload, route.format, route.task, ctx.max_bytes) {
        Err((id, error)) => {
            log::debug!("bad payload on {topic}: {}", error.code());
            let _ = outcomes.send(error_outcome(
                &topic,
                errors,
                &route.model,
                route.task,
                id.as_ref(),
                &error,
                publish,
                permit,
                received,
            ));
        }
        Ok(request) => workers[&route.model].submit(Job {
            route: index,
            topic,
            request,
            output,
            errors,
            ack: publish,
            permit,
            received,
        }),
    }
}

/// Publishes each outcome at QoS 1, then acknowledges its input: the order that
/// makes delivery at-least-once.
async fn publish_outcomes(
    client: AsyncClient,
    mut rx: mpsc::UnboundedReceiver<Outcome<Publish>>,
    stats: Arc<Stats>,
) {
    while let Some(outcome) = rx.recv().await {
        if !outcome.topic.is_empty() {
            if let Err(e) = client
                .publish(outcome.topic, QoS::AtLeastOnce, false, outcome.payload)
                .await
            {
                log::error!(
                    "cannot hand a result to the MQTT client: {e}; input left unacknowledged"
                );
                continue;
            }
            stats.record(
                outcome.error,
                outcome.received.elapsed().as_secs_f64() * 1e3,
            );
        }
        if let Err(e) = client.ack(&outcome.ack).await {
            log::error!("cannot acknowledge an input: {e}");
        }
        drop(outcome.permit);
    }
}

async fn publish_stats(
    client: AsyncClient,
    topic: String,
    every: Duration,
    stats: Arc<Stats>,
    permits: Arc<Semaphore>,
    queue: usize,
) {
    if topic.is_empty() {
        return;
    }
    let mut interval = tokio::time::interval(every);
    interval.tick().await;
    loop {
        interval.tick().await;
        let depth = queue - permits.available_permits();
        let payload = serde_json::to_vec(&stats.snapshot(depth)).unwrap();
        if client
            .publish(topic.clone(), QoS::AtMostOnce, false, payload)
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Waits for in-flight messages to finish (all permits back) or the timeout, then
/// publishes the offline status and disconnects; the event loop keeps running
/// meanwhile so the results and acknowledgements actually leave.
fn spawn_drain(
    client: AsyncClient,
    permits: Arc<Semaphore>,
    queue: usize,
    timeout: Duration,
    status_topic: String,
    offline: Vec<u8>,
) {
    tokio::spawn(async move {
        let all = tokio::time::timeout(timeout, permits.acquire_many(queue as u32)).await;
        match all {
            Ok(Ok(p)) => p.forget(),
            _ => log::warn!(
                "shutdown timeout: {} messages unfinished; the broker will redeliver them",
                queue - permits.available_permits()
            ),
        }
        let _ = client
            .publish(status_topic, QoS::AtLeastOnce, true, offline)
            .await;
        let _ = client.disconnect().await;
    });
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

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
