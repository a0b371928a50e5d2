//! `xrayglm bench allreduce`: correctness and bandwidth of the data-parallel backend's tensor
//! collectives.

use std::time::Instant;

use anyhow::Result;

/// `xrayglm bench allreduce`: correctness and bandwidth of the tensor all-reduce (under mpirun;
/// NCCL on GPUs).
#[derive(clap::Args, Debug, Clone)]
pub struct AllreduceArgs {
    /// auto, single, mpi or nccl
    #[arg(long, default_value = "auto")]
    pub backend: crate::dist::Backend,
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::DeviceSpec,
    #[arg(long, default_value_t = 64.0)]
    pub mib: f64,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
}

/// `xrayglm bench allreduce`: correctness and bandwidth of the data-parallel backend's tensor
/// collectives (run under mpirun for several ranks; NCCL with world size 1 on one GPU).
/// Every rank checks its own result and fails if it is wrong; rank 0 returns the report.
pub fn allreduce(a: &AllreduceArgs) -> Result<Option<String>> {
    let (mib, iters) = (a.mib, a.iters);
    let dev = a.device.device()?;
    let dev = match dev {
        // One GPU per local rank, as in training (two ranks share GPU 0 on a one-GPU machine).
        tch::Device::Cuda(_) if a.device == crate::device::DeviceSpec::Cuda => tch::Device::Cuda(
            crate::dist::launcher_ranks().2 % tch::Cuda::device_count().max(1) as usize,
        ),
        d => d,
    };
    let comm = crate::dist::init(
        a.backend,
        std::time::Duration::from_secs(a.timeout_s),
        match dev {
            tch::Device::Cuda(i) => Some(i),
            _ => None,
        },
    )?;
    let (rank, world) = (comm.rank(), comm.world_size());
    let n = ((mib * 1024.0 * 1024.0 / 4.0) as i64).max(1);
    // Small integers: sums are exact in fp32, so the check is equality.
    let pattern = tch::Tensor::arange(n, (tch::Kind::Float, dev)).remainder(7.0);
    let expect = &pattern * ((world * (world + 1) / 2) as f64);
    let mut t = &pattern * ((rank + 1) as f64);
    comm.all_reduce_tensor(&mut t)?;
    let err = (&t - &expect).abs().max().double_value(&[]);
    anyhow::ensure!(
        err == 0.0,
        "rank {rank}: {} all-reduce of {n} floats is wrong (max error {err})",
        comm.name()
    );
    let mut b = &pattern * ((rank + 1) as f64);
    comm.broadcast_tensor(&mut b, 0)?;
    let err_b = (&b - &pattern).abs().max().double_value(&[]);
    anyhow::ensure!(
        err_b == 0.0,
        "rank {rank}: {} broadcast is wrong (max error {err_b})",
        comm.name()
    );
    let t0 = Instant::now();
    for _ in 0..iters {
        comm.all_reduce_tensor(&mut t)?;
    }
    if let tch::Device::Cuda(i) = dev {
        tch::Cuda::synchronize(i as i64);
    }
    let secs = t0.elapsed().as_secs_f64() / iters.max(1) as f64;
    let bytes = n as f64 * 4.0;
    // NCCL's "bus bandwidth": what each link carries in a ring all-reduce.
    let bus = bytes * 2.0 * (world as f64 - 1.0) / world as f64 / secs / 1e9;
    let mut ok = [1.0];
    comm.all_reduce_sum_f64(&mut ok)?;
    Ok((rank == 0).then(|| {
        format!(
            "allreduce bench: backend {}, {world} rank(s), {dev:?}, {:.1} MiB fp32\n  correct on all {} ranks (sum and broadcast exact)\n  {:.3} ms per all-reduce, algorithm {:.2} GB/s, bus {:.2} GB/s\n",
            comm.name(),
            bytes / 1048576.0,
            ok[0],
            secs * 1e3,
            bytes / secs / 1e9,
            bus
        )
    }))
}
