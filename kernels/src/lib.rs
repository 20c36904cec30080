//! The MM-Rec scan `h_t = γ_t ⊙ h_{t-1} + u_t` (DESIGN.md §3) as a candle custom op with
//! its own backward.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let dev = Device::Cpu;
//! let gamma = Tensor::full(0.5f32, (1, 3, 2), &dev)?;
//! let u = Tensor::ones((1, 3, 2), candle_core::DType::F32, &dev)?;
//! let h0 = Tensor::zeros((1, 2), candle_core::DType::F32, &dev)?;
//! let (h, last) = mmrec_kernels::scan(&gamma, &u, &h0)?;
//! assert_eq!(h.to_vec3::<f32>()?[0], [[1.0, 1.0], [1.5, 1.5], [1.75, 1.75]]);
//! assert_eq!(last.to_vec2::<f32>()?[0], [1.75, 1.75]);
//! # Ok::<(), candle_core::Error>(())
//! ```

pub mod adamw;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fused;
pub mod loss;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, IndexOp, Layout, Shape, Tensor};
use rayon::prelude::*;

pub use cpu::Direction;

/// `h = scan(γ, u, h0)` over [B, T, D] with h0 [B, D]; returns all states and the final
/// one (the state to carry into the next segment). f32 and bf16 on CUDA (f32 arithmetic),
/// f32 and f64 on the CPU, where 16-bit inputs are scanned in f32.
pub fn scan(gamma: &Tensor, u: &Tensor, h0: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let (_, t, _) = gamma.dims3()?;
    if u.dims() != gamma.dims() {
        candle_core::bail!(
            "scan: u {:?} and γ {:?} must have the same shape",
            u.dims(),
            gamma.dims()
        );
    }
    let dtype = gamma.dtype();
    if gamma.device().is_cpu() && matches!(dtype, DType::BF16 | DType::F16) {
        let wide = |x: &Tensor| x.to_dtype(DType::F32);
        let (h, last) = scan(&wide(gamma)?, &wide(u)?, &wide(h0)?)?;
        return Ok((h.to_dtype(dtype)?, last.to_dtype(dtype)?));
    }
    let h = gamma
        .contiguous()?
        .apply_op3(&u.contiguous()?, &h0.contiguous()?, Scan)?;
    let last = if t == 0 { h0.clone() } else { h.i((.., t - 1, ..))? };
    Ok((h, last))
}

/// The forward scan; its backward is the reverse scan [`ScanAdjoint`].
#[derive(Clone, Copy, Debug)]
pub struct Scan;

/// `g_t = dy_t + γ_{t+1} ⊙ g_{t+1}`, run from the end: the adjoint of [`Scan`].
#[derive(Clone, Copy, Debug)]
pub struct ScanAdjoint;

/// The whole backward of [`Scan`] in one pass over (dy, γ, h): ∂L/∂γ_t = g_t ⊙ h_{t-1} and
/// the adjoint g (which is ∂L/∂u), stacked as [2, B, T, D] in the order of the scan's
/// inputs. `h0` supplies h_{-1}.
#[derive(Clone, Debug)]
pub struct ScanBackward {
    pub h0: Tensor,
}

/// The elements of a contiguous CPU tensor, or an error naming `what` (every op here
/// makes its inputs contiguous first).
pub(crate) fn cpu_slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

fn run_cpu(
    gamma: (&CpuStorage, &Layout),
    u: (&CpuStorage, &Layout),
    init: Option<(&CpuStorage, &Layout)>,
    dir: Direction,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (b, t, d) = check_shapes(gamma.1, u.1, init.map(|(_, l)| l))?;
    macro_rules! go {
        ($t:ty, $variant:ident) => {{
            let g = cpu_slice::<$t>(gamma.0, gamma.1, "scan: γ")?;
            let x = cpu_slice::<$t>(u.0, u.1, "scan: u")?;
            let zeros;
            let h0 = match init {
                Some((s, l)) => cpu_slice::<$t>(s, l, "scan: h0")?,
                None => {
                    zeros = vec![0 as $t; b * d];
                    &zeros
                }
            };
            CpuStorage::$variant(cpu::scan(g, x, h0, (b, t, d), dir))
        }};
    }
    let out = match (gamma.0, u.0) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => go!(f32, F32),
        (CpuStorage::F64(_), CpuStorage::F64(_)) => go!(f64, F64),
        (a, b) => candle_core::bail!(
            "scan: unsupported dtypes {:?} / {:?} on CPU (f32 or f64)",
            a.dtype(),
            b.dtype()
        ),
    };
    Ok((out, Shape::from((b, t, d))))
}

impl CustomOp3 for Scan {
    fn name(&self) -> &'static str {
        "mmrec-scan"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        run_cpu((s1, l1), (s2, l2), Some((s3, l3)), Direction::Forward)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dims = check_shapes(l1, l2, Some(l3))?;
        Ok((
            cuda::launch(cuda::Kernel::Forward, &[(s1, l1), (s2, l2), (s3, l3)], dims)?,
            Shape::from(dims),
        ))
    }

    fn bwd(
        &self,
        gamma: &Tensor,
        _u: &Tensor,
        h0: &Tensor,
        h: &Tensor,
        dh: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let both = dh
            .contiguous()?
            .apply_op3_no_bwd(gamma, h, &ScanBackward { h0: h0.clone() })?;
        let (dgamma, g) = (both.i(0)?, both.i(1)?);
        let dh0 = (gamma.i((.., 0, ..))? * g.i((.., 0, ..))?)?;
        Ok((Some(dgamma), Some(g), Some(dh0)))
    }
}

/// [`scan`] over γ and u stacked as one [2, B, T, D] tensor, as the MDI gate produces them:
/// the backward then returns one stacked gradient, where two separate inputs each cost a
/// zero-padded full-size copy and an add in candle's autograd.
pub fn scan_stacked(gamma_u: &Tensor, h0: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let (two, _, t, _) = gamma_u.dims4()?;
    if two != 2 {
        candle_core::bail!("scan_stacked: expected [2, B, T, D], got {:?}", gamma_u.dims());
    }
    if gamma_u.device().is_cpu() && matches!(gamma_u.dtype(), DType::BF16 | DType::F16) {
        return scan(&gamma_u.i(0)?, &gamma_u.i(1)?, h0);
    }
    let h = gamma_u.contiguous()?.apply_op2(&h0.contiguous()?, StackedScan)?;
    let last = if t == 0 { h0.clone() } else { h.i((.., t - 1, ..))? };
    Ok((h, last))
}

/// [`Scan`] with γ and u as the two halves of one contiguous input.
#[derive(Clone, Copy, Debug)]
struct StackedScan;

/// The layouts of γ and u inside a contiguous stacked [2, B, T, D] input.
fn stacked_halves(l: &Layout) -> candle_core::Result<(Layout, Layout)> {
    let (_, b, t, d) = l.shape().dims4()?;
    let Some((start, _)) = l.contiguous_offsets() else {
        candle_core::bail!("scan_stacked: the input must be contiguous")
    };
    let half = |k: usize| Layout::contiguous_with_offset((b, t, d), start + k * b * t * d);
    Ok((half(0), half(1)))
}

impl CustomOp2 for StackedScan {
    fn name(&self) -> &'static str {
        "mmrec-scan-stacked"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (lg, lu) = stacked_halves(l1)?;
        run_cpu((s1, &lg), (s1, &lu), Some((s2, l2)), Direction::Forward)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (lg, lu) = stacked_halves(l1)?;
        let dims = check_shapes(&lg, &lu, Some(l2))?;
        Ok((
            cuda::launch(cuda::Kernel::Forward, &[(s1, &lg), (s1, &lu), (s2, l2)], dims)?,
            Shape::from(dims),
        ))
    }

    fn bwd(
        &self,
        gamma_u: &Tensor,
        h0: &Tensor,
        h: &Tensor,
        dh: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gamma = gamma_u.i(0)?;
        let both = dh
            .contiguous()?
            .apply_op3_no_bwd(&gamma, h, &ScanBackward { h0: h0.clone() })?;
        let dh0 = (gamma.i((.., 0, ..))? * both.i((1, .., 0, ..))?)?;
        Ok((Some(both), Some(dh0)))
    }
}

/// [B, T, D] from γ's layout, checking u (and h0 [B, D]) against it.
fn check_shapes(gamma: &Layout, u: &Layout, h0: Option<&Layout>) -> candle_core::Result<(usize, usize, usize)> {
    let (b, t, d) = gamma.shape().dims3()?;
    if u.shape() != gamma.shape() {
        candle_core::bail!("scan: shapes {:?} and {:?} differ", u.shape(), gamma.shape());
    }
    if let Some(l) = h0 {
        if l.shape().dims() != [b, d] {
            candle_core::bail!("scan: h0 is {:?}, expected [{b}, {d}]", l.shape());
        }
    }
    Ok((b, t, d))
}

impl CustomOp3 for ScanBackward {
    fn name(&self) -> &'static str {
        "mmrec-scan-backward"
    }

    /// Inputs (dy, γ, h).
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t, d) = check_shapes(l2, l1, None)?;
        let (g, _) = run_cpu((s2, l2), (s1, l1), None, Direction::Backward)?;
        let h0 = self.h0.contiguous()?.flatten_all()?;
        macro_rules! go {
            ($t:ty, $variant:ident) => {{
                let g = g.as_slice::<$t>()?;
                let h = cpu_slice::<$t>(s3, l3, "scan: h")?;
                let h0 = h0.to_vec1::<$t>()?;
                let mut out = vec![0 as $t; 2 * g.len()];
                let (dgamma, du) = out.split_at_mut(g.len());
                du.copy_from_slice(g);
                // dγ_t = g_t h_{t-1}, one D-row per task, h_{-1} from h0.
                dgamma.par_chunks_mut(d.max(1)).enumerate().for_each(|(r, row)| {
                    let (bi, at) = (r / t, r * d);
                    let prev = if r % t == 0 {
                        &h0[bi * d..(bi + 1) * d]
                    } else {
                        &h[at - d..at]
                    };
                    for ((o, &gv), &p) in row.iter_mut().zip(&g[at..at + d]).zip(prev) {
                        *o = gv * p;
                    }
                });
                CpuStorage::$variant(out)
            }};
        }
        let out = match g {
            CpuStorage::F32(_) => go!(f32, F32),
            CpuStorage::F64(_) => go!(f64, F64),
            other => candle_core::bail!("scan backward: unsupported dtype {:?} on CPU", other.dtype()),
        };
        Ok((out, Shape::from((2, b, t, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dims = check_shapes(l2, l1, None)?;
        let h0 = self.h0.contiguous()?;
        let (h0_storage, h0_layout) = h0.storage_and_layout();
        let candle_core::Storage::Cuda(h0_cuda) = &*h0_storage else {
            candle_core::bail!("scan backward: h0 is not on the GPU")
        };
        let out = cuda::launch(
            cuda::Kernel::Backward,
            &[(s1, l1), (s2, l2), (s3, l3), (h0_cuda, h0_layout)],
            dims,
        )?;
        Ok((out, Shape::from((2, dims.0, dims.1, dims.2))))
    }
}

impl CustomOp2 for ScanAdjoint {
    fn name(&self) -> &'static str {
        "mmrec-scan-adjoint"
    }

    /// Inputs (dy, γ): the reverse scan of the upstream gradient.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        run_cpu((s2, l2), (s1, l1), None, Direction::Backward)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dims = check_shapes(l2, l1, None)?;
        Ok((
            cuda::launch(cuda::Kernel::Adjoint, &[(s1, l1), (s2, l2)], dims)?,
            Shape::from(dims),
        ))
    }
}

/// The plain sequential scan in f64: the reference every kernel is tested against.
pub fn reference_scan(gamma: &[f64], u: &[f64], h0: &[f64], (b, t, d): (usize, usize, usize)) -> Vec<f64> {
    let mut out = vec![0.0; b * t * d];
    for bi in 0..b {
        for c in 0..d {
            let mut h = h0[bi * d + c];
            for s in 0..t {
                let i = (bi * t + s) * d + c;
                h = gamma[i] * h + u[i];
                out[i] = h;
            }
        }
    }
    out
}
