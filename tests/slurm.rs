//! Under Slurm: a one-machine cluster (slurmctld and slurmd with a config of the test's own,
//! started and stopped by the test; Debian's slurm-wlm, PMIx to OpenMPI) runs
//! `srun -n 2 xrayglm finetune`, as the README's Slurm recipe does. The two ranks find each other
//! through Slurm's PMIx, train, agree (identical LoRA after every step) and equal one process
//! accumulating the same global batches. Needs slurm-wlm (scripts/setup.sh installs it); without
//! it the test fails under CI=true and is skipped elsewhere.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// slurmctld and slurmd for this machine alone, with their state under a temporary folder.
struct Cluster {
    conf: PathBuf,
    daemons: Vec<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    fn start(dir: &Path) -> Option<Self> {
        let found = ["slurmctld", "slurmd", "srun", "sinfo"].iter().all(|b| {
            Command::new("sh")
                .args(["-c", &format!("command -v {b}")])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !found {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but Slurm (slurmctld, slurmd, srun) is missing: scripts/setup.sh installs slurm-wlm"
            );
            eprintln!("skipped: Slurm is not installed");
            return None;
        }
        let host = common::hostname();
        let d = dir.display();
        for sub in ["state", "spool"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let conf = dir.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=xrayglm-test\nSlurmctldHost={host}\nSlurmUser=root\nSlurmdUser=root\n\
                 AuthType=auth/none\nCredType=cred/none\nStateSaveLocation={d}/state\n\
                 SlurmdSpoolDir={d}/spool\nSlurmctldPidFile={d}/slurmctld.pid\n\
                 SlurmdPidFile={d}/slurmd.pid\nSlurmctldPort={}\nSlurmdPort={}\n\
                 ProctrackType=proctrack/pgid\nTaskPlugin=task/none\nSelectType=select/cons_tres\n\
                 SelectTypeParameters=CR_CPU\nMpiDefault=pmix\nReturnToService=2\n\
                 SlurmctldLogFile={d}/slurmctld.log\nSlurmdLogFile={d}/slurmd.log\n\
                 JobCompType=jobcomp/none\nAccountingStorageType=accounting_storage/none\n\
                 NodeName={host} CPUs=2 State=UNKNOWN\n\
                 PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES\n",
                free_port(),
                free_port()
            ),
        )
        .unwrap();
        let mut cluster = Cluster {
            conf,
            daemons: Vec::new(),
        };
        for (daemon, args) in [
            ("slurmctld", vec!["-D"]),
            ("slurmd", vec!["-D", "-N", &host]),
        ] {
            let child = Command::new(daemon)
                .args(&args)
                .env("SLURM_CONF", &cluster.conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            cluster.daemons.push(child);
        }
        // Ready when the node is idle.
        let t = Instant::now();
        loop {
            let out = cluster
                .cmd("sinfo")
                .args(["-h", "-o", "%T"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).trim() == "idle" {
                break;
            }
            let log = std::fs::read_to_string(dir.join("slurmctld.log")).unwrap_or_default();
            assert!(
                t.elapsed().as_secs() < 60,
                "the test cluster did not start:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(cluster)
    }

    /// A Slurm client command for this cluster.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = Command::new("kill")
                .args(["-TERM", &d.id().to_string()])
                .status();
        }
        for d in &mut self.daemons {
            let t = Instant::now();
            while d.try_wait().ok().flatten().is_none() && t.elapsed().as_secs() < 10 {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

fn records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn srun_launches_two_ranks_that_train_and_agree() {
    let _s = common::serial();
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(cluster) = Cluster::start(&dir.path().join("slurm")) else {
        return;
    };
    let args = |name: &str, extra: &[&str]| {
        let mut v = common::dp_run(dir.path(), name);
        v.push("train.train_iters=6".into());
        v.extend(extra.iter().map(|s| s.to_string()));
        common::set_args(v)
    };
    let tok = common::ice_text(&shared);
    let bin = env!("CARGO_BIN_EXE_xrayglm");
    common::ok(
        Command::new(bin)
            .arg("finetune")
            .args(args("one", &["train.grad_accum=2"]))
            .env("XRAYGLM_TOKENIZER", &tok)
            .env("OMP_NUM_THREADS", "1"),
    );
    let out = common::ok(
        cluster
            .cmd("srun")
            .args(["-n", "2", "--kill-on-bad-exit=1", bin, "finetune"])
            .args(args("srun", &[]))
            .env("XRAYGLM_TOKENIZER", &tok)
            .env("OMP_NUM_THREADS", "1"),
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("2 rank(s) on 1 host(s), backend mpi"),
        "{said}"
    );
    let (one, srun) = (
        records(&dir.path().join("one")),
        records(&dir.path().join("srun")),
    );
    let steps = |r: &[serde_json::Value]| -> Vec<serde_json::Value> {
        r.iter()
            .filter(|v| v.get("loss").is_some())
            .cloned()
            .collect()
    };
    let (a, b) = (steps(&one), steps(&srun));
    assert_eq!(a.len(), 6);
    common::same_losses("srun -n 2", &a, &b, 1e-5);
    for y in &b {
        assert_eq!(
            y["lora_rank_divergence"], 0.0,
            "ranks differ at step {}",
            y["step"]
        );
    }
    let start = srun.iter().find(|v| v["event"] == "start").unwrap();
    assert_eq!(start["world_size"], 2);
    let lora = |run: &str| {
        let p = dir.path().join(run);
        let latest = std::fs::read_to_string(p.join("latest")).unwrap();
        common::tensors(&p.join(latest.trim()).join("lora.safetensors"))
    };
    common::same_lora("srun -n 2", &lora("one"), &lora("srun"), 1e-5);
}
