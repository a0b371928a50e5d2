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

/// `model.device` and every `--device`: "auto" (CUDA when there is one), "cpu", "cuda" or
/// "cuda:N". Kept as written (the trainer maps `auto` / `cuda` to one GPU per local rank);
/// [`DeviceSpec::device`] resolves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    /// "cuda": the first GPU (or this rank's, in training).
    Cuda,
    /// "cuda:N".
    CudaIndex(usize),
}

impl DeviceSpec {
    /// The device (an error when CUDA is asked for and not there).
    pub fn device(self) -> anyhow::Result<tch::Device> {
        register_cuda();
        let index = match self {
            Self::Auto => return Ok(tch::Device::cuda_if_available()),
            Self::Cpu => return Ok(tch::Device::Cpu),
            Self::Cuda => 0,
            Self::CudaIndex(i) => i,
        };
        anyhow::ensure!(
            tch::Cuda::is_available(),
            "device {} requested but CUDA is not available (CPU-only libtorch or no GPU)",
            String::from(self)
        );
        Ok(tch::Device::Cuda(index))
    }

    /// `auto` or `cuda` without an index: the trainer picks this rank's GPU.
    pub fn any_gpu(self) -> bool {
        matches!(self, Self::Auto | Self::Cuda)
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = anyhow::Error;
    fn try_from(s: String) -> anyhow::Result<Self> {
        s.parse()
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "cpu" => Self::Cpu,
            "cuda" => Self::Cuda,
            s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Self::CudaIndex(i),
                _ => anyhow::bail!("unknown device {s:?} (auto, cpu, cuda, cuda:N)"),
            },
        })
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        match d {
            DeviceSpec::Auto => "auto".into(),
            DeviceSpec::Cpu => "cpu".into(),
            DeviceSpec::Cuda => "cuda".into(),
            DeviceSpec::CudaIndex(i) => format!("cuda:{i}"),
        }
    }
}

type CudaSetDevice = unsafe extern "C" fn(std::os::raw::c_int) -> std::os::raw::c_int;
type CudaMemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> std::os::raw::c_int;

/// The CUDA runtime's `cudaSetDevice` and `cudaMemGetInfo`, from the libcudart that libtorch's
/// CUDA build already loaded; `None` on a CPU-only libtorch.
fn cudart() -> Option<(CudaSetDevice, CudaMemGetInfo)> {
    static API: OnceLock<Option<(CudaSetDevice, CudaMemGetInfo)>> = OnceLock::new();
    *API.get_or_init(|| {
        if !register_cuda() {
            return None;
        }
        ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
            .iter()
            .find_map(|name| {
                // SAFETY: the runtime is already mapped by libtorch_cuda; the two symbols are
                // looked up with their signatures from cuda_runtime_api.h. The handle is leaked
                // so that the function pointers stay valid.
                unsafe {
                    let lib = libloading::Library::new(name).ok()?;
                    let set = *lib.get::<CudaSetDevice>(b"cudaSetDevice").ok()?;
                    let info = *lib.get::<CudaMemGetInfo>(b"cudaMemGetInfo").ok()?;
                    std::mem::forget(lib);
                    Some((set, info))
                }
            })
    })
}

/// `(free, total)` memory of a CUDA device, bytes (cudaMemGetInfo).
fn cuda_mem_info(dev: tch::Device) -> Option<(usize, usize)> {
    let tch::Device::Cuda(idx) = dev else {
        return None;
    };
    let (set, info) = cudart()?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: plain CUDA runtime calls with valid out-pointers; this thread works on `idx`.
    let ok = unsafe { set(idx as i32) == 0 && info(&mut free, &mut total) == 0 };
    ok.then_some((free, total))
}

/// Memory in use on a CUDA device, in MiB: the whole device (every process, libtorch's cache
/// included), as `nvidia-smi` reports it. `None` for the CPU or when the runtime is not found.
pub fn cuda_used_mib(dev: tch::Device) -> Option<f64> {
    cuda_mem_info(dev).map(|(free, total)| (total - free) as f64 / (1024.0 * 1024.0))
}

/// Free memory on a CUDA device, in MiB. `None` for the CPU or when the runtime is not found.
pub fn cuda_free_mib(dev: tch::Device) -> Option<f64> {
    cuda_mem_info(dev).map(|(free, _)| free as f64 / (1024.0 * 1024.0))
}

/// Bytes that can still be allocated on `dev`: free device memory on CUDA, MemAvailable +
/// SwapFree on the CPU; `None` when unknown.
pub fn available_bytes(dev: tch::Device) -> Option<u64> {
    match dev {
        tch::Device::Cuda(idx) => {
            let (set, info) = cudart()?;
            let (mut free, mut total) = (0usize, 0usize);
            // SAFETY: as in `cuda_used_mib`.
            let ok = unsafe { set(idx as i32) == 0 && info(&mut free, &mut total) == 0 };
            ok.then_some(free as u64)
        }
        _ => cpu_available_bytes(),
    }
}

/// A floating-point kind for weights or training: the closed set of `model.dtype`,
/// `train.precision` and every `--dtype` flag ("fp32", "bf16", "fp16"), and the one conversion
/// to a tensor kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    Fp32,
    Bf16,
    Fp16,
}

impl Dtype {
    pub fn kind(self) -> tch::Kind {
        match self {
            Self::Fp32 => tch::Kind::Float,
            Self::Bf16 => tch::Kind::BFloat16,
            Self::Fp16 => tch::Kind::Half,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Bf16 => "bf16",
            Self::Fp16 => "fp16",
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Dtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "fp32" | "float32" => Ok(Self::Fp32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "fp16" | "float16" => Ok(Self::Fp16),
            other => anyhow::bail!("dtype {other:?}: use fp32, bf16 or fp16"),
        }
    }
}

/// Memory that can still be allocated on the CPU: MemAvailable + SwapFree from /proc/meminfo.
pub fn cpu_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((kib("MemAvailable:")? + kib("SwapFree:").unwrap_or(0)) * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_has_no_cuda_memory() {
        assert_eq!(super::cuda_used_mib(tch::Device::Cpu), None);
    }
}
