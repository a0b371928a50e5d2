//! The preference and reinforcement losses, each a small function of per-token or per-sequence
//! log-probabilities, as TRL 1.16 computes them (`GRPOTrainer._compute_loss`,
//! `DPOTrainer._compute_loss`; checked against TRL itself by `scripts/make_rl_fixtures.py`):
//!
//! * GRPO (Shao et al., DeepSeekMath, arXiv 2402.03300): group-normalized advantages
//!   ([`group_advantages`]), the clipped ratio `−min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)` per token
//!   with `ρ = exp(log π − log π_old)`, plus `β·KL` to the reference with the k3 estimator
//!   `exp(r − l) − (r − l) − 1` (`l = log π`, `r = log π_ref`), averaged over the completion tokens
//!   as [`GrpoNorm`] says.
//! * DPO (Rafailov et al., arXiv 2305.18290): `−log σ(β·((c − c_ref) − (r − r_ref)))` over
//!   sequence log-probabilities (sums over the completion), or IPO (Azar et al., arXiv
//!   2310.12036): `(Δ − 1/(2β))²` on log-ratios averaged per token, TRL's normalization.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How GRPO's per-token losses become one number (TRL's `loss_type`, same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GrpoNorm {
    /// Each completion's mean over its tokens, then the mean over completions (the paper's; it
    /// favours short right answers and long wrong ones).
    Grpo,
    /// The sum over every completion token of the batch divided by their number.
    Bnpo,
    /// The sum divided by `completions × max_completion_length` (a constant: no length bias).
    DrGrpo,
    /// The sum divided by the completion tokens of the whole rollout batch (over every rank and
    /// micro-batch) per rank: TRL's default, what DAPO does.
    #[default]
    Dapo,
}

/// How a group's rewards are scaled into advantages (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RewardScale {
    /// Divided by the group's standard deviation (+1e-4): unit variance in each group.
    #[default]
    Group,
    /// Divided by the standard deviation over the whole batch.
    Batch,
    /// Only the group mean subtracted (Dr. GRPO: no difficulty bias).
    None,
}

/// Advantages of `rewards` in groups of `group` consecutive completions of one prompt: the
/// reward minus its group's mean, scaled as `scale` says (standard deviations with Bessel's
/// correction, +1e-4). A group whose rewards are all equal gets zero advantages.
pub fn group_advantages(rewards: &[f64], group: usize, scale: RewardScale) -> Vec<f64> {
    fn mean_std(x: &[f64]) -> (f64, f64) {
        let n = x.len() as f64;
        let mean = x.iter().sum::<f64>() / n;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        // TRL's `nanstd` divides the two integer counts in torch's default float32, so its
        // Bessel factor is n/(n − 1) rounded to float32; kept for equal advantages.
        let std = if x.len() > 1 {
            (var * (n as f32 / (n as f32 - 1.0)) as f64).sqrt()
        } else {
            0.0
        };
        (mean, std)
    }
    let batch_std = mean_std(rewards).1;
    rewards
        .chunks(group.max(1))
        .flat_map(|g| {
            let (mean, std) = mean_std(g);
            let div = match scale {
                RewardScale::Group => std + 1e-4,
                RewardScale::Batch => batch_std + 1e-4,
                RewardScale::None => 1.0,
            };
            g.iter().map(move |r| (r - mean) / div)
        })
        .collect()
}

/// GRPO's loss settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoLoss {
    pub norm: GrpoNorm,
    /// The KL coefficient; 0: no reference policy is needed.
    pub beta: f64,
    /// The ratio is clipped to `[1 − epsilon_low, 1 + epsilon_high]`.
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// [`GrpoNorm::DrGrpo`]'s constant.
    pub max_completion_length: i64,
}

/// One micro-batch of completions for [`GrpoLoss::compute`].
pub struct Completions<'a> {
    /// `log π_θ` of each completion token `[B, T]`, with its graph.
    pub logps: &'a Tensor,
    /// `log π_old` of the policy that sampled them; `None`: the current one (one update per
    /// rollout, so `ρ = 1` with gradient `∇ log π`).
    pub old_logps: Option<&'a Tensor>,
    /// `log π_ref` of the frozen reference (needed when `beta > 0`).
    pub ref_logps: Option<&'a Tensor>,
    /// One advantage per completion `[B]`.
    pub advantages: &'a Tensor,
    /// `[B, T]`, 1 on the completion's tokens.
    pub mask: &'a Tensor,
    /// [`GrpoNorm::Dapo`]'s denominator: completion tokens of the rollout batch per rank.
    pub batch_tokens: f64,
}

/// The loss and what is logged of it.
#[derive(Debug)]
pub struct GrpoOut {
    pub loss: Tensor,
    /// Mean k3 KL to the reference over the completion tokens (when `beta > 0`).
    pub kl: Option<f64>,
    /// Shares of completion tokens whose ratio was clipped below (with a negative advantage),
    /// above (with a positive one), or either.
    pub clip_low: f64,
    pub clip_high: f64,
    pub clip_region: f64,
}

impl GrpoLoss {
    pub fn compute(&self, c: &Completions) -> anyhow::Result<GrpoOut> {
        let mask = c.mask.to_kind(c.logps.kind());
        let old = match c.old_logps {
            Some(o) => o.shallow_clone(),
            None => c.logps.detach(),
        };
        let adv = c.advantages.to_kind(c.logps.kind()).unsqueeze(1);
        let ratio = (c.logps - &old).exp();
        let clipped = ratio.clamp(1.0 - self.epsilon_low, 1.0 + self.epsilon_high);
        let policy = -(&ratio * &adv).minimum(&(&clipped * &adv));
        let masked_mean = |x: &Tensor| -> f64 {
            let n = mask.sum(Kind::Double).double_value(&[]).max(1.0);
            (x.detach().to_kind(mask.kind()) * &mask)
                .sum(Kind::Double)
                .double_value(&[])
                / n
        };
        let (per_token, kl) = if self.beta != 0.0 {
            let r = c.ref_logps.ok_or_else(|| {
                anyhow::anyhow!("GRPO with beta > 0 needs the reference log-probs")
            })?;
            let d = r - c.logps;
            let per_token_kl = d.exp() - &d - 1.0;
            let kl = masked_mean(&per_token_kl);
            (policy + per_token_kl * self.beta, Some(kl))
        } else {
            (policy, None)
        };
        let sum = (&per_token * &mask).sum(per_token.kind());
        let loss = match self.norm {
            GrpoNorm::Grpo => ((&per_token * &mask).sum_dim_intlist(-1, false, per_token.kind())
                / mask.sum_dim_intlist(-1, false, mask.kind()).clamp_min(1.0))
            .mean(per_token.kind()),
            GrpoNorm::Bnpo => sum / mask.sum(mask.kind()).clamp_min(1.0),
            GrpoNorm::DrGrpo => {
                sum / (per_token.size()[0] as f64 * self.max_completion_length as f64)
            }
            GrpoNorm::Dapo => sum / c.batch_tokens.max(1.0),
        };
        let low = ratio.lt(1.0 - self.epsilon_low).logical_and(&adv.lt(0.0));
        let high = ratio.gt(1.0 + self.epsilon_high).logical_and(&adv.gt(0.0));
        let region = low.logical_or(&high);
        Ok(GrpoOut {
            loss,
            kl,
            clip_low: masked_mean(&low),
            clip_high: masked_mean(&high),
            clip_region: masked_mean(&region),
        })
    }
}

/// DPO's objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DpoKind {
    /// `−log σ(β·Δ)`, Δ the difference of the chosen and rejected log-ratios.
    #[default]
    Sigmoid,
    /// `(Δ̄ − 1/(2β))²`, Δ̄ on log-ratios averaged per completion token.
    Ipo,
}

/// DPO's loss settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoLoss {
    pub kind: DpoKind,
    pub beta: f64,
}

/// A micro-batch of pairs: sequence log-probabilities `[B]` (sums over each completion's tokens)
/// of the policy and the reference, and the completions' token counts.
pub struct Pairs<'a> {
    pub chosen: &'a Tensor,
    pub rejected: &'a Tensor,
    pub ref_chosen: &'a Tensor,
    pub ref_rejected: &'a Tensor,
    pub chosen_tokens: &'a Tensor,
    pub rejected_tokens: &'a Tensor,
}

/// The loss (mean over pairs) and what is logged of it.
#[derive(Debug)]
pub struct DpoOut {
    pub loss: Tensor,
    /// Mean implicit rewards `β·(log π − log π_ref)` of the chosen and rejected completions.
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    /// Share of pairs whose chosen reward is above the rejected one.
    pub accuracy: f64,
}

impl DpoLoss {
    pub fn compute(&self, p: &Pairs) -> DpoOut {
        let chosen = p.chosen - p.ref_chosen;
        let rejected = p.rejected - p.ref_rejected;
        let per_pair = match self.kind {
            DpoKind::Sigmoid => -((&chosen - &rejected) * self.beta).log_sigmoid(),
            DpoKind::Ipo => {
                let c = &chosen / p.chosen_tokens.to_kind(chosen.kind()).clamp_min(1.0);
                let r = &rejected / p.rejected_tokens.to_kind(rejected.kind()).clamp_min(1.0);
                (c - r - 1.0 / (2.0 * self.beta)).square()
            }
        };
        let cr = chosen.detach() * self.beta;
        let rr = rejected.detach() * self.beta;
        let mean = |t: &Tensor| t.mean(Kind::Double).double_value(&[]);
        DpoOut {
            loss: per_pair.mean(per_pair.kind()),
            chosen_reward: mean(&cr),
            rejected_reward: mean(&rr),
            accuracy: mean(&cr.gt_tensor(&rr).to_kind(Kind::Double)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_of_equal_rewards_are_zero_and_groups_are_apart() {
        let a = group_advantages(&[1.0, 1.0, 0.0, 2.0], 2, RewardScale::Group);
        assert_eq!(&a[..2], &[0.0, 0.0]);
        // (0 − 1) / (√2 + 1e-4) and its mirror.
        let s = 2f64.sqrt() + 1e-4;
        assert!((a[2] + 1.0 / s).abs() < 1e-12 && (a[3] - 1.0 / s).abs() < 1e-12);
        let n = group_advantages(&[0.0, 2.0], 2, RewardScale::None);
        assert_eq!(n, vec![-1.0, 1.0]);
    }
}
