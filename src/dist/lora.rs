//! Data parallelism for LoRA training: every rank starts from rank 0's adapters, gradients are
//! averaged in one flat fp32 bucket (one all-reduce per step), and the logs can check that the
//! ranks' adapters stay equal.

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::Comm;
use crate::model::visualglm::VisualGlm;

/// Average the gradients of `params` (the same tensors in the same order on every rank) over the
/// ranks: summed in one flat fp32 bucket, divided by the world size. A parameter without a
/// gradient contributes zeros.
pub fn all_reduce_grads<'a>(
    params: impl Iterator<Item = &'a Tensor> + Clone,
    comm: &dyn Comm,
) -> Result<()> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(());
    }
    let parts: Vec<Tensor> = params
        .clone()
        .map(|p| {
            let g = p.grad();
            if g.defined() {
                g.to_kind(Kind::Float).flatten(0, -1)
            } else {
                p.zeros_like().flatten(0, -1)
            }
        })
        .collect();
    let mut flat = Tensor::cat(&parts, 0);
    comm.all_reduce_tensor(&mut flat)?;
    let avg = flat / world as f64;
    let mut off = 0;
    tch::no_grad(|| {
        for p in params {
            let n = p.numel() as i64;
            let mut g = p.grad();
            if g.defined() {
                g.copy_(&avg.narrow(0, off, n).view_as(p));
            }
            off += n;
        }
    });
    Ok(())
}

/// The LoRA tensors sorted by name, and all their values as one flat fp32 tensor (on their device).
fn lora_flat(model: &VisualGlm) -> (Vec<(String, Tensor)>, Tensor) {
    let mut vars: Vec<(String, Tensor)> = model.lora.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let parts: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| v.detach().to_kind(Kind::Float).flatten(0, -1))
        .collect();
    let flat = Tensor::cat(&parts, 0);
    (vars, flat)
}

/// Largest |θ_rank − mean θ| over all LoRA elements and ranks (0 when the ranks agree).
pub fn lora_divergence(model: &VisualGlm, comm: &dyn Comm) -> Result<f64> {
    let mine = Vec::<f32>::try_from(&lora_flat(model).1.to_device(Device::Cpu))?;
    let mut sum = mine.clone();
    comm.all_reduce_sum(&mut sum)?;
    let w = comm.world_size() as f32;
    let local = mine
        .iter()
        .zip(&sum)
        .map(|(a, s)| (a - s / w).abs())
        .fold(0f32, f32::max) as f64;
    let mut total = [local];
    comm.all_reduce_sum_f64(&mut total)?;
    Ok(total[0])
}

/// Make every rank's LoRA weights rank 0's.
pub fn broadcast_lora(model: &VisualGlm, comm: &dyn Comm) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let (mut vars, mut flat) = lora_flat(model);
    comm.broadcast_tensor(&mut flat, 0)?;
    let mut off = 0;
    tch::no_grad(|| {
        for (_, v) in vars.iter_mut() {
            let n = v.numel() as i64;
            v.copy_(&flat.narrow(0, off, n).view_as(v).to_kind(v.kind()));
            off += n;
        }
    });
    Ok(())
}
