//! `train.checkpoint_layers = "auto"`: recompute as few ChatGLM layers as the memory budget
//! allows. A probe at start runs one synthetic micro-batch of the run's worst case (its micro-batch
//! size at the longest sample, `max_source_length + max_target_length`, every position a target)
//! forward and backward twice — every layer recomputed, then the last ones keeping their
//! activations — and measures the peak memory of each (CPU: the process's peak resident set,
//! reset before each; CUDA: the device memory in use after, which libtorch's caching allocator
//! holds at its peak). The first is the step's floor, the difference what a kept layer adds; the
//! plan keeps as many layers as fit the budget less a margin, and recomputes the rest — the first
//! layers, which Megatron's `recompute_num_layers` and `train.checkpoint_layers = K` recompute too.

use anyhow::Result;
use tch::Device;

use crate::model::visualglm::{BatchInputs, Images, VisualGlm};

/// The share of the budget a plan leaves free (allocator slack, fragmentation, the probe's
/// error).
pub const MARGIN: f64 = 0.1;

const MIB: f64 = 1024.0 * 1024.0;

/// What the probe measured, bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Probe {
    /// Peak of a step with every layer recomputed.
    pub base: f64,
    /// What one layer keeping its activations adds to it.
    pub per_layer: f64,
    /// The micro-batch it ran: rows × tokens.
    pub rows: i64,
    pub seq: i64,
}

/// How many layers to recompute under a budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub layers: usize,
    pub recompute: usize,
    pub budget: f64,
    /// The probe's base plus the kept layers.
    pub predicted: f64,
    /// Whether even every layer recomputed fits (else the plan recomputes every layer and says so).
    pub fits: bool,
    pub probe: Probe,
}

/// Keep as many of `layers` as fit `budget` (bytes) less [`MARGIN`]; recompute the rest.
pub fn plan(probe: &Probe, layers: usize, budget: f64) -> Plan {
    let room = budget * (1.0 - MARGIN) - probe.base;
    let keep = if room < 0.0 {
        0
    } else if probe.per_layer <= 0.0 {
        layers
    } else {
        ((room / probe.per_layer).floor() as usize).min(layers)
    };
    Plan {
        layers,
        recompute: layers - keep,
        budget,
        predicted: probe.base + keep as f64 * probe.per_layer.max(0.0),
        fits: room >= 0.0,
        probe: *probe,
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.probe;
        write!(
            f,
            "memory plan: recompute {} of {} ChatGLM layers (keep {}): a step at {} × {} tokens \
             peaks at {:.0} MiB with every layer recomputed, a kept layer adds {:.1} MiB; \
             predicted peak {:.0} MiB of a {:.0} MiB budget ({:.0} % kept free)",
            self.recompute,
            self.layers,
            self.layers - self.recompute,
            p.rows,
            p.seq,
            p.base / MIB,
            p.per_layer / MIB,
            self.predicted / MIB,
            self.budget / MIB,
            100.0 * MARGIN
        )?;
        if !self.fits {
            write!(
                f,
                "; even with every layer recomputed the step needs more than the budget allows: \
                 lower loader.batch_size or the sample lengths"
            )?;
        }
        Ok(())
    }
}

/// The budget when none is given, bytes: what the device has free now plus what this process
/// already holds there (CUDA: free device memory plus its use; CPU: available RAM plus the
/// resident set).
pub fn default_budget(dev: Device) -> f64 {
    match dev {
        Device::Cuda(_) => {
            let used = crate::device::cuda_used_mib(dev).unwrap_or(0.0);
            let free = crate::device::cuda_free_mib(dev).unwrap_or(0.0);
            (used + free) * MIB
        }
        _ => {
            let available = std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|s| {
                    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
                    line.split_whitespace().nth(1)?.parse::<f64>().ok()
                })
                .map_or(0.0, |kb| kb * 1024.0);
            available + crate::logs::metrics::rss_mib() * MIB
        }
    }
}

/// The peak memory of `f`, bytes (see the module documentation).
fn peak_of(dev: Device, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    if dev.is_cuda() {
        f()?;
        return Ok(crate::device::cuda_used_mib(dev).unwrap_or(0.0) * MIB);
    }
    // Freed heap goes back to the system, then the resident set's peak restarts from what is
    // resident now ("5": reset VmHWM, Linux).
    #[cfg(target_os = "linux")]
    // SAFETY: malloc_trim only returns free heap pages to the system.
    unsafe {
        libc::malloc_trim(0);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    f()?;
    Ok(crate::logs::metrics::peak_rss_mib() * MIB)
}

/// Measure a step of `rows × seq` tokens with every layer recomputed and with `kept` layers
/// keeping their activations. The adapters' gradients are zeroed after; the model recomputes every
/// layer until the plan is set.
pub fn probe(model: &mut VisualGlm, rows: i64, seq: i64) -> Result<Probe> {
    let cfg = model.cfg.clone();
    let dev = model.device();
    let layers = cfg.sat.num_layers as usize;
    let (ids, image) = crate::bench::model_inputs(&cfg, rows, seq, dev);
    let (pos, ctx) = crate::model::positions::positions_from_ids(
        &ids,
        cfg.sat.bos_token_id,
        cfg.sat.mask_token_id,
        cfg.sat.gmask_token_id,
    )?;
    let labels = ids.copy();
    let _ = labels.narrow(1, 0, ctx[0] + 1).fill_(-100);
    let step = |m: &VisualGlm| -> Result<()> {
        let inputs = BatchInputs {
            input_ids: &ids,
            images: Images::Pixels(&image),
            image_at: crate::model::chatglm::ImageAt::EachRow(3),
            position_ids: &pos,
            context_lengths: &ctx,
            labels: &labels,
        };
        m.loss_backward(&inputs, 1.0, true)?;
        Ok(())
    };
    // Two kept layers (one where the model has only one), so that one layer's noise halves.
    let kept = layers.min(2);
    model.set_recompute_layers(Some(layers));
    let base = peak_of(dev, || step(model))?;
    model.set_recompute_layers(Some(layers - kept));
    let with_kept = peak_of(dev, || step(model))?;
    model.set_recompute_layers(Some(layers));
    for (_, v) in model.lora.variables() {
        let mut g = v.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    Ok(Probe {
        base,
        per_layer: ((with_kept - base) / kept.max(1) as f64).max(0.0),
        rows,
        seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Probe = Probe {
        base: 1000.0 * MIB,
        per_layer: 100.0 * MIB,
        rows: 8,
        seq: 320,
    };

    #[test]
    fn the_plan_keeps_what_fits_under_the_margin() {
        // 2000 MiB less 10 % = 1800: the floor of 1000 leaves 800, room for 8 layers.
        let p = plan(&P, 28, 2000.0 * MIB);
        assert_eq!((p.recompute, p.fits), (20, true));
        assert_eq!(p.predicted, 1800.0 * MIB);
        // Room for every layer: none recomputed.
        assert_eq!(plan(&P, 4, 2000.0 * MIB).recompute, 0);
        // Just under one more layer's worth: the floor, not a rounding up.
        assert_eq!(plan(&P, 28, 1222.0 * MIB).recompute, 28);
        assert_eq!(plan(&P, 28, 1222.3 * MIB).recompute, 27);
        // Not even the floor fits: everything recomputed, and the plan says so.
        let tight = plan(&P, 28, 1000.0 * MIB);
        assert_eq!((tight.recompute, tight.fits), (28, false));
        assert!(
            tight.to_string().contains("lower loader.batch_size"),
            "{tight}"
        );
        // A layer that adds nothing measurable: keep them all.
        let flat = Probe {
            per_layer: 0.0,
            ..P
        };
        assert_eq!(plan(&flat, 28, 1200.0 * MIB).recompute, 0);
    }

    #[test]
    fn the_plan_says_what_it_decided() {
        let s = plan(&P, 28, 2000.0 * MIB).to_string();
        assert!(s.contains("recompute 20 of 28"), "{s}");
        assert!(s.contains("8 × 320"), "{s}");
        assert!(s.contains("1800 MiB of a 2000 MiB budget"), "{s}");
    }
}
