//! VisualGLM-6B: ViT → Q-Former → glm_proj → image embeddings spliced into ChatGLM, with LoRA.
//!
//! Reference: docs/reference.md §1.0, §1.d (XrayGLM `model/visualglm.py`, `model/blip2.py BLIP2`).
//! The frozen weights live in one `VarStore` (any float kind) under sat names
//! (`transformer.…`, `mixins.chatglm-final.lm_head`, `mixins.eva.model.{vit,qformer,glm_proj}.…`);
//! the LoRA adapters in a second, float32, trainable store under the names of the layers they
//! adapt (`transformer.layers.<i>.attention.query_key_value.matrix_A.<p>` …). The same code runs
//! training and inference.

use anyhow::Result;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::chatglm::{ChatGlm, Dropouts, GlmInputs, ImageAt, LabelLogps, RowAdapters};
use super::config::ModelConfig;
use super::lora::{Adapted, Lora};
use super::nn::Linear;
use super::positions::{attention_mask, positions_from_ids};
use super::qformer::QFormer;
use super::vit::Vit;

pub struct VisualGlm {
    pub cfg: ModelConfig,
    /// Frozen weights (vision tower, Q-Former, glm_proj, ChatGLM).
    pub base: VarStore,
    /// Trainable LoRA weights (float32).
    pub lora: VarStore,
    pub vit: Vit,
    pub qformer: QFormer,
    pub glm_proj: Adapted,
    pub chatglm: ChatGlm,
}

/// Everything a forward pass produces that parity checks look at.
pub struct Outputs {
    pub vit: Option<Tensor>,
    pub qformer: Option<Tensor>,
    pub image_embeds: Option<Tensor>,
    pub logits: Tensor,
}

impl VisualGlm {
    /// Build with freshly initialised weights (N(0, 0.02), LoRA A uniform, B zero) on `device`,
    /// frozen weights in `kind`.
    pub fn new(cfg: ModelConfig, device: Device, kind: Kind) -> Result<Self> {
        if cfg.fan_in_init {
            let mut plain = cfg;
            plain.fan_in_init = false;
            let mut m = super::nn::with_fan_in_init(|| Self::new(plain, device, kind))?;
            m.cfg.fan_in_init = true;
            return Ok(m);
        }
        cfg.validate()?;
        // Sizes from a file are checked against the memory there is before anything is allocated
        // (libtorch's allocation failure would be a panic inside tch).
        cfg.check_fits(
            kind.elt_size_in_bytes(),
            crate::device::available_bytes(device),
        )?;
        let mut base = VarStore::new(device);
        // Set the kind first so variables are created in it (no transient fp32 copy).
        base.set_kind(kind);
        let lora = VarStore::new(device);
        let root = base.root();
        let eva = &root / "mixins" / "eva" / "model";
        // The vision side's adapters (model.lora.targets) live under the same names.
        let leva = lora.root() / "mixins" / "eva" / "model";
        let lc = cfg.lora.as_ref();
        let vit = Vit::new(&(&eva / "vit"), &(&leva / "vit"), &cfg.sat.eva_args, lc);
        let qformer = QFormer::new(
            &(&eva / "qformer"),
            &(&leva / "qformer"),
            &cfg.sat.qformer_args,
            lc,
        );
        let proj_lora = leva / "glm_proj";
        let glm_proj = Adapted::new(
            Linear::new(
                &(&eva / "glm_proj"),
                cfg.sat.qformer_args.hidden_size,
                cfg.sat.hidden_size,
                true,
            ),
            lc.filter(|l| l.targets.glm_proj).map(|l| (&proj_lora, l)),
        );
        let chatglm = ChatGlm::new(&root, &lora.root(), &cfg);
        base.freeze();
        Ok(Self {
            cfg,
            base,
            lora,
            vit,
            qformer,
            glm_proj,
            chatglm,
        })
    }

    /// Draw the LoRA weights afresh from `seed` alone (A ~ U(±1/√in), B = 0, in name order), so
    /// a fresh run starts from the same adapters whether its base was just drawn or loaded.
    pub fn init_lora(&self, seed: i64) {
        let vars = self.lora.variables();
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        // Drawn on the CPU whatever the device, so the adapters do not depend on it.
        tch::no_grad(|| {
            tch::manual_seed(seed);
            for n in names {
                let mut t = vars[n].shallow_clone();
                if n.contains("matrix_A") {
                    let fan_in = *t.size().last().unwrap_or(&1) as f64;
                    let bound = 1.0 / fan_in.sqrt();
                    let draw =
                        Tensor::empty(t.size(), (Kind::Float, Device::Cpu)).uniform_(-bound, bound);
                    t.copy_(&draw);
                } else {
                    let _ = t.zero_();
                }
            }
        });
    }

    /// Build with zero-filled frozen weights that are about to be loaded (fast, no random init).
    pub fn new_for_loading(cfg: ModelConfig, device: Device, kind: Kind) -> Result<Self> {
        super::nn::with_skip_init(|| Self::new(cfg, device, kind))
    }

    /// Where the frozen weights live.
    pub fn device(&self) -> Device {
        self.glm_proj.linear.weight.device()
    }

    /// Kind of the frozen weights.
    pub fn kind(&self) -> Kind {
        self.glm_proj.linear.weight.kind()
    }

    /// `(all, trainable)` parameters: the frozen weights and the adapters, and the adapters.
    pub fn parameter_counts(&self) -> (i64, i64) {
        let count = |vs: &tch::nn::VarStore| -> i64 {
            vs.variables().values().map(|t| t.numel() as i64).sum()
        };
        let trainable = count(&self.lora);
        (count(&self.base) + trainable, trainable)
    }

    /// Whether adapters sit on the vision side (ViT, Q-Former or glm_proj): then its output
    /// depends on trainable weights (no feature cache) and training backpropagates through it.
    pub fn vision_adapted(&self) -> bool {
        self.cfg.lora.as_ref().is_some_and(|l| l.targets.vision())
    }

    /// Activation checkpointing: recompute only the first `k` ChatGLM layers in the backward
    /// (`None`: every layer), when [`VisualGlm::loss_backward`] checkpoints.
    pub fn set_recompute_layers(&mut self, k: Option<usize>) {
        self.chatglm.recompute_layers = k;
    }

    /// The base seed of the per-layer dropout generators for the next step (the checkpointed
    /// backward recomputes the same masks from it).
    pub fn set_dropout_seed(&self, seed: i64) {
        self.chatglm.layer_seed.set(Some(seed));
    }

    /// Use libtorch's fused scaled-dot-product attention in every attention (ViT, Q-Former,
    /// ChatGLM) instead of the reference's op-by-op arithmetic. Same function; faster on GPU.
    pub fn set_fused_attention(&mut self, on: bool) {
        self.vit.fused_attention = on;
        self.qformer.fused_attention = on;
        self.chatglm.fused_attention = on;
    }

    /// Dropout everywhere in train mode (the reference trains with 0.1 in every part, §5.10).
    pub fn set_dropout(&mut self, vision: f64, glm: Dropouts) {
        self.vit.dropout = vision;
        self.qformer.dropout = vision;
        self.chatglm.dropout = glm;
    }

    /// ViT, Q-Former and projected image embeddings `[B, image_length, hidden]`. Without vision
    /// adapters (XrayGLM) the frozen vision side never records autograd history; with them it
    /// does in training, for their gradients.
    pub fn encode_image(&self, image: &Tensor, train: bool) -> (Tensor, Tensor, Tensor) {
        let run = || {
            let v = self.vit.forward(image, train);
            let q = self.qformer.forward(&v, train);
            let e = self.glm_proj.forward(&q, train);
            (v, q, e)
        };
        if train && self.vision_adapted() {
            run()
        } else {
            tch::no_grad(run)
        }
    }

    /// Every LoRA of the model with the sat name of the linear it adapts: ChatGLM's, then the
    /// ViT's, the Q-Former's and glm_proj's.
    pub fn loras(&self) -> Vec<(String, &Lora)> {
        let mut out = self.chatglm.loras();
        let eva = "mixins.eva.model";
        let vision = self
            .vit
            .adapted()
            .into_iter()
            .map(|(n, a)| (format!("{eva}.vit.{n}"), a))
            .chain(
                self.qformer
                    .adapted()
                    .into_iter()
                    .map(|(n, a)| (format!("{eva}.qformer.{n}"), a)),
            )
            .chain(
                self.glm_proj
                    .lora
                    .is_some()
                    .then(|| (format!("{eva}.glm_proj"), &self.glm_proj)),
            );
        for (name, a) in vision {
            if let Some(l) = &a.lora {
                out.push((name, l));
            }
        }
        out
    }

    /// Full forward. `position_ids [B, 2, S]` and `context_lengths` are derived from the ids when
    /// not given (as sat does in training).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        image: Option<&Tensor>,
        pre_image: i64,
        position_ids: Option<&Tensor>,
        context_lengths: Option<&[i64]>,
        train: bool,
    ) -> Result<Outputs> {
        let s = &self.cfg.sat;
        let derived;
        let (pos, ctx): (&Tensor, Vec<i64>) = match (position_ids, context_lengths) {
            (Some(p), Some(c)) => (p, c.to_vec()),
            _ => {
                derived = positions_from_ids(
                    input_ids,
                    s.bos_token_id,
                    s.mask_token_id,
                    s.gmask_token_id,
                )?;
                (&derived.0, derived.1.clone())
            }
        };
        let seq = input_ids.size()[1];
        let mask = attention_mask(&ctx, seq, input_ids.device());
        let (vit, qformer, embeds) = match image {
            Some(img) => {
                let (v, q, e) = self.encode_image(img, train);
                (Some(v), Some(q), Some(e))
            }
            None => (None, None, None),
        };
        let logits = self.chatglm.forward(
            &GlmInputs {
                input_ids,
                position_ids: pos,
                attention_mask: &mask,
                image_embeds: embeds.as_ref(),
                image_at: ImageAt::EachRow(pre_image),
            },
            train,
        );
        Ok(Outputs {
            vit,
            qformer,
            image_embeds: embeds,
            logits,
        })
    }
}

impl VisualGlm {
    /// Fold the LoRA deltas into the base weights (`W ← W + scaling·B·A`, placed head-first for
    /// the fused qkv) and stop adding them at run time. Idempotent.
    pub fn merge_lora(&mut self) -> Result<()> {
        if self.chatglm.lora_active {
            self.apply_lora_to_base(1.0)?;
            self.chatglm.lora_active = false;
        }
        self.merge_vision(true);
        Ok(())
    }

    /// Undo [`VisualGlm::merge_lora`] (up to the base kind's rounding).
    pub fn unmerge_lora(&mut self) -> Result<()> {
        if !self.chatglm.lora_active {
            self.apply_lora_to_base(-1.0)?;
            self.chatglm.lora_active = true;
        }
        self.merge_vision(false);
        Ok(())
    }

    fn merge_vision(&mut self, merged: bool) {
        self.vit.merge_lora(merged);
        self.qformer.merge_lora(merged);
        self.glm_proj.merge(merged);
    }

    /// Hold ChatGLM's layer linears as weight-only int8 (about a quarter of their memory; the
    /// original's `--quant 8`). Merge the LoRA first if it is to be merged: a quantized model
    /// keeps its adapters apart.
    pub fn quantize_int8(&mut self) {
        self.chatglm.quantize_int8();
    }

    /// Hold ChatGLM's layer linears as NF4 (QLoRA: ~4.1–4.5 bits per weight, dequantized on the
    /// fly in the compute kind; the LoRA stays fp32 on top).
    pub fn quantize_nf4(&mut self, double: bool) -> Result<()> {
        self.chatglm.quantize_nf4(double)
    }

    fn apply_lora_to_base(&mut self, sign: f64) -> Result<()> {
        if self.chatglm.is_quantized() {
            anyhow::bail!(
                "the model's weights are quantized (int8 or nf4): merge (or unmerge) the LoRA before quantizing"
            );
        }
        let mut vars = self.base.variables();
        for (prefix, lora) in self.chatglm.loras() {
            let name = format!("{prefix}.weight");
            let w = vars
                .get_mut(&name)
                .ok_or_else(|| anyhow::anyhow!("no base weight {name} for its LoRA"))?;
            super::lora::fold(w, &lora.delta_weight(), sign);
        }
        Ok(())
    }
}

/// The label of a position that takes no loss (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// The films of a batch as the model takes them.
#[derive(Clone, Copy)]
pub enum Images<'a> {
    /// Normalised pixels `[N, 3, H, W]`: the vision side runs on them.
    Pixels(&'a Tensor),
    /// Image embeddings `[N, image_length, hidden]` computed before (the training vision cache,
    /// eval's one vision pass per batch).
    Embeds(&'a Tensor),
}

/// One training batch as the model takes it (the loss, the training step, evaluation).
#[derive(Clone, Copy)]
pub struct BatchInputs<'a> {
    /// `[B, T]` token ids in XrayGLM's layout.
    pub input_ids: &'a Tensor,
    /// The batch's N films.
    pub images: Images<'a>,
    /// Where each film's embeddings go.
    pub image_at: ImageAt<'a>,
    /// `[B, 2, T]` ChatGLM 2-D positions.
    pub position_ids: &'a Tensor,
    /// Per row: the index of `<sop>` (the bidirectional prefix length).
    pub context_lengths: &'a [i64],
    /// `[B, T]` targets, −100 where no loss is taken.
    pub labels: &'a Tensor,
}

impl VisualGlm {
    /// Training step body: loss (fp32 value) and LoRA gradients (of `loss · scale`), with or
    /// without per-layer activation checkpointing.
    pub fn loss_backward(&self, b: &BatchInputs, scale: f64, checkpoint: bool) -> Result<f64> {
        if !checkpoint {
            let loss = self.loss(b, true);
            let v = loss.double_value(&[]);
            (loss * scale).backward();
            return Ok(v);
        }
        Ok(self.with_inputs(b, true, |inp| {
            self.chatglm
                .loss_backward_checkpointed(inp, b.labels, true, scale)
        }))
    }

    /// The training loss of a batch (fp32 scalar, with autograd history for the LoRA weights):
    /// `lm_loss(forward(..).logits, labels)`, computing `lm_head` at the target positions only.
    pub fn loss(&self, b: &BatchInputs, train: bool) -> Tensor {
        self.with_inputs(b, train, |inp| {
            self.chatglm
                .target_loss(&self.chatglm.hidden(inp, train), b.labels)
        })
    }

    /// Per-token `log p(label)` `[B, T − 1]` of a batch's counted labels at `temperature`, their
    /// mask and (with `entropy`) entropies (see [`ChatGlm::label_logps`]), with autograd history
    /// for the adapters.
    pub fn label_logps(
        &self,
        b: &BatchInputs,
        train: bool,
        temperature: f64,
        entropy: bool,
    ) -> LabelLogps {
        self.label_logps_with(b, train, temperature, entropy, None)
    }

    /// [`VisualGlm::label_logps`] with per-row adapters on ChatGLM (`None`: its own).
    pub fn label_logps_with(
        &self,
        b: &BatchInputs,
        train: bool,
        temperature: f64,
        entropy: bool,
        adapters: Option<&RowAdapters>,
    ) -> LabelLogps {
        self.with_inputs(b, train, |inp| {
            let hidden = self.chatglm.hidden_with(inp, train, adapters);
            self.chatglm
                .label_logps(&hidden, b.labels, temperature, entropy)
        })
    }

    /// ChatGLM's inputs for a training batch: the attention mask and the image embeddings.
    fn with_inputs<T>(&self, b: &BatchInputs, train: bool, f: impl FnOnce(&GlmInputs) -> T) -> T {
        let BatchInputs {
            input_ids,
            images: image,
            image_at,
            position_ids,
            context_lengths,
            ..
        } = *b;
        let mask = attention_mask(context_lengths, input_ids.size()[1], input_ids.device());
        let embeds = match image {
            Images::Embeds(e) => e.to_kind(self.kind()),
            Images::Pixels(p) => self.encode_image(p, train).2,
        };
        f(&GlmInputs {
            input_ids,
            position_ids,
            attention_mask: &mask,
            image_embeds: Some(&embeds),
            image_at,
        })
    }
}

/// The reference loss: fp32 logits, shift by one, cross-entropy ignoring −100, mean over the
/// counted tokens.
pub fn lm_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let (b, s, v) = logits.size3().unwrap();
    let _ = b;
    let shift_logits = logits
        .narrow(1, 0, s - 1)
        .to_kind(Kind::Float)
        .reshape([-1, v]);
    let shift_labels = labels.narrow(1, 1, s - 1).reshape([-1]);
    shift_logits.cross_entropy_loss::<Tensor>(&shift_labels, None, tch::Reduction::Mean, -100, 0.0)
}
