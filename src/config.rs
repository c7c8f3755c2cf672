//! The daemon's TOML configuration: schema, defaults and validation.
//!
//! Every problem is reported at start with the key that holds it (`routes[2].topic`,
//! `models.ner.path`), because the person reading it is editing one file on a
//! device, often over a slow serial console.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::message::PayloadFormat;
use crate::routing::{Filter, Template};
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

/// A checked configuration: every route's topics parsed, every key valid.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub daemon: Daemon,
    pub broker: Broker,
    pub models: BTreeMap<String, Model>,
    pub routes: Vec<Route>,
}

/// The file as written, before its routes are parsed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    daemon: Daemon,
    broker: Broker,
    models: BTreeMap<String, Model>,
    routes: Vec<RouteEntry>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
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
    /// The largest MQTT packet the daemon reads (the MQTT 5 Maximum Packet Size it
    /// announces to the broker). Anything up to it is read and answered (with
    /// `payload_too_large` above `max_payload_bytes`); a broker drops larger
    /// messages for this client unseen.
    pub max_packet_bytes: usize,
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
            max_packet_bytes: 4 << 20,
            queue: 32,
            backlog_bytes: 4 << 20,
            shutdown_timeout_s: 10,
        }
    }
}

impl Daemon {
    /// The retained `online` / `offline` status topic, `{name}` filled in.
    pub fn status_topic(&self) -> String {
        self.status_topic.replace("{name}", &self.name)
    }

    /// The stats topic, `{name}` filled in; empty when stats are off.
    pub fn stats_topic(&self) -> String {
        self.stats_topic.replace("{name}", &self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Broker {
    /// An external broker's address (default 127.0.0.1:1883). Not allowed with
    /// `[broker.embedded]`: the daemon then connects to the address its own broker
    /// bound, and a second address would only mislead.
    pub host: Option<String>,
    pub port: Option<u16>,
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
    /// The daemon's own broker, in this process (`[broker.embedded]`).
    pub embedded: Option<Embedded>,
}

/// `[broker.embedded]`: an MQTT broker on the daemon's runtime, for a device with
/// no broker of its own. The daemon connects to it as to any other broker; other
/// clients on the device (sensors, `mosquitto_pub`, `anotador ask`) can use it too.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Embedded {
    /// Where it listens (MQTT 3.1.1 and 5, plain TCP). Port 0 takes a free port,
    /// logged at start. An address other than loopback needs `password_file` (or
    /// `allow_anonymous = true`, on purpose).
    #[serde(default = "default_listen")]
    pub listen: std::net::SocketAddr,
    /// Users who may connect, `user:argon2-hash` per line (`anotador passwd FILE
    /// USER`); with it, a client without a valid user and password is refused.
    pub password_file: Option<PathBuf>,
    /// Per-user topic rights (`user NAME topic FILTER permission read|write|readwrite|deny`,
    /// `*` for every user, `%u` for the user's name).
    pub acl_file: Option<PathBuf>,
    /// Clients without a user name: allowed by default only on a loopback `listen`
    /// without `password_file`.
    pub allow_anonymous: Option<bool>,
    /// A second listener, MQTT over TLS (rustls with ring), e.g. `0.0.0.0:8883`; needs
    /// `cert_file` and `key_file` (PEM). Users and rights are the same as on `listen`.
    pub tls_listen: Option<std::net::SocketAddr>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// With it, a TLS client must present a certificate this CA signed (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
    /// Sessions, queued messages and retained messages on disk, so a restart
    /// (or a crash) keeps what was not yet acknowledged; absent: memory only.
    /// With it, a QoS 1/2 publish is acknowledged only once it is written.
    pub data_dir: Option<PathBuf>,
    /// With `data_dir`: whether each write is also fsynced before the
    /// acknowledgement (`always`: survives a power cut) or left to the kernel's
    /// write-back (`never`: survives any crash of the daemon, not of the system).
    #[serde(default)]
    pub sync: SyncWrites,
    /// Clients connected at once.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// Per client session: messages waiting for it (offline, or past its Receive
    /// Maximum). Past either limit the broker drops that session's oldest.
    #[serde(default = "default_max_queued_messages")]
    pub max_queued_messages: usize,
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: usize,
    /// Per client: QoS 1/2 publishes it may send before their acknowledgements
    /// (MQTT 5 Receive Maximum in CONNACK; a client that sends more is disconnected).
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Retained messages kept (the daemon's status is one).
    #[serde(default = "default_max_retained")]
    pub max_retained_messages: usize,
}

/// `broker.embedded.sync`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncWrites {
    #[default]
    Never,
    Always,
}

fn default_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 1883))
}
fn default_max_clients() -> usize {
    64
}
fn default_max_queued_messages() -> usize {
    10_000
}
fn default_max_queued_bytes() -> usize {
    16 << 20
}
fn default_max_inflight() -> u16 {
    256
}
fn default_max_retained() -> usize {
    1_000
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub ca_file: PathBuf,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
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

/// One `[models.NAME]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Model {
    /// Bundle folder; relative paths are relative to the config file.
    pub path: PathBuf,
    /// Inference threads for this model, each with its own engine state.
    #[serde(default = "one")]
    pub workers: usize,
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
    /// Which int8 kernel multiplies them: `auto` (this CPU's, see README) or a name
    /// (`anotador bench` times each this CPU runs).
    #[serde(default)]
    pub kernel: crate::engine::KernelChoice,
    /// Task options for every route of this model (`window`, `stride`,
    /// `max_windows`…); a route's own `options` win.
    #[serde(flatten)]
    pub options: TaskOptions,
    /// Keys that none of the above know. Flattening rules out serde's own
    /// `deny_unknown_fields`, so validation refuses them, naming the key.
    #[serde(flatten)]
    unknown: BTreeMap<String, toml::Value>,
}

impl Model {
    /// How its worker pool runs.
    pub fn pool(&self) -> crate::pool::Settings {
        crate::pool::Settings {
            workers: self.workers,
            max_batch: self.max_batch,
            batch_wait: std::time::Duration::from_millis(self.batch_wait_ms),
        }
    }
}

fn one() -> usize {
    1
}

/// A route, parsed: which messages, which model, where results and errors go.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// MQTT topic filter; `+`, `#` and `$share/GROUP/filter` allowed.
    pub filter: Filter,
    /// A key of `[models]`.
    pub model: String,
    pub format: PayloadFormat,
    /// Output topic template: `{topic}` (the input topic), `{1}`, `{2}`… (the input
    /// topic's levels matched by `+`/`#` in the filter), `{model}`, `{name}`.
    pub output: Template,
    /// Where structured errors go (the dead-letter topic); same placeholders.
    pub errors: Template,
    /// Task options of this route, over its model's.
    pub options: TaskOptions,
    /// MQTT 5 request/response: the response topics a request may name (a topic
    /// filter). A request whose response topic it matches is answered there, with
    /// its correlation data and user properties; one naming any other topic gets
    /// `response_topic_refused` on `errors`. `None`: response topics are ignored
    /// and every answer goes to `output` / `errors`.
    pub responses: Option<Filter>,
}

/// A `[[routes]]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    topic: String,
    model: String,
    #[serde(default = "default_format")]
    format: PayloadFormat,
    output: String,
    errors: String,
    #[serde(default)]
    options: TaskOptions,
    responses: Option<String>,
}

fn default_format() -> PayloadFormat {
    PayloadFormat::Json
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut file: File = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for model in file.models.values_mut() {
            if model.path.is_relative() {
                model.path = base.join(&model.path);
            }
        }
        if let Some(dir) = file
            .broker
            .embedded
            .as_mut()
            .and_then(|e| e.data_dir.as_mut())
        {
            if dir.is_relative() {
                *dir = base.join(&*dir);
            }
        }
        if let Some(tls) = &mut file.broker.tls {
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
        file.check(path)
    }
}

impl File {
    /// Validates every key and parses the routes.
    fn check(self, path: &Path) -> Result<Config, ConfigError> {
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
        // MQTT's own limit on a packet's size.
        const MQTT_MAX_PACKET: usize = 268_435_455;
        if self.daemon.max_packet_bytes <= self.daemon.max_payload_bytes
            || self.daemon.max_packet_bytes > MQTT_MAX_PACKET
        {
            return Err(bad(
                "daemon.max_packet_bytes".into(),
                format!(
                    "must be larger than daemon.max_payload_bytes ({}), so that an oversize payload is read and answered, and at most {MQTT_MAX_PACKET}",
                    self.daemon.max_payload_bytes
                ),
            ));
        }
        if let Some(embedded) = &self.broker.embedded {
            self.broker.check_embedded(embedded, &self.daemon, &bad)?;
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
            if let Some(key) = model.unknown.keys().next() {
                return Err(bad(format!("models.{name}.{key}"), "unknown key".into()));
            }
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
            // The kernel must run on this CPU: the machine that validates is the one
            // that runs (`check` and `run`).
            if let Err(why) = crate::engine::Rewrites::for_model(model.int8, model.kernel.named()) {
                return Err(bad(format!("models.{name}.kernel"), why));
            }
        }
        if self.routes.is_empty() {
            return Err(bad("routes".into(), "at least one route is needed".into()));
        }
        let mut routes = Vec::with_capacity(self.routes.len());
        for (i, route) in self.routes.into_iter().enumerate() {
            let filter =
                Filter::parse(&route.topic).map_err(|p| bad(format!("routes[{i}].topic"), p))?;
            if !self.models.contains_key(&route.model) {
                return Err(bad(
                    format!("routes[{i}].model"),
                    format!("no model `{}` in [models]", route.model),
                ));
            }
            let template = |key: &str, t: &str| {
                Template::parse(t).map_err(|p| bad(format!("routes[{i}].{key}"), p))
            };
            let responses = match &route.responses {
                None => None,
                Some(r) if r.starts_with("$share/") => {
                    return Err(bad(
                        format!("routes[{i}].responses"),
                        "a filter of response topics, not a shared subscription".into(),
                    ))
                }
                Some(r) => {
                    Some(Filter::parse(r).map_err(|p| bad(format!("routes[{i}].responses"), p))?)
                }
            };
            routes.push(Route {
                filter,
                responses,
                output: template("output", &route.output)?,
                errors: template("errors", &route.errors)?,
                model: route.model,
                format: route.format,
                options: route.options,
            });
        }
        Ok(Config {
            daemon: self.daemon,
            broker: self.broker,
            models: self.models,
            routes,
        })
    }
}

impl Config {
    /// A route's task options: its own, then its model's.
    pub fn task_options(&self, route: &Route) -> TaskOptions {
        route.options.or(&self.models[&route.model].options)
    }
}

impl Broker {
    /// The external broker's address (`host`, `port`; 127.0.0.1:1883 by default).
    pub fn address(&self) -> (String, u16) {
        (
            self.host.clone().unwrap_or_else(|| "127.0.0.1".into()),
            self.port.unwrap_or(1883),
        )
    }

    /// `[broker.embedded]` rules out what only an external broker has: an address
    /// to connect to, TLS and credentials (the embedded broker listens in plain TCP
    /// and lets anyone connect, which is why it listens on loopback by default).
    fn check_embedded(
        &self,
        embedded: &Embedded,
        daemon: &Daemon,
        bad: &dyn Fn(String, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        if !cfg!(feature = "broker") {
            return Err(bad(
                "broker.embedded".into(),
                "this anotador was built without the embedded broker (cargo feature `broker`); use an external broker (host, port)".into(),
            ));
        }
        let external = [
            ("host", self.host.is_some()),
            ("port", self.port.is_some()),
            ("tls", self.tls.is_some()),
            ("username", self.username.is_some()),
            ("password_file", self.password_file.is_some()),
            ("password_env", self.password_env.is_some()),
        ];
        if let Some((key, _)) = external.iter().find(|(_, set)| *set) {
            return Err(bad(
                format!("broker.{key}"),
                "is for an external broker; with [broker.embedded] the daemon connects to its own broker (remove one or the other)".into(),
            ));
        }
        if embedded.max_clients == 0
            || embedded.max_queued_messages == 0
            || embedded.max_inflight == 0
        {
            let key = if embedded.max_clients == 0 {
                "max_clients"
            } else if embedded.max_queued_messages == 0 {
                "max_queued_messages"
            } else {
                "max_inflight"
            };
            return Err(bad(
                format!("broker.embedded.{key}"),
                "must be at least 1".into(),
            ));
        }
        // A queue that cannot hold one message of the largest size the daemon
        // reads would drop it on arrival.
        if embedded.max_queued_bytes < daemon.max_packet_bytes {
            return Err(bad(
                "broker.embedded.max_queued_bytes".into(),
                format!(
                    "must be at least daemon.max_packet_bytes ({})",
                    daemon.max_packet_bytes
                ),
            ));
        }
        let tls = [
            ("cert_file", &embedded.cert_file),
            ("key_file", &embedded.key_file),
            ("client_ca_file", &embedded.client_ca_file),
        ];
        match embedded.tls_listen {
            Some(_) => {
                for (key, file) in &tls {
                    match file {
                        Some(f) if !f.is_file() => {
                            return Err(bad(
                                format!("broker.embedded.{key}"),
                                format!("{} is not a readable file", f.display()),
                            ))
                        }
                        None if *key != "client_ca_file" => {
                            return Err(bad(
                                format!("broker.embedded.{key}"),
                                "tls_listen needs cert_file and key_file (PEM)".into(),
                            ))
                        }
                        _ => {}
                    }
                }
            }
            None => {
                if let Some((key, _)) = tls.iter().find(|(_, f)| f.is_some()) {
                    return Err(bad(
                        format!("broker.embedded.{key}"),
                        "is for the TLS listener: set tls_listen too".into(),
                    ));
                }
            }
        }
        let listeners = [
            ("listen", Some(embedded.listen)),
            ("tls_listen", embedded.tls_listen),
        ];
        for (key, addr) in listeners {
            let Some(addr) = addr else { continue };
            if !addr.ip().is_loopback()
                && embedded.password_file.is_none()
                && embedded.allow_anonymous != Some(true)
            {
                return Err(bad(
                    format!("broker.embedded.{key}"),
                    format!(
                        "{addr} reaches beyond this machine, and without password_file any client there could read every message and publish into every route; set password_file (users from `anotador passwd FILE USER`), or allow_anonymous = true to open it on purpose"
                    ),
                ));
            }
        }
        if embedded.password_file.is_none() && embedded.allow_anonymous == Some(false) {
            return Err(bad(
                "broker.embedded.allow_anonymous".into(),
                "false without password_file lets no client in; add password_file".into(),
            ));
        }
        #[cfg(feature = "broker")]
        {
            use crate::transport::broker::auth;
            if let Some(file) = &embedded.password_file {
                auth::check_password_file(file)
                    .map_err(|why| bad("broker.embedded.password_file".into(), why))?;
            }
            if let Some(file) = &embedded.acl_file {
                auth::check_acl_file(file)
                    .map_err(|why| bad("broker.embedded.acl_file".into(), why))?;
            }
            crate::transport::broker::tls::server_config(embedded)
                .map_err(|(key, why)| bad(format!("broker.embedded.{key}"), why))?;
        }
        if let Some(dir) = &embedded.data_dir {
            if dir.exists() && !dir.is_dir() {
                return Err(bad(
                    "broker.embedded.data_dir".into(),
                    format!("{} is not a folder", dir.display()),
                ));
            }
        } else if embedded.sync == SyncWrites::Always {
            return Err(bad(
                "broker.embedded.sync".into(),
                "\"always\" needs data_dir: without it nothing is written".into(),
            ));
        }
        Ok(())
    }

    /// The password, read from its file (first line) or environment variable.
    pub fn password(&self) -> std::io::Result<Option<String>> {
        if let Some(file) = &self.password_file {
            let text = std::fs::read_to_string(file)?;
            return Ok(Some(text.lines().next().unwrap_or("").to_string()));
        }
        if let Some(var) = &self.password_env {
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
