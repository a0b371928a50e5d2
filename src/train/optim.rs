//! AdamW with decoupled weight decay and global gradient-norm clipping, written out so that its
//! arithmetic and state are explicit (exact resume; bitwise-comparable trajectories).
//!
//! Reference: docs/reference.md §5.3 — DeepSpeed `FusedAdam` with `adam_w_mode = True`
//! (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019), betas (0.9, 0.95), eps
//! 1e-8, weight decay 0.01 on every LoRA tensor, `gradient_clipping = 0.1` on the global L2 norm.
//! The update follows `torch.optim.AdamW`'s operation order:
//! `p ← p·(1 − lr·wd)`; `m ← β₁m + (1−β₁)g`; `v ← β₂v + (1−β₂)g²`;
//! `p ← p − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + eps)`.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One parameter with its moments.
pub struct Slot {
    pub name: String,
    pub param: Tensor,
    pub m: Tensor,
    pub v: Tensor,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    pub slots: Vec<Slot>,
    /// Completed optimizer steps (t in the bias corrections).
    pub step: i64,
}

impl AdamW {
    /// Over `params` (name, fp32 leaf tensor), sorted by name for a stable order.
    pub fn new(mut params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Self {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = params
            .into_iter()
            .map(|(name, param)| Slot {
                m: param.zeros_like(),
                v: param.zeros_like(),
                name,
                param,
            })
            .collect();
        Self {
            cfg,
            slots,
            step: 0,
        }
    }

    /// The parameters, in name order (the same on every rank).
    pub fn params(&self) -> impl Iterator<Item = &Tensor> + Clone {
        self.slots.iter().map(|s| &s.param)
    }

    /// Global L2 norm of the gradients (fp32), as a 0-d tensor (no host sync).
    pub fn grad_norm(&self) -> Tensor {
        let sq: Vec<Tensor> = self
            .slots
            .iter()
            .filter(|s| s.param.grad().defined())
            .map(|s| {
                s.param
                    .grad()
                    .to_kind(Kind::Float)
                    .pow_tensor_scalar(2)
                    .sum(Kind::Float)
            })
            .collect();
        if sq.is_empty() {
            return Tensor::from(0f32);
        }
        Tensor::stack(&sq, 0).sum(Kind::Float).sqrt()
    }

    /// Multiply every gradient by `factor`.
    pub fn scale_grads(&mut self, factor: f64) {
        tch::no_grad(|| {
            for s in &mut self.slots {
                let mut g = s.param.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(factor);
                }
            }
        });
    }

    /// Clip to `max_norm` the way DeepSpeed / `clip_grad_norm_` do: `g ← g · max/(‖g‖ + 1e-6)` when
    /// that factor is below 1. Returns the norm before clipping.
    pub fn clip(&mut self, max_norm: f64) -> f64 {
        let norm = self.grad_norm().double_value(&[]);
        if max_norm > 0.0 {
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                self.scale_grads(coef);
            }
        }
        norm
    }

    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            let mut g = s.param.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for s in &mut self.slots {
                let g = s.param.grad();
                if !g.defined() {
                    continue;
                }
                let g = g.to_kind(Kind::Float);
                let _ = s.param.g_mul_scalar_(1.0 - lr * c.weight_decay);
                let _ = s.m.g_mul_scalar_(c.beta1).g_add_(&(&g * (1.0 - c.beta1)));
                let _ =
                    s.v.g_mul_scalar_(c.beta2)
                        .g_add_(&(&g * &g * (1.0 - c.beta2)));
                let denom = s.v.sqrt() / bc2.sqrt() + c.eps;
                let update = &s.m / denom * (lr / bc1);
                let _ = s.param.g_sub_(&update);
            }
        });
    }

    /// Named state tensors for a checkpoint: `<param>.exp_avg`, `<param>.exp_avg_sq`.
    pub fn state_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for s in &self.slots {
            out.push((format!("{}.exp_avg", s.name), &s.m));
            out.push((format!("{}.exp_avg_sq", s.name), &s.v));
        }
        out
    }

    /// Restore moments saved by [`AdamW::state_tensors`].
    pub fn load_state(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        step: i64,
    ) -> Result<()> {
        for s in &mut self.slots {
            for (suffix, dst) in [("exp_avg", &mut s.m), ("exp_avg_sq", &mut s.v)] {
                let key = format!("{}.{suffix}", s.name);
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| anyhow::anyhow!("optimizer state lacks {key}"))?;
                anyhow::ensure!(
                    t.size() == dst.size(),
                    "optimizer state {key}: shape {:?} vs {:?}",
                    t.size(),
                    dst.size()
                );
                tch::no_grad(|| dst.copy_(t));
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_adamw_formula_by_hand() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![("p".into(), p.shallow_clone())],
            AdamWConfig::default(),
        );
        for step in 1..=3 {
            opt.zero_grad();
            (&p * &p).sum(Kind::Float).backward();
            opt.step(0.1);
            assert_eq!(opt.step, step);
        }
        // By hand, element 0: g = 2p each step.
        let (b1, b2, eps, wd, lr) = (0.9f64, 0.95f64, 1e-8, 0.01, 0.1);
        let (mut x, mut m, mut v) = (1.0f64, 0.0, 0.0);
        for t in 1..=3 {
            let g = 2.0 * x;
            x *= 1.0 - lr * wd;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            x -= lr / (1.0 - b1.powi(t)) * m / (v.sqrt() / (1.0 - b2.powi(t)).sqrt() + eps);
        }
        assert!(
            (p.double_value(&[0]) - x).abs() < 1e-6,
            "{} vs {x}",
            p.double_value(&[0])
        );
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let p = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![("p".into(), p.shallow_clone())],
            AdamWConfig::default(),
        );
        (&p * 1.0).sum(Kind::Float).backward(); // grad (1, 1), norm √2
        let n = opt.clip(0.1);
        assert!((n - 2f64.sqrt()).abs() < 1e-6);
        assert!((opt.grad_norm().double_value(&[]) - 0.1).abs() < 1e-6);
    }
}
