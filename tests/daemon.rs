//! The daemon against a real broker: Mosquitto (Debian package `mosquitto`) started
//! on a free loopback port per test, the daemon as a child process, and a rumqttc
//! client playing the device. Bounded in count and time.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};
use serde_json::Value;

struct Broker {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn mosquitto_binary() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("mosquitto is not installed: `apt-get install mosquitto` (Debian), as .ci/run does");
}

fn start_broker() -> Broker {
    let dir = TempDir::new("broker");
    let port = free_port();
    let conf = dir.0.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 10000\n"),
    )
    .unwrap();
    let child = Command::new(mosquitto_binary())
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Broker {
        child,
        port,
        _dir: dir,
    }
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

/// A config with an NER route (JSON payloads) and a classification route (raw text).
fn write_config(dir: &Path, port: u16, client_id: &str, extra_daemon: &str) -> PathBuf {
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
"#,
        ner = fixture("bert-token"),
        cls = fixture("bert-seq"),
    )
    .unwrap();
    path
}

/// The daemon under test; its log goes to a file (a pipe nobody reads would fill
/// and stall it).
struct Daemon(Child, PathBuf);

impl Daemon {
    fn start(config: &Path) -> Daemon {
        let log = config.with_extension(format!(
            "log.{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = Command::new(env!("CARGO_BIN_EXE_anotador"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon(child, log)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe_sigterm(self.0.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stderr(mut self) -> String {
        self.kill();
        std::fs::read_to_string(&self.1).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn unsafe_sigterm(pid: u32) {
    // `kill -TERM`: no libc binding needed for one signal.
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// A device: publishes inputs, collects everything on `out/#`, `err/#` and `anotador/#`.
struct Device {
    client: Client,
    rx: Receiver<(String, Vec<u8>, bool)>,
}

impl Device {
    fn connect(port: u16, id: &str) -> Device {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = Client::new(opts, 20_000);
        let (tx, rx) = channel();
        let sub = client.clone();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        for t in ["out/#", "err/#", "anotador/#"] {
                            let _ = sub.subscribe(t, QoS::AtLeastOnce);
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
        Device { client, rx }
    }

    fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .unwrap();
    }

    /// Collects messages until `done` says so or the timeout passes.
    fn collect(
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

fn wait_online(device: &Device) {
    let got = device.collect(Duration::from_secs(30), |g| {
        g.iter()
            .any(|(t, v)| t == "anotador/t/status" && v["status"] == "online")
    });
    assert!(
        got.iter()
            .any(|(t, v)| t == "anotador/t/status" && v["status"] == "online"),
        "daemon never announced itself online: {got:?}"
    );
}

#[test]
fn every_input_gets_exactly_one_result_or_error() {
    let broker = start_broker();
    let dir = TempDir::new("daemon");
    let config = write_config(&dir.0, broker.port, "anotador-t1", "");
    let device = Device::connect(broker.port, "device-1");
    std::thread::sleep(Duration::from_millis(300));
    let daemon = Daemon::start(&config);
    wait_online(&device);

    device.publish(
        "in/ner/dev7",
        r#"{"id": "ok-1", "text": "El Real Madrid ganó en Sevilla.", "sensor": 3}"#,
    );
    device.publish("in/ner/dev7", &b"\xff\xfe not utf-8"[..]);
    device.publish("in/ner/dev7", r#"{"id": "bad-json", "text": "#);
    device.publish("in/ner/dev7", r#"{"id": "no-text"}"#);
    device.publish("in/ner/dev7", r#"{"id": "empty", "text": "  "}"#);
    device.publish(
        "in/ner/dev7",
        format!(r#"{{"id": "big", "text": "{}"}}"#, "a".repeat(3000)),
    );
    let long = "El Banco de España publicó ayer en Madrid su informe anual. ".repeat(20);
    device.publish(
        "in/ner/dev7",
        format!(r#"{{"id": "long", "text": "{long}"}}"#),
    );
    device.publish("in/cls", "Llueve mucho en Santiago.");

    let outcomes = |g: &[(String, Value)]| {
        g.iter()
            .filter(|(t, _)| t.starts_with("out/") || t.starts_with("err/"))
            .count()
    };
    let got = device.collect(Duration::from_secs(30), |g| outcomes(g) >= 8);
    std::thread::sleep(Duration::from_millis(500));
    let mut got: Vec<(String, Value)> = got
        .into_iter()
        .filter(|(t, _)| t.starts_with("out/") || t.starts_with("err/"))
        .collect();
    while let Ok((t, p, _)) = device.rx.try_recv() {
        if t.starts_with("out/") || t.starts_with("err/") {
            got.push((t, serde_json::from_slice(&p).unwrap()));
        }
    }
    assert_eq!(got.len(), 8, "exactly one outcome per input: {got:#?}");

    let ok = got
        .iter()
        .find(|(_, v)| v["id"] == "ok-1")
        .expect("result for ok-1");
    assert_eq!(ok.0, "out/ner/dev7");
    assert_eq!(ok.1["topic"], "in/ner/dev7");
    assert_eq!(ok.1["task"], "token-classification");
    assert_eq!(ok.1["meta"]["sensor"], 3);
    assert!(ok.1["result"].is_array());

    let codes: BTreeMap<String, String> = got
        .iter()
        .filter(|(t, _)| t == "err/ner/dev7")
        .map(|(_, v)| {
            (
                v["id"].as_str().unwrap_or("?").to_string(),
                v["error"]["code"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut expected = BTreeMap::new();
    for (id, code) in [
        ("no-text", "missing_text"),
        ("empty", "empty_text"),
        ("long", "text_too_long"),
    ] {
        expected.insert(id.to_string(), code.to_string());
    }
    // Errors whose id could not be read come without one.
    let anonymous: Vec<&str> = got
        .iter()
        .filter(|(t, v)| t == "err/ner/dev7" && v["id"].is_null())
        .map(|(_, v)| v["error"]["code"].as_str().unwrap())
        .collect();
    let mut anonymous_sorted = anonymous.clone();
    anonymous_sorted.sort();
    assert_eq!(
        anonymous_sorted,
        ["invalid_json", "invalid_utf8", "payload_too_large"],
        "{got:#?}"
    );
    for (id, code) in &expected {
        assert_eq!(codes.get(id), Some(code), "{id}: {codes:?}");
    }
    let cls = got
        .iter()
        .find(|(t, _)| t == "out/cls")
        .expect("classification result");
    assert_eq!(
        cls.1["result"].as_array().unwrap().len(),
        3,
        "top_k = 0 returns every label"
    );

    // Stats arrive with counters that add up.
    let stats = device.collect(Duration::from_secs(5), |g| {
        g.iter().any(|(t, _)| t == "anotador/t/stats")
    });
    let s = &stats
        .iter()
        .find(|(t, _)| t == "anotador/t/stats")
        .expect("stats")
        .1;
    assert_eq!(s["received"], 8);
    assert_eq!(s["published"], 8);
    assert!(s["rss_bytes"].as_u64().unwrap() > 0);

    // No message text at info level.
    let log = daemon.stderr();
    assert!(
        !log.contains("Real Madrid") && !log.contains("Santiago"),
        "text leaked into the log:\n{log}"
    );
}

#[test]
fn killed_daemon_loses_nothing_and_sigterm_says_offline() {
    let broker = start_broker();
    let dir = TempDir::new("restart");
    let config = write_config(&dir.0, broker.port, "anotador-t2", "");
    let device = Device::connect(broker.port, "device-2");
    std::thread::sleep(Duration::from_millis(300));

    // First run: creates the persistent session, then dies mid-stream.
    let mut daemon = Daemon::start(&config);
    wait_online(&device);
    let total = 300;
    for i in 0..total {
        device.publish(
            "in/ner/d",
            format!(r#"{{"id": {i}, "text": "Mensaje {i} desde Valparaíso para la ONU."}}"#),
        );
    }
    let first = device.collect(Duration::from_secs(30), |g| {
        g.iter().filter(|(t, _)| t.starts_with("out/")).count() >= 40
    });
    daemon.kill();
    let mut answered: HashMap<i64, usize> = HashMap::new();
    for (t, v) in &first {
        if t.starts_with("out/") {
            *answered.entry(v["id"].as_i64().unwrap()).or_default() += 1;
        }
    }
    assert!(answered.len() < total, "the kill should land mid-stream");

    // Second run, same client id: the broker hands over what was not acknowledged.
    let mut daemon = Daemon::start(&config);
    let rest = device.collect(Duration::from_secs(60), |g| {
        let mut seen: std::collections::HashSet<i64> = answered.keys().copied().collect();
        for (t, v) in g {
            if t.starts_with("out/") {
                seen.insert(v["id"].as_i64().unwrap());
            }
        }
        seen.len() >= total
    });
    for (t, v) in &rest {
        if t.starts_with("out/") {
            *answered.entry(v["id"].as_i64().unwrap()).or_default() += 1;
        }
    }
    let lost: Vec<usize> = (0..total)
        .filter(|i| !answered.contains_key(&(*i as i64)))
        .collect();
    let duplicates: usize = answered.values().map(|n| n - 1).sum();
    println!(
        "sent {total}, answered {}, duplicates {duplicates}, lost {}",
        answered.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "lost {lost:?}");

    // SIGTERM: clean exit and a retained offline status.
    let status = daemon.terminate();
    assert!(status.success(), "{status:?}");
    let got = device.collect(Duration::from_secs(10), |g| {
        g.iter()
            .any(|(t, v)| t == "anotador/t/status" && v["status"] == "offline")
    });
    assert!(
        got.iter()
            .any(|(t, v)| t == "anotador/t/status" && v["status"] == "offline"),
        "{got:?}"
    );
}

#[test]
fn check_rejects_bad_configs_naming_the_key() {
    let dir = TempDir::new("check");
    let run = |toml: &str| {
        let path = dir.0.join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_anotador"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout),
        )
    };
    let base = std::fs::read_to_string(write_config(&dir.0, 1883, "c", "")).unwrap();
    let (ok, out) = run(&base);
    assert!(ok, "{out}");
    let (ok, out) = run(&base.replace("queue = 8", "queue = 8\nqueeu = 3"));
    assert!(!ok && out.contains("queeu"), "{out}");
    let (ok, out) = run(&base.replace("topic = \"in/cls\"", "topic = \"in/#/cls\""));
    assert!(!ok && out.contains("routes[1].topic"), "{out}");
    let (ok, out) = run(&base.replace("model = \"cls\"", "model = \"nope\""));
    assert!(!ok && out.contains("routes[1].model"), "{out}");
    let (ok, out) = run(&base.replace("output = \"out/cls\"", "output = \"out/{text}\""));
    assert!(!ok && out.contains("routes[1].output"), "{out}");
    let (ok, out) = run(&base.replace(&fixture("bert-seq"), "/nonexistent/bundle"));
    assert!(!ok && out.contains("models.cls.path"), "{out}");
    let (ok, out) = run(&base.replace(&fixture("bert-seq"), &fixture("broken/bad-labels")));
    assert!(
        !ok && out.contains("config.json") && out.contains("labels"),
        "{out}"
    );
}
