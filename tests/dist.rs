//! Data-parallel training over MPI on CPU: `mpirun -np 2` equals one process accumulating the same
//! global batches, ranks stay identical, resume continues the trajectory, and a dead rank ends the
//! job. Needs OpenMPI's `mpirun` (scripts/setup.sh installs it).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

fn sets(dir: &Path, name: &str, extra: &[&str]) -> Vec<String> {
    let mut v = common::small_run(dir, name);
    v.extend(
        [
            "train.train_iters=6",
            "train.log_interval=1",
            "train.val_fraction=0",
            "train.lr=1e-3",
            "train.schedule=\"constant\"",
            "loader.workers=1",
        ]
        .map(String::from),
    );
    v.extend(extra.iter().map(|s| s.to_string()));
    common::set_args(v)
}

fn finetune(shared: &Path, ranks: usize, args: &[String]) -> Command {
    let bin = env!("CARGO_BIN_EXE_xrayglm");
    let mut c = if ranks > 1 {
        let mut c = Command::new("mpirun");
        c.args([
            "-np",
            &ranks.to_string(),
            "--oversubscribe",
            "--allow-run-as-root",
            bin,
        ]);
        c
    } else {
        Command::new(bin)
    };
    c.arg("finetune").args(args);
    c.env("XRAYGLM_TOKENIZER", common::ice_text(shared))
        .env("OMP_NUM_THREADS", "1");
    c
}

fn log(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("loss").is_some())
        .collect()
}

fn final_lora(run: &Path) -> std::collections::HashMap<String, tch::Tensor> {
    let latest = std::fs::read_to_string(run.join("latest")).unwrap();
    common::tensors(&run.join(latest.trim()).join("lora.safetensors"))
}

#[test]
fn two_ranks_equal_one_process_accumulating_the_same_global_batches() {
    let _s = common::serial();
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let one = finetune(
        &shared,
        1,
        &sets(dir.path(), "one", &["train.grad_accum=2"]),
    )
    .output()
    .unwrap();
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    let two = finetune(&shared, 2, &sets(dir.path(), "two", &[]))
        .output()
        .unwrap();
    assert!(
        two.status.success(),
        "{}",
        String::from_utf8_lossy(&two.stderr)
    );
    let (a, b) = (log(&dir.path().join("one")), log(&dir.path().join("two")));
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!(
            (lx - ly).abs() <= 1e-5 * lx.abs(),
            "step {}: {lx} vs {ly}",
            x["step"]
        );
        assert_eq!(
            y["lora_rank_divergence"].as_f64().unwrap(),
            0.0,
            "ranks differ at step {}",
            y["step"]
        );
    }
    let (la, lb) = (
        final_lora(&dir.path().join("one")),
        final_lora(&dir.path().join("two")),
    );
    assert_eq!(la.len(), lb.len());
    for (k, v) in &la {
        let e =
            (&lb[k] - v).abs().max().double_value(&[]) / v.abs().max().double_value(&[]).max(1e-12);
        assert!(e <= 1e-5, "{k}: {e:.3e}");
    }
    // Resume: 3 steps, stop, resume to 6 — the same trajectory.
    let half = finetune(
        &shared,
        2,
        &sets(dir.path(), "resumed", &["train.stop_at=3"]),
    )
    .output()
    .unwrap();
    assert!(
        half.status.success(),
        "{}",
        String::from_utf8_lossy(&half.stderr)
    );
    let rest = finetune(&shared, 2, &sets(dir.path(), "resumed", &[]))
        .output()
        .unwrap();
    assert!(
        rest.status.success(),
        "{}",
        String::from_utf8_lossy(&rest.stderr)
    );
    let c = log(&dir.path().join("resumed"));
    assert_eq!(c.len(), 6);
    for (x, y) in b.iter().zip(&c) {
        assert_eq!(x["loss"], y["loss"], "step {}", x["step"]);
    }
}

#[test]
fn a_dead_rank_ends_the_job_quickly() {
    let _s = common::serial();
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("kill");
    let mut job = finetune(
        &shared,
        2,
        &sets(
            dir.path(),
            "kill",
            &["train.train_iters=100000", "train.save_interval=2"],
        ),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let t = std::time::Instant::now();
    while !run.join("latest").exists() {
        assert!(t.elapsed().as_secs() < 120, "no checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let children = Command::new("pgrep")
        .args(["-P", &job.id().to_string(), "xrayglm"])
        .output()
        .unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&children.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(pids.len(), 2, "two ranks under mpirun: {pids:?}");
    let killed_at = std::time::Instant::now();
    Command::new("kill")
        .args(["-9", &pids[1]])
        .status()
        .unwrap();
    loop {
        if let Some(status) = job.try_wait().unwrap() {
            assert!(!status.success(), "the job must fail when a rank dies");
            break;
        }
        assert!(
            killed_at.elapsed().as_secs() < 30,
            "the job did not end within 30 s of a rank dying"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let left = Command::new("pgrep")
        .args(["-f", &run.display().to_string()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "orphaned ranks remain"
    );
    let latest = std::fs::read_to_string(run.join("latest")).unwrap();
    xrayglm::weights::source::load_model(&run.join(latest.trim()), &Default::default()).unwrap();
}
