//! The daemon's lifecycle against a real Mosquitto: shutdown bounded whatever the
//! broker does, the retained status right after a stop, and live reload.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

/// With the broker gone and the daemon backing off between reconnections, SIGTERM
/// still ends it within `shutdown_timeout_s` + 1 s.
#[test]
fn sigterm_with_the_broker_down_exits_within_the_bound() {
    let mut broker = start_broker();
    let dir = TempDir::new("down");
    let base = std::fs::read_to_string(write_config(
        &dir.0,
        broker.port,
        "down",
        "shutdown_timeout_s = 2",
    ))
    .unwrap();
    // Long waits between reconnections: the signal lands inside one.
    let text = base
        .replace("reconnect_min_ms = 50", "reconnect_min_ms = 4000")
        .replace("reconnect_max_ms = 500", "reconnect_max_ms = 30000");
    let config = dir.0.join("down.toml");
    std::fs::write(&config, text).unwrap();
    let device = Device::connect(broker.port, "down-device");
    let mut daemon = Daemon::start(&config);
    wait_online(&device);
    broker.stop();
    assert!(
        daemon.wait_log("retrying in", 1, Duration::from_secs(20)),
        "the daemon noticed the broker is gone:\n{}",
        daemon.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    let (status, took) = daemon.terminate_timed();
    println!("SIGTERM with the broker down: exited in {took:.2?} (shutdown_timeout_s = 2)");
    assert!(status.success(), "{status:?}\n{}", daemon.log());
    assert!(
        took <= Duration::from_secs(3),
        "exited after {took:?}, over shutdown_timeout_s + 1 s:\n{}",
        daemon.log()
    );
}

/// SIGTERM while the daemon resumes its session (deferred messages, caught up,
/// its own disconnect queued behind results the frozen broker has not
/// acknowledged) still ends with a retained `offline`.
#[test]
fn sigterm_during_a_session_resume_ends_with_retained_offline() {
    // Two unacknowledged publishes at a time from the daemon (Mosquitto's Receive
    // Maximum) and 32 messages taken at a time: results queue in the client behind
    // that window, and a resume's DISCONNECT waits behind them. A waiting list of
    // two messages: most of the stream is deferred, so the daemon resumes its
    // session every few seconds.
    let broker = start_broker_with("max_inflight_messages 2\n");
    let dir = TempDir::new("resume");
    let base = std::fs::read_to_string(write_config(
        &dir.0,
        broker.port,
        "resume",
        "backlog_bytes = 120",
    ))
    .unwrap();
    let config = dir.0.join("resume.toml");
    std::fs::write(&config, base.replace("queue = 8", "queue = 32")).unwrap();
    let device = Device::connect(broker.port, "resume-device");
    let mut daemon = Daemon::start(&config);
    wait_online(&device);
    for i in 0..3000 {
        device.publish(
            "in/ner/r",
            format!(r#"{{"id": {i}, "text": "Mensaje {i} desde Lima."}}"#),
        );
    }
    let resuming = "caught up: resuming the session";
    let mut caught = false;
    for _ in 0..20 {
        // A resume begins; the broker frozen at once cannot let it finish (no
        // CONNACK), whatever the daemon had sent by then. The test waits for
        // events only: if it reacted so late that the resume had already
        // reconnected, it lets the broker go and waits for the next resume.
        let before = daemon.log_count(resuming);
        if !daemon.wait_log(resuming, before + 1, Duration::from_secs(30)) {
            break;
        }
        broker.pause();
        let log = daemon.log();
        let begun = log.rfind(resuming).unwrap();
        if !log[begun..].contains("connected to") {
            caught = true;
            daemon.signal("-TERM");
            // Thawed once the daemon has begun to stop, so that the stop meets
            // the resume unfinished.
            daemon.wait_log("shutting down: finishing", 1, Duration::from_secs(30));
            broker.resume();
            break;
        }
        broker.resume();
    }
    assert!(caught, "no session resume was caught:\n{}", daemon.log());
    let status = daemon.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let retained = retained_status(broker.port, "resume-reader");
    assert_eq!(
        retained["status"],
        "offline",
        "retained status after a clean stop: {retained}\n{}",
        daemon.log()
    );
    // The resume's reconnection is the plan, not a failure: said at info, no backoff.
    let log = daemon.log();
    assert!(
        log.contains("INFO  anotador::transport::mqtt] session resume: reconnecting"),
        "{log}"
    );
    assert!(!log.contains("retrying in"), "{log}");
}

/// Results and errors per id on `out/` and `err/` topics.
fn outcomes(got: &[(String, serde_json::Value)]) -> HashMap<i64, Vec<serde_json::Value>> {
    let mut by_id: HashMap<i64, Vec<serde_json::Value>> = HashMap::new();
    for (t, v) in got {
        if t.starts_with("out/") || t.starts_with("err/") {
            if let Some(id) = v["id"].as_i64() {
                by_id.entry(id).or_default().push(v.clone());
            }
        }
    }
    by_id
}

/// A stream of messages with a model swapped for another in the middle (SIGHUP,
/// as `systemctl reload` sends): every message answered exactly once, by the old
/// model before the switch and the new one after, on the same connection.
#[test]
fn reload_mid_stream_swaps_a_model_and_loses_nothing() {
    let broker = start_broker();
    let dir = TempDir::new("reload");
    let config = write_config(&dir.0, broker.port, "reload", "");
    let device = Device::connect(broker.port, "reload-device");
    let daemon = Daemon::start(&config);
    wait_online(&device);
    let total = 600;
    let client = device.client.clone();
    // The second half of the stream waits until the reload is applied, so that both
    // models answer part of it however fast or loaded the machine is.
    let (reloaded, reload_applied) = std::sync::mpsc::channel::<()>();
    let publisher = std::thread::spawn(move || {
        for i in 0..total {
            if i == total / 2 {
                reload_applied
                    .recv_timeout(Duration::from_secs(60))
                    .expect("the reload applied");
            }
            let text =
                format!(r#"{{"id": {i}, "text": "Mensaje {i}: la ONU se reunió en Lima."}}"#);
            client
                .publish("in/ner/s", rumqttc::QoS::AtLeastOnce, false, text)
                .unwrap();
            std::thread::sleep(Duration::from_millis(3));
        }
    });
    // Mid-stream: once the first answers are out.
    let mut got = device.collect(Duration::from_secs(60), |g| outcomes(g).len() >= 50);
    let text = std::fs::read_to_string(&config).unwrap();
    let swapped = text.replace(&fixture("bert-token"), &fixture("distilbert-token"));
    assert_ne!(text, swapped);
    std::fs::write(&config, swapped).unwrap();
    daemon.signal("-HUP");
    // Everything received meanwhile is kept for the count below.
    got.extend(device.collect(Duration::from_secs(60), |g| {
        g.iter().any(|(t, v)| {
            t == "anotador/t/status" && v["models"]["ner"]["bundle"] == "distilbert-token"
        })
    }));
    reloaded.send(()).unwrap();
    let answered = |g: &[(String, serde_json::Value)]| {
        let mut ids = outcomes(&got);
        ids.extend(outcomes(g));
        ids.len()
    };
    let rest = device.collect(Duration::from_secs(60), |g| answered(g) >= total);
    got.extend(rest);
    publisher.join().unwrap();
    // Late duplicates, if any, are counted too.
    got.extend(device.collect(Duration::from_millis(500), |_| false));
    let by_id = outcomes(&got);
    let mut models: HashMap<String, usize> = HashMap::new();
    for i in 0..total as i64 {
        let answers = by_id.get(&i).map_or(&[][..], |v| v.as_slice());
        assert_eq!(answers.len(), 1, "message {i}: {answers:?}");
        assert!(answers[0]["error"].is_null(), "message {i}: {}", answers[0]);
        *models
            .entry(answers[0]["model"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    println!("reload mid-stream: {total} messages, answered by {models:?}");
    assert!(
        models.len() == 2
            && models.contains_key("bert-token")
            && models.contains_key("distilbert-token"),
        "both models answered part of the stream: {models:?}"
    );
    let status = retained_status(broker.port, "reload-reader");
    assert_eq!(
        status["models"]["ner"]["bundle"], "distilbert-token",
        "{status}"
    );
    assert_eq!(status["reload"]["ok"], true, "{status}");
    let log = daemon.log();
    assert_eq!(
        log.matches("connected to").count(),
        1,
        "the MQTT session was kept:\n{log}"
    );
}

/// A configuration that cannot be applied, on SIGHUP, changes nothing: the old
/// models keep answering, and the status says why the reload failed.
#[test]
fn a_broken_config_on_reload_changes_nothing() {
    let broker = start_broker();
    let dir = TempDir::new("badreload");
    let config = write_config(&dir.0, broker.port, "badreload", "");
    let good = std::fs::read_to_string(&config).unwrap();
    let device = Device::connect(broker.port, "badreload-device");
    let daemon = Daemon::start(&config);
    wait_online(&device);
    let broken = [
        // A bundle that does not load.
        (
            good.replace(&fixture("bert-token"), &fixture("broken/bad-labels")),
            "config.json",
        ),
        // Not TOML.
        (good.replace("[broker]", "[broker"), "anotador.toml"),
        // A section that cannot change without a restart.
        (
            good.replace("reconnect_max_ms = 500", "reconnect_max_ms = 600"),
            "[broker]",
        ),
        // A route for a model that is not there.
        (
            good.replace("model = \"cls\"", "model = \"nope\""),
            "routes[1].model",
        ),
    ];
    for (n, (text, why)) in broken.iter().enumerate() {
        std::fs::write(&config, text).unwrap();
        daemon.signal("-HUP");
        let status = wait_status(&device, Duration::from_secs(20), |v| {
            v["reload"]["ok"] == false
                && v["reload"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains(why))
        });
        assert_eq!(status["status"], "online");
        assert_eq!(status["models"]["ner"]["bundle"], "bert-token", "{status}");
        // Still answering, with the old model and routes.
        device.publish(
            "in/ner/x",
            format!(r#"{{"id": {n}, "text": "Hola desde Quito."}}"#),
        );
        device.publish("in/cls", "Llueve en Santiago.");
        let got = device.collect(Duration::from_secs(20), |g| {
            g.iter().any(|(t, _)| t == "out/ner/x") && g.iter().any(|(t, _)| t == "out/cls")
        });
        let ner = got
            .iter()
            .find(|(t, _)| t == "out/ner/x")
            .unwrap_or_else(|| panic!("no answer after a failed reload: {got:?}"));
        assert_eq!(
            (&ner.1["id"], &ner.1["model"]),
            (&n.into(), &"bert-token".into())
        );
        assert!(got.iter().any(|(t, _)| t == "out/cls"), "{got:?}");
    }
    let log = daemon.log();
    assert_eq!(
        log.matches("reload failed; still running the previous configuration")
            .count(),
        broken.len(),
        "{log}"
    );
    assert_eq!(log.matches("connected to").count(), 1, "{log}");
}

/// RSS of the daemon once idle: past the workers' idle trim (2 s without a job),
/// then sampled until it has not changed for a second (a loaded machine may run
/// the trim late).
fn idle_rss(pid: u32) -> u64 {
    std::thread::sleep(Duration::from_millis(2500));
    let mut last = rss_of(pid).unwrap().0;
    let mut steady = std::time::Instant::now();
    let give_up = std::time::Instant::now() + Duration::from_secs(15);
    while steady.elapsed() < Duration::from_secs(1) && std::time::Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(100));
        let now = rss_of(pid).unwrap().0;
        if now != last {
            last = now;
            steady = std::time::Instant::now();
        }
    }
    last
}

fn answer(device: &Device, count: usize) {
    for i in 0..count {
        device.publish(
            "in/x",
            format!(r#"{{"id": {i}, "text": "El Real Madrid ganó en Sevilla ante el Betis."}}"#),
        );
    }
    let got = device.collect(Duration::from_secs(60), |g| {
        g.iter().filter(|(t, _)| t.starts_with("out/")).count() >= count
    });
    assert_eq!(
        got.iter().filter(|(t, _)| t.starts_with("out/")).count(),
        count
    );
}

/// A reload that swaps the shipped model for a tiny one gives the big one's
/// memory back: RSS ends near a daemon started on the small model.
#[test]
fn reload_frees_the_replaced_model() {
    let big = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/ner-es");
    let broker = start_broker();
    let dir = TempDir::new("reloadrss");
    let config = bench_config(&dir, broker.port, &big.display().to_string(), "");
    let device = Device::connect(broker.port, "rss-device");
    let daemon = Daemon::start(&config);
    wait_online(&device);
    let pid = daemon.0.id();
    answer(&device, 20);
    let before = idle_rss(pid);
    let small = fixture("bert-token");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace(&big.display().to_string(), &small)).unwrap();
    daemon.signal("-HUP");
    wait_status(&device, Duration::from_secs(30), |v| {
        v["models"]["m"]["bundle"] == "bert-token"
    });
    answer(&device, 20);
    let after = idle_rss(pid);
    drop(daemon);

    let fresh_dir = TempDir::new("freshrss");
    let fresh_config = bench_config(&fresh_dir, broker.port, &small, "");
    let fresh = Daemon::start(&fresh_config);
    wait_status(&device, Duration::from_secs(30), |v| {
        v["status"] == "online"
            && v["models"]["m"]["bundle"] == "bert-token"
            && v["reload"].is_null()
    });
    answer(&device, 20);
    let fresh_rss = idle_rss(fresh.0.id());
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "RSS: {:.1} MiB on models/ner-es, {:.1} MiB after a reload to bert-token; a daemon started on bert-token: {:.1} MiB",
        mib(before),
        mib(after),
        mib(fresh_rss)
    );
    assert!(after < before, "the replaced model was not freed");
    assert!(
        mib(after) < mib(fresh_rss) + 4.0,
        "after the reload {:.1} MiB, a fresh daemon {:.1} MiB",
        mib(after),
        mib(fresh_rss)
    );
}
