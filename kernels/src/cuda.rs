//! The kernels of `cuda/*.cu` (scan, cross-entropy), launched on candle's CUDA storage.
//!
//! The scan's decoupled look-back needs a scratch buffer (a ticket counter and, per tile
//! and channel, a 16-byte word: 16 bytes per 64-512 time steps of a channel, at most 6% of
//! the scan's own traffic in f32). It is kept per stream between launches: the counter only
//! grows (each launch is told how many tickets went before it) and each launch has its own
//! epoch in the words' state, so no launch zeroes or allocates anything.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, WithDType};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/scan.ptx"));

/// Must match `LANES` in scan.cu.
const LANES: usize = 32;

/// Which kernel of scan.cu; each takes its inputs, then the output, B, T, D, the scratch,
/// the tickets handed out before it and its epoch.
#[derive(Clone, Copy, Debug)]
pub enum Kernel {
    /// (γ, u, h0) → h.
    Forward,
    /// (dy, γ, h, h0) → [dγ; du], two [B, T, D] blocks.
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

/// A tile of scan.cu: `warps` warps of `steps` time steps, `vec` channels per lane.
#[derive(Clone, Copy, Debug, PartialEq)]
struct TileShape {
    warps: u32,
    steps: usize,
    vec: usize,
}

impl TileShape {
    /// The fastest shape of `bench/scan_tune.cu`'s sweep (bench/results/gpu/scan-tune/) for
    /// the dtype, the pass and the regime: many channels (B·D ≥ 8192: the chunks' look-back
    /// is short, small tiles keep more of them in flight) or few channels over a long T
    /// (long tiles shorten the look-back chains). One channel per lane where D or a
    /// tensor's offset does not allow wider accesses.
    fn pick(kernel: Kernel, bf16: bool, channels: usize, widen: impl Fn(usize) -> bool) -> Self {
        let wide = channels >= 8192;
        let (warps, steps, vec) = match (bf16, matches!(kernel, Kernel::Forward), wide) {
            (false, true, true) => (8, 8, 2),
            (false, true, false) => (16, 16, 1),
            (false, false, true) => (4, 16, 2),
            (false, false, false) => (16, 8, 1),
            (true, true, true) => (4, 8, 1),
            (true, true, false) => (8, 32, 1),
            (true, false, true) => (4, 8, 4),
            (true, false, false) => (16, 8, 1),
        };
        let vec = if widen(vec) { vec } else { 1 };
        TileShape { warps, steps, vec }
    }

    fn suffix(self) -> String {
        format!("w{}s{}v{}", self.warps, self.steps, self.vec)
    }

    fn tiles(self, (b, t, d): (usize, usize, usize)) -> usize {
        b * d.div_ceil(LANES * self.vec) * t.div_ceil(self.warps as usize * self.steps)
    }
}

/// Launch `kernel` on [B, T, D] inputs (all of one dtype, f32 or bf16); returns the output
/// storage (`outputs()` × B·T·D elements).
pub fn launch(
    kernel: Kernel,
    inputs: &[(&CudaStorage, &Layout)],
    (b, t, d): (usize, usize, usize),
) -> Result<CudaStorage> {
    let dev = inputs[0].0.device().clone();
    match inputs[0].0.dtype() {
        DType::F32 => {
            launch_typed::<f32>(kernel, inputs, (b, t, d), &dev).map(|s| CudaStorage::wrap_cuda_slice(s, dev))
        }
        DType::BF16 => {
            launch_typed::<half::bf16>(kernel, inputs, (b, t, d), &dev).map(|s| CudaStorage::wrap_cuda_slice(s, dev))
        }
        other => candle_core::bail!("scan: {other:?} is not supported on CUDA (f32 or bf16)"),
    }
}

fn launch_typed<T: CudaDType + DeviceRepr + WithDType>(
    kernel: Kernel,
    inputs: &[(&CudaStorage, &Layout)],
    (b, t, d): (usize, usize, usize),
    dev: &CudaDevice,
) -> Result<CudaSlice<T>> {
    let views = inputs
        .iter()
        .map(|(s, l)| contiguous_view::<T>(s, l, "scan: inputs"))
        .collect::<Result<Vec<_>>>()?;
    let n = b * t * d;
    // SAFETY: every element is written by the kernel (each (b, t, d) belongs to one tile).
    let out = unsafe { dev.alloc::<T>(kernel.outputs() * n)? };
    // Wider accesses need D and every [B, T, D] input's start (allocations are 256-byte
    // aligned) to be multiples of the width; h0 [B, D] is read one element at a time.
    let widen = |vec: usize| d % vec == 0 && inputs.iter().all(|(_, l)| l.start_offset() % vec == 0);
    let shape = TileShape::pick(kernel, T::DTYPE == DType::BF16, b * d, widen);
    let tiles = shape.tiles((b, t, d));
    if tiles == 0 {
        return Ok(out);
    }
    let suffix = if T::DTYPE == DType::BF16 { "bf16" } else { "f32" };
    let name = format!("{}_{suffix}_{}", kernel.name(), shape.suffix());
    let func = dev.get_or_load_custom_func(&name, "mmrec_scan", PTX)?;
    let (bi, ti, di) = (b as i32, t as i32, d as i32);
    let cfg = LaunchConfig {
        grid_dim: (tiles as u32, 1, 1),
        block_dim: (shape.warps * LANES as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut scratch = LOOK_BACK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let (buf, ticket_base, epoch) = look_back(&mut scratch, dev, tiles, tiles * LANES * shape.vec)?;
    let mut args = func.builder();
    for v in &views {
        args.arg(v);
    }
    args.arg(&out)
        .arg(&bi)
        .arg(&ti)
        .arg(&di)
        .arg(buf)
        .arg(&ticket_base)
        .arg(&epoch);
    // SAFETY: the argument list matches the kernel's signature in scan.cu; the scratch
    // stays locked until the launch is queued, so launches take tickets in stream order.
    unsafe { args.launch(cfg) }.w()?;
    Ok(out)
}

/// The look-back scratch of one stream: the buffer, the launches' epoch and the tickets
/// handed out so far (the counter's value once every queued launch has run).
struct LookBack {
    buf: CudaSlice<u32>,
    epoch: u32,
    tickets: u32,
}

/// Per stream (keyed by its handle; the buffer keeps the stream alive, so a handle is
/// never reused while its entry exists).
static LOOK_BACK: LazyLock<Mutex<HashMap<usize, LookBack>>> = LazyLock::new(Default::default);

/// The scratch for a launch of `tiles` tiles with `words` look-back words on `dev`'s
/// stream, the tickets handed out before it and its epoch. A buffer too small is replaced
/// by a zeroed one (at least twice the size); epochs restart on a zeroed buffer.
fn look_back<'a>(
    cache: &'a mut HashMap<usize, LookBack>,
    dev: &CudaDevice,
    tiles: usize,
    words: usize,
) -> Result<(&'a CudaSlice<u32>, u32, u32)> {
    // The state word keeps the epoch in its upper 30 bits.
    const EPOCHS: u32 = 1 << 30;
    let len = 4 + 4 * words;
    let key = dev.cuda_stream().cu_stream() as usize;
    let old = cache.get(&key);
    if !old.is_some_and(|s| s.buf.len() >= len && s.epoch + 1 < EPOCHS) {
        let size = len.max(old.map_or(0, |s| 2 * s.buf.len()));
        let fresh = LookBack {
            buf: dev.alloc_zeros::<u32>(size)?,
            epoch: 0,
            tickets: 0,
        };
        cache.insert(key, fresh);
    }
    let Some(s) = cache.get_mut(&key) else {
        candle_core::bail!("scan: the look-back scratch was not kept")
    };
    s.epoch += 1;
    let ticket_base = s.tickets;
    s.tickets = s.tickets.wrapping_add(tiles as u32);
    Ok((&s.buf, ticket_base, s.epoch))
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
        sys::cuMemPoolSetAttribute(default_pool(dev)?, attr, (&mut threshold as *mut u64).cast())
            .result()
            .w()?;
    }
    Ok(())
}

/// After an out-of-memory error: wait for the GPU, clear the error cudarc may have recorded
/// on the context (it would come back from the next allocation), and hand the pool's free
/// memory back to the driver, so that a retry with a smaller micro-batch starts from an
/// empty pool rather than from blocks cut to the failed attempt's sizes. Returns the
/// memory state afterwards, for the report.
pub fn release_cached_memory(dev: &CudaDevice) -> Result<String> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = dev.cuda_stream();
    // The failed allocation's error may also sit recorded on the context (cudarc records
    // errors met while dropping buffers), where every later call would return it.
    let _recorded = stream.context().check_err();
    stream.synchronize().w()?;
    let _recorded = stream.context().check_err();
    // SAFETY: a plain driver call on the device's default pool, nothing in flight.
    unsafe { sys::cuMemPoolTrimTo(default_pool(dev)?, 0).result().w()? };
    // A small allocation and free through the same path as the model's: anything still
    // recorded surfaces here rather than in the retry.
    drop(dev.alloc_zeros::<u8>(256)?);
    stream.synchronize().w()?;
    let _recorded = stream.context().check_err();
    memory_state(dev)
}

/// Free and total device memory, and the pool's reserved and used bytes, in GiB.
pub fn memory_state(dev: &CudaDevice) -> Result<String> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
    let (free, total) = dev.cuda_stream().context().mem_get_info().w()?;
    let reserved = pool_attribute(dev, A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, None)?;
    let used = pool_attribute(dev, A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT, None)?;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Ok(format!(
        "GPU {:.1} of {:.1} GiB free, pool {:.1} GiB reserved and {:.1} GiB in use",
        gib(free as u64),
        gib(total as u64),
        gib(reserved),
        gib(used)
    ))
}

/// The most device memory the default pool has had in use since the last
/// [`reset_peak_memory`] (candle allocates through it, stream-ordered).
pub fn peak_memory(dev: &CudaDevice) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
    pool_attribute(dev, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, None)
}

pub fn reset_peak_memory(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
    pool_attribute(dev, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0)).map(|_| ())
}

fn pool_attribute(
    dev: &CudaDevice,
    attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
    set: Option<u64>,
) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    // SAFETY: plain driver calls on the device's default pool.
    unsafe {
        let pool = default_pool(dev)?;
        let mut value = set.unwrap_or(0);
        let ptr = (&mut value as *mut u64).cast();
        match set {
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
pub fn cross_entropy(
    backward: bool,
    logits: (&CudaStorage, &Layout),
    targets: (&CudaStorage, &Layout),
    rows: (&CudaStorage, &Layout),
    (n, v): (usize, usize),
) -> Result<CudaStorage> {
    let dev = logits.0.device().clone();
    match logits.0.dtype() {
        DType::F32 => cross_entropy_typed::<f32>(backward, logits, targets, rows, (n, v), &dev),
        DType::BF16 => cross_entropy_typed::<half::bf16>(backward, logits, targets, rows, (n, v), &dev),
        other => candle_core::bail!("cross-entropy: {other:?} logits are not supported on CUDA (f32 or bf16)"),
    }
}

fn contiguous_view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((lo, hi)) => Ok(s.as_cuda_slice::<T>()?.slice(lo..hi)),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

fn cross_entropy_typed<T: CudaDType + DeviceRepr + WithDType>(
    backward: bool,
    logits: (&CudaStorage, &Layout),
    targets: (&CudaStorage, &Layout),
    rows: (&CudaStorage, &Layout),
    (n, v): (usize, usize),
    dev: &CudaDevice,
) -> Result<CudaStorage> {
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

type RowInputs<'a, 'b, T> = (
    &'b CudaView<'a, T>,
    &'b CudaView<'a, u32>,
    &'b CudaView<'a, f32>,
    (usize, usize),
);

/// Kernel `name` of loss.cu, one block per row: (logits, targets, per-row f32, out, V),
/// `len` output elements.
fn launch_rows<T: DeviceRepr, O: CudaDType + DeviceRepr>(
    name: &str,
    (x, t, r, (n, v)): RowInputs<T>,
    len: usize,
    dev: &CudaDevice,
) -> Result<CudaStorage> {
    let func = dev.get_or_load_custom_func(name, "mmrec_loss", LOSS_PTX)?;
    // SAFETY: each block writes every output element of its row.
    let out = unsafe { dev.alloc::<O>(len)? };
    if n > 0 {
        let vi = v as i32;
        let mut args = func.builder();
        args.arg(x).arg(t).arg(r).arg(&out).arg(&vi);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (LOSS_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches mmrec_ce_fwd / mmrec_ce_bwd in loss.cu.
        unsafe { args.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

const FUSED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
/// Must match NORM_THREADS and NORM_MAX_WIDTH in fused.cu.
const NORM_THREADS: u32 = 256;
pub const NORM_MAX_WIDTH: usize = 2048;

/// The RMSNorm kernel for rows of width `d`: one warp per row, `PER_LANE` columns per lane
/// (the smallest instantiated power of two with 32 · PER_LANE ≥ d).
fn norm_kernel(direction: &str, d: usize, dtype: DType) -> String {
    let per_lane = d.div_ceil(32).next_power_of_two().max(2);
    format!("mmrec_rmsnorm_{direction}_{per_lane}_{}", suffix(dtype))
}

/// Run `$body` with `$t` the Rust type of `$dtype` (f32 or bf16).
macro_rules! with_float {
    ($dtype:expr, $what:expr, |$t:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => candle_core::bail!("{}: {other:?} is not supported on CUDA (f32 or bf16)", $what),
        }
    };
}

fn suffix(dtype: DType) -> &'static str {
    if dtype == DType::BF16 {
        "bf16"
    } else {
        "f32"
    }
}

/// Enough blocks to fill an H100/H200 several times over, fewer when there is less work.
fn blocks(work: usize, per_block: usize) -> u32 {
    work.div_ceil(per_block).clamp(1, 132 * 8) as u32
}

/// RMSNorm forward over rows of x [N, D] with weight w [D].
pub fn rms_norm(x: (&CudaStorage, &Layout), w: (&CudaStorage, &Layout), (n, d): (usize, usize)) -> Result<CudaStorage> {
    let dev = x.0.device().clone();
    with_float!(x.0.dtype(), "rmsnorm", |T| {
        let (xv, wv) = (
            contiguous_view::<T>(x.0, x.1, "rmsnorm: x")?,
            contiguous_view::<T>(w.0, w.1, "rmsnorm: weight")?,
        );
        // SAFETY: every row is written by the block that takes it.
        let y = unsafe { dev.alloc::<T>(n * d)? };
        let func = dev.get_or_load_custom_func(&norm_kernel("fwd", d, T::DTYPE), "mmrec_fused", FUSED_PTX)?;
        let (ni, di) = (n as i32, d as i32);
        let mut args = func.builder();
        args.arg(&xv).arg(&wv).arg(&y).arg(&ni).arg(&di);
        launch_norm(args, n)?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    })
}

/// RMSNorm backward: dx [N, D] in x's dtype, or (`weight`) dw [D] in f32.
pub fn rms_norm_grad(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    (n, d): (usize, usize),
    weight: bool,
) -> Result<CudaStorage> {
    let dev = x.0.device().clone();
    with_float!(x.0.dtype(), "rmsnorm backward", |T| {
        let (xv, wv, dyv) = (
            contiguous_view::<T>(x.0, x.1, "rmsnorm: x")?,
            contiguous_view::<T>(w.0, w.1, "rmsnorm: weight")?,
            contiguous_view::<T>(dy.0, dy.1, "rmsnorm: dy")?,
        );
        let func = dev.get_or_load_custom_func(&norm_kernel("bwd", d, T::DTYPE), "mmrec_fused", FUSED_PTX)?;
        let (ni, di, null) = (n as i32, d as i32, 0usize);
        let mut args = func.builder();
        args.arg(&xv).arg(&wv).arg(&dyv);
        if weight {
            let dw = dev.alloc_zeros::<f32>(d)?;
            args.arg(&null).arg(&dw).arg(&ni).arg(&di);
            launch_norm(args, n)?;
            Ok(CudaStorage::wrap_cuda_slice(dw, dev))
        } else {
            // SAFETY: every row is written by the block that takes it.
            let dx = unsafe { dev.alloc::<T>(n * d)? };
            args.arg(&dx).arg(&null).arg(&ni).arg(&di);
            launch_norm(args, n)?;
            Ok(CudaStorage::wrap_cuda_slice(dx, dev))
        }
    })
}

fn launch_norm(mut args: candle_core::cuda_backend::cudarc::driver::LaunchArgs, rows: usize) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    // A warp per row; enough blocks to fill the GPU, few enough that the backward's
    // per-block atomics into dw stay cheap.
    let cfg = LaunchConfig {
        grid_dim: (blocks(rows, (NORM_THREADS / 32) as usize).min(132 * 8), 1, 1),
        block_dim: (NORM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the caller pushed the arguments of an rmsnorm kernel in fused.cu.
    unsafe { args.launch(cfg) }.w().map(|_| ())
}

/// The MDI gate: (a, b [N, D], projection p [N, 4D]) → [γ; u], 2·N·D f32. With `grad`
/// ([dγ; du], f32) the backward instead: [da | db | 0 | 0 | dz | dg] per row, N·6D in
/// a's dtype.
pub fn gate(
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    p: (&CudaStorage, &Layout),
    grad: Option<(&CudaStorage, &Layout)>,
    (n, d): (usize, usize),
) -> Result<CudaStorage> {
    let dev = a.0.device().clone();
    with_float!(a.0.dtype(), "gate", |T| {
        let (av, bv, pv) = (
            contiguous_view::<T>(a.0, a.1, "gate: a")?,
            contiguous_view::<T>(b.0, b.1, "gate: b")?,
            contiguous_view::<T>(p.0, p.1, "gate: projection")?,
        );
        let (ni, di) = (n as i32, d as i32);
        // One row per block at a time (gate_forward in fused.cu).
        let cfg = LaunchConfig {
            grid_dim: (blocks(n, 1), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let kind = if grad.is_some() { "bwd" } else { "fwd" };
        let func = dev.get_or_load_custom_func(
            &format!("mmrec_gate_{kind}_{}", suffix(T::DTYPE)),
            "mmrec_fused",
            FUSED_PTX,
        )?;
        let mut args = func.builder();
        args.arg(&av).arg(&bv).arg(&pv);
        match grad {
            None => {
                // SAFETY: the grid-stride loop writes every element.
                let out = unsafe { dev.alloc::<f32>(2 * n * d)? };
                args.arg(&out).arg(&ni).arg(&di);
                if n * d > 0 {
                    // SAFETY: the argument list matches mmrec_gate_fwd in fused.cu.
                    unsafe { args.launch(cfg) }.w()?;
                }
                Ok(CudaStorage::wrap_cuda_slice(out, dev))
            }
            Some(g) => {
                let gv = contiguous_view::<f32>(g.0, g.1, "gate: gradient")?;
                // SAFETY: the grid-stride loop writes all six blocks of every row.
                let out = unsafe { dev.alloc::<T>(6 * n * d)? };
                args.arg(&gv).arg(&out).arg(&ni).arg(&di);
                if n * d > 0 {
                    // SAFETY: the argument list matches mmrec_gate_bwd in fused.cu.
                    unsafe { args.launch(cfg) }.w()?;
                }
                Ok(CudaStorage::wrap_cuda_slice(out, dev))
            }
        }
    })
}

/// AdamW's moment update in place on `moments` [2, n] f32 from the gradient [n] f32.
pub fn adamw_moments(
    moments: (&mut CudaStorage, &Layout),
    grad: (&CudaStorage, &Layout),
    ctl: (&CudaStorage, &Layout),
    (b1, b2): (f32, f32),
) -> Result<()> {
    let dev = moments.0.device().clone();
    let n = moments.1.shape().elem_count() / 2;
    let gv = contiguous_view::<f32>(grad.0, grad.1, "adamw: gradient")?;
    let cv = contiguous_view::<f32>(ctl.0, ctl.1, "adamw: control")?;
    let Some((lo, hi)) = moments.1.contiguous_offsets() else {
        candle_core::bail!("adamw: moments must be contiguous")
    };
    let mut mv = moments.0.as_cuda_slice_mut::<f32>()?.slice_mut(lo..hi);
    let func = dev.get_or_load_custom_func("mmrec_adamw_moments", "mmrec_fused", FUSED_PTX)?;
    let n64 = n as u64;
    let mut args = func.builder();
    args.arg(&mut mv).arg(&gv).arg(&cv).arg(&n64).arg(&b1).arg(&b2);
    launch_elementwise(args, n)
}

/// `acc[0] += Σ g²` in place, g f32.
pub fn add_squares(acc: (&mut CudaStorage, &Layout), grad: (&CudaStorage, &Layout)) -> Result<()> {
    let dev = acc.0.device().clone();
    let n = grad.1.shape().elem_count();
    let gv = contiguous_view::<f32>(grad.0, grad.1, "add_squares: gradient")?;
    let Some((lo, hi)) = acc.1.contiguous_offsets() else {
        candle_core::bail!("add_squares: the accumulator must be contiguous")
    };
    let mut av = acc.0.as_cuda_slice_mut::<f32>()?.slice_mut(lo..hi);
    let func = dev.get_or_load_custom_func("mmrec_add_squares", "mmrec_fused", FUSED_PTX)?;
    let n64 = n as u64;
    let mut args = func.builder();
    args.arg(&gv).arg(&mut av).arg(&n64);
    launch_elementwise(args, n)
}

/// The step's control values [3] (adamw.rs `control`) from Σ g² [1] and the loss [1].
pub fn adamw_control(
    squares: (&CudaStorage, &Layout),
    loss: (&CudaStorage, &Layout),
    (accum, clip): (f32, f32),
) -> Result<CudaStorage> {
    let dev = squares.0.device().clone();
    let sv = contiguous_view::<f32>(squares.0, squares.1, "adamw control: sums of squares")?;
    let lv = contiguous_view::<f32>(loss.0, loss.1, "adamw control: loss")?;
    // SAFETY: the kernel writes all three elements.
    let mut out = unsafe { dev.alloc::<f32>(3) }?;
    let func = dev.get_or_load_custom_func("mmrec_adamw_control", "mmrec_fused", FUSED_PTX)?;
    let mut args = func.builder();
    args.arg(&sv).arg(&lv).arg(&mut out).arg(&accum).arg(&clip);
    let one = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: one thread reads one element of each input and writes `out`.
    unsafe { args.launch(one) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// AdamW's parameter update in place on `theta` [n] f32 from `moments` [2, n].
pub fn adamw_apply(
    theta: (&mut CudaStorage, &Layout),
    moments: (&CudaStorage, &Layout),
    ctl: (&CudaStorage, &Layout),
    (lr, decay, c1, c2, eps): (f32, f32, f32, f32, f32),
) -> Result<()> {
    let dev = theta.0.device().clone();
    let n = theta.1.shape().elem_count();
    let mv = contiguous_view::<f32>(moments.0, moments.1, "adamw: moments")?;
    let cv = contiguous_view::<f32>(ctl.0, ctl.1, "adamw: control")?;
    let Some((lo, hi)) = theta.1.contiguous_offsets() else {
        candle_core::bail!("adamw: parameters must be contiguous")
    };
    let mut th = theta.0.as_cuda_slice_mut::<f32>()?.slice_mut(lo..hi);
    let func = dev.get_or_load_custom_func("mmrec_adamw_apply", "mmrec_fused", FUSED_PTX)?;
    let n64 = n as u64;
    let mut args = func.builder();
    args.arg(&mut th)
        .arg(&mv)
        .arg(&cv)
        .arg(&n64)
        .arg(&lr)
        .arg(&decay)
        .arg(&c1)
        .arg(&c2)
        .arg(&eps);
    launch_elementwise(args, n)
}

fn launch_elementwise(mut args: candle_core::cuda_backend::cudarc::driver::LaunchArgs, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (blocks(n, 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the caller pushed the arguments of a grid-stride kernel in fused.cu.
    unsafe { args.launch(cfg) }.w().map(|_| ())
}

/// GELU (erf) of x, or with `dy` the gradient dy ⊙ GELU'(x); in x's dtype.
pub fn gelu(x: (&CudaStorage, &Layout), dy: Option<(&CudaStorage, &Layout)>) -> Result<CudaStorage> {
    let dev = x.0.device().clone();
    let n = x.1.shape().elem_count();
    with_float!(x.0.dtype(), "gelu", |T| {
        let xv = contiguous_view::<T>(x.0, x.1, "gelu: x")?;
        let dyv = dy.map(|(s, l)| contiguous_view::<T>(s, l, "gelu: dy")).transpose()?;
        // SAFETY: the grid-stride loop writes every element.
        let out = unsafe { dev.alloc::<T>(n)? };
        let func =
            dev.get_or_load_custom_func(&format!("mmrec_gelu_{}", suffix(T::DTYPE)), "mmrec_fused", FUSED_PTX)?;
        let (n64, null) = (n as u64, 0usize);
        let mut args = func.builder();
        args.arg(&xv);
        match &dyv {
            Some(v) => args.arg(v),
            None => args.arg(&null),
        };
        args.arg(&out).arg(&n64);
        launch_elementwise(args, n)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    })
}

/// Softmax over the last dimension of x (rows of E), or with `dy` its backward from
/// the forward's output y (passed as `x`): dx = y ⊙ (dy − Σ y ⊙ dy); in x's dtype.
pub fn softmax(x: (&CudaStorage, &Layout), dy: Option<(&CudaStorage, &Layout)>) -> Result<CudaStorage> {
    let dev = x.0.device().clone();
    let e = x.1.dims().last().copied().unwrap_or(1).max(1);
    let n = x.1.shape().elem_count() / e;
    with_float!(x.0.dtype(), "softmax", |T| {
        let xv = contiguous_view::<T>(x.0, x.1, "softmax: x")?;
        let dyv = dy.map(|(s, l)| contiguous_view::<T>(s, l, "softmax: dy")).transpose()?;
        // SAFETY: the warp that takes a row writes all of it.
        let out = unsafe { dev.alloc::<T>(n * e)? };
        let func =
            dev.get_or_load_custom_func(&format!("mmrec_softmax_{}", suffix(T::DTYPE)), "mmrec_fused", FUSED_PTX)?;
        let (ni, ei, null) = (n as i32, e as i32, 0usize);
        let mut args = func.builder();
        args.arg(&xv);
        match &dyv {
            Some(v) => args.arg(v),
            None => args.arg(&null),
        };
        args.arg(&out).arg(&ni).arg(&ei);
        if n > 0 {
            // Eight warps (rows) per block.
            let cfg = LaunchConfig {
                grid_dim: (blocks(n, 8), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match mmrec_softmax_* in fused.cu.
            unsafe { args.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    })
}

/// y [N, D] + b [D] broadcast over rows, in y's dtype.
pub fn bias_add(y: (&CudaStorage, &Layout), b: (&CudaStorage, &Layout), d: usize) -> Result<CudaStorage> {
    let dev = y.0.device().clone();
    let n = y.1.shape().elem_count();
    with_float!(y.0.dtype(), "bias add", |T| {
        let (yv, bv) = (
            contiguous_view::<T>(y.0, y.1, "bias add: y")?,
            contiguous_view::<T>(b.0, b.1, "bias add: b")?,
        );
        // SAFETY: the grid-stride loop writes every element.
        let out = unsafe { dev.alloc::<T>(n)? };
        let func = dev.get_or_load_custom_func(
            &format!("mmrec_bias_add_{}", suffix(T::DTYPE)),
            "mmrec_fused",
            FUSED_PTX,
        )?;
        let (n64, d32) = (n as u64, d as u32);
        let mut args = func.builder();
        args.arg(&yv).arg(&bv).arg(&out).arg(&n64).arg(&d32);
        launch_elementwise(args, n)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    })
}

/// The embedding's backward: dtable [V, D] f32 from ids [N] (u32) and dy [N, D].
pub fn embedding_grad(
    ids: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    (n, d, v): (usize, usize, usize),
) -> Result<CudaStorage> {
    let dev = dy.0.device().clone();
    with_float!(dy.0.dtype(), "embedding backward", |T| {
        let idv = contiguous_view::<u32>(ids.0, ids.1, "embedding: ids")?;
        let dyv = contiguous_view::<T>(dy.0, dy.1, "embedding: dy")?;
        let out = dev.alloc_zeros::<f32>(v * d)?;
        if n > 0 && d > 0 {
            let func = dev.get_or_load_custom_func(
                &format!("mmrec_embedding_bwd_{}", suffix(T::DTYPE)),
                "mmrec_fused",
                FUSED_PTX,
            )?;
            let (ni, di, vi) = (n as i32, d as i32, v as i32);
            let mut args = func.builder();
            args.arg(&idv).arg(&dyv).arg(&out).arg(&ni).arg(&di).arg(&vi);
            let cfg = LaunchConfig {
                grid_dim: (blocks(n, 1), 1, 1),
                block_dim: (d.next_power_of_two().clamp(32, 256) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the argument list matches mmrec_embedding_bwd in fused.cu.
            unsafe { args.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    })
}
