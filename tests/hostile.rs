//! Hostile input, as a bounded property test (runs in `cargo test`): random and
//! adversarial payloads through parsing, tokenization, windowing and the token
//! task. Nothing may panic, every error is structured, every entity's `word`
//! is exactly the input slice at `start..end`, and redaction replaces exactly the
//! entities' spans, its offsets true in both texts.
//!
//! `ANOTADOR_PROPTEST_CASES` raises the number of random cases (default 300).

use std::path::Path;
use std::sync::Arc;

use anotador::bundle::Task;
use anotador::message::{self, PayloadFormat};
use anotador::tasks::redact::{Groups, Redaction, Style};
use anotador::tasks::{Output, TaskOptions};
use anotador::{Annotator, Bundle};

/// xorshift64*: deterministic, no dependency, good enough to pick characters.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Pieces that break naive tokenizers and offset arithmetic.
const PIECES: [&str; 24] = [
    "El",
    " ",
    "  ",
    "Real Madrid",
    "ganó",
    "Ñandú",
    "e\u{301}",
    "\u{200b}",
    "\u{200f}",
    "\u{202e}",
    "🦜",
    "👨‍👩‍👧",
    "習近平",
    "Łódź",
    "\t",
    "\n",
    ".",
    ",",
    "¿",
    "!!!",
    "ﬁ",
    "\u{feff}",
    "1927",
    "Ⅻ",
];

fn random_text(rng: &mut Rng) -> String {
    let n = 1 + rng.below(40);
    let mut s = String::new();
    for _ in 0..n {
        match rng.below(10) {
            0 => s.push(char::from_u32(rng.below(0x2FFFF) as u32).unwrap_or('x')),
            _ => s.push_str(PIECES[rng.below(PIECES.len())]),
        }
    }
    s
}

fn annotator(name: &str, options: TaskOptions) -> Annotator {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    Annotator::new(Arc::new(Bundle::load(dir).unwrap()), &options).unwrap()
}

fn check_entities(text: &str, out: &Output) {
    let Output::Entities(entities) = out else {
        panic!("token task")
    };
    let chars: Vec<char> = text.chars().collect();
    let mut last_start = 0;
    for e in entities {
        let v = serde_json::to_value(e).unwrap();
        let (s, t) = (
            v["start"].as_u64().unwrap() as usize,
            v["end"].as_u64().unwrap() as usize,
        );
        assert!(
            s <= t && t <= chars.len(),
            "offsets {s}..{t} outside {} chars of {text:?}",
            chars.len()
        );
        let slice: String = chars[s..t].iter().collect();
        assert_eq!(v["word"].as_str().unwrap(), slice, "in {text:?}");
        assert!(s >= last_start, "entities sorted by start in {text:?}");
        last_start = s;
        let score = v["score"].as_f64().unwrap();
        assert!((0.0..=1.0 + 1e-6).contains(&score), "score {score}");
    }
}

/// The redacted text is the input with the entities replaced: spans are in
/// order and apart, each holds its replacement in the redacted text, the text
/// between spans is the input's character for character, and no character of any
/// entity survives (overlapping entities are replaced together).
fn check_redaction(text: &str, out: &Output, redaction: &Redaction) {
    let Output::Entities(entities) = out else {
        panic!("token task")
    };
    let input: Vec<char> = text.chars().collect();
    let output: Vec<char> = redaction.text.chars().collect();
    let (mut i, mut o) = (0, 0);
    for s in &redaction.spans {
        assert!(i <= s.start && s.start < s.end, "{s:?} in {text:?}");
        assert_eq!(
            input[i..s.start],
            output[o..s.redacted_start],
            "in {text:?}"
        );
        let replaced: String = output[s.redacted_start..s.redacted_end].iter().collect();
        assert_eq!(replaced, s.replacement);
        (i, o) = (s.end, s.redacted_end);
    }
    assert_eq!(input[i..], output[o..], "in {text:?}");
    for e in entities {
        let (start, end) = e.span();
        assert!(
            start == end
                || redaction
                    .spans
                    .iter()
                    .any(|s| s.start <= start && end <= s.end),
            "{e:?} not redacted in {text:?}"
        );
    }
}

#[test]
fn random_and_adversarial_texts_never_panic_and_keep_offsets_exact() {
    let cases: usize = std::env::var("ANOTADOR_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let mut executions = 0;
    for (name, window) in [
        ("bert-token", 16),
        ("albert-token", 12),
        ("distilbert-token", 64),
    ] {
        for aggregation in ["none", "simple", "first", "average", "max"] {
            // Grouped entities can be redacted: each aggregation but `none`, both styles.
            let grouped = aggregation != "none";
            let options = TaskOptions {
                aggregation: Some(serde_json::from_value(serde_json::json!(aggregation)).unwrap()),
                window: Some(window),
                stride: Some(window / 4),
                max_windows: Some(64),
                redact: grouped.then_some(Groups::All),
                redact_style: grouped.then_some(if aggregation == "first" {
                    Style::Pseudonym
                } else {
                    Style::Tag
                }),
                ..TaskOptions::default()
            };
            let a = annotator(name, options);
            let mut state = a.bundle().engine.state().unwrap();
            for _ in 0..cases / 15 + 1 {
                let text = random_text(&mut rng);
                match a.annotate(&mut state, &text, None) {
                    Ok(ann) => {
                        check_entities(&text, &ann.result);
                        match &ann.redaction {
                            Some(r) => check_redaction(&text, &ann.result, r),
                            None => assert!(!grouped, "redaction asked for"),
                        }
                    }
                    Err(e) => assert!(
                        matches!(e.code(), "empty_text" | "text_too_long"),
                        "{name}: unexpected {} for {text:?}",
                        e.code()
                    ),
                }
                executions += 1;
            }
        }
    }
    println!("{executions} random texts annotated");
}

#[test]
fn pathological_payloads_get_structured_errors() {
    let max = 1 << 20;
    let code = |payload: &[u8], format| {
        message::parse(payload, format, Task::TokenClassification, max)
            .err()
            .map(|(_, e)| e.code())
    };
    // Deep nesting: serde_json's recursion limit turns it into an error, not a stack overflow.
    let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(deep.len() < max);
    assert_eq!(
        code(deep.as_bytes(), PayloadFormat::Json),
        Some("invalid_json")
    );
    let deep_small = format!("{{\"text\": {}1{}}}", "[".repeat(5_000), "]".repeat(5_000));
    assert_eq!(
        code(deep_small.as_bytes(), PayloadFormat::Json),
        Some("invalid_json")
    );
    assert_eq!(
        code(&vec![b'a'; max + 1], PayloadFormat::Text),
        Some("payload_too_large")
    );
    assert_eq!(code(b"\xc3\x28", PayloadFormat::Text), Some("invalid_utf8"));
    assert_eq!(
        code(b"\xed\xa0\x80", PayloadFormat::Text),
        Some("invalid_utf8"),
        "UTF-16 surrogate"
    );
    assert_eq!(
        code(b"{\"text\": \"\\ud800\"}", PayloadFormat::Json),
        Some("invalid_json"),
        "lone surrogate escape"
    );
    assert_eq!(
        code("\u{200b}\u{feff} \t".as_bytes(), PayloadFormat::Text),
        None,
        "zero-width text is text"
    );

    // Whitespace-only and punctuation-only texts, and a 1 MB single word.
    let a = annotator(
        "bert-token",
        TaskOptions {
            max_windows: Some(8),
            ..TaskOptions::default()
        },
    );
    let mut state = a.bundle().engine.state().unwrap();
    assert_eq!(
        a.annotate(&mut state, " \t\n ", None).unwrap_err().code(),
        "empty_text"
    );
    let punct = "¡¿.,;:!?()[]{}«»—…".repeat(3);
    check_entities(
        &punct,
        &a.annotate(&mut state, &punct, None).unwrap().result,
    );
    // One 1 MB word is one unknown token (WordPiece caps word length), as in
    // transformers; 1 MB of short words needs more windows than allowed.
    let word = "a".repeat(1 << 20);
    let ann = a.annotate(&mut state, &word, None).unwrap();
    assert_eq!(ann.tokens, 3, "[CLS] [UNK] [SEP]");
    check_entities(&word, &ann.result);
    let words = "a ".repeat(1 << 19);
    let e = a.annotate(&mut state, &words, None).unwrap_err();
    assert_eq!(e.code(), "text_too_long", "{e}");
}
