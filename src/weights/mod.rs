//! Loading named tensors into a [`VisualGlm`]: sat / XrayGLM names → the model's own names, shape
//! checks, and an error that lists every missing, unexpected or mis-shaped tensor by name.
//!
//! Reference: docs/reference.md §4 (LoRA names `…original.weight`, `matrix_A.<p>`; sat 0.3.6's
//! single-partition `dense.matrix_A`), §6.a (sat-only keys to ignore: ChatGLM's unused
//! `transformer.position_embeddings.weight`, `rotary_emb.inv_freq`), §10.1 (qkv layouts).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::Tensor;

use crate::model::config::QkvLayout;
use crate::model::visualglm::VisualGlm;

pub mod pickle;
pub mod source;
pub mod st;
pub mod torch_zip;

/// What to do with a name: load it under the model's name, or ignore it.
pub fn canonical_name(name: &str) -> Option<String> {
    if name == "transformer.position_embeddings.weight" || name.ends_with("rotary_emb.inv_freq") {
        return None;
    }
    let mut n = name.replace(".original.", ".");
    // sat 0.3.6 LoraLinear: one partition stored without an index.
    for m in ["matrix_A", "matrix_B"] {
        if let Some(stem) = n.strip_suffix(m) {
            n = format!("{stem}{m}.0");
        }
    }
    Some(n)
}

/// `[Q | K | V]` block rows (sat ≥ 0.4) → ChatGLM's per-head interleaved `[q_h k_h v_h]`.
pub fn blocks_to_interleaved(t: &Tensor, heads: i64) -> Tensor {
    let rows = t.size()[0];
    let hd = rows / 3 / heads;
    let rest: Vec<i64> = t.size()[1..].to_vec();
    let mut shape = vec![3, heads, hd];
    shape.extend(&rest);
    let mut out = vec![rows];
    out.extend(&rest);
    let mut perm: Vec<i64> = vec![1, 0, 2];
    perm.extend((3..3 + rest.len() as i64).collect::<Vec<_>>());
    t.view(shape.as_slice())
        .permute(perm.as_slice())
        .reshape(out.as_slice())
}

/// Which tensors a load must provide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Require {
    /// Every frozen and every LoRA tensor.
    All,
    /// Every frozen tensor; LoRA tensors keep their initialisation when absent (loading a base
    /// `visualglm-6b` checkpoint into a model with fresh adapters, as XrayGLM does).
    Base,
    /// Every LoRA tensor (a training checkpoint on top of an already loaded base).
    Lora,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: usize,
    /// How many of the loaded tensors were LoRA weights (0: the adapters are freshly made).
    pub lora_loaded: usize,
    pub ignored: Vec<String>,
}

/// Copies named tensors into a model one at a time and keeps the books for the final check.
pub struct Loader<'m> {
    base: std::collections::HashMap<String, Tensor>,
    lora: std::collections::HashMap<String, Tensor>,
    heads: i64,
    layers: i64,
    layout: QkvLayout,
    seen: HashSet<String>,
    unexpected: Vec<String>,
    misshaped: Vec<String>,
    report: LoadReport,
    _model: std::marker::PhantomData<&'m mut VisualGlm>,
}

impl<'m> Loader<'m> {
    pub fn new(model: &'m mut VisualGlm, layout: QkvLayout) -> Self {
        Self {
            base: model.base.variables(),
            lora: model.lora.variables(),
            heads: model.cfg.sat.num_attention_heads,
            layers: model.cfg.sat.num_layers,
            layout,
            seen: HashSet::new(),
            unexpected: Vec::new(),
            misshaped: Vec::new(),
            report: LoadReport::default(),
            _model: std::marker::PhantomData,
        }
    }

    /// Copy one tensor (sat name) into the model.
    pub fn put(&mut self, name: String, t: Tensor) {
        let Some(canon) = canonical_name(&name) else {
            self.report.ignored.push(name);
            return;
        };
        let is_glm_qkv = canon.starts_with("transformer.layers.")
            && (canon.ends_with("attention.query_key_value.weight")
                || canon.ends_with("attention.query_key_value.bias"));
        let t = if is_glm_qkv && self.layout == QkvLayout::Blocks {
            blocks_to_interleaved(&t, self.heads)
        } else {
            t
        };
        let Some(target) = self
            .base
            .get_mut(&canon)
            .or_else(|| self.lora.get_mut(&canon))
        else {
            self.unexpected.push(name);
            return;
        };
        if target.size() != t.size() {
            self.misshaped.push(format!(
                "{name}: file {:?}, model {:?}",
                t.size(),
                target.size()
            ));
            self.seen.insert(canon);
            return;
        }
        tch::no_grad(|| target.copy_(&t));
        self.report.lora_loaded += self.lora.contains_key(&canon) as usize;
        self.seen.insert(canon);
        self.report.loaded += 1;
    }

    /// Check that everything required arrived; the error lists every problem tensor by name.
    pub fn finish(self, require: Require, source: &str) -> Result<LoadReport> {
        let mut missing: Vec<String> = if require == Require::Lora {
            Vec::new()
        } else {
            self.base
                .keys()
                .filter(|k| !self.seen.contains(*k))
                .cloned()
                .collect()
        };
        if require != Require::Base {
            missing.extend(
                self.lora
                    .keys()
                    .filter(|k| !self.seen.contains(*k))
                    .cloned(),
            );
        }
        missing.sort();
        if missing.is_empty() && self.unexpected.is_empty() && self.misshaped.is_empty() {
            return Ok(self.report);
        }
        let list = |v: &[String]| {
            let mut s = v.iter().take(20).cloned().collect::<Vec<_>>().join(", ");
            if v.len() > 20 {
                s.push_str(&format!(", … ({} in all)", v.len()));
            }
            s
        };
        let mut msg = format!(
            "{source}: weights do not fit the model ({} layers)",
            self.layers
        );
        if !missing.is_empty() {
            msg.push_str(&format!("\n  missing: {}", list(&missing)));
        }
        if !self.unexpected.is_empty() {
            msg.push_str(&format!("\n  unexpected: {}", list(&self.unexpected)));
        }
        if !self.misshaped.is_empty() {
            msg.push_str(&format!("\n  wrong shape: {}", list(&self.misshaped)));
            if self.layout == QkvLayout::Interleaved {
                msg.push_str("\n  (if these are sat ≥ 0.4 weights, set qkv_layout = \"blocks\")");
            }
        }
        bail!(msg)
    }
}

/// Copy `tensors` into `model` by name (see [`Loader`]).
pub fn load_into(
    model: &mut VisualGlm,
    tensors: impl IntoIterator<Item = Result<(String, Tensor)>>,
    layout: QkvLayout,
    require: Require,
    source: &str,
) -> Result<LoadReport> {
    let mut l = Loader::new(model, layout);
    for item in tensors {
        let (name, t) = item?;
        l.put(name, t);
    }
    l.finish(require, source)
}

/// Read a `.safetensors` file (all tensors, on the CPU).
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Tensor::read_safetensors(path).with_context(|| format!("reading {}", path.display()))
}

/// HF `THUDM/visualglm-6b` names → sat names (spec §6.b, `convert_sat_checkpoint.py` reversed).
pub fn hf_to_sat(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("image_encoder.") {
        format!("mixins.eva.model.{rest}")
    } else if name == "lm_head.weight" {
        "mixins.chatglm-final.lm_head.weight".to_string()
    } else {
        name.to_string()
    }
}

/// The LoRA tensors of a model under their sat-compatible names.
pub fn lora_tensors(model: &VisualGlm) -> BTreeMap<String, Tensor> {
    model.lora.variables().into_iter().collect()
}

/// Read `shape`×`kind` bytes at `offset` of `file` straight into a new CPU tensor (no staging copy).
pub(crate) fn read_tensor_at(
    file: &std::fs::File,
    offset: u64,
    shape: &[i64],
    kind: tch::Kind,
) -> Result<Tensor> {
    use std::os::unix::fs::FileExt;
    let t = Tensor::empty(shape, (kind, tch::Device::Cpu));
    let nbytes = t.numel() * t.kind().elt_size_in_bytes();
    if nbytes > 0 {
        // SAFETY: `t` is a freshly allocated, contiguous CPU tensor of exactly `nbytes` bytes that
        // nothing else references yet; the slice does not outlive this block.
        let buf = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, nbytes) };
        file.read_exact_at(buf, offset)?;
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_like_sat() {
        assert_eq!(
            canonical_name("transformer.position_embeddings.weight"),
            None
        );
        assert_eq!(
            canonical_name("mixins.chatglm-attn.rotary_emb.inv_freq"),
            None
        );
        assert_eq!(
            canonical_name("transformer.layers.0.attention.query_key_value.original.weight")
                .unwrap(),
            "transformer.layers.0.attention.query_key_value.weight"
        );
        assert_eq!(
            canonical_name("transformer.layers.0.attention.dense.matrix_A").unwrap(),
            "transformer.layers.0.attention.dense.matrix_A.0"
        );
        assert_eq!(
            canonical_name("transformer.layers.0.attention.query_key_value.matrix_B.2").unwrap(),
            "transformer.layers.0.attention.query_key_value.matrix_B.2"
        );
    }

    #[test]
    fn block_layout_becomes_interleaved() {
        // heads 2, head dim 1: rows [q0 q1 k0 k1 v0 v1] → [q0 k0 v0 q1 k1 v1]
        let t = Tensor::from_slice(&[0f32, 1., 2., 3., 4., 5.]).view([6, 1]);
        let r = blocks_to_interleaved(&t, 2).view([6]);
        assert_eq!(
            Vec::<f32>::try_from(&r).unwrap(),
            vec![0., 2., 4., 1., 3., 5.]
        );
    }
}
