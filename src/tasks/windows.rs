//! Tokenization into model-sized windows.
//!
//! Text longer than the model's maximum is never silently truncated: it is cut
//! into overlapping windows (`stride` tokens shared between neighbours), exactly as
//! the Hugging Face pipelines do with `stride` (the same tokenizers code makes the
//! overflow), and the task merges the windows' predictions.
//!
//! Offsets are converted to *character* (Unicode scalar) offsets, which is what
//! the Hugging Face pipelines report and what a JSON consumer can slice with.

use tokenizers::{PostProcessor, Tokenizer, TruncationDirection};

use super::TaskOptions;
use crate::engine::Batch;
use crate::error::{Error, Result};

/// Window and stride of token and text classification: the model's maximum, and a
/// quarter of it (at most 128) shared by neighbouring windows.
pub fn sizes(options: &TaskOptions, max_length: usize) -> (usize, usize) {
    let window = options.window.unwrap_or(max_length);
    (window, options.stride.unwrap_or((window / 4).min(128)))
}

/// One window of tokens, as fed to the model.
#[derive(Debug, Clone)]
pub struct Window {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub special: Vec<bool>,
    /// Character offsets into the token's own text (the first, or the second of a
    /// pair); meaningless for special tokens.
    pub offsets: Vec<(usize, usize)>,
    /// Which text each token comes from (0 or 1; `None` for special tokens).
    pub sequence: Vec<Option<usize>>,
    /// The pre-tokenizer word of each token within its text.
    pub words: Vec<Option<u32>>,
}

/// Cuts text into windows of at most `max_length` tokens (special tokens included).
#[derive(Clone)]
pub struct Windower {
    tokenizer: Tokenizer,
    pub max_length: usize,
    pub stride: usize,
    pub max_windows: usize,
    pad_id: u32,
    type_ids: bool,
    /// Special tokens the post-processor adds to one sequence ([CLS] … [SEP]).
    specials: usize,
}

impl Windower {
    pub fn new(
        tokenizer: &Tokenizer,
        max_length: usize,
        stride: usize,
        max_windows: usize,
        pad_id: u32,
        type_ids: bool,
    ) -> Result<Windower> {
        let specials = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if stride + specials >= max_length {
            return Err(Error::InvalidRequest(format!(
                "stride {stride} must be smaller than the window of {max_length} tokens minus {specials} special tokens"
            )));
        }
        let mut tokenizer = tokenizer.clone();
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Windower {
            tokenizer,
            max_length,
            stride,
            max_windows: max_windows.max(1),
            pad_id,
            type_ids,
            specials,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Windows of one text, or of a text pair. A pair must fit one window: cutting
    /// a premise/hypothesis pair apart would change what is being classified.
    ///
    /// The text is tokenized once, cut into overlapping parts of `max_length`
    /// minus the special tokens, and each part gets its special tokens: what the
    /// pipelines get from `return_overflowing_tokens` with `stride`. (The Rust
    /// crate's own overflow through `TemplateProcessing` loses windows, so the
    /// cut is done here with `Encoding::truncate`, which is flat and exact.)
    pub fn encode(&self, text: &str, pair: Option<&str>) -> Result<Vec<Window>> {
        let tokenizer_err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
        let encodings = match pair {
            Some(pair) => {
                let encoding = self
                    .tokenizer
                    .encode((text, pair), true)
                    .map_err(tokenizer_err)?;
                if encoding.len() > self.max_length {
                    return Err(Error::TextTooLong {
                        needed: encoding.len().div_ceil(self.max_length),
                        window: self.max_length,
                        limit: 1,
                    });
                }
                vec![encoding]
            }
            None => {
                let encoding = self.tokenizer.encode(text, false).map_err(tokenizer_err)?;
                self.cut(encoding, self.max_length - self.specials)?
                    .into_iter()
                    .map(|part| {
                        self.tokenizer
                            .post_process(part, None, true)
                            .map_err(tokenizer_err)
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let first = CharIndex::new(text);
        let second = pair.map(CharIndex::new);
        Ok(encodings
            .iter()
            .map(|e| window(e, &first, second.as_ref()))
            .collect())
    }

    /// Windows of a question and its context, as the question-answering pipeline
    /// makes them: `[CLS] question [SEP] context-part [SEP]`, the question whole in
    /// every window and the context cut into parts of what is left, neighbours
    /// sharing `stride` tokens (`truncation="only_second"` with `stride`).
    pub fn encode_qa(&self, question: &str, context: &str) -> Result<Vec<Window>> {
        let tokenizer_err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
        let q = self
            .tokenizer
            .encode(question, false)
            .map_err(tokenizer_err)?;
        let c = self
            .tokenizer
            .encode(context, false)
            .map_err(tokenizer_err)?;
        let specials = self
            .tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(true));
        let budget = self
            .max_length
            .checked_sub(q.len() + specials)
            .filter(|&b| b > self.stride)
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "the question has {} tokens: with {specials} special tokens and a doc stride of {} it leaves no room for the context in a window of {} tokens",
                    q.len(),
                    self.stride,
                    self.max_length
                ))
            })?;
        let (qi, ci) = (CharIndex::new(question), CharIndex::new(context));
        self.cut(c, budget)?
            .into_iter()
            .map(|part| {
                let e = self
                    .tokenizer
                    .post_process(q.clone(), Some(part), true)
                    .map_err(tokenizer_err)?;
                Ok(window(&e, &qi, Some(&ci)))
            })
            .collect()
    }

    /// Cuts an encoding (no special tokens) into parts of at most `budget` tokens,
    /// neighbours sharing `stride`, refusing what needs more than `max_windows`.
    fn cut(
        &self,
        mut encoding: tokenizers::Encoding,
        budget: usize,
    ) -> Result<Vec<tokenizers::Encoding>> {
        if encoding.len() > budget {
            let needed = 1 + (encoding.len() - budget).div_ceil(budget - self.stride);
            if needed > self.max_windows {
                return Err(Error::TextTooLong {
                    needed,
                    window: self.max_length,
                    limit: self.max_windows,
                });
            }
            encoding.truncate(budget, self.stride, TruncationDirection::Right);
        }
        let rest = encoding.take_overflowing();
        Ok(std::iter::once(encoding).chain(rest).collect())
    }

    /// Pads windows to `seq_len` tokens (at least the longest) in one batch; the
    /// padding is masked out by attention_mask.
    pub fn batch(&self, windows: &[Window], seq_len: usize) -> Batch {
        self.batch_of(windows.iter(), seq_len)
    }

    /// [`Windower::batch`] over windows that need not sit in one slice (a
    /// micro-batch gathers them from several messages).
    pub fn batch_of<'a>(
        &self,
        windows: impl ExactSizeIterator<Item = &'a Window> + Clone,
        seq_len: usize,
    ) -> Batch {
        let seq_len = windows
            .clone()
            .map(|w| w.ids.len())
            .fold(seq_len, usize::max);
        let rows = windows.len();
        let mut batch = Batch {
            rows,
            seq_len,
            input_ids: Vec::with_capacity(rows * seq_len),
            attention_mask: Vec::with_capacity(rows * seq_len),
            token_type_ids: Vec::with_capacity(rows * seq_len),
        };
        for w in windows {
            let pad = seq_len - w.ids.len();
            batch.input_ids.extend(w.ids.iter().map(|&i| i as i64));
            batch
                .input_ids
                .extend(std::iter::repeat_n(self.pad_id as i64, pad));
            batch
                .attention_mask
                .extend(std::iter::repeat_n(1, w.ids.len()));
            batch.attention_mask.extend(std::iter::repeat_n(0, pad));
            if self.type_ids {
                batch
                    .token_type_ids
                    .extend(w.type_ids.iter().map(|&i| i as i64));
                batch.token_type_ids.extend(std::iter::repeat_n(0, pad));
            } else {
                batch.token_type_ids.extend(std::iter::repeat_n(0, seq_len));
            }
        }
        batch
    }
}

/// A window from a post-processed encoding; each token's offsets are converted
/// to characters of its own text.
fn window(e: &tokenizers::Encoding, first: &CharIndex, second: Option<&CharIndex>) -> Window {
    let special = e.get_special_tokens_mask();
    // A pair assembled from two separately encoded texts keeps the second text's
    // stale "sequence 0" range in tokenizers 0.23, which erases the first text's:
    // a non-special token with no sequence is from the first text.
    let sequence: Vec<Option<usize>> = e
        .get_sequence_ids()
        .into_iter()
        .zip(special)
        .map(|(seq, &sp)| {
            if seq.is_none() && sp == 0 {
                Some(0)
            } else {
                seq
            }
        })
        .collect();
    Window {
        ids: e.get_ids().to_vec(),
        type_ids: e.get_type_ids().to_vec(),
        special: special.iter().map(|&m| m != 0).collect(),
        offsets: e
            .get_offsets()
            .iter()
            .zip(&sequence)
            .map(|(&(s, t), seq)| {
                let chars = match (seq, second) {
                    (Some(1), Some(second)) => second,
                    _ => first,
                };
                (chars.char_at(s), chars.char_at(t))
            })
            .collect(),
        words: e.get_word_ids().to_vec(),
        sequence,
    }
}

/// Byte offset → character offset, by binary search over char starts.
pub struct CharIndex {
    starts: Vec<usize>,
    len: usize,
}

impl CharIndex {
    pub fn new(text: &str) -> CharIndex {
        CharIndex {
            starts: text.char_indices().map(|(b, _)| b).collect(),
            len: text.len(),
        }
    }

    pub fn char_at(&self, byte: usize) -> usize {
        if byte >= self.len {
            return self.starts.len();
        }
        match self.starts.binary_search(&byte) {
            Ok(i) => i,
            // Inside a character: tokenizers only reports char boundaries, but be safe.
            Err(i) => i.saturating_sub(1),
        }
    }

    fn byte_at(&self, ch: usize) -> usize {
        self.starts.get(ch).copied().unwrap_or(self.len)
    }

    /// `text[start..end]` in characters; `text` must be the indexed text.
    pub fn slice<'a>(&self, text: &'a str, start: usize, end: usize) -> &'a str {
        let s = self.byte_at(start);
        &text[s..self.byte_at(end).max(s)]
    }

    pub fn chars(&self) -> usize {
        self.starts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_offsets_count_scalars_not_bytes() {
        let text = "Ñandú ganó";
        let idx = CharIndex::new(text);
        assert_eq!(idx.char_at(0), 0);
        assert_eq!(idx.char_at("Ñandú".len()), 5);
        assert_eq!(idx.char_at(text.len()), 10);
        assert_eq!(idx.slice(text, 6, 10), "ganó");
        assert_eq!(idx.slice(text, 0, 5), "Ñandú");
        assert_eq!(idx.slice(text, 3, 3), "");
        assert_eq!(idx.slice(text, 9, 99), "ó");
    }
}
