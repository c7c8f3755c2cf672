//! The MQTT session as a pure state machine: it takes events (a message arrived, a
//! taken message is done, the connection came or went, a signal, a timer) and
//! returns what to do; [`super::serve`] only waits on I/O and carries the actions
//! out. No network, clock or channel in here, so every transition is a unit test.
//!
//! ```text
//!  Online ──deferred, everything held answered──► Resyncing ──our DISCONNECT out──► Online (link Closing → Connecting)
//!  Online / Resyncing ──SIGTERM──► Draining{since}: nothing new, finish what was taken,
//!        `offline` + DISCONNECT once connected and done (or at since + timeout) ──► Stopped
//!        (and Stopped anyway at since + timeout + GRACE: a broker that never answers cannot hold the exit)
//!  link: Connecting ──ConnAck──► Up ──error──► Waiting{until} ──timer──► Connecting
//! ```
//!
//! A reload runs beside the modes: the next configuration loads off the loop, and
//! its switch happens between two events, so a reload changes no mode.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::backlog::Backlog;

/// After `shutdown_timeout`, how long `offline` and the DISCONNECT may take to go
/// out before the daemon exits anyway; the rest of the second bounding a stop is
/// for closing down.
pub const GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Messages taken and not yet answered.
    pub queue: usize,
    /// Bytes of received messages waiting for a slot.
    pub backlog_bytes: usize,
    pub shutdown_timeout: Duration,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

/// What the session is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Taking messages.
    Online,
    /// Messages were deferred and everything held is answered: the session is
    /// being resumed (our DISCONNECT, then a reconnection) so that the broker
    /// delivers them again. Takes nothing new meanwhile: an acknowledgement could
    /// miss the disconnect.
    Resyncing,
    /// Shutting down since `since`: takes nothing new, finishes what it took
    /// (until `since` + `shutdown_timeout`), then publishes `offline` and
    /// disconnects. `left`: that goodbye is on its way.
    Draining { since: Instant, left: bool },
    /// Done: the loop ends.
    Stopped,
}

/// The connection, as the task that polls the MQTT client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Connecting: the client's next poll opens a connection.
    Connecting,
    /// Backing off after a failure until `until`; nothing polls meanwhile.
    Waiting {
        until: Instant,
    },
    Up,
    /// Our DISCONNECT went out (a resume): the broker closes the connection next.
    Closing,
}

/// A reload, beside the modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    Idle,
    Loading,
    /// Asked again while loading: the file may have changed after it was read.
    LoadingThenAgain,
}

/// Why we asked for a DISCONNECT; they go out in the order asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaving {
    Resume,
    Exit,
}

#[derive(Debug, PartialEq)]
pub enum Event<M> {
    Connected {
        session_present: bool,
    },
    Message {
        message: M,
        bytes: usize,
    },
    /// A taken message is done: its outcome is with the client, or it was dropped
    /// unanswered. Its slot is free.
    Finished,
    /// One of our DISCONNECTs went out.
    DisconnectSent,
    ConnectionLost {
        error: String,
    },
    /// A time asked for by [`Session::wake_at`] came.
    Tick,
    Shutdown,
    ReloadRequested,
    Reloaded {
        ok: bool,
    },
}

#[derive(Debug, PartialEq)]
pub enum Action<M> {
    /// Take this message (route, parse, hand to a worker); it holds a slot until
    /// [`Event::Finished`].
    Intake(M),
    /// A message left unacknowledged, fetched again by a session resume;
    /// `first`: the first since the last resume.
    Defer {
        first: bool,
    },
    /// A fresh connection: subscribe to every route, announce `online`.
    Announce {
        session_present: bool,
    },
    /// Everything held is answered and `deferred` messages wait at the broker:
    /// disconnect, so that the next connection resumes the session.
    Resume {
        deferred: u64,
    },
    /// Let the client connect again; `resuming`: after our own disconnect, as
    /// planned, no backoff.
    Reconnect {
        resuming: bool,
    },
    /// The connection failed; connect again after `after`.
    Backoff {
        after: Duration,
        error: String,
    },
    /// Shutdown begins with `in_flight` messages taken.
    Stopping {
        in_flight: usize,
    },
    /// Publish `offline` (retained), then disconnect; `unfinished` messages are
    /// left unacknowledged.
    Leave {
        unfinished: usize,
    },
    StartReload,
    ApplyReload,
    ReloadFailed,
    /// A reload finished after shutdown began: dropped.
    DiscardReload,
    /// Asked to reload while shutting down.
    ReloadIgnored,
    /// End the loop; `offline`: whether the goodbye went out.
    Exit {
        offline: bool,
    },
}

pub struct Session<M> {
    mode: Mode,
    link: Link,
    reload: Reload,
    limits: Limits,
    waiting: Backlog<M>,
    /// Messages left unacknowledged since the last resume.
    deferred: u64,
    in_flight: usize,
    leaving: VecDeque<Leaving>,
    attempt: u32,
    /// Jitter for the backoff, advanced on every use.
    seed: u64,
}

impl<M> Session<M> {
    /// A session whose client is connecting. `seed` jitters the backoff.
    pub fn new(limits: Limits, seed: u64) -> Session<M> {
        Session {
            mode: Mode::Online,
            link: Link::Connecting,
            reload: Reload::Idle,
            waiting: Backlog::new(limits.backlog_bytes),
            limits,
            deferred: 0,
            in_flight: 0,
            leaving: VecDeque::new(),
            attempt: 0,
            seed,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn link(&self) -> Link {
        self.link
    }

    pub fn reload(&self) -> Reload {
        self.reload
    }

    /// Messages taken and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether a message arriving now is counted as received (while shutting down
    /// it is left for the next run).
    pub fn receiving(&self) -> bool {
        matches!(self.mode, Mode::Online | Mode::Resyncing)
    }

    /// When the loop must send a [`Event::Tick`] if nothing else happens first.
    pub fn wake_at(&self, now: Instant) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        let mut consider = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        if let Link::Waiting { until } = self.link {
            consider(until);
        }
        if let Mode::Draining { since, left } = self.mode {
            let deadline = since + self.limits.shutdown_timeout;
            if !left && now < deadline {
                consider(deadline);
            }
            consider(deadline + GRACE);
        }
        at
    }

    pub fn handle(&mut self, event: Event<M>, now: Instant) -> Vec<Action<M>> {
        if self.mode == Mode::Stopped {
            return Vec::new();
        }
        match event {
            Event::Connected { session_present } => self.connected(session_present, now),
            Event::Message { message, bytes } => self.message(message, bytes),
            Event::Finished => self.finished(now),
            Event::DisconnectSent => self.disconnect_sent(),
            Event::ConnectionLost { error } => self.lost(error, now),
            Event::Tick => self.tick(now),
            Event::Shutdown => self.shutdown(now),
            Event::ReloadRequested => self.reload_requested(),
            Event::Reloaded { ok } => self.reloaded(ok),
        }
    }

    fn connected(&mut self, session_present: bool, now: Instant) -> Vec<Action<M>> {
        self.link = Link::Up;
        self.attempt = 0;
        if session_present {
            // The broker sends every unacknowledged message again: keeping our
            // copies would answer them twice.
            self.waiting.clear();
        } else {
            // The client drops what was queued for a session the broker no longer
            // has, our DISCONNECTs included.
            self.leaving.clear();
        }
        // Resumed, they come again; without a session, the broker dropped them.
        self.deferred = 0;
        match self.mode {
            Mode::Online => vec![Action::Announce { session_present }],
            Mode::Resyncing => {
                if !self.leaving.contains(&Leaving::Resume) {
                    self.mode = Mode::Online;
                }
                vec![Action::Announce { session_present }]
            }
            Mode::Draining { since, left } => {
                let left = left && !self.leaving.is_empty();
                self.mode = Mode::Draining { since, left };
                let overdue = now >= since + self.limits.shutdown_timeout;
                if !left && (self.in_flight == 0 || overdue) {
                    self.leave()
                } else {
                    Vec::new()
                }
            }
            Mode::Stopped => Vec::new(),
        }
    }

    fn message(&mut self, message: M, bytes: usize) -> Vec<Action<M>> {
        match self.mode {
            Mode::Online => {
                if self.in_flight < self.limits.queue && self.waiting.is_empty() {
                    self.in_flight += 1;
                    vec![Action::Intake(message)]
                } else if self.waiting.fits(bytes) {
                    self.waiting.push(message, bytes);
                    Vec::new()
                } else {
                    self.deferred += 1;
                    vec![Action::Defer {
                        first: self.deferred == 1,
                    }]
                }
            }
            Mode::Resyncing => {
                self.deferred += 1;
                vec![Action::Defer { first: false }]
            }
            // Left unacknowledged: the broker delivers it after a restart.
            Mode::Draining { .. } | Mode::Stopped => Vec::new(),
        }
    }

    fn finished(&mut self, now: Instant) -> Vec<Action<M>> {
        self.in_flight = self.in_flight.saturating_sub(1);
        match self.mode {
            Mode::Online => {
                let mut actions = Vec::new();
                if let Some(message) = self.waiting.pop() {
                    self.in_flight += 1;
                    actions.push(Action::Intake(message));
                }
                let caught_up = self.waiting.is_empty() && self.in_flight == 0;
                if self.deferred > 0 && caught_up && self.link == Link::Up {
                    self.mode = Mode::Resyncing;
                    self.leaving.push_back(Leaving::Resume);
                    actions.push(Action::Resume {
                        deferred: self.deferred,
                    });
                }
                actions
            }
            Mode::Draining { since, left } => {
                let overdue = now >= since + self.limits.shutdown_timeout;
                if !left && (self.in_flight == 0 || overdue) {
                    self.leave()
                } else {
                    Vec::new()
                }
            }
            Mode::Resyncing | Mode::Stopped => Vec::new(),
        }
    }

    /// `offline` and a DISCONNECT, once nothing else of ours is on its way out
    /// (a resume's DISCONNECT first: what follows it could be lost with its
    /// connection).
    fn leave(&mut self) -> Vec<Action<M>> {
        let Mode::Draining { since, .. } = self.mode else {
            return Vec::new();
        };
        if self.link != Link::Up || !self.leaving.is_empty() {
            return Vec::new();
        }
        self.mode = Mode::Draining { since, left: true };
        self.leaving.push_back(Leaving::Exit);
        vec![Action::Leave {
            unfinished: self.in_flight,
        }]
    }

    fn disconnect_sent(&mut self) -> Vec<Action<M>> {
        match self.leaving.pop_front() {
            Some(Leaving::Exit) => {
                self.mode = Mode::Stopped;
                vec![Action::Exit { offline: true }]
            }
            // A resume (or a disconnect queued before its session was lost): the
            // broker closes the connection, and the next one resumes the session.
            Some(Leaving::Resume) | None => {
                self.link = Link::Closing;
                self.waiting.clear();
                self.deferred = 0;
                if self.mode == Mode::Resyncing {
                    self.mode = Mode::Online;
                }
                Vec::new()
            }
        }
    }

    fn lost(&mut self, error: String, now: Instant) -> Vec<Action<M>> {
        if self.link == Link::Closing {
            self.link = Link::Connecting;
            return vec![Action::Reconnect { resuming: true }];
        }
        let after = backoff(
            self.attempt,
            self.limits.reconnect_min_ms,
            self.limits.reconnect_max_ms,
            self.seed,
        );
        self.seed = splitmix64(self.seed);
        self.attempt = self.attempt.saturating_add(1);
        self.link = Link::Waiting { until: now + after };
        vec![Action::Backoff { after, error }]
    }

    fn tick(&mut self, now: Instant) -> Vec<Action<M>> {
        let mut actions = Vec::new();
        if let Link::Waiting { until } = self.link {
            if now >= until {
                self.link = Link::Connecting;
                actions.push(Action::Reconnect { resuming: false });
            }
        }
        if let Mode::Draining { since, left } = self.mode {
            let deadline = since + self.limits.shutdown_timeout;
            if now >= deadline + GRACE {
                self.mode = Mode::Stopped;
                return vec![Action::Exit { offline: false }];
            }
            if now >= deadline && !left {
                match self.link {
                    Link::Up => actions.extend(self.leave()),
                    // Nothing under way could reach a broker now.
                    Link::Waiting { .. } => {
                        self.mode = Mode::Stopped;
                        return vec![Action::Exit { offline: false }];
                    }
                    // A connection or a resume under way: GRACE to finish it.
                    Link::Connecting | Link::Closing => {}
                }
            }
        }
        actions
    }

    fn shutdown(&mut self, now: Instant) -> Vec<Action<M>> {
        if !matches!(self.mode, Mode::Online | Mode::Resyncing) {
            return Vec::new();
        }
        self.mode = Mode::Draining {
            since: now,
            left: false,
        };
        // Not taken: left unacknowledged for the next run.
        self.waiting.clear();
        let mut actions = vec![Action::Stopping {
            in_flight: self.in_flight,
        }];
        if self.in_flight == 0 {
            actions.extend(self.leave());
        }
        actions
    }

    fn reload_requested(&mut self) -> Vec<Action<M>> {
        if !matches!(self.mode, Mode::Online | Mode::Resyncing) {
            return vec![Action::ReloadIgnored];
        }
        match self.reload {
            Reload::Idle => {
                self.reload = Reload::Loading;
                vec![Action::StartReload]
            }
            Reload::Loading | Reload::LoadingThenAgain => {
                self.reload = Reload::LoadingThenAgain;
                Vec::new()
            }
        }
    }

    fn reloaded(&mut self, ok: bool) -> Vec<Action<M>> {
        let again = self.reload == Reload::LoadingThenAgain;
        self.reload = Reload::Idle;
        if !matches!(self.mode, Mode::Online | Mode::Resyncing) {
            return vec![Action::DiscardReload];
        }
        let mut actions = vec![if ok {
            Action::ApplyReload
        } else {
            Action::ReloadFailed
        }];
        if again {
            self.reload = Reload::Loading;
            actions.push(Action::StartReload);
        }
        actions
    }
}

/// Jittered exponential backoff: full jitter over `[min, min·2^attempt]`, capped.
pub fn backoff(attempt: u32, min_ms: u64, max_ms: u64, seed: u64) -> Duration {
    let ceiling = min_ms
        .saturating_mul(1u64 << attempt.min(20))
        .min(max_ms)
        .max(min_ms);
    Duration::from_millis(min_ms + splitmix64(seed) % (ceiling - min_ms + 1))
}

/// splitmix64: cheap, and no RNG crate for one number.
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn session(queue: usize, backlog_bytes: usize) -> Session<u32> {
        Session::new(
            Limits {
                queue,
                backlog_bytes,
                shutdown_timeout: TIMEOUT,
                reconnect_min_ms: 100,
                reconnect_max_ms: 5_000,
            },
            7,
        )
    }

    /// A session that is connected, at `t0`.
    fn online(queue: usize, backlog_bytes: usize) -> (Session<u32>, Instant) {
        let mut s = session(queue, backlog_bytes);
        let t0 = Instant::now();
        let a = s.handle(
            Event::Connected {
                session_present: false,
            },
            t0,
        );
        assert_eq!(
            a,
            [Action::Announce {
                session_present: false
            }]
        );
        (s, t0)
    }

    fn msg(message: u32) -> Event<u32> {
        Event::Message { message, bytes: 10 }
    }

    #[test]
    fn deferral_and_resume() {
        // Two slots, room for two waiting messages of 10 bytes.
        let (mut s, t) = online(2, 20);
        assert_eq!(s.handle(msg(1), t), [Action::Intake(1)]);
        assert_eq!(s.handle(msg(2), t), [Action::Intake(2)]);
        assert_eq!(s.handle(msg(3), t), []);
        assert_eq!(s.handle(msg(4), t), []);
        assert_eq!(s.handle(msg(5), t), [Action::Defer { first: true }]);
        assert_eq!(s.handle(msg(6), t), [Action::Defer { first: false }]);
        assert_eq!((s.in_flight(), s.waiting()), (2, 2));
        // Slots free up: the waiting list goes first, in order.
        assert_eq!(s.handle(Event::Finished, t), [Action::Intake(3)]);
        assert_eq!(s.handle(Event::Finished, t), [Action::Intake(4)]);
        assert_eq!(s.handle(Event::Finished, t), []);
        // Caught up with two deferred: resume the session.
        assert_eq!(
            s.handle(Event::Finished, t),
            [Action::Resume { deferred: 2 }]
        );
        assert_eq!(s.mode(), Mode::Resyncing);
        // Nothing is taken until the disconnect is out.
        assert_eq!(s.handle(msg(7), t), [Action::Defer { first: false }]);
        assert_eq!(s.in_flight(), 0);
        assert_eq!(s.handle(Event::DisconnectSent, t), []);
        assert_eq!((s.mode(), s.link()), (Mode::Online, Link::Closing));
        // The broker closes as asked: reconnect at once, no backoff.
        let lost = Event::ConnectionLost {
            error: "closed".into(),
        };
        assert_eq!(s.handle(lost, t), [Action::Reconnect { resuming: true }]);
        assert_eq!(s.link(), Link::Connecting);
        let resumed = Event::Connected {
            session_present: true,
        };
        assert_eq!(
            s.handle(resumed, t),
            [Action::Announce {
                session_present: true
            }]
        );
        // The deferred ones come again and are taken.
        assert_eq!(s.handle(msg(5), t), [Action::Intake(5)]);
    }

    #[test]
    fn a_lost_connection_backs_off_and_a_resumed_session_is_not_answered_twice() {
        let (mut s, t) = online(1, 100);
        assert_eq!(s.handle(msg(1), t), [Action::Intake(1)]);
        assert_eq!(s.handle(msg(2), t), []);
        let lost = |e: &str| Event::ConnectionLost { error: e.into() };
        let [Action::Backoff { after, .. }] = s.handle(lost("reset"), t)[..] else {
            panic!("backoff expected")
        };
        assert!(
            (100..=100).contains(&(after.as_millis() as u64)),
            "first wait is min"
        );
        assert_eq!(s.wake_at(t), Some(t + after));
        assert_eq!(s.handle(Event::Tick, t), [], "not yet");
        assert_eq!(
            s.handle(Event::Tick, t + after),
            [Action::Reconnect { resuming: false }]
        );
        let [Action::Backoff { after: second, .. }] = s.handle(lost("refused"), t)[..] else {
            panic!("backoff expected")
        };
        assert!((100..=200).contains(&(second.as_millis() as u64)));
        s.handle(Event::Tick, t + second);
        s.handle(
            Event::Connected {
                session_present: true,
            },
            t,
        );
        // Message 2 is delivered again by the broker: the old copy is gone.
        assert_eq!(s.waiting(), 0);
        assert_eq!(s.handle(Event::Finished, t), []);
        assert_eq!(s.handle(msg(2), t), [Action::Intake(2)]);
    }

    #[test]
    fn drain_with_a_broker() {
        let (mut s, t) = online(4, 100);
        s.handle(msg(1), t);
        s.handle(msg(2), t);
        assert_eq!(
            s.handle(Event::Shutdown, t),
            [Action::Stopping { in_flight: 2 }]
        );
        // Nothing new is taken.
        assert_eq!(s.handle(msg(3), t), []);
        assert!(!s.receiving());
        assert_eq!(s.handle(Event::ReloadRequested, t), [Action::ReloadIgnored]);
        assert_eq!(s.handle(Event::Finished, t), []);
        assert_eq!(
            s.handle(Event::Finished, t),
            [Action::Leave { unfinished: 0 }]
        );
        assert_eq!(
            s.handle(Event::DisconnectSent, t),
            [Action::Exit { offline: true }]
        );
        assert_eq!(s.mode(), Mode::Stopped);
        assert_eq!(s.handle(msg(4), t), []);
    }

    #[test]
    fn drain_past_its_timeout_leaves_the_rest_unacknowledged() {
        let (mut s, t) = online(4, 100);
        s.handle(msg(1), t);
        s.handle(Event::Shutdown, t);
        assert_eq!(s.wake_at(t), Some(t + TIMEOUT));
        assert_eq!(
            s.handle(Event::Tick, t + TIMEOUT),
            [Action::Leave { unfinished: 1 }]
        );
        // The goodbye never goes out (a wedged connection): exit anyway.
        assert_eq!(s.wake_at(t + TIMEOUT), Some(t + TIMEOUT + GRACE));
        assert_eq!(
            s.handle(Event::Tick, t + TIMEOUT + GRACE),
            [Action::Exit { offline: false }]
        );
    }

    #[test]
    fn drain_without_a_broker() {
        let (mut s, t) = online(4, 100);
        s.handle(
            Event::ConnectionLost {
                error: "refused".into(),
            },
            t,
        );
        assert_eq!(
            s.handle(Event::Shutdown, t),
            [Action::Stopping { in_flight: 0 }],
            "no goodbye without a connection"
        );
        // Still trying to reach a broker to say offline, until the deadline: then
        // out, whatever the backoff had planned.
        let mut now = t;
        let mut attempts = 0;
        loop {
            now = s.wake_at(now).expect("a deadline at least");
            match &s.handle(Event::Tick, now)[..] {
                [Action::Reconnect { resuming: false }] => {
                    attempts += 1;
                    let refused = Event::ConnectionLost {
                        error: "refused".into(),
                    };
                    s.handle(refused, now);
                }
                [Action::Exit { offline: false }] => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(now, t + TIMEOUT);
        assert!(attempts >= 3, "{attempts} attempts");
    }

    #[test]
    fn drain_reaching_the_broker_late_still_says_offline() {
        let (mut s, t) = online(4, 100);
        s.handle(
            Event::ConnectionLost {
                error: "refused".into(),
            },
            t,
        );
        s.handle(Event::Shutdown, t);
        let t1 = t + Duration::from_secs(1);
        s.handle(Event::Tick, t1);
        assert_eq!(
            s.handle(
                Event::Connected {
                    session_present: true
                },
                t1
            ),
            [Action::Leave { unfinished: 0 }],
            "no subscriptions, no online: just the goodbye"
        );
    }

    #[test]
    fn shutdown_during_a_resume() {
        let (mut s, t) = online(1, 10);
        s.handle(msg(1), t);
        s.handle(msg(2), t);
        s.handle(msg(3), t);
        s.handle(Event::Finished, t);
        assert_eq!(
            s.handle(Event::Finished, t),
            [Action::Resume { deferred: 1 }]
        );
        // SIGTERM while the resume's DISCONNECT is still queued: the goodbye must
        // not follow it onto a closing connection.
        assert_eq!(
            s.handle(Event::Shutdown, t),
            [Action::Stopping { in_flight: 0 }]
        );
        // That DISCONNECT is the resume's, not the exit's.
        assert_eq!(s.handle(Event::DisconnectSent, t), []);
        assert!(matches!(s.mode(), Mode::Draining { left: false, .. }));
        assert_eq!(
            s.handle(
                Event::ConnectionLost {
                    error: "closed".into()
                },
                t
            ),
            [Action::Reconnect { resuming: true }]
        );
        assert_eq!(
            s.handle(
                Event::Connected {
                    session_present: true
                },
                t
            ),
            [Action::Leave { unfinished: 0 }]
        );
        assert_eq!(
            s.handle(Event::DisconnectSent, t),
            [Action::Exit { offline: true }]
        );
    }

    #[test]
    fn reload_during_a_drain() {
        let (mut s, t) = online(2, 100);
        s.handle(msg(1), t);
        assert_eq!(s.handle(Event::ReloadRequested, t), [Action::StartReload]);
        assert_eq!(s.reload(), Reload::Loading);
        s.handle(Event::Shutdown, t);
        // The models loaded meanwhile are not switched to.
        assert_eq!(
            s.handle(Event::Reloaded { ok: true }, t),
            [Action::DiscardReload]
        );
        assert_eq!(s.handle(Event::ReloadRequested, t), [Action::ReloadIgnored]);
        assert_eq!(s.reload(), Reload::Idle);
        assert_eq!(
            s.handle(Event::Finished, t),
            [Action::Leave { unfinished: 0 }]
        );
    }

    #[test]
    fn reload_keeps_taking_messages_and_runs_again_if_asked_meanwhile() {
        let (mut s, t) = online(2, 100);
        assert_eq!(s.handle(Event::ReloadRequested, t), [Action::StartReload]);
        assert_eq!(s.handle(msg(1), t), [Action::Intake(1)]);
        assert_eq!(s.handle(Event::ReloadRequested, t), []);
        assert_eq!(
            s.handle(Event::Reloaded { ok: false }, t),
            [Action::ReloadFailed, Action::StartReload]
        );
        assert_eq!(
            s.handle(Event::Reloaded { ok: true }, t),
            [Action::ApplyReload]
        );
        assert_eq!((s.reload(), s.mode()), (Reload::Idle, Mode::Online));
        assert_eq!(s.in_flight(), 1, "a reload changes no count");
    }

    #[test]
    fn a_lost_session_drops_queued_disconnects() {
        let (mut s, t) = online(1, 10);
        s.handle(msg(1), t);
        s.handle(msg(2), t);
        s.handle(msg(3), t);
        s.handle(Event::Finished, t);
        s.handle(Event::Finished, t);
        assert_eq!(s.mode(), Mode::Resyncing);
        // Lost before the resume's DISCONNECT went out; the broker lost the session.
        s.handle(
            Event::ConnectionLost {
                error: "reset".into(),
            },
            t,
        );
        s.handle(Event::Tick, t + Duration::from_secs(1));
        s.handle(
            Event::Connected {
                session_present: false,
            },
            t,
        );
        assert_eq!(s.mode(), Mode::Online, "no resume left to wait for");
        assert_eq!(s.handle(msg(4), t), [Action::Intake(4)]);
    }

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
