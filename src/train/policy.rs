//! What GRPO and DPO share: a record's prompt and an answer's ids as training builds them, the
//! replies after their prompts as one batch ([`PolicyBatch`]), and the frozen reference policy
//! ([`Reference`]) whose log-probabilities anchor the policy.

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

use crate::data::sample::{Sample, SampleBuilder};
use crate::infer::engine::rollout::{Rollout, RolloutPrompt};
use crate::model::chatglm::{ImageAt, LabelLogps};
use crate::model::positions::{self, Prefix};
use crate::model::visualglm::{BatchInputs, Images, VisualGlm, IGNORE};
use crate::tokenizer::ids;

/// A training sample's prompt part (its films' blocks, the earlier turns, the question,
/// `[gMASK]`, `<sop>`) with its films' embeddings `[films, image_length, hidden]`.
pub fn prompt_of_sample(s: &Sample, embeds: Option<Tensor>) -> RolloutPrompt {
    RolloutPrompt {
        ids: s.input_ids[..=s.context_length].to_vec(),
        prefix: s.prefix(),
        image_starts: s.image_starts.iter().map(|&i| i as i64).collect(),
        embeds,
    }
}

/// A record's prompt for rollouts or pairs ([`prompt_of_sample`] of its training sample). A prompt
/// followed by [`answer_ids`] and `<eop>` is the training sample of that answer.
pub fn prompt_of(
    builder: &SampleBuilder,
    films: usize,
    history: &[(String, String)],
    question: &str,
    embeds: Option<Tensor>,
) -> Result<RolloutPrompt> {
    let s = builder.build_for(films, history, question, "")?;
    Ok(prompt_of_sample(&s, embeds))
}

/// An answer's token ids, cut where training cuts a target (`sample.max_target_length − 2`).
pub fn answer_ids(builder: &SampleBuilder, answer: &str) -> Result<Vec<i64>> {
    let mut ids = builder.tokenizer().encode(answer)?;
    ids.truncate(builder.config().max_target_length.saturating_sub(2));
    Ok(ids)
}

/// Replies as a training batch: each prompt followed by its reply (and `<eop>` when it ended),
/// right-padded, the reply's tokens the labels. The prompts' films are held once per prompt and
/// placed in every row of that prompt.
pub struct PolicyBatch {
    input_ids: Tensor,
    labels: Tensor,
    position_ids: Tensor,
    context_lengths: Vec<i64>,
    /// The prompts' films `[films, image_length, hidden]` in prompt order (no graph), and for each
    /// film slot of the batch the index of its film.
    films: Tensor,
    film_index: Tensor,
    image_at: Vec<(i64, i64)>,
    rows: usize,
}

impl PolicyBatch {
    pub fn new(model: &VisualGlm, prompts: &[RolloutPrompt], replies: &[Rollout]) -> Result<Self> {
        let dev = model.device();
        let seqs: Vec<(Vec<i64>, usize)> = replies
            .iter()
            .map(|r| {
                let p = &prompts[r.prompt];
                let mut s = p.ids.clone();
                s.extend(&r.tokens);
                if r.ended {
                    s.push(ids::EOP);
                }
                (s, p.ids.len())
            })
            .collect();
        let len = seqs.iter().map(|(s, _)| s.len()).max().unwrap_or(1);
        let (mut input, mut labels) = (Vec::new(), Vec::new());
        for (s, prompt_len) in &seqs {
            for i in 0..len {
                let t = s.get(i).copied();
                input.push(t.unwrap_or(ids::PAD));
                labels.push(match t {
                    Some(t) if i >= *prompt_len => t,
                    _ => IGNORE,
                });
            }
        }
        // Each prompt's films once, in prompt order; each row's slots point at its prompt's.
        let mut films = Vec::new();
        let mut first_film = Vec::with_capacity(prompts.len());
        for p in prompts {
            first_film.push(films.len() as i64);
            if let Some(e) = &p.embeds {
                ensure!(
                    e.size()[0] as usize == p.image_starts.len(),
                    "a prompt's films and image slots differ in number"
                );
                films.extend((0..e.size()[0]).map(|i| e.get(i)));
            }
        }
        let (mut film_index, mut image_at) = (Vec::new(), Vec::new());
        for (row, r) in replies.iter().enumerate() {
            let p = &prompts[r.prompt];
            if p.embeds.is_some() {
                for (k, &s) in p.image_starts.iter().enumerate() {
                    film_index.push(first_film[r.prompt] + k as i64);
                    image_at.push((row as i64, s));
                }
            }
        }
        let s = &model.cfg.sat;
        let films = if films.is_empty() {
            Tensor::zeros([0, s.image_length, s.hidden_size], (model.kind(), dev))
        } else {
            Tensor::stack(&films, 0).to_device(dev)
        };
        let b = replies.len() as i64;
        let prefixes: Vec<Prefix> = replies.iter().map(|r| prompts[r.prompt].prefix).collect();
        Ok(Self {
            input_ids: Tensor::from_slice(&input)
                .view([b, len as i64])
                .to_device(dev),
            labels: Tensor::from_slice(&labels)
                .view([b, len as i64])
                .to_device(dev),
            position_ids: positions::batch(&prefixes, len as i64, dev),
            context_lengths: prefixes.iter().map(|p| p.context_length).collect(),
            films,
            film_index: Tensor::from_slice(&film_index).to_device(dev),
            image_at,
            rows: replies.len(),
        })
    }

    /// The film embeddings of every slot: the prompts' own, or `films` (the same films encoded
    /// again with a graph, so that adapters on the vision side learn).
    pub fn slot_embeds(&self, films: Option<&Tensor>) -> Tensor {
        films
            .unwrap_or(&self.films)
            .index_select(0, &self.film_index)
    }

    /// The batch's inputs with `embeds` ([`PolicyBatch::slot_embeds`]) in its film slots.
    pub fn inputs<'a>(&'a self, embeds: &'a Tensor) -> BatchInputs<'a> {
        BatchInputs {
            input_ids: &self.input_ids,
            images: Images::Embeds(embeds),
            image_at: if self.image_at.is_empty() {
                ImageAt::Slots(&[])
            } else {
                ImageAt::of(&self.image_at, self.rows)
            },
            position_ids: &self.position_ids,
            context_lengths: &self.context_lengths,
            labels: &self.labels,
        }
    }

    /// The policy's per-token log-probs of the replies at `temperature`, with the graph (train
    /// mode). With `pixels` (the prompts' films `[films, 3, S, S]` in prompt order) the films are
    /// encoded again with the graph, so that adapters on the vision side learn. `entropy`: whether
    /// to compute each token's entropy too.
    pub fn policy_logps(
        &self,
        model: &VisualGlm,
        pixels: Option<&Tensor>,
        temperature: f64,
        entropy: bool,
    ) -> LabelLogps {
        let films = pixels.map(|p| model.encode_image(&p.to_kind(model.kind()), true).2);
        let embeds = self.slot_embeds(films.as_ref());
        model.label_logps(&self.inputs(&embeds), true, temperature, entropy)
    }

    /// Reply tokens per row `[B]` (the end token included).
    pub fn tokens_per_row(&self) -> Tensor {
        self.labels
            .narrow(1, 1, self.labels.size()[1] - 1)
            .ne(IGNORE)
            .sum_dim_intlist(-1, false, Kind::Float)
    }
}

/// The frozen reference policy: the adapters a run starts from (the KL term's and DPO's `π_ref`).
pub struct Reference {
    weights: Vec<(String, Tensor)>,
}

impl Reference {
    /// A copy of the model's adapters now.
    pub fn snapshot(model: &VisualGlm) -> Self {
        let mut weights: Vec<(String, Tensor)> = model
            .lora
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.detach().copy()))
            .collect();
        weights.sort_by(|a, b| a.0.cmp(&b.0));
        Self { weights }
    }

    /// The reference as adapters of their own (a store and one set per ChatGLM layer), to run
    /// beside the policy's in one batch through per-row routing.
    pub fn layers(
        &self,
        model: &VisualGlm,
    ) -> (tch::nn::VarStore, Vec<crate::model::chatglm::LayerLoras>) {
        let store = tch::nn::VarStore::new(model.device());
        let layers = (0..model.cfg.sat.num_layers)
            .map(|i| crate::model::chatglm::layer_loras(&store.root(), &model.cfg, i))
            .collect();
        let vars = store.variables();
        tch::no_grad(|| {
            for (k, w) in &self.weights {
                if let Some(v) = vars.get(k) {
                    v.shallow_clone().copy_(w);
                }
            }
        });
        (store, layers)
    }

    /// Per-token label log-probs of `batch` under the reference at `temperature` (eval mode, no
    /// graph): one extra forward with the reference's adapters swapped in — the films encoded
    /// again by them when `pixels` are given (adapters on the vision side) — and the policy's put
    /// back.
    pub fn logps(
        &self,
        model: &VisualGlm,
        batch: &PolicyBatch,
        pixels: Option<&Tensor>,
        temperature: f64,
    ) -> Tensor {
        let vars = model.lora.variables();
        tch::no_grad(|| {
            let mut current = Vec::with_capacity(self.weights.len());
            for (k, w) in &self.weights {
                let mut v = vars[k].shallow_clone();
                current.push(v.copy());
                v.copy_(w);
            }
            let films = pixels.map(|p| model.encode_image(&p.to_kind(model.kind()), false).2);
            let embeds = batch.slot_embeds(films.as_ref());
            let out = model.label_logps(&batch.inputs(&embeds), false, temperature, false);
            for ((k, _), c) in self.weights.iter().zip(&current) {
                vars[k].shallow_clone().copy_(c);
            }
            out.logps
        })
    }
}
