//! The worker pool: one per model, its threads sharing a bounded queue, each
//! owning an engine state. It takes a request, its route's annotator and a reply
//! handle, and calls the handle once with the outcome; it knows nothing of where
//! requests come from or where answers go (MQTT, stdin, anything else).
//!
//! Bounds: a transport submits at most `capacity` jobs that are not yet answered,
//! so the queue never blocks it; memory is `capacity × max_payload_bytes` plus the
//! engine states, whatever the input rate.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bundle::Bundle;
use crate::error::{Error, Result};
use crate::message::Request;
use crate::tasks::batch::{annotate_batch, Item};
use crate::tasks::{Annotation, Annotator};

/// Where one job's outcome goes. Called exactly once, on the worker's thread, for
/// every job a worker takes; a job dropped unanswered (its pool gone) drops its
/// handle instead.
pub trait Reply: Send + 'static {
    fn send(self, annotator: &Annotator, request: &Request, outcome: Result<Annotation>);
}

/// One accepted request on its way to a worker.
pub struct Job<R> {
    /// The annotator of the request's route; its bundle is the pool's.
    pub annotator: Arc<Annotator>,
    pub request: Request,
    pub reply: R,
}

/// How a pool runs: threads, and how each fills a micro-batch from the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub workers: usize,
    pub max_batch: usize,
    /// How long a worker waits for more jobs to fill a micro-batch.
    pub batch_wait: Duration,
}

/// When each worker started its current job (ms since `Health` was made; 0 = idle),
/// so a watchdog can tell a busy daemon from a hung one. Pools come and go with
/// reloads; each worker registers its own clock.
pub struct Health {
    epoch: Instant,
    clocks: Mutex<Vec<Arc<AtomicU64>>>,
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health {
            epoch: Instant::now(),
            clocks: Mutex::new(Vec::new()),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn register(&self) -> Arc<AtomicU64> {
        let clock = Arc::new(AtomicU64::new(0));
        let mut clocks = self.clocks.lock().unwrap_or_else(|p| p.into_inner());
        // Workers that exited hold no clone any more.
        clocks.retain(|c| Arc::strong_count(c) > 1);
        clocks.push(clock.clone());
        clock
    }

    /// True when some worker has been on one job for longer than `limit`.
    pub fn stuck(&self, limit: Duration) -> bool {
        let now = self.now_ms();
        let clocks = self.clocks.lock().unwrap_or_else(|p| p.into_inner());
        clocks.iter().any(|c| {
            let since = c.load(Ordering::Relaxed);
            since != 0 && now.saturating_sub(since) > limit.as_millis() as u64
        })
    }
}

/// The workers of one model.
pub struct Pool<R> {
    name: String,
    bundle: Arc<Bundle>,
    settings: Settings,
    sender: SyncSender<Job<R>>,
    handles: Vec<JoinHandle<()>>,
    /// Set when the process stops: workers drop what is queued instead of answering it.
    stop: Arc<AtomicBool>,
}

impl<R: Reply> Pool<R> {
    /// Starts `settings.workers` threads named after `name`, each with its own
    /// engine state of `bundle`.
    pub fn start(
        name: &str,
        bundle: Arc<Bundle>,
        settings: Settings,
        capacity: usize,
        health: &Arc<Health>,
    ) -> Result<Pool<R>> {
        let (sender, receiver) = sync_channel::<Job<R>>(capacity);
        let receiver = Arc::new(Mutex::new(receiver));
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for i in 0..settings.workers {
            let mut state = bundle.engine.state()?;
            let (receiver, clock, health, stop) = (
                receiver.clone(),
                health.register(),
                health.clone(),
                stop.clone(),
            );
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    work(&receiver, &mut state, &health, &clock, &stop, settings);
                    drop(state);
                    // This thread may hold the last reference to a model a
                    // reload replaced: give its pages back.
                    drop(receiver);
                    crate::memory::trim();
                })
                .map_err(Error::Io)?;
            handles.push(handle);
        }
        Ok(Pool {
            name: name.to_string(),
            bundle,
            settings,
            sender,
            handles,
            stop,
        })
    }

    pub fn bundle(&self) -> &Arc<Bundle> {
        &self.bundle
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// Never blocks for long: the caller holds at most `capacity` unanswered jobs,
    /// and the queue has room for all of them.
    pub fn submit(&self, job: Job<R>) {
        debug_assert!(Arc::ptr_eq(job.annotator.bundle(), &self.bundle));
        if self.sender.send(job).is_err() {
            log::error!(
                "model {}: its workers are gone; a job is dropped unanswered",
                self.name
            );
        }
    }

    /// Closes the queue and drops what it holds unanswered (their reply handles
    /// with them); workers exit after the batch they are running.
    pub fn stop(self) -> Closed {
        self.stop.store(true, Ordering::Relaxed);
        self.close()
    }

    /// Closes the queue: the workers answer what it holds, then exit.
    pub fn close(self) -> Closed {
        drop(self.sender);
        Closed {
            handles: self.handles,
        }
    }
}

/// A pool whose queue is closed, its workers finishing.
pub struct Closed {
    handles: Vec<JoinHandle<()>>,
}

impl Closed {
    pub fn finished(&self) -> bool {
        self.handles.iter().all(|h| h.is_finished())
    }

    /// Waits for the workers until `deadline`; false if some are still running (a
    /// long inference), which are then left to end with the process.
    pub fn join(self, deadline: Instant) -> bool {
        while !self.finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for h in self.handles {
            let _ = h.join();
        }
        true
    }
}

/// How long a worker waits for work before it returns freed memory to the kernel:
/// long enough that a steady stream never pays for re-faulting its scratch pages,
/// short enough that RSS falls back to the loaded size soon after a burst.
const IDLE_TRIM: Duration = Duration::from_secs(2);

/// Takes one job, then whatever else is queued (up to `max_batch`, waiting at
/// most `batch_wait` for it), so a burst runs as micro-batches and an idle pool
/// answers a lone request at once.
fn next_jobs<R>(receiver: &Mutex<Receiver<Job<R>>>, settings: Settings) -> Option<Vec<Job<R>>> {
    let guard = receiver.lock().unwrap_or_else(|p| p.into_inner());
    let first = match guard.recv_timeout(IDLE_TRIM) {
        Ok(job) => job,
        Err(RecvTimeoutError::Timeout) => {
            // Idle: give the last burst's scratch back, once, before sleeping.
            crate::memory::trim();
            guard.recv().ok()?
        }
        Err(RecvTimeoutError::Disconnected) => return None,
    };
    let mut jobs = vec![first];
    let deadline = Instant::now() + settings.batch_wait;
    while jobs.len() < settings.max_batch {
        let next = match guard.try_recv() {
            Ok(job) => Some(job),
            Err(TryRecvError::Empty) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    None
                } else {
                    guard.recv_timeout(left).ok()
                }
            }
            Err(TryRecvError::Disconnected) => None,
        };
        match next {
            Some(job) => jobs.push(job),
            None => break,
        }
    }
    Some(jobs)
}

fn work<R: Reply>(
    receiver: &Mutex<Receiver<Job<R>>>,
    state: &mut crate::engine::EngineState,
    health: &Health,
    clock: &AtomicU64,
    stop: &AtomicBool,
    settings: Settings,
) {
    while let Some(jobs) = next_jobs(receiver, settings) {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        clock.store(health.now_ms(), Ordering::Relaxed);
        let items: Vec<Item> = jobs
            .iter()
            .map(|job| Item {
                annotator: &job.annotator,
                text: &job.request.text,
                pair: job.request.text_pair.as_deref(),
            })
            .collect();
        let outcomes = annotate_batch(state, &items);
        drop(items);
        clock.store(0, Ordering::Relaxed);
        for (job, outcome) in jobs.into_iter().zip(outcomes) {
            job.reply.send(&job.annotator, &job.request, outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// What a job found (entities as text, or an error code).
    type Found = Result<Vec<String>, &'static str>;

    /// A reply handle with no transport behind it: what `annotate` could use.
    struct Sent(usize, mpsc::Sender<(usize, String, Found)>);

    /// Entities without their scores: micro-batch padding moves scores in the
    /// last digits, never what was found.
    fn found(annotation: Result<Annotation>) -> Found {
        let annotation = annotation.map_err(|e| e.code())?;
        let crate::tasks::Output::Entities(entities) = annotation.result else {
            panic!("token classification")
        };
        Ok(entities
            .iter()
            .map(|e| format!("{} {:?}", e.label(), e.span()))
            .collect())
    }

    impl Reply for Sent {
        fn send(self, annotator: &Annotator, _: &Request, outcome: Result<Annotation>) {
            let _ = self
                .1
                .send((self.0, annotator.bundle().name.clone(), found(outcome)));
        }
    }

    fn request(text: &str) -> Request {
        Request {
            id: None,
            text: text.into(),
            text_pair: None,
            meta: Default::default(),
        }
    }

    #[test]
    fn answers_each_job_once_without_any_transport() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert-token");
        let bundle = Arc::new(Bundle::load(&dir).unwrap());
        let annotator = Arc::new(Annotator::new(bundle.clone(), &Default::default()).unwrap());
        let settings = Settings {
            workers: 2,
            max_batch: 3,
            batch_wait: Duration::ZERO,
        };
        let health = Health::new();
        let pool: Pool<Sent> = Pool::start("t", bundle, settings, 16, &health).unwrap();
        let (tx, rx) = mpsc::channel();
        let texts = ["Hola, Lima.", "", "La ONU se reunió en Quito.", "Ana"];
        for (i, text) in texts.iter().enumerate() {
            pool.submit(Job {
                annotator: annotator.clone(),
                request: request(text),
                reply: Sent(i, tx.clone()),
            });
        }
        drop(tx);
        assert!(pool.close().join(Instant::now() + Duration::from_secs(30)));
        let mut got: Vec<_> = rx.iter().collect();
        got.sort_by_key(|g| g.0);
        assert_eq!(got.len(), texts.len(), "one outcome per job");
        let mut state = annotator.bundle().engine.state().unwrap();
        for (i, name, outcome) in got {
            assert_eq!(name, "bert-token");
            let alone = found(annotator.annotate(&mut state, texts[i], None));
            assert_eq!(outcome, alone, "{:?}", texts[i]);
        }
        assert_eq!(
            found(annotator.annotate(&mut state, texts[1], None)),
            Err("empty_text")
        );
    }
}
