//! The command line: thin wiring over the library. anyhow lives here only.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use anotador::engine::{Int8Path, Rewrites};
use anotador::eval::DataFormat;
use anotador::message::PayloadFormat;
use anotador::transport::lines;
use anotador::{Annotator, Bundle, TaskOptions};

#[derive(Parser)]
#[command(
    version,
    about = "Offline Spanish text annotation with int8 transformer encoders"
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
    /// Validate a configuration and load every model (or just bundles) without connecting;
    /// non-zero exit on any problem.
    Check {
        #[arg(long, required_unless_present = "models")]
        config: Option<PathBuf>,
        /// Bundle folders.
        #[arg(long = "model")]
        models: Vec<PathBuf>,
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
}

impl ModelArgs {
    fn load(&self) -> anyhow::Result<Annotator> {
        let bundle = Arc::new(Bundle::load_with(
            &self.model,
            Rewrites::for_path(self.int8),
        )?);
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
        Command::Check { config, models } => {
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
            for dir in &models {
                let bundle = Bundle::load(dir)?;
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
