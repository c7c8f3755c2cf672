//! One error type for the library. Each variant maps to a stable, machine-readable
//! code: that code is what the daemon publishes on the dead-letter topic and what
//! `annotate` prints, so callers can branch on it without parsing prose.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model bundle is unusable. Always names the file and the problem, because
    /// the person reading it is on a device with no network and no debugger.
    #[error("model bundle {}: {file}: {problem}", dir.display())]
    Bundle {
        dir: PathBuf,
        file: &'static str,
        problem: String,
    },

    #[error("input is not valid UTF-8 (first bad byte at offset {offset})")]
    InvalidUtf8 { offset: usize },

    #[error("input is not valid JSON: {0}")]
    InvalidJson(String),

    #[error("input has no usable `{field}` field")]
    MissingField { field: &'static str },

    #[error("text is empty")]
    EmptyText,

    #[error("`{field}` is empty")]
    EmptyField { field: &'static str },

    #[error("payload is {size} bytes, over the limit of {limit}")]
    PayloadTooLarge { size: usize, limit: usize },

    #[error("text needs {needed} windows of {window} tokens, over the limit of {limit}")]
    TextTooLong {
        needed: usize,
        window: usize,
        limit: usize,
    },

    #[error("{0}")]
    InvalidRequest(String),

    /// An MQTT 5 request named a response topic its route does not allow
    /// (`routes[].responses`), or one that cannot be published to.
    #[error("response topic `{topic}` is not allowed by this route's `responses` ({allowed})")]
    ResponseTopicRefused { topic: String, allowed: String },

    #[error("tokenizer failed: {0}")]
    Tokenizer(String),

    #[error("inference failed: {0}")]
    Inference(String),

    #[error("evaluation data {}: line {line}: {problem}", path.display())]
    EvalData {
        path: PathBuf,
        line: usize,
        problem: String,
    },

    /// An int8 kernel that cannot serve here (`kernel`, `--kernel`).
    #[error("{0}")]
    Kernel(String),

    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The stable code published with error results.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Bundle { .. } => "bad_bundle",
            Error::InvalidUtf8 { .. } => "invalid_utf8",
            Error::InvalidJson(_) => "invalid_json",
            Error::MissingField { field: "text" } => "missing_text",
            Error::MissingField { .. } => "missing_field",
            Error::EmptyText | Error::EmptyField { .. } => "empty_text",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::TextTooLong { .. } => "text_too_long",
            Error::InvalidRequest(_) => "invalid_request",
            Error::ResponseTopicRefused { .. } => "response_topic_refused",
            Error::Tokenizer(_) => "tokenizer_failed",
            Error::Inference(_) => "inference_failed",
            Error::EvalData { .. } => "bad_eval_data",
            Error::Kernel(_) => "kernel_unavailable",
            Error::Io(_) => "io",
        }
    }

    pub(crate) fn bundle(
        dir: &std::path::Path,
        file: &'static str,
        problem: impl Into<String>,
    ) -> Self {
        Error::Bundle {
            dir: dir.to_path_buf(),
            file,
            problem: problem.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
