//! Between transport and engine: jobs, the bounded queue, worker threads and the
//! result envelopes. Knows nothing of MQTT: the acknowledgement travels through as an
//! opaque token, handed back with the job's one outcome.
//!
//! Bounds: a job holds a permit from one semaphore (`daemon.queue`) from intake until
//! its outcome is published, so memory is `queue × max_payload_bytes` plus the engine
//! states, whatever the input rate; the backlog waits in the broker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::bundle::Task;
use crate::error::Error;
use crate::message::{self, Request, Source};
use crate::tasks::batch::{annotate_batch, Item};
use crate::tasks::Annotator;

/// One accepted message on its way to a worker.
pub struct Job<A> {
    pub route: usize,
    pub topic: String,
    pub request: Request,
    pub output: String,
    pub errors: String,
    pub ack: A,
    pub permit: OwnedSemaphorePermit,
    pub received: Instant,
}

/// The one outcome of one accepted message: publish `payload` on `topic`, then ack.
pub struct Outcome<A> {
    pub topic: String,
    pub payload: Vec<u8>,
    /// `None` for a result, the error code otherwise.
    pub error: Option<&'static str>,
    pub ack: A,
    pub permit: Option<OwnedSemaphorePermit>,
    pub received: Instant,
}

/// The error outcome of a message that never reached a worker (bad payload).
#[allow(clippy::too_many_arguments)]
pub fn error_outcome<A>(
    topic: &str,
    errors_topic: String,
    model: &str,
    task: Task,
    id: Option<&Value>,
    error: &Error,
    ack: A,
    permit: OwnedSemaphorePermit,
    received: Instant,
) -> Outcome<A> {
    let source = Source {
        model,
        task,
        topic: Some(topic),
    };
    Outcome {
        topic: errors_topic,
        payload: message::envelope(source, id, &Default::default(), Err(error)),
        error: Some(error.code()),
        ack,
        permit: Some(permit),
        received,
    }
}

/// When each worker started its current job (ms since `Health` was made; 0 = idle),
/// so a watchdog can tell a busy daemon from a hung one.
pub struct Health {
    epoch: Instant,
    busy_since: Vec<AtomicU64>,
}

impl Health {
    pub fn new(workers: usize) -> Arc<Health> {
        Arc::new(Health {
            epoch: Instant::now(),
            busy_since: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn busy(&self, worker: usize) {
        self.busy_since[worker].store(self.now_ms(), Ordering::Relaxed);
    }

    fn idle(&self, worker: usize) {
        self.busy_since[worker].store(0, Ordering::Relaxed);
    }

    /// True when some worker has been on one job for longer than `limit`.
    pub fn stuck(&self, limit: std::time::Duration) -> bool {
        let now = self.now_ms();
        self.busy_since.iter().any(|b| {
            let since = b.load(Ordering::Relaxed);
            since != 0 && now.saturating_sub(since) > limit.as_millis() as u64
        })
    }
}

/// How a worker fills a micro-batch from the model's queue.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub max_batch: usize,
    pub wait: std::time::Duration,
}

/// The workers of one model: they share its queue, each owns an engine state.
pub struct ModelWorkers<A> {
    sender: SyncSender<Job<A>>,
    handles: Vec<JoinHandle<()>>,
}

impl<A: Send + 'static> ModelWorkers<A> {
    /// `routes[i]` is the annotator of route `i` (`None` for routes of other models).
    pub fn start(
        model: &str,
        workers: usize,
        capacity: usize,
        routes: Arc<Vec<Option<Annotator>>>,
        outcomes: mpsc::UnboundedSender<Outcome<A>>,
        health: Arc<Health>,
        first_worker: usize,
        batching: Batching,
    ) -> crate::Result<ModelWorkers<A>> {
        let (sender, receiver) = sync_channel::<Job<A>>(capacity);
        let receiver = Arc::new(Mutex::new(receiver));
        let mut handles = Vec::new();
        let annotator = routes
            .iter()
            .flatten()
            .next()
            .ok_or_else(|| Error::InvalidRequest(format!("model {model} has no route")))?;
        for i in 0..workers {
            let mut state = annotator.bundle().engine.state()?;
            let (receiver, routes, outcomes, health) = (
                receiver.clone(),
                routes.clone(),
                outcomes.clone(),
                health.clone(),
            );
            let slot = first_worker + i;
            let handle = std::thread::Builder::new()
                .name(format!("{model}-{i}"))
                .spawn(move || {
                    worker(
                        &receiver, &routes, &mut state, &outcomes, &health, slot, batching,
                    )
                })
                .map_err(Error::Io)?;
            handles.push(handle);
        }
        Ok(ModelWorkers { sender, handles })
    }

    /// Never blocks for long: the caller holds a permit, and the channel has room
    /// for every permit.
    pub fn submit(&self, job: Job<A>) {
        if self.sender.send(job).is_err() {
            log::error!("workers are gone; job dropped (it will be redelivered by the broker)");
        }
    }

    /// Closes the queue and waits for the workers to drain it.
    pub fn join(self) {
        drop(self.sender);
        for h in self.handles {
            let _ = h.join();
        }
    }
}

/// How long a worker waits for work before it returns freed memory to the kernel:
/// long enough that a steady stream never pays for re-faulting its scratch pages,
/// short enough that RSS falls back to the loaded size soon after a burst.
const IDLE_TRIM: Duration = Duration::from_secs(2);

/// Takes one job, then whatever else is queued (up to `max_batch`, waiting at
/// most `wait` for it), so a burst runs as micro-batches and an idle daemon answers
/// a lone message at once.
fn next_jobs<A>(receiver: &Mutex<Receiver<Job<A>>>, batching: Batching) -> Option<Vec<Job<A>>> {
    let guard = receiver.lock().unwrap_or_else(|p| p.into_inner());
    let first = match guard.recv_timeout(IDLE_TRIM) {
        Ok(job) => job,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            // Idle: give the last burst's scratch back, once, before sleeping.
            crate::memory::trim();
            guard.recv().ok()?
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return None,
    };
    let mut jobs = vec![first];
    let deadline = Instant::now() + batching.wait;
    while jobs.len() < batching.max_batch {
        let next = match guard.try_recv() {
            Ok(job) => Some(job),
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    None
                } else {
                    guard.recv_timeout(left).ok()
                }
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
        };
        match next {
            Some(job) => jobs.push(job),
            None => break,
        }
    }
    Some(jobs)
}

fn worker<A>(
    receiver: &Mutex<Receiver<Job<A>>>,
    routes: &[Option<Annotator>],
    state: &mut crate::engine::EngineState,
    outcomes: &mpsc::UnboundedSender<Outcome<A>>,
    health: &Health,
    slot: usize,
    batching: Batching,
) {
    while let Some(jobs) = next_jobs(receiver, batching) {
        health.busy(slot);
        let annotator = |job: &Job<A>| {
            routes[job.route]
                .as_ref()
                .expect("jobs are routed to their model's workers")
        };
        let items: Vec<Item> = jobs
            .iter()
            .map(|job| Item {
                annotator: annotator(job),
                text: &job.request.text,
                pair: job.request.text_pair.as_deref(),
            })
            .collect();
        let results = annotate_batch(state, &items);
        drop(items);
        health.idle(slot);
        for (job, result) in jobs.into_iter().zip(results) {
            let annotator = annotator(&job);
            let model = &annotator.bundle().name;
            let request = &job.request;
            let source = Source {
                model,
                task: annotator.task(),
                topic: Some(&job.topic),
            };
            let payload =
                message::envelope(source, request.id.as_ref(), &request.meta, result.as_ref());
            let (topic, error) = match &result {
                Ok(_) => (job.output.clone(), None),
                Err(e) => (job.errors.clone(), Some(e.code())),
            };
            let outcome = Outcome {
                topic,
                payload,
                error,
                ack: job.ack,
                permit: Some(job.permit),
                received: job.received,
            };
            if outcomes.send(outcome).is_err() {
                return;
            }
        }
    }
}
