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

    /// Messages until `n` came or nothing more came within `quiet`.
    async fn messages(&mut self, n: usize, quiet: Duration) -> Vec<Publish> {
        let mut got = Vec::new();
        while got.len() < n {
            match self.next(quiet).await {
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

/// What rumqttd 0.20 failed (see the README): the daemon sets Receive Maximum to
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
            let batch = worker.messages(5, Duration::from_millis(700)).await;
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
        let got_a = a.messages(total, Duration::from_millis(700)).await;
        let got_b = b.messages(total, Duration::from_millis(700)).await;
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
        let live = watcher.messages(1, Duration::from_secs(5)).await;
        assert_eq!(live.iter().map(text).collect::<Vec<_>>(), ["online"]);
        let mut late = Peer::connect(port, "late", |_| {}).await;
        late.subscribe("ret/#").await;
        let retained = late.messages(1, Duration::from_secs(5)).await;
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
        let will = watcher.messages(1, Duration::from_secs(10)).await;
        assert_eq!(will.iter().map(text).collect::<Vec<_>>(), ["gone"]);
        broker.stop(Duration::from_secs(2)).await;
    });
}

/// MQTT 3.1.1 and 5 clients on the one port of a daemon's embedded broker: a
/// 3.1.1 `mosquitto_pub` and rumqttc device, a v5 `mosquitto_pub` request with a
/// response topic and a rumqttc v5 device.
#[test]
fn mqtt_311_and_5_clients_through_the_embedded_broker() {
    let dir = TempDir::new("v3v5");
    let config = write_config_embedded(&dir.0, "127.0.0.1:0", "v3v5", None);
    allow_responses(&config, "reply/#");
    let daemon = Daemon::start(&config);
    let port = embedded_port(&daemon);
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

/// The daemon is its own broker here, so a SIGKILL takes the broker down too:
/// with `data_dir`, the restarted daemon's broker recovers the session and the
/// messages it had not acknowledged, and answers them.
#[test]
fn killed_daemon_with_data_dir_keeps_unacknowledged_input() {
    let dir = TempDir::new("embedded-kill");
    let data = dir.0.join("broker");
    let port = free_port();
    let config = write_config_embedded(
        &dir.0,
        &format!("127.0.0.1:{port}"),
        "embedded-kill",
        Some(&data),
    );
    let mut daemon = Daemon::start(&config);
    embedded_port(&daemon);
    let device = Device::connect_persistent(port, "kill-device");
    wait_online(&device);
    let total = 300;
    // A paragraph per message, so that the stream lasts seconds rather than the
    // fraction of one that 300 short sentences take: the kill below must land in
    // its middle, whatever the machine's speed (checked after the kill).
    let paragraph = "El Gobierno de Chile y la Organización de las Naciones Unidas firmaron \
        ayer en Santiago un acuerdo para proteger los humedales del sur del país, según \
        informó la Agencia EFE. La ministra de Medio Ambiente, María Heloísa Rojas, \
        viajará a Ginebra en marzo para presentar el plan ante el Consejo de Derechos \
        Humanos, y la Universidad de Concepción coordinará las mediciones en Valdivia.";
    for i in 0..total {
        device.publish(
            "in/ner/k",
            format!(r#"{{"id": {i}, "text": "Mensaje {i} desde Valparaíso. {paragraph}"}}"#),
        );
    }
    let first = device.collect(Duration::from_secs(60), |g| {
        g.iter().filter(|(t, _)| t.starts_with("out/")).count() >= 40
    });
    // mqtt5 writes accepted messages to data_dir behind, within 250 ms (its
    // INFLIGHT_SETTLE): the inputs have been there for longer than that once 40
    // answers are out and this wait is over; what a crash inside that window
    // loses is in the README.
    std::thread::sleep(Duration::from_millis(500));
    daemon.kill();
    // Everything the device got from the first daemon, including what arrived
    // during the wait: only then does "mid-stream" mean something.
    let before = device.collect(Duration::from_secs(1), |_| false);
    let mut answered: HashMap<i64, usize> = HashMap::new();
    count_answers(&mut answered, &first);
    count_answers(&mut answered, &before);
    let answered_before_kill = answered.len();
    assert!(
        answered_before_kill < total,
        "the kill landed after the stream's end ({answered_before_kill} of {total} answered): \
         nothing was left for the restarted daemon"
    );

    let mut daemon = Daemon::start(&config);
    // Its broker is up (and its signal handlers with it) before anything is counted.
    embedded_port(&daemon);
    let (lost, duplicates) =
        collect_the_rest(&device, &mut answered, total, Duration::from_secs(120));
    println!(
        "embedded broker, SIGKILL + restart on data_dir: sent {total}, answered {answered_before_kill} \
         before the kill and {} in all, duplicates {duplicates}, lost {}",
        answered.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "lost {lost:?}\n{}", daemon.log());
    let status = daemon.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn embedded_broker_and_responses_config_errors_name_the_key() {
    let dir = TempDir::new("embedded-check");
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
