//! Next-token choice with the semantics of sat 0.3.6's `BaseStrategy` (docs/reference.md §7.5):
//!
//! 1. `logits / (temperature · P)`, P = `repetition_penalty` for every id already generated in this
//!    reply (not the prompt), 1 otherwise — a plain division whatever the sign;
//! 2. invalid slices (English mode: the CJK part of the vocabulary) removed;
//! 3. top-k, then top-p on the sorted softmax (the first token always kept);
//! 4. a draw from the renormalised distribution.
//!
//! Greedy mode takes the arg-max after steps 1–2 (what sat's `top_k = 1` does). The draw uses this
//! crate's own seeded generator, so a seed reproduces a reply whatever else runs in the process.

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

use crate::data::rng::PyRandom;

/// sat's filter value for removed logits.
const FILTERED: f64 = -65504.0;

/// English mode bans ids 63823..130000 (the CJK range), as XrayGLM's `cli_demo.py --english`.
pub const ENGLISH_INVALID: std::ops::Range<i64> = 63823..130000;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    pub temperature: f64,
    pub top_p: f64,
    /// 0 = no top-k.
    pub top_k: i64,
    pub repetition_penalty: f64,
    /// Arg-max instead of sampling.
    pub greedy: bool,
    /// Seed of the sampling generator.
    pub seed: u64,
    /// Id ranges never produced.
    pub invalid: Vec<std::ops::Range<i64>>,
}

impl Default for SamplingConfig {
    /// XrayGLM's `cli_demo.py` / `web_demo.py` settings (spec §7.1).
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_p: 0.4,
            top_k: 100,
            repetition_penalty: 1.2,
            greedy: false,
            seed: 1234,
            invalid: Vec::new(),
        }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.temperature > 0.0 && self.temperature.is_finite(),
            "temperature must be > 0 (got {})",
            self.temperature
        );
        ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "top_p must be in (0, 1] (got {})",
            self.top_p
        );
        ensure!(self.top_k >= 0, "top_k must be ≥ 0 (got {})", self.top_k);
        ensure!(
            self.repetition_penalty > 0.0,
            "repetition_penalty must be > 0 (got {})",
            self.repetition_penalty
        );
        Ok(())
    }
}

/// Chooses tokens for a batch of sequences.
pub struct Sampler {
    pub cfg: SamplingConfig,
    rng: PyRandom,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig) -> Result<Self> {
        cfg.validate()?;
        let rng = PyRandom::new(cfg.seed as i64);
        Ok(Self { cfg, rng })
    }

    /// Step 1–2: fp32 logits `[B, V]` divided by temperature and penalty, invalid ids removed.
    pub fn adjust<G: AsRef<[i64]>>(&self, logits: &Tensor, generated: &[G]) -> Tensor {
        let (b, v) = logits.size2().expect("logits [B, V]");
        let dev = logits.device();
        let mut out = logits.to_kind(Kind::Float);
        // `out` may alias the caller's logits (fp32 already) until an operation makes a new one;
        // nothing is written into it before then.
        let mut owned = false;
        if self.cfg.temperature != 1.0 {
            out = &out / self.cfg.temperature;
            owned = true;
        }
        if self.cfg.repetition_penalty != 1.0 {
            // Only the (row, id) pairs already generated get the extra division.
            let mut flat: Vec<i64> = Vec::new();
            for (row, ids) in generated.iter().enumerate().take(b as usize) {
                let mut seen: Vec<i64> = ids
                    .as_ref()
                    .iter()
                    .copied()
                    .filter(|&i| (0..v).contains(&i))
                    .collect();
                seen.sort_unstable();
                seen.dedup();
                flat.extend(seen.into_iter().map(|i| row as i64 * v + i));
            }
            if !flat.is_empty() {
                if !owned {
                    out = out.copy();
                    owned = true;
                }
                let idx = Tensor::from_slice(&flat).to_device(dev);
                let mut view = out.view([-1]);
                let picked = view.index_select(0, &idx) / self.cfg.repetition_penalty;
                let _ = view.index_copy_(0, &idx, &picked);
            }
        }
        for r in &self.cfg.invalid {
            let (lo, hi) = (r.start.clamp(0, v), r.end.clamp(0, v));
            if hi > lo {
                if !owned {
                    out = out.copy();
                    owned = true;
                }
                let _ = out.narrow(1, lo, hi - lo).fill_(FILTERED);
            }
        }
        out
    }

    /// The next token of every row. `generated[i]` = the ids already produced for row i.
    pub fn next<G: AsRef<[i64]>>(&mut self, logits: &Tensor, generated: &[G]) -> Result<Vec<i64>> {
        if self.cfg.greedy {
            // Dividing every logit by the temperature leaves the arg-max where it is: without a
            // penalty or banned ids the raw logits (widened to fp32, which is exact and argmax's fast
            // path) give the same pick.
            let plain = self.cfg.repetition_penalty == 1.0 && self.cfg.invalid.is_empty();
            let adj = if plain {
                logits.to_kind(Kind::Float)
            } else {
                self.adjust(logits, generated)
            };
            return Ok(Vec::<i64>::try_from(
                adj.argmax(-1, false).to_device(Device::Cpu),
            )?);
        }
        let adj = self.adjust(logits, generated);
        let (b, v) = adj.size2()?;
        if (self.cfg.top_k == 0 || self.cfg.top_k >= v) && self.cfg.top_p >= 1.0 {
            // Nothing is cut: draw from the running sum of the probabilities in id order, without
            // sorting the vocabulary (the same distribution; RL samples this way).
            let cum = adj.softmax(-1, Kind::Float).cumsum(-1, Kind::Double);
            let total = cum.select(1, v - 1);
            let u: Vec<f64> = (0..b).map(|_| self.rng.random()).collect();
            let at = Tensor::from_slice(&u).to_device(cum.device()) * total;
            let picks = cum
                .lt_tensor(&at.unsqueeze(1))
                .sum_dim_intlist(-1, false, Kind::Int64)
                .clamp_max(v - 1);
            return Ok(Vec::<i64>::try_from(picks.to_device(Device::Cpu))?);
        }
        // Top-k (or everything) in descending order; only these can be drawn.
        let k = if self.cfg.top_k > 0 {
            self.cfg.top_k.min(v)
        } else {
            v
        };
        let (vals, idx) = adj.topk(k, -1, true, true);
        let probs = vals.softmax(-1, Kind::Float).to_device(Device::Cpu);
        let probs = Vec::<f32>::try_from(probs.flatten(0, -1))?;
        let idx = Vec::<i64>::try_from(idx.to_device(Device::Cpu).flatten(0, -1))?;
        let mut out = Vec::with_capacity(b as usize);
        for row in 0..b as usize {
            let p = &probs[row * k as usize..(row + 1) * k as usize];
            let ids = &idx[row * k as usize..(row + 1) * k as usize];
            // Top-p: keep the shortest prefix whose mass exceeds p (sat: remove where the
            // cumulative probability before this token already exceeds p; keep the first).
            let mut keep = 0;
            let mut cum = 0f32;
            for &pi in p {
                if keep > 0 && cum > self.cfg.top_p as f32 {
                    break;
                }
                cum += pi;
                keep += 1;
            }
            let total: f64 = p[..keep].iter().map(|&x| x as f64).sum();
            let mut u = self.rng.random() * total;
            let mut pick = ids[keep - 1];
            for (j, &pj) in p[..keep].iter().enumerate() {
                u -= pj as f64;
                if u < 0.0 {
                    pick = ids[j];
                    break;
                }
            }
            out.push(pick);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(f: impl FnOnce(&mut SamplingConfig)) -> Sampler {
        let mut c = SamplingConfig::default();
        f(&mut c);
        Sampler::new(c).unwrap()
    }

    #[test]
    fn penalty_divides_generated_ids_whatever_the_sign() {
        let s = sampler(|c| {
            c.temperature = 0.5;
            c.repetition_penalty = 2.0;
        });
        let logits = Tensor::from_slice(&[4.0f32, -4.0, 4.0, -4.0]).view([1, 4]);
        let adj = Vec::<f32>::try_from(s.adjust(&logits, &[vec![1, 2]]).flatten(0, -1)).unwrap();
        // ids 1 and 2 generated: /(0.5·2); others /0.5. Negative logits move toward zero.
        assert_eq!(adj, vec![8.0, -4.0, 4.0, -8.0]);
    }

    #[test]
    fn invalid_slices_are_never_chosen() {
        let mut s = sampler(|c| {
            c.invalid = vec![std::ops::Range { start: 1, end: 3 }];
            c.top_p = 1.0;
            c.top_k = 0;
        });
        let logits = Tensor::from_slice(&[0.0f32, 9.0, 9.0, 0.0]).view([1, 4]);
        for _ in 0..50 {
            let t = s.next(&logits, &[vec![]]).unwrap()[0];
            assert!(t == 0 || t == 3, "{t}");
        }
        // At temperature 1 without a penalty the caller's logits are left as they were (the
        // engine samples from stored logits again).
        let mut s = sampler(|c| {
            c.invalid = vec![std::ops::Range { start: 1, end: 3 }];
            c.temperature = 1.0;
            c.repetition_penalty = 1.0;
        });
        let _ = s.next(&logits, &[vec![]]).unwrap();
        let after = Vec::<f32>::try_from(logits.flatten(0, -1)).unwrap();
        assert_eq!(after, [0.0, 9.0, 9.0, 0.0]);
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_above_p() {
        // probs ≈ [0.6, 0.3, 0.1]: p = 0.5 keeps only the first; p = 0.7 the first two.
        let logits = Tensor::from_slice(&[0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()]).view([1, 3]);
        let mut s = sampler(|c| {
            c.temperature = 1.0;
            c.top_p = 0.5;
        });
        assert!((0..100).all(|_| s.next(&logits, &[vec![]]).unwrap()[0] == 0));
        let mut s = sampler(|c| {
            c.temperature = 1.0;
            c.top_p = 0.7;
        });
        let picks: Vec<i64> = (0..300)
            .map(|_| s.next(&logits, &[vec![]]).unwrap()[0])
            .collect();
        assert!(picks.contains(&0) && picks.contains(&1) && !picks.contains(&2));
        let ones = picks.iter().filter(|&&t| t == 1).count() as f64 / 300.0;
        assert!((ones - 1.0 / 3.0).abs() < 0.08, "{ones}");
    }

    #[test]
    fn the_uncut_distribution_is_drawn_in_proportion() {
        let logits = Tensor::from_slice(&[0.5f32.ln(), 0.2f32.ln(), 0.3f32.ln()]).view([1, 3]);
        let mut s = sampler(|c| {
            c.temperature = 1.0;
            c.top_p = 1.0;
            c.top_k = 0;
            c.repetition_penalty = 1.0;
        });
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[s.next(&logits, &[vec![]]).unwrap()[0] as usize] += 1;
        }
        for (c, p) in counts.iter().zip([0.5, 0.2, 0.3]) {
            assert!((*c as f64 / 3000.0 - p).abs() < 0.03, "{counts:?}");
        }
    }

    #[test]
    fn a_seed_reproduces_the_draws_and_greedy_is_argmax() {
        let logits = Tensor::randn([3, 50], (Kind::Float, Device::Cpu));
        let draw = |seed| {
            let mut s = sampler(|c| {
                c.seed = seed;
                c.top_p = 0.9;
            });
            (0..5)
                .map(|_| s.next(&logits, &[vec![], vec![], vec![]]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let mut g = sampler(|c| c.greedy = true);
        let want = Vec::<i64>::try_from(logits.argmax(-1, false)).unwrap();
        assert_eq!(g.next(&logits, &[vec![], vec![], vec![]]).unwrap(), want);
    }
}
