"""Forward time of the original implementation (SwissArmyTransformer 0.3.6) on the `small` preset.

Same architecture and sizes as `xrayglm bench model --preset small` (random weights, fp32, no
grad, batch 2 x 128 tokens in XrayGLM's layout + a 224x224 image). Prints `sat_ms <value>`.
Run through scripts/bench_vs_sat.sh, which also runs xrayglm and prints the ratio.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_model_fixtures import build  # noqa: E402  (the same sat model assembly as the fixtures)

SMALL = dict(glm=dict(num_layers=4, hidden_size=256, num_attention_heads=4, inner_hidden_size=1024, vocab_size=130528,
                      bos=130004, mask=130000, gmask=130001),
             vit=dict(num_layers=4, hidden_size=192, num_attention_heads=4, inner_hidden_size=768, image=224, patch=14),
             qformer=dict(num_layers=2, hidden_size=128, num_attention_heads=4, queries=32),
             lora=dict(layers=[0, 3], rank=4))


def main():
    batch, seq, iters = 2, 128, int(os.environ.get("ITERS", "5"))
    torch.set_num_threads(int(os.environ.get("THREADS", str(os.cpu_count()))))
    torch.manual_seed(0)
    model, _ = build(SMALL)
    model.eval()
    L = SMALL["qformer"]["queries"]
    ctx = 3 + L + 16
    ids = torch.randint(10, 20010, (batch, seq))
    ids[:, 3:3 + L] = 3
    ids[:, ctx - 1] = SMALL["glm"]["gmask"]
    ids[:, ctx] = SMALL["glm"]["bos"]
    image = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        model(input_ids=ids, image=image, pre_image=3)
        t = time.perf_counter()
        for _ in range(iters):
            model(input_ids=ids, image=image, pre_image=3)
        ms = (time.perf_counter() - t) * 1e3 / iters
    print("sat_ms %.3f" % ms)


if __name__ == "__main__":
    main()
