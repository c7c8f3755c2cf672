//! anotador: offline annotation of Spanish text with int8 transformer encoders.
//!
//! The flow, one module per concern:
//! `bundle` (a model folder, checked) → `engine` (tract: load-time rewrites,
//! one plan, one state per worker) → `tasks` (windows, token and text
//! classification, pure functions of logits) → `message` (payloads in, JSON
//! envelopes out). `eval` scores a bundle through the same path.

pub mod bundle;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod eval;
pub mod memory;
pub mod message;
pub mod pipeline;
pub mod systemd;
pub mod tasks;
pub mod transport;

pub use bundle::Bundle;
pub use error::{Error, Result};
pub use tasks::{Annotator, TaskOptions};
