//! `anotador annotate` as batch work: worker threads keeping input order, files
//! and gzip in and out, resume after a SIGKILL, stderr, and redaction (command
//! line and daemon route).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use serde_json::Value;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn shipped(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name)
        .display()
        .to_string()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("anotador-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_anotador"))
        .arg("annotate")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs `annotate` to the end; (stdout, stderr, success).
fn annotate(args: &[&str], stdin: &[u8]) -> (String, String, bool) {
    let mut child = spawn(args);
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    // Written from a thread: the child answers while we feed it.
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

/// Real Spanish text: the ParlaMint paragraphs of the benchmark, one per line,
/// repeated to `n` lines.
fn paragraphs(n: usize) -> Vec<String> {
    let text = include_str!("../benches/messages-es.txt");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    (0..n).map(|i| lines[i % lines.len()].to_string()).collect()
}

/// Their first sentences: one window each, so that thousands of lines run in
/// seconds in the test build.
fn sentences(n: usize) -> Vec<String> {
    paragraphs(n)
        .into_iter()
        .map(|p| p.split(". ").next().unwrap().to_string())
        .collect()
}

fn joined(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// An envelope without its timings, the one part that differs between runs.
fn stable(line: &str) -> String {
    let mut v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    if let Some(o) = v.as_object_mut() {
        o.remove("timings_ms");
    }
    v.to_string()
}

fn stable_lines(text: &str) -> Vec<String> {
    text.lines().map(stable).collect()
}

fn gunzip(path: &Path) -> String {
    let mut text = String::new();
    MultiGzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    text
}

fn gzip(path: &Path, text: &str) {
    let mut encoder = GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::default(),
    );
    encoder.write_all(text.as_bytes()).unwrap();
    encoder.finish().unwrap();
}

#[test]
fn threads_keep_input_order_and_answers() {
    // Long paragraphs (several windows of the 64-token fixture) among short
    // sentences, so later lines finish first; ids say where each answer belongs.
    let mut lines = Vec::new();
    for (i, p) in paragraphs(60).iter().enumerate() {
        let text = if i % 5 == 0 {
            p.clone()
        } else {
            p.split(". ").next().unwrap().to_string()
        };
        lines.push(serde_json::json!({"id": i, "text": text}).to_string());
    }
    lines.insert(7, "{\"id\": 999".into()); // a bad line keeps its place too
    let input = joined(&lines);
    let model = fixture("bert-token");
    let run = |threads: &str| {
        let (out, err, ok) = annotate(
            &["--model", &model, "--format", "json", "--threads", threads],
            input.as_bytes(),
        );
        assert!(ok, "{err}");
        stable_lines(&out)
    };
    let one = run("1");
    let three = run("3");
    assert_eq!(one.len(), lines.len());
    assert_eq!(three, one, "three workers answer what one does, in order");
    let ids: Vec<Value> = three
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["id"].clone())
        .collect();
    for (i, id) in ids.iter().enumerate() {
        match i {
            7 => assert!(id.is_null(), "the bad line's error is line 8"),
            i if i < 7 => assert_eq!(id, i),
            i => assert_eq!(id, i - 1),
        }
    }
    let long: Vec<u64> = three
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["windows"].as_u64())
        .collect();
    assert!(
        long.iter().any(|&w| w > 1),
        "some lines need several windows"
    );
}

#[test]
fn gzip_in_and_out_round_trip() {
    let dir = TempDir::new("gzip");
    let lines = paragraphs(50);
    let text = joined(&lines);
    let (plain, input_gz) = (dir.path("in.txt"), dir.path("in.txt.gz"));
    std::fs::write(&plain, &text).unwrap();
    gzip(&input_gz, &text);
    let model = fixture("albert-token");
    let run = |input: &Path, output: &Path| {
        let (out, err, ok) = annotate(
            &[
                "--model",
                &model,
                "--input",
                input.to_str().unwrap(),
                "--output",
                output.to_str().unwrap(),
            ],
            b"",
        );
        assert!(ok, "{err}");
        assert!(out.is_empty(), "nothing on stdout with --output");
    };
    let reference = dir.path("ref.jsonl");
    run(&plain, &reference);
    let expected = stable_lines(&std::fs::read_to_string(&reference).unwrap());
    assert_eq!(expected.len(), lines.len());

    let out_gz = dir.path("out.jsonl.gz");
    run(&input_gz, &out_gz);
    let bytes = std::fs::read(&out_gz).unwrap();
    assert_eq!(&bytes[..2], b"\x1f\x8b", "gzip magic");
    assert_eq!(stable_lines(&gunzip(&out_gz)), expected);
    // What one run wrote as gzip, another reads back as its input.
    let again = dir.path("again.txt.gz");
    let words: String = gunzip(&out_gz)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            format!("{}\n", v["result"].as_array().unwrap().len())
        })
        .collect();
    gzip(&again, &words);
    let from_gz = dir.path("from-gz.jsonl");
    run(&again, &from_gz);
    assert_eq!(
        std::fs::read_to_string(&from_gz).unwrap().lines().count(),
        lines.len()
    );
    // An existing output is not overwritten by accident.
    let (_, err, ok) = annotate(
        &[
            "--model",
            &model,
            "-i",
            plain.to_str().unwrap(),
            "-o",
            reference.to_str().unwrap(),
        ],
        b"",
    );
    assert!(!ok && err.contains("--resume"), "{err}");
}

/// Lines of an output so far: a plain file as it is, a gzip one as far as it
/// decodes (the member being written is cut short).
fn lines_so_far(path: &Path, gzip: bool) -> usize {
    let Ok(file) = std::fs::File::open(path) else {
        return 0;
    };
    let mut text = Vec::new();
    if gzip {
        let _ = MultiGzDecoder::new(file).read_to_end(&mut text);
    } else {
        let _ = std::io::BufReader::new(file).read_to_end(&mut text);
    }
    text.iter().filter(|&&b| b == b'\n').count()
}

/// Runs to completion once, then again killed with SIGKILL part-way and resumed:
/// the resumed output equals the clean one line for line.
fn resume_after_kill(output_name: &str, kill_after: usize) {
    let dir = TempDir::new(&format!("resume-{output_name}"));
    let lines = sentences(2000);
    let input = dir.path("in.txt");
    std::fs::write(&input, joined(&lines)).unwrap();
    let model = fixture("bert-token");
    let gz = output_name.ends_with(".gz");
    let args = |output: &Path, resume: bool| {
        let mut a: Vec<String> = [
            "--model",
            &model,
            "--threads",
            "2",
            "-i",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let clean = dir.path(&format!("clean-{output_name}"));
    let a = args(&clean, false);
    let out = spawn(&a.iter().map(String::as_str).collect::<Vec<_>>())
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |p: &Path| {
        if gz {
            gunzip(p)
        } else {
            std::fs::read_to_string(p).unwrap()
        }
    };
    let expected = stable_lines(&read(&clean));
    assert_eq!(expected.len(), lines.len());

    let output = dir.path(output_name);
    let a = args(&output, false);
    let mut child = spawn(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let deadline = Instant::now() + Duration::from_secs(120);
    while lines_so_far(&output, gz) < kill_after {
        assert!(Instant::now() < deadline, "no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no flush, no cleanup
    child.wait().unwrap();
    let before = lines_so_far(&output, gz);
    assert!(
        before >= kill_after && before < lines.len(),
        "killed mid-file: {before} of {} lines",
        lines.len()
    );

    let a = args(&output, true);
    let out = spawn(&a.iter().map(String::as_str).collect::<Vec<_>>())
        .wait_with_output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resumed after"), "{stderr}");
    let resumed = stable_lines(&read(&output));
    assert_eq!(resumed.len(), expected.len());
    for (i, (got, want)) in resumed.iter().zip(&expected).enumerate() {
        assert_eq!(got, want, "line {}", i + 1);
    }
    // Resuming a finished run does nothing more.
    let out = spawn(&a.iter().map(String::as_str).collect::<Vec<_>>())
        .wait_with_output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(stable_lines(&read(&output)), expected);
}

#[test]
fn resume_after_sigkill_equals_a_clean_run() {
    resume_after_kill("out.jsonl", 300);
}

#[test]
fn resume_after_sigkill_equals_a_clean_run_gzip() {
    // Past the first whole member (1000 lines): whole members are kept and the
    // cut one's complete lines salvaged.
    resume_after_kill("out.jsonl.gz", 1200);
}

#[test]
fn stderr_has_only_the_summary_when_not_a_terminal() {
    let model = fixture("bert-token");
    let input = b"Hola, Lima.\n\nLa ONU se reuni\xc3\xb3 en Quito.\n\xff\n";
    let (out, err, ok) = annotate(&["--model", &model], input);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 4);
    assert!(!err.contains('\r') && !err.contains('\x1b'), "{err:?}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("annotate: 4 lines in ")
            && lines[0].ends_with("2 results, 2 errors (empty_text 1, invalid_utf8 1)"),
        "{}",
        lines[0]
    );
    let (_, err, ok) = annotate(&["--model", &model, "--quiet"], input);
    assert!(ok && err.is_empty(), "{err}");
}

#[test]
fn redaction_replaces_chosen_groups_and_keeps_auditable_offsets() {
    let model = shipped("ner-es");
    let input = concat!(
        "Gabriel García Márquez nació en Aracataca y García Márquez murió en México.\n",
        "El Real Madrid ganó en Sevilla ante el Betis, según informó EFE.\n"
    );
    let run = |extra: &[&str]| {
        let mut args = vec!["--model", model.as_str()];
        args.extend_from_slice(extra);
        let (out, err, ok) = annotate(&args, input.as_bytes());
        assert!(ok, "{err}");
        out.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    let plain = run(&[]);
    assert!(
        plain.iter().all(|v| v.get("redacted").is_none()),
        "only when asked"
    );
    let texts: Vec<&str> = input.lines().collect();
    let check = |v: &[Value], groups: &[&str]| {
        for (line, text) in v.iter().zip(&texts) {
            // Redaction adds a field: everything else is the plain run's.
            let mut without = line.clone();
            without.as_object_mut().unwrap().remove("redacted");
            let plain_line = &plain[texts.iter().position(|t| t == text).unwrap()];
            assert_eq!(
                stable(&without.to_string()),
                stable(&plain_line.to_string())
            );
            let chosen: Vec<&Value> = line["result"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| groups.contains(&e["entity_group"].as_str().unwrap()))
                .collect();
            let redacted = &line["redacted"];
            let spans = redacted["spans"].as_array().unwrap();
            assert_eq!(spans.len(), chosen.len(), "{line}");
            let input: Vec<char> = text.chars().collect();
            let output: Vec<char> = redacted["text"].as_str().unwrap().chars().collect();
            let at = |v: &Value, k: &str| v[k].as_u64().unwrap() as usize;
            let (mut i, mut o) = (0, 0);
            for (span, entity) in spans.iter().zip(&chosen) {
                assert_eq!(
                    (at(span, "start"), at(span, "end")),
                    (at(entity, "start"), at(entity, "end"))
                );
                assert_eq!(
                    input[i..at(span, "start")],
                    output[o..at(span, "redacted_start")]
                );
                let replaced: String = output[at(span, "redacted_start")..at(span, "redacted_end")]
                    .iter()
                    .collect();
                assert_eq!(replaced, span["replacement"].as_str().unwrap());
                (i, o) = (at(span, "end"), at(span, "redacted_end"));
            }
            assert_eq!(input[i..], output[o..]);
        }
    };
    let tags = run(&["--redact", "PER,LOC"]);
    check(&tags, &["PER", "LOC"]);
    assert_eq!(
        tags[0]["redacted"]["text"],
        "[PER] nació en [LOC] y [PER] murió en [LOC]."
    );
    assert_eq!(
        tags[1]["redacted"]["text"],
        "El Real Madrid ganó en [LOC] ante el Betis, según informó EFE."
    );
    let pseudonyms = run(&["--redact", "--redact-style", "pseudonym"]);
    check(&pseudonyms, &["PER", "LOC", "ORG", "MISC"]);
    assert_eq!(
        pseudonyms[0]["redacted"]["text"],
        "PER_1 nació en LOC_1 y PER_2 murió en LOC_2."
    );
    assert_eq!(
        pseudonyms[1]["redacted"]["text"],
        "El ORG_1 ganó en LOC_1 ante el ORG_2, según informó ORG_3."
    );
}

#[test]
fn redaction_is_refused_at_start_where_it_cannot_apply() {
    let cases: [(&str, &[&str], &str); 4] = [
        ("bert-seq", &["--redact"], "only token-classification"),
        ("bert-qa", &["--redact", "PER"], "only token-classification"),
        (
            "bert-token",
            &["--redact", "PER,DATE"],
            "no entity group `DATE`",
        ),
        (
            "bert-token",
            &["--redact", "all", "--aggregation", "none"],
            "aggregation",
        ),
    ];
    for (model, extra, message) in cases {
        let model = fixture(model);
        let mut args = vec!["--model", model.as_str()];
        args.extend_from_slice(extra);
        let (out, err, ok) = annotate(&args, b"Hola, Lima.\n");
        assert!(!ok && out.is_empty(), "{model} {extra:?}: {out}");
        assert!(err.contains(message), "{model} {extra:?}: {err}");
    }
}

/// The route option: `redact` in a route's options reaches the daemon's
/// annotator (and so every envelope it publishes, through the one envelope
/// function); on a model that cannot redact, the configuration is refused with
/// the key that holds the problem.
#[test]
fn a_daemon_route_redacts_or_is_refused_naming_its_key() {
    use anotador::config::Config;
    use anotador::message::{self, Source};
    use anotador::service::Models;
    let dir = TempDir::new("route-redact");
    let config = |model: &str, options: &str| {
        let path = dir.path("anotador.toml");
        std::fs::write(
            &path,
            format!(
                r#"[broker]
client_id = "t"
[models.m]
path = "{}"
[[routes]]
topic = "in/#"
model = "m"
output = "out"
errors = "err"
[routes.options]
{options}
"#,
                fixture(model)
            ),
        )
        .unwrap();
        Config::load(&path).unwrap()
    };
    let loaded = Models::load(
        &config(
            "bert-token",
            "redact = [\"PER\", \"LOC\"]\nredact_style = \"pseudonym\"",
        ),
        None,
    )
    .unwrap();
    let annotator = &loaded.routes[0].annotator;
    let mut state = annotator.bundle().engine.state().unwrap();
    let text = "Gabriel García Márquez nació en Aracataca.";
    let annotation = annotator.annotate(&mut state, text, None).unwrap();
    let source = Source {
        model: "bert-token",
        task: annotator.task(),
        topic: Some("in/x"),
    };
    let envelope: Value = serde_json::from_slice(&message::envelope(
        source,
        None,
        &Default::default(),
        Ok(&annotation),
    ))
    .unwrap();
    assert!(envelope["redacted"]["text"].is_string(), "{envelope}");
    assert_eq!(envelope["topic"], "in/x");

    let err = Models::load(&config("bert-seq", "redact = \"all\""), None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("routes[0].options") && err.contains("token-classification"),
        "{err}"
    );
}
