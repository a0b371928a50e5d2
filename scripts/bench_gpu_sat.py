"""The original implementation (SwissArmyTransformer 0.3.6) at the real VisualGLM-6B size on a GPU,
random weights, bf16, for scripts/gpu_check.sh (step 7) to set beside xrayglm's numbers:

- training as XrayGLM runs it: LoRA rank 10 on ChatGLM layers 0 and 14 (head-first qkv + dense),
  everything else frozen, micro-batch 8 padded to 320 tokens, vision tower recomputed every step,
  activation checkpointing (sat's per-layer torch checkpoint), dropout 0.1, full-vocabulary logits
  in fp32 for the loss, AdamW on the LoRA weights. Prints `sat_train_samples_per_s` (steps after
  WARM warm-up steps) and `sat_train_peak_mib` (torch.cuda.max_memory_allocated);
- greedy decoding with sat's `filling_sequence` + `CachedAutoregressiveMixin`, as in
  scripts/bench_generate_sat.py: `sat_ttft_ms`, `sat_b1_tps`, `sat_b8_tps` for NEW new tokens;
- `torch_eager_us_per_op`: what one tiny CUDA op costs PyTorch eager on this machine (kernel launch
  plus dispatch), to read decoding numbers by.

Needs CUDA torch and sat on PYTHONPATH (scripts/gpu_bundle.sh packs sat into .gpu/py).
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
DEVICE = os.environ.get("DEVICE", "cuda")  # DEVICE=cpu PRESET=small: a quick run of this script on a CPU
torch.set_default_device(DEVICE)  # the fixtures' model assembly makes its small tensors on the default device
from make_model_fixtures import build, glm_masks_and_positions  # noqa: E402

REAL = dict(glm=dict(num_layers=28, hidden_size=4096, num_attention_heads=32, inner_hidden_size=16384,
                     vocab_size=130528, bos=130004, mask=130000, gmask=130001),
            vit=dict(num_layers=39, hidden_size=1408, num_attention_heads=16, inner_hidden_size=6144, image=224,
                     patch=14),
            qformer=dict(num_layers=12, hidden_size=768, num_attention_heads=12, queries=32),
            lora=dict(layers=[0, 14], rank=10))


def sync_time():
    if DEVICE != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter()


def eager_overhead():
    x = torch.ones(4)
    for _ in range(100):
        x = x + 1
    t = sync_time()
    for _ in range(5000):
        x = x + 1
    return (sync_time() - t) / 5000 * 1e6


def train(model, steps, warm):
    dt = torch.bfloat16
    g, q = REAL["glm"], REAL["qformer"]
    batch, seq, L = 8, 320, q["queries"]
    ctx = 3 + L + 30
    ids = torch.randint(10, 20010, (batch, seq))
    ids[:, 3:3 + L] = 3
    ids[:, ctx - 2] = g["gmask"]
    ids[:, ctx - 1] = g["bos"]
    labels = torch.full((batch, seq), -100, dtype=torch.long)
    labels[:, ctx:ctx + 100] = ids[:, ctx:ctx + 100]
    image = torch.randn(batch, 3, 224, 224).to(dt)
    model.train()
    params = [p for n, p in model.named_parameters() if "matrix_" in n]
    for n, p in model.named_parameters():
        p.requires_grad_("matrix_" in n)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    if DEVICE != "cpu":
        torch.cuda.reset_peak_memory_stats()
    t0 = None
    for i in range(steps):
        if i == warm:
            t0 = sync_time()
        opt.zero_grad()
        logits = model(input_ids=ids, image=image, pre_image=3)[0]
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
    sps = batch * (steps - warm) / (sync_time() - t0)
    print("sat_train_loss %.4f" % float(loss))
    print("sat_train_samples_per_s %.3f" % sps)
    if DEVICE != "cpu":
        print("sat_train_peak_mib %.0f" % (torch.cuda.max_memory_allocated() / 2**20))
    for p in params:
        p.grad = None
    del opt


def decode(model, new):
    from sat.generation.autoregressive_sampling import filling_sequence
    from sat.generation.sampling_strategies import BaseStrategy
    from sat.model.cached_autoregressive_model import CachedAutoregressiveMixin
    dt = torch.bfloat16
    model.eval()
    model.add_mixin("auto-regressive", CachedAutoregressiveMixin())
    g, L = REAL["glm"], REAL["qformer"]["queries"]
    ids = torch.randint(10, 20010, (3 + L + 16,)).tolist()
    ids[3:3 + L] = [3] * L
    ids += [g["gmask"], g["bos"]]
    mp, cl = len(ids) - 2, len(ids) - 1
    image = torch.randn(1, 3, 224, 224).to(dt)

    def pos(s):
        tokens, mask, position_ids = glm_masks_and_positions(s, mp, cl)
        return tokens, mask.to(dt), position_ids

    def run(batch, n):
        seq = torch.tensor(ids + [-1] * n)
        strategy = BaseStrategy(temperature=1.0, top_k=1, end_tokens=[])
        t = sync_time()
        with torch.no_grad():
            filling_sequence(model, seq, batch_size=batch, strategy=strategy, get_masks_and_position_ids=pos,
                             image=image, pre_image=3)
        return sync_time() - t

    run(1, 2)
    ttft = min(run(1, 1) for _ in range(3))
    b1 = run(1, new)
    b8 = run(8, new)
    print("sat_ttft_ms %.3f" % (ttft * 1e3))
    print("sat_b1_tps %.3f" % ((new - 1) / (b1 - ttft)))
    print("sat_b8_tps %.3f" % (8 * (new - 1) / (b8 - ttft)))


def main():
    print("torch_eager_us_per_op %.2f" % eager_overhead(), flush=True)
    torch.manual_seed(0)
    if os.environ.get("PRESET") == "small":
        from bench_forward_sat import SMALL
        REAL.update(SMALL)
    model, _ = build(REAL)
    for m in model.modules():  # dropout 0.1 as XrayGLM trains; activation checkpointing on ChatGLM
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    model.transformer.checkpoint_activations = True
    model = model.to(device=DEVICE, dtype=torch.bfloat16)  # sat makes some embeddings on the CPU
    from sat.model.position_embedding.rotary_embeddings import RotaryEmbedding
    for mod in model.modules():  # sat 0.3.6 builds the rotary tables in fp16 (see bench_generate_sat.py)
        if isinstance(mod, RotaryEmbedding):
            mod.precision, mod.max_seq_len_cached = torch.bfloat16, None
    print("sat_params %d" % sum(p.numel() for p in model.parameters()), flush=True)
    train(model, int(os.environ.get("STEPS", "12")), int(os.environ.get("WARM", "4")))
    decode(model, int(os.environ.get("NEW", "64")))


if __name__ == "__main__":
    main()
