//! Structured output: replies held to a JSON schema (OpenAI's `response_format` `json_object` and
//! `json_schema`) by constrained decoding — before each token is chosen, the tokens that would
//! take the reply out of the grammar are masked — with llguidance (the grammar engine vLLM,
//! SGLang and llama.cpp use) over ChatGLM's vocabulary.
//!
//! The vocabulary is given to llguidance as bytes ([`ChatGlmTokenizer::token_bytes`]): `▁` is a
//! space, byte-fallback pieces their byte, ChatGLM's `<n>` / `<|tab|>` / `<|blank_k|>` what they
//! stand for; control pieces are marked so that no grammar produces them, `<eop>` is the end, and
//! the embedding rows past the tokenizer's 130,344 pieces are never allowed. A constrained reply
//! is sent as decoded, without the punctuation rewriting `chat` applies to free text (which could
//! break the JSON), and laid out as `json.dumps` does (no white space but one space after `:` and
//! `,`).
//!
//! The API compiles a request's schema into a [`Constraint`] before queueing it (a schema that does
//! not compile is the client's 400); the engine masks each step's logits with it
//! ([`Constraint::mask`]) and feeds it the chosen token ([`Constraint::advance`]); the reply ends
//! when the grammar is complete.

use std::sync::Arc;

use anyhow::{Context, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use tch::Tensor;

use crate::tokenizer::{ids, ChatGlmTokenizer};

/// What a constrained reply must be.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object (`{"type": "json_object"}`).
    JsonObject,
    /// An instance of a JSON schema (`{"type": "json_schema", "json_schema": {"schema": …}}`).
    JsonSchema(serde_json::Value),
}

/// Grammars compiled against one vocabulary; built once per model (a byte trie over every
/// token), shared by every request.
pub struct Grammars {
    factory: Arc<ParserFactory>,
    vocab: usize,
}

impl Grammars {
    /// The grammar engine for `tok`'s pieces over a model with `vocab_rows` embedding rows.
    pub fn new(tok: &ChatGlmTokenizer, vocab_rows: usize) -> Result<Self> {
        let mut words: Vec<Vec<u8>> = tok
            .token_bytes()
            .into_iter()
            .map(|(bytes, control)| {
                if control {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend(bytes);
                    w
                } else {
                    bytes
                }
            })
            .collect();
        anyhow::ensure!(
            words.len() <= vocab_rows,
            "the tokenizer has {} pieces, the model {vocab_rows} embedding rows",
            words.len()
        );
        // Rows past the tokenizer decode to nothing: no bytes, so no grammar allows them.
        words.resize(vocab_rows, Vec::new());
        let info = TokRxInfo::new(vocab_rows as u32, ids::EOP as u32);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let factory = ParserFactory::new_simple(&env).context("the grammar engine")?;
        Ok(Self {
            factory: Arc::new(factory),
            vocab: vocab_rows,
        })
    }

    /// A fresh constraint for one reply; a schema the engine cannot compile is the error.
    pub fn constraint(&self, format: &ResponseFormat) -> Result<Constraint> {
        let mut schema = match format {
            ResponseFormat::JsonObject => serde_json::json!({"type": "object"}),
            ResponseFormat::JsonSchema(s) => s.clone(),
        };
        // JSON as `json.dumps` writes it — one space after `:` and `,`, none elsewhere — unless
        // the schema sets llguidance's own options: a model free to add white space can fill a
        // reply with it.
        if let Some(o) = schema.as_object_mut() {
            o.entry("x-guidance").or_insert_with(|| {
                serde_json::json!({
                    "whitespace_flexible": false,
                    "item_separator": ", ",
                    "key_separator": ": ",
                })
            });
        }
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            anyhow::bail!("{e}");
        }
        Ok(Constraint {
            matcher,
            vocab: self.vocab,
        })
    }
}

/// [`Grammars`] built when first asked for (the trie over 130k tokens takes a moment; a server
/// that is never asked for structured output never builds it).
pub struct LazyGrammars {
    tok: ChatGlmTokenizer,
    vocab_rows: usize,
    built: std::sync::OnceLock<std::result::Result<Grammars, String>>,
}

impl std::fmt::Debug for LazyGrammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyGrammars")
            .field("vocab_rows", &self.vocab_rows)
            .field("built", &self.built.get().map(|b| b.is_ok()))
            .finish()
    }
}

impl LazyGrammars {
    pub fn new(tok: ChatGlmTokenizer, vocab_rows: usize) -> Self {
        Self {
            tok,
            vocab_rows,
            built: std::sync::OnceLock::new(),
        }
    }

    pub fn get(&self) -> Result<&Grammars> {
        self.built
            .get_or_init(|| Grammars::new(&self.tok, self.vocab_rows).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// One reply's place in its grammar.
pub struct Constraint {
    matcher: Matcher,
    vocab: usize,
}

impl Constraint {
    /// `logits [1, vocab]` with every token the grammar does not allow next set to −∞.
    pub fn mask(&mut self, logits: &Tensor) -> Result<Tensor> {
        let allowed = self
            .matcher
            .compute_mask()
            .map_err(|e| anyhow::anyhow!("structured output: {e}"))?;
        let mut keep = vec![false; self.vocab];
        allowed.iter_set_entries(|i| {
            if let Some(k) = keep.get_mut(i) {
                *k = true;
            }
        });
        anyhow::ensure!(
            keep.iter().any(|&k| k),
            "structured output: the grammar allows no token here"
        );
        let keep = Tensor::from_slice(&keep)
            .to_device(logits.device())
            .view([1, -1]);
        Ok(logits.masked_fill(&keep.logical_not(), f64::NEG_INFINITY))
    }

    /// Take the chosen token (not `<eop>`, which ends the reply).
    pub fn advance(&mut self, token: i64) -> Result<()> {
        self.matcher
            .consume_token(token as u32)
            .map_err(|e| anyhow::anyhow!("structured output: {e}"))
    }

    /// Whether the grammar is complete: nothing but the end may follow.
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_compile_and_bad_schemas_do_not() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/reference/tokenizer/ice_text.model");
        if !path.is_file() {
            assert!(
                std::env::var("CI").is_err(),
                "{} is missing",
                path.display()
            );
            return;
        }
        let tok = ChatGlmTokenizer::from_path(&path).unwrap();
        let g = Grammars::new(&tok, ids::EMBEDDING_ROWS as usize).unwrap();
        assert!(g.constraint(&ResponseFormat::JsonObject).is_ok());
        let bad = ResponseFormat::JsonSchema(serde_json::json!({"type": "no-such-type"}));
        assert!(g.constraint(&bad).is_err());
    }
}
