//! AdamW's update as two in-place ops per parameter tensor (f32 weights and moments): one
//! kernel each on the GPU, where the composed update was fifteen allocating ops per tensor
//! (about 4 000 launches a step for the `medium` preset).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let theta = Tensor::new(&[1f32, -1.0], &Device::Cpu)?;
//! let moments = Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu)?;
//! let grad = Tensor::new(&[0.5f32, -0.5], &Device::Cpu)?;
//! mmrec_kernels::adamw::moments(&moments, &grad, 0.9, 0.999, 1.0)?;
//! mmrec_kernels::adamw::apply(&theta, &moments, 0.1, 1.0, (0.1, 0.001), 1e-8)?;
//! // The first step moves each weight by lr against its gradient's sign.
//! let t = theta.to_vec1::<f32>()?;
//! assert!((t[0] - 0.9).abs() < 1e-5 && (t[1] + 0.9).abs() < 1e-5);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor};

/// `m ← β1 m + (1 − β1) s g`, `v ← β2 v + (1 − β2) (s g)²` in place on `moments` [2, n].
pub fn moments(moments: &Tensor, grad: &Tensor, beta1: f64, beta2: f64, scale: f64) -> candle_core::Result<()> {
    let grad = grad.flatten_all()?.contiguous()?;
    if moments.dims() != [2, grad.elem_count()] {
        candle_core::bail!(
            "adamw: moments {:?} do not match a gradient of {} elements",
            moments.dims(),
            grad.elem_count()
        );
    }
    moments.inplace_op2(
        &grad,
        &Moments {
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            scale: scale as f32,
        },
    )
}

/// `acc[0] += Σ grad²` in place (acc [1] f32): the global gradient norm's sum, one kernel
/// per tensor and a single read-back for all of them.
pub fn add_squares(acc: &Tensor, grad: &Tensor) -> candle_core::Result<()> {
    if acc.dims() != [1] {
        candle_core::bail!("add_squares: the accumulator must have shape [1], not {:?}", acc.dims());
    }
    let grad = grad.flatten_all()?.to_dtype(candle_core::DType::F32)?.contiguous()?;
    acc.inplace_op2(&grad, &AddSquares)
}

#[derive(Clone, Copy, Debug)]
struct AddSquares;

impl InplaceOp2 for AddSquares {
    fn name(&self) -> &'static str {
        "mmrec-add-squares"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let sum: f64 = f32_ref(s2, l2, "the gradient")?
            .iter()
            .map(|&g| g as f64 * g as f64)
            .sum();
        f32_mut(s1, l1, "the accumulator")?[0] += sum as f32;
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        crate::cuda::add_squares((s1, l1), (s2, l2))
    }
}

/// `θ ← θ · decay − lr · (m / c1) / (sqrt(v / c2) + ε)` in place, with the bias corrections
/// `(c1, c2)`.
pub fn apply(
    theta: &Tensor,
    moments: &Tensor,
    lr: f64,
    decay: f64,
    (c1, c2): (f64, f64),
    eps: f64,
) -> candle_core::Result<()> {
    if moments.dims() != [2, theta.elem_count()] {
        candle_core::bail!(
            "adamw: moments {:?} do not match a parameter of {} elements",
            moments.dims(),
            theta.elem_count()
        );
    }
    theta.inplace_op2(
        moments,
        &Apply {
            lr: lr as f32,
            decay: decay as f32,
            c1: c1 as f32,
            c2: c2 as f32,
            eps: eps as f32,
        },
    )
}

struct Moments {
    beta1: f32,
    beta2: f32,
    scale: f32,
}

struct Apply {
    lr: f32,
    decay: f32,
    c1: f32,
    c2: f32,
    eps: f32,
}

fn f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adamw: {what} must be contiguous f32"),
    }
}

fn f32_ref<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("adamw: {what} must be contiguous f32"),
    }
}

impl InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "mmrec-adamw-moments"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let g = f32_ref(s2, l2, "the gradient")?;
        let (m, v) = f32_mut(s1, l1, "the moments")?.split_at_mut(g.len());
        for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
            let g = g * self.scale;
            *m = self.beta1 * *m + (1.0 - self.beta1) * g;
            *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        crate::cuda::adamw_moments((s1, l1), (s2, l2), (self.beta1, self.beta2, self.scale))
    }
}

impl InplaceOp2 for Apply {
    fn name(&self) -> &'static str {
        "mmrec-adamw-apply"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let theta = f32_mut(s1, l1, "the parameter")?;
        let (m, v) = f32_ref(s2, l2, "the moments")?.split_at(theta.len());
        for ((t, &m), &v) in theta.iter_mut().zip(m).zip(v) {
            *t = *t * self.decay - self.lr * ((m / self.c1) / ((v / self.c2).sqrt() + self.eps));
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        crate::cuda::adamw_apply((s1, l1), (s2, l2), (self.lr, self.decay, self.c1, self.c2, self.eps))
    }
}
