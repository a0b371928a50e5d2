#!/usr/bin/env python3
"""GRPO and DPO loss fixtures from TRL itself (trl 1.16.0, scripts/trl_venv.sh).

For fixed float64 log-probabilities, advantages, rewards and masks, TRL's own
`GRPOTrainer._compute_loss` and `DPOTrainer._compute_loss` run on trainer objects that hold only
the attributes those methods read (one process, no gradient accumulation, train mode); the model
forward is replaced by the fixed log-probabilities, which carry the gradient. Writes the loss, its
gradient with respect to the log-probabilities and the logged clip shares / KL to
tests/fixtures/rl/trl.json. Group advantages come from TRL's reward normalization
(`scale_rewards` group / batch / none) with its `nanstd`.

Usage: $(scripts/trl_venv.sh) scripts/make_rl_fixtures.py
"""
import collections
import json
import os
import types

import torch
import trl
from trl import DPOTrainer, GRPOTrainer
from trl.trainer.utils import nanstd

assert trl.__version__ == "1.16.0", trl.__version__
torch.manual_seed(1234)
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "rl", "trl.json")


class OneProcess:
    """The accelerator's reductions with one process."""

    num_processes = 1
    sync_gradients = True
    device = torch.device("cpu")

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x


def metrics():
    return {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}


def grpo_case(name, loss_type, beta, eps_low, eps_high, off_policy, rows=5, cols=7):
    lengths = torch.randint(1, cols + 1, (rows,))
    mask = (torch.arange(cols)[None, :] < lengths[:, None]).double()
    logps = (-torch.rand(rows, cols, dtype=torch.float64) * 3).requires_grad_(True)
    old = (logps.detach() + 0.3 * torch.randn(rows, cols, dtype=torch.float64)) if off_policy else None
    ref = logps.detach() + 0.2 * torch.randn(rows, cols, dtype=torch.float64)
    adv = torch.randn(rows, dtype=torch.float64)
    entropies = torch.rand(rows, cols, dtype=torch.float64)

    t = object.__new__(GRPOTrainer)
    t.__dict__.update(
        dict(
            top_entropy_quantile=1.0,
            aux_loss_enabled=False,
            off_policy_mask_threshold=None,
            importance_sampling_level="token",
            beta=beta,
            loss_type=loss_type,
            epsilon_low=eps_low,
            epsilon_high=eps_high,
            use_vllm=False,
            vllm_importance_sampling_correction=False,
            max_completion_length=cols + 3,
            current_gradient_accumulation_steps=1,
            _entropy_bonus_enabled=False,
            _metrics=metrics(),
            model=types.SimpleNamespace(training=True),
            accelerator=OneProcess(),
            args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        )
    )
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropies, None)
    inputs = {
        "prompt_ids": torch.zeros(rows, 2, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_ids": torch.zeros(rows, cols, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        # The rollout batch's completion tokens: more than this micro-batch's (DAPO's normalizer).
        "num_items_in_batch": mask.sum() + 7,
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    if beta != 0.0:
        inputs["ref_per_token_logps"] = ref
    loss = t._compute_loss(None, inputs)
    loss.backward()
    m = t._metrics["train"]
    case = {
        "name": name,
        "loss_type": loss_type,
        "beta": beta,
        "epsilon_low": eps_low,
        "epsilon_high": eps_high,
        "max_completion_length": cols + 3,
        "logps": logps.detach().tolist(),
        "old_logps": old.tolist() if old is not None else None,
        "ref_logps": ref.tolist() if beta != 0.0 else None,
        "advantages": adv.tolist(),
        "mask": mask.tolist(),
        "num_items_in_batch": float(mask.sum() + 7),
        "loss": loss.item(),
        "grad": logps.grad.tolist(),
        "clip_low": m["clip_ratio/low_mean"][0],
        "clip_high": m["clip_ratio/high_mean"][0],
        "clip_region": m["clip_ratio/region_mean"][0],
    }
    if beta != 0.0:
        case["kl"] = m["kl"][0]
    return case


def dpo_case(name, loss_type, beta, pairs=4, cols=6):
    lengths = torch.randint(1, cols, (2 * pairs,))
    # completion_mask over the input ids (one longer than the shifted log-probs); position 0 is the
    # prompt, then each completion's tokens.
    cmask = torch.zeros(2 * pairs, cols + 1, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        cmask[i, 1 : 1 + n] = 1
    shift = cmask[:, 1:].double()
    raw = (-torch.rand(2 * pairs, cols, dtype=torch.float64) * 2).requires_grad_(True)
    per_token = raw * shift  # the model's log-probs are 0 where the label is ignored
    ref = -torch.rand(2 * pairs, dtype=torch.float64) * 5
    outputs = types.SimpleNamespace(
        log_probs=per_token,
        entropy=torch.rand(2 * pairs, cols, dtype=torch.float64),
        mean_logits=torch.rand(2 * pairs, cols, dtype=torch.float64),
        is_top1=torch.zeros(2 * pairs, cols, dtype=torch.bool),
        aux_loss=None,
    )
    t = object.__new__(DPOTrainer)
    t.__dict__.update(
        dict(
            model=types.SimpleNamespace(training=True),
            accelerator=OneProcess(),
            aux_loss_enabled=False,
            ld_alpha=None,
            precompute_ref_logps=True,
            f_divergence_type="reverse_kl",
            loss_types=[loss_type],
            loss_weights=[1.0],
            beta=beta,
            label_smoothing=0.0,
            use_weighting=False,
            _metrics=metrics(),
            _total_train_tokens=0,
            _tp_size=1,
            args=types.SimpleNamespace(),
        )
    )
    inputs = {
        "input_ids": torch.zeros(2 * pairs, cols + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * pairs, cols + 1, dtype=torch.long),
        "completion_mask": cmask,
        "ref_chosen_logps": ref[:pairs],
        "ref_rejected_logps": ref[pairs:],
    }
    model = lambda **kw: outputs  # noqa: E731
    loss = t._compute_loss(model, inputs, return_outputs=False)
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    seq = per_token.detach().sum(1)
    # d loss / d (sequence log-prob) = the gradient at any of the sequence's completion tokens.
    grad = [raw.grad[i, 0].item() for i in range(2 * pairs)]
    tokens = shift.sum(1)
    return {
        "name": name,
        "loss_type": loss_type,
        "beta": beta,
        "chosen_logps": seq[:pairs].tolist(),
        "rejected_logps": seq[pairs:].tolist(),
        "ref_chosen_logps": ref[:pairs].tolist(),
        "ref_rejected_logps": ref[pairs:].tolist(),
        "chosen_tokens": tokens[:pairs].tolist(),
        "rejected_tokens": tokens[pairs:].tolist(),
        "loss": loss.item(),
        "grad_chosen": grad[:pairs],
        "grad_rejected": grad[pairs:],
    }


def advantages_case(rewards, group, scale):
    """TRL's sum_then_normalize advantages (see GRPOTrainer._generate_and_score_completions)."""
    r = torch.tensor(rewards, dtype=torch.float64)
    mean = torch.nanmean(r.view(-1, group), dim=1).repeat_interleave(group)
    if scale in ("group", "none"):
        std = nanstd(r.view(-1, group), dim=1).repeat_interleave(group)
    else:
        std = nanstd(r).expand_as(r)
    adv = r - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return {"rewards": rewards, "group": group, "scale_rewards": scale, "advantages": adv.tolist()}


grpo = []
for lt in ["grpo", "bnpo", "dr_grpo", "dapo"]:
    for beta in [0.0, 0.04]:
        for off in [False, True]:
            for lo, hi in [(0.2, 0.2), (0.2, 0.28)]:
                name = f"{lt} beta={beta} {'off' if off else 'on'}-policy eps=({lo},{hi})"
                grpo.append(grpo_case(name, lt, beta, lo, hi, off))
dpo = []
for lt in ["sigmoid", "ipo"]:
    for beta in [0.1, 0.5]:
        dpo.append(dpo_case(f"{lt} beta={beta}", lt, beta))
rewards = [0.5, 1.0, 0.0, 0.25, 1.0, 1.0, 1.0, 1.0, 0.1, 0.9, 0.3, 0.7]
advantages = [advantages_case(rewards, 4, s) for s in ["group", "batch", "none"]]
advantages.append(advantages_case([0.0, 1.0, 0.5, 0.5, 0.2, 0.8], 2, "group"))
with open(OUT, "w") as f:
    json.dump({"trl": trl.__version__, "torch": torch.__version__, "grpo": grpo, "dpo": dpo,
               "advantages": advantages}, f, indent=1)
print(f"wrote {len(grpo)} GRPO, {len(dpo)} DPO and {len(advantages)} advantage cases to {OUT}")
