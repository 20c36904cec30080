//! AdamW's update as two in-place ops per parameter tensor (f32 weights and moments): one
//! kernel each on the GPU, where the composed update was fifteen allocating ops per tensor
//! (about 4 000 launches a step for the `medium` preset). The gradient scale (accumulation
//! and clipping) and the decision to skip a step with a non-finite loss or gradient live in
//! a small control tensor on the device ([`control`]), so a step never waits for the GPU.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let dev = Device::Cpu;
//! let theta = Tensor::new(&[1f32, -1.0], &dev)?;
//! let moments = Tensor::zeros((2, 2), candle_core::DType::F32, &dev)?;
//! let grad = Tensor::new(&[0.5f32, -0.5], &dev)?;
//! let squares = Tensor::zeros(1, candle_core::DType::F32, &dev)?;
//! mmrec_kernels::adamw::add_squares(&squares, &grad)?;
//! let ctl = mmrec_kernels::adamw::control(&squares, &Tensor::new(&[2.5f32], &dev)?, 1.0, 0.0)?;
//! mmrec_kernels::adamw::moments(&moments, &grad, &ctl, 0.9, 0.999)?;
//! mmrec_kernels::adamw::apply(&theta, &moments, &ctl, 0.1, 1.0, (0.1, 0.001), 1e-8)?;
//! // The first step moves each weight by lr against its gradient's sign.
//! let t = theta.to_vec1::<f32>()?;
//! assert!((t[0] - 0.9).abs() < 1e-5 && (t[1] + 0.9).abs() < 1e-5);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{CpuStorage, CustomOp2, InplaceOp2, InplaceOp3, Layout, Shape, Tensor};

/// The control tensor's entries: the factor each gradient is multiplied by, 1 when the
/// step is skipped, and the global gradient norm (for the log).
pub const CONTROL_SCALE: usize = 0;
pub const CONTROL_SKIP: usize = 1;
pub const CONTROL_NORM: usize = 2;

/// A step's control values [3] f32 on the device, from the gradients' summed squares [1]
/// and the loss [1]: with `norm = sqrt(Σ g²) · accum` (accum = 1 / micro-batches), the
/// gradient scale `accum · min(1, clip / norm)` (no clipping when `clip` ≤ 0), the skip
/// flag (a non-finite loss or norm), and the norm.
pub fn control(sum_squares: &Tensor, loss: &Tensor, accum: f64, clip: f64) -> candle_core::Result<Tensor> {
    let loss = loss.flatten_all()?.to_dtype(candle_core::DType::F32)?.contiguous()?;
    if sum_squares.dims() != [1] || loss.dims() != [1] {
        candle_core::bail!(
            "adamw control: sums of squares {:?} and loss {:?} must both have one element",
            sum_squares.dims(),
            loss.dims()
        );
    }
    sum_squares.contiguous()?.apply_op2_no_bwd(
        &loss,
        &Control {
            accum: accum as f32,
            clip: clip as f32,
        },
    )
}

/// `m ← β1 m + (1 − β1) s g`, `v ← β2 v + (1 − β2) (s g)²` in place on `moments` [2, n],
/// with s the control's scale; nothing when it says skip.
pub fn moments(moments: &Tensor, grad: &Tensor, ctl: &Tensor, beta1: f64, beta2: f64) -> candle_core::Result<()> {
    let grad = grad.flatten_all()?.contiguous()?;
    if moments.dims() != [2, grad.elem_count()] {
        candle_core::bail!(
            "adamw: moments {:?} do not match a gradient of {} elements",
            moments.dims(),
            grad.elem_count()
        );
    }
    moments.inplace_op3(
        &grad,
        ctl,
        &Moments {
            beta1: beta1 as f32,
            beta2: beta2 as f32,
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
/// `(c1, c2)`; nothing when the control says skip.
pub fn apply(
    theta: &Tensor,
    moments: &Tensor,
    ctl: &Tensor,
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
    theta.inplace_op3(
        moments,
        ctl,
        &Apply {
            lr: lr as f32,
            decay: decay as f32,
            c1: c1 as f32,
            c2: c2 as f32,
            eps: eps as f32,
        },
    )
}

struct Control {
    accum: f32,
    clip: f32,
}

/// The control values from Σ g² and the loss, shared by the CPU path and the CUDA kernel's
/// reference: [scale, skip, norm].
fn control_values(sum_squares: f32, loss: f32, accum: f32, clip: f32) -> [f32; 3] {
    let norm = sum_squares.sqrt() * accum;
    let finite = loss.is_finite() && norm.is_finite();
    let clipped = if clip > 0.0 && norm > clip { clip / norm } else { 1.0 };
    [accum * clipped, if finite { 0.0 } else { 1.0 }, norm]
}

impl CustomOp2 for Control {
    fn name(&self) -> &'static str {
        "mmrec-adamw-control"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (squares, loss) = (
            f32_ref(s1, l1, "the sums of squares")?[0],
            f32_ref(s2, l2, "the loss")?[0],
        );
        let values = control_values(squares, loss, self.accum, self.clip);
        Ok((CpuStorage::F32(values.to_vec()), Shape::from(3)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            crate::cuda::adamw_control((s1, l1), (s2, l2), (self.accum, self.clip))?,
            Shape::from(3),
        ))
    }
}

/// A control tensor's (scale, skip) on the CPU.
fn control_of(s: &CpuStorage, l: &Layout) -> candle_core::Result<(f32, bool)> {
    let c = f32_ref(s, l, "the control")?;
    if c.len() != 3 {
        candle_core::bail!("adamw: the control must have 3 elements, not {}", c.len());
    }
    Ok((c[CONTROL_SCALE], c[CONTROL_SKIP] != 0.0))
}

struct Moments {
    beta1: f32,
    beta2: f32,
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

impl InplaceOp3 for Moments {
    fn name(&self) -> &'static str {
        "mmrec-adamw-moments"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (scale, skip) = control_of(s3, l3)?;
        if skip {
            return Ok(());
        }
        let g = f32_ref(s2, l2, "the gradient")?;
        let (m, v) = f32_mut(s1, l1, "the moments")?.split_at_mut(g.len());
        for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
            let g = g * scale;
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
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        crate::cuda::adamw_moments((s1, l1), (s2, l2), (s3, l3), (self.beta1, self.beta2))
    }
}

impl InplaceOp3 for Apply {
    fn name(&self) -> &'static str {
        "mmrec-adamw-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        if control_of(s3, l3)?.1 {
            return Ok(());
        }
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
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        crate::cuda::adamw_apply(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            (self.lr, self.decay, self.c1, self.c2, self.eps),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_clips_and_flags_non_finite_steps() {
        // norm = sqrt(16) / 2 = 2 > clip 1: scale = ½ · ½.
        assert_eq!(control_values(16.0, 3.0, 0.5, 1.0), [0.25, 0.0, 2.0]);
        assert_eq!(control_values(16.0, 3.0, 0.5, 0.0), [0.5, 0.0, 2.0]);
        assert_eq!(control_values(16.0, f32::NAN, 0.5, 1.0)[1], 1.0);
        assert_eq!(control_values(f32::INFINITY, 3.0, 0.5, 1.0)[1], 1.0);
    }

    #[test]
    fn a_skipped_step_leaves_weights_and_moments_alone() {
        let dev = candle_core::Device::Cpu;
        let theta = Tensor::new(&[1f32, -1.0], &dev).unwrap();
        let mv = Tensor::ones((2, 2), candle_core::DType::F32, &dev).unwrap();
        let grad = Tensor::new(&[f32::NAN, 1.0], &dev).unwrap();
        let squares = Tensor::zeros(1, candle_core::DType::F32, &dev).unwrap();
        add_squares(&squares, &grad).unwrap();
        let ctl = control(&squares, &Tensor::new(&[1f32], &dev).unwrap(), 1.0, 1.0).unwrap();
        moments(&mv, &grad, &ctl, 0.9, 0.999).unwrap();
        apply(&theta, &mv, &ctl, 0.1, 0.5, (0.1, 0.001), 1e-8).unwrap();
        assert_eq!(theta.to_vec1::<f32>().unwrap(), [1.0, -1.0]);
        assert_eq!(mv.to_vec2::<f32>().unwrap(), [[1.0, 1.0], [1.0, 1.0]]);
    }
}
