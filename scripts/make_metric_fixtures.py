"""Parity fixtures for xrayglm's report metrics (src/eval/metrics.rs), computed with pycocoevalcap
from PyPI (Bleu(4) with option "closest", Rouge (beta 1.2), Cider = CIDEr-D) and nltk
(sentence_bleu over characters with SmoothingFunction().method3) and rouge-chinese on jieba words
(LLaMA-Factory's ROUGE-1/2/L), as ChatGLM's / LLaMA-Factory's evaluation, on fixed
hypothesis/reference corpora built from OpenI-zh / OpenI-en reports: identical, empty, unrelated,
truncated and shuffled hypotheses, one and two references per image.

Tokenization is xrayglm's definition (the module docs of src/eval/metrics.rs), written here again
so the fixtures do not depend on our code: every CJK character, punctuation or other non-space
mark is a token; a run of ASCII letters/digits (with '.' between digits) is one token; English is
lower-cased first. pycocoevalcap receives the tokens joined by single spaces.

Run: $(bash scripts/fixtures_venv.sh) -m pip install pycocoevalcap nltk rouge-chinese jieba
     $(bash scripts/fixtures_venv.sh) scripts/make_metric_fixtures.py ../shared
Writes tests/fixtures/metrics/coco.json.
"""
import json
import os
import random
import sys

from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
import jieba
from pycocoevalcap.bleu.bleu import Bleu
from rouge_chinese import Rouge as RougeChinese
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge


DIGITS = "0123456789"


def tokenize(text, lang):
    if lang == "en":
        text = text.lower()
    out, i = [], 0
    alnum = lambda c: c.isascii() and c.isalnum()
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif alnum(c):
            j = i
            while j < len(text) and (alnum(text[j]) or (
                    text[j] == "." and text[j - 1] in DIGITS and j + 1 < len(text) and text[j + 1] in DIGITS)):
                j += 1
            out.append(text[i:j])
            i = j
        else:
            out.append(c)
            i += 1
    return out


def score(hyps, refs, lang):
    res = {i: [" ".join(tokenize(h, lang))] for i, h in enumerate(hyps)}
    gts = {i: [" ".join(tokenize(r, lang)) for r in rs] for i, rs in enumerate(refs)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    # ChatGLM ptuning / LLaMA-Factory: per sample, characters, first reference, rounded x100.
    nltk = [float(sentence_bleu([list(rs[0])], list(h), smoothing_function=SmoothingFunction().method3))
            for h, rs in zip(hyps, refs)]
    # LLaMA-Factory (ChatGLM's ptuning plus an empty guard): jieba words, rouge-chinese F, x100.
    rouge_cn = []
    for h, rs in zip(hyps, refs):
        hw, rw = list(jieba.cut(h)), list(jieba.cut(rs[0]))
        if len(" ".join(hw).split()) == 0 or len(" ".join(rw).split()) == 0:
            rouge_cn.append([0.0, 0.0, 0.0])
        else:
            sc = RougeChinese().get_scores(" ".join(hw), " ".join(rw))[0]
            rouge_cn.append([float(sc[k]["f"]) for k in ("rouge-1", "rouge-2", "rouge-l")])
    return {"bleu": [float(b) for b in bleu], "rouge_l": float(rouge), "cider": float(cider),
            "nltk_char_bleu4": nltk, "chatglm_bleu4": sum(round(b * 100, 4) for b in nltk) / len(nltk),
            "rouge_chinese": rouge_cn,
            "chatglm_rouge": [sum(round(r[k] * 100, 4) for r in rouge_cn) / len(rouge_cn) for k in range(3)]}


def corpus(reports, rng, lang):
    """Ten images: hypotheses of every kind against one or two references."""
    picked = rng.sample(reports, 14)
    refs, hyps = [], []
    for k in range(10):
        ref = picked[k]
        rs = [ref] if k % 3 else [ref, picked[10 + k % 4]]
        kind = k % 5
        if kind == 0:
            hyp = ref                                   # identical
        elif kind == 1:
            hyp = picked[(k + 5) % 10]                  # another image's report
        elif kind == 2:
            hyp = ref[: max(1, len(ref) // 2)]          # truncated
        elif kind == 3:
            parts = ref.replace("。", "。\n").replace(". ", ".\n").split("\n")
            rng.shuffle(parts)
            hyp = "".join(parts) if lang == "zh" else " ".join(parts)  # sentences shuffled
        else:
            hyp = ""                                    # empty
        hyps.append(hyp)
        refs.append(rs)
    return hyps, refs


def main():
    jieba.setLogLevel(60)
    shared = sys.argv[1] if len(sys.argv) > 1 else "../shared"
    zh = [a["caption"] for a in json.load(open(os.path.join(shared, "data/Xray/openi-zh.json")))["annotations"]]
    en = [a["caption"] for a in json.load(open(os.path.join(shared, "data/openi-en.json")))["annotations"]]
    rng = random.Random(7)
    cases = []
    for lang, reports in [("zh", zh), ("en", en)]:
        for c in range(2):
            hyps, refs = corpus(reports, rng, lang)
            cases.append({"name": f"{lang}-corpus-{c}", "lang": lang, "hyps": hyps, "refs": refs})
    one = zh[3]
    cases.append({"name": "zh-identical-pair", "lang": "zh", "hyps": [one, zh[4]], "refs": [[one], [zh[4]]]})
    ranges = [z for z in zh if "-" in z][:2]
    cases.append({"name": "zh-ranges-and-lines", "lang": "zh",
                  "hyps": [ranges[0], ranges[1].replace("。", "。\n\n", 1), "印象：3-5个 \n 结节"],
                  "refs": [[ranges[1]], [ranges[1]], [ranges[0]]]})
    cases.append({"name": "zh-unrelated-pairs", "lang": "zh", "hyps": [zh[5], zh[6]], "refs": [[en[5]], [zh[9]]]})
    # ASCII runs that jieba's HMM step cuts with ([a-zA-Z0-9]+(?:\.\d+)?%?): ranges, ordinals,
    # units glued to numbers, percentages, abbreviations, dictionary words with symbols.
    runs = ["The 5th and 7th ribs; a 3.5cm nodule, 2nd-3rd ribs, T12-L1 and C5-6. andVpumona.7 e.g. 12.5%",
            "x-ray 2cm 10mm 4.5th 1.2.3 H2O AP/PA COPD-related AT&T c++ a--b x_1 #3",
            "右肺3-5mm结节，第5th肋骨，2nd-3rd肋骨骨折，12.5%，T7-T8。"]
    cases.append({"name": "mixed-ascii-runs", "lang": "en", "hyps": runs,
                  "refs": [[runs[1]], [runs[0]], [runs[2].replace("3-5", "3.5")]]})
    for c in cases:
        c.update(score(c["hyps"], c["refs"], c["lang"]))
        c["tokens_first_hyp"] = tokenize(c["hyps"][0], c["lang"])
        c["jieba_hyps"] = [list(jieba.cut(h)) for h in c["hyps"]]
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests/fixtures/metrics/coco.json")
    with open(out + ".tmp", "w") as f:
        json.dump({"generator": "scripts/make_metric_fixtures.py (pycocoevalcap)", "cases": cases}, f,
                  ensure_ascii=False, indent=1)
    os.replace(out + ".tmp", out)
    for c in cases:
        print(c["name"], [round(b, 4) for b in c["bleu"]], round(c["rouge_l"], 4), round(c["cider"], 4))


if __name__ == "__main__":
    main()
