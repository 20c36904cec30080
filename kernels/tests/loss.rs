//! The fused softmax cross-entropy against the composed definition in f64, and its
//! backward against finite differences.

use candle_core::{DType, Device, Tensor, Var, D};
use mmrec_kernels::loss::cross_entropy_rows;
use rand::{Rng, SeedableRng};

fn inputs(n: usize, v: usize, seed: u64) -> (Vec<f64>, Vec<u32>, Vec<f64>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let logits = (0..n * v).map(|_| rng.random_range(-8.0..8.0)).collect();
    let targets = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
    // A third of the rows masked out, the rest weighted 1.
    let mask = (0..n).map(|i| if i % 3 == 2 { 0.0 } else { 1.0 }).collect();
    (logits, targets, mask)
}

/// `mask · (−log_softmax(x)[target])`, composed from candle ops in f64.
fn reference(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Tensor {
    let logp = candle_nn_free_log_softmax(logits);
    let picked = logp
        .gather(&targets.unsqueeze(1).unwrap(), 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    (picked.neg().unwrap() * mask).unwrap()
}

fn candle_nn_free_log_softmax(x: &Tensor) -> Tensor {
    let m = x.max_keepdim(D::Minus1).unwrap();
    let shifted = x.broadcast_sub(&m).unwrap();
    shifted
        .broadcast_sub(&shifted.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap())
        .unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    d / b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1e-300)
}

#[test]
fn forward_matches_the_composed_log_softmax() {
    let (n, v) = (37, 1000);
    let (x, t, m) = inputs(n, v, 1);
    let dev = Device::Cpu;
    let (x, t, m) = (
        Tensor::from_vec(x, (n, v), &dev).unwrap(),
        Tensor::from_vec(t, n, &dev).unwrap(),
        Tensor::from_vec(m, n, &dev).unwrap(),
    );
    let want = reference(&x, &t, &m);
    assert!(max_rel(&cross_entropy_rows(&x, &t, &m).unwrap(), &want) < 1e-12);
    // f32 and bf16 logits compute in f64 on the CPU, returning f32 rows.
    for dtype in [DType::F32, DType::BF16] {
        let xd = x.to_dtype(dtype).unwrap();
        let want = reference(&xd.to_dtype(DType::F64).unwrap(), &t, &m);
        let got = cross_entropy_rows(&xd, &t, &m).unwrap().to_dtype(DType::F64).unwrap();
        assert!(max_rel(&got, &want) < 1e-6, "{dtype:?}");
    }
}

#[test]
fn backward_matches_finite_differences() {
    let (n, v) = (5, 7);
    let (x, t, m) = inputs(n, v, 2);
    let dev = Device::Cpu;
    let (tt, mt) = (
        Tensor::from_vec(t, n, &dev).unwrap(),
        Tensor::from_vec(m, n, &dev).unwrap(),
    );
    let w = Tensor::new(&[0.3f64, -1.2, 0.7, 2.0, 1.1], &dev).unwrap();
    let loss = |x: &[f64]| {
        (cross_entropy_rows(&Tensor::from_slice(x, (n, v), &dev).unwrap(), &tt, &mt).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let var = Var::from_slice(&x, (n, v), &dev).unwrap();
    let grads = (cross_entropy_rows(var.as_tensor(), &tt, &mt).unwrap() * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let analytic = grads
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for i in 0..n * v {
        let (mut up, mut down) = (x.clone(), x.clone());
        up[i] += 1e-6;
        down[i] -= 1e-6;
        let numeric = (loss(&up) - loss(&down)) / 2e-6;
        assert!(
            (analytic[i] - numeric).abs() < 1e-7 * (1.0 + numeric.abs()),
            "logit {i}: analytic {} vs numeric {numeric}",
            analytic[i]
        );
    }
}

#[test]
fn a_target_outside_the_vocabulary_gives_nan_unless_masked() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
    let t = Tensor::new(&[9u32, 9], &dev).unwrap();
    let m = Tensor::new(&[1f32, 0.0], &dev).unwrap();
    let rows = cross_entropy_rows(&x, &t, &m).unwrap().to_vec1::<f32>().unwrap();
    assert!(rows[0].is_nan() && rows[1] == 0.0, "{rows:?}");
}
