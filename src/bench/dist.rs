//! `xrayglm bench dist`: 2-rank data-parallel scaling on this machine (mpirun -np 2 against one
//! process).

use std::path::PathBuf;

use anyhow::{Context, Result};

/// `xrayglm bench dist`: 2-rank data-parallel scaling on this machine.
#[derive(Debug, Clone)]
pub struct DistBench {
    pub steps: usize,
    pub batch: usize,
    pub one_sps: f64,
    pub two_sps_per_rank: f64,
    pub comm_fraction: f64,
}

/// Goal from the issue: samples/s of 2 ranks ÷ 2× one rank.
pub const GOAL_SCALING: f64 = 0.85;

impl DistBench {
    pub fn efficiency(&self) -> f64 {
        self.two_sps_per_rank / self.one_sps
    }
}

impl std::fmt::Display for DistBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "dist bench: {} steps, micro-batch {} per rank, 1 thread per process",
            self.steps, self.batch
        )?;
        writeln!(
            f,
            "  1 process                 {:8.2} samples/s",
            self.one_sps
        )?;
        writeln!(
            f,
            "  mpirun -np 2              {:8.2} samples/s ({:.2} per rank)",
            2.0 * self.two_sps_per_rank,
            self.two_sps_per_rank
        )?;
        writeln!(
            f,
            "  scaling efficiency        {:8.3}   (goal {GOAL_SCALING}: {})",
            self.efficiency(),
            if self.efficiency() >= GOAL_SCALING {
                "met"
            } else {
                "NOT met"
            }
        )?;
        writeln!(
            f,
            "  collectives / step time   {:8.3}   (loss + flags + one gradient bucket)",
            self.comm_fraction
        )
    }
}

/// `xrayglm bench dist`: 2-rank data-parallel scaling on CPU (mpirun -np 2 vs one process, 1
/// thread each).
#[derive(clap::Args, Debug, Clone)]
pub struct DistArgs {
    #[command(flatten)]
    pub cfg: crate::config::ConfigArgs,
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Micro-batch per rank.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// Train the same config for `steps` steps as one process and as `mpirun -np 2` (each process
/// one thread, one loader worker, micro-batch `batch`) and compare steady-state samples/s (the
/// first logged window, with warm-up, is left out).
pub fn dist(a: &DistArgs) -> Result<DistBench> {
    let (config, overrides, steps, batch) =
        (a.cfg.config.as_deref(), &a.cfg.overrides, a.steps, a.batch);
    let tokenizer = crate::tokenizer::find(a.tokenizer.as_deref());
    let tokenizer = tokenizer.as_deref();
    anyhow::ensure!(steps >= 6, "--steps must be at least 6");
    let exe = std::env::current_exe()?;
    let tmp = std::env::temp_dir().join(format!("xrayglm-bench-dist-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let window = steps / 3;
    let run = |ranks: usize, name: &str| -> Result<Vec<serde_json::Value>> {
        let mut c = if ranks > 1 {
            let mut c = std::process::Command::new("mpirun");
            // --allow-run-as-root is harmless for other users.
            c.args([
                "-np",
                &ranks.to_string(),
                "--oversubscribe",
                "--allow-run-as-root",
            ]);
            c.arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        c.arg("finetune");
        if let Some(p) = config {
            c.arg("--config").arg(p);
        }
        if let Some(t) = tokenizer {
            c.arg("--tokenizer").arg(t);
        }
        let mut sets: Vec<String> = overrides.to_vec();
        sets.extend([
            format!("loader.batch_size={batch}"),
            "loader.workers=1".into(),
            "train.grad_accum=1".into(),
            format!("train.train_iters={steps}"),
            format!("train.log_interval={window}"),
            format!("train.save_interval={}", steps * 10),
            "train.val_fraction=0".into(),
            "train.progress=false".into(),
            "train.resume=\"never\"".into(),
            "model.device=\"cpu\"".into(),
            format!("train.out_dir={:?}", tmp.display().to_string()),
            format!("train.name={name:?}"),
        ]);
        for s in sets {
            c.arg("--set").arg(s);
        }
        c.env("OMP_NUM_THREADS", "1").env("MKL_NUM_THREADS", "1");
        let out = c.output().with_context(|| {
            format!(
                "running {}",
                if ranks > 1 {
                    "mpirun"
                } else {
                    "xrayglm finetune"
                }
            )
        })?;
        anyhow::ensure!(
            out.status.success(),
            "{ranks}-rank benchmark run failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(tmp.join(name).join("metrics.jsonl"))?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("samples_per_s").is_some())
            .skip(1)
            .collect())
    };
    let mean = |v: &[serde_json::Value], k: &str| {
        v.iter().filter_map(|r| r[k].as_f64()).sum::<f64>() / v.len().max(1) as f64
    };
    let result = (|| -> Result<DistBench> {
        let one = run(1, "one")?;
        let two = run(2, "two")?;
        Ok(DistBench {
            steps,
            batch,
            one_sps: mean(&one, "samples_per_s"),
            two_sps_per_rank: mean(&two, "samples_per_s"),
            comm_fraction: mean(&two, "comm_fraction"),
        })
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}
