"""CPython `random` outputs that xrayglm's PyRandom must reproduce (stdlib only).

`build_ch_prompt-random.py` calls `random.choice(prompts)` once per record; with a seed this
makes the random-prompt training list reproducible.
Run: python3 scripts/make_rng_fixtures.py   (writes tests/fixtures/python_random.json)
"""
import json, os, random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["通过这张胸部X光影像可以诊断出什么？", "这张图片的背景里有什么内容？", "详细描述一下这张图片",
           "看看这张图片并描述你注意到的内容", "请提供图片的详细描述", "你能为我描述一下这张图片的内容吗？"]
out = []
for seed in [0, 1, 1234, 2**40 + 7, -5]:
    r = random.Random(seed)
    choices = [PROMPTS.index(r.choice(PROMPTS)) for _ in range(200)]
    floats = [r.random() for _ in range(10)]
    bits = [r.getrandbits(k) for k in (1, 7, 32, 33, 64)]
    items = list(range(25))
    r.shuffle(items)
    below = [r.randrange(1000003) for _ in range(10)]
    out.append({"seed": seed, "choices": choices, "random": floats, "getrandbits": bits,
                "getrandbits_k": [1, 7, 32, 33, 64], "shuffle25": items, "randbelow_1000003": below})
path = os.path.join(ROOT, "tests", "fixtures", "python_random.json")
with open(path, "w") as f:
    json.dump(out, f)
print("wrote", path)
