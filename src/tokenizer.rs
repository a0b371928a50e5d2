//! ChatGLM-6B's tokenizer (`ChatGLMTokenizer` / `SPTokenizer` over `ice_text.model`), rebuilt on
//! the `tokenizers` crate.
//!
//! Reference: docs/reference.md §3 (HF `THUDM/chatglm-6b` `tokenization_chatglm.py`, slim vocab,
//! `num_image_tokens = 0`, so a token id is the sentencepiece piece id).
//!
//! The sentencepiece model is a Unigram model with the `nmt_nfkc` precompiled charsmap,
//! `add_dummy_prefix`, `remove_extra_whitespaces` and byte fallback. ChatGLM first rewrites the text
//! (`\n` → `<n>`, `\t` → `<|tab|>`, runs of k = 80…2 spaces → `<|blank_k|>`, longest first) and
//! then runs sentencepiece. All of that is expressed as a `tokenizers` pipeline, so the result can be
//! saved as a self-contained `tokenizer.json`:
//!
//! * normalizer: the ChatGLM rewrites as literal `Replace`s, the precompiled charsmap, collapse of
//!   space runs, strip, the dummy prefix `▁` (a zero-width regex `Replace` at the start) and
//!   spaces → `▁`;
//! * user-defined pieces (`<n>`, `<|tab|>`, `<|blank_k|>`) are added tokens matched on the
//!   normalized text (sentencepiece never splits them); control pieces are special added tokens;
//! * model: `Unigram` with the piece scores and byte fallback, over whole segments (no splitting on
//!   `▁`, as sentencepiece runs its lattice over the whole normalized string);
//!
//! One case a bare `tokenizer.json` cannot express: text that *starts* with a user-defined piece
//! gets sentencepiece's dummy prefix as a separate `▁` (id 5) in front; [`ChatGlmTokenizer::encode`]
//! adds it.
//! * decoder: `▁` → space, byte fallback, fuse, strip the dummy-prefix space, then ChatGLM's
//!   reverse rewrites.

use std::path::Path;

use anyhow::{bail, Context, Result};
use sentencepiece_model::{SentencePieceModel, Type};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip as DecoderStrip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::precompiled::Precompiled;
use tokenizers::normalizers::replace::{Replace, ReplacePattern};
use tokenizers::normalizers::{NormalizerWrapper, Sequence, Strip};
use tokenizers::{AddedToken, Tokenizer};

/// Token ids of ChatGLM-6B (spec §3 table).
pub mod ids {
    pub const UNK: i64 = 0;
    pub const PAD: i64 = 3;
    pub const NEWLINE: i64 = 4;
    pub const MASK: i64 = 130000;
    pub const GMASK: i64 = 130001;
    pub const SOP: i64 = 130004;
    pub const EOP: i64 = 130005;
    /// Rows of the model's word-embedding table (the tokenizer itself has 130,344 pieces).
    pub const EMBEDDING_ROWS: i64 = 130528;
}

const MAX_BLANK: usize = 80;

fn blank_token(k: usize) -> String {
    format!("<|blank_{k}|>")
}

/// ChatGLM's tokenizer. Cheap to clone (the inner tokenizer is shared).
#[derive(Clone)]
pub struct ChatGlmTokenizer {
    /// The full tokenizer (control pieces as special tokens): decoding and `tokenizer.json`.
    inner: std::sync::Arc<Tokenizer>,
    /// The same pipeline for encoding text, without control pieces: see [`text_only`].
    encoder: std::sync::Arc<Tokenizer>,
    /// Ids of the user-defined pieces (`<n>`, `<|tab|>`, `<|blank_k|>`).
    user_defined: std::sync::Arc<std::collections::HashSet<u32>>,
    /// `get_vocab_size(true)`, which builds the whole vocabulary map, computed once.
    vocab_size: usize,
}

impl ChatGlmTokenizer {
    /// Load either a sentencepiece `.model` (ChatGLM's `ice_text.model`) or a `tokenizer.json`
    /// previously written by [`ChatGlmTokenizer::save`]. A directory is searched for `tokenizer.json`
    /// and then `ice_text.model`.
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            for name in ["tokenizer.json", "ice_text.model"] {
                let p = path.join(name);
                if p.is_file() {
                    return Self::from_path(&p);
                }
            }
            bail!(
                "{}: no tokenizer.json or ice_text.model in this folder",
                path.display()
            );
        }
        let is_json = path.extension().is_some_and(|e| e == "json");
        if is_json {
            crate::io::check_regular(path, crate::io::MAX_CONFIG_BYTES)?;
            let t = Tokenizer::from_file(path)
                .map_err(|e| anyhow::anyhow!("{}: not a tokenizer.json: {e}", path.display()))?;
            Self::wrap(t)
        } else {
            Self::from_sentencepiece(path)
        }
    }

    /// Build from a sentencepiece model file.
    pub fn from_sentencepiece(path: &Path) -> Result<Self> {
        let bytes = crate::io::read_bytes_capped(path, crate::io::MAX_CONFIG_BYTES)?;
        let model = SentencePieceModel::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: not a sentencepiece model: {e}", path.display()))?;
        Self::from_model(&model)
            .with_context(|| format!("building tokenizer from {}", path.display()))
    }

    fn from_model(model: &SentencePieceModel) -> Result<Self> {
        let trainer = model.trainer().context("model has no trainer spec")?;
        if trainer.model_type() != sentencepiece_model::ModelType::Unigram {
            bail!(
                "expected a Unigram sentencepiece model, found {:?}",
                trainer.model_type()
            );
        }
        let norm = model.normalizer().context("model has no normalizer spec")?;
        let mut vocab = Vec::with_capacity(model.pieces().len());
        let mut user_defined = Vec::new();
        let mut control = Vec::new();
        let mut unk_id = None;
        for (i, p) in model.pieces().iter().enumerate() {
            let piece = p.piece().to_string();
            match p.r#type() {
                Type::UserDefined => user_defined.push(piece.clone()),
                Type::Control => control.push(piece.clone()),
                Type::Unknown => {
                    unk_id = Some(i);
                    control.push(piece.clone());
                }
                _ => {}
            }
            vocab.push((piece, p.score() as f64));
        }
        let byte_fallback = trainer.byte_fallback();
        let unigram = Unigram::from(vocab, unk_id, byte_fallback)
            .map_err(|e| anyhow::anyhow!("unigram model: {e}"))?;

        let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
        let lit = |from: &str, to: &str| -> Result<NormalizerWrapper> {
            Ok(Replace::new(from.to_string(), to)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .into())
        };
        // ChatGLM's SPTokenizer._preprocess, in its order.
        normalizers.push(lit("\n", "<n>")?);
        normalizers.push(lit("\t", "<|tab|>")?);
        for k in (2..=MAX_BLANK).rev() {
            normalizers.push(lit(&" ".repeat(k), &blank_token(k))?);
        }
        // sentencepiece's own normalization.
        if let Some(map) = norm
            .precompiled_charsmap
            .as_deref()
            .filter(|m| !m.is_empty())
        {
            let pre =
                Precompiled::from(map).map_err(|e| anyhow::anyhow!("precompiled charsmap: {e}"))?;
            normalizers.push(NormalizerWrapper::Precompiled(pre));
        }
        if norm.remove_extra_whitespaces() {
            normalizers.push(
                Replace::new(ReplacePattern::Regex(" {2,}".into()), " ")
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .into(),
            );
            normalizers.push(NormalizerWrapper::StripNormalizer(Strip::new(true, true)));
        }
        if norm.add_dummy_prefix() {
            // The dummy prefix, as a zero-width match at the start of non-empty text. It must not
            // fire on text that starts with a user-defined piece: `tokenizers` also runs the
            // normalizer over the added tokens' own contents to get the patterns it looks for,
            // and `<n>` has to stay `<n>` there (see `encode` for the prefix in that case).
            let regex = format!(
                r"^(?=.)(?!{})",
                user_defined
                    .iter()
                    .map(|u| regex_escape(u))
                    .collect::<Vec<_>>()
                    .join("|")
            );
            normalizers.push(
                Replace::new(ReplacePattern::Regex(regex), "▁")
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .into(),
            );
        }
        normalizers.push(lit(" ", "▁")?);

        let mut decoders: Vec<DecoderWrapper> = vec![
            Replace::new("▁", " ")
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .into(),
            ByteFallback::default().into(),
            Fuse::default().into(),
        ];
        if norm.add_dummy_prefix() {
            decoders.push(DecoderStrip::new(' ', 1, 0).into());
        }
        let dec = |from: &str, to: &str| -> Result<DecoderWrapper> {
            Ok(Replace::new(from.to_string(), to)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .into())
        };
        decoders.push(dec("<n>", "\n")?);
        decoders.push(dec("<|tab|>", "\t")?);
        for k in (2..=MAX_BLANK).rev() {
            decoders.push(dec(&blank_token(k), &" ".repeat(k))?);
        }

        let mut tok = Tokenizer::new(unigram);
        tok.with_normalizer(Some(Sequence::new(normalizers)));

        tok.with_decoder(Some(DecoderSequence::new(decoders)));
        let user: Vec<AddedToken> = user_defined
            .iter()
            .map(|s| AddedToken::from(s.clone(), false).normalized(true))
            .collect();
        tok.add_tokens(&user);
        let special: Vec<AddedToken> = control
            .iter()
            .map(|s| AddedToken::from(s.clone(), true).normalized(false))
            .collect();
        tok.add_special_tokens(&special);
        Self::wrap(tok)
    }

    fn wrap(tok: Tokenizer) -> Result<Self> {
        let user_defined = tok
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| !t.special)
            .map(|(&id, _)| id)
            .collect();
        let vocab_size = tok.get_vocab_size(true);
        let encoder = text_only(&tok)?;
        Ok(Self {
            inner: std::sync::Arc::new(tok),
            encoder: std::sync::Arc::new(encoder),
            user_defined: std::sync::Arc::new(user_defined),
            vocab_size,
        })
    }

    /// Write a self-contained `tokenizer.json` (atomically: temp file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| anyhow::anyhow!("serializing tokenizer: {e}"))?;
        crate::io::write_atomic(path, json.as_bytes())
    }

    /// `ChatGLMTokenizer.encode(text, add_special_tokens=False)`.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .encoder
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
        let mut ids: Vec<i64> = Vec::with_capacity(enc.len() + 1);
        // When the text starts with a user-defined piece (a newline, tab or run of spaces),
        // sentencepiece still puts the dummy prefix in front, as its own piece `▁` (id 5), which
        // the normalizer cannot (it would change the added tokens' patterns too): add it here.
        if let Some(&id) = enc.get_ids().first() {
            if self.user_defined.contains(&id) {
                ids.push(self.dummy_prefix_id());
            }
        }
        ids.extend(enc.get_ids().iter().map(|&i| i as i64));
        Ok(ids)
    }

    fn dummy_prefix_id(&self) -> i64 {
        self.inner.token_to_id("▁").map(|i| i as i64).unwrap_or(5)
    }

    /// `ChatGLMTokenizer.decode(ids)`: pad ids dropped, control tokens decode to nothing.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let n = self.vocab_size() as i64;
        let ids: Vec<u32> = ids
            .iter()
            .filter(|&&i| i != ids::PAD && i >= 0 && i < n)
            .map(|&i| i as u32)
            .collect();
        self.inner
            .decode(&ids, true)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }

    /// The sentencepiece pieces of `text` (for debugging and tests).
    pub fn pieces(&self, text: &str) -> Result<Vec<String>> {
        Ok(self
            .encode(text)?
            .iter()
            .map(|&i| self.inner.id_to_token(i as u32).unwrap_or_default())
            .collect())
    }

    /// Number of pieces (130,344 for ChatGLM-6B).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The control pieces' strings (`[gMASK]`, `<sop>`, `<eop>`, `<s>`, …): text never encodes to
    /// them ([`ChatGlmTokenizer::encode`]); prompt templates place their ids.
    pub fn control_pieces(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inner
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special)
            .map(|t| t.content.clone())
            .collect();
        v.sort();
        v
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(|i| i as i64)
    }

    /// What each id below [`ChatGlmTokenizer::vocab_size`] decodes to, as bytes, and whether it
    /// is a control piece (for constrained decoding, which matches a grammar against bytes): a
    /// piece's `▁` is a space, `<0xNN>` the byte NN, `<n>` / `<|tab|>` / `<|blank_k|>` a line
    /// break / a tab / k spaces, a control piece its own name. The pieces of a text, concatenated,
    /// are its decoding with the dummy prefix's space in front ([`ChatGlmTokenizer::decode`]
    /// drops that space).
    pub fn token_bytes(&self) -> Vec<(Vec<u8>, bool)> {
        let control: std::collections::HashSet<u32> = self
            .inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        (0..self.vocab_size as u32)
            .map(|id| {
                let piece = self.inner.id_to_token(id).unwrap_or_default();
                if control.contains(&id) {
                    return (piece.into_bytes(), true);
                }
                let byte = piece
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .filter(|h| h.len() == 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                let bytes = if let Some(b) = byte {
                    vec![b]
                } else if piece == "<n>" {
                    b"\n".to_vec()
                } else if piece == "<|tab|>" {
                    b"\t".to_vec()
                } else if let Some(k) = piece
                    .strip_prefix("<|blank_")
                    .and_then(|k| k.strip_suffix("|>"))
                    .and_then(|k| k.parse::<usize>().ok())
                {
                    vec![b' '; k]
                } else {
                    piece.replace('▁', " ").into_bytes()
                };
                (bytes, false)
            })
            .collect()
    }
}

/// The encoding pipeline for user text: sentencepiece never turns text into a control piece
/// (`[gMASK]`, `<sop>`, `<eop>`, `<s>`, …) — SPTokenizer tokenizes such strings as the literal
/// characters — so the special added tokens are dropped and the control pieces' scores put out of
/// the Unigram lattice's reach. Control ids then appear only where a prompt template places them.
fn text_only(tok: &Tokenizer) -> Result<Tokenizer> {
    let mut v: serde_json::Value = serde_json::from_str(
        &tok.to_string(false)
            .map_err(|e| anyhow::anyhow!("serializing tokenizer: {e}"))?,
    )?;
    let mut control = Vec::new();
    if let Some(added) = v["added_tokens"].as_array_mut() {
        added.retain(|t| {
            let special = t["special"].as_bool().unwrap_or(false);
            if special {
                control.extend(t["id"].as_u64());
            }
            !special
        });
    }
    let vocab = v["model"]["vocab"]
        .as_array_mut()
        .context("tokenizer.json: the model has no Unigram vocab")?;
    for id in control {
        if let Some(score) = vocab.get_mut(id as usize).and_then(|p| p.get_mut(1)) {
            *score = serde_json::json!(-1e9);
        }
    }
    v.to_string()
        .parse::<Tokenizer>()
        .map_err(|e| anyhow::anyhow!("building the text encoder: {e}"))
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .map(|c| {
            if "\\.+*?()|[]{}^$#&-~".contains(c) {
                format!("\\{c}")
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn is_cjk(c: char) -> bool {
    ('\u{4e00}'..='\u{9fff}').contains(&c)
}

/// ChatGLM's `process_response`: strip, `[[训练时间]]` → `2023年`, and ASCII `, ! : ; ?` next to a
/// CJK character (U+4E00–U+9FFF) → full width. Same left-to-right, non-overlapping semantics as
/// the reference's sequence of `re.sub` calls.
pub fn process_response(response: &str) -> String {
    let s = response.trim().replace("[[训练时间]]", "2023年");
    let mut chars: Vec<char> = s.chars().collect();
    for (half, full) in [
        (',', '，'),
        ('!', '！'),
        (':', '：'),
        (';', '；'),
        ('?', '？'),
    ] {
        // ([CJK])half → \1full
        let mut i = 0;
        while i + 1 < chars.len() {
            if is_cjk(chars[i]) && chars[i + 1] == half {
                chars[i + 1] = full;
                i += 2;
            } else {
                i += 1;
            }
        }
        // half([CJK]) → full\1
        let mut i = 0;
        while i + 1 < chars.len() {
            if chars[i] == half && is_cjk(chars[i + 1]) {
                chars[i] = full;
                i += 2;
            } else {
                i += 1;
            }
        }
    }
    chars.into_iter().collect()
}

/// Where a tokenizer is looked for when none is named: `$XRAYGLM_TOKENIZER`, then these paths
/// relative to the current directory.
pub const SEARCH_PATHS: [&str; 3] = [
    "checkpoints/tokenizer/tokenizer.json",
    "checkpoints/tokenizer/ice_text.model",
    "../shared/reference/tokenizer/ice_text.model",
];

/// The tokenizer file to use: `explicit` when given, else the first that exists of
/// `$XRAYGLM_TOKENIZER` and [`SEARCH_PATHS`].
/// Where to get the tokenizer, for "no tokenizer" errors.
pub const HOW_TO_GET: &str = "ice_text.model ships with THUDM/chatglm-6b: \
    huggingface-cli download THUDM/chatglm-6b ice_text.model --local-dir checkpoints/tokenizer";

pub fn find(explicit: Option<&Path>) -> Option<std::path::PathBuf> {
    if let Some(p) = explicit.filter(|p| !p.as_os_str().is_empty()) {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("XRAYGLM_TOKENIZER").filter(|p| !p.is_empty()) {
        return Some(p.into());
    }
    SEARCH_PATHS
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_response_matches_reference_rules() {
        assert_eq!(
            process_response("  答:心脏正常,肺部清晰?  "),
            "答：心脏正常，肺部清晰？"
        );
        assert_eq!(process_response("a,b: c"), "a,b: c");
        assert_eq!(process_response("[[训练时间]]"), "2023年");
        // Non-overlapping like re.sub: only the first of a doubled comma follows the CJK char,
        // the second is then caught by the `half([CJK])` pass.
        assert_eq!(process_response("中,,文"), "中，，文");
        assert_eq!(process_response("X,心"), "X，心");
    }
}
