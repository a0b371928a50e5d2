"""Training throughput of the original implementation (SwissArmyTransformer 0.3.6, XrayGLM's recipe)
for `xrayglm bench train --vs_sat PYTHON`, on the samples that xrayglm built (same reports, same
films, same token ids).

XrayGLM's way, per step: every film of the micro-batch opened and preprocessed (PIL → bicubic
224×224 → normalize, BlipImageEvalProcessor), every sample padded to max_source_length +
max_target_length = 320 tokens, the frozen ViT and Q-Former run again, full-vocabulary logits cast
to fp32 for the loss, AdamW on the LoRA weights (rank 10, alpha 1, head-first qkv + dense on the
two given layers), gradient clipping 0.1, dropout 0.1. fp32 on the CPU (XrayGLM's fp16 is for GPUs).

Prints sat_samples_per_s, sat_tokens_per_s (report tokens, the ones with a label), sat_step_ms
(after `warm` steps) and sat_peak_rss_mib.
Usage: python scripts/bench_train_sat.py SPEC.json   (THREADS sets torch's thread count)
"""
import json
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from torchvision.transforms.functional import InterpolationMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forward_sat import SMALL  # noqa: E402
from make_model_fixtures import build  # noqa: E402

PAD = 3


def main():
    spec = json.load(open(sys.argv[1]))
    torch.set_num_threads(int(os.environ.get("THREADS", str(os.cpu_count()))))
    torch.manual_seed(0)
    assert spec["preset"] == "small", "the original side is wired for the small preset"
    c = dict(SMALL)
    c["lora"] = dict(layers=list(spec["lora_layers"]), rank=spec["rank"])
    model, _ = build(c)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    for n, p in model.named_parameters():
        p.requires_grad_("matrix_" in n)
    params = [p for n, p in model.named_parameters() if "matrix_" in n]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    model.train()
    size = spec["image_size"]
    proc = transforms.Compose([
        transforms.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])
    samples, batch, pad_to = spec["samples"], spec["batch"], spec["pad_to"]
    steps, warm = spec["steps"], spec["warm"]
    t0, tokens = None, 0
    for step in range(steps):
        if step == warm:
            t0 = time.perf_counter()
        part = samples[step * batch:(step + 1) * batch]
        images = torch.stack([proc(Image.open(s["image"]).convert("RGB")) for s in part])
        ids = torch.full((len(part), pad_to), PAD, dtype=torch.long)
        labels = torch.full((len(part), pad_to), -100, dtype=torch.long)
        for i, s in enumerate(part):
            n = len(s["input_ids"])
            ids[i, :n] = torch.tensor(s["input_ids"])
            labels[i, :n] = torch.tensor(s["labels"])
        if step >= warm:
            tokens += int((labels != -100).sum())
        opt.zero_grad()
        logits = model(input_ids=ids, image=images, pre_image=3)[0]
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
    secs = time.perf_counter() - t0
    timed = steps - warm
    print("sat_loss %.4f" % float(loss))
    print("sat_samples_per_s %.4f" % (timed * batch / secs))
    print("sat_tokens_per_s %.2f" % (tokens / secs))
    print("sat_step_ms %.2f" % (secs * 1e3 / timed))
    print("sat_peak_rss_mib %.1f" % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


if __name__ == "__main__":
    main()
