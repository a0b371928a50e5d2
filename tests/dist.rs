//! Data-parallel training over MPI on CPU: `mpirun -np 2` equals one process accumulating the same
//! global batches, ranks stay identical, resume continues the trajectory, and a dead rank ends the
//! job. Needs OpenMPI's `mpirun` (scripts/setup.sh installs it).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

fn sets(dir: &Path, name: &str, extra: &[&str]) -> Vec<String> {
    let mut v = common::dp_run(dir, name);
    v.push("train.train_iters=6".into());
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
    common::ok(&mut finetune(
        &shared,
        1,
        &sets(dir.path(), "one", &["train.grad_accum=2"]),
    ));
    common::ok(&mut finetune(&shared, 2, &sets(dir.path(), "two", &[])));
    let (a, b) = (log(&dir.path().join("one")), log(&dir.path().join("two")));
    assert_eq!(a.len(), 6);
    common::same_losses("two ranks", &a, &b, 1e-5);
    for y in &b {
        assert_eq!(
            y["lora_rank_divergence"].as_f64().unwrap(),
            0.0,
            "ranks differ at step {}",
            y["step"]
        );
    }
    let la = final_lora(&dir.path().join("one"));
    common::same_lora("two ranks", &la, &final_lora(&dir.path().join("two")), 1e-5);
    // Resume: 3 steps, stop, resume to 6 — the same trajectory.
    common::ok(&mut finetune(
        &shared,
        2,
        &sets(dir.path(), "resumed", &["train.stop_at=3"]),
    ));
    common::ok(&mut finetune(&shared, 2, &sets(dir.path(), "resumed", &[])));
    let c = log(&dir.path().join("resumed"));
    assert_eq!(c.len(), 6);
    for (x, y) in b.iter().zip(&c) {
        assert_eq!(x["loss"], y["loss"], "step {}", x["step"]);
    }
    // Elastic: 2 ranks to step 3, then 1 rank (the checkpoint's global batch of 4, so
    // accumulation 2); and 1 rank (train.global_batch_size = 4) to step 3, then 2 ranks. Both
    // continue the uninterrupted trajectory.
    for (name, first, then, extra) in [
        ("two_then_one", 2, 1, None),
        ("one_then_two", 1, 2, Some("train.global_batch_size=4")),
    ] {
        let with = |more: &[&'static str]| {
            let mut v: Vec<&str> = extra.into_iter().collect();
            v.extend(more);
            sets(dir.path(), name, &v)
        };
        common::ok(&mut finetune(&shared, first, &with(&["train.stop_at=3"])));
        let out = common::ok(&mut finetune(&shared, then, &with(&[])));
        let said = String::from_utf8_lossy(&out.stderr);
        let accum = 2 / then;
        assert!(
            said.contains(&format!(
                "resuming on {then} rank(s) a run saved by {first}: global batch 4 = {then} rank(s) × micro-batch 2 × accumulation {accum}"
            )),
            "{name}: {said}"
        );
        let run = dir.path().join(name);
        let start: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|v: &serde_json::Value| v["event"] == "start")
            .collect();
        assert_eq!(start.len(), 2, "{name}");
        assert!(start[0].get("world_size_changed").is_none());
        assert_eq!(start[1]["world_size_changed"]["from"], first, "{name}");
        assert_eq!(start[1]["world_size_changed"]["to"], then, "{name}");
        assert_eq!(start[1]["global_batch"], 4, "{name}");
        assert_eq!(start[1]["grad_accum"], accum, "{name}");
        let worst = common::same_losses(name, &a, &log(&run), 1e-5);
        eprintln!("{name}: largest per-step loss difference {worst:.2e} relative to one process");
        common::same_lora(name, &la, &final_lora(&run), 1e-5);
    }
    // A world that cannot split the global batch is refused before anything is written.
    let out = finetune(
        &shared,
        1,
        &sets(dir.path(), "odd", &["train.global_batch_size=3"]),
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(
            "train.global_batch_size 3 cannot be split over 1 rank(s) × loader.batch_size 2"
        ),
        "{said}"
    );
    assert!(!dir.path().join("odd").exists());
}

/// GRPO over two ranks: each rank samples its micro-batch from the seed one process accumulating
/// the same global batch gives it, the advantages come from both ranks' rewards and the loss is
/// normalized over the whole rollout batch, so the first step equals the single process's.
#[test]
fn two_rank_grpo_equals_one_process_at_its_first_step() {
    let _s = common::serial();
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let grpo = [
        "train.method=\"grpo\"",
        "train.train_iters=1",
        "rl.group=4",
        "rl.max_new_tokens=8",
        "rl.reward.rouge_l=0.5",
        "rl.scale_rewards=\"batch\"",
    ];
    let mut one = grpo.to_vec();
    one.push("train.grad_accum=2");
    common::ok(&mut finetune(&shared, 1, &sets(dir.path(), "one", &one)));
    common::ok(&mut finetune(&shared, 2, &sets(dir.path(), "two", &grpo)));
    let (a, b) = (log(&dir.path().join("one")), log(&dir.path().join("two")));
    assert_eq!((a.len(), b.len()), (1, 1));
    for key in [
        "rl/reward",
        "rl/reward_std",
        "rl/completion_tokens",
        "rl/reward_rouge_l",
    ] {
        assert_eq!(a[0][key], b[0][key], "{key}");
    }
    let (lx, ly) = (
        a[0]["loss"].as_f64().unwrap(),
        b[0]["loss"].as_f64().unwrap(),
    );
    assert!(
        lx != 0.0 && (lx - ly).abs() <= 1e-5 * lx.abs(),
        "{lx} vs {ly}"
    );
    let (la, lb) = (
        final_lora(&dir.path().join("one")),
        final_lora(&dir.path().join("two")),
    );
    for (k, v) in &la {
        let e =
            (&lb[k] - v).abs().max().double_value(&[]) / v.abs().max().double_value(&[]).max(1e-12);
        assert!(e <= 1e-5, "{k}: {e:.3e}");
    }
}

/// Generation metrics during training over two ranks: the held-out films' batches are dealt to
/// the ranks and the reports gathered, so the scores are exactly one process's — compared at the
/// start, where both runs have the same weights (later steps differ by the accumulation order) —
/// and both runs keep a `best`.
#[test]
fn two_ranks_generate_the_reports_one_process_does() {
    let _s = common::serial();
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let extra = [
        "train.val_fraction=0.25",
        "train.train_iters=2",
        "train.save_interval=2",
        "train.eval_generate_interval=1",
        "train.eval_generate_films=5",
        "train.eval_max_new_tokens=12",
        "train.best_metric=\"bleu_4\"",
    ];
    let gen = |name: &str, ranks: usize| -> Vec<serde_json::Value> {
        let o = finetune(&shared, ranks, &sets(dir.path(), name, &extra))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let run = dir.path().join(name);
        assert!(run.join("best").is_file() && run.join("best.json").is_file());
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("gen/bleu_4").is_some())
            .collect()
    };
    let (a, b) = (gen("gen1", 1), gen("gen2", 2));
    let steps = |v: &[serde_json::Value]| -> Vec<i64> {
        v.iter().map(|x| x["step"].as_i64().unwrap()).collect()
    };
    assert_eq!(steps(&a), vec![0, 1, 2]);
    assert_eq!(steps(&b), vec![0, 1, 2]);
    let (x, y) = (&a[0], &b[0]);
    assert_eq!(x["gen_films"], 5);
    assert_eq!(y["gen_films"], 5);
    for k in [
        "gen/bleu_4",
        "gen/rouge_l",
        "gen/cider_d",
        "gen/ce_f1",
        "gen/distinct_reports",
    ] {
        assert_eq!(x[k], y[k], "{k} at the start");
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

/// Wait for `job` to end within `secs` of `since`, returning whether it succeeded.
fn ends_within(job: &mut std::process::Child, since: std::time::Instant, secs: u64) -> bool {
    loop {
        if let Some(status) = job.try_wait().unwrap() {
            return status.success();
        }
        assert!(
            since.elapsed().as_secs() < secs,
            "the job did not end within {secs} s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn a_hung_rank_ends_the_job_naming_it() {
    let _s = common::serial();
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("hang");
    let err_path = dir.path().join("stderr.txt");
    let mut job = finetune(
        &shared,
        2,
        &sets(
            dir.path(),
            "hang",
            &[
                "train.train_iters=100000",
                "train.save_interval=2",
                "train.dist_timeout_s=8",
            ],
        ),
    )
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&err_path).unwrap())
    .spawn()
    .unwrap();
    let t = std::time::Instant::now();
    while !run.join("latest").exists() {
        assert!(t.elapsed().as_secs() < 120, "no checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Rank 1 stops (SIGSTOP): alive but silent, the case a dead-process check would miss.
    let rank1 = Command::new("pgrep")
        .args(["-f", "-P", &job.id().to_string(), "xrayglm"])
        .output()
        .unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&rank1.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(pids.len(), 2, "two ranks under mpirun: {pids:?}");
    let rank_of = |pid: &str| {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        env.split(|&b| b == 0)
            .find_map(|kv| {
                std::str::from_utf8(kv)
                    .ok()?
                    .strip_prefix("OMPI_COMM_WORLD_RANK=")
                    .map(str::to_string)
            })
            .unwrap()
    };
    let hung = pids.iter().find(|p| rank_of(p) == "1").unwrap();
    let stopped_at = std::time::Instant::now();
    assert!(Command::new("kill")
        .args(["-STOP", hung])
        .status()
        .unwrap()
        .success());
    assert!(
        !ends_within(&mut job, stopped_at, 30),
        "the job must fail when a rank hangs"
    );
    let err = std::fs::read_to_string(&err_path).unwrap();
    assert!(
        err.contains("rank 0 of 2")
            && err.contains(&format!(
                "rank 1 on {} has died, hung or become unreachable",
                common::hostname()
            )),
        "the error must name the hung rank:\n{err}"
    );
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

#[test]
fn ranks_with_different_configs_refuse_to_start() {
    let _s = common::serial();
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_xrayglm");
    let a = sets(dir.path(), "mismatch", &[]);
    let b = sets(dir.path(), "mismatch", &["train.lr=2e-3"]);
    // MPMD launch: rank 0 and rank 1 get different overrides.
    let out = Command::new("mpirun")
        .args([
            "--oversubscribe",
            "--allow-run-as-root",
            "-np",
            "1",
            bin,
            "finetune",
        ])
        .args(&a)
        .args([":", "-np", "1", bin, "finetune"])
        .args(&b)
        .env("XRAYGLM_TOKENIZER", common::ice_text(&shared))
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mismatched ranks must not train");
    assert!(
        err.contains("different configuration or xrayglm version than rank 0"),
        "{err}"
    );
    assert!(
        !dir.path().join("mismatch").join("latest").exists(),
        "no checkpoint may be written"
    );
}

#[test]
fn tensor_all_reduce_and_broadcast_are_exact_over_two_ranks() {
    let _s = common::serial();
    let bin = env!("CARGO_BIN_EXE_xrayglm");
    let out = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe", "--allow-run-as-root", bin])
        .args(["bench", "allreduce", "--mib", "4", "--iters", "2"])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("backend mpi, 2 rank(s)"), "{text}");
    assert!(text.contains("correct on all 2 ranks"), "{text}");
}

#[test]
fn nccl_without_a_cuda_libtorch_is_a_clear_error() {
    let bin = env!("CARGO_BIN_EXE_xrayglm");
    let out = Command::new(bin)
        .args(["bench", "allreduce", "--backend", "nccl", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"nccl\" needs model.device on CUDA"), "{err}");
    if !tch::Cuda::is_available() {
        let info = Command::new(bin).arg("info").output().unwrap();
        let text = String::from_utf8_lossy(&info.stdout);
        assert!(text.contains("nccl: unavailable"), "{text}");
    }
}

#[test]
fn dist_bench_reports_scaling_and_comm_fraction() {
    let _s = common::serial();
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xrayglm"))
        .args(["bench", "dist", "--steps", "6", "--batch", "2"])
        .args(common::set_args(common::small_run(dir.path(), "unused")))
        .env("XRAYGLM_TOKENIZER", common::ice_text(&shared))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let eff: f64 = text
        .lines()
        .find(|l| l.contains("scaling efficiency"))
        .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(eff > 0.0 && eff.is_finite(), "{text}");
    let frac: f64 = text
        .lines()
        .find(|l| l.contains("collectives / step time"))
        .and_then(|l| l.split_whitespace().nth(4)?.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(frac > 0.0 && frac < 1.0, "{text}");
}
