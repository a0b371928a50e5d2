//! Data-parallel communication behind one small trait: a single process, or MPI ranks (OpenMPI,
//! launched by `mpirun` / `srun`). Collectives are the few a data-parallel LoRA trainer needs:
//! sum-all-reduce of a flat gradient bucket and of scalars, and a broadcast of bytes.
//!
//! A peer that dies, hangs or is cut off must not hang the others: every MPI collective is started
//! non-blocking and polled against a deadline; past it the rank reports which collective timed
//! out and which ranks on which hosts it waited for, and aborts the whole MPI job (`MPI_Abort`),
//! so no process is left behind. When the launcher gives up first (mpirun has lost a host's daemon
//! and sends SIGTERM), a rank stalled in a collective says the same and exits at once instead of
//! waiting for a step boundary that never comes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::traits::*;
use tch::{Device, Kind, Tensor};

pub mod lora;
mod nccl;
pub use nccl::{nccl_version, Nccl};

/// Collectives across the data-parallel ranks.
pub trait Comm {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Rank within this node (for binding a GPU).
    fn local_rank(&self) -> usize;
    /// Element-wise sum across ranks, in place.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Replace `buf` on every rank with rank `root`'s bytes (lengths must already agree).
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Element-wise sum of a float tensor across ranks, in place. This default stages the
    /// values through host memory (so MPI ranks can share one GPU); NCCL reduces on the device.
    fn all_reduce_tensor(&self, t: &mut Tensor) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        through_host(t, |host| self.all_reduce_sum(host))
    }
    /// Replace `t` on every rank with rank `root`'s values. Default: staged through the host.
    fn broadcast_tensor(&self, t: &mut Tensor, root: usize) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        through_host(t, |host| {
            // SAFETY: viewing an initialised f32 slice as its bytes, only for this call.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(host.as_mut_ptr() as *mut u8, host.len() * 4)
            };
            self.broadcast(bytes, root)
        })
    }
    /// End the whole job (every rank) with `code`.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn name(&self) -> &'static str;
    /// This rank's host name.
    fn host(&self) -> String {
        String::new()
    }
    /// How many hosts the ranks run on.
    fn host_count(&self) -> usize {
        1
    }
    /// The SIGTERM / SIGINT this process received while in a collective (0: none).
    fn stop_signal(&self) -> usize {
        0
    }
    /// Who to blame when a collective stalls: the other ranks and their hosts.
    fn peer_hint(&self) -> String {
        peer_hint(self.rank(), self.world_size(), &[])
    }
}

/// Run `f` on `t`'s values as host fp32 and copy the result back into `t`.
fn through_host(t: &mut Tensor, f: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
    let mut host =
        Vec::<f32>::try_from(&t.flatten(0, -1).to_kind(Kind::Float).to_device(Device::Cpu))?;
    f(&mut host)?;
    let back = Tensor::from_slice(&host)
        .view_as(t)
        .to_kind(t.kind())
        .to_device(t.device());
    tch::no_grad(|| t.copy_(&back));
    Ok(())
}

/// Who to blame when a collective stalls: with two ranks it can only be the other one; with more,
/// one of the others (a non-blocking collective does not say which), listed by host. `hosts`
/// holds every rank's host name, in rank order, when known.
pub(crate) fn peer_hint(rank: usize, world: usize, hosts: &[String]) -> String {
    let on = |r: usize| match hosts.get(r) {
        Some(h) if !h.is_empty() => format!(" on {h}"),
        _ => String::new(),
    };
    if world == 2 {
        return format!(
            "rank {}{} has died, hung or become unreachable",
            1 - rank,
            on(1 - rank)
        );
    }
    if hosts.len() != world {
        return "a peer rank has died, hung or become unreachable".to_string();
    }
    let mut by_host: Vec<(String, Vec<usize>)> = Vec::new();
    for (r, h) in hosts.iter().enumerate().filter(|&(r, _)| r != rank) {
        match by_host.iter_mut().find(|(name, _)| name == h) {
            Some((_, ranks)) => ranks.push(r),
            None => by_host.push((h.clone(), vec![r])),
        }
    }
    let list: Vec<String> = by_host
        .iter()
        .map(|(h, ranks)| {
            let ranks: Vec<String> = ranks.iter().map(usize::to_string).collect();
            format!("{h}: {}", ranks.join(", "))
        })
        .collect();
    format!(
        "one of the other ranks has died, hung or become unreachable (by host: {})",
        list.join("; ")
    )
}

/// One process: every collective is the identity.
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut [u8], _root: usize) -> Result<()> {
        Ok(())
    }
    fn name(&self) -> &'static str {
        "single"
    }
}

/// MPI ranks (CPU buffers; GPU tensors are staged through the host).
pub struct Mpi {
    _universe: mpi::environment::Universe,
    world: mpi::topology::SimpleCommunicator,
    local_rank: usize,
    timeout: Duration,
    /// Every rank's host name, in rank order.
    hosts: Vec<String>,
    /// SIGTERM / SIGINT received (its number; 0: none).
    signal: Arc<AtomicUsize>,
}

/// Bytes of a host name exchanged at start (longer names are cut).
const HOST_BYTES: usize = 64;

/// How long a collective must have stalled before a signal ends the rank inside it (a signal
/// that arrives while the peers are alive waits for the step boundary instead).
pub(crate) const STALLED_BEFORE_SIGNAL: Duration = Duration::from_secs(1);

fn env_usize(names: &[&str]) -> Option<usize> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok()?.parse().ok())
}

/// Whether this process was started by an MPI launcher (or Slurm) with more than one rank.
pub fn launched_with_mpi() -> bool {
    env_usize(&[
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "SLURM_NTASKS",
    ])
    .is_some_and(|n| n > 1)
}

impl Mpi {
    pub fn init(timeout: Duration) -> Result<Self> {
        let universe =
            mpi::initialize().ok_or_else(|| anyhow::anyhow!("MPI was already initialised"))?;
        let world = universe.world();
        let local_rank = launcher_ranks().2;
        let signal = Arc::new(AtomicUsize::new(0));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register_usize(sig, Arc::clone(&signal), sig as usize)?;
        }
        let mut me = Self {
            _universe: universe,
            world,
            local_rank,
            timeout,
            hosts: Vec::new(),
            signal,
        };
        me.hosts = me.gather_hosts()?;
        Ok(me)
    }

    /// Every rank's host name (MPI's processor name), for messages about stalled peers.
    fn gather_hosts(&self) -> Result<Vec<String>> {
        let name = mpi::environment::processor_name().unwrap_or_default();
        let mut mine = [0u8; HOST_BYTES];
        let n = name.len().min(HOST_BYTES);
        mine[..n].copy_from_slice(&name.as_bytes()[..n]);
        let mut all = vec![0u8; HOST_BYTES * self.world_size()];
        mpi::request::scope(|scope| {
            let req = self
                .world
                .immediate_all_gather_into(scope, &mine[..], &mut all[..]);
            self.finish("host name exchange", req);
        });
        Ok(all
            .chunks(HOST_BYTES)
            .map(|c| {
                let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
                String::from_utf8_lossy(&c[..end]).into_owned()
            })
            .collect())
    }

    /// Poll a started collective until done; past the deadline abort the job, naming the rank.
    fn finish<'a, D: ?Sized, S: mpi::request::Scope<'a>>(
        &self,
        what: &str,
        mut req: mpi::request::Request<'a, D, S>,
    ) {
        let start = Instant::now();
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            let waited = start.elapsed();
            if waited > self.timeout {
                crate::errln!(
                    "error: rank {} of {}{}: {what} did not complete in {:.0} s — {}; aborting the job",
                    self.rank(),
                    self.world_size(),
                    on_host(self),
                    self.timeout.as_secs_f64(),
                    Comm::peer_hint(self)
                );
                self.world.abort(3);
            }
            stalled_and_stopped(self, what, waited);
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Comm for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn world_size(&self) -> usize {
        self.world.size() as usize
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let send = buf.to_vec();
        mpi::request::scope(|scope| {
            let req =
                self.world
                    .immediate_all_reduce_into(scope, &send[..], buf, SystemOperation::sum());
            self.finish("gradient all-reduce", req);
        });
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        mpi::request::scope(|scope| {
            let req =
                self.world
                    .immediate_all_reduce_into(scope, &send[..], buf, SystemOperation::sum());
            self.finish("scalar all-reduce", req);
        });
        Ok(())
    }
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.world_size() {
            bail!("broadcast root {root} is not a rank");
        }
        let root_proc = self.world.process_at_rank(root as i32);
        mpi::request::scope(|scope| {
            let req = root_proc.immediate_broadcast_into(scope, buf);
            self.finish("broadcast", req);
        });
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
    fn name(&self) -> &'static str {
        "mpi"
    }
    fn host(&self) -> String {
        self.hosts.get(self.rank()).cloned().unwrap_or_default()
    }
    fn stop_signal(&self) -> usize {
        self.signal.load(Ordering::Relaxed)
    }
    fn host_count(&self) -> usize {
        let mut h = self.hosts.clone();
        h.sort();
        h.dedup();
        h.len().max(1)
    }
    fn peer_hint(&self) -> String {
        peer_hint(self.rank(), self.world_size(), &self.hosts)
    }
}

/// " on HOST" for messages, when the host is known.
fn on_host(comm: &dyn Comm) -> String {
    match comm.host() {
        h if h.is_empty() => h,
        h => format!(" on {h}"),
    }
}

/// A collective that has waited `waited` for its peers when a stop signal came: the launcher is
/// ending the job (it lost a host, or the user stopped it) while this rank waits for a peer that is
/// gone. Say which, and end the process at once (a signal while the peers are alive waits for the
/// step boundary instead).
pub(crate) fn stalled_and_stopped(comm: &dyn Comm, what: &str, waited: Duration) {
    let sig = comm.stop_signal();
    if sig == 0 || waited <= STALLED_BEFORE_SIGNAL {
        return;
    }
    crate::errln!(
        "error: rank {} of {}{}: stopped by signal {sig} after waiting {:.1} s for the {what} — {}",
        comm.rank(),
        comm.world_size(),
        on_host(comm),
        waited.as_secs_f64(),
        comm.peer_hint()
    );
    // SAFETY: ends this process at once; MPI's exit handlers would wait for the peers this rank
    // has just given up on.
    unsafe { libc::_exit(128 + sig as i32) };
}

/// The communicator for `backend`: "auto" (MPI when launched with more than one rank, with NCCL
/// for tensors when training on CUDA), "single", "mpi" or "nccl" (NCCL over an MPI bootstrap, or
/// alone for one process). `cuda_device` is this rank's GPU, when training on one.
/// `train.backend`: how ranks talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// With >1 rank under mpirun/srun: NCCL on CUDA, MPI on CPU; else one process.
    #[default]
    Auto,
    Single,
    /// MPI (CUDA tensors staged through the host).
    Mpi,
    Nccl,
}

impl std::str::FromStr for Backend {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "single" => Ok(Self::Single),
            "mpi" => Ok(Self::Mpi),
            "nccl" => Ok(Self::Nccl),
            other => bail!("backend {other:?}: use auto, single, mpi or nccl"),
        }
    }
}

pub fn init(
    backend: Backend,
    timeout: Duration,
    cuda_device: Option<usize>,
) -> Result<Box<dyn Comm>> {
    let boot = || -> Result<Box<dyn Comm>> {
        if launched_with_mpi() {
            Ok(Box::new(Mpi::init(timeout)?))
        } else {
            Ok(Box::new(Single))
        }
    };
    match (backend, cuda_device) {
        (Backend::Single, _) => Ok(Box::new(Single)),
        (Backend::Mpi, _) => Ok(Box::new(Mpi::init(timeout)?)),
        (Backend::Nccl, Some(d)) => Ok(Box::new(Nccl::init(boot()?, d, timeout)?)),
        (Backend::Nccl, None) => bail!("train.backend \"nccl\" needs model.device on CUDA"),
        (Backend::Auto, Some(d)) if launched_with_mpi() => {
            Ok(Box::new(Nccl::init(boot()?, d, timeout)?))
        }
        (Backend::Auto, _) => boot(),
    }
}

/// This rank's position from the launcher's environment (OpenMPI, MPICH/PMI, Slurm), before
/// any communicator exists: (rank, world size, local rank).
pub fn launcher_ranks() -> (usize, usize, usize) {
    let rank = env_usize(&[
        "OMPI_COMM_WORLD_RANK",
        "PMI_RANK",
        "PMIX_RANK",
        "SLURM_PROCID",
    ])
    .unwrap_or(0);
    let world = env_usize(&[
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "SLURM_NTASKS",
    ])
    .unwrap_or(1);
    let local = env_usize(&[
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "PMIX_LOCAL_RANK",
        "SLURM_LOCALID",
    ])
    .unwrap_or(0);
    (rank, world, local)
}

/// Check that every rank runs the same configuration: rank 0's hash is broadcast and compared.
pub fn check_same_config(comm: &dyn Comm, text: &str) -> Result<()> {
    // FNV-1a over the resolved config and the program version and source revision.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let version = concat!(env!("CARGO_PKG_VERSION"), " ", env!("XRAYGLM_GIT_REV"));
    for b in text.bytes().chain(version.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mine = h.to_le_bytes();
    let mut root = mine;
    comm.broadcast(&mut root, 0)?;
    let mut differs = [(root != mine) as u8 as f64];
    comm.all_reduce_sum_f64(&mut differs)?;
    if differs[0] > 0.0 {
        bail!(
            "rank {}: {} rank(s) run a different configuration or xrayglm version than rank 0",
            comm.rank(),
            differs[0]
        );
    }
    Ok(())
}

/// Every rank's `mine` concatenated in rank order, on every rank, and where this rank's part
/// starts: the lengths, then the values (each written by its rank only), through sum
/// all-reduces.
pub fn all_gather_f64(comm: &dyn Comm, mine: &[f64]) -> Result<(Vec<f64>, usize)> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut lens = vec![0.0; world];
    lens[rank] = mine.len() as f64;
    comm.all_reduce_sum_f64(&mut lens)?;
    let lens: Vec<usize> = lens.iter().map(|&l| l as usize).collect();
    let offset: usize = lens[..rank].iter().sum();
    let mut all = vec![0.0; lens.iter().sum()];
    all[offset..offset + mine.len()].copy_from_slice(mine);
    comm.all_reduce_sum_f64(&mut all)?;
    Ok((all, offset))
}

/// Seconds OpenMPI's launcher takes to notice a host that dropped off the network: TCP keepalive
/// on its control connections (`oob_tcp_keepalive_time` + `_intvl` × `_probes`, from the
/// `OMPI_MCA_*` environment mpirun gives its ranks, else OpenMPI's defaults 300 + 20 × 9);
/// `None` when keepalive is off.
pub fn launcher_detection_s() -> Option<f64> {
    let get = |name: &str, default: f64| -> f64 {
        std::env::var(format!("OMPI_MCA_oob_tcp_keepalive_{name}"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(default)
    };
    let time = get("time", 300.0);
    (time > 0.0).then(|| time + get("intvl", 20.0) * get("probes", 9.0))
}

/// A warning for a run over several hosts whose launcher would notice a lost host only after the
/// ranks' own `timeout`: the ranks would then abort through a launcher that still waits on the
/// lost host's daemon, and the job would hang until TCP gives up (minutes).
pub fn detection_warning(comm: &dyn Comm, timeout_s: u64) -> Option<String> {
    if comm.host_count() < 2 || comm.name() == "single" {
        return None;
    }
    let slow = |d: String| {
        format!(
            "warning: {} ranks on {} hosts, and OpenMPI notices a lost host after {d}, not within \
             train.dist_timeout_s = {timeout_s}: a host cut off would hang the job. Set \
             OMPI_MCA_oob_tcp_keepalive_time / _intvl / _probes so that time + intvl × probes is \
             under {timeout_s} s (scripts/finetune_XrayGLM.sh does: 10 + 5 × 3), or raise the timeout",
            comm.world_size(),
            comm.host_count()
        )
    };
    match launcher_detection_s() {
        None => Some(slow("never (keepalive is off)".into())),
        Some(d) if d >= timeout_s as f64 => Some(slow(format!("{d:.0} s"))),
        Some(_) => None,
    }
}
