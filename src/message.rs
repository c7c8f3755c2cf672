//! Messages in and out: payload parsing and validation, and the one function that
//! turns a result or an error into the JSON envelope `annotate` prints and the
//! daemon publishes. One shape for both, so a pipeline built against the CLI works
//! unchanged against the daemon.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::bundle::Task;
use crate::error::{Error, Result};
use crate::tasks::{self, Annotation, Output, Timings};

/// How payloads are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// The payload is the text itself.
    Text,
    /// `{"id": …, "text": …, "text_pair": …}`, or `{"id": …, "question": …,
    /// "context": …}` for question answering; other fields are echoed under `meta`.
    Json,
}

impl PayloadFormat {
    /// What a task reads when nobody says: the text itself where the task allows it.
    pub fn default_for(task: Task) -> PayloadFormat {
        if tasks::fields(task).plain_text {
            PayloadFormat::Text
        } else {
            PayloadFormat::Json
        }
    }

    /// Whether payloads in this format can feed `task`.
    pub fn check(self, task: Task) -> Result<()> {
        let fields = tasks::fields(task);
        if self == PayloadFormat::Text && !fields.plain_text {
            return Err(Error::InvalidRequest(format!(
                "{} reads JSON payloads {{\"{}\", \"{}\"}}",
                task.as_str(),
                fields.text,
                fields.pair
            )));
        }
        Ok(())
    }
}

/// One input. For question answering `text` is the question and `text_pair` the
/// context: the order in which the model reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Option<Value>,
    pub text: String,
    pub text_pair: Option<String>,
    pub meta: Map<String, Value>,
}

/// Parses and validates one payload. On error, returns the id when it could be read,
/// so the error result can still be matched to its input.
pub fn parse(
    payload: &[u8],
    format: PayloadFormat,
    task: Task,
    max_bytes: usize,
) -> Result<Request, (Option<Value>, Error)> {
    if payload.len() > max_bytes {
        return Err((
            None,
            Error::PayloadTooLarge {
                size: payload.len(),
                limit: max_bytes,
            },
        ));
    }
    let text = std::str::from_utf8(payload).map_err(|e| {
        (
            None,
            Error::InvalidUtf8 {
                offset: e.valid_up_to(),
            },
        )
    })?;
    format.check(task).map_err(|e| (None, e))?;
    match format {
        PayloadFormat::Text => {
            let text = text.strip_suffix('\n').unwrap_or(text);
            let text = text.strip_suffix('\r').unwrap_or(text);
            tasks::check(task, text, None).map_err(|e| (None, e))?;
            Ok(Request {
                id: None,
                text: text.to_string(),
                text_pair: None,
                meta: Map::new(),
            })
        }
        PayloadFormat::Json => parse_json(text, task),
    }
}

fn parse_json(text: &str, task: Task) -> Result<Request, (Option<Value>, Error)> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| (None, Error::InvalidJson(e.to_string())))?;
    let Value::Object(mut object) = value else {
        return Err((None, Error::InvalidJson("expected a JSON object".into())));
    };
    let id = object.remove("id");
    if let Some(id) = &id {
        if !(id.is_string() || id.is_number()) {
            return Err((
                None,
                Error::InvalidRequest("`id` must be a string or a number".into()),
            ));
        }
    }
    let fail = |e: Error| (id.clone(), e);
    let fields = tasks::fields(task);
    let text = match object.remove(fields.text) {
        Some(Value::String(s)) => s,
        _ => return Err(fail(Error::MissingField { field: fields.text })),
    };
    let text_pair = match object.remove(fields.pair) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) if fields.pair_required => {
            return Err(fail(Error::MissingField { field: fields.pair }))
        }
        Some(_) => {
            return Err(fail(Error::InvalidRequest(format!(
                "`{}` must be a string",
                fields.pair
            ))))
        }
    };
    tasks::check(task, &text, text_pair.as_deref()).map_err(fail)?;
    Ok(Request {
        id,
        text,
        text_pair,
        meta: object,
    })
}

/// Who answers, as every envelope says it.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The model bundle's name (its folder), the same for results and errors.
    pub model: &'a str,
    pub task: Task,
    /// The input topic, when the input came over MQTT.
    pub topic: Option<&'a str>,
}

/// The one way a result or an error becomes bytes: what `annotate` prints, what
/// the daemon publishes for a bad payload at intake and what its workers publish.
/// `id` and `meta` are the request's, when it could be read.
pub fn envelope(
    source: Source,
    id: Option<&Value>,
    meta: &Map<String, Value>,
    outcome: Result<&Annotation, &Error>,
) -> Vec<u8> {
    let bytes = match outcome {
        Ok(annotation) => serde_json::to_vec(&ResultEnvelope {
            topic: source.topic,
            id,
            model: source.model,
            task: source.task.as_str(),
            result: &annotation.result,
            redacted: annotation.redaction.as_ref(),
            windows: annotation.windows,
            tokens: annotation.tokens,
            timings_ms: &annotation.timings,
            meta,
        }),
        Err(error) => serde_json::to_vec(&ErrorEnvelope {
            topic: source.topic,
            id,
            model: source.model,
            error: ErrorBody {
                code: error.code(),
                reason: error.to_string(),
            },
        }),
    };
    // Strings, numbers and maps of them: serialization cannot fail.
    bytes.expect("envelopes serialize")
}

/// A result, as published.
#[derive(Serialize)]
struct ResultEnvelope<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    id: Option<&'a Value>,
    model: &'a str,
    task: &'a str,
    result: &'a Output,
    /// Only with redaction on: a field added, the others unchanged.
    #[serde(skip_serializing_if = "Option::is_none")]
    redacted: Option<&'a crate::tasks::redact::Redaction>,
    windows: usize,
    tokens: usize,
    timings_ms: &'a Timings,
    #[serde(skip_serializing_if = "Map::is_empty")]
    meta: &'a Map<String, Value>,
}

#[derive(Serialize)]
struct ErrorBody {
    code: &'static str,
    reason: String,
}

/// An error, as published on the error topic.
#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    id: Option<&'a Value>,
    model: &'a str,
    error: ErrorBody,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<Request, (Option<Value>, Error)>) -> &'static str {
        r.unwrap_err().1.code()
    }

    #[test]
    fn bad_payloads_get_their_codes() {
        let long = [b'a'; 101];
        let cases: [(&[u8], PayloadFormat, &str); 8] = [
            (b"\xff\xfe", PayloadFormat::Text, "invalid_utf8"),
            (b"   \n", PayloadFormat::Text, "empty_text"),
            (&long, PayloadFormat::Text, "payload_too_large"),
            (b"{\"text\": ", PayloadFormat::Json, "invalid_json"),
            (b"[1]", PayloadFormat::Json, "invalid_json"),
            (b"{\"id\": 1}", PayloadFormat::Json, "missing_text"),
            (b"{\"text\": 3}", PayloadFormat::Json, "missing_text"),
            (b"{\"text\": \" \"}", PayloadFormat::Json, "empty_text"),
        ];
        for (payload, format, expected) in cases {
            let got = code(parse(payload, format, Task::TextClassification, 100));
            assert_eq!(got, expected, "{}", String::from_utf8_lossy(payload));
        }
    }

    #[test]
    fn question_answering_reads_question_and_context() {
        let qa = |p: &[u8]| parse(p, PayloadFormat::Json, Task::QuestionAnswering, 1000);
        let r = qa(r#"{"id": 4, "question": "¿Dónde?", "context": "En Lima.", "x": 1}"#.as_bytes())
            .unwrap();
        assert_eq!(
            (r.text.as_str(), r.text_pair.as_deref()),
            ("¿Dónde?", Some("En Lima."))
        );
        assert_eq!(r.meta.get("x"), Some(&Value::from(1)));
        let (id, e) = qa(r#"{"id": 4, "question": "¿Dónde?"}"#.as_bytes()).unwrap_err();
        assert_eq!(
            (id, e.code(), e.to_string().contains("context")),
            (Some(Value::from(4)), "missing_field", true)
        );
        assert_eq!(
            code(qa(br#"{"question": " ", "context": "x"}"#)),
            "empty_text"
        );
        assert_eq!(code(qa(br#"{"text": "hola"}"#)), "missing_field");
        assert_eq!(
            code(parse(
                b"hola",
                PayloadFormat::Text,
                Task::QuestionAnswering,
                100
            )),
            "invalid_request"
        );
    }

    #[test]
    fn json_keeps_id_and_echoes_extra_fields() {
        let r = parse(
            br#"{"id": "a1", "text": "Hola", "sensor": 7}"#,
            PayloadFormat::Json,
            Task::TextClassification,
            100,
        )
        .unwrap();
        assert_eq!(r.id, Some(Value::from("a1")));
        assert_eq!(r.text, "Hola");
        assert_eq!(r.meta.get("sensor"), Some(&Value::from(7)));
        let (id, err) = parse(
            br#"{"id": 9, "text": ""}"#,
            PayloadFormat::Json,
            Task::TextClassification,
            100,
        )
        .unwrap_err();
        assert_eq!((id, err.code()), (Some(Value::from(9)), "empty_text"));
    }
}
