//! KV-cached incremental decoding on the shared model code, as sat 0.3.6's `filling_sequence`
//! with `CachedAutoregressiveMixin` runs it for XrayGLM's chat (docs/reference.md §7.3–7.4):
//!
//! * the first pass runs the whole prompt (the image spliced over its slots), with positions
//!   `0..ctx` then frozen at the `[gMASK]` index, block positions 0 then counting from `<sop>` = 1,
//!   and the mask bidirectional over the context (`ctx` = index of `<sop>` = length − 1);
//! * each later pass feeds one token per sequence at absolute index `i`: position = the `[gMASK]`
//!   index, block position = `i − ctx + 1`, attending to every cached key;
//! * only the last position's logits are computed and sampled; `<eop>` ends a sequence.
//!
//! Batches: prompts of equal length decode together (rows that finished leave the batch and
//! the cache); prompts of different lengths are grouped by length, so every row computes exactly
//! what it would alone.

use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};

use super::sampling::{Sampler, SamplingConfig};
use crate::model::chatglm::{GlmInputs, ImageAt};
use crate::model::positions::{self, Prefix};
use crate::model::visualglm::VisualGlm;

/// One sequence to continue.
pub struct Prompt {
    /// Token ids ending in `[gMASK] <sop>`.
    pub input_ids: Vec<i64>,
    /// `[V, image_length, hidden]` embeddings of its V films (see [`VisualGlm::encode_image`]),
    /// or none.
    pub image_embeds: Option<Tensor>,
    /// The first slot of each film's block (one film: `[3]`).
    pub image_starts: Vec<i64>,
}

#[derive(Debug, Clone)]
pub struct GenerateConfig {
    /// Prompt + reply tokens at most (sat's `max_length`).
    pub max_length: usize,
    /// Ids that end a reply (`<eop>`).
    pub end_tokens: Vec<i64>,
    pub sampling: SamplingConfig,
}

/// What a finished row produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// Reply ids, without the end token.
    pub tokens: Vec<i64>,
    /// Whether an end token was produced (false: max_length reached).
    pub ended: bool,
}

/// Generate replies for `prompts`. `on_token(row, id)` sees every token as it is chosen (for
/// streaming); rows are indices into `prompts`.
pub fn generate(
    model: &VisualGlm,
    prompts: &[Prompt],
    cfg: &GenerateConfig,
    mut on_token: impl FnMut(usize, i64),
) -> Result<Vec<Generated>> {
    let mut sampler = Sampler::new(cfg.sampling.clone())?;
    let mut out: Vec<Option<Generated>> = vec![None; prompts.len()];
    // Group by prompt length and image layout (stable: such prompts keep their order).
    let layout = |p: &Prompt| {
        (
            p.input_ids.len(),
            p.image_embeds.is_some(),
            p.image_starts.clone(),
        )
    };
    let mut keys: Vec<_> = prompts.iter().map(layout).collect();
    keys.sort_unstable();
    keys.dedup();
    for key in keys {
        let rows: Vec<usize> = (0..prompts.len())
            .filter(|&i| layout(&prompts[i]) == key)
            .collect();
        let res = generate_group(model, prompts, &rows, cfg, &mut sampler, &mut on_token)?;
        for (r, g) in rows.into_iter().zip(res) {
            out[r] = Some(g);
        }
    }
    Ok(out
        .into_iter()
        .map(|g| g.expect("every row decoded"))
        .collect())
}

fn generate_group(
    model: &VisualGlm,
    prompts: &[Prompt],
    rows: &[usize],
    cfg: &GenerateConfig,
    sampler: &mut Sampler,
    on_token: &mut impl FnMut(usize, i64),
) -> Result<Vec<Generated>> {
    let s = &model.cfg.sat;
    let dev = model.device();
    let len = prompts[rows[0]].input_ids.len();
    ensure!(len >= 2, "a prompt needs at least [gMASK] <sop>");
    ensure!(
        cfg.max_length as i64 <= s.max_sequence_length,
        "max_length {} is beyond the model's {} positions (max_sequence_length): use at most {}",
        cfg.max_length,
        s.max_sequence_length,
        s.max_sequence_length
    );
    ensure!(
        cfg.max_length > len,
        "max_length {} leaves no room after a {len}-token prompt",
        cfg.max_length
    );
    let starts = prompts[rows[0]].image_starts.clone();
    let with_image = prompts[rows[0]].image_embeds.is_some();
    let mut ids = Vec::with_capacity(rows.len() * len);
    let mut mask_pos = Vec::with_capacity(rows.len());
    for &r in rows {
        let p = &prompts[r];
        if p.input_ids[len - 1] != s.bos_token_id {
            bail!("prompt {r} does not end with <sop> ({})", s.bos_token_id);
        }
        if p.image_starts != starts || p.image_embeds.is_some() != with_image {
            bail!("prompts of one length must place their image alike");
        }
        // Positions freeze at the first [gMASK] (or [MASK] when there is none), as in training.
        let m = p
            .input_ids
            .iter()
            .position(|&t| t == s.gmask_token_id)
            .or_else(|| p.input_ids.iter().position(|&t| t == s.mask_token_id))
            .ok_or_else(|| anyhow::anyhow!("prompt {r} has no [gMASK]"))?;
        mask_pos.push(m as i64);
        ids.extend_from_slice(&p.input_ids);
    }
    let ids: Vec<&[i64]> = rows
        .iter()
        .map(|&r| prompts[r].input_ids.as_slice())
        .collect();
    let contexts: Vec<Prefix> = mask_pos
        .iter()
        .map(|&m| Prefix::new(len - 1, m as usize))
        .collect();
    let embeds = if with_image {
        let parts: Vec<Tensor> = rows
            .iter()
            .map(|&r| prompts[r].image_embeds.as_ref().unwrap().shallow_clone())
            .collect();
        Some(Tensor::cat(&parts, 0))
    } else {
        None
    };
    let (mut cache, mut logits) =
        model
            .chatglm
            .prefill(&ids, &contexts, embeds.as_ref(), &starts, None);
    // Live rows (indices into `rows`), their replies so far.
    let mut live: Vec<usize> = (0..rows.len()).collect();
    let mut replies: Vec<Vec<i64>> = vec![Vec::new(); rows.len()];
    let mut ended = vec![false; rows.len()];
    let mut next_index = len as i64;
    loop {
        let gen_live: Vec<&[i64]> = live.iter().map(|&i| replies[i].as_slice()).collect();
        let picks = sampler.next(&logits, &gen_live)?;
        let mut keep = Vec::new();
        for (j, (&i, &t)) in live.iter().zip(&picks).enumerate() {
            if cfg.end_tokens.contains(&t) {
                ended[i] = true;
            } else {
                replies[i].push(t);
                on_token(rows[i], t);
                keep.push(j);
            }
        }
        // The token just chosen sits at `next_index`; stop when the sequence is full.
        if keep.is_empty() || next_index + 1 >= cfg.max_length as i64 {
            break;
        }
        if keep.len() < live.len() {
            let k = Tensor::from_slice(&keep.iter().map(|&j| j as i64).collect::<Vec<_>>())
                .to_device(dev);
            cache.keep_rows(&k);
        }
        let tokens: Vec<i64> = keep.iter().map(|&j| picks[j]).collect();
        live = keep.iter().map(|&j| live[j]).collect();
        let n = live.len() as i64;
        let step_ids = Tensor::from_slice(&tokens).view([n, 1]).to_device(dev);
        let step: Vec<(Prefix, i64)> = live.iter().map(|&i| (contexts[i], next_index)).collect();
        let step_pos = positions::step(&step, dev);
        let empty_mask = Tensor::zeros([0], (Kind::Float, Device::Cpu));
        logits = tch::no_grad(|| {
            model.chatglm.forward_cached(
                &GlmInputs {
                    input_ids: &step_ids,
                    position_ids: &step_pos,
                    attention_mask: &empty_mask,
                    image_embeds: None,
                    image_at: ImageAt::EachRow(0),
                },
                None,
                &mut cache,
            )
        });
        next_index += 1;
    }
    Ok(replies
        .into_iter()
        .zip(ended)
        .map(|(tokens, ended)| Generated { tokens, ended })
        .collect())
}

/// Image embeddings `[B, image_length, hidden]` for preprocessed images `[B, 3, H, W]`.
pub fn image_embeds(model: &VisualGlm, images: &Tensor) -> Tensor {
    let img = images.to_device(model.device()).to_kind(model.kind());
    model.encode_image(&img, false).2
}
