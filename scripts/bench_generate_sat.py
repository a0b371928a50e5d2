"""Decoding speed of the original implementation (SwissArmyTransformer 0.3.6 `filling_sequence`
with `CachedAutoregressiveMixin` and `BaseStrategy(top_k=1)`, as XrayGLM's chat runs it) on the
`small` preset with random weights: time to first token and tokens/s at batch 1 and batch 8.

Same sizes and prompt layout as `xrayglm bench generate` (3 + 32 image slots + 16 text tokens +
[gMASK] <sop>, 224x224 image, NEW tokens, no early stop; DTYPE fp32 or bf16). Prints `sat_ttft_ms`, `sat_b1_tps`,
`sat_b8_tps`. Run by `xrayglm bench generate --vs_sat PYTHON` (same machine, same run, same
thread count) or directly with THREADS / NEW set.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forward_sat import SMALL  # noqa: E402
from make_model_fixtures import build, glm_masks_and_positions  # noqa: E402


def main():
    from sat.generation.autoregressive_sampling import filling_sequence
    from sat.generation.sampling_strategies import BaseStrategy
    from sat.model.cached_autoregressive_model import CachedAutoregressiveMixin

    new = int(os.environ.get("NEW", "32"))
    torch.set_num_threads(int(os.environ.get("THREADS", str(os.cpu_count()))))
    torch.manual_seed(0)
    model, _ = build(SMALL)
    # DTYPE=bf16: the whole model in bfloat16, as the original runs its model in half precision.
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[os.environ.get("DTYPE", "fp32")]
    model = model.to(dtype)
    if dtype == torch.bfloat16:
        # sat 0.3.6's ChatGLM builds its rotary tables in fp16 (made for `--fp16`); bf16 needs them
        # in bf16 or every q/k is promoted back to fp32.
        from sat.model.position_embedding.rotary_embeddings import RotaryEmbedding
        for mod in model.modules():
            if isinstance(mod, RotaryEmbedding):
                mod.precision, mod.max_seq_len_cached = dtype, None
    model.eval()
    model.add_mixin("auto-regressive", CachedAutoregressiveMixin())
    L = SMALL["qformer"]["queries"]
    ids = torch.randint(10, 20010, (3 + L + 16,)).tolist()
    ids[3:3 + L] = [3] * L
    ids += [SMALL["glm"]["gmask"], SMALL["glm"]["bos"]]
    mp, cl = len(ids) - 2, len(ids) - 1
    image = torch.randn(1, 3, 224, 224).to(dtype)
    def pos(s):
        # The mask in the model's dtype (in half precision XrayGLM's chat does the same).
        tokens, mask, position_ids = glm_masks_and_positions(s, mp, cl)
        return tokens, mask.to(dtype), position_ids

    def run(batch, n):
        seq = torch.tensor(ids + [-1] * n)
        strategy = BaseStrategy(temperature=1.0, top_k=1, end_tokens=[])
        # filling_sequence runs the prompt once (batch 1) and expands rows after it.
        t = time.perf_counter()
        with torch.no_grad():
            filling_sequence(model, seq, batch_size=batch, strategy=strategy, get_masks_and_position_ids=pos,
                             image=image, pre_image=3)
        return time.perf_counter() - t

    run(1, 2)  # warm-up
    ttft = min(run(1, 1) for _ in range(3))
    b1 = run(1, new)
    b8 = run(8, new)
    print("sat_ttft_ms %.3f" % (ttft * 1e3))
    print("sat_b1_tps %.3f" % (new / (b1 - ttft)))
    print("sat_b8_tps %.3f" % (8 * new / (b8 - ttft)))


if __name__ == "__main__":
    main()
