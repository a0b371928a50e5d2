//! The frozen-vision feature cache: with the vision tower frozen and its dropout off, a film's
//! image embeddings (`[image_length, hidden]`, the output of `glm_proj`) are a fixed function of
//! its preprocessed pixels, so they are computed once and reused in later epochs instead of
//! running the ViT and Q-Former again. Kept in memory on the model's device for the run (the real
//! model: 32 × 4096 values per film, 256 KiB in bf16; 1.6 GiB for OpenI-zh's 6,423 films), keyed
//! by a hash of the preprocessed pixels, so any change of image or preprocessing misses. Each film
//! is encoded on its own the first time, which keeps training (and resuming) deterministic.
//!
//! XrayGLM trains with dropout 0.1 inside the vision tower (docs/reference.md §5.10); there the
//! embeddings differ at every step and the cache stays off.

use std::collections::HashMap;
use std::hash::Hasher;

use tch::Tensor;

use crate::model::visualglm::VisualGlm;

#[derive(Default)]
pub struct VisionCache {
    map: HashMap<u64, Tensor>,
    pub hits: u64,
    pub misses: u64,
}

fn key(pixels: &[f32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write_usize(pixels.len());
    for x in pixels {
        h.write_u32(x.to_bits());
    }
    h.finish()
}

impl VisionCache {
    /// A cache for a run whose vision side is frozen and without dropout (no adapters of its
    /// own): each film's embeddings are then computed once. `None` otherwise.
    pub fn for_run(cfg: &crate::config::Config) -> Option<Self> {
        (cfg.train.vision_cache && cfg.train_dropout().0 == 0.0 && !cfg.model.lora.targets.vision())
            .then(VisionCache::default)
    }

    /// Image embeddings `[B, image_length, hidden]` of a batch: `pixels` is the batch's
    /// `[B, 3, S, S]` buffer, `images` the same as a tensor on the model's device. A film not seen
    /// before is encoded alone (batch 1), so its embeddings are a function of the film only — a
    /// resumed run, which starts with an empty cache, gets the same numbers bit for bit.
    pub fn embeds(&mut self, model: &VisualGlm, pixels: &[f32], images: &Tensor) -> Tensor {
        let b = images.size()[0] as usize;
        let per = pixels.len() / b.max(1);
        let keys: Vec<u64> = pixels.chunks(per).map(key).collect();
        for (i, k) in keys.iter().enumerate() {
            if self.map.contains_key(k) {
                self.hits += 1;
                continue;
            }
            self.misses += 1;
            let one = images.narrow(0, i as i64, 1).to_kind(model.kind());
            let (_, _, e) = model.encode_image(&one, false);
            self.map.insert(*k, e.squeeze_dim(0));
        }
        let rows: Vec<&Tensor> = keys.iter().map(|k| &self.map[k]).collect();
        Tensor::stack(&rows, 0)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
