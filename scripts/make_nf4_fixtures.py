"""bitsandbytes' NF4 on a few weight matrices (tests/fixtures/nf4/bnb_nf4.safetensors).

xrayglm's NF4 (src/model/nf4.rs, written from the QLoRA paper's definition) is checked against
`bitsandbytes` where it runs on this CPU. It does (bitsandbytes 0.50.2 on
torch 2.11.0, CPU): `quantize_4bit(w, quant_type="nf4", blocksize=64)` without double
quantization (`compress_statistics=False`, its default), then `dequantize_4bit`. Written per case:
the weight, bitsandbytes' code table, the code index of every weight (the packed nibbles unpacked,
high nibble first), the per-block absmax and the dequantized weight. tests/model.rs requires our
quantizer to pick the same index for every weight and to dequantize to the same values.

Run: python3 -m venv /opt/xrayglm/bnb-venv  (torch 2.11.0 + its nvidia wheels, bitsandbytes,
safetensors; see the README's NF4 notes), then
     /opt/xrayglm/bnb-venv/bin/python scripts/make_nf4_fixtures.py
"""
import json
import os

import bitsandbytes
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "nf4", "bnb_nf4.safetensors")

torch.manual_seed(19)
cases = {
    # A layer-like matrix (rows × in), weights ~ N(0, 0.02) as the reference initialises them.
    "normal": torch.randn(96, 256) * 0.02,
    # Heavy tails and an element count that is not a multiple of 64 (bitsandbytes pads).
    "heavy": torch.distributions.StudentT(3.0).sample((37, 50)),
    # Blocks with exact zeros and one all-zero block.
    "sparse": torch.where(torch.rand(8, 64) < 0.5, torch.zeros(8, 64), torch.randn(8, 64)),
}
cases["sparse"][3].zero_()
tensors = {}
for name, w in cases.items():
    w = w.float().contiguous()
    q, st = quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=False)
    d = dequantize_4bit(q, st, quant_type="nf4", blocksize=64)
    packed = q.reshape(-1).to(torch.int32)
    idx = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[: w.numel()]
    # The indices and absmax reproduce bitsandbytes' own dequantization.
    absmax = st.absmax.float()
    again = st.code.float()[idx.long()] * absmax.repeat_interleave(64)[: w.numel()]
    assert torch.equal(again.reshape(w.shape), d.float()), name
    tensors[name + ".weight"] = w
    tensors[name + ".index"] = idx.to(torch.uint8)
    tensors[name + ".absmax"] = absmax
    tensors[name + ".dequantized"] = d.float().contiguous()
tensors["code"] = st.code.float()
meta = {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__,
        "blocksize": "64", "double_quant": "false"}
save_file(tensors, OUT, metadata=meta)
print("wrote", OUT, json.dumps(meta))
