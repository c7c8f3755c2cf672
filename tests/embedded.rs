//! The embedded broker (`[broker.embedded]`, mqtt5's broker in the daemon's
//! process), on free loopback ports: what the daemon's delivery model needs of a
//! broker, checked against it directly (Receive Maximum honoured, PUBACKs in any
//! order, `$share`, retained messages, wills); MQTT 3.1.1 and 5 clients through a
//! daemon's embedded broker; and a daemon SIGKILLed mid-stream and restarted on
//! the same `data_dir` answering everything it had not acknowledged.

// The embedded broker is the cargo feature `broker` (on by default).
#![cfg(feature = "broker")]

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

use anotador::config::{Daemon as DaemonConfig, Embedded};
use anotador::transport::broker::Broker;
use common::*;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

/// What a test client saw.
#[derive(Debug)]
enum Seen {
    SubAck,
    Message(Publish),
    Failed(String),
}

/// An MQTT 5 client whose event loop runs in a task of its own.
struct Peer {
    client: AsyncClient,
    seen: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Peer {
    async fn connect(port: u16, id: &str, setup: impl FnOnce(&mut MqttOptions)) -> Peer {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        setup(&mut opts);
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let (tx, seen) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let seen = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => Seen::SubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => Seen::Message(p),
                    Ok(_) => continue,
                    Err(e) => Seen::Failed(e.to_string()),
                };
                let failed = matches!(seen, Seen::Failed(_));
                if tx.send(seen).is_err() || failed {
                    return;
                }
            }
        });
        Peer { client, seen, task }
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match self.next(Duration::from_secs(10)).await {
                Some(Seen::SubAck) => return,
                Some(Seen::Message(_)) => continue,
                other => panic!("subscribing to {filter}: {other:?}"),
            }
        }
    }

    /// The next event, or `None` if nothing came within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<Seen> {
        tokio::time::timeout(wait, self.seen.recv())
            .await
            .ok()
            .flatten()
    }

    /// Messages until `n` came or nothing more came within `quiet` after the
    /// first, which may take up to `first` (a loaded machine routes late).
    async fn messages(&mut self, n: usize, first: Duration, quiet: Duration) -> Vec<Publish> {
        let mut got = Vec::new();
        while got.len() < n {
            let wait = if got.is_empty() { first } else { quiet };
            match self.next(wait).await {
                Some(Seen::Message(p)) => got.push(p),
                Some(Seen::Failed(e)) => panic!("connection failed: {e}"),
                Some(Seen::SubAck) => {}
                None => break,
            }
        }
        got
    }
}

fn embedded(listen: &str) -> Embedded {
    toml::from_str(&format!("listen = \"{listen}\"")).unwrap()
}

fn text(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

/// What rumqttd 0.20 failed (see docs/broker.md): the daemon sets Receive Maximum to
/// `daemon.queue` and acknowledges in whatever order its workers finish.
#[test]
fn embedded_broker_honours_receive_maximum_and_acks_in_any_order() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let broker = Broker::start(&embedded("127.0.0.1:0"), &DaemonConfig::default())
            .await
            .unwrap();
        let port = broker.address.port();
        let mut worker = Peer::connect(port, "rm-worker", |o| {
            o.set_manual_acks(true);
            o.set_receive_maximum(Some(4));
            o.set_clean_start(false);
            o.set_session_expiry_interval(Some(3600));
        })
        .await;
        worker.subscribe("rm/#").await;
        let publisher = Peer::connect(port, "rm-publisher", |_| {}).await;
        let total = 40;
        for i in 0..total {
            publisher
                .client
                .publish("rm/x", QoS::AtLeastOnce, false, format!("m{i}"))
                .await
                .unwrap();
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut rounds = 0;
        while seen.len() < total {
            // Never more than 4 unacknowledged, however long we wait.
            let batch = worker
                .messages(5, Duration::from_secs(10), Duration::from_millis(700))
                .await;
            assert!(!batch.is_empty(), "stalled after {} of {total}", seen.len());
            assert!(
                batch.len() <= 4,
                "the broker sent {} unacknowledged messages past Receive Maximum 4",
                batch.len()
            );
            for p in &batch {
                *seen.entry(text(p)).or_default() += 1;
            }
            // Acknowledged newest first: out of order, as the workers finish.
            for p in batch.iter().rev() {
                worker.client.ack(p).await.unwrap();
            }
            rounds += 1;
        }
        assert!(rounds >= total / 4, "{rounds} rounds");
        assert!(seen.values().all(|n| *n == 1), "duplicates: {seen:?}");
        // Still connected after all those out-of-order acks: nothing more, no error.
        assert!(worker.next(Duration::from_millis(300)).await.is_none());
        broker.stop(Duration::from_secs(2)).await;
    });
}

#[test]
fn embedded_broker_shares_retains_and_sends_wills() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let broker = Broker::start(&embedded("127.0.0.1:0"), &DaemonConfig::default())
            .await
            .unwrap();
        let port = broker.address.port();
        let persistent = |o: &mut MqttOptions| {
            o.set_clean_start(false);
            o.set_session_expiry_interval(Some(3600));
        };

        // `$share` with persistent sessions: one stream split, each message once.
        let mut a = Peer::connect(port, "share-a", persistent).await;
        let mut b = Peer::connect(port, "share-b", persistent).await;
        a.subscribe("$share/g/sh/#").await;
        b.subscribe("$share/g/sh/#").await;
        let mut watcher = Peer::connect(port, "watcher", |_| {}).await;
        watcher.subscribe("ret/#").await;
        watcher.subscribe("will/#").await;
        let publisher = Peer::connect(port, "share-publisher", |_| {}).await;
        let total = 40;
        for i in 0..total {
            publisher
                .client
                .publish(format!("sh/{i}"), QoS::AtLeastOnce, false, format!("s{i}"))
                .await
                .unwrap();
        }
        // Both members' deliveries until all arrived (or 30 s passed), then a
        // quiet spell for duplicates.
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while got_a.len() + got_b.len() < total && tokio::time::Instant::now() < deadline {
            tokio::select! {
                Some(Seen::Message(p)) = a.seen.recv() => got_a.push(p),
                Some(Seen::Message(p)) = b.seen.recv() => got_b.push(p),
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
        got_a.extend(
            a.messages(
                total,
                Duration::from_millis(300),
                Duration::from_millis(300),
            )
            .await,
        );
        got_b.extend(
            b.messages(
                total,
                Duration::from_millis(300),
                Duration::from_millis(300),
            )
            .await,
        );
        let mut all: Vec<String> = got_a.iter().chain(&got_b).map(text).collect();
        all.sort();
        let unique: HashSet<&String> = all.iter().collect();
        println!("$share: {} and {} of {total}", got_a.len(), got_b.len());
        assert_eq!((all.len(), unique.len()), (total, total), "{all:?}");
        assert!(!got_a.is_empty() && !got_b.is_empty(), "not split");

        // Retained: a client subscribing later gets it, flagged retained.
        publisher
            .client
            .publish("ret/status", QoS::AtLeastOnce, true, "online")
            .await
            .unwrap();
        let live = watcher
            .messages(1, Duration::from_secs(30), Duration::ZERO)
            .await;
        assert_eq!(live.iter().map(text).collect::<Vec<_>>(), ["online"]);
        let mut late = Peer::connect(port, "late", |_| {}).await;
        late.subscribe("ret/#").await;
        let retained = late
            .messages(1, Duration::from_secs(30), Duration::ZERO)
            .await;
        assert_eq!(retained.len(), 1);
        assert!(retained[0].retain && text(&retained[0]) == "online");

        // The will: a client whose connection drops without DISCONNECT.
        let dying = Peer::connect(port, "dying", |o| {
            o.set_last_will(LastWill::new(
                "will/dying",
                "gone",
                QoS::AtLeastOnce,
                false,
                None,
            ));
        })
        .await;
        // Connected once its first subscription is acknowledged.
        let mut dying = dying;
        dying.subscribe("nothing/#").await;
        dying.task.abort();
        drop(dying);
        let will = watcher
            .messages(1, Duration::from_secs(30), Duration::ZERO)
            .await;
        assert_eq!(will.iter().map(text).collect::<Vec<_>>(), ["gone"]);
        broker.stop(Duration::from_secs(2)).await;
    });
}

/// MQTT 3.1.1 and 5 clients on the one port of a daemon's embedded broker: a
/// 3.1.1 `mosquitto_pub` and rumqttc device, a v5 `mosquitto_pub` request with a
/// response topic and a rumqttc v5 device; the broker on `data_dir` with
/// `sync = "always"`, so every acknowledgement here waited for an fsync.
#[test]
fn mqtt_311_and_5_clients_through_the_embedded_broker() {
    let dir = TempDir::new("v3v5");
    let config = write_config_embedded(&dir.0, "127.0.0.1:0", "v3v5", Some(&dir.0.join("data")));
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap() + "sync = \"always\"\n",
    )
    .unwrap();
    allow_responses(&config, "reply/#");
    let daemon = Daemon::start(&config);
    let port = embedded_port(&daemon);
    assert!(
        daemon
            .log()
            .contains("before they are acknowledged, fsynced"),
        "{}",
        daemon.log()
    );
    let v3 = Device::connect(port, "v3-device");
    wait_online(&v3);
    let v5 = V5Device::connect(port, "v5-device");

    let pub_ = |args: &[&str]| {
        let status = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
            .args(args)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run mosquitto_pub ({e}): `apt-get install mosquitto-clients` (Debian), as .ci/run does"
                )
            });
        assert!(status.success(), "mosquitto_pub {args:?}");
    };
    // 3.1.1 (mosquitto_pub's default protocol) in, to both devices out.
    pub_(&[
        "-V",
        "mqttv311",
        "-t",
        "in/cls",
        "-m",
        "Un texto cualquiera.",
    ]);
    // 5, with a response topic and correlation data.
    pub_(&[
        "-V",
        "mqttv5",
        "-t",
        "in/ner/m5",
        "-m",
        r#"{"id": 5, "text": "Hola desde Lima."}"#,
        "-D",
        "publish",
        "response-topic",
        "reply/m5",
        "-D",
        "publish",
        "correlation-data",
        "c5",
    ]);
    // And the v5 device's own request, without a response topic.
    v5.request(
        "in/ner/d5",
        r#"{"id": 6, "text": "Hola desde Quito."}"#,
        None,
        b"x",
        &[],
    );

    let got3 = v3.collect(Duration::from_secs(60), |g| {
        g.iter().any(|(t, _)| t == "out/cls") && g.iter().any(|(t, _)| t == "out/ner/d5")
    });
    assert!(
        got3.iter()
            .any(|(t, v)| t == "out/cls" && v["result"].is_array()),
        "{got3:?}"
    );
    assert!(
        got3.iter().any(|(t, v)| t == "out/ner/d5" && v["id"] == 6),
        "{got3:?}"
    );
    let got5 = v5.collect(Duration::from_secs(60), |g| {
        g.iter().any(|m| m.topic == "reply/m5") && g.iter().any(|m| m.topic == "out/cls")
    });
    let reply = got5
        .iter()
        .find(|m| m.topic == "reply/m5")
        .unwrap_or_else(|| panic!("{got5:?}"));
    assert_eq!(reply.payload["id"], 5);
    assert_eq!(reply.correlation.as_deref(), Some(b"c5".as_slice()));
    assert!(got5.iter().any(|m| m.topic == "out/cls"), "{got5:?}");
}

/// The daemon is its own broker, so a SIGKILL takes the broker down too. Sensors
/// publish 600 QoS 1 messages on persistent sessions and resend what was not
/// acknowledged after each reconnection; the daemon is SIGKILLed twice, at random
/// answer counts, and restarted on the same `data_dir`. Every message the broker
/// acknowledged to the sensor is answered, both to a reader that stayed connected
/// and to one that was away the whole time (its results waited in the broker
/// through both kills).
#[test]
fn killed_daemon_loses_nothing_its_broker_acknowledged() {
    let total: usize = 600;
    let mut rng = test_seed("killed_daemon_loses_nothing_its_broker_acknowledged");
    let kills = [pick(&mut rng, 60..240), pick(&mut rng, 300..480)];
    let dir = TempDir::new("embedded-kill");
    let data = dir.0.join("broker");
    let config = write_config_embedded(&dir.0, "127.0.0.1:0", "embedded-kill", Some(&data));
    let mut daemon = Daemon::start(&config);
    let port = embedded_port(&daemon);
    pin_embedded_port(&config, port);
    subscribe_and_leave(port, "kill-away", &["out/#"]);
    let reader = Device::connect_persistent(port, "kill-reader");
    wait_online(&reader);
    // Four sensors, one publish in flight each: ids interleaved across them.
    const SENSORS: usize = 4;
    let sensors: Vec<std::sync::Arc<AckedPublisher>> = (0..SENSORS)
        .map(|s| std::sync::Arc::new(AckedPublisher::connect(port, &format!("kill-sensor-{s}"))))
        .collect();
    let acked = |sensors: &[std::sync::Arc<AckedPublisher>]| -> HashSet<i64> {
        sensors.iter().flat_map(|s| s.acked()).collect()
    };
    let publishing: Vec<_> = sensors
        .iter()
        .enumerate()
        .map(|(s, sensor)| {
            let sensor = sensor.clone();
            std::thread::spawn(move || {
                for i in (s..total).step_by(SENSORS) {
                    let text =
                        format!("Mensaje {i}: el Real Madrid ganó en Sevilla ante el Betis.");
                    sensor.publish("in/ner/k", i as i64, &text);
                }
            })
        })
        .collect();

    // Distinct ids answered so far, with what `g` adds.
    let with = |seen: &HashSet<i64>, g: &[(String, serde_json::Value)]| {
        seen.len() + answered_ids(g).difference(seen).count()
    };
    let mut seen = HashSet::new();
    let mut kill_points = Vec::new();
    for kill_at in kills {
        let more = reader.collect(Duration::from_secs(120), |g| with(&seen, g) >= kill_at);
        seen.extend(answered_ids(&more));
        let answered = seen.len();
        assert!(
            answered >= kill_at,
            "stalled at {answered} answers: {}",
            daemon.log()
        );
        daemon.kill();
        kill_points.push((answered, acked(&sensors).len()));
        daemon = Daemon::start(&config);
        embedded_port(&daemon);
    }
    // A publish returns once acknowledged: when all have returned, every message
    // was acknowledged (some perhaps twice, around a kill).
    for p in publishing {
        p.join().unwrap();
    }
    let acked = acked(&sensors);
    let more = reader.collect(Duration::from_secs(120), |g| {
        let now = answered_ids(g);
        acked.iter().all(|id| seen.contains(id) || now.contains(id))
    });
    seen.extend(answered_ids(&more));
    let mut lost: Vec<_> = acked.iter().filter(|id| !seen.contains(id)).collect();
    lost.sort();
    println!(
        "embedded broker, 2 SIGKILLs at (answers, acked) {kill_points:?}: acked {} of {total}, \
         answered {}, lost {}",
        acked.len(),
        seen.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged, never answered: {lost:?}\n{}",
        daemon.log()
    );
    assert_eq!(
        acked.len(),
        total,
        "the sensor got a PUBACK for every message in the end"
    );

    let away = Device::connect_persistent(port, "kill-away");
    let held = away.collect(Duration::from_secs(60), |g| {
        let seen = answered_ids(g);
        acked.iter().all(|id| seen.contains(id))
    });
    let seen = answered_ids(&held);
    let mut lost: Vec<_> = acked.iter().filter(|id| !seen.contains(id)).collect();
    lost.sort();
    assert!(
        lost.is_empty(),
        "results never delivered to the reader that was away: {lost:?}"
    );
    let status = daemon.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn embedded_broker_and_responses_config_errors_name_the_key() {
    let dir = TempDir::new("embedded-check");
    let run = |toml: &str| {
        let path = dir.0.join("c.toml");
        std::fs::write(&path, toml).unwrap();
        check(&path)
    };
    let config = write_config_embedded(&dir.0, "127.0.0.1:0", "c", None);
    allow_responses(&config, "reply/#");
    let base = std::fs::read_to_string(&config).unwrap();
    let (ok, out) = run(&base);
    assert!(ok, "{out}");
    let broker = "[broker]\n";
    for (key, line) in [
        ("broker.host", "host = \"10.0.0.5\"\n"),
        ("broker.port", "port = 1883\n"),
        ("broker.username", "username = \"u\"\n"),
    ] {
        let (ok, out) = run(&base.replacen(broker, &format!("{broker}{line}"), 1));
        assert!(!ok && out.contains(key), "{key}: {out}");
    }
    let (ok, out) = run(&format!("{base}\n[broker.tls]\nca_file = \"ca.pem\"\n"));
    assert!(!ok && out.contains("broker.tls"), "{out}");
    let (ok, out) = run(&format!("{base}sync = \"always\"\n"));
    assert!(!ok && out.contains("broker.embedded.sync"), "{out}");
    let (ok, out) = run(&base.replace("listen = \"127.0.0.1:0\"", "listen = \"localhost\""));
    assert!(!ok && out.contains("listen"), "{out}");
    let (ok, out) = run(&format!("{base}max_queued_bytes = 1000\n"));
    assert!(
        !ok && out.contains("broker.embedded.max_queued_bytes"),
        "{out}"
    );
    for bad in ["$share/g/reply/#", "reply/#/x"] {
        let (ok, out) =
            run(&base.replace("responses = \"reply/#\"", &format!("responses = \"{bad}\"")));
        assert!(!ok && out.contains("routes[0].responses"), "{bad}: {out}");
    }
}

/// `anotador check --config PATH`: whether it passed, and what it printed (stderr
/// first, where a refusal names its key).
fn check(config: &std::path::Path) -> (bool, String) {
    let out = Command::new(anotador_bin())
        .args(["check", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

/// The 3.1.1 CONNACK these credentials get: Ok, or the refusal.
fn connack(port: u16, id: &str, credentials: Option<(&str, &str)>) -> Result<(), String> {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    if let Some((user, password)) = credentials {
        o.set_credentials(user, password);
    }
    let (_client, mut connection) = rumqttc::Client::new(o, 10);
    for event in connection.iter() {
        match event {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                return match a.code {
                    rumqttc::ConnectReturnCode::Success => Ok(()),
                    code => Err(format!("{code:?}")),
                }
            }
            Err(e) => return Err(e.to_string()),
            Ok(_) => {}
        }
    }
    Err("connection ended".into())
}

/// `mosquitto_pub -V mqttv5` as `user`: whether the broker took the publish.
fn pub_v5(port: u16, user: &str, password: &str, topic: &str, message: &str) -> bool {
    Command::new("mosquitto_pub")
        .args(["-V", "mqttv5", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-u", user, "-P", password, "-q", "1", "-t", topic, "-m", message,
        ])
        .status()
        .expect("mosquitto_pub (Debian's mosquitto-clients) is needed")
        .success()
}

fn passwd(file: &std::path::Path, user: &str, password: &str) {
    use std::io::Write;
    let mut child = Command::new(anotador_bin())
        .args(["passwd", file.to_str().unwrap(), user, "--stdin"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    assert!(child.wait().unwrap().success());
}

/// A listener on every interface: `check` refuses it without a password file (naming
/// the key and both ways out); with `anotador passwd` users and an ACL, anonymous and
/// wrong passwords are refused, a sensor publishes only to its own input topic and
/// reads nothing, a dashboard reads the results and the status, nobody but the
/// daemon writes the status; MQTT 3.1.1 and 5; a user removed from the file is
/// refused after SIGHUP, and a broken file is refused by the reload, keeping the old.
#[test]
fn network_listener_needs_users_and_each_user_gets_its_rights_only() {
    let dir = TempDir::new("users");
    let config = write_config_embedded(&dir.0, "0.0.0.0:0", "users-daemon", None);
    let (ok, why) = check(&config);
    assert!(!ok);
    for needle in [
        "broker.embedded.listen",
        "password_file",
        "allow_anonymous = true",
    ] {
        assert!(why.contains(needle), "{needle}: {why}");
    }

    let pw = dir.0.join("passwd");
    passwd(&pw, "sensor1", "uno-1");
    passwd(&pw, "dashboard", "dos-2");
    passwd(&pw, "sensor2", "tres-3");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&pw).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let acl = dir.0.join("acl");
    std::fs::write(
        &acl,
        "# each sensor writes its own input topic only\n\
         user * topic in/ner/%u permission write\n\
         user dashboard topic out/# permission read\n\
         user dashboard topic anotador/# permission read\n",
    )
    .unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "password_file = \"{}\"\nacl_file = \"{}\"\n",
        pw.display(),
        acl.display()
    ));
    std::fs::write(&config, &text).unwrap();
    let mut daemon = Daemon::start(&config);
    let port = embedded_port(&daemon);
    assert!(daemon.log().contains("users of"), "{}", daemon.log());

    assert!(connack(port, "anon", None).is_err(), "anonymous let in");
    assert!(connack(port, "bad", Some(("sensor1", "wrong"))).is_err());
    assert!(connack(port, "daemon-name", Some(("anotador-daemon", "guess"))).is_err());
    assert!(!pub_v5(port, "sensor1", "wrong", "in/ner/sensor1", "x"));

    let dashboard = Device::connect_with_credentials(port, "dash", "dashboard", "dos-2");
    wait_online(&dashboard);
    let sensor = Device::connect_with_credentials(port, "s1", "sensor1", "uno-1");
    // Not its route, not the status: dropped by the broker (MQTT 3.1.1 has no way to
    // say so); then its own topic, through 3.1.1 and 5, is answered.
    sensor.publish(
        "in/ner/sensor2",
        r#"{"id": 1, "text": "Ana vive en Lima."}"#,
    );
    sensor
        .client
        .publish(
            "anotador/t/status",
            rumqttc::QoS::AtLeastOnce,
            true,
            r#"{"status": "forged"}"#,
        )
        .unwrap();
    sensor.publish(
        "in/ner/sensor1",
        r#"{"id": 2, "text": "Ana vive en Lima."}"#,
    );
    assert!(pub_v5(
        port,
        "sensor1",
        "uno-1",
        "in/ner/sensor1",
        r#"{"id": 3, "text": "Juan está en Quito."}"#
    ));
    let got = dashboard.collect(Duration::from_secs(60), |g| {
        g.iter().filter(|(t, _)| t == "out/ner/sensor1").count() >= 2
    });
    let ids: HashSet<i64> = got
        .iter()
        .filter(|(t, _)| t.starts_with("out/"))
        .filter_map(|(_, v)| v["id"].as_i64())
        .collect();
    assert_eq!(ids, HashSet::from([2, 3]), "{got:?}");
    assert!(
        !got.iter().any(|(t, _)| t == "out/ner/sensor2"),
        "another sensor's route was answered: {got:?}"
    );
    // The sensor's subscriptions (out/#, err/#, anotador/#) were refused: of the
    // answers to its own messages it saw none.
    let seen = sensor.collect(Duration::from_millis(500), |_| false);
    assert!(seen.is_empty(), "the sensor read: {seen:?}");
    let status = Device::connect_with_credentials(port, "dash2", "dashboard", "dos-2")
        .collect(Duration::from_secs(10), |g| {
            g.iter().any(|(t, _)| t == "anotador/t/status")
        });
    let status = status.iter().find(|(t, _)| t == "anotador/t/status");
    assert_eq!(
        status.map(|(_, v)| v["status"].clone()),
        Some("online".into())
    );

    // sensor2 removed, then SIGHUP: refused from then on. A broken ACL on the next
    // SIGHUP is refused by the reload, and sensor1 keeps working.
    assert_eq!(connack(port, "s2", Some(("sensor2", "tres-3"))), Ok(()));
    let kept: String = std::fs::read_to_string(&pw)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("sensor2:"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&pw, kept).unwrap();
    daemon.signal("-HUP");
    assert!(
        daemon.wait_log("users and rights read again", 1, Duration::from_secs(30)),
        "{}",
        daemon.log()
    );
    assert!(connack(port, "s2", Some(("sensor2", "tres-3"))).is_err());
    std::fs::write(&acl, "user dashboard topic out/# permission reed\n").unwrap();
    daemon.signal("-HUP");
    assert!(
        daemon.wait_log("not reloaded", 1, Duration::from_secs(30)),
        "{}",
        daemon.log()
    );
    assert!(pub_v5(
        port,
        "sensor1",
        "uno-1",
        "in/ner/sensor1",
        r#"{"id": 4, "text": "Eva nació en Cuenca."}"#
    ));
    let got = dashboard.collect(Duration::from_secs(60), |g| {
        g.iter().any(|(_, v)| v["id"] == 4)
    });
    assert!(got.iter().any(|(_, v)| v["id"] == 4), "{got:?}");
    daemon.terminate();
}

/// `tls_listen` with a CA made here: `mosquitto_pub --cafile` with the client certificate
/// CA-signed is answered over TLS; without a certificate (mutual TLS) or trusting
/// another CA it is refused; the plain loopback listener keeps working beside it.
#[test]
fn tls_listener_with_client_certificates() {
    let dir = TempDir::new("tls-embedded");
    make_pki(&dir.0);
    let config = write_config_embedded(&dir.0, "127.0.0.1:0", "tls-daemon", None);
    let mut text = std::fs::read_to_string(&config).unwrap();
    let file = |f: &str| dir.0.join(f).display().to_string();
    text.push_str(&format!(
        "tls_listen = \"127.0.0.1:0\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n",
        file("server.pem"),
        file("server.key"),
        file("ca.pem")
    ));
    std::fs::write(&config, &text).unwrap();
    let mut daemon = Daemon::start(&config);
    let port = embedded_port(&daemon);
    let needle = "embedded broker listening for TLS on ";
    assert!(
        daemon.wait_log(needle, 1, Duration::from_secs(30)),
        "{}",
        daemon.log()
    );
    let log = daemon.log();
    let tls_port: u16 = log
        .split(needle)
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.port())
        .unwrap();
    let reader = Device::connect(port, "tls-reader");
    wait_online(&reader);
    // Certificates as the client knows them (copies: the daemon's files change below).
    std::fs::create_dir_all(dir.0.join("known")).unwrap();
    for f in ["ca.pem", "client.pem", "client.key"] {
        std::fs::copy(dir.0.join(f), dir.0.join("known").join(f)).unwrap();
    }
    let known = |f: &str| dir.0.join("known").join(f).display().to_string();
    // `timeout`: a broker that never finishes the handshake fails the call, not the run.
    let publish_as = |ca: &str, extra: &[&str], id: i64| {
        Command::new("timeout")
            .args(["20", "mosquitto_pub"])
            .args(["-h", "127.0.0.1", "-p", &tls_port.to_string(), "-q", "1"])
            .args(["--cafile", ca])
            .args(extra)
            .args(["-t", "in/ner/tls"])
            .args([
                "-m",
                &format!(r#"{{"id": {id}, "text": "Ana vive en Lima."}}"#),
            ])
            .output()
            .expect("mosquitto_pub")
    };
    let publish = |extra: &[&str], id: i64| publish_as(&known("ca.pem"), extra, id);
    let client = [
        "--cert",
        &known("client.pem"),
        "--key",
        &known("client.key"),
    ];
    let ok = publish(&client, 1);
    assert!(ok.status.success(), "{ok:?}\n{}", daemon.log());
    let no_cert = publish(&[], 2);
    assert!(
        !no_cert.status.success(),
        "mutual TLS let a client without a certificate in"
    );
    let got = reader.collect(Duration::from_secs(60), |g| {
        g.iter().any(|(t, v)| t == "out/ner/tls" && v["id"] == 1)
    });
    assert!(
        got.iter().any(|(t, v)| t == "out/ner/tls" && v["id"] == 1),
        "{got:?}"
    );
    assert!(!got.iter().any(|(_, v)| v["id"] == 2), "{got:?}");

    // A client that opens the TLS port and never says a word holds up nobody else
    // (the handshake runs in a task of its own, closed after 10 s).
    let stalled = std::net::TcpStream::connect(("127.0.0.1", tls_port)).unwrap();
    let started = std::time::Instant::now();
    let ok = publish(&client, 3);
    assert!(
        ok.status.success(),
        "blocked behind a silent client: {ok:?}"
    );
    println!(
        "TLS client served beside a silent one in {:?}",
        started.elapsed()
    );
    drop(stalled);

    // SIGHUP replaces the certificates: a renewed server certificate and client CA
    // (a new authority) are served to new connections, the old ones no longer.
    let renewed = dir.0.join("renewed");
    std::fs::create_dir_all(&renewed).unwrap();
    make_pki(&renewed);
    for (from, to) in [
        ("server.pem", "server.pem"),
        ("server.key", "server.key"),
        ("ca.pem", "ca.pem"),
    ] {
        std::fs::copy(renewed.join(from), dir.0.join(to)).unwrap();
    }
    daemon.signal("-HUP");
    assert!(
        daemon.wait_log("TLS certificates read again", 1, Duration::from_secs(30)),
        "{}",
        daemon.log()
    );
    let renewed_file = |f: &str| renewed.join(f).display().to_string();
    let renewed_client = [
        "--cert",
        &renewed_file("client.pem"),
        "--key",
        &renewed_file("client.key"),
    ];
    let ok = publish_as(&renewed_file("ca.pem"), &renewed_client, 4);
    assert!(
        ok.status.success(),
        "renewed certificates not served: {ok:?}\n{}",
        daemon.log()
    );
    let old = publish(&client, 5);
    assert!(!old.status.success(), "the replaced CA still verifies");

    // A broken certificate file refuses the reload and keeps the ones in force.
    std::fs::write(dir.0.join("server.pem"), "not a certificate\n").unwrap();
    daemon.signal("-HUP");
    assert!(
        daemon.wait_log(
            "not reloaded, the ones in force stay",
            1,
            Duration::from_secs(30)
        ),
        "{}",
        daemon.log()
    );
    let ok = publish_as(&renewed_file("ca.pem"), &renewed_client, 6);
    assert!(
        ok.status.success(),
        "a refused reload changed the certificates: {ok:?}"
    );
    let got = reader.collect(Duration::from_secs(60), |g| {
        [3, 4, 6]
            .iter()
            .all(|id| g.iter().any(|(t, v)| t == "out/ner/tls" && v["id"] == *id))
    });
    let ids: HashSet<i64> = got
        .iter()
        .filter(|(t, _)| t == "out/ner/tls")
        .filter_map(|(_, v)| v["id"].as_i64())
        .collect();
    assert_eq!(ids, HashSet::from([3, 4, 6]), "{got:?}");
    daemon.terminate();
    // `check` reads the certificates too, naming the key at fault.
    let (ok, err) = check(&config);
    assert!(!ok && err.contains("broker.embedded.cert_file"), "{err}");
    std::fs::copy(renewed.join("server.pem"), dir.0.join("server.pem")).unwrap();
    std::fs::copy(dir.0.join("known/ca.pem"), dir.0.join("server.pem")).unwrap();
    let (ok, err) = check(&config);
    assert!(
        !ok && err.contains("broker.embedded.key_file"),
        "a certificate that is not the key's: {err}"
    );

    // check: the TLS keys go together, and a non-loopback tls_listen needs users.
    let broken = text.replace(&format!("key_file = \"{}\"\n", file("server.key")), "");
    std::fs::write(&config, broken).unwrap();
    let (ok, err) = check(&config);
    assert!(!ok && err.contains("broker.embedded.key_file"), "{err}");
    let open = text.replace("tls_listen = \"127.0.0.1:0\"", "tls_listen = \"0.0.0.0:0\"");
    std::fs::write(&config, open).unwrap();
    let (ok, err) = check(&config);
    assert!(!ok && err.contains("broker.embedded.tls_listen"), "{err}");
}

/// Holds a 3.1.1 connection open (polling it on a thread); the CONNACK's outcome.
fn hold(port: u16, id: &str, user: &str, password: &str) -> (rumqttc::Client, Result<(), String>) {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_credentials(user, password);
    let (client, mut connection) = rumqttc::Client::new(o, 10);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for event in connection.iter() {
            let outcome = match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => Ok(()),
                Err(e) => Err(e.to_string()),
                Ok(_) => continue,
            };
            let failed = outcome.is_err();
            if let Some(tx) = tx.take() {
                let _ = tx.send(outcome);
            }
            if failed {
                return;
            }
        }
    });
    let outcome = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| Err("no CONNACK within 30 s".into()));
    (client, outcome)
}

/// The limits a LAN needs, on a daemon's embedded broker with users: a flood of bad
/// connections (not MQTT, a CONNECT claiming a 256 MiB packet, an unknown protocol
/// level, wrong passwords) is closed without growing the daemon, a user guessed at is
/// locked out while others are not, `max_clients` refuses the one too many,
/// `max_inflight` is announced to MQTT 5 clients, and a good client is answered
/// throughout, nothing lost.
#[test]
fn abuse_limits_hold_and_good_clients_stay_served() {
    use std::io::{Read, Write};
    let dir = TempDir::new("abuse");
    let config = write_config_embedded(&dir.0, "127.0.0.1:0", "abuse-daemon", None);
    let pw = dir.0.join("passwd");
    for (user, password) in [("good", "g-1"), ("target", "t-3")] {
        passwd(&pw, user, password);
    }
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "password_file = \"{}\"\nmax_clients = 5\nmax_inflight = 10\n",
        pw.display()
    ));
    std::fs::write(&config, &text).unwrap();
    let mut daemon = Daemon::start(&config);
    let port = embedded_port(&daemon);
    let good = Device::connect_with_credentials(port, "good-1", "good", "g-1");
    wait_online(&good);
    let pid = daemon.0.id();

    // max_clients = 5: the daemon, `good`, three more held open, and the next refused.
    let held: Vec<_> = (0..3)
        .map(|i| hold(port, &format!("held-{i}"), "good", "g-1"))
        .collect();
    for (_, ok) in &held {
        assert_eq!(ok, &Ok(()));
    }
    let (_, refused) = hold(port, "one-too-many", "good", "g-1");
    assert!(refused.is_err(), "max_clients let a sixth client in");
    for (client, _) in &held {
        client.disconnect().unwrap();
    }
    drop(held);
    // Room again once the broker has seen them go.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (client, ok) = hold(port, "room-again", "good", "g-1");
        if ok.is_ok() {
            client.disconnect().unwrap();
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "max_clients never freed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // MQTT 5 clients are told max_inflight in CONNACK.
    {
        let mut o = rumqttc::v5::MqttOptions::new("v5-inflight", "127.0.0.1", port);
        o.set_credentials("good", "g-1");
        let (_client, mut connection) = rumqttc::v5::Client::new(o, 10);
        let mut announced = None;
        for event in connection.iter() {
            if let Ok(Event::Incoming(Packet::ConnAck(ack))) = event {
                announced = ack.properties.and_then(|p| p.receive_max);
                break;
            }
        }
        assert_eq!(announced, Some(10));
    }

    // Warm (engine states, buffers) before the memory baseline.
    for id in 100..120 {
        good.publish(
            "in/ner/good",
            format!(r#"{{"id": {id}, "text": "Ana vive en Lima."}}"#),
        );
    }
    let warm = good.collect(Duration::from_secs(60), |g| {
        g.iter().filter(|(t, _)| t == "out/ner/good").count() >= 20
    });
    assert_eq!(warm.iter().filter(|(t, _)| t == "out/ner/good").count(), 20);
    let (rss_before, _) = rss_of(pid).unwrap();

    // The flood: 60 connections of garbage at once, each closed by the broker: a
    // CONNECT that claims more than the broker takes and an unknown protocol level at
    // once, bytes that never make a CONNECT when its connect timeout (10 s) passes.
    let junk: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        // CONNECT, remaining length 268,435,455 (the largest MQTT can say), then little.
        &[
            0x10, 0xff, 0xff, 0xff, 0x7f, 0, 4, b'M', b'Q', b'T', b'T', 5,
        ],
        // CONNECT for MQTT protocol level 9.
        &[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 9, 2, 0, 60, 0, 0],
    ];
    let flood = std::time::Instant::now();
    let sockets: Vec<(usize, std::net::TcpStream)> = (0..60)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let _ = s.write_all(junk[i % 3]);
            (i % 3, s)
        })
        .collect();
    // The good client is answered while they are open.
    for round in 0..20 {
        good.publish(
            "in/ner/good",
            format!(r#"{{"id": {round}, "text": "Ana vive en Lima."}}"#),
        );
    }
    let mut slowest = [Duration::ZERO; 3];
    // The two that must close at once first: time runs from the flood's start.
    let mut sockets = sockets;
    sockets.sort_by_key(|(kind, _)| *kind == 0);
    for (kind, mut s) in sockets {
        let mut buf = [0u8; 64];
        // Closed (0 bytes or a reset), possibly after a refusing CONNACK; a read that
        // times out means the broker kept it open.
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    break false
                }
                Err(_) => break true,
            }
        };
        assert!(closed, "{:?} left open for 30 s", junk[kind]);
        slowest[kind] = slowest[kind].max(flood.elapsed());
    }
    println!("60 bad connections closed; the last of each kind after {slowest:?}");
    assert!(slowest[1] < Duration::from_secs(5) && slowest[2] < Duration::from_secs(5));

    let answered = good.collect(Duration::from_secs(60), |g| {
        g.iter().filter(|(t, _)| t == "out/ner/good").count() >= 20
    });
    let ids: HashSet<i64> = answered
        .iter()
        .filter(|(t, _)| t == "out/ner/good")
        .filter_map(|(_, v)| v["id"].as_i64())
        .collect();
    assert_eq!(ids, (0..20).collect::<HashSet<i64>>(), "{answered:?}");

    let (rss_after, _) = rss_of(pid).unwrap();
    println!("daemon RSS before the flood {rss_before} B, after {rss_after} B");
    assert!(
        rss_after < rss_before + (8 << 20),
        "the flood grew the daemon from {rss_before} to {rss_after} bytes"
    );
    // Wrong passwords: after five, the address is locked out (mqtt5's limiter keys on
    // the address), even with a right password; clients already connected from it
    // stay served.
    assert_eq!(connack(port, "good-2", Some(("good", "g-1"))), Ok(()));
    for i in 0..6 {
        assert!(connack(port, &format!("guess-{i}"), Some(("target", "wrong"))).is_err());
    }
    let locked = connack(port, "guess-right", Some(("target", "t-3")));
    assert!(locked.is_err(), "the guessing address was not locked out");
    assert!(
        daemon.log().contains("rate limit exceeded"),
        "{}",
        daemon.log()
    );

    for round in 20..30 {
        good.publish(
            "in/ner/good",
            format!(r#"{{"id": {round}, "text": "Ana vive en Lima."}}"#),
        );
    }
    let after = good.collect(Duration::from_secs(60), |g| {
        g.iter().filter(|(t, _)| t == "out/ner/good").count() >= 10
    });
    let ids: HashSet<i64> = after.iter().filter_map(|(_, v)| v["id"].as_i64()).collect();
    assert_eq!(ids, (20..30).collect::<HashSet<i64>>(), "{after:?}");
    daemon.terminate();
}

/// Connects persistent 3.1.1 session `id` with a will on `gone/ID`, subscribes it to
/// `topic` and drops the connection without DISCONNECT. Returns once `watcher` got the
/// will: mqtt5 publishes it after it has released the session from the router, so
/// what is published after that is queued for the session, not sent down its socket.
fn leave_abruptly(port: u16, id: &str, topic: &str, watcher: &std::sync::mpsc::Receiver<String>) {
    use rumqttc::{Client, Event as E, Incoming, MqttOptions as O, QoS as Q};
    let mut opts = O::new(id, "127.0.0.1", port);
    opts.set_clean_session(false);
    opts.set_last_will(rumqttc::LastWill::new(
        format!("gone/{id}"),
        "gone",
        Q::AtLeastOnce,
        false,
    ));
    let (client, mut connection) = Client::new(opts, 10);
    client.subscribe(topic, Q::AtLeastOnce).unwrap();
    for event in connection.iter() {
        match event {
            Ok(E::Incoming(Incoming::SubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("{id}: {e}"),
        }
    }
    // Dropping the event loop closes the socket: no DISCONNECT, so the will fires.
    drop(connection);
    drop(client);
    let will = watcher.recv_timeout(Duration::from_secs(60));
    assert_eq!(will.as_deref(), Ok(format!("gone/{id}").as_str()));
}

/// Reconnects persistent session `id` and returns the `id` fields of what the broker
/// sends it, in order, up to and including `last`.
fn take_backlog(port: u16, id: &str, last: i64) -> Vec<i64> {
    use rumqttc::{Client, Event as E, Incoming, MqttOptions as O};
    let mut opts = O::new(id, "127.0.0.1", port);
    opts.set_clean_session(false);
    let (_client, mut connection) = Client::new(opts, 10);
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for event in connection.iter() {
        assert!(std::time::Instant::now() < deadline, "{id}: only {got:?}");
        match event {
            Ok(E::Incoming(Incoming::Publish(p))) => {
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                got.push(v["id"].as_i64().unwrap());
                if got.last() == Some(&last) {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("{id}: {e} (got {got:?})"),
        }
    }
    got
}

/// `max_queued_messages` bounds what the broker keeps for a persistent session that is
/// away, in memory and in `data_dir`, also across a SIGKILL of the daemon: the oldest
/// go, the newest are delivered on reconnecting, in order.
#[test]
fn away_session_queue_keeps_the_newest_within_max_queued_messages() {
    for storage in ["memory", "data_dir"] {
        let dir = TempDir::new(&format!("queue-limit-{storage}"));
        let data = dir.0.join("broker");
        let data_dir = (storage == "data_dir").then_some(data.as_path());
        let config = write_config_embedded(&dir.0, "127.0.0.1:0", "queue-limit-daemon", data_dir);
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str("max_queued_messages = 5\n");
        std::fs::write(&config, text).unwrap();
        let mut daemon = Daemon::start(&config);
        let port = embedded_port(&daemon);
        pin_embedded_port(&config, port);

        let (wills_tx, wills) = std::sync::mpsc::channel();
        let watcher = {
            use rumqttc::{Client, Event as E, Incoming, MqttOptions as O, QoS as Q};
            let (client, mut connection) =
                Client::new(O::new("will-watcher", "127.0.0.1", port), 10);
            client.subscribe("gone/#", Q::AtLeastOnce).unwrap();
            let (ready_tx, ready) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for event in connection.iter() {
                    match event {
                        Ok(E::Incoming(Incoming::SubAck(_))) => {
                            let _ = ready_tx.send(());
                        }
                        Ok(E::Incoming(Incoming::Publish(p))) => {
                            if wills_tx.send(p.topic).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            });
            ready.recv_timeout(Duration::from_secs(30)).unwrap();
            client
        };
        leave_abruptly(port, "away-311", "feed/q", &wills);
        let sensor = AckedPublisher::connect(port, "queue-limit-sensor");
        for id in 0..10 {
            sensor.publish("feed/q", id, "Hola");
        }
        assert_eq!(
            take_backlog(port, "away-311", 9),
            (5..10).collect::<Vec<_>>(),
            "{storage}: the away session's backlog"
        );
        assert!(
            daemon.log().contains("per-client queue limit reached"),
            "{}",
            daemon.log()
        );

        if storage == "data_dir" {
            // Away again, ten more acknowledged, the daemon killed: the bound and the
            // newest five survive the restart.
            leave_abruptly(port, "away-311", "feed/q", &wills);
            for id in 10..20 {
                sensor.publish("feed/q", id, "Hola");
            }
            daemon.kill();
            drop(sensor);
            drop(watcher);
            let daemon = Daemon::start(&config);
            assert_eq!(embedded_port(&daemon), port);
            assert_eq!(
                take_backlog(port, "away-311", 19),
                (15..20).collect::<Vec<_>>(),
                "data_dir, after SIGKILL: the away session's backlog"
            );
        }
    }
}
