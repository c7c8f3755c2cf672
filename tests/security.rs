//! Security against a real Mosquitto: TLS with server verification, mutual TLS,
//! username/password from a file, no plaintext fallback, and a clear error (with
//! backoff, not a crash loop) for wrong credentials. Certificates are generated per
//! run with the `openssl` command line.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Config for a daemon that talks to `port` with `broker_extra` in `[broker]`.
fn config(dir: &Path, port: u16, id: &str, broker_extra: &str) -> std::path::PathBuf {
    let base = std::fs::read_to_string(write_config(dir, port, id, "")).unwrap();
    // Plain keys go into [broker]; a sub-table goes after the whole [broker] section.
    let text = if broker_extra.starts_with('[') {
        base.replace("[models.ner]", &format!("{broker_extra}\n\n[models.ner]"))
    } else {
        base.replace(
            &format!("client_id = \"{id}\"\n"),
            &format!("client_id = \"{id}\"\n{broker_extra}\n"),
        )
    };
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn answers_one_message(device: &Device) -> bool {
    device.publish("in/cls", "Llueve mucho en Santiago.");
    let got = device.collect(Duration::from_secs(20), |g| {
        g.iter().any(|(t, _)| t == "out/cls")
    });
    got.iter().any(|(t, _)| t == "out/cls")
}

#[test]
fn mutual_tls_works_and_plaintext_is_never_used() {
    let pki = TempDir::new("pki");
    make_pki(&pki.0);
    let p = |f: &str| pki.0.join(f).display().to_string();
    // Plain listener for the test device, TLS listener (client certificate required) for the daemon.
    let (broker, tls_port) = start_broker_with_listener(|tls_port| {
        format!(
            "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            p("ca.pem"),
            p("server.pem"),
            p("server.key")
        )
    });
    let device = Device::connect(broker.port, "tls-device");

    let tls = format!(
        "[broker.tls]\nca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"",
        p("ca.pem"),
        p("client.pem"),
        p("client.key")
    );
    let daemon = Daemon::start(&config(&pki.0, tls_port, "tls-daemon", &tls));
    let (online, _) = saw_status(&device, "online", Duration::from_secs(30));
    assert!(
        online,
        "daemon not online over mutual TLS:\n{}",
        daemon.log()
    );
    assert!(
        answers_one_message(&device),
        "no result over mutual TLS:\n{}",
        daemon.log()
    );
    drop(daemon);

    // The same TLS settings pointed at the plaintext port: the handshake fails and the
    // daemon keeps retrying; it never falls back to plaintext.
    let daemon = Daemon::start(&config(&pki.0, broker.port, "tls-to-plain", &tls));
    let (online, _) = saw_status(&device, "online", Duration::from_secs(4));
    assert!(!online, "connected in plaintext?");
    let log = daemon.stderr();
    assert!(log.contains("retrying in"), "backs off:\n{log}");
}

#[test]
fn password_from_file_and_wrong_credentials_back_off() {
    let dir = TempDir::new("auth");
    let passwd = dir.0.join("passwd");
    let status = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["anotador", "s3cret-pw"])
        .status()
        .expect("mosquitto_passwd (package mosquitto)");
    assert!(status.success());
    // Later settings win: anonymous clients are refused, the device logs in too.
    let broker = start_broker_with(&format!(
        "allow_anonymous false\npassword_file {}\n",
        passwd.display()
    ));
    std::fs::write(dir.0.join("pw"), "s3cret-pw\n").unwrap();
    let good = format!(
        "username = \"anotador\"\npassword_file = \"{}\"",
        dir.0.join("pw").display()
    );
    let device =
        Device::connect_with_credentials(broker.port, "auth-device", "anotador", "s3cret-pw");
    let daemon = Daemon::start(&config(&dir.0, broker.port, "auth-daemon", &good));
    wait_online(&device);
    assert!(answers_one_message(&device), "{}", daemon.log());
    let log = daemon.stderr();
    assert!(!log.contains("s3cret-pw"), "password in the log");

    std::fs::write(dir.0.join("bad"), "wrong\n").unwrap();
    let bad = format!(
        "username = \"anotador\"\npassword_file = \"{}\"",
        dir.0.join("bad").display()
    );
    let mut daemon = Daemon::start(&config(&dir.0, broker.port, "auth-bad", &bad));
    assert!(
        daemon.wait_log("retrying in", 1, Duration::from_secs(30)),
        "no retry after a refused login:\n{}",
        daemon.log()
    );
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "wrong credentials must not kill the daemon"
    );
    let log = daemon.stderr();
    assert!(
        log.contains("retrying in") && log.to_lowercase().contains("refused"),
        "clear error and backoff:\n{log}"
    );
}
