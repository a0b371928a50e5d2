//! Training samples: token ids, labels, image slots and 2D position ids.
//!
//! Reference: docs/reference.md §1.c (position ids, mask) and §1.d (XrayGLM's `FewShotDataset`,
//! itself ChatGLM's `ptuning/main.py preprocess_function_train`):
//!
//! ```text
//! a_ids     = encode("<img>") + [pad]*32 + encode("</img>问：" + prompt + "\n答：")   (≤ max_source_length−1)
//! b_ids     = encode(label)                                                        (≤ max_target_length−2)
//! input_ids = a_ids + [gMASK, <sop>] + b_ids + [<eop>]
//! labels    = [−100]*context_length + input_ids[context_length:]     (context_length = index of <sop>)
//! ```
//! The 32 placeholder ids at `[pre_image, pre_image+32)` are replaced by image embeddings in the
//! model. Labels equal to pad become −100 when `ignore_pad_token_for_loss` (the default).
//!
//! Several films per sample (the views of one study) each get their own block, in order,
//! where VisualGLM puts its one image: `encode("<img>") + [pad]*32 + encode("</img>")` for every
//! film but the last, whose `</img>` stays in front of the question as above — so one film gives
//! exactly the reference's ids.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::tokenizer::{ids, ChatGlmTokenizer};

/// Label value the loss ignores.
pub use crate::model::visualglm::IGNORE;

/// Prompt language: the template around the question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Language {
    /// `问：{prompt}\n答：`
    #[default]
    Chinese,
    /// `Q:{prompt}\nA:`
    English,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleConfig {
    pub max_source_length: usize,
    pub max_target_length: usize,
    /// Number of image slots (VisualGLM: 32 Q-Former queries).
    pub image_length: usize,
    pub ignore_pad_token_for_loss: bool,
    pub language: Language,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            max_source_length: 64,
            max_target_length: 256,
            image_length: 32,
            ignore_pad_token_for_loss: true,
            language: Language::Chinese,
        }
    }
}

impl SampleConfig {
    /// The fixed padded length of the reference (`max_source_length + max_target_length` = 320).
    pub fn max_seq_len(&self) -> usize {
        self.max_source_length + self.max_target_length
    }
}

/// VisualGLM's chat template (spec §7.2): `问：{q}\n答：{r}\n` per earlier turn, then
/// `问：{query}\n答：` (English: `Q:` / `A:`). What `chat` asks with and what training on
/// conversations learns from.
pub fn chat_template(history: &[(String, String)], query: &str, language: Language) -> String {
    let (q, a) = match language {
        Language::Chinese => ("问：", "答："),
        Language::English => ("Q:", "A:"),
    };
    let mut s = String::new();
    for (question, answer) in history {
        s.push_str(&format!("{q}{question}\n{a}{answer}\n"));
    }
    s.push_str(&format!("{q}{query}\n{a}"));
    s
}

/// The image blocks of `films` films: `open + [pad]*image_length (+ close)` each, the last
/// without its `close` (it starts the text after it); with the first slot of each block.
pub fn image_blocks(
    open: &[i64],
    close: &[i64],
    image_length: usize,
    films: usize,
) -> (Vec<i64>, Vec<usize>) {
    let mut a = Vec::new();
    let mut starts = Vec::with_capacity(films);
    for k in 0..films {
        a.extend_from_slice(open);
        starts.push(a.len());
        a.extend(std::iter::repeat_n(ids::PAD, image_length));
        if k + 1 < films {
            a.extend_from_slice(close);
        }
    }
    (a, starts)
}

/// One unpadded sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// First slot of each film's block, in order (one film: `[3]`, the length of
    /// `encode("<img>")`).
    pub image_starts: Vec<usize>,
    pub image_length: usize,
    /// Index of `<sop>`: the bidirectional prefix is `[0, context_length)`.
    pub context_length: usize,
    /// Index of `[gMASK]` (= context_length − 1).
    pub mask_position: usize,
    /// Whether a or b was cut to its limit.
    pub truncated: bool,
}

impl Sample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of films.
    pub fn images(&self) -> usize {
        self.image_starts.len()
    }

    /// ChatGLM's 2D positions for the first `len` positions (the sample padded on the right):
    /// `position_ids[i] = i` before `<sop>` and `mask_position` from it on;
    /// `block_position_ids[i] = 0` before `<sop>` and `i − context_length + 1` from it on.
    pub fn position_ids(&self, len: usize) -> (Vec<i64>, Vec<i64>) {
        self.prefix().sequence(len as i64)
    }

    /// Where the sample's prefix ends and its `[gMASK]` is ([`crate::model::positions`]).
    pub fn prefix(&self) -> crate::model::positions::Prefix {
        crate::model::positions::Prefix::new(self.context_length, self.mask_position)
    }

    /// Input ids and labels right-padded to `len` (pad id 3; labels −100, or 3 when
    /// `ignore_pad_token_for_loss` is off, as the reference does).
    pub fn padded(&self, len: usize, ignore_pad: bool) -> (Vec<i64>, Vec<i64>) {
        assert!(
            len >= self.len(),
            "cannot pad a sample of {} tokens to {len}",
            self.len()
        );
        let mut input_ids = self.input_ids.clone();
        input_ids.resize(len, ids::PAD);
        let mut labels = self.labels.clone();
        labels.resize(len, if ignore_pad { IGNORE } else { ids::PAD });
        (input_ids, labels)
    }
}

/// Builds samples with the reference layout.
#[derive(Clone)]
pub struct SampleBuilder {
    tok: ChatGlmTokenizer,
    cfg: SampleConfig,
    img_open: Vec<i64>,
    img_close: Vec<i64>,
}

impl SampleBuilder {
    pub fn new(tok: ChatGlmTokenizer, cfg: SampleConfig) -> Result<Self> {
        if cfg.max_source_length < 2 || cfg.max_target_length < 3 {
            bail!("max_source_length must be ≥ 2 and max_target_length ≥ 3");
        }
        let img_open = tok.encode("<img>")?;
        if img_open.len() + cfg.image_length + 1 > cfg.max_source_length {
            bail!(
                "max_source_length {} leaves no room for the prompt after {} image slots",
                cfg.max_source_length,
                cfg.image_length
            );
        }
        let img_close = tok.encode("</img>")?;
        Ok(Self {
            tok,
            cfg,
            img_open,
            img_close,
        })
    }

    pub fn config(&self) -> &SampleConfig {
        &self.cfg
    }

    pub fn tokenizer(&self) -> &ChatGlmTokenizer {
        &self.tok
    }

    /// The text after the image: `</img>问：{prompt}\n答：` (or the English template).
    pub fn prompt_text(&self, prompt: &str) -> String {
        self.prompt_text_with(&[], prompt)
    }

    /// The text after the image with earlier turns: `</img>` + [`chat_template`].
    pub fn prompt_text_with(&self, history: &[(String, String)], prompt: &str) -> String {
        format!(
            "</img>{}",
            chat_template(history, prompt, self.cfg.language)
        )
    }

    /// `a_ids`: `<img>` tokens, image placeholders, then the prompt (not truncated).
    pub fn source_ids(&self, prompt: &str) -> Result<Vec<i64>> {
        self.source_ids_with(&[], prompt)
    }

    /// [`SampleBuilder::source_ids`] after earlier turns.
    pub fn source_ids_with(&self, history: &[(String, String)], prompt: &str) -> Result<Vec<i64>> {
        Ok(self.source_ids_for(1, history, prompt)?.0)
    }

    /// `a_ids` for `images` films (one `<img>` block each, in order) and the first slot of each.
    pub fn source_ids_for(
        &self,
        images: usize,
        history: &[(String, String)],
        prompt: &str,
    ) -> Result<(Vec<i64>, Vec<usize>)> {
        if images == 0 {
            bail!("a sample needs at least one film");
        }
        let (mut a, starts) = image_blocks(
            &self.img_open,
            &self.img_close,
            self.cfg.image_length,
            images,
        );
        // The text may be cut (max_source_length), the films never.
        if a.len() + 1 > self.cfg.max_source_length {
            bail!(
                "{images} films take {} tokens: sample.max_source_length must be at least {} (it is {})",
                a.len(),
                a.len() + 2,
                self.cfg.max_source_length
            );
        }
        a.extend(self.tok.encode(&self.prompt_text_with(history, prompt))?);
        Ok((a, starts))
    }

    /// A training sample for (prompt, label).
    pub fn build(&self, prompt: &str, label: &str) -> Result<Sample> {
        self.build_with_history(&[], prompt, label)
    }

    /// A training sample for the answer `label` to `prompt` after the turns of `history` (which
    /// are context, not targets: ChatGLM's prefix is bidirectional).
    pub fn build_with_history(
        &self,
        history: &[(String, String)],
        prompt: &str,
        label: &str,
    ) -> Result<Sample> {
        self.build_for(1, history, prompt, label)
    }

    /// [`SampleBuilder::build_with_history`] for a sample of `images` films.
    pub fn build_for(
        &self,
        images: usize,
        history: &[(String, String)],
        prompt: &str,
        label: &str,
    ) -> Result<Sample> {
        let (mut a, image_starts) = self.source_ids_for(images, history, prompt)?;
        let mut b = self.tok.encode(label)?;
        let mut truncated = false;
        if a.len() > self.cfg.max_source_length - 1 {
            a.truncate(self.cfg.max_source_length - 1);
            truncated = true;
        }
        if b.len() > self.cfg.max_target_length - 2 {
            b.truncate(self.cfg.max_target_length - 2);
            truncated = true;
        }
        let context_length = a.len() + 1;
        let mut input_ids = a;
        input_ids.push(ids::GMASK);
        input_ids.push(ids::SOP);
        input_ids.extend_from_slice(&b);
        input_ids.push(ids::EOP);
        let mut labels = vec![IGNORE; context_length];
        labels.extend_from_slice(&input_ids[context_length..]);
        if self.cfg.ignore_pad_token_for_loss {
            for l in labels.iter_mut() {
                if *l == ids::PAD {
                    *l = IGNORE;
                }
            }
        }
        Ok(Sample {
            input_ids,
            labels,
            image_starts,
            image_length: self.cfg.image_length,
            context_length,
            mask_position: context_length - 1,
            truncated,
        })
    }

    /// An inference prompt: `a_ids + [gMASK, <sop>]` (spec §7.3).
    pub fn build_prompt(&self, prompt: &str) -> Result<Sample> {
        let (mut input_ids, image_starts) = self.source_ids_for(1, &[], prompt)?;
        input_ids.push(ids::GMASK);
        input_ids.push(ids::SOP);
        let context_length = input_ids.len() - 1;
        Ok(Sample {
            labels: vec![IGNORE; input_ids.len()],
            input_ids,
            image_starts,
            image_length: self.cfg.image_length,
            context_length,
            mask_position: context_length - 1,
            truncated: false,
        })
    }
}
