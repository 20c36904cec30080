//! The block's element-wise chains as single ops with their own backward (DESIGN §1 steps 1
//! and 3-4): RMSNorm, and the MDI gate with the gated input. On the GPU each is one kernel
//! each way (`cuda/fused.cu`); candle's composed ops ran them as 8-25 kernels over
//! [B, T, D] tensors. The CPU versions compute in f64 and are the reference the GPU is
//! tested against; both are checked against the composed definitions and finite
//! differences in `tests/fused.rs`.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let x = Tensor::new(&[[3f32, 4.0]], &Device::Cpu)?;
//! let w = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
//! let y = mmrec_kernels::fused::rms_norm(&x, &w)?.to_vec2::<f32>()?;
//! let r = (12.5f32 + 1e-6).sqrt();
//! assert!((y[0][0] - 3.0 / r).abs() < 1e-6 && (y[0][1] - 8.0 / r).abs() < 1e-6);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, IndexOp, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu_slice;

const EPS: f64 = 1e-6;
const GAMMA_LO: f64 = 1e-6;
const GAMMA_HI: f64 = 1.0 - 1e-6;

/// `w ⊙ x / sqrt(mean(x²) + 1e-6)` over the last dimension, statistics in at least f32.
pub fn rms_norm(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let y = x.contiguous()?.reshape(((), d))?.apply_op2(&w.contiguous()?, RmsNorm)?;
    y.reshape(x.shape())
}

/// `(γ, u)` for a block: `γ = clamp(σ(a) σ(b), 1e-6, 1 − 1e-6)`, `u = (1 − γ) σ(g) z` where
/// a, b [B, T, D] are the gate MLPs' outputs and z, g are columns 2D.. and 3D.. of the
/// projection `qkzg` [B, T, 4D]. γ and u come out in at least f32 (DESIGN §6).
pub fn mdi_gate(a: &Tensor, b: &Tensor, qkzg: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let both = mdi_gate_stacked(a, b, qkzg)?;
    Ok((both.i(0)?, both.i(1)?))
}

/// [`mdi_gate`]'s γ and u stacked as one [2, B, T, D] tensor, the input of
/// [`crate::scan_stacked`].
pub fn mdi_gate_stacked(a: &Tensor, b: &Tensor, qkzg: &Tensor) -> candle_core::Result<Tensor> {
    let (bs, t, d) = a.dims3()?;
    let rows = |x: &Tensor, w: usize| x.contiguous()?.reshape((bs * t, w));
    let both = rows(a, d)?.apply_op3(&rows(b, d)?, &rows(qkzg, 4 * d)?, MdiGate)?;
    both.reshape((2, bs, t, d))
}

/// Run `$body` with `$t` the element type of a CPU storage (f32, f64, bf16).
macro_rules! with_cpu_float {
    ($s:expr, $what:expr, |$t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            CpuStorage::BF16(_) => {
                type $t = half::bf16;
                $body
            }
            other => candle_core::bail!("{}: unsupported dtype {:?}", $what, other.dtype()),
        }
    };
}

#[derive(Clone, Copy, Debug)]
struct RmsNorm;

/// RMSNorm's backward: the input's gradient, or the weight's (summed over rows, f32).
#[derive(Clone, Copy, Debug)]
enum RmsNormGrad {
    Input,
    Weight,
}

fn norm_dims(x: &Layout, w: &Layout) -> candle_core::Result<(usize, usize)> {
    let (n, d) = x.shape().dims2()?;
    if w.shape().dims() != [d] {
        candle_core::bail!("rmsnorm: weight {:?} does not match rows of width {d}", w.shape());
    }
    #[cfg(feature = "cuda")]
    if d > crate::cuda::NORM_MAX_WIDTH {
        candle_core::bail!(
            "rmsnorm: width {d} is over the fused kernel's {}",
            crate::cuda::NORM_MAX_WIDTH
        );
    }
    Ok((n, d))
}

/// 1 / sqrt(mean(x²) + eps) of a row, in f64.
fn inv_rms<T: WithDType>(row: &[T]) -> f64 {
    1.0 / (row.iter().map(|v| v.to_f64().powi(2)).sum::<f64>() / row.len().max(1) as f64 + EPS).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "mmrec-rmsnorm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = norm_dims(l1, l2)?;
        let out = with_cpu_float!(s1, "rmsnorm", |T| {
            let (x, w) = (
                cpu_slice::<T>(s1, l1, "rmsnorm: x")?,
                cpu_slice::<T>(s2, l2, "rmsnorm: weight")?,
            );
            let mut y = vec![T::from_f64(0.0); n * d];
            y.par_chunks_mut(d.max(1))
                .zip(x.par_chunks(d.max(1)))
                .for_each(|(yr, xr)| {
                    let inv = inv_rms(xr);
                    for ((o, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
                        *o = T::from_f64(xv.to_f64() * inv * wv.to_f64());
                    }
                });
            T::to_cpu_storage_owned(y)
        });
        Ok((out, Shape::from((n, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dims = norm_dims(l1, l2)?;
        Ok((crate::cuda::rms_norm((s1, l1), (s2, l2), dims)?, Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &dy, &RmsNormGrad::Input)?;
        let dw = x.apply_op3_no_bwd(w, &dy, &RmsNormGrad::Weight)?.to_dtype(w.dtype())?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "mmrec-rmsnorm-backward"
    }

    /// Inputs (x, w, dy).
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = norm_dims(l1, l2)?;
        with_cpu_float!(s1, "rmsnorm backward", |T| {
            let (x, w, dy) = (
                cpu_slice::<T>(s1, l1, "rmsnorm backward: x")?,
                cpu_slice::<T>(s2, l2, "rmsnorm backward: weight")?,
                cpu_slice::<T>(s3, l3, "rmsnorm backward: dy")?,
            );
            let rows = x.par_chunks(d.max(1)).zip(dy.par_chunks(d.max(1)));
            match self {
                RmsNormGrad::Input => {
                    let mut dx = vec![T::from_f64(0.0); n * d];
                    dx.par_chunks_mut(d.max(1)).zip(rows).for_each(|(out, (xr, gr))| {
                        let inv = inv_rms(xr);
                        let mean_wgn = xr
                            .iter()
                            .zip(gr)
                            .zip(w)
                            .map(|((xv, g), wv)| g.to_f64() * wv.to_f64() * xv.to_f64() * inv)
                            .sum::<f64>()
                            / d as f64;
                        for (((o, xv), g), wv) in out.iter_mut().zip(xr).zip(gr).zip(w) {
                            *o = T::from_f64((g.to_f64() * wv.to_f64() - xv.to_f64() * inv * mean_wgn) * inv);
                        }
                    });
                    Ok((T::to_cpu_storage_owned(dx), Shape::from((n, d))))
                }
                RmsNormGrad::Weight => {
                    let dw = rows
                        .map(|(xr, gr)| {
                            let inv = inv_rms(xr);
                            xr.iter()
                                .zip(gr)
                                .map(|(xv, g)| g.to_f64() * xv.to_f64() * inv)
                                .collect::<Vec<f64>>()
                        })
                        .reduce(|| vec![0.0; d], |a, b| a.iter().zip(&b).map(|(p, q)| p + q).collect());
                    Ok((CpuStorage::F64(dw), Shape::from(d)))
                }
            }
        })
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
        let (n, d) = norm_dims(l1, l2)?;
        let weight = matches!(self, RmsNormGrad::Weight);
        let out = crate::cuda::rms_norm_grad((s1, l1), (s2, l2), (s3, l3), (n, d), weight)?;
        Ok((out, if weight { Shape::from(d) } else { Shape::from((n, d)) }))
    }
}

#[derive(Clone, Copy, Debug)]
struct MdiGate;

/// The gate's backward; holds the upstream gradient [2, N, D] (dγ; du), f32.
#[derive(Clone, Debug)]
struct MdiGateGrad {
    grad: Tensor,
}

fn gate_dims(a: &Layout, b: &Layout, p: &Layout) -> candle_core::Result<(usize, usize)> {
    let (n, d) = a.shape().dims2()?;
    if b.shape() != a.shape() || p.shape().dims() != [n, 4 * d] {
        candle_core::bail!(
            "mdi gate: a {:?}, b {:?} and projection {:?} disagree",
            a.shape(),
            b.shape(),
            p.shape()
        );
    }
    Ok((n, d))
}

/// The gate's three CPU inputs: the two MLP outputs and the projection.
fn gate_slices<'a, T: WithDType>(
    a: (&'a CpuStorage, &Layout),
    b: (&'a CpuStorage, &Layout),
    p: (&'a CpuStorage, &Layout),
) -> candle_core::Result<(&'a [T], &'a [T], &'a [T])> {
    Ok((
        cpu_slice::<T>(a.0, a.1, "mdi gate: a")?,
        cpu_slice::<T>(b.0, b.1, "mdi gate: b")?,
        cpu_slice::<T>(p.0, p.1, "mdi gate: projection")?,
    ))
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Per element: (a, b, z, g) → (γ, u) and, given (dγ, du), (da, db, dz, dg).
fn gate_at(a: f64, b: f64, z: f64, g: f64) -> (f64, f64, f64, f64, f64) {
    let (sa, sb, sg) = (sigmoid(a), sigmoid(b), sigmoid(g));
    let gamma = (sa * sb).clamp(GAMMA_LO, GAMMA_HI);
    (gamma, (1.0 - gamma) * sg * z, sa, sb, sg)
}

impl CustomOp3 for MdiGate {
    fn name(&self) -> &'static str {
        "mmrec-mdi-gate"
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
        let (n, d) = gate_dims(l1, l2, l3)?;
        let out = with_cpu_float!(s1, "mdi gate", |T| {
            let (a, b, p) = gate_slices::<T>((s1, l1), (s2, l2), (s3, l3))?;
            let (gamma, u): (Vec<f64>, Vec<f64>) = (0..n * d)
                .into_par_iter()
                .map(|i| {
                    let (r, c) = (i / d, i % d);
                    let (gamma, u, ..) = gate_at(
                        a[i].to_f64(),
                        b[i].to_f64(),
                        p[r * 4 * d + 2 * d + c].to_f64(),
                        p[r * 4 * d + 3 * d + c].to_f64(),
                    );
                    (gamma, u)
                })
                .unzip();
            // γ and u in at least f32 (f64 for f64 inputs).
            if T::DTYPE == DType::F64 {
                CpuStorage::F64([gamma, u].concat())
            } else {
                CpuStorage::F32(gamma.into_iter().chain(u).map(|v| v as f32).collect())
            }
        });
        Ok((out, Shape::from((2, n, d))))
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
        let (n, d) = gate_dims(l1, l2, l3)?;
        Ok((
            crate::cuda::gate((s1, l1), (s2, l2), (s3, l3), None, (n, d))?,
            Shape::from((2, n, d)),
        ))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = a.dim(1)?;
        let all = a.apply_op3_no_bwd(
            b,
            p,
            &MdiGateGrad {
                grad: grad.contiguous()?,
            },
        )?;
        // Contiguous slices of the flat result: views, no copies.
        let n = a.dim(0)?;
        Ok((
            Some(all.narrow(0, 0, n * d)?.reshape((n, d))?),
            Some(all.narrow(0, n * d, n * d)?.reshape((n, d))?),
            Some(all.narrow(0, 2 * n * d, 4 * n * d)?.reshape((n, 4 * d))?),
        ))
    }
}

impl CustomOp3 for MdiGateGrad {
    fn name(&self) -> &'static str {
        "mmrec-mdi-gate-backward"
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
        let (n, d) = gate_dims(l1, l2, l3)?;
        let grad = self.grad.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let out = with_cpu_float!(s1, "mdi gate backward", |T| {
            let (a, b, p) = gate_slices::<T>((s1, l1), (s2, l2), (s3, l3))?;
            // Block after block, as the CUDA kernel writes it: da [N, D], db [N, D], dp [N, 4D].
            let mut out = vec![T::from_f64(0.0); 6 * n * d];
            let (dab, dp) = out.split_at_mut(2 * n * d);
            let (da, db) = dab.split_at_mut(n * d);
            let rows = da
                .par_chunks_mut(d.max(1))
                .zip(db.par_chunks_mut(d.max(1)))
                .zip(dp.par_chunks_mut(4 * d.max(1)));
            rows.enumerate().for_each(|(r, ((da, db), dp))| {
                for c in 0..d {
                    let i = r * d + c;
                    let (z, g) = (p[r * 4 * d + 2 * d + c].to_f64(), p[r * 4 * d + 3 * d + c].to_f64());
                    let (gamma, _, sa, sb, sg) = gate_at(a[i].to_f64(), b[i].to_f64(), z, g);
                    let (dgamma, du) = (grad[i], grad[n * d + i]);
                    let raw = sa * sb;
                    let draw = if (GAMMA_LO..=GAMMA_HI).contains(&raw) {
                        dgamma - du * sg * z
                    } else {
                        0.0
                    };
                    da[c] = T::from_f64(draw * sb * sa * (1.0 - sa));
                    db[c] = T::from_f64(draw * sa * sb * (1.0 - sb));
                    dp[2 * d + c] = T::from_f64(du * (1.0 - gamma) * sg);
                    dp[3 * d + c] = T::from_f64(du * (1.0 - gamma) * z * sg * (1.0 - sg));
                }
            });
            T::to_cpu_storage_owned(out)
        });
        Ok((out, Shape::from(6 * n * d)))
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
        let (n, d) = gate_dims(l1, l2, l3)?;
        let grad = self.grad.to_dtype(DType::F32)?;
        let (storage, layout) = grad.storage_and_layout();
        let candle_core::Storage::Cuda(g) = &*storage else {
            candle_core::bail!("mdi gate backward: the gradient is not on the GPU")
        };
        Ok((
            crate::cuda::gate((s1, l1), (s2, l2), (s3, l3), Some((g, layout)), (n, d))?,
            Shape::from(6 * n * d),
        ))
    }
}

/// The custom op `$op` (one input) and its backward `$grad` (inputs: the forward's input,
/// or its output when `backward_from_output`, then dy), both computed by one CPU function `$cpu(s, l, dy)` and one CUDA
/// function `$cuda((s, l), dy)`, with `dy` None for the forward.
macro_rules! op_with_grad {
    ($op:ident, $grad:ident, $name:literal, $cpu:path, $cuda:path, backward_from_output: $from_output:literal) => {
        impl candle_core::CustomOp1 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
                $cpu(s, l, None)
            }

            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                s: &candle_core::CudaStorage,
                l: &Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
                Ok(($cuda((s, l), None)?, l.shape().clone()))
            }

            fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
                let from = if $from_output { y } else { x };
                from.apply_op2_no_bwd(&dy.contiguous()?, &$grad).map(Some)
            }
        }

        impl CustomOp2 for $grad {
            fn name(&self) -> &'static str {
                concat!($name, "-backward")
            }

            fn cpu_fwd(
                &self,
                s1: &CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                $cpu(s1, l1, Some((s2, l2)))
            }

            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                s1: &candle_core::CudaStorage,
                l1: &Layout,
                s2: &candle_core::CudaStorage,
                l2: &Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
                Ok(($cuda((s1, l1), Some((s2, l2)))?, l1.shape().clone()))
            }
        }
    };
}

/// GELU in its erf form, `x Φ(x)`, with a one-pass backward (candle's composed backward
/// ran eight element-wise ops over the FFN's 4D-wide activations).
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

#[derive(Clone, Copy, Debug)]
struct Gelu;

/// dy ⊙ GELU'(x), inputs (x, dy).
#[derive(Clone, Copy, Debug)]
struct GeluGrad;

fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x / std::f64::consts::SQRT_2))
}

fn map_cpu(s: &CpuStorage, l: &Layout, dy: Option<(&CpuStorage, &Layout)>) -> candle_core::Result<(CpuStorage, Shape)> {
    let out = with_cpu_float!(s, "gelu", |T| {
        let x = cpu_slice::<T>(s, l, "gelu: x")?;
        let out: Vec<T> = match dy {
            None => x
                .par_iter()
                .map(|v| T::from_f64(v.to_f64() * normal_cdf(v.to_f64())))
                .collect(),
            Some((ds, dl)) => {
                let dy = cpu_slice::<T>(ds, dl, "gelu: dy")?;
                x.par_iter()
                    .zip(dy)
                    .map(|(v, g)| {
                        let v = v.to_f64();
                        let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
                        T::from_f64(g.to_f64() * (normal_cdf(v) + v * pdf))
                    })
                    .collect()
            }
        };
        T::to_cpu_storage_owned(out)
    });
    Ok((out, l.shape().clone()))
}

/// Softmax over the last dimension, statistics in f32 whatever the dtype, in one pass
/// forward and one backward (candle's composed softmax ran max, subtract, exp, sum and
/// divide, each a kernel, and as many again backward, over the attention scores). A row
/// that is all −∞ gives zeros.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

#[derive(Clone, Copy, Debug)]
struct Softmax;

/// (y, dy) → y ⊙ (dy − Σ y ⊙ dy), rows of the last dimension.
#[derive(Clone, Copy, Debug)]
struct SoftmaxGrad;

fn softmax_cpu(
    s: &CpuStorage,
    l: &Layout,
    dy: Option<(&CpuStorage, &Layout)>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let e = l.dims().last().copied().unwrap_or(1).max(1);
    let out = with_cpu_float!(s, "softmax", |T| {
        let x = cpu_slice::<T>(s, l, "softmax: x")?;
        let mut out = vec![T::from_f64(0.0); x.len()];
        match dy {
            None => out.par_chunks_mut(e).zip(x.par_chunks(e)).for_each(|(o, xr)| {
                let m = xr.iter().map(|v| v.to_f64()).fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    return;
                }
                let sum: f64 = xr.iter().map(|v| (v.to_f64() - m).exp()).sum();
                for (o, v) in o.iter_mut().zip(xr) {
                    *o = T::from_f64((v.to_f64() - m).exp() / sum);
                }
            }),
            Some((ds, dl)) => {
                let dy = cpu_slice::<T>(ds, dl, "softmax: dy")?;
                out.par_chunks_mut(e)
                    .zip(x.par_chunks(e).zip(dy.par_chunks(e)))
                    .for_each(|(o, (yr, dr))| {
                        let dot: f64 = yr.iter().zip(dr).map(|(y, d)| y.to_f64() * d.to_f64()).sum();
                        for (o, (y, d)) in o.iter_mut().zip(yr.iter().zip(dr)) {
                            *o = T::from_f64(y.to_f64() * (d.to_f64() - dot));
                        }
                    })
            }
        }
        T::to_cpu_storage_owned(out)
    });
    Ok((out, l.shape().clone()))
}

/// `y + b` for y [N, D] and a bias b [D], in one pass; the backward passes dy through and
/// sums its rows into db with one matrix-vector product.
pub fn bias_add(y: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (_, d) = y.dims2()?;
    if b.dims() != [d] {
        candle_core::bail!("bias_add: bias {:?} does not match rows of {d}", b.dims());
    }
    y.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)
}

#[derive(Clone, Copy, Debug)]
struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "mmrec-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l2.shape().elem_count().max(1);
        let out = with_cpu_float!(s1, "bias add", |T| {
            let (y, b) = (
                cpu_slice::<T>(s1, l1, "bias add: y")?,
                cpu_slice::<T>(s2, l2, "bias add: b")?,
            );
            let mut out = vec![T::from_f64(0.0); y.len()];
            out.par_chunks_mut(d).zip(y.par_chunks(d)).for_each(|(o, yr)| {
                for ((o, y), b) in o.iter_mut().zip(yr).zip(b) {
                    *o = *y + *b;
                }
            });
            T::to_cpu_storage_owned(out)
        });
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let d = l2.shape().elem_count().max(1);
        Ok((crate::cuda::bias_add((s1, l1), (s2, l2), d)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        _b: &Tensor,
        _out: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = y.dim(0)?;
        let db = Tensor::ones((1, n), dy.dtype(), dy.device())?
            .matmul(&dy.contiguous()?)?
            .squeeze(0)?;
        Ok((Some(dy.clone()), Some(db)))
    }
}

op_with_grad!(Gelu, GeluGrad, "mmrec-gelu", map_cpu, crate::cuda::gelu, backward_from_output: false);
op_with_grad!(Softmax, SoftmaxGrad, "mmrec-softmax", softmax_cpu, crate::cuda::softmax, backward_from_output: true);

/// Rows of `table` [V, D] for `ids` (u32, any shape, each below V): `[…ids, D]`. Its backward adds each
/// row's gradient into the table's gradient in one parallel pass (candle's `index_add`
/// ran it as D threads each walking all N ids).
pub fn embedding(table: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let (v, d) = table.dims2()?;
    let flat = ids.flatten_all()?.to_dtype(DType::U32)?.contiguous()?;
    let rows = table.contiguous()?.apply_op2(&flat, Embedding { vocab: v })?;
    let mut shape = ids.dims().to_vec();
    shape.push(d);
    rows.reshape(shape)
}

#[derive(Clone, Copy, Debug)]
struct Embedding {
    vocab: usize,
}

/// (ids, dy) → dtable [V, D] in f32 (f64 for f64 tables); V from the op.
#[derive(Clone, Copy, Debug)]
struct EmbeddingGrad {
    vocab: usize,
}

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "mmrec-embedding"
    }

    /// Inputs (table, ids): a gather, as candle's index_select does it.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l1.shape().dims2()?.1;
        Ok((
            s1.index_select(s2, l1, l2, 0)?,
            Shape::from((l2.shape().elem_count(), d)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let d = l1.shape().dims2()?.1;
        Ok((
            s1.index_select(s2, l1, l2, 0)?,
            Shape::from((l2.shape().elem_count(), d)),
        ))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _rows: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = ids.apply_op2_no_bwd(&dy.contiguous()?, &EmbeddingGrad { vocab: self.vocab })?;
        Ok((Some(grad.to_dtype(table.dtype())?), None))
    }
}

impl CustomOp2 for EmbeddingGrad {
    fn name(&self) -> &'static str {
        "mmrec-embedding-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ids = cpu_slice::<u32>(s1, l1, "embedding: ids")?;
        let (n, d) = l2.shape().dims2()?;
        let out = with_cpu_float!(s2, "embedding backward", |T| {
            let dy = cpu_slice::<T>(s2, l2, "embedding: dy")?;
            let mut out = vec![0f64; self.vocab * d];
            for (r, &id) in ids.iter().enumerate().take(n) {
                for (o, g) in out[id as usize * d..(id as usize + 1) * d]
                    .iter_mut()
                    .zip(&dy[r * d..(r + 1) * d])
                {
                    *o += g.to_f64();
                }
            }
            CpuStorage::F64(out)
        });
        Ok((out, Shape::from((self.vocab, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, d) = l2.shape().dims2()?;
        Ok((
            crate::cuda::embedding_grad((s1, l1), (s2, l2), (n, d, self.vocab))?,
            Shape::from((self.vocab, d)),
        ))
    }
}
