//! The fused cross-entropy on the GPU against the CPU path (itself checked against the
//! composed definition and finite differences in loss.rs), f32 and bf16 logits, at the
//! training shape's vocabulary. Built only with `--features cuda`.

use super::{diff_norm, gpu, norm, rel};
use candle_core::{DType, Device, Tensor, Var};
use mmrec_kernels::loss::cross_entropy_rows;

/// Loss rows and dlogits of Σ w ⊙ rows, on `dev` with logits in `dtype`.
fn run(dev: &Device, dtype: DType, x: &Tensor, t: &Tensor, m: &Tensor, w: &Tensor) -> (Tensor, Tensor) {
    let var = Var::from_tensor(&x.to_dtype(dtype).unwrap().to_device(dev).unwrap()).unwrap();
    let rows = cross_entropy_rows(var.as_tensor(), &t.to_device(dev).unwrap(), &m.to_device(dev).unwrap()).unwrap();
    let grads = (&rows * w.to_device(dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    (
        rows.to_device(&Device::Cpu).unwrap(),
        grads.get(var.as_tensor()).unwrap().to_device(&Device::Cpu).unwrap(),
    )
}

#[test]
fn gpu_cross_entropy_matches_the_cpu_in_f32_and_bf16() {
    let cpu = Device::Cpu;
    for (n, v) in [(3, 5), (1000, 8192), (257, 50_257)] {
        let x = (Tensor::randn(0f32, 3.0, (n, v), &cpu).unwrap())
            .to_dtype(DType::F32)
            .unwrap();
        let t = Tensor::rand(0f32, v as f32, n, &cpu)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap();
        let m = Tensor::rand(0f32, 1.0, n, &cpu)
            .unwrap()
            .ge(0.2)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let w = Tensor::randn(0f32, 1.0, n, &cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let (want_rows, want_grad) = run(&cpu, dtype, &x, &t, &m, &w);
            let (rows, grad) = run(&gpu(), dtype, &x, &t, &m, &w);
            // Same inputs (rounded to dtype first on both): f32 arithmetic on the GPU
            // against f64 on the CPU; bf16 gradients round on output.
            let tol = if dtype == DType::BF16 { 1e-2 } else { 1e-5 };
            // Losses relative to at least one nat per row: a row whose loss is near zero
            // (a confident correct prediction) cannot have f32's relative accuracy, and
            // with three rows (two of them perhaps masked) that made the check flaky.
            let rows_err = diff_norm(&rows, &want_rows) / norm(&want_rows).max((n as f64).sqrt());
            assert!(rows_err < 1e-5, "({n}, {v}) {dtype:?} rows: {rows_err:e}");
            assert!(
                rel(&grad, &want_grad) < tol,
                "({n}, {v}) {dtype:?} dlogits: {:e}",
                rel(&grad, &want_grad)
            );
        }
    }
}
