//! Shared by the daemon tests and the flood benchmark: a real Mosquitto on a free
//! loopback port, the daemon as a child process, and a rumqttc client as the device.
#![allow(dead_code)]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};
use serde_json::Value;

pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    conf: PathBuf,
    pub dir: TempDir,
}

impl Broker {
    fn spawn(&mut self) {
        assert!(
            self.try_spawn(&[]),
            "mosquitto did not start on port {}",
            self.port
        );
    }

    /// Starts Mosquitto and waits until it accepts on its port and on `also`; false
    /// if it exited first (a port taken meanwhile by someone else) or never did.
    fn try_spawn(&mut self, also: &[u16]) -> bool {
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let accepting = |port: u16| TcpStream::connect(("127.0.0.1", port)).is_ok();
        while !(accepting(self.port) && also.iter().all(|p| accepting(*p))) {
            let exited = self.child.as_mut().unwrap().try_wait().unwrap().is_some();
            if exited || Instant::now() > deadline {
                if let Some(mut child) = self.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Graceful stop (SIGTERM): with persistence on, the broker saves its sessions
    /// and queued messages first.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is read or
    /// acknowledged, a broker that hangs rather than one that dies.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused broker (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let pid = self.child.as_ref().expect("broker running").id();
        let ok = Command::new("kill")
            .args([which, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {which} {pid}");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = std::env::temp_dir().join(format!("anotador-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The anotador the daemon tests start: this build's, or `ANOTADOR_TEST_BIN` (another
/// build, such as an earlier commit's, to show what a change fixed).
pub fn anotador_bin() -> PathBuf {
    std::env::var_os("ANOTADOR_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_anotador")))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn mosquitto_binary() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("mosquitto is not installed: `apt-get install mosquitto` (Debian), as .ci/run does");
}

/// `extra` is appended to the broker configuration (later settings win).
pub fn start_broker_with(extra: &str) -> Broker {
    start_broker_with_listener(|_| extra.to_string()).0
}

/// A broker whose extra configuration `extra(port)` has a second listener of its
/// own on `port`. Ports are picked free and then bound by Mosquitto, so another
/// process can take one in between: then it starts again on new ones.
pub fn start_broker_with_listener(extra: impl Fn(u16) -> String) -> (Broker, u16) {
    let dir = TempDir::new("broker");
    let conf = dir.0.join("mosquitto.conf");
    let log = match std::env::var("ANOTADOR_TEST_BROKER_LOG") {
        Ok(path) => format!("log_type all\nlog_dest file {path}\n"),
        Err(_) => String::new(),
    };
    let mut broker = Broker {
        child: None,
        port: 0,
        conf,
        dir,
    };
    for _ in 0..10 {
        broker.port = free_port();
        let second = free_port();
        let extra = extra(second);
        // `user root`: a broker started as root otherwise drops to the mosquitto
        // user, which cannot write the test's persistence folder.
        std::fs::write(
            &broker.conf,
            format!(
                "user root\nlistener {} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 10000\n{extra}\n{log}",
                broker.port
            ),
        )
        .unwrap();
        let also: &[u16] = if extra.contains(&format!("listener {second} ")) {
            &[second]
        } else {
            &[]
        };
        if broker.try_spawn(also) {
            return (broker, second);
        }
    }
    panic!(
        "mosquitto did not start in 10 tries: {}",
        broker.conf.display()
    );
}

/// A TCP relay in front of the broker whose path can be cut (every connection
/// closed, new ones refused) and restored: the network failing, not the broker.
pub struct Proxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    streams: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let streams = std::sync::Arc::new(std::sync::Mutex::new(Vec::<TcpStream>::new()));
        let (c, st) = (cut.clone(), streams.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if c.load(Ordering::SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
                let mut list = st.lock().unwrap();
                list.push(client);
                list.push(server);
            }
        });
        Proxy { port, cut, streams }
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[path = "../fixture/mod.rs"]
mod fixture_files;

/// A committed fixture bundle's path, as the config files want it.
pub fn fixture(name: &str) -> String {
    fixture_files::dir(name).display().to_string()
}

/// A config with an NER route (JSON payloads) and a classification route (raw text).
pub fn write_config(dir: &Path, port: u16, client_id: &str, extra_daemon: &str) -> PathBuf {
    let path = dir.join("anotador.toml");
    let mut f = std::fs::File::create(&path).unwrap();
    write!(
        f,
        r#"
[daemon]
name = "t"
stats_interval_s = 1
max_payload_bytes = 2048
queue = 8
{extra_daemon}

[broker]
port = {port}
client_id = "{client_id}"
reconnect_min_ms = 50
reconnect_max_ms = 500

[models.ner]
path = "{ner}"
workers = 2
max_windows = 4
# Micro-batches in every daemon and fault test: one outcome per message still.
max_batch = 4

[models.cls]
path = "{cls}"

[[routes]]
topic = "in/ner/+"
model = "ner"
output = "out/ner/{{1}}"
errors = "err/ner/{{1}}"

[[routes]]
topic = "in/cls"
model = "cls"
format = "text"
output = "out/cls"
errors = "err/cls"
[routes.options]
top_k = 0

[models.qa]
path = "{qa}"

[[routes]]
topic = "in/qa"
model = "qa"
output = "out/qa"
errors = "err/qa"
[routes.options]
top_k = 2
"#,
        ner = fixture("bert-token"),
        cls = fixture("bert-seq"),
        qa = fixture("bert-qa"),
    )
    .unwrap();
    path
}

/// The daemon under test; its log goes to a file (a pipe nobody reads would fill
/// and stall it).
pub struct Daemon(pub Child, PathBuf);

impl Daemon {
    pub fn start(config: &Path) -> Daemon {
        Daemon::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Daemon {
        let log = config.with_extension(format!(
            "log.{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = Command::new(anotador_bin())
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon(child, log)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        sigterm(self.0.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then how long the daemon took to exit.
    pub fn terminate_timed(&mut self) -> (std::process::ExitStatus, Duration) {
        let sent = Instant::now();
        self.signal("-TERM");
        let status = self.wait_exit(Duration::from_secs(60));
        (status, sent.elapsed())
    }

    /// Waits for the daemon to exit (polled every 10 ms).
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "daemon did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal (`-TERM`, `-HUP`…) with `kill`.
    pub fn signal(&self, which: &str) {
        let ok = Command::new("kill")
            .args([which, &self.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {which}");
    }

    /// How many log lines contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until at least `n` log lines contain `needle`; false on timeout.
    pub fn wait_log(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.log_count(needle) < n {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    pub fn stderr(mut self) -> String {
        self.kill();
        std::fs::read_to_string(&self.1).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn sigterm(pid: u32) {
    // `kill -TERM`: no libc binding needed for one signal.
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Counts each `out/…` answer per input id into `answered`.
pub fn count_answers(
    answered: &mut std::collections::HashMap<i64, usize>,
    got: &[(String, Value)],
) {
    for (t, v) in got {
        if t.starts_with("out/") {
            *answered.entry(v["id"].as_i64().unwrap()).or_default() += 1;
        }
    }
}

/// After a restart: collects until every id below `total` has an answer (or the
/// timeout), counts what came, and returns the ids never answered and the number
/// of duplicates.
pub fn collect_the_rest(
    device: &Device,
    answered: &mut std::collections::HashMap<i64, usize>,
    total: usize,
    timeout: Duration,
) -> (Vec<usize>, usize) {
    let rest = device.collect(timeout, |g| {
        let mut seen: std::collections::HashSet<i64> = answered.keys().copied().collect();
        for (t, v) in g {
            if t.starts_with("out/") {
                seen.insert(v["id"].as_i64().unwrap());
            }
        }
        seen.len() >= total
    });
    count_answers(answered, &rest);
    let lost = (0..total)
        .filter(|i| !answered.contains_key(&(*i as i64)))
        .collect();
    let duplicates = answered.values().map(|n| n - 1).sum();
    (lost, duplicates)
}

/// A device: publishes inputs, collects everything on `out/#`, `err/#` and `anotador/#`.
pub struct Device {
    pub client: Client,
    pub rx: Receiver<(String, Vec<u8>, bool)>,
}

impl Device {
    pub fn connect(port: u16, id: &str) -> Device {
        Device::connect_with(MqttOptions::new(id, "127.0.0.1", port))
    }

    /// A device whose subscriptions and undelivered results survive its own
    /// disconnections (what a real consumer of the results would use).
    pub fn connect_persistent(port: u16, id: &str) -> Device {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_clean_session(false);
        Device::connect_with(opts)
    }

    pub fn connect_with_credentials(port: u16, id: &str, user: &str, password: &str) -> Device {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_credentials(user, password);
        Device::connect_with(opts)
    }

    pub fn connect_with(mut opts: MqttOptions) -> Device {
        opts.set_keep_alive(Duration::from_secs(5));
        // Room for the oversize payloads the daemon must answer (1 MiB and more).
        opts.set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut connection) = Client::new(opts, 20_000);
        let (tx, rx) = channel();
        let (ready_tx, ready) = channel();
        let sub = client.clone();
        const FILTERS: [&str; 3] = ["out/#", "err/#", "anotador/#"];
        std::thread::spawn(move || {
            let mut subacks = 0;
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        for t in FILTERS {
                            let _ = sub.subscribe(t, QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        subacks += 1;
                        if subacks == FILTERS.len() {
                            let _ = ready_tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        if tx
                            .send((p.topic.clone(), p.payload.to_vec(), p.retain))
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        // Subscribed before anything is published or awaited: no message can pass
        // unseen, whatever the machine's load (a fixed sleep here once could).
        ready
            .recv_timeout(Duration::from_secs(30))
            .expect("the device's subscriptions acknowledged within 30 s");
        Device { client, rx }
    }

    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .unwrap();
    }

    /// Collects messages until `done` says so or the timeout passes.
    pub fn collect(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[(String, Value)]) -> bool,
    ) -> Vec<(String, Value)> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while !done(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let Ok((topic, payload, _)) =
                self.rx.recv_timeout(left.min(Duration::from_millis(200)))
            {
                let v = serde_json::from_slice(&payload).unwrap_or(Value::Null);
                got.push((topic, v));
            }
        }
        got
    }
}

pub fn start_broker() -> Broker {
    start_broker_with("")
}

/// Resident and peak resident memory of a process, in bytes, from /proc.
pub fn rss_of(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Whether daemon `t` announced `status` ("online" / "offline") within `timeout`,
/// with everything the device received meanwhile.
pub fn saw_status(
    device: &Device,
    status: &str,
    timeout: Duration,
) -> (bool, Vec<(String, Value)>) {
    let is_it = |(t, v): &(String, Value)| t == "anotador/t/status" && v["status"] == status;
    let got = device.collect(timeout, |g| g.iter().any(is_it));
    (got.iter().any(is_it), got)
}

/// The retained status of daemon `t`, as a client connecting now reads it.
pub fn retained_status(port: u16, client_id: &str) -> Value {
    let device = Device::connect(port, client_id);
    let got = device.collect(Duration::from_secs(10), |g| {
        g.iter().any(|(t, _)| t == "anotador/t/status")
    });
    got.into_iter()
        .find(|(t, _)| t == "anotador/t/status")
        .map(|(_, v)| v)
        .unwrap_or(Value::Null)
}

/// Waits for a status of daemon `t` that satisfies `ok`; returns it, or panics
/// with everything received.
pub fn wait_status(device: &Device, timeout: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    let is_it = |(t, v): &(String, Value)| t == "anotador/t/status" && ok(v);
    let got = device.collect(timeout, |g| g.iter().any(is_it));
    match got.iter().find(|m| is_it(m)) {
        Some((_, v)) => v.clone(),
        None => panic!("no such status within {timeout:?}: {got:?}"),
    }
}

pub fn wait_online(device: &Device) {
    let (online, got) = saw_status(device, "online", Duration::from_secs(30));
    assert!(online, "daemon never announced itself online: {got:?}");
}

/// The benchmarks' daemon: one model (`model_keys`: extra `[models.m]` lines) behind
/// one route, `in/+` → `out/{1}`, errors on `err/{1}`. Returns the config's path.
pub fn bench_config(dir: &TempDir, port: u16, model: &str, model_keys: &str) -> PathBuf {
    let config = dir.0.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[daemon]
name = "t"
stats_interval_s = 3600
queue = 32
max_payload_bytes = 65536
[broker]
port = {port}
client_id = "bench"
[models.m]
path = "{model}"
{model_keys}
[[routes]]
topic = "in/+"
model = "m"
output = "out/{{1}}"
errors = "err/{{1}}"
"#
        ),
    )
    .unwrap();
    config
}

/// The config of [`write_config`] served through the daemon's embedded broker on
/// `listen` (`127.0.0.1:0`: a free port, read back with [`embedded_port`]), its
/// sessions and messages in `data_dir` when given.
pub fn write_config_embedded(
    dir: &Path,
    listen: &str,
    client_id: &str,
    data_dir: Option<&Path>,
) -> PathBuf {
    let path = write_config(dir, 0, client_id, "");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut text = text.replacen("port = 0\n", "", 1);
    text.push_str(&format!("\n[broker.embedded]\nlisten = \"{listen}\"\n"));
    if let Some(data) = data_dir {
        text.push_str(&format!("data_dir = \"{}\"\n", data.display()));
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// Lets the NER route (`in/ner/+`) answer MQTT 5 requests whose response topic
/// matches `filter`.
pub fn allow_responses(config: &Path, filter: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    let route = "errors = \"err/ner/{1}\"\n";
    assert!(text.contains(route));
    let text = text.replacen(route, &format!("{route}responses = \"{filter}\"\n"), 1);
    std::fs::write(config, text).unwrap();
}

/// The port the daemon's embedded broker bound, from its log line
/// "embedded broker listening on ADDR".
pub fn embedded_port(daemon: &Daemon) -> u16 {
    let needle = "embedded broker listening on ";
    assert!(
        daemon.wait_log(needle, 1, Duration::from_secs(60)),
        "no embedded broker: {}",
        daemon.log()
    );
    let log = daemon.log();
    let line = log.lines().find(|l| l.contains(needle)).unwrap();
    let addr = line.split(needle).nth(1).unwrap();
    let addr: std::net::SocketAddr = addr.split_whitespace().next().unwrap().parse().unwrap();
    addr.port()
}

/// `anotador ask ARGS…` against the broker on `port`, with `input` on stdin.
pub fn ask(port: u16, args: &[&str], input: &str) -> std::process::Output {
    let mut child = Command::new(anotador_bin())
        .args(["ask", "--port", &port.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// An MQTT 5 client (rumqttc v5) that sees everything published on `#`, with the
/// properties request/response cares about.
pub struct V5Device {
    pub client: rumqttc::v5::Client,
    pub rx: Receiver<V5Message>,
}

#[derive(Debug, Clone)]
pub struct V5Message {
    pub topic: String,
    pub payload: Value,
    pub correlation: Option<Vec<u8>>,
    pub user_properties: Vec<(String, String)>,
}

impl V5Device {
    pub fn connect(port: u16, id: &str) -> V5Device {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{Client, Event};
        let mut opts = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(Some(8 << 20));
        let (client, mut connection) = Client::new(opts, 1000);
        let (tx, rx) = channel();
        let (sub, (ready_tx, ready)) = (client.clone(), channel());
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub.subscribe("#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let props = p.properties.clone().unwrap_or_default();
                        let message = V5Message {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: serde_json::from_slice(&p.payload).unwrap_or(Value::Null),
                            correlation: props.correlation_data.map(|c| c.to_vec()),
                            user_properties: props.user_properties,
                        };
                        if tx.send(message).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        ready
            .recv_timeout(Duration::from_secs(20))
            .expect("the v5 device subscribed");
        V5Device { client, rx }
    }

    /// Publishes a request: `reply_to` and `correlation` as MQTT 5 properties.
    pub fn request(
        &self,
        topic: &str,
        payload: &str,
        reply_to: Option<&str>,
        correlation: &[u8],
        user: &[(&str, &str)],
    ) {
        let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
            response_topic: reply_to.map(String::from),
            correlation_data: Some(correlation.to_vec().into()),
            user_properties: user
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        self.client
            .publish_with_properties(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload.to_string(),
                props,
            )
            .unwrap();
    }

    /// Collects messages until `done` says so or the timeout passes.
    pub fn collect(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[V5Message]) -> bool,
    ) -> Vec<V5Message> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while !done(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let Ok(m) = self.rx.recv_timeout(left.min(Duration::from_millis(200))) {
                got.push(m);
            }
        }
        got
    }
}

/// A sensor as a real one behaves: QoS 1 publishes on a persistent session, resent by
/// rumqttc after every reconnection until the broker acknowledges them (PUBACK), and
/// a record of which it acknowledged: what a test of "nothing acknowledged is lost"
/// must count, rather than what it merely sent. One publish in flight per sensor, so
/// that each PUBACK names its message beyond doubt (rumqttc reports packet ids, not
/// messages; a mapping of the two across reconnections went wrong under a CPU hog);
/// run several sensors for a window.
pub struct AckedPublisher {
    client: Client,
    acks: std::sync::Mutex<Receiver<()>>,
    acked: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<i64>>>,
}

impl AckedPublisher {
    pub fn connect(port: u16, id: &str) -> AckedPublisher {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_clean_session(false);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut connection) = Client::new(opts, 10);
        let (acks_tx, acks) = channel();
        let (connected_tx, connected_rx) = channel();
        std::thread::spawn(move || {
            let mut connected = Some(connected_tx);
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Incoming::PubAck(_))) => {
                        if acks_tx.send(()).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        if let Some(c) = connected.take() {
                            let _ = c.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        // Nothing is published before the session exists: rumqttc drops requests
        // queued across a failed first attempt when the CONNACK says the session is new.
        connected_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the sensor connected within 30 s");
        AckedPublisher {
            client,
            acks: std::sync::Mutex::new(acks),
            acked: Default::default(),
        }
    }

    /// Publishes `{"id": id, "text": text}` at QoS 1 and returns once the broker has
    /// acknowledged it: rumqttc resends it after reconnecting; if 30 s pass without
    /// a PUBACK (a request dropped with a lost session), it is published again.
    pub fn publish(&self, topic: &str, id: i64, text: &str) {
        let payload = serde_json::json!({"id": id, "text": text}).to_string();
        loop {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, payload.clone())
                .unwrap();
            let ack = self
                .acks
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(30));
            if ack.is_ok() {
                self.acked.lock().unwrap().insert(id);
                return;
            }
        }
    }

    /// The ids the broker has acknowledged so far.
    pub fn acked(&self) -> std::collections::HashSet<i64> {
        self.acked.lock().unwrap().clone()
    }
}

/// A seed for a test's random choices: `ANOTADOR_TEST_SEED` to replay one, else the
/// clock; printed so that a failure names the seed that reproduces it.
pub fn test_seed(test: &str) -> u64 {
    let seed = std::env::var("ANOTADOR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("{test}: ANOTADOR_TEST_SEED={seed}");
    seed
}

/// A number in `range` from `state` (xorshift64*), for kill points and the like.
pub fn pick(state: &mut u64, range: std::ops::Range<usize>) -> usize {
    if *state == 0 {
        *state = 0x9e37_79b9_7f4a_7c15;
    }
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    let x = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
    range.start + (x % (range.end - range.start) as u64) as usize
}

/// Connects a persistent session `id`, subscribes it to `filters` at QoS 1 and leaves
/// (DISCONNECT): a consumer that is away, whose messages the broker must keep.
pub fn subscribe_and_leave(port: u16, id: &str, filters: &[&str]) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_clean_session(false);
    let (client, mut connection) = Client::new(opts, 10);
    for f in filters {
        client.subscribe(*f, QoS::AtLeastOnce).unwrap();
    }
    let mut subacks = 0;
    for event in connection.iter() {
        match event {
            Ok(Event::Incoming(Incoming::SubAck(_))) => {
                subacks += 1;
                if subacks == filters.len() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("{id}: {e}"),
        }
    }
    client.disconnect().unwrap();
    for event in connection.iter() {
        if matches!(
            event,
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_)
        ) {
            break;
        }
    }
}

/// Rewrites the embedded broker's `listen = "127.0.0.1:0"` in `config` to the port a
/// first start bound, so that restarts listen where clients reconnect (a port picked
/// free beforehand could be taken by someone else before the daemon binds it).
pub fn pin_embedded_port(config: &Path, port: u16) {
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:0\""), "{text}");
    let text = text.replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    std::fs::write(config, text).unwrap();
}

/// Distinct input ids answered on `out/…`, from what a device received.
pub fn answered_ids(got: &[(String, Value)]) -> std::collections::HashSet<i64> {
    got.iter()
        .filter(|(t, _)| t.starts_with("out/"))
        .filter_map(|(_, v)| v["id"].as_i64())
        .collect()
}

/// `openssl ARGS…` in `dir` (Debian's openssl, on every CI machine).
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl on PATH");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1, and a client certificate.
pub fn make_pki(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=anotador-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    for who in ["server", "client"] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={who}"),
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "san.ext",
                "-out",
                &format!("{who}.pem"),
            ],
        );
    }
    // Mosquitto started as root drops to its own user: it must be able to read the
    // (throw-away) server key.
    use std::os::unix::fs::PermissionsExt;
    for f in ["server.key", "client.key"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}
