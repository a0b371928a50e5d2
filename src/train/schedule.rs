//! Learning-rate schedules.
//!
//! `Sat` is SwissArmyTransformer 0.3.6's `AnnealingLR` as `finetune_XrayGLM.sh` drives it
//! (docs/reference.md §5.4): an internal counter n that starts at 1 and advances only after a
//! successful step; with `--mode finetune` every n ≤ `auto_warmup_steps` (100) gets
//! `auto_warmup_rate · lr` (5 %); otherwise linear warmup to `warmup_iter` and then cosine decay
//! from lr to lr/`decay_ratio`... i.e. `lr/10 · ((cos(π·r)+1)·(10−1)/2 + 1)`, r = min(1, (n−warmup)/
//! (train_iters)). `WarmupCosine` is the usual linear warmup + cosine to `min_lr_ratio·lr`.

use serde::{Deserialize, Serialize};

pub use crate::config::ScheduleKind;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub lr: f64,
    pub train_iters: i64,
    /// Warmup as a fraction of train_iters (XrayGLM: 0.02 → 6 steps).
    pub warmup: f64,
    /// Final lr = lr · min_lr_ratio (sat: 1/decay_ratio = 0.1).
    pub min_lr_ratio: f64,
    pub auto_warmup_steps: i64,
    pub auto_warmup_rate: f64,
}

impl Schedule {
    /// The lr for optimizer step `k` (1-based: the k-th successful step uses counter n = k).
    pub fn lr(&self, k: i64) -> f64 {
        let warmup_iter = (self.warmup * self.train_iters as f64) as i64;
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Sat => {
                let n = k;
                if n <= self.auto_warmup_steps {
                    return self.lr * self.auto_warmup_rate;
                }
                if warmup_iter > 0 && n <= warmup_iter {
                    return self.lr * n as f64 / warmup_iter as f64;
                }
                let decay_ratio = 1.0 / self.min_lr_ratio;
                let r = ((n - warmup_iter) as f64 / self.train_iters as f64).min(1.0);
                self.lr / decay_ratio
                    * (((std::f64::consts::PI * r).cos() + 1.0) * (decay_ratio - 1.0) / 2.0 + 1.0)
            }
            ScheduleKind::WarmupCosine => {
                if warmup_iter > 0 && k <= warmup_iter {
                    return self.lr * k as f64 / warmup_iter as f64;
                }
                let span = (self.train_iters - warmup_iter).max(1) as f64;
                let r = ((k - warmup_iter) as f64 / span).clamp(0.0, 1.0);
                let min = self.lr * self.min_lr_ratio;
                min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * r).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sat_schedule_matches_the_spec_table() {
        let s = Schedule {
            kind: ScheduleKind::Sat,
            lr: 1e-4,
            train_iters: 300,
            warmup: 0.02,
            min_lr_ratio: 0.1,
            auto_warmup_steps: 100,
            auto_warmup_rate: 0.05,
        };
        // docs/reference.md §5.4: n = 1…100 → 5.0e-6; 101 → 7.951e-5; 150 → 5.783e-5;
        // 200 → 3.499e-5; 250 → 1.752e-5; 300 → 1.009e-5.
        assert_eq!(s.lr(1), 5e-6);
        assert_eq!(s.lr(100), 5e-6);
        for (n, want) in [
            (101, 7.951e-5),
            (150, 5.783e-5),
            (200, 3.499e-5),
            (250, 1.752e-5),
            (300, 1.009e-5),
        ] {
            assert!(
                (s.lr(n) - want).abs() < 5e-9,
                "n={n}: {} vs {want}",
                s.lr(n)
            );
        }
    }

    #[test]
    fn warmup_cosine_ends_at_the_floor() {
        let s = Schedule {
            kind: ScheduleKind::WarmupCosine,
            lr: 1e-3,
            train_iters: 100,
            warmup: 0.1,
            min_lr_ratio: 0.1,
            auto_warmup_steps: 0,
            auto_warmup_rate: 1.0,
        };
        assert!((s.lr(5) - 5e-4).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr(100) - 1e-4).abs() < 1e-12);
    }
}
