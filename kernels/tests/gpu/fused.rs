//! The fused RMSNorm and MDI gate on the GPU against the CPU path, f32 and bf16, forward
//! and backward. Built only with `--features cuda`.

use super::{gpu, rel};
use candle_core::{DType, Device, Tensor, Var};
use mmrec_kernels::fused::{bias_add, mdi_gate, rms_norm, softmax_last_dim};

/// Outputs and input gradients of Σ probe ⊙ op(inputs) on `dev` in `dtype`.
fn run(
    dev: &Device,
    dtype: DType,
    inputs: &[Tensor],
    probes: &[Tensor],
    op: &dyn Fn(&[Tensor]) -> Vec<Tensor>,
) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|x| Var::from_tensor(&x.to_dtype(dtype).unwrap().to_device(dev).unwrap()).unwrap())
        .collect();
    let outs = op(&vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>());
    let mut loss = Tensor::zeros((), DType::F32, dev).unwrap();
    for (o, p) in outs.iter().zip(probes) {
        loss = (loss
            + (o.to_dtype(DType::F32).unwrap() * p.to_device(dev).unwrap())
                .unwrap()
                .sum_all()
                .unwrap())
        .unwrap();
    }
    let grads = loss.backward().unwrap();
    outs.into_iter()
        .chain(vars.iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()))
        .collect()
}

fn compare(inputs: &[Tensor], probes: &[Tensor], op: &dyn Fn(&[Tensor]) -> Vec<Tensor>) {
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        let want = run(&Device::Cpu, dtype, inputs, probes, op);
        let got = run(&gpu(), dtype, inputs, probes, op);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(rel(g, w) < tol, "{dtype:?} result {i}: relative error {:e}", rel(g, w));
        }
    }
}

#[test]
fn rms_norm_on_the_gpu_matches_the_cpu() {
    let cpu = Device::Cpu;
    for (n, d) in [(3, 24), (257, 100), (999, 256), (4096, 512), (100, 1000), (64, 2048)] {
        let x = Tensor::randn(0f32, 2.0, (n, d), &cpu).unwrap();
        let w = Tensor::rand(0.5f32, 1.5, d, &cpu).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (n, d), &cpu).unwrap();
        compare(&[x, w], &[probe], &|a| vec![rms_norm(&a[0], &a[1]).unwrap()]);
    }
}

#[test]
fn mdi_gate_on_the_gpu_matches_the_cpu() {
    let cpu = Device::Cpu;
    for (b, t, d) in [(1, 3, 5), (8, 1024, 512)] {
        let a = Tensor::randn(0f32, 2.0, (b, t, d), &cpu).unwrap();
        let bb = (Tensor::randn(0f32, 2.0, (b, t, d), &cpu).unwrap() + 4.0).unwrap();
        let p = Tensor::randn(0f32, 1.0, (b, t, 4 * d), &cpu).unwrap();
        let probes = [
            Tensor::randn(0f32, 1.0, (b, t, d), &cpu).unwrap(),
            Tensor::randn(0f32, 1.0, (b, t, d), &cpu).unwrap(),
        ];
        compare(&[a, bb, p], &probes, &|x| {
            let (g, u) = mdi_gate(&x[0], &x[1], &x[2]).unwrap();
            vec![g, u]
        });
    }
}

#[test]
fn gelu_on_the_gpu_matches_the_cpu() {
    let x = (Tensor::randn(0f32, 3.0, (1000, 2048), &Device::Cpu).unwrap())
        .contiguous()
        .unwrap();
    let probe = Tensor::randn(0f32, 1.0, (1000, 2048), &Device::Cpu).unwrap();
    compare(&[x], &[probe], &|a| vec![mmrec_kernels::fused::gelu(&a[0]).unwrap()]);
}

#[test]
fn adamw_on_the_gpu_matches_the_cpu() {
    let n = 1_000_003;
    let start = Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap();
    let grads: Vec<Tensor> = (0..4)
        .map(|_| Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap())
        .collect();
    let run = |dev: &Device| {
        let theta = start.to_device(dev).unwrap();
        let moments = Tensor::zeros((2, n), DType::F32, dev).unwrap();
        for (step, g) in grads.iter().enumerate() {
            let g = g.to_device(dev).unwrap();
            let c = (1.0 - 0.9f64.powi(step as i32 + 1), 1.0 - 0.95f64.powi(step as i32 + 1));
            let squares = Tensor::zeros(1, DType::F32, dev).unwrap();
            mmrec_kernels::adamw::add_squares(&squares, &g).unwrap();
            // The norm is about 0.7 · 1000 = 700: clipped to 500. The third step's loss is
            // not finite: the device skips it.
            let loss = Tensor::new(&[if step == 2 { f32::NAN } else { 3.0 }], dev).unwrap();
            let ctl = mmrec_kernels::adamw::control(&squares, &loss, 0.7, 500.0).unwrap();
            mmrec_kernels::adamw::moments(&moments, &g, &ctl, 0.9, 0.95).unwrap();
            mmrec_kernels::adamw::apply(&theta, &moments, &ctl, 1e-3, 0.999, c, 1e-8).unwrap();
        }
        Tensor::cat(&[theta, moments.flatten_all().unwrap()], 0).unwrap()
    };
    let err = rel(&run(&gpu()), &run(&Device::Cpu));
    assert!(err < 1e-6, "relative error {err:e}");
}

#[test]
fn embedding_backward_on_the_gpu_matches_the_cpu() {
    let (v, d, n) = (8192, 512, 32 * 1024);
    let table = Tensor::randn(0f32, 1.0, (v, d), &Device::Cpu).unwrap();
    // Skewed ids, as in text: many rows hit the same few entries, which the atomics must sum.
    let ids = (Tensor::rand(0f32, 1.0, n, &Device::Cpu)
        .unwrap()
        .sqr()
        .unwrap()
        .sqr()
        .unwrap()
        * (v as f64 - 1.0))
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let probe = Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu).unwrap();
    compare(&[table], &[probe], &|x| {
        vec![mmrec_kernels::fused::embedding(&x[0], &ids.to_device(x[0].device()).unwrap()).unwrap()]
    });
}

#[test]
fn softmax_on_the_gpu_matches_the_cpu() {
    let cpu = Device::Cpu;
    for (n, e) in [(3, 7), (4096, 52), (100, 300)] {
        // Every fifth entry hidden (−∞), as the attention mask hides them.
        let hidden: Vec<f32> = (0..n * e)
            .map(|i| if i % 5 == 0 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        let x = (Tensor::randn(0f32, 3.0, (n, e), &cpu).unwrap() + Tensor::from_vec(hidden, (n, e), &cpu).unwrap())
            .unwrap();
        let probe = Tensor::randn(0f32, 1.0, (n, e), &cpu).unwrap();
        compare(&[x], &[probe], &|a| vec![softmax_last_dim(&a[0]).unwrap()]);
    }
}

#[test]
fn add_squares_on_the_gpu_matches_the_cpu() {
    let cpu = Device::Cpu;
    let grads: Vec<Tensor> = [(512, 2048), (7, 3), (1, 1_000_003)]
        .into_iter()
        .map(|shape| Tensor::randn(0f32, 1.0, shape, &cpu).unwrap())
        .collect();
    let sum = |dev: &Device| {
        let acc = Tensor::zeros(1, DType::F32, dev).unwrap();
        for g in &grads {
            mmrec_kernels::adamw::add_squares(&acc, &g.to_device(dev).unwrap()).unwrap();
        }
        acc.to_vec1::<f32>().unwrap()[0]
    };
    let (want, got) = (sum(&cpu), sum(&gpu()));
    assert!(((got - want) / want).abs() < 1e-5, "{got} vs {want}");
}

#[test]
fn bias_add_on_the_gpu_matches_the_cpu() {
    let cpu = Device::Cpu;
    for (n, d) in [(3, 5), (32768, 512), (1000, 2048)] {
        let y = Tensor::randn(0f32, 1.0, (n, d), &cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, d, &cpu).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (n, d), &cpu).unwrap();
        compare(&[y, b], &[probe], &|a| vec![bias_add(&a[0], &a[1]).unwrap()]);
    }
}
