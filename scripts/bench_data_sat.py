"""The original's data path (XrayGLM's FewShotDataset) for `xrayglm bench data --vs_sat PYTHON`,
on the same films and report texts as xrayglm's side.

XrayGLM builds its training set eagerly, in one process, when the dataset is constructed
(finetune_XrayGLM.py FewShotDataset; docs/reference.md §1.d, §2): per record, the film opened with
PIL, converted to RGB, BlipImageEvalProcessor (bicubic resize to 224x224, ToTensor, CLIP
normalize) and kept as fp32; the prompt and report tokenized with ChatGLM's tokenizer
(sentencepiece over ice_text.model after ChatGLM's text preprocessing, as
scripts/make_tokenizer_fixtures.py does), laid out as `<img>` + 32 pads + `</img>问：{prompt}\n答：`,
[gMASK] <sop>, report, <eop>, padded to 320 with labels -100 over the prompt and the padding.

Prints sat_samples_per_s (the whole construction), sat_images_per_s (films alone) and
sat_held_mib (the fp32 films the dataset holds in memory).
Usage: python scripts/bench_data_sat.py SPEC.json   (THREADS sets torch's thread count)
"""
import json
import os
import sys
import time

import sentencepiece as spm
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms.functional import InterpolationMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tokenizer_fixtures import preprocess  # noqa: E402

PAD, GMASK, SOP, EOP = 3, 130001, 130004, 130005


def main():
    spec = json.load(open(sys.argv[1], encoding="utf-8"))
    torch.set_num_threads(int(os.environ.get("THREADS", str(os.cpu_count()))))
    sp = spm.SentencePieceProcessor(model_file=spec["tokenizer"])
    enc = lambda t: sp.encode(preprocess(t))  # noqa: E731
    proc = transforms.Compose([
        transforms.Resize((224, 224), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])
    src, tgt = spec["max_source_length"], spec["max_target_length"]
    for p in spec["images"]:  # page cache warm, as on xrayglm's side
        open(p, "rb").read()

    t = time.perf_counter()
    for p in spec["images"]:
        proc(Image.open(p).convert("RGB"))
    images_s = time.perf_counter() - t

    t = time.perf_counter()
    images, ids, labels = [], [], []
    for p, label in zip(spec["images"], spec["labels"]):
        images.append(proc(Image.open(p).convert("RGB")))
        a = enc("<img>") + [PAD] * 32 + enc("</img>问：" + spec["prompt"] + "\n答：")
        b = enc(label)
        a, b = a[: src - 1], b[: tgt - 2]
        x = a + [GMASK, SOP] + b + [EOP]
        ctx = x.index(SOP)
        y = [-100] * ctx + x[ctx:]
        pad = src + tgt - len(x)
        x, y = x + [PAD] * pad, y + [PAD] * pad
        ids.append(x)
        labels.append([v if v != PAD else -100 for v in y])
    total_s = time.perf_counter() - t

    n = len(spec["images"])
    held = sum(i.numel() * i.element_size() for i in images)
    print(f"sat_samples_per_s {n / total_s:.3f}")
    print(f"sat_images_per_s {n / images_s:.3f}")
    print(f"sat_held_mib {held / 2**20:.1f}")


if __name__ == "__main__":
    sys.exit(main())
