//! The command line, run as a user runs it: one JSON line out per line in,
//! errors in-band, and `eval` scoring through the same path.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn anotador(args: &[&str], stdin: &[u8]) -> (String, String, bool) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_anotador"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

#[test]
fn annotate_answers_every_line_and_survives_bad_ones() {
    let model = fixture("bert-token");
    let mut input = Vec::new();
    input.extend_from_slice("El Real Madrid ganó en Sevilla.\n".as_bytes());
    input.extend_from_slice(b"caf\xe9 con leche\n"); // Latin-1, not UTF-8
    input.extend_from_slice(b"   \n");
    input.extend_from_slice("Gabriel García Márquez nació en Aracataca.\n".as_bytes());
    let (stdout, stderr, ok) = anotador(&["annotate", "--model", model.to_str().unwrap()], &input);
    assert!(ok, "{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert_eq!(lines[1]["error"]["code"], "invalid_utf8");
    assert_eq!(lines[2]["error"]["code"], "empty_text");
    for i in [0, 3] {
        assert_eq!(lines[i]["task"], "token-classification");
        assert_eq!(lines[i]["windows"], 1);
        assert!(lines[i]["result"].is_array());
    }
    // Offsets are characters: every entity's word is that slice of the input.
    let text: Vec<char> = "Gabriel García Márquez nació en Aracataca."
        .chars()
        .collect();
    for e in lines[3]["result"].as_array().unwrap() {
        let (s, t) = (
            e["start"].as_u64().unwrap() as usize,
            e["end"].as_u64().unwrap() as usize,
        );
        assert_eq!(
            e["word"].as_str().unwrap(),
            text[s..t].iter().collect::<String>()
        );
    }
}

#[test]
fn annotate_json_lines_echo_id_and_meta() {
    let model = fixture("bert-seq");
    let input = concat!(
        r#"{"id": "a-1", "text": "Llueve mucho en Santiago.", "text_pair": "Hace mal tiempo.", "sensor": 7}"#,
        "\n",
        r#"{"id": 2, "text": "Hola", "#,
        "\n",
        r#"{"id": 3}"#,
        "\n"
    );
    let (stdout, stderr, ok) = anotador(
        &[
            "annotate",
            "--model",
            model.to_str().unwrap(),
            "--format",
            "json",
            "--top-k",
            "0",
        ],
        input.as_bytes(),
    );
    assert!(ok, "{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["id"], "a-1");
    assert_eq!(lines[0]["meta"]["sensor"], 7);
    let labels = lines[0]["result"].as_array().unwrap();
    assert_eq!(labels.len(), 3, "top-k 0 returns every label");
    let sum: f64 = labels.iter().map(|l| l["score"].as_f64().unwrap()).sum();
    assert!(
        (sum - 1.0).abs() < 1e-4,
        "softmax scores sum to 1, got {sum}"
    );
    assert_eq!(lines[1]["error"]["code"], "invalid_json");
    assert_eq!(lines[2]["id"], 3);
    assert_eq!(lines[2]["error"]["code"], "missing_text");
}

#[test]
fn long_text_is_windowed_or_refused_never_truncated() {
    let model = fixture("distilbert-token");
    let text = "El Banco de España publicó ayer en Madrid su informe anual. ".repeat(30);
    let (stdout, _, ok) = anotador(
        &["annotate", "--model", model.to_str().unwrap()],
        format!("{text}\n").as_bytes(),
    );
    assert!(ok);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(v["windows"].as_u64().unwrap() > 1, "{v}");
    let last_end = v["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["end"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(
        last_end as usize > text.chars().count() * 3 / 4,
        "entities reach the end of the text"
    );
    let (stdout, _, _) = anotador(
        &[
            "annotate",
            "--model",
            model.to_str().unwrap(),
            "--max-windows",
            "2",
        ],
        format!("{text}\n").as_bytes(),
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["error"]["code"], "text_too_long", "{v}");
}

#[test]
fn eval_scores_conll_through_the_same_path() {
    use anotador::{eval, Annotator, Bundle, TaskOptions};
    let model = fixture("bert-token");
    let bundle = std::sync::Arc::new(Bundle::load(&model).unwrap());
    let annotator = Annotator::new(bundle, &TaskOptions::default()).unwrap();
    let mut state = annotator.bundle().engine.state().unwrap();
    let sentences = [
        "El Real Madrid ganó en Sevilla ante el Betis , según informó EFE .",
        "Gabriel García Márquez nació en Aracataca ( Colombia ) en 1927 .",
    ];
    // Gold = the model's own word labels: F1 must be exactly 100.
    let mut conll = String::from("-DOCSTART- O\n\n");
    let mut gold = Vec::new();
    for s in sentences {
        let words: Vec<String> = s.split(' ').map(String::from).collect();
        let tags = eval::predict_words(&annotator, &mut state, &words).unwrap();
        for (w, t) in words.iter().zip(&tags) {
            conll.push_str(&format!("{w} X {t}\n"));
        }
        conll.push('\n');
        gold.push(tags);
    }
    let dir = std::env::temp_dir().join(format!("anotador-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gold.conll");
    std::fs::write(&path, &conll).unwrap();
    let (stdout, stderr, ok) = anotador(
        &[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            path.to_str().unwrap(),
            "--threads",
            "2",
        ],
        b"",
    );
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let entities = gold.iter().map(|t| eval::chunks(t).len()).sum::<usize>();
    assert!(entities > 0);
    assert_eq!(report["entities"], entities);
    assert_eq!(report["sentences"], 2);
    assert!(
        (report["f1"].as_f64().unwrap() - 100.0).abs() < 1e-9,
        "{report}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `anotador bench`: one row per kernel this CPU runs and `dequantize`, each timed in
/// a child process, and the fastest written into a copy of the shipped configuration
/// without losing its comments.
#[test]
fn bench_times_every_kernel_here_and_writes_the_fastest() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("anotador-bench-{}", std::process::id()));
    // The shipped file's bundle paths are relative to it (../models/…).
    std::fs::create_dir_all(dir.join("config")).unwrap();
    std::os::unix::fs::symlink(root.join("models"), dir.join("models")).ok();
    let config = dir.join("config/anotador.toml");
    let shipped = std::fs::read_to_string(root.join("config/anotador.toml")).unwrap();
    std::fs::write(&config, &shipped).unwrap();
    let model = root.join("models/ner-es");
    let (stdout, stderr, ok) = anotador(
        &[
            "bench",
            "--model",
            model.to_str().unwrap(),
            "--seconds",
            "0",
            "--messages",
            "3",
            "--json",
            "--write-config",
            config.to_str().unwrap(),
            "--name",
            "ner",
        ],
        b"",
    );
    assert!(ok, "{stderr}");
    let rows: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let expected: Vec<String> = anotador::bench::Candidate::all_here()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let got: Vec<String> = rows
        .iter()
        .map(|r| r["candidate"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, expected, "{stdout}");
    for r in &rows {
        assert_eq!(r["messages"], 3, "{r}");
        assert!(r["tokens"].as_u64().unwrap() > 10, "{r}");
        assert!(r["ms_per_message"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["rss_mib"].as_f64().unwrap() > 1.0, "{r}");
        // Each child loaded its candidate: the kernels it reports are that one's.
        let kernels = r["kernels"].as_object().unwrap();
        assert!(!kernels.is_empty(), "{r}");
        let name = r["candidate"].as_str().unwrap();
        if name != "dequantize" {
            assert!(
                kernels
                    .keys()
                    .all(|k| k.starts_with(name) || k.starts_with("tract")),
                "{r}"
            );
        }
    }
    let best = rows
        .iter()
        .min_by(|a, b| {
            a["ms_per_message"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["ms_per_message"].as_f64().unwrap())
        })
        .unwrap()["candidate"]
        .as_str()
        .unwrap()
        .to_string();
    let written = std::fs::read_to_string(&config).unwrap();
    let parsed: toml::Table = toml::from_str(&written).unwrap();
    let ner = &parsed["models"]["ner"];
    if best == "dequantize" {
        assert_eq!(ner["int8"].as_str(), Some("dequantize"), "{written}");
    } else {
        assert_eq!(ner["kernel"].as_str(), Some(best.as_str()), "{written}");
    }
    let comments = |s: &str| {
        s.lines()
            .filter(|l| l.trim_start().starts_with('#'))
            .count()
    };
    assert_eq!(comments(&written), comments(&shipped));
    // The file it wrote is one the daemon accepts.
    let (out, err, ok) = anotador(&["check", "--config", config.to_str().unwrap()], b"");
    assert!(ok, "{out}{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `--kernel` forces the kernel (the engine report says so); a name that is no kernel,
/// or one this CPU lacks, is refused with the reason.
#[test]
fn kernel_flag_forces_the_kernel_and_refuses_what_cannot_run() {
    let model = fixture("bert-token");
    for kernel in anotador::engine::KernelKind::ALL {
        let (stdout, stderr, ok) = anotador(
            &[
                "check",
                "--model",
                model.to_str().unwrap(),
                "--int8",
                "native",
                "--kernel",
                kernel.name(),
            ],
            b"",
        );
        if kernel.available() {
            assert!(ok, "{kernel}: {stderr}");
            assert!(
                stdout.contains(&format!("\"{kernel} (")),
                "{kernel}: {stdout}"
            );
        } else {
            assert!(!ok, "{kernel} ran on a CPU without it: {stdout}");
            assert!(stderr.contains("does not run on this CPU"), "{stderr}");
        }
    }
    let (_, stderr, ok) = anotador(
        &[
            "check",
            "--model",
            model.to_str().unwrap(),
            "--kernel",
            "sse9",
        ],
        b"",
    );
    assert!(!ok);
    assert!(stderr.contains("expected auto or one of"), "{stderr}");
}

/// The manual and completions come from the same clap definitions the binary parses
/// with: a page for every subcommand `--help` lists, and completion scripts that name
/// every subcommand and, for bash, parse. (cross/deb-check.sh renders each page of the
/// package with `man --warnings`, which needs man-db, installed there.)
#[test]
fn generate_writes_a_page_per_subcommand_and_completions_for_each_shell() {
    let (help, _, ok) = anotador(&["--help"], b"");
    assert!(ok);
    // The subcommands as --help lists them ("  annotate  Annotate lines ...").
    let listed: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|name| name != "help")
        .collect();
    assert!(
        listed.len() >= 8 && listed.iter().any(|c| c == "run"),
        "{listed:?}"
    );

    let dir = std::env::temp_dir().join(format!("anotador-man-{}", std::process::id()));
    let (out, err, ok) = anotador(&["generate", "man", dir.to_str().unwrap()], b"");
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().count(),
        std::fs::read_dir(&dir).unwrap().count()
    );
    let main = std::fs::read_to_string(dir.join("anotador.1")).unwrap();
    assert!(
        main.lines().any(|l| l.starts_with(".TH anotador 1 ")),
        "{}",
        &main[..120]
    );
    for section in ["SYNOPSIS", "SUBCOMMANDS", "FILES", "SIGNALS", "SEE ALSO"] {
        assert!(main.contains(&format!(".SH {section}")), "no {section}");
    }
    for name in &listed {
        let page = dir.join(format!("anotador-{name}.1"));
        let text =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(
            main.contains(&format!("anotador\\-{name}")),
            "anotador.1 does not name {name}"
        );
        assert!(text.contains(".SH OPTIONS"), "{name}: no options");
    }
    // An option's text reaches its page.
    let run = std::fs::read_to_string(dir.join("anotador-run.1")).unwrap();
    assert!(run.contains("/etc/anotador/anotador.toml"));
    for shell in ["bash", "zsh", "fish"] {
        let (script, err, ok) = anotador(&["generate", "completions", shell], b"");
        assert!(ok, "{shell}: {err}");
        for name in &listed {
            assert!(
                script.contains(name.as_str()),
                "{shell} completion lacks {name}"
            );
        }
        if shell == "bash" {
            let path = dir.join("anotador.bash");
            std::fs::write(&path, &script).unwrap();
            let parsed = Command::new("bash").arg("-n").arg(&path).output().unwrap();
            assert!(
                parsed.status.success(),
                "{}",
                String::from_utf8_lossy(&parsed.stderr)
            );
        }
    }
    let (_, err, ok) = anotador(&["generate", "completions", "tcsh"], b"");
    assert!(!ok && err.contains("tcsh"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
