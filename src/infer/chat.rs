//! Multi-turn chat about an X-ray, as XrayGLM's `chat()` builds it (docs/reference.md §7.2–7.6):
//!
//! * prompt text `<img></img>` + `问：{q}\n答：{r}\n` per past turn + `问：{query}\n答：`
//!   (English: `Q:`/`A:`); ids = `encode("<img>")` + image_length pads + `encode("</img>…")` +
//!   `[gMASK] <sop>`; without an image, `encode(text)` + `[gMASK] <sop>`;
//! * the image is preprocessed and encoded once per session and reused by later turns;
//! * several films (the views of one study) each get their own `<img>…</img>` block
//!   in order, as in training (`data::sample`); one film gives the reference's ids;
//! * the reply: `decode(prompt + reply)` → `process_response` → the text after the last answer
//!   marker (`答：` / `A:`).

use std::path::Path;

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use super::generate::{generate, image_embeds, GenerateConfig, Prompt};
use super::sampling::{SamplingConfig, ENGLISH_INVALID};
use crate::data::image::ImageProcessor;
use crate::model::visualglm::VisualGlm;
use crate::tokenizer::{ids, process_response, ChatGlmTokenizer};
use crate::weights::source::{load_model, LoadOptions};

/// XrayGLM's report question (README, `train_cli` examples).
pub const DEFAULT_PROMPT_ZH: &str = "详细描述这张胸部X光片的诊断结果";
pub const DEFAULT_PROMPT_EN: &str = "Describe the image.";

/// One finished exchange.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Turn {
    pub query: String,
    pub response: String,
}

/// A conversation: its films (encoded once, `[V, image_length, hidden]`) and its history.
#[derive(Default)]
pub struct Session {
    image: Option<Tensor>,
    pub history: Vec<Turn>,
}

impl Session {
    pub fn has_image(&self) -> bool {
        self.image.is_some()
    }

    /// Number of films attached.
    pub fn films(&self) -> usize {
        self.image.as_ref().map_or(0, |t| t.size()[0] as usize)
    }

    /// Forget the image and the history (`clear`).
    pub fn clear(&mut self) {
        self.image = None;
        self.history.clear();
    }
}

/// Decoding settings of one question.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatSettings {
    /// Prompt + reply tokens at most (XrayGLM: 2048).
    pub max_length: usize,
    pub english: bool,
    pub sampling: SamplingConfig,
}

impl Default for ChatSettings {
    fn default() -> Self {
        Self {
            max_length: 2048,
            english: false,
            sampling: SamplingConfig::default(),
        }
    }
}

/// Refuse a prompt of `prompt_len` tokens that leaves no room for a reply within `max_length`.
pub fn check_room(prompt_len: usize, max_length: usize) -> Result<()> {
    if prompt_len + 1 >= max_length {
        anyhow::bail!(
            "the conversation has {prompt_len} tokens, at the max_length of {max_length}: clear \
             it or raise max_length"
        );
    }
    Ok(())
}

/// `(question, answer)` pairs (a record's history) as turns.
pub fn turns(pairs: &[(String, String)]) -> Vec<Turn> {
    pairs
        .iter()
        .map(|(q, a)| Turn {
            query: q.clone(),
            response: a.clone(),
        })
        .collect()
}

/// The text after `<img></img>`: the history and the new question in the chat template.
pub fn prompt_text(history: &[Turn], query: &str, english: bool) -> String {
    use crate::data::sample::{chat_template, Language};
    let pairs: Vec<(String, String)> = history
        .iter()
        .map(|t| (t.query.clone(), t.response.clone()))
        .collect();
    let lang = if english {
        Language::English
    } else {
        Language::Chinese
    };
    chat_template(&pairs, query, lang)
}

/// A model, its tokenizer and image preprocessing, ready to answer.
pub struct ChatModel {
    pub model: VisualGlm,
    pub tokenizer: ChatGlmTokenizer,
    pub images: ImageProcessor,
    /// The question asked when none is given: the fixed prompt the model was fine-tuned with
    /// when its run's `config.toml` says so, else XrayGLM's [`DEFAULT_PROMPT_ZH`].
    pub default_prompt: String,
    img_open: Vec<i64>,
    img_close: Vec<i64>,
}

/// The fixed training question of the run a model folder came from, if it used one.
pub fn training_prompt(dir: &Path) -> Option<String> {
    let ck = crate::weights::source::resolve_run(dir);
    let candidates = [
        dir.join("config.toml"),
        ck.join("config.toml"),
        ck.parent()?.join("config.toml"),
    ];
    let path = candidates.iter().find(|p| p.is_file())?;
    let cfg = crate::config::Config::load(Some(path), &[]).ok()?;
    (cfg.data.prompt == crate::config::PromptMode::Fixed).then_some(cfg.data.fixed_prompt)
}

impl ChatModel {
    pub fn new(model: VisualGlm, tokenizer: ChatGlmTokenizer) -> Result<Self> {
        let size = model.cfg.sat.eva_args.image_size[0] as usize;
        let img_open = tokenizer.encode("<img>")?;
        let img_close = tokenizer.encode("</img>")?;
        Ok(Self {
            model,
            tokenizer,
            images: ImageProcessor {
                size,
                ..Default::default()
            },
            default_prompt: DEFAULT_PROMPT_ZH.to_string(),
            img_open,
            img_close,
        })
    }

    /// Load any model directory (ours, a training run folder, sat, HF). `merge_lora` folds the
    /// adapters into the frozen weights (faster; the same outputs).
    pub fn load(
        dir: &Path,
        tokenizer: ChatGlmTokenizer,
        opts: &LoadOptions,
        merge_lora: bool,
    ) -> Result<Self> {
        let t0 = std::time::Instant::now();
        let (mut model, report) = load_model(dir, opts)
            .with_context(|| format!("loading the model from {}", dir.display()))?;
        crate::errln!(
            "loaded {} tensors from {} in {:.1}s",
            report.loaded,
            dir.display(),
            t0.elapsed().as_secs_f64()
        );
        if merge_lora && model.cfg.lora.is_some() {
            model.merge_lora()?;
        }
        // libtorch's fused attention on every device: the same function as the reference's
        // op-by-op attention, faster to decode (small preset, bf16, CPU: 1.2x tokens/s).
        // `xrayglm parity --generate` keeps the reference's op order for token-exact checks.
        model.set_fused_attention(true);
        let mut chat = Self::new(model, tokenizer)?;
        if let Some(p) = training_prompt(dir) {
            chat.default_prompt = p;
        }
        Ok(chat)
    }

    /// One report per row of a batch, each about its own films (`films[r]`: `[V, image_length,
    /// hidden]`) answering its own question after its own earlier turns (`questions[r]` =
    /// (history, question); conversation records): one decoding call per distinct (number of
    /// films, history, question), at most `max_new_tokens` new tokens and never past the model's
    /// positions.
    pub fn answer_batch(
        &self,
        films: &[Tensor],
        questions: &[(&[(String, String)], &str)],
        settings: &ChatSettings,
        max_new_tokens: usize,
    ) -> Result<Vec<String>> {
        type Key<'k> = (i64, &'k [(String, String)], &'k str);
        let mut by_question: std::collections::BTreeMap<Key, Vec<usize>> = Default::default();
        for (row, (h, q)) in questions.iter().enumerate() {
            let v = films.get(row).map_or(0, |t| t.size()[0]);
            by_question.entry((v, h, q)).or_default().push(row);
        }
        let mut out = vec![String::new(); questions.len()];
        for ((views, history, query), rows) in by_question {
            let history = turns(history);
            let (ids, _) = self.prompt_ids(&history, query, settings.english, views as usize)?;
            let s = ChatSettings {
                max_length: (ids.len() + max_new_tokens).min(self.max_positions()),
                ..settings.clone()
            };
            let imgs: Vec<Tensor> = rows.iter().map(|&r| films[r].shallow_clone()).collect();
            for (&r, h) in rows
                .iter()
                .zip(self.answer_images_after(&imgs, &history, query, &s)?)
            {
                out[r] = h;
            }
        }
        Ok(out)
    }

    /// Image embeddings `[1, image_length, hidden]` of an encoded image file's bytes.
    pub fn encode_image_bytes(&self, bytes: &[u8]) -> Result<Tensor> {
        let px = self.images.process_bytes(bytes)?;
        let s = self.images.size as i64;
        let t = Tensor::from_slice(&px).view([1, 3, s, s]);
        Ok(tch::no_grad(|| image_embeds(&self.model, &t)))
    }

    /// Attach an image (file) to a session; it replaces the previous one and starts over.
    pub fn set_image_file(&self, session: &mut Session, path: &Path) -> Result<()> {
        self.set_image_files(session, &[path])
    }

    /// Attach several films (the views of one study, in order), replacing what was there.
    pub fn set_image_files(&self, session: &mut Session, paths: &[&Path]) -> Result<()> {
        let mut films = Vec::with_capacity(paths.len());
        for path in paths {
            let bytes = crate::io::read_bytes_capped(path, crate::io::MAX_IMAGE_BYTES)
                .with_context(|| format!("{}: cannot read image", path.display()))?;
            films.push(bytes);
        }
        let named: Vec<(String, &[u8])> = paths
            .iter()
            .zip(&films)
            .map(|(p, b)| (p.display().to_string(), b.as_slice()))
            .collect();
        self.set_named_images(session, &named)
    }

    pub fn set_image_bytes(&self, session: &mut Session, bytes: &[u8]) -> Result<()> {
        self.set_named_images(session, &[("the image".to_string(), bytes)])
    }

    /// Encode `(name, bytes)` films into a session (a bad one is named in the error).
    pub fn set_named_images(&self, session: &mut Session, films: &[(String, &[u8])]) -> Result<()> {
        anyhow::ensure!(!films.is_empty(), "no image given");
        let embeds = films
            .iter()
            .map(|(name, bytes)| {
                self.encode_image_bytes(bytes)
                    .with_context(|| format!("{name}: bad image"))
            })
            .collect::<Result<Vec<_>>>()?;
        session.image = Some(Tensor::cat(&embeds, 0));
        session.history.clear();
        Ok(())
    }

    /// Positions the model has (ChatGLM's `max_sequence_length`): the longest prompt + reply.
    pub fn max_positions(&self) -> usize {
        self.model.cfg.sat.max_sequence_length.max(0) as usize
    }

    /// Refuse a `max_length` (prompt + reply tokens) beyond the model's positions.
    pub fn check_max_length(&self, max_length: usize) -> Result<()> {
        let max = self.max_positions();
        if max_length > max {
            anyhow::bail!(
                "max_length {max_length} is beyond the model's {max} positions \
                 (max_sequence_length in its model_config.json): use at most {max}"
            );
        }
        Ok(())
    }

    /// Prompt ids and the first slot of each film's block for a question about `films` films
    /// (0: none; spec §7.3).
    pub fn prompt_ids(
        &self,
        history: &[Turn],
        query: &str,
        english: bool,
        films: usize,
    ) -> Result<(Vec<i64>, Vec<i64>)> {
        self.prompt_ids_with_system("", history, query, english, films)
    }

    /// [`ChatModel::prompt_ids`] with a system text in front of the first question (VisualGLM
    /// has no system role: the text and a line break go right after `</img>`; empty: none).
    pub fn prompt_ids_with_system(
        &self,
        system: &str,
        history: &[Turn],
        query: &str,
        english: bool,
        films: usize,
    ) -> Result<(Vec<i64>, Vec<i64>)> {
        let mut text = prompt_text(history, query, english);
        if !system.is_empty() {
            text = format!("{system}\n{text}");
        }
        let (mut ids, starts) = crate::data::sample::image_blocks(
            &self.img_open,
            &self.img_close,
            self.model.cfg.sat.image_length as usize,
            films,
        );
        let starts = starts.into_iter().map(|s| s as i64).collect();
        if films > 0 {
            text = format!("</img>{text}");
        }
        ids.extend(self.tokenizer.encode(&text)?);
        ids.push(ids::GMASK);
        ids.push(ids::SOP);
        Ok((ids, starts))
    }

    fn generate_config(&self, s: &ChatSettings) -> GenerateConfig {
        let mut sampling = s.sampling.clone();
        if s.english && !sampling.invalid.contains(&ENGLISH_INVALID) {
            sampling.invalid.push(ENGLISH_INVALID);
        }
        GenerateConfig {
            max_length: s.max_length,
            end_tokens: vec![ids::EOP],
            sampling,
        }
    }

    /// The reply text the reference shows: decode prompt + reply, `process_response`, keep what
    /// follows the last answer marker.
    pub fn response_text(&self, prompt: &[i64], reply: &[i64], english: bool) -> Result<String> {
        let all: Vec<i64> = prompt
            .iter()
            .chain(reply)
            .copied()
            .filter(|&t| t != ids::PAD)
            .collect();
        let text = process_response(&self.tokenizer.decode(&all)?);
        let marker = if english { "A:" } else { "答：" };
        Ok(match text.rfind(marker) {
            Some(i) => text[i + marker.len()..].trim().to_string(),
            None => text,
        })
    }

    /// Answer `query` in `session`, calling `on_text` with each new piece of the reply as it is
    /// produced; the turn joins the history. Returns the whole reply.
    pub fn ask(
        &self,
        session: &mut Session,
        query: &str,
        settings: &ChatSettings,
        mut on_text: impl FnMut(&str),
    ) -> Result<String> {
        let (ids, starts) =
            self.prompt_ids(&session.history, query, settings.english, session.films())?;
        check_room(ids.len(), settings.max_length)?;
        let prompt = Prompt {
            input_ids: ids.clone(),
            image_embeds: session.image.as_ref().map(|t| t.shallow_clone()),
            image_starts: starts,
        };
        let mut reply = Vec::new();
        let mut shown = String::new();
        let cfg = self.generate_config(settings);
        let tok = &self.tokenizer;
        generate(&self.model, &[prompt], &cfg, |_, t| {
            reply.push(t);
            // Stream what is stable: the processed text so far, when it extends what was shown.
            if let Ok(text) = tok.decode(&reply) {
                let text = process_response(&text);
                if text.starts_with(&shown) && text.len() > shown.len() {
                    on_text(&text[shown.len()..]);
                    shown = text;
                }
            }
        })?;
        let response = self.response_text(&ids, &reply, settings.english)?;
        session.history.push(Turn {
            query: query.to_string(),
            response: response.clone(),
        });
        Ok(response)
    }

    /// One report per image (batched decoding; no history): for evaluation.
    pub fn answer_images(
        &self,
        images: &[Tensor],
        query: &str,
        settings: &ChatSettings,
    ) -> Result<Vec<String>> {
        self.answer_images_after(images, &[], query, settings)
    }

    /// [`ChatModel::answer_images`] after the same earlier turns for every image (each entry
    /// `[V, image_length, hidden]`: one study's films; every entry the same V).
    pub fn answer_images_after(
        &self,
        images: &[Tensor],
        history: &[Turn],
        query: &str,
        settings: &ChatSettings,
    ) -> Result<Vec<String>> {
        let views = images.first().map_or(1, |t| t.size()[0] as usize);
        anyhow::ensure!(
            images.iter().all(|t| t.size()[0] as usize == views),
            "one call answers studies with the same number of films"
        );
        let (ids, starts) = self.prompt_ids(history, query, settings.english, views)?;
        let prompts: Vec<Prompt> = images
            .iter()
            .map(|img| Prompt {
                input_ids: ids.clone(),
                image_embeds: Some(img.shallow_clone()),
                image_starts: starts.clone(),
            })
            .collect();
        let out = generate(
            &self.model,
            &prompts,
            &self.generate_config(settings),
            |_, _| {},
        )?;
        out.iter()
            .map(|g| self.response_text(&ids, &g.tokens, settings.english))
            .collect()
    }

    /// Preprocessed images `[B, 3, H, W]` → embeddings, one `[1, L, hidden]` per image.
    pub fn embed_images(&self, pixels: &Tensor) -> Vec<Tensor> {
        let e = tch::no_grad(|| image_embeds(&self.model, &pixels.to_kind(Kind::Float)));
        (0..e.size()[0]).map(|i| e.narrow(0, i, 1)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_text_follows_the_reference_template() {
        let h = vec![Turn {
            query: "心脏大小？".into(),
            response: "正常。".into(),
        }];
        assert_eq!(
            prompt_text(&h, "有积液吗？", false),
            "问：心脏大小？\n答：正常。\n问：有积液吗？\n答："
        );
        assert_eq!(prompt_text(&[], "Describe.", true), "Q:Describe.\nA:");
    }
}
