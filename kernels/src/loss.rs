//! Softmax cross-entropy over the vocabulary as one op with its own backward: per row, the
//! log-sum-exp is computed in one pass and the log-softmax is never materialised (composed
//! candle ops wrote and re-read logits-sized tensors five times; on the GPU that was 10 ms
//! of a `medium` step for 0.26 ms of reading the logits once).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let logits = Tensor::new(&[[0f32, 0.0], [2.0, 0.0]], &Device::Cpu)?;
//! let targets = Tensor::new(&[1u32, 0], &Device::Cpu)?;
//! let mask = Tensor::new(&[1f32, 0.0], &Device::Cpu)?;
//! let nll = mmrec_kernels::loss::cross_entropy_rows(&logits, &targets, &mask)?;
//! assert_eq!(nll.to_vec1::<f32>()?, [std::f32::consts::LN_2, 0.0]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, IndexOp, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu_slice;

/// Per-row `mask_r · (logsumexp(logits_r) − logits_r[target_r])` for logits [N, V] (f32,
/// bf16 on the GPU; f32, f64 on the CPU), targets [N] (u32) and mask [N]: an [N] f32 tensor
/// (f64 for f64 logits). Rows whose mask is 0 give 0 whatever their target.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let mask = mask.to_dtype(row_dtype(logits.dtype()))?.contiguous()?;
    let out =
        logits
            .contiguous()?
            .apply_op3(&targets.to_dtype(DType::U32)?.contiguous()?, &mask, SoftmaxCrossEntropy)?;
    out.i((.., 0))
}

/// The dtype of the per-row values: f64 for f64 logits, f32 otherwise.
fn row_dtype(logits: DType) -> DType {
    if logits == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// (logits, targets, mask) → [N, 2]: each row's masked loss and its log-sum-exp (kept for
/// the backward).
#[derive(Clone, Copy, Debug)]
pub struct SoftmaxCrossEntropy;

/// (logits, targets, [N, 2] of (upstream gradient · mask, lse)) → dlogits.
#[derive(Clone, Copy, Debug)]
pub struct SoftmaxCrossEntropyBackward;

fn check(logits: &Layout, targets: &Layout, rows: &Layout, row_width: usize) -> candle_core::Result<(usize, usize)> {
    let (n, v) = logits.shape().dims2()?;
    if targets.shape().dims() != [n] || rows.shape().elem_count() != n * row_width {
        candle_core::bail!(
            "cross-entropy: logits {:?}, targets {:?} and per-row input {:?} disagree",
            logits.shape(),
            targets.shape(),
            rows.shape()
        );
    }
    Ok((n, v))
}

/// log Σ exp over a row, in f64.
fn lse<T: WithDType>(row: &[T]) -> f64 {
    let m = row.iter().map(|x| x.to_f64()).fold(f64::NEG_INFINITY, f64::max);
    m + row.iter().map(|x| (x.to_f64() - m).exp()).sum::<f64>().ln()
}

fn forward_cpu<T: WithDType, R: WithDType>(x: &[T], targets: &[u32], mask: &[R], v: usize) -> Vec<R> {
    x.par_chunks(v.max(1))
        .zip(targets.par_iter().zip(mask))
        .flat_map_iter(|(row, (&t, &mk))| {
            let l = lse(row);
            let nll = row.get(t as usize).map_or(f64::NAN, |xt| l - xt.to_f64());
            let mk = mk.to_f64();
            [R::from_f64(if mk == 0.0 { 0.0 } else { nll * mk }), R::from_f64(l)]
        })
        .collect()
}

fn backward_cpu<T: WithDType, R: WithDType>(x: &[T], targets: &[u32], coef_lse: &[R], v: usize) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); x.len()];
    out.par_chunks_mut(v.max(1))
        .zip(x.par_chunks(v.max(1)))
        .enumerate()
        .for_each(|(r, (dx, row))| {
            let (coef, l) = (coef_lse[2 * r].to_f64(), coef_lse[2 * r + 1].to_f64());
            for (j, (d, xj)) in dx.iter_mut().zip(row).enumerate() {
                let onehot = if j == targets[r] as usize { 1.0 } else { 0.0 };
                *d = T::from_f64(if coef == 0.0 {
                    0.0
                } else {
                    coef * ((xj.to_f64() - l).exp() - onehot)
                });
            }
        });
    out
}

/// Run `$body` with `$t` the logits' element type and `$r` the per-row type.
macro_rules! with_types {
    ($logits:expr, $rows:expr, |$t:ident, $r:ident| $body:expr) => {
        match ($logits, $rows) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                type $t = f32;
                type $r = f32;
                $body
            }
            (CpuStorage::BF16(_), CpuStorage::F32(_)) => {
                type $t = half::bf16;
                type $r = f32;
                $body
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                type $t = f64;
                type $r = f64;
                $body
            }
            (a, b) => candle_core::bail!(
                "cross-entropy: unsupported dtypes {:?} / {:?} on the CPU",
                a.dtype(),
                b.dtype()
            ),
        }
    };
}

impl CustomOp3 for SoftmaxCrossEntropy {
    fn name(&self) -> &'static str {
        "mmrec-softmax-cross-entropy"
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
        let (n, v) = check(l1, l2, l3, 1)?;
        let targets = cpu_slice::<u32>(s2, l2, "cross-entropy: targets")?;
        let out = with_types!(s1, s3, |T, R| R::to_cpu_storage_owned(forward_cpu::<T, R>(
            cpu_slice(s1, l1, "cross-entropy: logits")?,
            targets,
            cpu_slice(s3, l3, "cross-entropy: mask")?,
            v
        )));
        Ok((out, Shape::from((n, 2))))
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
        let (n, v) = check(l1, l2, l3, 1)?;
        Ok((
            crate::cuda::cross_entropy(false, (s1, l1), (s2, l2), (s3, l3), (n, v))?,
            Shape::from((n, 2)),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Only the loss column is used downstream; its gradient per row, times the mask.
        let coef = (grad.i((.., 0))? * mask)?;
        let coef_lse = Tensor::stack(&[&coef, &res.i((.., 1))?], 1)?;
        let dlogits = logits.apply_op3_no_bwd(targets, &coef_lse, &SoftmaxCrossEntropyBackward)?;
        Ok((Some(dlogits), None, None))
    }
}

impl CustomOp3 for SoftmaxCrossEntropyBackward {
    fn name(&self) -> &'static str {
        "mmrec-softmax-cross-entropy-backward"
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
        let (n, v) = check(l1, l2, l3, 2)?;
        let targets = cpu_slice::<u32>(s2, l2, "cross-entropy: targets")?;
        let out = with_types!(s1, s3, |T, R| T::to_cpu_storage_owned(backward_cpu::<T, R>(
            cpu_slice(s1, l1, "cross-entropy: logits")?,
            targets,
            cpu_slice(s3, l3, "cross-entropy: per-row input")?,
            v
        )));
        Ok((out, Shape::from((n, v))))
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
        let (n, v) = check(l1, l2, l3, 2)?;
        Ok((
            crate::cuda::cross_entropy(true, (s1, l1), (s2, l2), (s3, l3), (n, v))?,
            Shape::from((n, v)),
        ))
    }
}
