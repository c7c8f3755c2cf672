//! The daemon against a real broker: Mosquitto (Debian package `mosquitto`) started
//! on a free loopback port per test, the daemon as a child process, and a rumqttc
//! client playing the device. Bounded in count and time.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const QUESTION: &str = "¿Dónde nació García Márquez?";
const CONTEXT: &str = "García Márquez nació en Colombia en 1927 y murió en México.";

#[test]
fn every_input_gets_exactly_one_result_or_error() {
    let broker = start_broker();
    let dir = TempDir::new("daemon");
    let config = write_config(&dir.0, broker.port, "anotador-t1", "");
    let device = Device::connect(broker.port, "device-1");
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
    device.publish(
        "in/qa",
        format!(r#"{{"id": "qa-1", "question": "{QUESTION}", "context": "{CONTEXT}"}}"#),
    );
    device.publish("in/qa", r#"{"id": "qa-2", "question": "¿Dónde?"}"#);
    // Nothing in a payload chooses the output topic.
    device.publish(
        "in/ner/dev7",
        r#"{"id": "+/#/../$SYS", "text": "Hola", "topic": "$SYS/x", "output": "evil/#"}"#,
    );

    let outcomes = |g: &[(String, Value)]| {
        g.iter()
            .filter(|(t, _)| t.starts_with("out/") || t.starts_with("err/"))
            .count()
    };
    let got = device.collect(Duration::from_secs(30), |g| outcomes(g) >= 11);
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
    assert_eq!(got.len(), 11, "exactly one outcome per input: {got:#?}");
    let steered = got
        .iter()
        .find(|(_, v)| v["id"] == "+/#/../$SYS")
        .expect("result for the hostile id");
    assert_eq!(
        steered.0, "out/ner/dev7",
        "payload fields never change the output topic"
    );
    assert_eq!(steered.1["topic"], "in/ner/dev7");

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

    // A QA route answers as the library does (top_k = 2: a list), and a payload
    // without a context goes to its error topic.
    let qa = got
        .iter()
        .find(|(_, v)| v["id"] == "qa-1")
        .expect("QA result");
    assert_eq!(qa.0, "out/qa");
    assert_eq!(qa.1["task"], "question-answering");
    let bundle = std::sync::Arc::new(anotador::Bundle::load(fixture("bert-qa")).unwrap());
    let options = anotador::TaskOptions {
        top_k: Some(2),
        ..Default::default()
    };
    let annotator = anotador::Annotator::new(bundle.clone(), &options).unwrap();
    let mut state = bundle.engine.state().unwrap();
    let expected = annotator
        .annotate(&mut state, QUESTION, Some(CONTEXT))
        .unwrap()
        .result;
    // Through JSON text, as the daemon's answer came: serde_json's default float
    // parsing is not round-trip exact, so `to_value` alone can differ in the last digit.
    let expected: Value = serde_json::from_slice(&serde_json::to_vec(&expected).unwrap()).unwrap();
    assert_eq!(qa.1["result"], expected);
    for answer in qa.1["result"].as_array().unwrap() {
        let (s, e) = (
            answer["start"].as_u64().unwrap() as usize,
            answer["end"].as_u64().unwrap() as usize,
        );
        let slice: String = CONTEXT.chars().skip(s).take(e - s).collect();
        assert_eq!(answer["answer"], slice.as_str());
    }
    let qa2 = got
        .iter()
        .find(|(_, v)| v["id"] == "qa-2")
        .expect("QA error");
    assert_eq!(qa2.0, "err/qa");
    assert_eq!(qa2.1["error"]["code"], "missing_field");

    // Stats arrive with counters that add up.
    let stats = device.collect(Duration::from_secs(5), |g| {
        g.iter().any(|(t, _)| t == "anotador/t/stats")
    });
    let s = &stats
        .iter()
        .find(|(t, _)| t == "anotador/t/stats")
        .expect("stats")
        .1;
    assert_eq!(s["received"], 11);
    assert_eq!(s["published"], 11);
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
    count_answers(&mut answered, &first);
    assert!(answered.len() < total, "the kill should land mid-stream");

    // Second run, same client id: the broker hands over what was not acknowledged.
    let mut daemon = Daemon::start(&config);
    let (lost, duplicates) =
        collect_the_rest(&device, &mut answered, total, Duration::from_secs(60));
    println!(
        "sent {total}, answered {}, duplicates {duplicates}, lost {}",
        answered.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "lost {lost:?}");

    // SIGTERM: clean exit and a retained offline status.
    let status = daemon.terminate();
    assert!(status.success(), "{status:?}");
    let (offline, got) = saw_status(&device, "offline", Duration::from_secs(10));
    assert!(offline, "{got:?}");
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

    // A QA model cannot be fed plain-text payloads.
    let (ok, out) = run(&base.replace(
        "errors = \"err/qa\"",
        "errors = \"err/qa\"\nformat = \"text\"",
    ));
    assert!(
        !ok && out.contains("routes[2]") && out.contains("question"),
        "{out}"
    );

    // Limits beyond the model's maximum (the fixtures take 64 tokens).
    let (ok, out) = run(&base.replace("[models.cls]\n", "[models.cls]\nwindow = 100\n"));
    assert!(
        !ok && out.contains("models.cls") && out.contains("maximum"),
        "{out}"
    );

    // Model integrity: the right digest loads, any other is refused before parsing.
    let digest =
        anotador::bundle::model_sha256(std::path::Path::new(&fixture("bert-seq"))).unwrap();
    let pinned = |d: &str| {
        base.replace(
            "[models.cls]\n",
            &format!("[models.cls]\nsha256 = \"{d}\"\n"),
        )
    };
    let (ok, out) = run(&pinned(&digest));
    assert!(ok, "{out}");
    let mut wrong = digest.clone().into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let (ok, out) = run(&pinned(std::str::from_utf8(&wrong).unwrap()));
    assert!(
        !ok && out.contains("model.onnx") && out.contains("SHA-256"),
        "{out}"
    );
    let (ok, out) = run(&pinned("xyz"));
    assert!(!ok && out.contains("models.cls.sha256"), "{out}");
}

#[test]
fn systemd_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let broker = start_broker();
    let dir = TempDir::new("notify");
    let config = write_config(&dir.0, broker.port, "anotador-notify", "");
    let socket_path = dir.0.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let sock = socket_path.display().to_string();
    let mut daemon = Daemon::start_with_env(
        &config,
        &[("NOTIFY_SOCKET", &sock), ("WATCHDOG_USEC", "400000")],
    );
    let mut got: Vec<String> = Vec::new();
    let mut buf = [0u8; 512];
    let enough = |got: &[String]| {
        got.iter().any(|m| m.contains("READY=1"))
            && got.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline && !enough(&got) {
        if let Ok(n) = socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(
        enough(&got),
        "READY=1 and watchdog pings expected: {got:?}\n{}",
        daemon.log()
    );
    Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status()
        .unwrap();
    let mut stopping = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline && !stopping {
        if let Ok(n) = socket.recv(&mut buf) {
            stopping = String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
        }
    }
    assert!(stopping, "STOPPING=1 sent on SIGTERM");
    assert!(daemon.0.wait().unwrap().success());
}

#[test]
fn shared_subscription_splits_one_stream_between_two_daemons() {
    let broker = start_broker();
    let dir = TempDir::new("share");
    let base = std::fs::read_to_string(write_config(&dir.0, broker.port, "share", "")).unwrap();
    let mut daemons = Vec::new();
    for n in ["t1", "t2"] {
        let text = base
            .replace("name = \"t\"", &format!("name = \"{n}\""))
            .replace(
                "client_id = \"share\"",
                &format!("client_id = \"share-{n}\""),
            )
            .replace(
                "topic = \"in/ner/+\"",
                "topic = \"$share/workers/in/ner/+\"",
            )
            .replace("output = \"out/ner/{1}\"", "output = \"out/{name}/{1}\"");
        let path = dir.0.join(format!("{n}.toml"));
        std::fs::write(&path, text).unwrap();
        daemons.push(Daemon::start(&path));
    }
    let device = Device::connect(broker.port, "share-device");
    let online = device.collect(Duration::from_secs(30), |g| {
        ["anotador/t1/status", "anotador/t2/status"]
            .iter()
            .all(|s| g.iter().any(|(t, v)| t == s && v["status"] == "online"))
    });
    assert_eq!(
        online
            .iter()
            .filter(|(t, v)| t.ends_with("/status") && v["status"] == "online")
            .count(),
        2,
        "{online:?}"
    );
    let total = 200;
    for i in 0..total {
        device.publish(
            "in/ner/s",
            format!(r#"{{"id": {i}, "text": "Reunión en Quito número {i}."}}"#),
        );
    }
    let got = device.collect(Duration::from_secs(60), |g| {
        g.iter().filter(|(t, _)| t.starts_with("out/")).count() >= total
    });
    let mut by_daemon: HashMap<String, usize> = HashMap::new();
    let mut ids: HashMap<i64, usize> = HashMap::new();
    for (t, v) in got.iter().filter(|(t, _)| t.starts_with("out/")) {
        *by_daemon
            .entry(t.split('/').nth(1).unwrap().to_string())
            .or_default() += 1;
        *ids.entry(v["id"].as_i64().unwrap()).or_default() += 1;
    }
    println!("shared subscription split: {by_daemon:?}");
    assert_eq!(ids.len(), total, "every message answered");
    assert!(
        ids.values().all(|&n| n == 1),
        "each message answered by one daemon only"
    );
    assert!(
        by_daemon.len() == 2 && by_daemon.values().all(|&n| n > 0),
        "both daemons took a share: {by_daemon:?}"
    );
}

/// Payloads over `max_payload_bytes` but within the receive cap are read and
/// answered with `payload_too_large`, with the shipped limits (64 KiB, 4 MiB):
/// the broker never drops them for being larger than what the daemon takes.
#[test]
fn oversize_payloads_get_payload_too_large_with_the_default_limits() {
    let broker = start_broker();
    let dir = TempDir::new("oversize");
    let base = std::fs::read_to_string(write_config(&dir.0, broker.port, "oversize", "")).unwrap();
    let config = dir.0.join("oversize.toml");
    std::fs::write(&config, base.replace("max_payload_bytes = 2048\n", "")).unwrap();
    let device = Device::connect(broker.port, "oversize-device");
    let _daemon = Daemon::start(&config);
    wait_online(&device);
    let payload = |name: &str, size: usize| {
        let frame = format!(r#"{{"id": "{name}", "text": ""}}"#);
        let text = "a".repeat(size - frame.len());
        format!(r#"{{"id": "{name}", "text": "{text}"}}"#)
    };
    // Just over the old advertised packet limit (max_payload_bytes + 4096), and 1 MiB.
    let sizes = [("70k", 70_029), ("1m", 1 << 20)];
    for (name, size) in sizes {
        let p = payload(name, size);
        assert_eq!(p.len(), size);
        device.publish(&format!("in/ner/{name}"), p);
    }
    let got = device.collect(Duration::from_secs(30), |g| {
        g.iter().filter(|(t, _)| t.starts_with("err/")).count() >= 2
    });
    for (name, size) in sizes {
        let (_, e) = got
            .iter()
            .find(|(t, _)| *t == format!("err/ner/{name}"))
            .unwrap_or_else(|| panic!("nothing for the {name} payload: {got:?}"));
        assert_eq!(e["error"]["code"], "payload_too_large", "{e}");
        let reason = e["error"]["reason"].as_str().unwrap();
        assert!(reason.contains(&format!("{size} bytes")), "{reason}");
        assert_eq!(e["topic"], format!("in/ner/{name}"));
    }
}

/// Results, errors found at intake and errors found by a worker all name the
/// model the same way: the bundle's name.
#[test]
fn every_envelope_names_the_model_the_same_way() {
    let broker = start_broker();
    let dir = TempDir::new("names");
    let config = write_config(&dir.0, broker.port, "names", "");
    let device = Device::connect(broker.port, "names-device");
    let _daemon = Daemon::start(&config);
    wait_online(&device);
    let long = "El Banco de España publicó ayer en Madrid su informe anual. ".repeat(20);
    for payload in [
        r#"{"id": "ok", "text": "Hola desde Lima."}"#.to_string(),
        r#"{"id": "empty", "text": " "}"#.to_string(),
        format!(r#"{{"id": "long", "text": "{long}"}}"#),
    ] {
        device.publish("in/ner/n", payload);
    }
    device.publish("in/cls", "");
    device.publish("in/cls", "Llueve.");
    let got = device.collect(Duration::from_secs(30), |g| {
        g.iter()
            .filter(|(t, _)| t.starts_with("out/") || t.starts_with("err/"))
            .count()
            >= 5
    });
    let model = |id: &str| {
        got.iter()
            .find(|(_, v)| v["id"] == id)
            .unwrap_or_else(|| panic!("{id}: {got:?}"))
            .1["model"]
            .clone()
    };
    // A result, an intake error (empty text), a worker error (too many windows).
    assert_eq!(model("ok"), "bert-token");
    assert_eq!(model("empty"), "bert-token");
    assert_eq!(model("long"), "bert-token");
    let cls: Vec<&Value> = got
        .iter()
        .filter(|(t, _)| t == "out/cls" || t == "err/cls")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(cls.len(), 2, "{got:?}");
    assert!(cls.iter().all(|v| v["model"] == "bert-seq"), "{cls:?}");
}

/// A model's `redact` options reach what the daemon publishes: the result gains
/// `redacted` (text with the entities replaced, spans with both offsets), every
/// other field as without redaction.
#[test]
fn redaction_set_in_the_config_is_published() {
    let broker = start_broker();
    let dir = TempDir::new("redact");
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/ner-es");
    let config = bench_config(
        &dir,
        broker.port,
        model.to_str().unwrap(),
        "redact = [\"PER\", \"LOC\"]\nredact_style = \"pseudonym\"\naggregation = \"first\"",
    );
    let device = Device::connect(broker.port, "device-redact");
    let _daemon = Daemon::start(&config);
    wait_online(&device);
    let text = "Gabriel García Márquez nació en Aracataca y García Márquez murió en México.";
    device.publish(
        "in/r1",
        serde_json::json!({"id": "r1", "text": text}).to_string(),
    );
    let got = device.collect(Duration::from_secs(30), |g| {
        g.iter().any(|(t, _)| t == "out/r1")
    });
    let (_, result) = got
        .iter()
        .find(|(t, _)| t == "out/r1")
        .expect("a result on out/r1");
    assert_eq!(result["id"], "r1");
    assert_eq!(result["topic"], "in/r1");
    assert_eq!(
        result["redacted"]["text"], "PER_1 nació en LOC_1 y PER_2 murió en LOC_2.",
        "{result}"
    );
    let spans = result["redacted"]["spans"].as_array().unwrap();
    assert_eq!(spans[0]["start"], 0);
    assert_eq!(spans[0]["end"], 22);
    assert_eq!(spans[0]["redacted_end"], 5);
    assert!(result["result"].as_array().unwrap().len() >= spans.len());
}
