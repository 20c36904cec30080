//! The kernels of `cuda/*.cu` (scan, cross-entropy), launched on candle's CUDA storage.
//!
//! Each launch gets a zeroed scratch buffer for the decoupled look-back (a ticket counter
//! and, per tile and channel, a flag, an aggregate and an inclusive state: 16 bytes per
//! 128 time steps of a channel, under 4% of the scan's own traffic in f32).

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::backend::BackendStorage;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, WithDType};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/scan.ptx"));

/// Must match `LANES`, `WARPS` and `CHUNK` in scan.cu.
const LANES: usize = 32;
const THREADS: u32 = 256;
const CHUNK: usize = 128;

/// Which kernel of scan.cu; each takes its inputs, then the output, B, T, D and scratch.
#[derive(Clone, Copy, Debug)]
pub enum Kernel {
    /// (γ, u, h0) → h.
    Forward,
    /// (dy, γ, h, h0) → [du; dγ], two [B, T, D] blocks.
    Backward,
    /// (dy, γ) → the adjoint g.
    Adjoint,
}

impl Kernel {
    fn name(self) -> &'static str {
        match self {
            Kernel::Forward => "mmrec_scan_fwd",
            Kernel::Backward => "mmrec_scan_bwd",
            Kernel::Adjoint => "mmrec_scan_adjoint",
        }
    }

    fn outputs(self) -> usize {
        match self {
            Kernel::Backward => 2,
            _ => 1,
        }
    }
}

/// Launch `kernel` on [B, T, D] inputs (all of one dtype, f32 or bf16); returns the output
/// storage (`outputs()` × B·T·D elements).
pub fn launch(kernel: Kernel, inputs: &[(&CudaStorage, &Layout)], (b, t, d): (usize, usize, usize)) -> Result<CudaStorage> {
    let dev = inputs[0].0.device().clone();
    match inputs[0].0.dtype() {
        DType::F32 => launch_typed::<f32>(kernel, inputs, (b, t, d), &dev).map(|s| CudaStorage::wrap_cuda_slice(s, dev)),
        DType::BF16 => launch_typed::<half::bf16>(kernel, inputs, (b, t, d), &dev).map(|s| CudaStorage::wrap_cuda_slice(s, dev)),
        other => candle_core::bail!("scan: {other:?} is not supported on CUDA (f32 or bf16)"),
    }
}

fn launch_typed<T: CudaDType + DeviceRepr + WithDType>(kernel: Kernel, inputs: &[(&CudaStorage, &Layout)], (b, t, d): (usize, usize, usize), dev: &CudaDevice) -> Result<CudaSlice<T>> {
    let views = inputs.iter().map(|(s, l)| contiguous_view::<T>(s, l, "scan: inputs")).collect::<Result<Vec<_>>>()?;
    let n = b * t * d;
    // SAFETY: every element is written by the kernel (each (b, t, d) belongs to one tile).
    let out = unsafe { dev.alloc::<T>(kernel.outputs() * n)? };
    let tiles = b * d.div_ceil(LANES) * t.div_ceil(CHUNK);
    if tiles == 0 {
        return Ok(out);
    }
    let scratch = dev.alloc_zeros::<u32>(1 + 4 * tiles * LANES)?;
    let suffix = if T::DTYPE == DType::BF16 { "bf16" } else { "f32" };
    let func = dev.get_or_load_custom_func(&format!("{}_{suffix}", kernel.name()), "mmrec_scan", PTX)?;
    let (bi, ti, di) = (b as i32, t as i32, d as i32);
    let mut args = func.builder();
    for v in &views {
        args.arg(v);
    }
    args.arg(&out).arg(&bi).arg(&ti).arg(&di).arg(&scratch);
    let cfg = LaunchConfig { grid_dim: (tiles as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the argument list matches the kernel's signature in scan.cu.
    unsafe { args.launch(cfg) }.w()?;
    Ok(out)
}

/// Keep freed device memory in the stream-ordered pool instead of returning it to the
/// driver at every synchronisation: candle allocates each op's output, and without this a
/// custom op ran 4× slower and a device copy at 70% of its speed (CUDA.md).
pub fn keep_freed_memory(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on the device's default pool.
    unsafe {
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
        sys::cuMemPoolSetAttribute(default_pool(dev)?, attr, (&mut threshold as *mut u64).cast()).result().w()?;
    }
    Ok(())
}

/// The most device memory the default pool has had in use since the last
/// [`reset_peak_memory`] (candle allocates through it, stream-ordered).
pub fn peak_memory(dev: &CudaDevice) -> Result<u64> {
    pool_attribute(dev, None)
}

pub fn reset_peak_memory(dev: &CudaDevice) -> Result<()> {
    pool_attribute(dev, Some(0)).map(|_| ())
}

fn pool_attribute(dev: &CudaDevice, reset: Option<u64>) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    // SAFETY: plain driver calls on the device's default pool.
    unsafe {
        let pool = default_pool(dev)?;
        let mut value = reset.unwrap_or(0);
        let ptr = (&mut value as *mut u64).cast();
        match reset {
            Some(_) => sys::cuMemPoolSetAttribute(pool, attr, ptr).result().w()?,
            None => sys::cuMemPoolGetAttribute(pool, attr, ptr).result().w()?,
        }
        Ok(value)
    }
}

/// # Safety
/// A driver call; the pool lives as long as the device.
unsafe fn default_pool(dev: &CudaDevice) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ordinal = match candle_core::backend::BackendDevice::location(dev) {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id as i32,
        _ => 0,
    };
    let mut pool = std::ptr::null_mut();
    sys::cuDeviceGetDefaultMemPool(&mut pool, ordinal).result().w()?;
    Ok(pool)
}

const LOSS_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/loss.ptx"));
const LOSS_THREADS: u32 = 512;

/// The cross-entropy kernels of `cuda/loss.cu`, one block per row of [N, V] logits.
/// Forward: (logits, targets u32, mask f32) → [N, 2] f32 (loss, lse). Backward: (logits,
/// targets, [N, 2] (coef, lse)) → dlogits in the logits' dtype.
pub fn cross_entropy(backward: bool, logits: (&CudaStorage, &Layout), targets: (&CudaStorage, &Layout), rows: (&CudaStorage, &Layout), (n, v): (usize, usize)) -> Result<CudaStorage> {
    let dev = logits.0.device().clone();
    match logits.0.dtype() {
        DType::F32 => cross_entropy_typed::<f32>(backward, logits, targets, rows, (n, v), &dev),
        DType::BF16 => cross_entropy_typed::<half::bf16>(backward, logits, targets, rows, (n, v), &dev),
        other => candle_core::bail!("cross-entropy: {other:?} logits are not supported on CUDA (f32 or bf16)"),
    }
}

fn contiguous_view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((lo, hi)) => Ok(s.as_cuda_slice::<T>()?.slice(lo..hi)),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

fn cross_entropy_typed<T: CudaDType + DeviceRepr + WithDType>(backward: bool, logits: (&CudaStorage, &Layout), targets: (&CudaStorage, &Layout), rows: (&CudaStorage, &Layout), (n, v): (usize, usize), dev: &CudaDevice) -> Result<CudaStorage> {
    let x = contiguous_view::<T>(logits.0, logits.1, "cross-entropy: logits")?;
    let t = contiguous_view::<u32>(targets.0, targets.1, "cross-entropy: targets")?;
    let r = contiguous_view::<f32>(rows.0, rows.1, "cross-entropy: per-row input")?;
    let suffix = if T::DTYPE == DType::BF16 { "bf16" } else { "f32" };
    let name = format!("mmrec_ce_{}_{suffix}", if backward { "bwd" } else { "fwd" });
    let inputs = (&x, &t, &r, (n, v));
    if backward {
        launch_rows::<T, T>(&name, inputs, n * v, dev)
    } else {
        launch_rows::<T, f32>(&name, inputs, 2 * n, dev)
    }
}

type RowInputs<'a, 'b, T> = (&'b CudaView<'a, T>, &'b CudaView<'a, u32>, &'b CudaView<'a, f32>, (usize, usize));

/// Kernel `name` of loss.cu, one block per row: (logits, targets, per-row f32, out, V),
/// `len` output elements.
fn launch_rows<T: DeviceRepr, O: CudaDType + DeviceRepr>(name: &str, (x, t, r, (n, v)): RowInputs<T>, len: usize, dev: &CudaDevice) -> Result<CudaStorage> {
    let func = dev.get_or_load_custom_func(name, "mmrec_loss", LOSS_PTX)?;
    // SAFETY: each block writes every output element of its row.
    let out = unsafe { dev.alloc::<O>(len)? };
    if n > 0 {
        let vi = v as i32;
        let mut args = func.builder();
        args.arg(x).arg(t).arg(r).arg(&out).arg(&vi);
        let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (LOSS_THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the argument list matches mmrec_ce_fwd / mmrec_ce_bwd in loss.cu.
        unsafe { args.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
