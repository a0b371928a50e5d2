//! Benchmarks: each one measures xrayglm against a baseline taken in the same run (`xrayglm bench
//! <name>`), one file per benchmark, plus what they share: the runner of the original's benchmark
//! scripts (`scripts/bench_*_sat.py`), device synchronisation and a temporary folder.

pub mod allreduce;
pub mod data;
pub mod device;
pub mod dist;
pub mod generate;
pub mod layer;
pub mod model;
pub mod rl;
pub mod serve;
pub mod step;
pub mod train;

pub use allreduce::*;
pub use data::*;
pub use device::*;
pub use dist::*;
pub use generate::*;
pub use layer::*;
pub use model::*;
pub use rl::*;
pub use serve::*;
pub use step::*;
pub use train::*;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Wait for the device's queued work (timings on CUDA).
pub(crate) fn sync(dev: tch::Device) {
    if let tch::Device::Cuda(i) = dev {
        tch::Cuda::synchronize(i as i64);
    }
}

/// The name of a tensor kind in the benchmarks' reports.
pub(crate) fn dtype_name(kind: tch::Kind) -> &'static str {
    match kind {
        tch::Kind::BFloat16 => "bf16",
        tch::Kind::Half => "fp16",
        _ => "fp32",
    }
}

/// What one of the original's benchmark scripts (`scripts/bench_*_sat.py`) printed: lines
/// `<key> <number>`.
pub(crate) struct SatScript {
    script: PathBuf,
    stdout: String,
    stderr: String,
}

impl SatScript {
    fn run(
        python: &Path,
        name: &str,
        args: &[&std::ffi::OsStr],
        env: &[(&str, String)],
    ) -> Result<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scripts")
            .join(name);
        let out = std::process::Command::new(python)
            .arg(&script)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .with_context(|| format!("running {}", python.display()))?;
        Ok(Self {
            script,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn get(&self, key: &str) -> Result<f64> {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .with_context(|| {
                format!(
                    "{} printed no {key}:\n{}\n{}",
                    self.script.display(),
                    self.stdout,
                    self.stderr
                )
            })
    }
}

/// A fresh folder under the system temp dir.
pub(crate) fn tempfile_dir(prefix: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}
