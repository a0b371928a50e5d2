//! NCCL collectives on CUDA tensors, through a small hand-written binding loaded at run time
//! (`dlopen("libnccl.so.2")`, which finds the NCCL that libtorch's CUDA build already loaded).
//! There is no NCCL crate to use; the C API used here is NCCL's public `nccl.h` (2.x):
//! `ncclGetVersion`, `ncclGetUniqueId`, `ncclCommInitRank`, `ncclAllReduce`, `ncclBroadcast`,
//! `ncclCommGetAsyncError`, `ncclCommAbort`, `ncclCommDestroy`, `ncclGetErrorString`.
//!
//! Bootstrap: rank 0 creates the 128-byte unique id and broadcasts it over the MPI (or single)
//! communicator that launched the job; scalar and byte collectives keep going over that
//! communicator (host values), only tensors go through NCCL.
//!
//! Streams: collectives are enqueued on CUDA's legacy default stream (a null `cudaStream_t`),
//! which is libtorch's default stream, so they are ordered after the kernels that produced the
//! gradients and before the optimizer's. Completion is awaited by polling `cudaStreamQuery`
//! and `ncclCommGetAsyncError` against a deadline: a peer that died or hung makes this rank abort
//! its NCCL communicator and the whole job instead of blocking forever.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tch::{Kind, Tensor};

use super::Comm;

type NcclResult = c_int;
type NcclComm = *mut c_void;
type CudaStream = *mut c_void;

const NCCL_SUCCESS: NcclResult = 0;
const NCCL_IN_PROGRESS: NcclResult = 7;
const NCCL_SUM: c_int = 0;
const NCCL_FLOAT16: c_int = 6;
const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;
const NCCL_BFLOAT16: c_int = 9;
const CUDA_SUCCESS: c_int = 0;
const CUDA_ERROR_NOT_READY: c_int = 600;

/// `ncclUniqueId`: an opaque 128-byte struct, passed by value to `ncclCommInitRank`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [u8; 128],
}

struct Api {
    _nccl: libloading::Library,
    _cudart: Option<libloading::Library>,
    get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut NcclComm, c_int, UniqueId, c_int) -> NcclResult,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        NcclComm,
        CudaStream,
    ) -> NcclResult,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        NcclComm,
        CudaStream,
    ) -> NcclResult,
    async_error: unsafe extern "C" fn(NcclComm, *mut NcclResult) -> NcclResult,
    abort: unsafe extern "C" fn(NcclComm) -> NcclResult,
    destroy: unsafe extern "C" fn(NcclComm) -> NcclResult,
    error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    set_device: Option<unsafe extern "C" fn(c_int) -> c_int>,
    stream_query: Option<unsafe extern "C" fn(CudaStream) -> c_int>,
}

fn sym<T: Copy>(lib: &libloading::Library, name: &str) -> Result<T> {
    // SAFETY: every symbol is looked up with the signature from nccl.h / cuda_runtime_api.h.
    unsafe {
        lib.get::<T>(name.as_bytes())
            .map(|s| *s)
            .with_context(|| format!("symbol {name} missing from the NCCL/CUDA library"))
    }
}

impl Api {
    fn load() -> Result<Self> {
        if !crate::device::register_cuda() {
            bail!("the NCCL backend needs a CUDA build of libtorch (libtorch_cuda.so did not load; run scripts/setup.sh --cuda)");
        }
        let mut last = String::new();
        let mut nccl = None;
        for name in ["libnccl.so.2", "libnccl.so"] {
            // SAFETY: NCCL's initialisers only set up its own state.
            match unsafe { libloading::Library::new(name) } {
                Ok(l) => {
                    nccl = Some(l);
                    break;
                }
                Err(e) => last = e.to_string(),
            }
        }
        let nccl = nccl.ok_or_else(|| anyhow!("could not load libnccl.so.2: {last}"))?;
        let cudart = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
            .iter()
            // SAFETY: as above; the CUDA runtime is already loaded by libtorch_cuda.
            .find_map(|n| unsafe { libloading::Library::new(n) }.ok());
        let (set_device, stream_query) = match &cudart {
            Some(c) => (
                Some(sym(c, "cudaSetDevice")?),
                Some(sym(c, "cudaStreamQuery")?),
            ),
            None => (None, None),
        };
        Ok(Self {
            get_version: sym(&nccl, "ncclGetVersion")?,
            get_unique_id: sym(&nccl, "ncclGetUniqueId")?,
            comm_init_rank: sym(&nccl, "ncclCommInitRank")?,
            all_reduce: sym(&nccl, "ncclAllReduce")?,
            broadcast: sym(&nccl, "ncclBroadcast")?,
            async_error: sym(&nccl, "ncclCommGetAsyncError")?,
            abort: sym(&nccl, "ncclCommAbort")?,
            destroy: sym(&nccl, "ncclCommDestroy")?,
            error_string: sym(&nccl, "ncclGetErrorString")?,
            set_device,
            stream_query,
            _nccl: nccl,
            _cudart: cudart,
        })
    }

    fn check(&self, what: &str, r: NcclResult) -> Result<()> {
        if r == NCCL_SUCCESS {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let msg = unsafe { CStr::from_ptr((self.error_string)(r)) }.to_string_lossy();
        bail!("{what} failed: NCCL error {r}: {msg}")
    }
}

fn version_string(v: i32) -> String {
    if v >= 10000 {
        format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
    } else {
        format!("{}.{}.{}", v / 1000, (v / 100) % 10, v % 100)
    }
}

/// The version of the NCCL library the backend would use, or why it cannot be loaded.
pub fn nccl_version() -> Result<String> {
    let api = Api::load()?;
    let mut v = 0;
    // SAFETY: writes one int.
    api.check("ncclGetVersion", unsafe { (api.get_version)(&mut v) })?;
    Ok(version_string(v))
}

/// NCCL for tensors, the launching communicator for everything else.
pub struct Nccl {
    api: Api,
    comm: NcclComm,
    boot: Box<dyn Comm>,
    device: i32,
    timeout: Duration,
    version: i32,
}

// SAFETY: the communicator handle is only used from the thread that owns the trainer; NCCL
// communicators may be moved between threads.
unsafe impl Send for Nccl {}

impl Nccl {
    /// Create the NCCL communicator on CUDA device `device` for the ranks of `boot`.
    pub fn init(boot: Box<dyn Comm>, device: usize, timeout: Duration) -> Result<Self> {
        let api = Api::load()?;
        let mut version = 0;
        // SAFETY: writes one int.
        api.check("ncclGetVersion", unsafe { (api.get_version)(&mut version) })?;
        if let Some(set) = api.set_device {
            // SAFETY: plain CUDA runtime call.
            let r = unsafe { set(device as c_int) };
            if r != CUDA_SUCCESS {
                bail!("cudaSetDevice({device}) failed with CUDA error {r}");
            }
        }
        let mut id = UniqueId { internal: [0; 128] };
        if boot.rank() == 0 {
            // SAFETY: fills the 128-byte struct.
            api.check("ncclGetUniqueId", unsafe { (api.get_unique_id)(&mut id) })?;
        }
        boot.broadcast(&mut id.internal, 0)
            .context("broadcasting the NCCL unique id")?;
        let mut comm: NcclComm = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; every rank passes the same id.
        api.check("ncclCommInitRank", unsafe {
            (api.comm_init_rank)(
                &mut comm,
                boot.world_size() as c_int,
                id,
                boot.rank() as c_int,
            )
        })?;
        Ok(Self {
            api,
            comm,
            boot,
            device: device as i32,
            timeout,
            version,
        })
    }

    /// NCCL's version as major.minor.patch.
    pub fn version(&self) -> String {
        version_string(self.version)
    }

    /// Wait for the enqueued collective: poll the stream and NCCL's async error until the
    /// deadline; on error or timeout abort the communicator and the job.
    fn wait(&self, what: &str) -> Result<()> {
        let Some(query) = self.api.stream_query else {
            // No CUDA runtime symbols: fall back to libtorch's blocking synchronisation.
            tch::Cuda::synchronize(self.device as i64);
            return Ok(());
        };
        let start = Instant::now();
        loop {
            // SAFETY: querying the legacy default stream.
            let r = unsafe { query(std::ptr::null_mut()) };
            if r == CUDA_SUCCESS {
                return Ok(());
            }
            if r != CUDA_ERROR_NOT_READY {
                self.fail(what, &format!("CUDA error {r}"));
            }
            let mut async_err = NCCL_SUCCESS;
            // SAFETY: valid communicator, writes one int.
            unsafe { (self.api.async_error)(self.comm, &mut async_err) };
            if async_err != NCCL_SUCCESS && async_err != NCCL_IN_PROGRESS {
                // SAFETY: static string.
                let msg = unsafe { CStr::from_ptr((self.api.error_string)(async_err)) };
                self.fail(
                    what,
                    &format!("NCCL async error: {}", msg.to_string_lossy()),
                );
            }
            if self.boot.stop_signal() != 0 {
                let waited = start.elapsed();
                if waited > super::STALLED_BEFORE_SIGNAL {
                    // SAFETY: aborting our own communicator; the process ends next.
                    unsafe { (self.api.abort)(self.comm) };
                }
                super::stalled_and_stopped(self.boot.as_ref(), &format!("NCCL {what}"), waited);
            }
            if start.elapsed() > self.timeout {
                self.fail(
                    what,
                    &format!(
                        "did not complete in {:.0} s — {}",
                        self.timeout.as_secs_f64(),
                        self.boot.peer_hint()
                    ),
                );
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn fail(&self, what: &str, why: &str) -> ! {
        crate::errln!(
            "error: rank {} of {}: NCCL {what} {why}; aborting the job",
            self.boot.rank(),
            self.boot.world_size()
        );
        // SAFETY: aborting our own communicator; it is not used afterwards.
        unsafe { (self.api.abort)(self.comm) };
        self.boot.abort(3)
    }

    /// The NCCL data type of `t`, after checking it is contiguous and on this rank's GPU.
    fn check_tensor(&self, t: &Tensor, what: &str) -> Result<c_int> {
        if t.device() != tch::Device::Cuda(self.device as usize) || !t.is_contiguous() {
            bail!(
                "NCCL {what} needs a contiguous tensor on cuda:{}, got {:?}",
                self.device,
                t.device()
            );
        }
        Ok(match t.kind() {
            Kind::Float => NCCL_FLOAT32,
            Kind::Double => NCCL_FLOAT64,
            Kind::BFloat16 => NCCL_BFLOAT16,
            Kind::Half => NCCL_FLOAT16,
            k => bail!("NCCL {what} of {k:?} tensors is not supported"),
        })
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator is not used after this.
        unsafe { (self.api.destroy)(self.comm) };
    }
}

impl Comm for Nccl {
    fn rank(&self) -> usize {
        self.boot.rank()
    }
    fn world_size(&self) -> usize {
        self.boot.world_size()
    }
    fn local_rank(&self) -> usize {
        self.boot.local_rank()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.boot.all_reduce_sum(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.boot.all_reduce_sum_f64(buf)
    }
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.boot.broadcast(buf, root)
    }
    fn all_reduce_tensor(&self, t: &mut Tensor) -> Result<()> {
        let kind = self.check_tensor(t, "all-reduce")?;
        let ptr = t.data_ptr();
        // SAFETY: in-place all-reduce over `numel` elements of a live, contiguous CUDA tensor
        // on this rank's device, enqueued on the default stream.
        let r = unsafe {
            (self.api.all_reduce)(
                ptr,
                ptr,
                t.numel(),
                kind,
                NCCL_SUM,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.api.check("ncclAllReduce", r)?;
        self.wait("all-reduce")?;
        Ok(())
    }
    fn broadcast_tensor(&self, t: &mut Tensor, root: usize) -> Result<()> {
        let kind = self.check_tensor(t, "broadcast")?;
        let ptr = t.data_ptr();
        // SAFETY: as in all_reduce_tensor.
        let r = unsafe {
            (self.api.broadcast)(
                ptr,
                ptr,
                t.numel(),
                kind,
                root as c_int,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.api.check("ncclBroadcast", r)?;
        self.wait("broadcast")?;
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.boot.abort(code)
    }
    fn name(&self) -> &'static str {
        "nccl"
    }
}
