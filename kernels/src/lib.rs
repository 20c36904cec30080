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

pub mod cpu;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, IndexOp, Layout, Shape, Tensor};

pub use cpu::Direction;

/// `h = scan(γ, u, h0)` over [B, T, D] with h0 [B, D]; returns all states and the final
/// one (the state to carry into the next segment).
pub fn scan(gamma: &Tensor, u: &Tensor, h0: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let (_, t, _) = gamma.dims3()?;
    if u.dims() != gamma.dims() {
        candle_core::bail!("scan: u {:?} and γ {:?} must have the same shape", u.dims(), gamma.dims());
    }
    let h = gamma.contiguous()?.apply_op3(&u.contiguous()?, &h0.contiguous()?, Scan)?;
    let last = if t == 0 { h0.clone() } else { h.i((.., t - 1, ..))? };
    Ok((h, last))
}

/// The forward scan; its backward is the reverse scan [`ScanAdjoint`].
#[derive(Clone, Copy, Debug)]
pub struct Scan;

/// `g_t = dy_t + γ_{t+1} ⊙ g_{t+1}`, run from the end: the adjoint of [`Scan`].
#[derive(Clone, Copy, Debug)]
pub struct ScanAdjoint;

fn contiguous<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("scan: {what} must be contiguous"),
    }
}

fn run_cpu(gamma: (&CpuStorage, &Layout), u: (&CpuStorage, &Layout), init: Option<(&CpuStorage, &Layout)>, dir: Direction) -> candle_core::Result<(CpuStorage, Shape)> {
    let (b, t, d) = gamma.1.shape().dims3()?;
    if u.1.shape() != gamma.1.shape() {
        candle_core::bail!("scan: shapes {:?} and {:?} differ", u.1.shape(), gamma.1.shape());
    }
    if let Some((_, l)) = init {
        if l.shape().dims() != [b, d] {
            candle_core::bail!("scan: h0 is {:?}, expected [{b}, {d}]", l.shape());
        }
    }
    macro_rules! go {
        ($t:ty, $variant:ident) => {{
            let g = contiguous::<$t>(gamma.0, gamma.1, "γ")?;
            let x = contiguous::<$t>(u.0, u.1, "u")?;
            let zeros;
            let h0 = match init {
                Some((s, l)) => contiguous::<$t>(s, l, "h0")?,
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
        (a, b) => candle_core::bail!("scan: unsupported dtypes {:?} / {:?} on CPU (f32 or f64)", a.dtype(), b.dtype()),
    };
    Ok((out, Shape::from((b, t, d))))
}

impl CustomOp3 for Scan {
    fn name(&self) -> &'static str {
        "mmrec-scan"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        run_cpu((s1, l1), (s2, l2), Some((s3, l3)), Direction::Forward)
    }

    fn bwd(&self, gamma: &Tensor, _u: &Tensor, h0: &Tensor, h: &Tensor, dh: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, t, _) = gamma.dims3()?;
        let g = dh.contiguous()?.apply_op2_no_bwd(gamma, &ScanAdjoint)?;
        let h_prev = Tensor::cat(&[&h0.unsqueeze(1)?, &h.narrow(1, 0, t - 1)?], 1)?;
        let dgamma = (&g * h_prev)?;
        let dh0 = (gamma.i((.., 0, ..))? * g.i((.., 0, ..))?)?;
        Ok((Some(dgamma), Some(g), Some(dh0)))
    }
}

impl CustomOp2 for ScanAdjoint {
    fn name(&self) -> &'static str {
        "mmrec-scan-adjoint"
    }

    /// Inputs (dy, γ): the reverse scan of the upstream gradient.
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        run_cpu((s2, l2), (s1, l1), None, Direction::Backward)
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
