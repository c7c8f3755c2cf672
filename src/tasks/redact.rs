//! Redaction: the input text with chosen entity groups replaced, for token
//! classification models (NER, or POS tags such as `PROPN`). Pure: it reads the
//! entities the task found and the text they index, nothing else.
//!
//! Each replaced span keeps its offsets in the input (`start`, `end`, characters,
//! as the entities) and in the redacted text (`redacted_start`, `redacted_end`),
//! so an auditor can check every replacement against the original without
//! re-running the model.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use serde::Serialize;

use super::token::{bio, Entity};
use super::windows::CharIndex;
use crate::bundle::Aggregation;
use crate::error::{Error, Result};

/// Which entity groups to replace: `all` (every group the model tags, `O`
/// aside) or a list. Written `all` / `PER,LOC` on the command line, and
/// `"all"`, `"PER,LOC"` or `["PER", "LOC"]` in the TOML file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "RawGroups")]
pub enum Groups {
    All,
    Only(Vec<String>),
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum RawGroups {
    One(String),
    Many(Vec<String>),
}

impl TryFrom<RawGroups> for Groups {
    type Error = String;

    fn try_from(raw: RawGroups) -> std::result::Result<Groups, String> {
        match raw {
            RawGroups::One(s) => s.parse(),
            RawGroups::Many(list) => Groups::list(list),
        }
    }
}

impl FromStr for Groups {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Groups, String> {
        if s.trim().eq_ignore_ascii_case("all") {
            return Ok(Groups::All);
        }
        Groups::list(s.split(',').map(|g| g.trim().to_string()).collect())
    }
}

impl Groups {
    fn list(groups: Vec<String>) -> std::result::Result<Groups, String> {
        if groups.is_empty() || groups.iter().any(|g| g.is_empty()) {
            return Err("expected `all` or entity groups separated by commas, e.g. PER,LOC".into());
        }
        Ok(Groups::Only(groups))
    }
}

/// What a replaced span becomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Style {
    /// The group in brackets: `[PER]`.
    #[default]
    Tag,
    /// One pseudonym per distinct entity within a message, numbered by first
    /// appearance: `PER_1`, `PER_2`, `LOC_1`; the same name (ignoring case and
    /// spacing) gets the same pseudonym each time it appears in the message.
    Pseudonym,
}

/// The redacted text and every replacement made in it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Redaction {
    pub text: String,
    pub spans: Vec<Span>,
}

/// One replaced entity. Offsets are characters, as the entities' own.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Span {
    pub entity_group: String,
    /// Where the entity was in the input.
    pub start: usize,
    pub end: usize,
    pub replacement: String,
    /// Where its replacement is in the redacted text.
    pub redacted_start: usize,
    pub redacted_end: usize,
}

/// A checked redaction setting for one model.
#[derive(Debug, Clone)]
pub struct Redactor {
    /// `None`: every group.
    groups: Option<BTreeSet<String>>,
    style: Style,
}

/// The entity groups a token classifier can return: its labels without the
/// B-/I- prefix, `O` aside.
pub fn groups_of(labels: &[String]) -> BTreeSet<String> {
    labels
        .iter()
        .filter(|l| l.as_str() != "O")
        .map(|l| bio(l).1.to_string())
        .collect()
}

impl Redactor {
    /// Checks the setting against the model, so that a mistake is said once at
    /// start (a group the model never tags would silently redact nothing).
    pub fn new(
        groups: &Groups,
        style: Style,
        labels: &[String],
        aggregation: Aggregation,
    ) -> Result<Redactor> {
        if aggregation == Aggregation::None {
            return Err(Error::InvalidRequest(
                "redact: needs grouped entities (aggregation simple, first, average or max); \
                 aggregation none returns sub-tokens"
                    .into(),
            ));
        }
        let known = groups_of(labels);
        let groups = match groups {
            Groups::All => None,
            Groups::Only(list) => {
                if let Some(unknown) = list.iter().find(|g| !known.contains(*g)) {
                    let known: Vec<&str> = known.iter().map(String::as_str).collect();
                    return Err(Error::InvalidRequest(format!(
                        "redact: this model tags no entity group `{unknown}` (its groups: {})",
                        known.join(", ")
                    )));
                }
                Some(list.iter().cloned().collect())
            }
        };
        Ok(Redactor { groups, style })
    }

    /// `text` with the chosen groups' entities replaced. `entities` are sorted by
    /// start (the task's order). Spans of chosen entities that overlap (sub-tokens
    /// of one character, "Ⅻ" read as "XII", tagged twice; windows' entities the
    /// merge kept side by side) are replaced together, as one span named after
    /// the first: no character of a chosen entity is ever left in the text.
    pub fn apply(&self, text: &str, entities: &[Entity]) -> Redaction {
        // The chosen spans, overlaps joined: (group, start, end, word of the first).
        let mut chosen: Vec<(&str, usize, usize, &str)> = Vec::new();
        for entity in entities {
            let Entity::Group {
                entity_group,
                start,
                end,
                word,
                ..
            } = entity
            else {
                continue;
            };
            if end <= start
                || !self
                    .groups
                    .as_ref()
                    .is_none_or(|g| g.contains(entity_group))
            {
                continue;
            }
            match chosen.last_mut() {
                Some(last) if *start < last.2 => last.2 = last.2.max(*end),
                _ => chosen.push((entity_group, *start, *end, word)),
            }
        }

        let chars = CharIndex::new(text);
        let mut out = String::with_capacity(text.len());
        let mut spans = Vec::with_capacity(chosen.len());
        // Characters of `out` so far, and the input character copied up to.
        let (mut out_chars, mut copied) = (0usize, 0usize);
        // Pseudonyms: each distinct name's number, counted per group.
        let mut seen: BTreeMap<(&str, String), usize> = BTreeMap::new();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for (group, start, end, word) in chosen {
            out.push_str(chars.slice(text, copied, start));
            out_chars += start - copied;
            let replacement = match self.style {
                Style::Tag => format!("[{group}]"),
                Style::Pseudonym => {
                    let n = *seen.entry((group, name_key(word))).or_insert_with(|| {
                        let count = counts.entry(group).or_insert(0);
                        *count += 1;
                        *count
                    });
                    format!("{group}_{n}")
                }
            };
            let len = replacement.chars().count();
            out.push_str(&replacement);
            spans.push(Span {
                entity_group: group.to_string(),
                start,
                end,
                replacement,
                redacted_start: out_chars,
                redacted_end: out_chars + len,
            });
            out_chars += len;
            copied = end;
        }
        out.push_str(chars.slice(text, copied, chars.chars()));
        Redaction { text: out, spans }
    }
}

/// Two mentions are the same entity when they are spelt the same way, ignoring
/// case and spacing ("García Márquez", "GARCÍA  MÁRQUEZ").
fn name_key(word: &str) -> String {
    word.split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// Entities of `text` given as (group, word); offsets found in the text, in order.
    fn entities(text: &str, found: &[(&str, &str)]) -> Vec<Entity> {
        let mut from = 0;
        found
            .iter()
            .map(|(group, word)| {
                let byte = from + text[from..].find(word).expect("word in text");
                from = byte + word.len();
                let start = text[..byte].chars().count();
                Entity::Group {
                    entity_group: group.to_string(),
                    score: 0.9,
                    word: word.to_string(),
                    start,
                    end: start + word.chars().count(),
                }
            })
            .collect()
    }

    fn redactor(groups: &str, style: Style) -> Redactor {
        Redactor::new(
            &groups.parse().unwrap(),
            style,
            &labels(),
            Aggregation::First,
        )
        .unwrap()
    }

    /// Every span: its input offsets slice the entity out of the input, its
    /// redacted offsets slice the replacement out of the redacted text, and the
    /// text between spans is the input's.
    fn audit(text: &str, r: &Redaction) {
        let input: Vec<char> = text.chars().collect();
        let output: Vec<char> = r.text.chars().collect();
        let (mut i, mut o) = (0, 0);
        for s in &r.spans {
            assert_eq!(input[i..s.start], output[o..s.redacted_start]);
            let replaced: String = output[s.redacted_start..s.redacted_end].iter().collect();
            assert_eq!(replaced, s.replacement);
            (i, o) = (s.end, s.redacted_end);
        }
        assert_eq!(input[i..], output[o..]);
    }

    #[test]
    fn tags_replace_chosen_groups_and_keep_offsets() {
        let text = "Ñandú: Gabriel García Márquez nació en Aracataca (Colombia), dijo la ONU.";
        let found = entities(
            text,
            &[
                ("PER", "Gabriel García Márquez"),
                ("LOC", "Aracataca"),
                ("LOC", "Colombia"),
                ("ORG", "ONU"),
            ],
        );
        let r = redactor("PER,LOC", Style::Tag).apply(text, &found);
        assert_eq!(r.text, "Ñandú: [PER] nació en [LOC] ([LOC]), dijo la ONU.");
        let spans: Vec<_> = r
            .spans
            .iter()
            .map(|s| (s.start, s.end, s.redacted_start, s.redacted_end))
            .collect();
        assert_eq!(spans, [(7, 29, 7, 12), (39, 48, 22, 27), (50, 58, 29, 34)]);
        audit(text, &r);
        let all = redactor("all", Style::Tag).apply(text, &found);
        assert!(all.text.ends_with("dijo la [ORG]."), "{}", all.text);
        audit(text, &all);
    }

    #[test]
    fn pseudonyms_are_consistent_within_a_message() {
        let text = "Ana vio a Luis en Lima; luego ANA llamó a Luis desde Quito y a ana  otra vez.";
        let found = entities(
            text,
            &[
                ("PER", "Ana"),
                ("PER", "Luis"),
                ("LOC", "Lima"),
                ("PER", "ANA"),
                ("PER", "Luis"),
                ("LOC", "Quito"),
                ("PER", "ana"),
            ],
        );
        let r = redactor("all", Style::Pseudonym).apply(text, &found);
        assert_eq!(
            r.text,
            "PER_1 vio a PER_2 en LOC_1; luego PER_1 llamó a PER_2 desde LOC_2 y a PER_1  otra vez."
        );
        audit(text, &r);
    }

    #[test]
    fn settings_are_checked_against_the_model() {
        let err = |groups: &str, aggregation| {
            Redactor::new(&groups.parse().unwrap(), Style::Tag, &labels(), aggregation)
                .unwrap_err()
                .to_string()
        };
        assert!(err("PER,MISC", Aggregation::First).contains("LOC, ORG, PER"));
        assert!(err("PER", Aggregation::None).contains("aggregation"));
        assert!("".parse::<Groups>().is_err());
        assert!("PER,,LOC".parse::<Groups>().is_err());
        assert_eq!("ALL".parse::<Groups>(), Ok(Groups::All));
        let pos: Vec<String> = ["NOUN", "PROPN", "VERB"].map(String::from).to_vec();
        assert_eq!(
            groups_of(&pos).len(),
            3,
            "tags without BIO prefixes are groups"
        );
        let toml: Groups = toml::from_str::<toml::Table>(r#"g = ["PER", "LOC"]"#).unwrap()["g"]
            .clone()
            .try_into()
            .unwrap();
        assert_eq!(toml, Groups::Only(vec!["PER".into(), "LOC".into()]));
    }

    #[test]
    fn overlapping_spans_are_replaced_together_never_partly() {
        let text = "Banco de España Central, en Madrid";
        let mut found = entities(text, &[("ORG", "Banco de España")]);
        found.extend(entities(text, &[("LOC", "España")]));
        found.extend(entities(text, &[("LOC", "España Central")]));
        found.extend(entities(text, &[("LOC", "Madrid")]));
        let r = redactor("all", Style::Tag).apply(text, &found);
        assert_eq!(r.text, "[ORG], en [LOC]");
        assert_eq!((r.spans[0].start, r.spans[0].end), (0, 23));
        audit(text, &r);
        // Only a chosen group joins: LOC alone starts at "España".
        let r = redactor("LOC", Style::Tag).apply(text, &found);
        assert_eq!(r.text, "Banco de [LOC], en [LOC]");
        audit(text, &r);
    }
}
