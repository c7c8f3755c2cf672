//! The command line: thin wiring over the library. anyhow lives here only.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};

use anotador::engine::{Int8Path, KernelChoice, Rewrites};
use anotador::eval::DataFormat;
use anotador::message::PayloadFormat;
use anotador::transport::lines;
use anotador::{Annotator, Bundle, TaskOptions};

mod manual;

#[derive(Parser)]
#[command(
    version,
    about = "Offline Spanish text annotation with int8 transformer encoders",
    long_about = "Offline Spanish text annotation with int8 transformer encoders.\n\n\
anotador runs int8-quantized ONNX encoders (ALBERT, DistilBERT, BERT) through tract and \
answers with named entities, part-of-speech tags, text and text-pair classes or \
extractive answers, as JSON shaped like the Hugging Face pipelines' output. `anotador \
run` is the daemon: it takes messages from MQTT topics (an external broker such as \
Mosquitto, or the one it embeds) and publishes exactly one result or one structured \
error for each; `anotador annotate` does the same for the lines of a file. Nothing is \
downloaded at run time: a model is a bundle folder made by the export tool."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Annotate lines of stdin or a file (text, or JSON objects with --format json:
    /// {"text"} or, for question answering, {"question", "context"}); one JSON result
    /// per line, in input order. A summary line goes to stderr at the end.
    Annotate {
        #[command(flatten)]
        model: ModelArgs,
        /// How each input line is read; default text (json for question answering).
        #[arg(long, value_enum)]
        format: Option<PayloadFormat>,
        /// Lines longer than this many bytes get a `payload_too_large` error.
        #[arg(long, default_value_t = 1 << 20)]
        max_bytes: usize,
        /// Read this file instead of stdin; gzip if it ends in .gz.
        #[arg(long, short)]
        input: Option<PathBuf>,
        /// Write this file instead of stdout; gzip if it ends in .gz. An existing file
        /// is refused unless --resume or --overwrite.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Worker threads, each with its own engine state; default: the cores this
        /// process may use.
        #[arg(long)]
        threads: Option<usize>,
        /// Continue an interrupted run: keep the complete lines of --output (a
        /// partial last line is dropped) and skip the input lines they answer.
        #[arg(long, requires = "output", conflicts_with = "overwrite")]
        resume: bool,
        /// Replace an existing --output file.
        #[arg(long)]
        overwrite: bool,
        /// Neither the progress line (shown only when stderr is a terminal) nor the
        /// summary.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Score a bundle on labelled data: CoNLL (entity F1), CoNLL-U (UPOS accuracy), TSV
    /// (accuracy, macro-F1) or SQuAD v1.1 JSON (exact match, F1).
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        data: PathBuf,
        /// Data format; guessed from the extension (.conllu, .tsv, .json = SQuAD, else CoNLL).
        #[arg(long, value_enum)]
        data_format: Option<DataFormat>,
        /// Worker threads, each with its own engine state.
        #[arg(long)]
        threads: Option<usize>,
        /// Score only the first N items.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Run the MQTT daemon.
    ///
    /// Loads every model of the configuration, connects to its broker (or starts the
    /// embedded one), subscribes to each route's topics and publishes one result or one
    /// structured error for every message taken; a message is acknowledged only once
    /// its answer is. SIGHUP reloads models and routes between two messages; SIGTERM
    /// stops taking messages and lets those taken finish. Under systemd it reports
    /// readiness and feeds the watchdog.
    Run {
        /// The TOML configuration (see config/anotador.toml).
        #[arg(long, default_value = "/etc/anotador/anotador.toml")]
        config: PathBuf,
    },
    /// Ask a running daemon over MQTT 5 request/response: publish TEXT (or each line of
    /// stdin) with a response topic and correlation data, and print each answer (the
    /// daemon's JSON envelope) in order. The route must allow the response topic
    /// (`responses` in its [[routes]] entry).
    Ask(AskArgs),
    /// Time each int8 kernel this CPU runs, and the dequantized path, on a built-in set
    /// of Spanish messages (one thread, each in its own process), print a table with
    /// the CPU, and optionally write the fastest into a configuration.
    Bench {
        /// Model bundle folder.
        #[arg(long)]
        model: PathBuf,
        /// What to time, a comma list of kernel names and `dequantize`; default:
        /// every kernel this CPU runs, and dequantize.
        #[arg(long, value_delimiter = ',')]
        kernel: Vec<anotador::bench::Candidate>,
        /// Seconds of timed passes per candidate, after one warm-up pass.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Time only the first N built-in messages (a quick look on a slow board or
        /// under emulation).
        #[arg(long)]
        messages: Option<usize>,
        /// Write the fastest into this configuration file, in [models.NAME].
        #[arg(long, requires = "name")]
        write_config: Option<PathBuf>,
        /// The model's NAME in that configuration.
        #[arg(long)]
        name: Option<String>,
        /// Print the figures as JSON lines instead of the table.
        #[arg(long)]
        json: bool,
        /// Measure one candidate in this process and print its JSON (what the
        /// parent runs in each child).
        #[arg(long, hide = true)]
        one: Option<anotador::bench::Candidate>,
    },
    /// Add or replace a user of the embedded broker's password_file (argon2 hash;
    /// a new file is created 0600). The password is asked twice on the terminal, or
    /// read from the first line of stdin with --stdin.
    #[cfg(feature = "broker")]
    Passwd {
        /// The password file ([broker.embedded] password_file).
        file: PathBuf,
        /// The user name.
        user: String,
        /// Read the password from stdin's first line instead of the terminal.
        #[arg(long)]
        stdin: bool,
    },
    /// Validate a configuration and load every model (or just bundles) without connecting;
    /// non-zero exit on any problem.
    Check {
        /// The TOML configuration to validate; its models are loaded, nothing connects.
        #[arg(long, required_unless_present = "models")]
        config: Option<PathBuf>,
        /// Bundle folders.
        #[arg(long = "model")]
        models: Vec<PathBuf>,
        /// For --model: how int8 weights run (auto, native, dequantize).
        #[arg(long, default_value = "auto")]
        int8: Int8Path,
        /// For --model: the int8 kernel (auto or a name, as `annotate --kernel`).
        #[arg(long, default_value = "auto")]
        kernel: KernelChoice,
    },
    /// Write the manual pages, or print shell completions (what the Debian package
    /// installs; for an installation from source).
    #[command(subcommand)]
    Generate(Generate),
}

#[derive(Subcommand)]
enum Generate {
    /// Write anotador.1 and one page per subcommand (anotador-run.1, ...) into DIR.
    Man {
        /// The folder to write into, e.g. /usr/local/share/man/man1.
        dir: PathBuf,
    },
    /// Print the completion script for SHELL on stdout, e.g.
    /// `anotador generate completions bash > ~/.local/share/bash-completion/completions/anotador`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// Model bundle folder (model.onnx, tokenizer.json, config.json, README.md).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    options: TaskOptions,
    /// How int8 weights run: auto (this CPU's faster path), native (int8 kernels, a
    /// quarter of the weight memory) or dequantize (fp32 weights and kernels).
    #[arg(long, default_value = "auto")]
    int8: Int8Path,
    /// The int8 kernel: auto (this CPU's) or one of amx, avx512-vnni, avx-vnni,
    /// avx2, rten, tract (`anotador bench` times those this CPU runs).
    #[arg(long, default_value = "auto")]
    kernel: KernelChoice,
}

impl ModelArgs {
    fn load(&self) -> anyhow::Result<Annotator> {
        let rewrites = Rewrites::for_model(self.int8, self.kernel.named())
            .map_err(|why| anyhow::anyhow!("--kernel {}: {why}", self.kernel))?;
        let bundle = Arc::new(Bundle::load_with(&self.model, rewrites)?);
        Ok(Annotator::new(bundle, &self.options)?)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The daemon reports its life at info (its embedded broker only its warnings);
    // the one-shot commands stay quiet.
    let level = if matches!(cli.command, Command::Run { .. }) {
        "info,mqtt5=warn,mqtt5_protocol=warn"
    } else {
        "warn"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    match cli.command {
        Command::Annotate {
            model,
            format,
            max_bytes,
            input,
            output,
            threads,
            resume,
            overwrite,
            quiet,
        } => {
            let annotator = Arc::new(model.load()?);
            let settings = lines::Settings {
                format: format.unwrap_or(PayloadFormat::default_for(annotator.task())),
                max_bytes,
                input,
                output,
                threads: threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
                resume,
                overwrite,
                progress: !quiet && std::io::stderr().is_terminal(),
            };
            let summary = lines::run(annotator, &settings)?;
            if !quiet {
                eprintln!("{summary}");
            }
            Ok(())
        }
        Command::Eval {
            model,
            data,
            data_format,
            threads,
            limit,
        } => {
            let annotator = model.load()?;
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let format = data_format.unwrap_or_else(|| DataFormat::guess(&data));
            let report = anotador::eval::run(&annotator, &data, format, threads, limit)
                .with_context(|| format!("evaluating on {}", data.display()))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Run { config } => {
            anotador::daemon::run(&config)?;
            Ok(())
        }
        Command::Ask(args) => ask(args),
        Command::Bench {
            model,
            kernel,
            seconds,
            messages,
            write_config,
            name,
            json,
            one,
        } => {
            use anotador::bench;
            let budget = std::time::Duration::try_from_secs_f64(seconds)
                .context("--seconds: a positive number")?;
            if let Some(candidate) = one {
                let m = bench::measure(&model, candidate, budget, messages)?;
                println!("{}", serde_json::to_string(&m)?);
                return Ok(());
            }
            let candidates = if kernel.is_empty() {
                bench::Candidate::all_here()
            } else {
                kernel
            };
            let mut measures = Vec::new();
            for c in candidates {
                eprintln!("timing {} ...", c.name());
                let m = bench_child(&model, c, seconds, messages)?;
                if json {
                    println!("{}", serde_json::to_string(&m)?);
                }
                measures.push(m);
            }
            if !json {
                print!(
                    "{}",
                    bench::table(&anotador::engine::simd::cpu_line(), &measures)
                );
            }
            if let (Some(path), Some(name)) = (write_config, name) {
                let best = bench::fastest(&measures).context("nothing was timed")?;
                bench::write_choice(&path, &name, best)?;
                eprintln!(
                    "{}: [models.{name}] now runs {} (the fastest here)",
                    path.display(),
                    best.name()
                );
            }
            Ok(())
        }
        #[cfg(feature = "broker")]
        Command::Passwd { file, user, stdin } => {
            let password = if stdin {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                line.trim_end_matches(['\r', '\n']).to_string()
            } else {
                let first = rpassword::prompt_password(format!("password for {user}: "))?;
                let again = rpassword::prompt_password("again: ")?;
                anyhow::ensure!(first == again, "the two passwords differ; nothing written");
                first
            };
            anotador::transport::broker::auth::set_password(&file, &user, &password)
                .map_err(|why| anyhow::anyhow!(why))?;
            eprintln!(
                "{}: {user} set; a running daemon reads it on reload (SIGHUP) or restart",
                file.display()
            );
            Ok(())
        }
        Command::Generate(Generate::Man { dir }) => {
            for page in manual::write_pages(Cli::command(), &dir)
                .with_context(|| format!("writing manual pages into {}", dir.display()))?
            {
                println!("{}", page.display());
            }
            Ok(())
        }
        Command::Generate(Generate::Completions { shell }) => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "anotador", &mut std::io::stdout());
            Ok(())
        }
        Command::Check {
            config,
            models,
            int8,
            kernel,
        } => {
            if let Some(path) = config {
                let config = anotador::config::Config::load(&path)?;
                let loaded = anotador::service::Models::load(&config, None)?;
                println!(
                    "{}: ok ({} models, {} routes)",
                    path.display(),
                    loaded.loaded.len(),
                    config.routes.len()
                );
            }
            let rewrites = Rewrites::for_model(int8, kernel.named())
                .map_err(|why| anyhow::anyhow!("--kernel {kernel}: {why}"))?;
            for dir in &models {
                let bundle = Bundle::load_with(dir, rewrites)?;
                println!(
                    "{}: ok ({}, {}, {} labels, max {} tokens, sha256 {}, {})",
                    dir.display(),
                    bundle.config.model_type,
                    bundle.config.task.as_str(),
                    bundle.config.labels.len(),
                    bundle.config.max_length,
                    anotador::bundle::model_sha256(dir)?,
                    serde_json::to_string(bundle.engine.info())?
                );
            }
            Ok(())
        }
    }
}

/// One candidate of `anotador bench` in a child process of its own, so that its
/// memory is its own; in this process if the binary cannot start itself (qemu-user
/// without binfmt).
fn bench_child(
    model: &std::path::Path,
    candidate: anotador::bench::Candidate,
    seconds: f64,
    messages: Option<usize>,
) -> anyhow::Result<anotador::bench::Measure> {
    let budget = std::time::Duration::from_secs_f64(seconds);
    let child = std::env::current_exe().and_then(|exe| {
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["bench", "--model"]).arg(model).args([
            "--one",
            candidate.name(),
            "--seconds",
            &seconds.to_string(),
        ]);
        if let Some(n) = messages {
            cmd.args(["--messages", &n.to_string()]);
        }
        cmd.stderr(std::process::Stdio::inherit()).output()
    });
    let cannot_start = match child {
        Ok(out) if out.status.success() => {
            return serde_json::from_slice(&out.stdout)
                .with_context(|| format!("bench child for {}", candidate.name()))
        }
        // 127: the binary never ran. Under qemu-user the guest C library's spawn
        // can fall back to `/bin/sh FILE` when the kernel cannot execute FILE, and
        // the shell says "not found"; anotador itself never exits with 127.
        Ok(out) if out.status.code() == Some(127) => "exit status 127".to_string(),
        Ok(out) => anyhow::bail!("timing {} failed: {}", candidate.name(), out.status),
        Err(e) => e.to_string(),
    };
    eprintln!(
        "cannot start a child ({cannot_start}): timing in this process, memory figures cumulative"
    );
    Ok(anotador::bench::measure(
        model, candidate, budget, messages,
    )?)
}

#[derive(Args)]
struct AskArgs {
    /// The text to annotate; without it, each line of stdin is one request.
    text: Option<String>,
    /// Send each input as it is (a route with format = "text", or a JSON object of
    /// your own such as {"question", "context"}) instead of as {"text": …}.
    #[arg(long)]
    raw: bool,
    /// The broker (the daemon's embedded one by default).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// A topic a daemon's route takes requests on.
    #[arg(long, default_value = "anotador/in/ner/ask")]
    topic: String,
    /// The response topic [default: anotador/reply/<this client's id>].
    #[arg(long)]
    reply_to: Option<String>,
    /// Seconds to wait for the next answer.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Requests sent and not yet answered, at most.
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
}

/// `anotador ask`: requests from the argument or stdin, answers on stdout.
fn ask(args: AskArgs) -> anyhow::Result<()> {
    use anotador::transport::mqtt::ask;
    use std::io::{BufRead, Write};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let client_id = format!("anotador-ask-{}-{nanos}", std::process::id());
    let settings = ask::Ask {
        reply_to: args
            .reply_to
            .unwrap_or_else(|| format!("anotador/reply/{client_id}")),
        host: args.host,
        port: args.port,
        topic: args.topic,
        client_id,
        timeout: std::time::Duration::try_from_secs_f64(args.timeout)
            .context("--timeout: seconds, a positive number")?,
        in_flight: args.in_flight,
    };
    let raw = args.raw;
    let payload = move |text: String| -> Vec<u8> {
        if raw {
            text.into_bytes()
        } else {
            serde_json::to_vec(&serde_json::json!({ "text": text })).expect("a string serializes")
        }
    };
    let requests: Box<dyn Iterator<Item = std::io::Result<Vec<u8>>> + Send> = match args.text {
        Some(text) => Box::new(std::iter::once(Ok(payload(text)))),
        None => Box::new(
            // Read on ask's input thread: a BufReader of the handle is Send where a
            // StdinLock is not.
            std::io::BufReader::new(std::io::stdin())
                .lines()
                .map(move |line| line.map(&payload)),
        ),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut print = |answer: &[u8]| -> std::io::Result<()> {
        out.write_all(answer)?;
        out.write_all(b"\n")?;
        out.flush()
    };
    ask::ask(&settings, requests, &mut print)?;
    Ok(())
}
