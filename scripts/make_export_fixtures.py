"""PEFT check of `xrayglm export --format peft` (tests/fixtures/export/).

1. Exports the tiny XrayGLM-format sat checkpoint that make_model_fixtures.py wrote
   (tests/fixtures/model/a/sat: LoRA rank 4 on layers 0 and 2, head-first qkv) with the release
   binary: `xrayglm export --format peft`.
2. The reference: sat 0.3.6's own LoraLinear layers (the fixture model assembly, the checkpoint's
   `module` loaded), each adapted Linear applied to random inputs.
3. The adapter applied by the `peft` package (PeftModel.from_pretrained) to a plain torch module tree
   with the HF visualglm-6b names and the checkpoint's frozen weights — plus a vision-tower
   `attention.dense` decoy that the adapter must leave alone.
4. Writes the exported adapter files and peft_check.json (peft version, per-module max abs error
   against sat, the tolerance) to tests/fixtures/export/. tests/export.rs re-exports and requires
   the same tensors and config, so the CI checks that today's export is the one PEFT verified.

Run: $(bash scripts/fixtures_venv.sh) -m pip install SwissArmyTransformer==0.3.6 peft==0.15.2
     cargo build --release && $(bash scripts/fixtures_venv.sh) scripts/make_export_fixtures.py
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_model_fixtures import CONFIGS, ROOT, build  # noqa: E402

TOL = 1e-5  # max abs difference, fp32, outputs of order 1


def Linear(w, b):
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def hf_tree(sd, layers):
    """transformer.layers.N.attention.{query_key_value,dense} and a vision-tower decoy."""
    root = nn.Module()
    root.transformer = nn.Module()
    root.transformer.layers = nn.ModuleList()
    for i in range(layers):
        layer = nn.Module()
        layer.attention = nn.Module()
        for m in ("query_key_value", "dense"):
            p = "transformer.layers.%d.attention.%s." % (i, m)
            w = sd.get(p + "original.weight", sd.get(p + "weight"))
            b = sd.get(p + "original.bias", sd.get(p + "bias"))
            setattr(layer.attention, m, Linear(w, b))
        root.transformer.layers.append(layer)
    root.image_encoder = nn.Module()
    root.image_encoder.vit = nn.Module()
    root.image_encoder.vit.attention = nn.Module()
    p = "mixins.eva.model.vit.transformer.layers.0.attention.dense."
    root.image_encoder.vit.attention.dense = Linear(sd[p + "weight"], sd[p + "bias"])
    return root


def main():
    import peft
    from peft import PeftModel

    c = CONFIGS["a"]
    sat_dir = os.path.join(ROOT, "tests", "fixtures", "model", "a", "sat")
    out_dir = os.path.join(ROOT, "tests", "fixtures", "export")
    binary = os.path.join(ROOT, "target", "release", "xrayglm")
    tmp = tempfile.mkdtemp()
    export = os.path.join(tmp, "peft")
    subprocess.run([binary, "export", "--from_pretrained", sat_dir, "--format", "peft", "--to", export], check=True)

    sd = torch.load(os.path.join(sat_dir, "300", "mp_rank_00_model_states.pt"), map_location="cpu",
                    weights_only=False)["module"]
    model, _ = build(c)
    model.load_state_dict(sd, strict=False)
    model.eval()
    layers = c["glm"]["num_layers"]
    tree = hf_tree(sd, layers)
    decoy_before = tree.image_encoder.vit.attention.dense.weight.detach().clone()
    wrapped = PeftModel.from_pretrained(tree, export)
    wrapped.eval()
    inner = wrapped.base_model.model
    g = torch.Generator().manual_seed(7)
    hidden = c["glm"]["hidden_size"]
    x = torch.randn(2, 5, hidden, generator=g)
    errors = {}
    adapted = 0
    with torch.no_grad():
        for i in range(layers):
            for m in ("query_key_value", "dense"):
                ours = getattr(inner.transformer.layers[i].attention, m)(x)
                ref = getattr(model.transformer.layers[i].attention, m)(x)
                name = "transformer.layers.%d.attention.%s" % (i, m)
                is_lora = isinstance(getattr(inner.transformer.layers[i].attention, m), peft.tuners.lora.LoraLayer)
                adapted += is_lora
                errors[name] = {"adapted_by_peft": bool(is_lora),
                                "max_abs_error": float((ours - ref).abs().max()),
                                "delta_norm": float((ref - nn.functional.linear(
                                    x, *[sd["%s.original.%s" % (name, k)] if ("%s.original.weight" % name) in sd
                                         else sd["%s.%s" % (name, k)] for k in ("weight", "bias")])).norm())}
        decoy = inner.image_encoder.vit.attention.dense
        assert not isinstance(decoy, peft.tuners.lora.LoraLayer), "the vision tower's dense layer was adapted"
        assert torch.equal(decoy.weight, decoy_before)
    worst = max(e["max_abs_error"] for e in errors.values())
    lora_layers = c["lora"]["layers"]
    assert adapted == 2 * len(lora_layers), adapted
    assert worst <= TOL, errors
    os.makedirs(out_dir, exist_ok=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(os.path.join(export, f), os.path.join(out_dir, f))
    with open(os.path.join(out_dir, "peft_check.json"), "w") as f:
        json.dump({"peft": peft.__version__, "torch": torch.__version__, "tolerance": TOL,
                   "max_abs_error": worst, "modules": errors}, f, indent=1, sort_keys=True)
    print("peft %s applied the exported adapter: max abs error %.3g vs sat (tolerance %g)" % (peft.__version__, worst, TOL))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
