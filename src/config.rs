//! The daemon's TOML configuration: schema, defaults and validation.
//!
//! Every problem is reported at start with the key that holds it (`routes[2].topic`,
//! `models.ner.path`), because the person reading it is editing one file on a
//! device, often over a slow serial console.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::message::PayloadFormat;
use crate::tasks::TaskOptions;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: `{key}`: {problem}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub daemon: Daemon,
    pub broker: Broker,
    pub models: BTreeMap<String, ModelConfig>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Daemon {
    /// Names this daemon in its status and stats topics.
    pub name: String,
    /// Retained `online` / `offline` (last will) status.
    pub status_topic: String,
    /// Periodic counters; empty disables them.
    pub stats_topic: String,
    pub stats_interval_s: u64,
    /// Payloads larger than this get `payload_too_large`.
    pub max_payload_bytes: usize,
    /// Messages accepted but not yet answered, all models together. Must be at least
    /// the broker's in-flight window for this client (mosquitto: max_inflight_messages,
    /// default 20), so the backlog waits in the broker, not here.
    pub queue: usize,
    /// Received messages waiting for a free slot in `queue`, in payload bytes. MQTT 5
    /// brokers are asked to send no more than `queue` at a time, but Mosquitto 2.0
    /// sends its whole backlog; past this many bytes messages are left
    /// unacknowledged and fetched again by resuming the session once caught up.
    pub backlog_bytes: usize,
    /// On SIGTERM, how long in-flight messages may take to finish.
    pub shutdown_timeout_s: u64,
}

impl Default for Daemon {
    fn default() -> Self {
        Daemon {
            name: "anotador".into(),
            status_topic: "anotador/{name}/status".into(),
            stats_topic: "anotador/{name}/stats".into(),
            stats_interval_s: 60,
            max_payload_bytes: 64 * 1024,
            queue: 32,
            backlog_bytes: 4 << 20,
            shutdown_timeout_s: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Broker {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Stable across restarts: with `clean_session = false` the broker keeps the
    /// subscriptions and unacknowledged messages for this id while the daemon is down.
    pub client_id: String,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    #[serde(default)]
    pub clean_session: bool,
    /// How long the broker keeps the session (subscriptions, unacknowledged
    /// messages) while the daemon is away.
    #[serde(default = "default_session_expiry")]
    pub session_expiry_s: u32,
    pub username: Option<String>,
    /// Read the password from this file (first line), e.g. a systemd credential.
    pub password_file: Option<PathBuf>,
    /// Or from this environment variable.
    pub password_env: Option<String>,
    #[serde(default = "default_backoff_min")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub reconnect_max_ms: u64,
    pub tls: Option<Tls>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub ca_file: PathBuf,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    1883
}
fn default_keep_alive() -> u64 {
    30
}
fn default_session_expiry() -> u32 {
    7 * 24 * 3600
}
fn default_backoff_min() -> u64 {
    200
}
fn default_backoff_max() -> u64 {
    30_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Bundle folder; relative paths are relative to the config file.
    pub path: PathBuf,
    /// Inference threads for this model, each with its own engine state.
    #[serde(default = "one")]
    pub workers: usize,
    /// Tokens per window (default and maximum: the model's).
    pub window: Option<usize>,
    pub stride: Option<usize>,
    /// Windows one message may need before it is refused as `text_too_long`.
    pub max_windows: Option<usize>,
    /// Expected SHA-256 of `model.onnx` (hex, as `anotador check --model` prints it):
    /// a truncated or altered file is refused at start.
    pub sha256: Option<String>,
    /// Queued messages a worker takes into one micro-batch (1 = one at a time, the
    /// default: on mixed-length messages batching measured no gain, see README).
    #[serde(default = "one")]
    pub max_batch: usize,
    /// How long a worker waits for more messages to fill a micro-batch; 0 = take
    /// only what is already queued (no added latency when the daemon is idle).
    #[serde(default)]
    pub batch_wait_ms: u64,
    /// How the int8 weights run: `auto`, `native` or `dequantize` (see README).
    #[serde(default)]
    pub int8: crate::engine::Int8Path,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// MQTT topic filter; `+`, `#` and `$share/GROUP/filter` allowed.
    pub topic: String,
    /// A key of `[models]`.
    pub model: String,
    #[serde(default = "default_format")]
    pub format: PayloadFormat,
    /// Output topic template: `{topic}` (the input topic), `{1}`, `{2}`… (the input
    /// topic's levels matched by `+`/`#` in the filter), `{model}`, `{name}`.
    pub output: String,
    /// Where structured errors go (the dead-letter topic); same placeholders.
    pub errors: String,
    #[serde(default)]
    pub options: RouteOptions,
}

fn default_format() -> PayloadFormat {
    PayloadFormat::Json
}

/// Per-route task options (see `anotador annotate --help`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteOptions {
    pub aggregation: Option<crate::bundle::Aggregation>,
    pub top_k: Option<usize>,
    pub function_to_apply: Option<crate::bundle::ScoreFunction>,
    /// Question answering: longest answer in tokens (default 15).
    pub max_answer_len: Option<usize>,
    /// Question answering: also offer the empty answer, scored by [CLS] (default false).
    pub handle_impossible_answer: Option<bool>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for model in config.models.values_mut() {
            if model.path.is_relative() {
                model.path = base.join(&model.path);
            }
        }
        if let Some(tls) = &mut config.broker.tls {
            for p in [
                Some(&mut tls.ca_file),
                tls.client_cert.as_mut(),
                tls.client_key.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: String, problem: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            problem,
        };
        if self.broker.client_id.is_empty() {
            return Err(bad("broker.client_id".into(), "must not be empty".into()));
        }
        if self.daemon.queue == 0 {
            return Err(bad("daemon.queue".into(), "must be at least 1".into()));
        }
        if self.broker.password_file.is_some() && self.broker.password_env.is_some() {
            return Err(bad(
                "broker.password_file".into(),
                "set password_file or password_env, not both".into(),
            ));
        }
        if self.models.is_empty() {
            return Err(bad("models".into(), "at least one model is needed".into()));
        }
        for (name, model) in &self.models {
            if !model.path.is_dir() {
                return Err(bad(
                    format!("models.{name}.path"),
                    format!("{} is not a folder", model.path.display()),
                ));
            }
            if let Some(h) = &model.sha256 {
                if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad(
                        format!("models.{name}.sha256"),
                        "expected 64 hex digits".into(),
                    ));
                }
            }
            if model.workers == 0 {
                return Err(bad(
                    format!("models.{name}.workers"),
                    "must be at least 1".into(),
                ));
            }
            if model.max_batch == 0 {
                return Err(bad(
                    format!("models.{name}.max_batch"),
                    "must be at least 1".into(),
                ));
            }
        }
        if self.routes.is_empty() {
            return Err(bad("routes".into(), "at least one route is needed".into()));
        }
        for (i, route) in self.routes.iter().enumerate() {
            if let Err(problem) = crate::transport::topic::Filter::parse(&route.topic) {
                return Err(bad(format!("routes[{i}].topic"), problem));
            }
            if !self.models.contains_key(&route.model) {
                return Err(bad(
                    format!("routes[{i}].model"),
                    format!("no model `{}` in [models]", route.model),
                ));
            }
            for (key, template) in [("output", &route.output), ("errors", &route.errors)] {
                if let Err(problem) = crate::transport::topic::check_template(template) {
                    return Err(bad(format!("routes[{i}].{key}"), problem));
                }
            }
        }
        Ok(())
    }

    pub fn task_options(&self, model: &str, route: Option<&RouteOptions>) -> TaskOptions {
        let m = &self.models[model];
        TaskOptions {
            aggregation: route.and_then(|r| r.aggregation),
            top_k: route.and_then(|r| r.top_k),
            function_to_apply: route.and_then(|r| r.function_to_apply),
            window: m.window,
            stride: m.stride,
            max_windows: m.max_windows,
            max_answer_len: route.and_then(|r| r.max_answer_len),
            handle_impossible_answer: route.and_then(|r| r.handle_impossible_answer),
        }
    }

    pub fn password(&self) -> std::io::Result<Option<String>> {
        if let Some(file) = &self.broker.password_file {
            let text = std::fs::read_to_string(file)?;
            return Ok(Some(text.lines().next().unwrap_or("").to_string()));
        }
        if let Some(var) = &self.broker.password_env {
            return std::env::var(var).map(Some).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("environment variable {var} is not set"),
                )
            });
        }
        Ok(None)
    }
}
