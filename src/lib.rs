//! anotador: offline annotation of Spanish text with int8 transformer encoders.
//!
//! The flow, one module per concern:
//! `bundle` (a model folder, checked) → `engine` (tract: load-time rewrites,
//! one plan, one state per worker) → `tasks` (windows, token and text
//! classification, QA, pure functions of logits) → `message` (payloads in, JSON
//! envelopes out). `eval` scores a bundle through the same path.
//!
//! The daemon: `config` (the TOML file, `routing` parsed in it) → `service` (the
//! models and routes, one worker `pool` per model) ← `transport` (MQTT at the
//! edge: routes a message, parses it, hands it to the service with a reply handle).

pub mod bench;
pub mod bundle;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod eval;
pub mod memory;
pub mod message;
pub mod pool;
pub mod routing;
pub mod service;
pub mod systemd;
pub mod tasks;
pub mod transport;

pub use bundle::Bundle;
pub use error::{Error, Result};
pub use tasks::{Annotator, TaskOptions};
