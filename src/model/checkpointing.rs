//! Per-layer activation checkpointing of ChatGLM (sat's `--checkpoint-activations`): the
//! forward keeps only each recomputed layer's input, the backward recomputes one layer at a time
//! with the same dropout masks.

use tch::{Kind, Tensor};

use super::chatglm::{ChatGlm, GlmInputs};

impl ChatGlm {
    /// With `layer_seed` set, each layer's dropout draws from a generator seeded with
    /// `layer_seed + layer`, so a recomputed layer reproduces its masks exactly.
    pub(crate) fn seed_layer(&self, i: usize) {
        if let Some(s) = self.layer_seed.get() {
            tch::manual_seed(s.wrapping_add(i as i64));
        }
    }

    /// Loss and LoRA gradients with per-layer activation checkpointing: the forward keeps only each
    /// recomputed layer's input; the backward recomputes one layer at a time and pulls the incoming
    /// gradient through it (`∂(y·g)/∂θ`). Layers past [`ChatGlm::recompute_layers`] keep their
    /// activations from the forward instead. Same gradients as `forward` + `backward`. The loss is
    /// [`ChatGlm::target_loss`] of `labels`; the value returned is unscaled.
    pub fn loss_backward_checkpointed(
        &self,
        inp: &GlmInputs,
        labels: &Tensor,
        train: bool,
        scale: f64,
    ) -> f64 {
        /// What the forward leaves for the backward of one layer.
        enum Saved {
            /// The layer's input: the layer runs again in the backward.
            Recompute(Tensor),
            /// The input (a leaf) and the output with its autograd graph.
            Kept(Tensor, Tensor),
            /// Below the lowest layer that trains: no backward.
            Below,
        }
        let recompute = self.recompute_layers.unwrap_or(self.layers.len());
        let (x0, pass) = self.prepare(inp, train, None);
        // Embeddings with a graph (adapters on the vision side): the gradient goes on into it.
        let embedded = x0.requires_grad().then(|| x0.shallow_clone());
        // The gradient reaches down to the lowest layer that trains (to the embeddings when they
        // take one): the layers below it run forward only, once.
        let first = if embedded.is_some() {
            0
        } else {
            let trains = self.lora_active;
            let lowest = self.layers.iter().position(|b| trains && b.trains());
            lowest.unwrap_or(self.layers.len())
        };
        let leaf = |x: &Tensor, i: usize| {
            if i > first || x.requires_grad() {
                x.detach().set_requires_grad(true)
            } else {
                x.detach()
            }
        };
        let mut saved = Vec::with_capacity(self.layers.len());
        let mut x = x0;
        for (i, block) in self.layers.iter().enumerate() {
            self.seed_layer(i);
            if i < first {
                x = tch::no_grad(|| block.forward(&x, &pass, None));
                saved.push(Saved::Below);
            } else if i < recompute {
                let y = tch::no_grad(|| block.forward(&x, &pass, None));
                saved.push(Saved::Recompute(x));
                x = y;
            } else {
                let input = leaf(&x, i);
                let y = block.forward(&input, &pass, None);
                x = y.detach();
                saved.push(Saved::Kept(input, y));
            }
        }
        let last = x.detach().set_requires_grad(true);
        let loss = self.target_loss(&last, labels);
        let value = loss.double_value(&[]);
        (loss * scale).backward();
        let mut g = last.grad();
        for (i, block) in self
            .layers
            .iter()
            .enumerate()
            .rev()
            .take(self.layers.len() - first)
        {
            let input = match saved.pop().unwrap() {
                Saved::Below => unreachable!("the backward stops at the lowest layer that trains"),
                Saved::Recompute(x) => {
                    let input = leaf(&x, i);
                    self.seed_layer(i);
                    let y = block.forward(&input, &pass, None);
                    (y * &g).sum(Kind::Float).backward();
                    input
                }
                Saved::Kept(input, y) => {
                    (y * &g).sum(Kind::Float).backward();
                    input
                }
            };
            if i > first {
                g = input.grad();
            } else if let Some(x0) = &embedded {
                (x0 * input.grad()).sum(Kind::Float).backward();
            }
        }
        value
    }
}
