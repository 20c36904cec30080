//! The fused RMSNorm and MDI gate against their composed definitions in f64, and their
//! backward against finite differences.

use candle_core::{DType, Device, Tensor, Var, D};
use mmrec_kernels::fused::{mdi_gate, rms_norm};
use rand::{Rng, SeedableRng};

fn random(shape: &[usize], lo: f64, hi: f64, seed: u64) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..shape.iter().product::<usize>())
        .map(|_| rng.random_range(lo..hi))
        .collect()
}

fn t(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Central differences of `f` (a scalar of the inputs) against `analytic` for input `which`.
fn check_gradient(
    inputs: &[Vec<f64>],
    shapes: &[&[usize]],
    which: usize,
    analytic: &[f64],
    f: &dyn Fn(&[Tensor]) -> f64,
) {
    let n = inputs[which].len();
    for i in (0..n).step_by((n / 40).max(1)) {
        let eval = |delta: f64| {
            let mut args = inputs.to_vec();
            args[which][i] += delta;
            f(&args.iter().zip(shapes).map(|(v, s)| t(v, s)).collect::<Vec<_>>())
        };
        let numeric = (eval(1e-6) - eval(-1e-6)) / 2e-6;
        assert!(
            (analytic[i] - numeric).abs() < 1e-6 * (1.0 + numeric.abs()),
            "input {which} index {i}: analytic {} vs numeric {numeric}",
            analytic[i]
        );
    }
}

fn composed_rms_norm(x: &Tensor, w: &Tensor) -> Tensor {
    let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    x.broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(w)
        .unwrap()
}

#[test]
fn rms_norm_matches_its_definition_and_finite_differences() {
    let (xs, ws, ps): (&[usize], &[usize], &[usize]) = (&[3, 5, 24], &[24], &[3, 5, 24]);
    let (x, w, probe) = (
        random(xs, -2.0, 2.0, 1),
        random(ws, 0.5, 1.5, 2),
        random(ps, -1.0, 1.0, 3),
    );
    assert!(
        max_abs(
            &rms_norm(&t(&x, xs), &t(&w, ws)).unwrap(),
            &composed_rms_norm(&t(&x, xs), &t(&w, ws))
        ) < 1e-12
    );
    check_two_input_op(&|a, b| rms_norm(a, b).unwrap(), [(&x, xs), (&w, ws)], &probe);
}

fn composed_gate(a: &Tensor, b: &Tensor, p: &Tensor) -> (Tensor, Tensor) {
    let d = a.dim(2).unwrap();
    let (z, g) = (p.narrow(2, 2 * d, d).unwrap(), p.narrow(2, 3 * d, d).unwrap());
    let sig = |x: &Tensor| (x.neg().unwrap().exp().unwrap() + 1.0).unwrap().recip().unwrap();
    let gamma = (sig(a) * sig(b)).unwrap().clamp(1e-6, 1.0 - 1e-6).unwrap();
    let u = ((1.0 - &gamma).unwrap() * sig(&g)).unwrap().mul(&z).unwrap();
    (gamma, u)
}

#[test]
fn mdi_gate_matches_its_definition_and_finite_differences() {
    let (s, sp): (&[usize], &[usize]) = (&[2, 7, 8], &[2, 7, 32]);
    // b up to 16: σ(a)σ(b) reaches the clamp at 1 − 1e-6 for some elements.
    let (a, b, p) = (
        random(s, -3.0, 3.0, 4),
        random(s, -3.0, 16.0, 5),
        random(sp, -2.0, 2.0, 6),
    );
    let (probe_g, probe_u) = (random(s, -1.0, 1.0, 7), random(s, -1.0, 1.0, 8));
    let (gamma, u) = mdi_gate(&t(&a, s), &t(&b, s), &t(&p, sp)).unwrap();
    let (want_gamma, want_u) = composed_gate(&t(&a, s), &t(&b, s), &t(&p, sp));
    assert!(max_abs(&gamma, &want_gamma) < 1e-12 && max_abs(&u, &want_u) < 1e-12);
    let loss_of = |g: Tensor, u: Tensor| {
        ((g * t(&probe_g, s)).unwrap().sum_all().unwrap() + (u * t(&probe_u, s)).unwrap().sum_all().unwrap()).unwrap()
    };
    let loss = |x: &[Tensor]| {
        let (g, u) = mdi_gate(&x[0], &x[1], &x[2]).unwrap();
        loss_of(g, u).to_scalar::<f64>().unwrap()
    };
    let vars: Vec<Var> = [(&a, s), (&b, s), (&p, sp)]
        .iter()
        .map(|(v, sh)| Var::from_slice(v, *sh, &Device::Cpu).unwrap())
        .collect();
    let (g, u) = mdi_gate(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor()).unwrap();
    let grads = loss_of(g, u).backward().unwrap();
    let inputs = [a, b, p];
    for (i, v) in vars.iter().enumerate() {
        let analytic = grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        check_gradient(&inputs, &[s, s, sp], i, &analytic, &loss);
    }
}

#[test]
fn gate_outputs_are_f32_for_bf16_inputs() {
    let a = Tensor::full(8f32, (1, 2, 4), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let p = Tensor::ones((1, 2, 16), DType::BF16, &Device::Cpu).unwrap();
    let (gamma, u) = mdi_gate(&a, &a, &p).unwrap();
    assert_eq!((gamma.dtype(), u.dtype()), (DType::F32, DType::F32));
    // σ(8)² = 0.99933: distinct from 1 in f32, where bf16 would round it to 1.0.
    let g = gamma.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    assert!((g - 0.999_33).abs() < 1e-5, "{g}");
}

/// Both input gradients of Σ probe ⊙ op(a, b), by autograd, against finite differences.
fn check_two_input_op(op: &dyn Fn(&Tensor, &Tensor) -> Tensor, inputs: [(&Vec<f64>, &[usize]); 2], probe: &[f64]) {
    let vars = inputs.map(|(v, s)| Var::from_slice(v, s, &Device::Cpu).unwrap());
    let out = op(vars[0].as_tensor(), vars[1].as_tensor());
    let shape = out.dims().to_vec();
    let grads = (out * t(probe, &shape)).unwrap().sum_all().unwrap().backward().unwrap();
    let loss = |a: &[Tensor]| {
        (op(&a[0], &a[1]) * t(probe, &shape))
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let values = [inputs[0].0.clone(), inputs[1].0.clone()];
    for (which, v) in vars.iter().enumerate() {
        let analytic = grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        check_gradient(&values, &[inputs[0].1, inputs[1].1], which, &analytic, &loss);
    }
}

/// The gradient of Σ probe ⊙ op(x) with respect to x, by autograd.
fn probe_grad(op: &dyn Fn(&Tensor) -> Tensor, x: &[f64], s: &[usize], probe: &[f64]) -> Vec<f64> {
    let v = Var::from_slice(x, s, &Device::Cpu).unwrap();
    let grads = (op(v.as_tensor()) * t(probe, s))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    grads
        .get(v.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Σ probe ⊙ op(x), for finite differences.
fn probe_loss<'a>(
    op: &'a dyn Fn(&Tensor) -> Tensor,
    probe: &'a [f64],
    s: &'a [usize],
) -> impl Fn(&[Tensor]) -> f64 + 'a {
    move |a: &[Tensor]| {
        (op(&a[0]) * t(probe, s))
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }
}

#[test]
fn gelu_matches_candles_erf_gelu_and_finite_differences() {
    let s: &[usize] = &[4, 33];
    let (x, probe) = (random(s, -5.0, 5.0, 9), random(s, -1.0, 1.0, 10));
    let op = |x: &Tensor| mmrec_kernels::fused::gelu(x).unwrap();
    assert!(max_abs(&op(&t(&x, s)), &t(&x, s).gelu_erf().unwrap()) < 1e-12);
    let analytic = probe_grad(&op, &x, s, &probe);
    check_gradient(&[x], &[s], 0, &analytic, &probe_loss(&op, &probe, s));
}

#[test]
fn softmax_matches_a_sequential_reference_and_finite_differences() {
    let s: &[usize] = &[3, 5, 37];
    let (mut x, probe) = (random(s, -8.0, 8.0, 11), random(s, -1.0, 1.0, 12));
    // Hidden entries (−∞) as the attention mask makes them, and one row hidden entirely.
    for i in (0..x.len()).step_by(7) {
        x[i] = f64::NEG_INFINITY;
    }
    x[37..74].fill(f64::NEG_INFINITY);
    let op = |x: &Tensor| mmrec_kernels::fused::softmax_last_dim(x).unwrap();
    let got = op(&t(&x, s)).flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for (row, out) in x.chunks(37).zip(got.chunks(37)) {
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        for v in row {
            sum += if m == f64::NEG_INFINITY { 0.0 } else { (v - m).exp() };
        }
        for (v, o) in row.iter().zip(out) {
            let want = if m == f64::NEG_INFINITY {
                0.0
            } else {
                (v - m).exp() / sum
            };
            assert!((o - want).abs() < 1e-14, "{o} vs {want}");
        }
    }
    let analytic = probe_grad(&op, &x, s, &probe);
    check_gradient(&[x], &[s], 0, &analytic, &probe_loss(&op, &probe, s));
}

#[test]
fn adamw_in_place_matches_the_update_written_out() {
    let (n, lr, wd, (b1, b2), eps) = (50, 1e-2, 0.1, (0.9f64, 0.95f64), 1e-8);
    let theta0 = random(&[n], -1.0, 1.0, 11);
    let theta = Tensor::from_vec(theta0.iter().map(|&v| v as f32).collect::<Vec<_>>(), n, &Device::Cpu).unwrap();
    let moments = Tensor::zeros((2, n), DType::F32, &Device::Cpu).unwrap();
    let (mut m, mut v, mut want) = (vec![0f64; n], vec![0f64; n], theta0.clone());
    for step in 1..=3 {
        let g = random(&[n], -1.0, 1.0, 20 + step);
        let gt = Tensor::from_vec(g.iter().map(|&v| v as f32).collect::<Vec<_>>(), n, &Device::Cpu).unwrap();
        let c = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
        // Scale ½ (two micro-batches), a clip threshold above the norm: no clipping.
        let squares = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        mmrec_kernels::adamw::add_squares(&squares, &gt).unwrap();
        let loss = Tensor::new(&[2f32], &Device::Cpu).unwrap();
        let ctl = mmrec_kernels::adamw::control(&squares, &loss, 0.5, 1e3).unwrap();
        mmrec_kernels::adamw::moments(&moments, &gt, &ctl, b1, b2).unwrap();
        mmrec_kernels::adamw::apply(&theta, &moments, &ctl, lr, 1.0 - lr * wd, c, eps).unwrap();
        for i in 0..n {
            let gi = 0.5 * g[i];
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            want[i] = want[i] * (1.0 - lr * wd) - lr * (m[i] / c.0) / ((v[i] / c.1).sqrt() + eps);
        }
    }
    let got = theta.to_dtype(DType::F64).unwrap();
    assert!(max_abs(&got, &t(&want, &[n])) < 1e-6);
}

#[test]
fn embedding_gathers_rows_and_adds_gradients_back_per_id() {
    let table = t(&random(&[5, 3], -1.0, 1.0, 12), &[5, 3]);
    let ids = Tensor::new(&[[4u32, 0, 4], [2, 4, 1]], &Device::Cpu).unwrap();
    let rows = mmrec_kernels::fused::embedding(&table, &ids).unwrap();
    assert_eq!(rows.dims(), [2, 3, 3]);
    assert!(
        max_abs(
            &rows,
            &table
                .index_select(&ids.flatten_all().unwrap(), 0)
                .unwrap()
                .reshape((2, 3, 3))
                .unwrap()
        ) == 0.0
    );
    let var = Var::from_tensor(&table).unwrap();
    let probe = t(&random(&[2, 3, 3], -1.0, 1.0, 13), &[2, 3, 3]);
    let grads = (mmrec_kernels::fused::embedding(var.as_tensor(), &ids).unwrap() * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let want = table
        .zeros_like()
        .unwrap()
        .index_add(&ids.flatten_all().unwrap(), &probe.reshape((6, 3)).unwrap(), 0)
        .unwrap();
    assert!(max_abs(grads.get(var.as_tensor()).unwrap(), &want) < 1e-15);
}

#[test]
fn add_squares_accumulates_the_sum_of_squares_of_every_tensor() {
    let acc = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap();
    let (a, b) = (random(&[7, 13], -2.0, 2.0, 21), random(&[1000], -1.0, 1.0, 22));
    for v in [&a, &b] {
        let g = Tensor::from_slice(v, v.len(), &Device::Cpu)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        mmrec_kernels::adamw::add_squares(&acc, &g).unwrap();
    }
    let want: f64 = a.iter().chain(&b).map(|v| (*v as f32 as f64).powi(2)).sum();
    let got = acc.to_vec1::<f32>().unwrap()[0] as f64;
    assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
}

#[test]
fn bias_add_matches_its_definition_and_finite_differences() {
    let (ys, bs): (&[usize], &[usize]) = (&[6, 9], &[9]);
    let (y, b, probe) = (
        random(ys, -2.0, 2.0, 31),
        random(bs, -1.0, 1.0, 32),
        random(ys, -1.0, 1.0, 33),
    );
    let out = mmrec_kernels::fused::bias_add(&t(&y, ys), &t(&b, bs)).unwrap();
    let want = t(&y, ys).broadcast_add(&t(&b, bs)).unwrap();
    assert!(max_abs(&out, &want) < 1e-15);
    check_two_input_op(
        &|a, b| mmrec_kernels::fused::bias_add(a, b).unwrap(),
        [(&y, ys), (&b, bs)],
        &probe,
    );
}
