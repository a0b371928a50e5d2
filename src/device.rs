//! Device selection. rustc links with `--as-needed`, which drops `libtorch_cuda.so` because no symbol
//! of it is referenced directly; without it libtorch never registers its CUDA backend. Loading it
//! explicitly at start-up restores that; on a CPU-only libtorch the load fails quietly.

use std::sync::OnceLock;

static CUDA_LIB: OnceLock<bool> = OnceLock::new();

/// Load libtorch's CUDA library if it is there. Returns whether it was loaded. Idempotent.
pub fn register_cuda() -> bool {
    *CUDA_LIB.get_or_init(|| {
        let mut candidates = Vec::new();
        if let Some(dir) = option_env!("XRAYGLM_LIBTORCH_LIB") {
            candidates.push(format!("{dir}/libtorch_cuda.so"));
        }
        candidates.push("libtorch_cuda.so".to_string());
        for c in candidates {
            // SAFETY: loading libtorch's own CUDA library runs its static initialisers, which only
            // register kernels with the already-loaded libtorch. The handle is leaked on purpose.
            if let Ok(lib) = unsafe { libloading::Library::new(&c) } {
                std::mem::forget(lib);
                return true;
            }
        }
        false
    })
}

/// The device to run on: `"auto"` (CUDA when available), `"cpu"`, `"cuda"` or `"cuda:N"`.
pub fn parse(spec: &str) -> anyhow::Result<tch::Device> {
    register_cuda();
    match spec {
        "auto" => Ok(tch::Device::cuda_if_available()),
        "cpu" => Ok(tch::Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            if !tch::Cuda::is_available() {
                anyhow::bail!(
                    "device {s} requested but CUDA is not available (CPU-only libtorch or no GPU)"
                );
            }
            let idx = s
                .strip_prefix("cuda:")
                .map(str::parse::<usize>)
                .transpose()?
                .unwrap_or(0);
            Ok(tch::Device::Cuda(idx))
        }
        other => anyhow::bail!("unknown device {other:?} (auto, cpu, cuda, cuda:N)"),
    }
}
