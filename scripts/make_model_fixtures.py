"""Parity fixtures for the VisualGLM model, made by the original implementation.

Runs SwissArmyTransformer 0.3.6 (the version XrayGLM trained with; PyPI, CPU) on tiny random
configurations and writes, per configuration, under tests/fixtures/model/<name>/:

  model_config.json      sat-style config (num_layers, hidden_size, …, eva_args, qformer_args, LoRA)
  weights.safetensors    every parameter under sat's own names (LoRA layers as `…original.weight`,
                         `matrix_A.<p>`, and sat 0.3.6's single-partition `dense.matrix_A`)
  inputs.safetensors     input_ids, image, labels, pre_image
  outputs.safetensors    vit, qformer, image_embeds, logits, loss, and grad.<lora param name>

and for configuration "a" also the same weights as the checkpoints users meet:

  sat/        latest, 300/mp_rank_00_model_states.pt (torch.save of {"module": state_dict, DeepSpeed-style
              keys, an argparse.Namespace}), model_config.json  — XrayGLM's release layout
  hf/         config.json (eva_config / qformer_config), pytorch_model-0000{1,2}-of-00002.bin +
              pytorch_model.bin.index.json with HF names (image_encoder.*, lm_head.weight) and the LoRA
              merged into the base weights (W + scaling·B·A, head-first for qkv; spec §4 "Merge")

plus tests/fixtures/torch_pickle/: a torch.save file exercising the pickle reader (OrderedDict
with fp16 / bf16 / int64 tensors, a transposed view sharing storage, a parameter, nested dicts,
an argparse.Namespace beside `module`) and the expected tensors as safetensors.

The VisualGLM glue (EVAViT with ln_vision, the Q-Former, BLIP2's glm_proj, the image-splicing
ImageMixin and the LoRA placement) is assembled here from sat's own classes following
docs/reference.md §1 and §4; ChatGLM, the ViT, the transformer layers and the
LoRA mixin are sat's unmodified code.

Run:  $(bash scripts/fixtures_venv.sh) -m pip install SwissArmyTransformer==0.3.6 --no-deps
      $(bash scripts/fixtures_venv.sh) -m pip install requests tqdm filelock einops "transformers<4.50" "huggingface-hub<1.0" safetensors
      $(bash scripts/fixtures_venv.sh) scripts/make_model_fixtures.py
"""
import argparse
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

# sat's model-only mode starts torch.distributed with NCCL when the wheel has it; on CPU use gloo.
torch.distributed.is_nccl_available = lambda: False
os.environ.setdefault("MASTER_PORT", "29561")
from sat.model.base_model import BaseMixin, BaseModel
from sat.model.finetune.lora_mixin import LoraMixin
from sat.model.official.chatglm_model import ChatGLMModel
from sat.model.official.vit_model import ViTModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def namespace(**kw):
    base = dict(model_parallel_size=1, skip_init=False, hidden_dropout=0.0, attention_dropout=0.0,
                checkpoint_activations=False, checkpoint_num_layers=1, layernorm_order="pre",
                use_final_layernorm=True, layernorm_epsilon=1e-5, inner_hidden_size=None,
                hidden_size_per_attention_head=None, is_decoder=False, cross_attn_hidden_size=None,
                use_bias=True)
    base.update(kw)
    return argparse.Namespace(**base)


class LnVision(BaseMixin):
    def __init__(self, hidden):
        super().__init__()
        self.ln_vision = nn.LayerNorm(hidden)  # eps 1e-5 (torch default)

    def final_forward(self, logits, **kw):
        return self.ln_vision(logits)


class EVAViT(ViTModel):
    def __init__(self, args):
        super().__init__(args)
        self.del_mixin("cls")
        self.add_mixin("cls", LnVision(args.hidden_size))

    def forward(self, image):
        ids = torch.zeros(image.shape[0], 1, dtype=torch.long)
        mask = torch.tensor([[1.0]])
        return super().forward(input_ids=ids, position_ids=None, attention_mask=mask, image=image)


class QFormer(BaseModel):
    def __init__(self, args):
        super().__init__(args, activation_func=F.gelu)
        self.transformer.position_embeddings = None

    def position_embedding_forward(self, position_ids, **kw):
        return None

    def final_forward(self, logits, **kw):
        return logits

    def forward(self, enc):
        n = self.transformer.word_embeddings.weight.shape[0]
        ids = torch.arange(n, dtype=torch.long).unsqueeze(0).expand(enc.shape[0], -1)
        mask = torch.tensor([[1.0]])
        return super().forward(input_ids=ids, position_ids=None, attention_mask=mask,
                               encoder_outputs=enc, cross_attention_mask=mask)


class BLIP2(nn.Module):
    def __init__(self, eva_args, qformer_args, glm_hidden):
        super().__init__()
        self.vit = EVAViT(eva_args)
        self.qformer = QFormer(qformer_args)
        self.glm_proj = nn.Linear(qformer_args.hidden_size, glm_hidden)
        self.captured = {}

    def forward(self, image):
        enc = self.vit(image)[0]
        out = self.qformer(enc)[0]
        emb = self.glm_proj(out)
        self.captured = {"vit": enc, "qformer": out, "image_embeds": emb}
        return emb


class ImageMixin(BaseMixin):
    def __init__(self, eva_args, qformer_args, glm_hidden, image_length):
        super().__init__()
        self.model = BLIP2(eva_args, qformer_args, glm_hidden)
        self.image_length = image_length

    def word_embedding_forward(self, input_ids, output_cross_layer, **kw):
        if kw.get("image") is None or kw["pre_image"] > input_ids.shape[1]:
            return self.transformer.word_embeddings(input_ids)
        image_emb = self.model(kw["image"])
        pre, _, post = torch.tensor_split(input_ids, [kw["pre_image"], kw["pre_image"] + self.image_length], dim=1)
        return torch.cat([self.transformer.word_embeddings(pre), image_emb, self.transformer.word_embeddings(post)], dim=1)


class FineTuneVisualGLM(ChatGLMModel):
    def __init__(self, args, eva_args, qformer_args, lora_layers, lora_rank):
        super().__init__(args)
        self.add_mixin("eva", ImageMixin(eva_args, qformer_args, args.hidden_size, args.image_length))
        self.add_mixin("lora", LoraMixin(args.num_layers, lora_rank, layer_range=lora_layers, head_first=True,
                                         num_attention_heads=args.num_attention_heads,
                                         hidden_size_per_attention_head=args.hidden_size // args.num_attention_heads),
                       reinit=True)


CONFIGS = {
    "a": dict(glm=dict(num_layers=3, hidden_size=64, num_attention_heads=4, inner_hidden_size=256, vocab_size=1000,
                       bos=994, mask=990, gmask=991),
              vit=dict(num_layers=2, hidden_size=48, num_attention_heads=4, inner_hidden_size=128, image=28, patch=14),
              qformer=dict(num_layers=2, hidden_size=32, num_attention_heads=4, queries=8),
              lora=dict(layers=[0, 2], rank=4), pre_image=3, lens=[30, 24], seed=11),
    "b": dict(glm=dict(num_layers=2, hidden_size=96, num_attention_heads=6, inner_hidden_size=200, vocab_size=777,
                       bos=770, mask=760, gmask=761),
              vit=dict(num_layers=3, hidden_size=40, num_attention_heads=5, inner_hidden_size=100, image=42, patch=14),
              qformer=dict(num_layers=3, hidden_size=48, num_attention_heads=6, queries=5),
              lora=dict(layers=[1], rank=3), pre_image=2, lens=[24, 30, 22], seed=23),
}


def build(c):
    g, v, q = c["glm"], c["vit"], c["qformer"]
    args = namespace(num_layers=g["num_layers"], hidden_size=g["hidden_size"], num_attention_heads=g["num_attention_heads"],
                     inner_hidden_size=g["inner_hidden_size"], vocab_size=g["vocab_size"], max_sequence_length=256,
                     layernorm_order="post", bos_token_id=g["bos"], mask_token_id=g["mask"], gmask_token_id=g["gmask"],
                     image_length=q["queries"])
    grid = (v["image"] // v["patch"]) ** 2
    eva = dict(num_layers=v["num_layers"], hidden_size=v["hidden_size"], num_attention_heads=v["num_attention_heads"],
               vocab_size=1, layernorm_order="pre", model_parallel_size=1, max_sequence_length=grid + 1,
               inner_hidden_size=v["inner_hidden_size"], use_final_layernorm=False, layernorm_epsilon=1e-6,
               image_size=[v["image"], v["image"]], pre_len=1, post_len=0, in_channels=3, num_classes=0,
               patch_size=v["patch"])
    qf = dict(num_layers=q["num_layers"], hidden_size=q["hidden_size"], num_attention_heads=q["num_attention_heads"],
              vocab_size=q["queries"], layernorm_order="post", model_parallel_size=1, max_sequence_length=1,
              is_decoder=[i % 2 == 0 for i in range(q["num_layers"])], cross_attn_hidden_size=v["hidden_size"],
              layernorm_epsilon=1e-12)
    model = FineTuneVisualGLM(args, namespace(**eva), namespace(**qf), c["lora"]["layers"], c["lora"]["rank"])
    config = {"model_class": "FineTuneVisualGLMModel", "tokenizer_type": "THUDM/chatglm-6b",
              "num_layers": g["num_layers"], "hidden_size": g["hidden_size"], "num_attention_heads": g["num_attention_heads"],
              "vocab_size": g["vocab_size"], "inner_hidden_size": g["inner_hidden_size"], "layernorm_order": "post",
              "model_parallel_size": 1, "max_sequence_length": 256, "image_length": q["queries"],
              "eva_args": eva, "qformer_args": {k: v2 for k, v2 in qf.items() if k != "max_sequence_length"},
              "bos_token_id": g["bos"], "mask_token_id": g["mask"], "gmask_token_id": g["gmask"], "pad_token_id": 3,
              "use_lora": True, "lora_rank": c["lora"]["rank"], "layer_range": c["lora"]["layers"],
              "pre_seq_len": 4, "use_ptuning": False, "use_qlora": False}
    return model, config


def randomize(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "ln_vision" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "matrix_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:  # Linear / conv weights [out, in, ...]: unit-variance outputs
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def make_inputs(c, gen):
    g, q = c["glm"], c["qformer"]
    pre, L = c["pre_image"], q["queries"]
    seqs, labels = [], []
    S = max(c["lens"])
    for n in c["lens"]:
        src_len = pre + L + 6 + int(torch.randint(0, 4, (1,), generator=gen))
        tgt_len = n - src_len - 3
        assert tgt_len >= 1, (n, src_len)
        body = lambda k: torch.randint(10, g["mask"] - 10, (k,), generator=gen).tolist()
        ids = body(pre) + [3] * L + body(src_len - pre - L) + [g["gmask"], g["bos"]] + body(tgt_len) + [5]
        ctx = ids.index(g["bos"])
        lab = [-100] * ctx + ids[ctx:]
        ids += [3] * (S - len(ids))
        lab += [-100] * (S - len(lab))
        seqs.append(ids)
        labels.append(lab)
    v = c["vit"]
    image = torch.randn(len(seqs), 3, v["image"], v["image"], generator=gen)
    return torch.tensor(seqs), torch.tensor(labels), image


def merged_hf_state(model, config, c):
    """HF-named weights with the LoRA folded in (what a merged XrayGLM export would hold)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if "inv_freq" not in k}
    heads = config["num_attention_heads"]
    scaling = 1.0 / c["lora"]["rank"]
    out = {}
    for k, v in sd.items():
        if "matrix_" in k or k == "transformer.position_embeddings.weight":
            continue
        name = k.replace(".original.", ".")
        if k.endswith("query_key_value.original.weight") and k.startswith("transformer.layers."):
            p = k[: -len("original.weight")]
            parts = [(sd[p + "matrix_B.%d" % i] @ sd[p + "matrix_A.%d" % i]) * scaling for i in range(3)]
            hd = parts[0].shape[0] // heads
            delta = torch.stack([t.view(heads, hd, -1) for t in parts], 1).reshape(v.shape)
            v = v + delta
        elif k.endswith("dense.original.weight") and k.startswith("transformer.layers."):
            p = k[: -len("original.weight")]
            v = v + (sd[p + "matrix_B"] @ sd[p + "matrix_A"]) * scaling
        if name.startswith("mixins.eva.model."):
            name = "image_encoder." + name[len("mixins.eva.model."):]
        elif name == "mixins.chatglm-final.lm_head.weight":
            name = "lm_head.weight"
        out[name] = v.contiguous()
    for i in range(config["num_layers"]):
        out["transformer.layers.%d.attention.rotary_emb.inv_freq" % i] = torch.ones(2)  # ignored buffer
    return out


def write_checkpoints(model, config, c, out_dir):
    from collections import OrderedDict
    sat_dir = os.path.join(out_dir, "sat")
    os.makedirs(os.path.join(sat_dir, "300"), exist_ok=True)
    module = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    torch.save({"module": module, "iteration": 300, "buffer_names": [], "dp_world_size": 4, "mp_world_size": 1,
                "client_lr_scheduler": {"start_lr": 1e-4, "warmup_iter": 6, "num_iters": 300,
                                        "decay_style": "cosine", "end_iter": 300, "decay_ratio": 0.1},
                "args": argparse.Namespace(lr=1e-4, train_iters=300, fp16=True)},
               os.path.join(sat_dir, "300", "mp_rank_00_model_states.pt"))
    with open(os.path.join(sat_dir, "latest"), "w") as f:
        f.write("300")
    with open(os.path.join(sat_dir, "model_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    hf_dir = os.path.join(out_dir, "hf")
    os.makedirs(hf_dir, exist_ok=True)
    hf = merged_hf_state(model, config, c)
    names = sorted(hf)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(shards):
        fname = "pytorch_model-%05d-of-00002.bin" % (i + 1)
        torch.save(OrderedDict((k, hf[k]) for k in part), os.path.join(hf_dir, fname))
        weight_map.update({k: fname for k in part})
    with open(os.path.join(hf_dir, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=1)
    hf_config = {"architectures": ["ChatGLMForConditionalGenerationWithImage"], "model_type": "chatglm",
                 "num_layers": config["num_layers"], "hidden_size": config["hidden_size"],
                 "num_attention_heads": config["num_attention_heads"], "vocab_size": config["vocab_size"],
                 "inner_hidden_size": config["inner_hidden_size"], "layernorm_epsilon": 1e-5,
                 "max_sequence_length": config["max_sequence_length"], "bos_token_id": config["bos_token_id"],
                 "eos_token_id": 5, "mask_token_id": config["mask_token_id"], "gmask_token_id": config["gmask_token_id"],
                 "pad_token_id": 3, "position_encoding_2d": True, "torch_dtype": "float32",
                 "image_length": config["image_length"], "eva_config": config["eva_args"],
                 "qformer_config": config["qformer_args"]}
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=1)


def write_pickle_fixture():
    from collections import OrderedDict
    d = os.path.join(ROOT, "tests", "fixtures", "torch_pickle")
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(4, 6, generator=g)
    half = torch.randn(3, 5, generator=g).half()
    bf = torch.randn(2, 7, generator=g).bfloat16()
    longs = torch.arange(10, dtype=torch.int64) * 1000003
    module = OrderedDict([
        ("a.weight", base),
        ("a.weight_t", base.t()),            # a transposed view of the same storage
        ("a.slice", base[1:3, 2:5]),         # an offset, strided view
        ("b.half", half),
        ("c.bf16", bf),
        ("d.long", longs),
        ("e.param", torch.nn.Parameter(torch.ones(3) * 2.5)),
        ("f.scalar", torch.tensor(7.25)),
    ])
    torch.save({"module": module, "args": argparse.Namespace(lr=1e-4, layer_range=[0, 14]), "iteration": 300,
                "nested": {"x": [1, 2.5, "s", None, True], "big": 2 ** 40}},
               os.path.join(d, "ckpt.pt"))
    expected = {k: (v.detach().contiguous().float() if v.dtype != torch.int64 else v.contiguous())
                for k, v in module.items()}
    save_file(expected, os.path.join(d, "expected.safetensors"))


TRAIN = dict(steps=5, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, clip=0.1,
             train_iters=5, warmup_iter=1, decay_ratio=0.1, auto_warmup_steps=2, auto_warmup_rate=0.5)


def train_trajectory(model, ids, labels, image, pre):
    """5 LoRA steps on the fixed batch the way sat + DeepSpeed run them: AnnealingLR (sat's own
    class, finetune mode: last_iter=0), Adam in AdamW mode (torch.optim.AdamW computes DeepSpeed
    FusedAdam's adam_w_mode update), global-norm clipping as deepspeed's clip_grad_norm_."""
    from sat.training.learning_rates import AnnealingLR
    t = TRAIN
    lora = sorted((n, p) for n, p in model.named_parameters() if "matrix_" in n)
    params = [p for _, p in lora]
    opt = torch.optim.AdamW(params, lr=t["lr"], betas=t["betas"], eps=t["eps"], weight_decay=t["weight_decay"])
    sched = AnnealingLR(opt, start_lr=t["lr"], warmup_iter=t["warmup_iter"], num_iters=t["train_iters"],
                        decay_style="cosine", last_iter=0, decay_ratio=t["decay_ratio"],
                        auto_warmup_steps=t["auto_warmup_steps"], auto_warmup_rate=t["auto_warmup_rate"])
    losses, lrs = [], []
    for _ in range(t["steps"]):
        opt.zero_grad()
        logits = model(input_ids=ids, image=image, pre_image=pre)[0]
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t["clip"])
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        losses.append(float(loss))
    out = {"train_losses": torch.tensor(losses, dtype=torch.float64), "train_lrs": torch.tensor(lrs, dtype=torch.float64)}
    out.update({"final." + n: p.detach().clone().contiguous() for n, p in lora})
    return out


GENERATE = dict(new_tokens=24, end_token=5, penalty=1.2, temperature=0.8)


def glm_masks_and_positions(seq, mask_position, context_length):
    """VisualGLM chat.py's get_masks_and_position_ids_glm: bidirectional over the context, causal
    after; positions frozen at the [gMASK] index, block positions counting from <sop> (= 1)."""
    tokens = seq.unsqueeze(0)
    n = len(seq)
    mask = torch.ones((1, n, n)).tril_()
    mask[..., :context_length] = 1
    pos = torch.zeros(2, n, dtype=torch.long)
    pos[0, :context_length] = torch.arange(context_length)
    pos[0, context_length:] = mask_position
    pos[1, context_length:] = torch.arange(1, n - context_length + 1)
    return tokens, mask.unsqueeze(1), pos.unsqueeze(0)


def generation(model, c, gen):
    """sat 0.3.6's filling_sequence with the KV cache (CachedAutoregressiveMixin) and BaseStrategy,
    as XrayGLM's chat() calls it: greedy (top_k = 1), and greedy with sat's repetition penalty
    (logits / (temperature * 1.2) for tokens already generated)."""
    from sat.generation.autoregressive_sampling import filling_sequence
    from sat.generation.sampling_strategies import BaseStrategy
    from sat.model.cached_autoregressive_model import CachedAutoregressiveMixin
    g, q, pre = c["glm"], c["qformer"], c["pre_image"]
    body = lambda k: torch.randint(10, g["mask"] - 10, (k,), generator=gen).tolist()
    ids = body(pre) + [3] * q["queries"] + body(7) + [g["gmask"], g["bos"]]
    v = c["vit"]
    image = torch.randn(1, 3, v["image"], v["image"], generator=gen)
    t = GENERATE
    seq = torch.tensor(ids + [-1] * t["new_tokens"])
    mp, cl = len(ids) - 2, len(ids) - 1
    model.add_mixin("auto-regressive", CachedAutoregressiveMixin())
    out = {"gen_input_ids": torch.tensor([ids]), "gen_image": image, "gen_pre_image": torch.tensor([pre])}
    for name, strategy in [
        ("greedy", BaseStrategy(temperature=1.0, top_k=1, end_tokens=[t["end_token"]])),
        ("penalty", BaseStrategy(temperature=t["temperature"], top_k=1, repetition_penalty=t["penalty"],
                                 end_tokens=[t["end_token"]])),
    ]:
        with torch.no_grad():
            tokens = filling_sequence(model, seq.clone(), batch_size=1, strategy=strategy,
                                      get_masks_and_position_ids=lambda s: glm_masks_and_positions(s, mp, cl),
                                      image=image, pre_image=pre)[0]
        out["tokens_" + name] = tokens[0, len(ids):].clone()
    model.del_mixin("auto-regressive")
    return out


def main():
    write_pickle_fixture()
    for name, c in CONFIGS.items():
        torch.manual_seed(c["seed"])
        gen = torch.Generator().manual_seed(c["seed"])
        model, config = build(c)
        randomize(model, gen)
        model.eval()
        ids, labels, image = make_inputs(c, gen)
        for n, p in model.named_parameters():
            p.requires_grad_("matrix_" in n)
        logits = model(input_ids=ids, image=image, pre_image=c["pre_image"])[0]
        cap = model.mixins["eva"].model.captured
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        out_dir = os.path.join(ROOT, "tests", "fixtures", "model", name)
        os.makedirs(out_dir, exist_ok=True)
        weights = {k: v.detach().contiguous() for k, v in model.state_dict().items() if "inv_freq" not in k}
        save_file(weights, os.path.join(out_dir, "weights.safetensors"))
        save_file({"input_ids": ids, "labels": labels, "image": image.contiguous(),
                   "pre_image": torch.tensor([c["pre_image"]])}, os.path.join(out_dir, "inputs.safetensors"))
        outputs = {"vit": cap["vit"], "qformer": cap["qformer"], "image_embeds": cap["image_embeds"],
                   "logits": logits, "loss": loss.reshape(1)}
        for n, p in model.named_parameters():
            if p.grad is not None:
                outputs["grad." + n] = p.grad
        save_file({k: v.detach().contiguous() for k, v in outputs.items()}, os.path.join(out_dir, "outputs.safetensors"))
        with open(os.path.join(out_dir, "model_config.json"), "w") as f:
            json.dump(config, f, indent=1)
        gen_out = generation(model, c, torch.Generator().manual_seed(c["seed"] + 1000))
        save_file({k: v.contiguous() for k, v in gen_out.items()}, os.path.join(out_dir, "generate.safetensors"))
        with open(os.path.join(out_dir, "generate.json"), "w") as f:
            json.dump(GENERATE, f, indent=1)
        print(name, "greedy", gen_out["tokens_greedy"].tolist(), "penalty", gen_out["tokens_penalty"].tolist())
        if name == "a":
            write_checkpoints(model, config, c, out_dir)
            traj = train_trajectory(model, ids, labels, image, c["pre_image"])
            save_file(traj, os.path.join(out_dir, "train.safetensors"))
            with open(os.path.join(out_dir, "train.json"), "w") as f:
                json.dump(TRAIN, f, indent=1)
            print("train losses", traj["train_losses"].tolist(), "lrs", traj["train_lrs"].tolist())
        print(name, "loss", float(loss), "logits", tuple(logits.shape), "params", len(weights),
              "lora grads", sum(1 for k in outputs if k.startswith("grad.")))


if __name__ == "__main__":
    main()
