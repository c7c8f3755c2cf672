//! MQTT 5 request/response and `anotador ask`, through the daemon's embedded broker
//! and through Mosquitto: an allowed response topic gets the answer with the
//! request's correlation data and user properties, a refused one an error on the
//! route's error topic and nothing anywhere else, a request without one the route's
//! output as before. And the README's quick start: the shipped configuration with
//! only Rust, then `anotador ask`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

#[cfg(feature = "broker")]
const TEXT: &str = "El Real Madrid ganó en Sevilla ante el Betis, según informó EFE.";

/// The checks, whichever broker is on `port` and serves a daemon whose NER route
/// allows `reply/allowed/#`.
fn request_response(port: u16, tag: &str) {
    let device = V5Device::connect(port, &format!("{tag}-v5"));
    let reply = format!("reply/allowed/{tag}");
    let text = r#"{"id": "a", "text": "Mensaje desde Valparaíso para la ONU."}"#;

    // Allowed: the answer on the response topic, correlation data and user
    // properties echoed; nothing on the route's output.
    device.request(
        "in/ner/r1",
        text,
        Some(&reply),
        b"corr-1",
        &[("trace", "t-1")],
    );
    // Refused: a response topic outside `responses`, and one the payload would
    // like to steer into the route's own output space.
    device.request(
        "in/ner/r2",
        r#"{"id": "b", "text": "Hola desde Lima."}"#,
        Some("out/elsewhere"),
        b"corr-2",
        &[],
    );
    // No response topic: as before, the route's output.
    device.request(
        "in/ner/r3",
        r#"{"id": "c", "text": "Hola desde Quito."}"#,
        None,
        b"corr-3",
        &[],
    );
    // A bad payload with an allowed response topic: its error goes back to the
    // requester too.
    device.request("in/ner/r4", "{not json", Some(&reply), b"corr-4", &[]);

    let got = device.collect(Duration::from_secs(60), |g| {
        let has = |topic: &str| g.iter().any(|m| m.topic == topic);
        g.iter().filter(|m| m.topic == reply).count() >= 2 && has("err/ner/r2") && has("out/ner/r3")
    });
    let on = |topic: &str| -> Vec<&V5Message> { got.iter().filter(|m| m.topic == topic).collect() };

    let replies = on(&reply);
    let result = replies
        .iter()
        .find(|m| m.correlation.as_deref() == Some(b"corr-1".as_slice()))
        .unwrap_or_else(|| panic!("no reply for corr-1: {got:?}"));
    assert_eq!(result.payload["id"], "a", "{result:?}");
    assert_eq!(result.payload["task"], "token-classification");
    assert_eq!(result.payload["topic"], "in/ner/r1");
    assert!(result.payload["result"].is_array(), "{result:?}");
    // The request's user properties come back as they were. mqtt5's broker also
    // stamps every message it forwards with its publisher's client id
    // (`x-mqtt-client-id`, replacing any the publisher set; Mosquitto adds
    // nothing), so through the embedded broker the reply names the daemon.
    let (stamped, echoed): (Vec<_>, Vec<_>) = result
        .user_properties
        .iter()
        .partition(|(k, _)| k == "x-mqtt-client-id");
    assert_eq!(
        echoed,
        [&("trace".to_string(), "t-1".to_string())],
        "{result:?}"
    );
    assert!(
        stamped.iter().all(|(_, v)| *v == format!("rr-{tag}")),
        "{result:?}"
    );
    assert!(on("out/ner/r1").is_empty(), "answered twice: {got:?}");

    let bad = replies
        .iter()
        .find(|m| m.correlation.as_deref() == Some(b"corr-4".as_slice()))
        .unwrap_or_else(|| panic!("no reply for corr-4: {got:?}"));
    assert_eq!(bad.payload["error"]["code"], "invalid_json", "{bad:?}");

    let refused = on("err/ner/r2");
    assert_eq!(refused.len(), 1, "{got:?}");
    assert_eq!(
        refused[0].payload["error"]["code"],
        "response_topic_refused"
    );
    assert_eq!(refused[0].payload["id"], "b");
    assert_eq!(
        refused[0].correlation.as_deref(),
        Some(b"corr-2".as_slice())
    );
    assert!(on("out/elsewhere").is_empty(), "{got:?}");
    assert!(
        on("out/ner/r2").is_empty(),
        "a refused request must not run: {got:?}"
    );

    let plain = on("out/ner/r3");
    assert_eq!(plain.len(), 1, "{got:?}");
    assert_eq!(plain[0].payload["id"], "c");
    assert_eq!(
        plain[0].correlation, None,
        "routes answer as before: {got:?}"
    );

    // `anotador ask`: allowed, two lines of stdin answered in order.
    let out = ask(
        port,
        &["--topic", "in/ner/ask", "--reply-to", &reply],
        "Hola desde Lima.\nMensaje desde Valparaíso para la ONU.\n",
    );
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines
        .iter()
        .all(|l| l["topic"] == "in/ner/ask" && l["result"].is_array()));
    assert!(
        lines[1]["tokens"].as_u64() > lines[0]["tokens"].as_u64(),
        "in input order: {lines:?}"
    );

    // Refused: ask gives up with a hint, and the error is on the error topic.
    let out = ask(
        port,
        &[
            "--topic",
            "in/ner/refused",
            "--reply-to",
            "not/allowed",
            "--timeout",
            "3",
            "Hola.",
        ],
        "",
    );
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("responses"), "{stderr}");
    let got = device.collect(Duration::from_secs(20), |g| {
        g.iter().any(|m| m.topic == "err/ner/refused")
    });
    let error = got.iter().find(|m| m.topic == "err/ner/refused").unwrap();
    assert_eq!(error.payload["error"]["code"], "response_topic_refused");
    assert!(!got.iter().any(|m| m.topic == "not/allowed"), "{got:?}");
}

#[test]
#[cfg(feature = "broker")]
fn request_response_through_the_embedded_broker() {
    let dir = TempDir::new("rr-embedded");
    let config = write_config_embedded(&dir.0, "127.0.0.1:0", "rr-embedded", None);
    allow_responses(&config, "reply/allowed/#");
    let daemon = Daemon::start(&config);
    let port = embedded_port(&daemon);
    request_response(port, "embedded");
}

#[test]
fn request_response_through_mosquitto() {
    let broker = start_broker();
    let dir = TempDir::new("rr-mosquitto");
    let config = write_config(&dir.0, broker.port, "rr-mosquitto", "");
    allow_responses(&config, "reply/allowed/#");
    let _daemon = Daemon::start(&config);
    let device = Device::connect(broker.port, "rr-watch");
    wait_online(&device);
    request_response(broker.port, "mosquitto");
}

/// The README's first two commands with only Rust installed: the shipped
/// configuration as it is (but on a free port instead of 1883, which a test must
/// not take), then `anotador ask` with its defaults printing the entities.
#[test]
#[cfg(feature = "broker")]
fn quick_start_runs_the_shipped_config_and_ask_prints_entities() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(root.join("config/anotador.toml")).unwrap();
    // The shipped file, as parsed: its own broker on the default port, no
    // external address.
    let parsed: toml::Value = toml::from_str(&shipped).unwrap();
    let broker = &parsed["broker"];
    assert_eq!(
        broker["embedded"]["listen"].as_str(),
        Some("127.0.0.1:1883"),
        "{broker:?}"
    );
    assert!(broker.get("host").is_none() && broker.get("port").is_none());
    assert_eq!(
        shipped.matches("listen = \"127.0.0.1:1883\"").count(),
        1,
        "the replace below must hit the one listen line"
    );
    let dir = TempDir::new("quick-start");
    let config = dir.0.join("anotador.toml");
    let text = shipped
        .replace("listen = \"127.0.0.1:1883\"", "listen = \"127.0.0.1:0\"")
        .replace(
            "path = \"../models/",
            &format!("path = \"{}/models/", root.display()),
        );
    std::fs::write(&config, text).unwrap();
    let daemon = Daemon::start(&config);
    let port = embedded_port(&daemon);

    // The README's example, as printed there: the text, then each entity's group,
    // word and offsets and the token count must be what `ask` prints now.
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let (text, shown) = readme_ask_example(&readme);
    assert_eq!(text, TEXT, "the README's ask example changed its text");
    let out = ask(port, &[&text], "");
    assert!(out.status.success(), "{out:?}\n{}", daemon.log());
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["model"], "ner-es", "{answer}");
    let printed = entities_of(&answer);
    assert_eq!(
        (printed, answer["tokens"].as_u64()),
        shown,
        "README.md's ask example no longer matches what ask prints: update it"
    );
    // The README's `annotate` line prints the same, without a broker.
    let mut child = std::process::Command::new(anotador_bin())
        .args(["annotate", "--model"])
        .arg(root.join("models/ner-es"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(child.stdin.take().unwrap(), "{text}").unwrap();
    let line = child.wait_with_output().unwrap().stdout;
    let annotated: Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(
        (entities_of(&annotated), annotated["tokens"].as_u64()),
        shown,
        "{annotated}"
    );
    // The text never reaches the log at info.
    assert!(!daemon.log().contains("Sevilla"), "{}", daemon.log());
}

type Entity = (String, String, u64, u64);

/// (group, word, start, end) of each entity of an answer.
fn entities_of(answer: &Value) -> Vec<Entity> {
    answer["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["entity_group"].as_str().unwrap().to_string(),
                e["word"].as_str().unwrap().to_string(),
                e["start"].as_u64().unwrap(),
                e["end"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The README's `ask` example: its text, and the entities and token count it shows
/// (scores and timings are elided there with `…`).
fn readme_ask_example(readme: &str) -> (String, (Vec<Entity>, Option<u64>)) {
    let start = readme
        .find("$ cargo run --release -- ask \"")
        .expect("README.md has the ask example");
    let block = &readme[start..];
    let block = &block[..block.find("```").expect("its code block ends")];
    let text = block.split('"').nth(1).unwrap().to_string();
    let field = |item: &str, key: &str| -> String {
        let at = item.find(&format!("\"{key}\":")).unwrap() + key.len() + 3;
        item[at..]
            .split([',', '}'])
            .next()
            .unwrap()
            .trim_matches('"')
            .to_string()
    };
    let entities = block
        .split("{\"entity_group\"")
        .skip(1)
        .map(|item| {
            let item = format!("{{\"entity_group\"{item}");
            (
                field(&item, "entity_group"),
                field(&item, "word"),
                field(&item, "start").parse().unwrap(),
                field(&item, "end").parse().unwrap(),
            )
        })
        .collect();
    let tokens = field(block, "tokens").parse().ok();
    (text, (entities, tokens))
}
