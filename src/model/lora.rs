//! LoRA exactly as XrayGLM uses it (sat `LoraMixin` with `head_first=True`), and merging.
//!
//! Paper: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021). Reference:
//! docs/reference.md §4 (XrayGLM `lora_mixin.py`): per adapted Linear, `partitions` pairs
//! `A_p [r, in]` (kaiming-uniform, a = √5, i.e. U(±1/√in)) and `B_p [out/partitions, r]` (zeros);
//! `Δ_p = scaling · (x·A_pᵀ)·B_pᵀ` with `scaling = alpha / r`. For ChatGLM's fused qkv
//! (3 partitions) `head_first` views each Δ_p as `[heads, head_dim]` and concatenates them per head,
//! so the q/k/v deltas of head h land in ChatGLM's interleaved rows `[q_h k_h v_h]`.
//! Parameters are named `matrix_A.<p>` / `matrix_B.<p>` beside the adapted layer.

use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

use super::config::ModelConfig;
use super::nn::{dropout, Linear};

#[derive(Debug)]
pub struct Lora {
    pub a: Vec<Tensor>,
    pub b: Vec<Tensor>,
    pub scaling: f64,
    pub dropout: f64,
    /// `(heads, head_dim)` when the partitions are placed head-first.
    head_first: Option<(i64, i64)>,
    out_dim: i64,
}

impl Lora {
    /// LoRA for a Linear `in_dim → out_dim` split into `partitions` equal output blocks. The
    /// parameters are created in `p` (a float32 store: LoRA weights are always fp32 masters).
    pub fn new(
        p: &Path,
        in_dim: i64,
        out_dim: i64,
        partitions: i64,
        rank: i64,
        scaling: f64,
        head_first: Option<(i64, i64)>,
    ) -> Self {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a = (0..partitions)
            .map(|i| {
                (p / "matrix_A").var(
                    &i.to_string(),
                    &[rank, in_dim],
                    Init::Uniform {
                        lo: -bound,
                        up: bound,
                    },
                )
            })
            .collect();
        let b = (0..partitions)
            .map(|i| {
                (p / "matrix_B").var(
                    &i.to_string(),
                    &[out_dim / partitions, rank],
                    Init::Const(0.0),
                )
            })
            .collect();
        Self {
            a,
            b,
            scaling,
            dropout: 0.0,
            head_first,
            out_dim,
        }
    }

    /// The additive output `Δ(x)` with the shape of the adapted layer's output, in `x`'s kind.
    pub fn delta(&self, x: &Tensor, train: bool) -> Tensor {
        let kind = x.kind();
        let x = dropout(x, self.dropout, train);
        let parts: Vec<Tensor> = self
            .a
            .iter()
            .zip(&self.b)
            .map(|(a, b)| {
                x.matmul(&a.to_kind(kind).tr())
                    .matmul(&b.to_kind(kind).tr())
                    * self.scaling
            })
            .collect();
        if parts.len() == 1 {
            return parts.into_iter().next().unwrap();
        }
        let lead: Vec<i64> = x.size()[..x.dim() - 1].to_vec();
        match self.head_first {
            Some((heads, head_dim)) => {
                let mut shape = lead.clone();
                shape.extend([heads, head_dim]);
                let parts: Vec<Tensor> = parts.iter().map(|t| t.view(shape.as_slice())).collect();
                let mut out = lead;
                out.push(self.out_dim);
                Tensor::cat(&parts, -1).view(out.as_slice())
            }
            None => Tensor::cat(&parts, -1),
        }
    }

    /// The adapter as one plain LoRA of rank `partitions · r` (fp32): `A [n·r, in]` stacks the
    /// `A_p`; `B [out, n·r]` is block-diagonal, each `B_p`'s rows placed where this layer puts
    /// partition p's output (head-first: ChatGLM's interleaved `[q_h k_h v_h]` rows). Then
    /// `scaling · x·Aᵀ·Bᵀ = Δ(x)` exactly (the extra products are zeros) — PEFT's layout.
    pub fn as_single_rank(&self) -> (Tensor, Tensor) {
        let n = self.a.len() as i64;
        let a = Tensor::cat(
            &self
                .a
                .iter()
                .map(|t| t.to_kind(Kind::Float))
                .collect::<Vec<_>>(),
            0,
        );
        if n == 1 {
            return (a, self.b[0].to_kind(Kind::Float));
        }
        let (rows, r) = self.b[0].size2().unwrap();
        // [n (part of the output), rows, n (column block), r]
        let bd = Tensor::zeros([n, rows, n, r], (Kind::Float, self.b[0].device()));
        for (p, b) in self.b.iter().enumerate() {
            bd.get(p as i64)
                .select(1, p as i64)
                .copy_(&b.to_kind(Kind::Float));
        }
        let b = match self.head_first {
            Some((heads, head_dim)) => bd
                .view([n, heads, head_dim, n * r])
                .permute([1, 0, 2, 3])
                .reshape([self.out_dim, n * r]),
            None => bd.reshape([self.out_dim, n * r]),
        };
        (a, b)
    }

    /// Set this adapter from the single-rank form [`Lora::as_single_rank`] writes (`a [n·r, in]`,
    /// `b [out, n·r]`); refused when `b` is not block-diagonal in this layer's partition layout
    /// (an adapter that cannot be split into its partitions exactly).
    pub fn set_from_single_rank(&self, a: &Tensor, b: &Tensor) -> anyhow::Result<()> {
        let n = self.a.len() as i64;
        let (r, in_dim) = self.a[0].size2()?;
        let rows = self.b[0].size()[0];
        anyhow::ensure!(
            a.size() == [n * r, in_dim] && b.size() == [self.out_dim, n * r],
            "A {:?} and B {:?} do not fit {n} partition(s) of rank {r} for [{}, {in_dim}]",
            a.size(),
            b.size(),
            self.out_dim
        );
        let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
        // [n (part of the output), rows, n (column block), r], as `as_single_rank` built it.
        let bd = match self.head_first {
            Some((heads, head_dim)) if n > 1 => b
                .view([heads, n, head_dim, n * r])
                .permute([1, 0, 2, 3])
                .reshape([n, rows, n, r]),
            _ => b.reshape([n, rows, n, r]),
        };
        let mut off = bd.abs().sum(Kind::Double).double_value(&[]);
        for p in 0..n {
            off -= bd
                .get(p)
                .select(1, p)
                .abs()
                .sum(Kind::Double)
                .double_value(&[]);
        }
        anyhow::ensure!(
            off <= 1e-12,
            "B is not block-diagonal over the {n} partitions (off-block sum {off:.3e})"
        );
        tch::no_grad(|| {
            for p in 0..n {
                let mut ap = self.a[p as usize].shallow_clone();
                ap.copy_(&a.narrow(0, p * r, r));
                let mut bp = self.b[p as usize].shallow_clone();
                bp.copy_(&bd.get(p).select(1, p));
            }
        });
        Ok(())
    }

    /// `ΔW [out, in]` (fp32) such that `x·ΔWᵀ = Δ(x)` — for merging into the base weight.
    pub fn delta_weight(&self) -> Tensor {
        let parts: Vec<Tensor> = self
            .a
            .iter()
            .zip(&self.b)
            .map(|(a, b)| b.to_kind(Kind::Float).matmul(&a.to_kind(Kind::Float)) * self.scaling)
            .collect();
        let in_dim = parts[0].size()[1];
        match (self.head_first, parts.len()) {
            (_, 1) => parts.into_iter().next().unwrap(),
            (Some((heads, head_dim)), n) => {
                // rows of part p: (head, d) → merged row head·n·head_dim + p·head_dim + d
                let stacked = Tensor::stack(&parts, 0).view([n as i64, heads, head_dim, in_dim]);
                stacked
                    .permute([1, 0, 2, 3])
                    .reshape([self.out_dim, in_dim])
            }
            (None, _) => Tensor::cat(&parts, 0),
        }
    }
}

/// A frozen linear of the vision side (EVA ViT, Q-Former, `glm_proj`) with an optional plain LoRA
/// (one partition: `W·x + b + scaling·B·A·x`, PEFT's form): `model.lora.targets`.
#[derive(Debug)]
pub struct Adapted {
    pub linear: super::nn::Linear,
    pub lora: Option<Lora>,
    /// The LoRA is folded into `linear.weight` ([`Adapted::merge`]) and not added at run time.
    pub merged: bool,
}

impl Adapted {
    /// `linear` with a LoRA created in the fp32 store at `lora` (A uniform, B zero), or none.
    pub fn new(
        linear: super::nn::Linear,
        lora: Option<(&Path, &super::config::LoraConfig)>,
    ) -> Self {
        let lora = lora.map(|(p, cfg)| {
            let (out_dim, in_dim) = linear.weight.size2().expect("a linear's weight is 2-D");
            let mut l = Lora::new(p, in_dim, out_dim, 1, cfg.rank, cfg.scaling(), None);
            l.dropout = cfg.dropout;
            l
        });
        Self {
            linear,
            lora,
            merged: false,
        }
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = self.linear.forward(x);
        match &self.lora {
            Some(l) if !self.merged => y + l.delta(x, train),
            _ => y,
        }
    }

    /// Fold the LoRA into the weight (`sign` 1) or take it out again (−1); idempotent per state.
    pub fn merge(&mut self, merged: bool) {
        let Some(l) = &self.lora else { return };
        if merged == self.merged {
            return;
        }
        let sign = if merged { 1.0 } else { -1.0 };
        fold(&mut self.linear.weight, &l.delta_weight(), sign);
        self.merged = merged;
    }
}

/// `w ← w + sign·ΔW` in fp32, stored back in `w`'s kind (merging and unmerging an adapter).
pub fn fold(w: &mut Tensor, delta: &Tensor, sign: f64) {
    let delta = (delta * sign).to_device(w.device());
    tch::no_grad(|| {
        let m = (w.to_kind(Kind::Float) + delta).to_kind(w.kind());
        w.copy_(&m);
    });
}

/// The LoRA adapters of one layer's linears (each may be absent). A model's set of these is what
/// an adapter is: serving runs several sets over one frozen base ([`RowAdapters`]).
#[derive(Debug, Default)]
pub struct LayerLoras {
    pub qkv: Option<Lora>,
    pub dense: Option<Lora>,
    pub h_to_4h: Option<Lora>,
    pub h4_to_h: Option<Lora>,
}

/// The adapters `cfg.lora` puts on ChatGLM layer `i`, created (A uniform, B zero) in the fp32
/// store `lora_p` under the names of the layers they adapt.
pub fn layer_loras(lora_p: &Path, cfg: &ModelConfig, i: i64) -> LayerLoras {
    let s = &cfg.sat;
    let (h, inner) = (s.hidden_size, cfg.inner_hidden_size());
    let heads = s.num_attention_heads;
    let head_dim = h / heads;
    let Some(l) = cfg.lora.as_ref() else {
        return LayerLoras::default();
    };
    let (attention, mlp) = (l.layers.contains(&i), l.mlp_layers().contains(&i));
    let ll = lora_p / "transformer" / "layers" / i;
    let mk = |name: &str, i: i64, o: i64, parts: i64, hf: bool| {
        let head_first = (hf && l.head_first).then_some((heads, head_dim));
        let p = name.split('.').fold(ll.clone(), |p, part| p / part);
        let mut lora = Lora::new(&p, i, o, parts, l.rank, l.scaling(), head_first);
        lora.dropout = l.dropout;
        lora
    };
    LayerLoras {
        qkv: attention.then(|| mk("attention.query_key_value", h, 3 * h, 3, true)),
        dense: attention.then(|| mk("attention.dense", h, h, 1, false)),
        h_to_4h: mlp.then(|| mk("mlp.dense_h_to_4h", h, inner, 1, false)),
        h4_to_h: mlp.then(|| mk("mlp.dense_4h_to_h", inner, h, 1, false)),
    }
}

/// Which adapter each row of a batch runs with: groups of rows (`None`: every row) and their
/// adapter set, one [`LayerLoras`] per layer (`None`: the layers' own adapters). The frozen
/// linear runs once over the batch; each group's LoRA delta is computed on its rows and added to
/// them — for every row the same sum `W·x + Δ(x)` it computes alone.
pub struct RowAdapters<'a> {
    pub groups: Vec<(Option<Tensor>, Option<&'a [LayerLoras]>)>,
}

/// A layer's adapted linears.
#[derive(Clone, Copy)]
pub(crate) enum Part {
    Qkv,
    Dense,
    HTo4h,
    H4ToH,
}

impl Part {
    pub(crate) fn of(self, l: &LayerLoras) -> Option<&Lora> {
        match self {
            Part::Qkv => l.qkv.as_ref(),
            Part::Dense => l.dense.as_ref(),
            Part::HTo4h => l.h_to_4h.as_ref(),
            Part::H4ToH => l.h4_to_h.as_ref(),
        }
    }
}

/// How one layer's frozen linears get their adapters in one forward: the layer's own (`rows:
/// None`), or per row of the batch ([`RowAdapters`], several adapters served together).
pub(crate) struct Route<'a> {
    /// The layer's own adapters and its index (into each row group's set).
    pub own: &'a LayerLoras,
    pub layer: usize,
    pub rows: Option<&'a RowAdapters<'a>>,
    /// Whether the layer's own adapters are added (false once merged into the base weights).
    pub active: bool,
    /// Add `ΔW = B·A·scaling` to the frozen weight and run one matmul (see
    /// [`super::kernels::Kernels::lora_as_weight`]).
    pub as_weight: bool,
    pub train: bool,
}

impl Route<'_> {
    /// `lin(x)` plus the adapter deltas of `part`.
    pub(crate) fn linear(&self, lin: &Linear, part: Part, x: &Tensor) -> Tensor {
        let Some(ra) = self.rows else {
            return match part.of(self.own).filter(|_| self.active) {
                None => lin.forward(x),
                Some(lo) if self.as_weight && !lin.is_quantized() => {
                    let w = &lin.weight + lo.delta_weight().to_kind(lin.weight.kind());
                    x.linear(&w, lin.bias.as_ref())
                }
                Some(lo) => lin.forward(x) + lo.delta(x, self.train),
            };
        };
        if let [(None, set)] = ra.groups.as_slice() {
            // One adapter for every row: the plain path.
            return match self.pick(part, *set) {
                Some(lo) => lin.forward(x) + lo.delta(x, false),
                None => lin.forward(x),
            };
        }
        let mut out = lin.forward(x);
        for (rows, set) in &ra.groups {
            let Some(lo) = self.pick(part, *set) else {
                continue;
            };
            out = match rows {
                Some(r) => out.index_add(0, r, &lo.delta(&x.index_select(0, r), false)),
                None => out + lo.delta(x, false),
            };
        }
        out
    }

    /// A row group's adapter of `part`: from its set, or the layer's own (`None`).
    fn pick<'s>(&'s self, part: Part, set: Option<&'s [LayerLoras]>) -> Option<&'s Lora> {
        match set {
            Some(s) => part.of(&s[self.layer]),
            None => part.of(self.own).filter(|_| self.active),
        }
    }
}
