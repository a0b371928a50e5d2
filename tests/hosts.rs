//! Several hosts for real: two test hosts made as network namespaces on this machine (a veth pair
//! on a private /24, made and removed by the test), with OpenMPI launching one rank into each from
//! a hostfile through `scripts/finetune_XrayGLM.sh` — its remote-launch agent
//! (`tests/hosts/netns-rsh`) enters a namespace where ssh would log in to a node, so ranks talk
//! over TCP between the namespaces only. Two hosts train as one host's two ranks do; a host cut
//! off (its link set down), or its rank killed (SIGKILL) during a checkpoint save, ends every
//! process within `train.dist_timeout_s` + 10 s with a message naming the lost rank and host; the
//! last checkpoint loads, and the run resumes on the host that is left, alone, on the same
//! trajectory. Needs root and iproute2 (CI runs as root; without them the test fails under
//! CI=true and is skipped elsewhere).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Seconds a collective waits for a peer in these runs.
const DIST_TIMEOUT_S: u64 = 10;

/// Two test hosts: namespaces `<tag>a` / `<tag>b` named host-a / host-b, joined by a veth pair.
struct Hosts {
    ns: [String; 2],
    veth: [String; 2],
    addrs: [String; 2],
    subnet: String,
    hostfile: PathBuf,
}

const NAMES: [&str; 2] = ["host-a", "host-b"];

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Hosts {
    /// Make the two hosts, or say why not (None: skipped outside CI).
    fn new(dir: &Path) -> Option<Self> {
        static MADE: AtomicUsize = AtomicUsize::new(0);
        let k = MADE.fetch_add(1, Ordering::Relaxed);
        let tag = format!("xg{}{k}", std::process::id() % 100_000);
        let subnet = format!("10.{}.{}", 200 + k % 50, std::process::id() % 250);
        let hosts = Hosts {
            ns: [format!("{tag}a"), format!("{tag}b")],
            veth: [format!("{tag}va"), format!("{tag}vb")],
            addrs: [format!("{subnet}.1"), format!("{subnet}.2")],
            subnet: format!("{subnet}.0/24"),
            hostfile: dir.join("hostfile"),
        };
        match hosts.make() {
            Ok(()) => Some(hosts),
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI=true but test hosts cannot be made (root and iproute2 are needed): {e}"
                );
                eprintln!("skipped: test hosts cannot be made here: {e}");
                None
            }
        }
    }

    fn make(&self) -> Result<(), String> {
        for ns in &self.ns {
            ip(&["netns", "add", ns])?;
        }
        ip(&[
            "link",
            "add",
            &self.veth[0],
            "type",
            "veth",
            "peer",
            "name",
            &self.veth[1],
        ])?;
        for i in 0..2 {
            ip(&["link", "set", &self.veth[i], "netns", &self.ns[i]])?;
            let cidr = format!("{}/24", self.addrs[i]);
            ip(&[
                "-n",
                &self.ns[i],
                "addr",
                "add",
                &cidr,
                "dev",
                &self.veth[i],
            ])?;
            ip(&["-n", &self.ns[i], "link", "set", "lo", "up"])?;
            ip(&["-n", &self.ns[i], "link", "set", &self.veth[i], "up"])?;
        }
        let lines: Vec<String> = self.addrs.iter().map(|a| format!("{a} slots=1")).collect();
        std::fs::write(&self.hostfile, lines.join("\n") + "\n").map_err(|e| e.to_string())
    }

    /// `scripts/finetune_XrayGLM.sh` on both hosts (mpirun on host-a, 1 rank each), with `env`.
    fn launch(&self, config: &Path, args: &[String], env: &[(&str, String)]) -> Command {
        let mut c = self.on(0, launcher(config, args, env));
        c.env("HOSTFILE", &self.hostfile)
            .env(
                "XRAYGLM_NETNS_HOSTS",
                (0..2)
                    .map(|i| format!("{}={}={}", self.addrs[i], self.ns[i], NAMES[i]))
                    .collect::<Vec<_>>()
                    .join(" "),
            )
            .env(
                "OMPI_MCA_plm_rsh_agent",
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hosts/netns-rsh"),
            )
            // TCP between the hosts only: no shared memory, no other interface.
            .env("OMPI_MCA_btl", "self,tcp")
            .env("OMPI_MCA_pml", "ob1")
            .env("OMPI_MCA_btl_tcp_if_include", &self.subnet)
            .env("OMPI_MCA_oob_tcp_if_include", &self.subnet)
            // Both test hosts share this machine's cores: no binding, or each binds its rank to
            // core 0 of its own view of the machine.
            .env("OMPI_MCA_hwloc_base_binding_policy", "none")
            // The launcher notices a lost host in ~3 s, well within DIST_TIMEOUT_S.
            .env("OMPI_MCA_oob_tcp_keepalive_time", "1")
            .env("OMPI_MCA_oob_tcp_keepalive_intvl", "1")
            .env("OMPI_MCA_oob_tcp_keepalive_probes", "2");
        c
    }

    /// `cmd` run on host `i`: in its namespace, with its host name.
    fn on(&self, i: usize, cmd: Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[i], "unshare", "--uts", "sh", "-c"])
            .arg(format!("hostname {} && exec \"$@\"", NAMES[i]))
            .arg("sh")
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }

    /// Processes in host `i`'s namespace.
    fn pids(&self, i: usize) -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.ns[i]])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    /// The xrayglm rank running on host `i`.
    fn rank_pid(&self, i: usize) -> Option<String> {
        self.pids(i).into_iter().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "xrayglm")
        })
    }

    /// Cut host `i` off (`up` false: its end of the link goes down), or join it again.
    fn link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.ns[i], "link", "set", &self.veth[i], state]).unwrap();
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for i in 0..2 {
            for p in self.pids(i) {
                let _ = Command::new("kill").args(["-9", &p]).status();
            }
        }
        for ns in &self.ns {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// The launch script with `config` and `--set` arguments, `env` added.
fn launcher(config: &Path, args: &[String], env: &[(&str, String)]) -> Command {
    let mut c = Command::new("bash");
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/finetune_XrayGLM.sh"))
        .args(args)
        .env("NUM_GPUS", "2")
        .env("CONFIG", config)
        .env("XRAYGLM_BIN", env!("CARGO_BIN_EXE_xrayglm"))
        .env("OMP_NUM_THREADS", "1")
        .env_remove("HOSTFILE");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// The test's config file: the data-parallel tests' short run, 2 samples per micro-batch, dropout
/// (so the random streams must follow the samples), a checkpoint every 2 steps, all kept.
fn config(dir: &Path) -> PathBuf {
    let mut o = common::dp_run(dir, "unused");
    o.extend(
        [
            "train.train_iters=100000",
            "train.save_interval=2",
            "train.keep_last=100",
            "model.glm_dropout=0.1",
        ]
        .map(String::from),
    );
    o.push(format!("train.dist_timeout_s={DIST_TIMEOUT_S}"));
    let cfg = xrayglm::config::Config::load(None, &o).unwrap();
    let path = dir.join("run.toml");
    std::fs::write(&path, cfg.to_toml().unwrap()).unwrap();
    path
}

fn sets(name: &str, extra: &[String]) -> Vec<String> {
    let mut v = vec![format!("train.name={name:?}")];
    v.extend(extra.iter().cloned());
    common::set_args(v)
}

/// The last logged loss of each step, and the comm fraction of the log lines.
fn losses(run: &Path) -> (BTreeMap<i64, f64>, Vec<f64>) {
    let (mut steps, mut comm) = (BTreeMap::new(), Vec::new());
    for line in std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let (Some(s), Some(l)) = (v["step"].as_i64(), v["loss"].as_f64()) {
            steps.insert(s, l);
            if let Some(c) = v["comm_fraction"].as_f64() {
                comm.push(c);
            }
        }
    }
    (steps, comm)
}

/// Steps 1..=n of `got` equal `want` within 1e-5 relative; the largest relative difference.
fn same_trajectory(what: &str, got: &BTreeMap<i64, f64>, want: &BTreeMap<i64, f64>, n: i64) -> f64 {
    let mut worst = 0.0f64;
    for s in 1..=n {
        let (g, w) = (got[&s], want[&s]);
        let d = (g - w).abs() / w.abs();
        assert!(d <= 1e-5, "{what}: step {s}: {g} vs {w}");
        worst = worst.max(d);
    }
    worst
}

/// The LoRA weights of `run`'s checkpoint at `step` equal `want`'s within 1e-5 relative.
fn same_lora(what: &str, run: &Path, want: &Path, step: i64) {
    let at = |r: &Path| common::tensors(&r.join(step.to_string()).join("lora.safetensors"));
    common::same_lora(what, &at(want), &at(run), 1e-5);
}

fn latest(run: &Path) -> Option<i64> {
    std::fs::read_to_string(run.join("latest"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Start `cmd` (its stderr kept for [`ends_within`]) and wait until `ready`, failing if the job
/// ends first or 120 s pass.
fn start_until(cmd: &mut Command, what: &str, ready: impl Fn() -> bool) -> Child {
    let mut job = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !ready() {
        assert!(
            t.elapsed().as_secs() < 120 && job.try_wait().unwrap().is_none(),
            "no {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    job
}

/// Wait for `job` to end and every process on both hosts with it; the seconds it took from
/// `since` (failing past `limit`) and the job's stderr.
fn ends_within(job: &mut Child, hosts: &Hosts, since: Instant, limit: f64) -> (f64, String) {
    loop {
        let done = job.try_wait().unwrap().is_some();
        let left = hosts.pids(0).len() + hosts.pids(1).len();
        if done && left == 0 {
            break;
        }
        assert!(
            since.elapsed().as_secs_f64() < limit,
            "the job (ended: {done}) and {left} process(es) on the test hosts are still there {limit} s on"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = since.elapsed().as_secs_f64();
    let status = job.wait().unwrap();
    let mut err = String::new();
    use std::io::Read;
    job.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    for line in err
        .lines()
        .filter(|l| l.contains("error") || l.contains("noticed"))
    {
        eprintln!("  | {line}");
    }
    assert!(!status.success(), "a job that lost a host must fail");
    (took, err)
}

#[test]
fn two_hosts_train_as_one_and_a_run_survives_losing_one() {
    let _s = common::serial();
    let Some(shared) = common::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(hosts) = Hosts::new(dir.path()) else {
        return;
    };
    let cfg = config(dir.path());
    let tok = [(
        "XRAYGLM_TOKENIZER",
        common::ice_text(&shared).display().to_string(),
    )];
    let set = |k: &str, v: i64| format!("train.{k}={v}");

    // The reference: one host's two ranks, uninterrupted, 12 steps.
    common::ok(&mut launcher(
        &cfg,
        &sets("one_host", &[set("stop_at", 12)]),
        &tok,
    ));
    let reference = dir.path().join("one_host");
    let (want, comm_one) = losses(&reference);

    // Two hosts, one rank each, over TCP between the namespaces: the same losses and LoRA.
    let out = common::ok(&mut hosts.launch(&cfg, &sets("two_hosts", &[set("stop_at", 6)]), &tok));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("2 rank(s) on 2 host(s), backend mpi"),
        "{said}"
    );
    assert!(!said.contains("warning"), "{said}");
    let two = dir.path().join("two_hosts");
    let (got, comm_two) = losses(&two);
    let worst = same_trajectory("two hosts", &got, &want, 6);
    same_lora("two hosts", &two, &reference, 6);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    eprintln!(
        "two hosts vs one: largest loss difference {worst:.2e} relative; comm_fraction {:.3} (two hosts) vs {:.3} (one host)",
        mean(&comm_two),
        mean(&comm_one)
    );

    // A launcher that would notice a lost host only after the ranks' timeout is warned about.
    let mut slow = hosts.launch(&cfg, &sets("slow", &[set("stop_at", 1)]), &tok);
    slow.env("OMPI_MCA_oob_tcp_keepalive_time", "0");
    let said = String::from_utf8_lossy(&common::ok(&mut slow).stderr).into_owned();
    assert!(
        said.contains("OpenMPI notices a lost host after never (keepalive is off), not within train.dist_timeout_s = 10"),
        "{said}"
    );

    // A host cut off mid-run: every process ends, the survivor naming host-b's rank.
    let run = dir.path().join("cut");
    let mut job = start_until(
        &mut hosts.launch(&cfg, &sets("cut", &[]), &tok),
        "a checkpoint",
        || latest(&run).is_some_and(|s| s >= 4),
    );
    let cut_at = Instant::now();
    hosts.link(1, false);
    let (took, err) = ends_within(&mut job, &hosts, cut_at, (DIST_TIMEOUT_S + 10) as f64);
    eprintln!("host cut off: every process ended {took:.1} s after the cut");
    assert!(
        err.contains("rank 0 of 2 on host-a")
            && err.contains("rank 1 on host-b has died, hung or become unreachable"),
        "rank 0 must name the lost rank and host:\n{err}"
    );
    // The last checkpoint loads, and host-a alone continues the run: 2 steps past it.
    let k = latest(&run).unwrap();
    xrayglm::weights::source::load_model(&run.join(k.to_string()), &Default::default()).unwrap();
    let mut alone = Command::new(env!("CARGO_BIN_EXE_xrayglm"));
    alone
        .args(["finetune", "--config"])
        .arg(&cfg)
        .args(sets("cut", &[set("stop_at", k + 2)]))
        .env("OMP_NUM_THREADS", "1")
        .env(tok[0].0, &tok[0].1);
    let out = common::ok(&mut hosts.on(0, alone));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("resuming on 1 rank(s) a run saved by 2"),
        "{said}"
    );
    let (got, _) = losses(&run);
    let worst = same_trajectory("cut, then host-a alone", &got, &want, k + 2);
    same_lora("cut, then host-a alone", &run, &reference, k + 2);
    eprintln!(
        "cut at step {k}, resumed alone to {}: largest loss difference {worst:.2e} relative",
        k + 2
    );

    // Host-a's rank (the one that saves) killed in the middle of a checkpoint save.
    hosts.link(1, true);
    let run = dir.path().join("killed");
    let pause = [
        tok[0].clone(),
        ("XRAYGLM_FAULT_SAVE_PAUSE_MS", "3000".to_string()),
    ];
    let mut job = start_until(
        &mut hosts.launch(&cfg, &sets("killed", &[]), &pause),
        "a second save",
        || run.join(".4.partial").exists(),
    );
    let pid = hosts.rank_pid(0).expect("host-a's rank");
    let killed_at = Instant::now();
    assert!(Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap()
        .success());
    let (took, err) = ends_within(&mut job, &hosts, killed_at, (DIST_TIMEOUT_S + 10) as f64);
    eprintln!("rank killed mid-save: every process ended {took:.1} s after the kill");
    assert!(
        err.contains("host-a") && err.contains("rank 0"),
        "the job's end must name the lost rank and host:\n{err}"
    );
    // The interrupted save is not a checkpoint; the one before it loads; host-b alone continues.
    assert_eq!(latest(&run), Some(2));
    assert!(!run.join("4").exists());
    let mut alone = Command::new(env!("CARGO_BIN_EXE_xrayglm"));
    alone
        .args(["finetune", "--config"])
        .arg(&cfg)
        .args(sets("killed", &[set("stop_at", 4)]))
        .env("OMP_NUM_THREADS", "1")
        .env(tok[0].0, &tok[0].1);
    let out = common::ok(&mut hosts.on(1, alone));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("removed 1 unfinished save"), "{said}");
    let (got, _) = losses(&run);
    same_trajectory("killed, then host-b alone", &got, &want, 4);
    same_lora("killed, then host-b alone", &run, &reference, 4);
}
