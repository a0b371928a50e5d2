"""Sample indices of sat 0.3.6's RandomMappingDataset (the with-replacement sampler XrayGLM trained
with, docs/reference.md §5.5), from the original class.

Run:  $(bash scripts/fixtures_venv.sh) scripts/make_sampler_fixtures.py   (writes tests/fixtures/sat_sampler.json)
"""
import ast
import json
import os
import random

import importlib.util

import numpy as np
import torch.utils.data as data


def original_class():
    """sat's RandomMappingDataset, compiled from sat's own source file. Importing the module itself
    drags in `datasets` / `transformers` versions that conflict with this venv, so only the class
    definition is executed (with the module's `random`, `np` and `data`)."""
    sat_dir = importlib.util.find_spec("sat").submodule_search_locations[0]  # locate without importing
    path = os.path.join(sat_dir, "data_utils", "configure_data.py")
    tree = ast.parse(open(path).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RandomMappingDataset")
    ns = {"random": random, "np": np, "data": data}
    exec(compile(ast.Module(body=[cls], type_ignores=[]), path, "exec"), ns)
    return ns["RandomMappingDataset"]


RandomMappingDataset = original_class()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
out = {}
for n in [6423, 5, 1000003]:
    ds = RandomMappingDataset(list(range(n)))
    idx = list(range(0, 64)) + list(range(9568, 9600)) + [123456, 1284599]
    out[str(n)] = {"index": idx, "sample": [ds[i] for i in idx]}
path = os.path.join(ROOT, "tests", "fixtures", "sat_sampler.json")
with open(path, "w") as f:
    json.dump(out, f)
print("wrote", path)
