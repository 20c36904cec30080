//! The scan kernels against the sequential f64 reference, and the backward against finite
//! differences.

use candle_core::{DType, Device, Tensor, Var};
use mmrec_kernels::{reference_scan, scan, scan_stacked};
use rand::{Rng, SeedableRng};

fn random(n: usize, lo: f64, hi: f64, rng: &mut rand::rngs::StdRng) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Norm-wise relative error ‖a − b‖ / ‖b‖.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

fn check_f32(dims: (usize, usize, usize), gamma_lo: f64, seed: u64) {
    let (b, t, d) = dims;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let gamma = random(b * t * d, gamma_lo, 1.0, &mut rng);
    let u = random(b * t * d, -1.0, 1.0, &mut rng);
    let h0 = random(b * d, -1.0, 1.0, &mut rng);
    let want = reference_scan(&gamma, &u, &h0, dims);
    let dev = Device::Cpu;
    let t32 = |v: &[f64], shape: &[usize]| {
        Tensor::from_vec(v.iter().map(|&x| x as f32).collect::<Vec<_>>(), shape, &dev).unwrap()
    };
    let (h, last) = scan(&t32(&gamma, &[b, t, d]), &t32(&u, &[b, t, d]), &t32(&h0, &[b, d])).unwrap();
    let got: Vec<f64> = h
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let err = rel_err(&got, &want);
    assert!(err < 1e-5, "dims {dims:?} γ∈[{gamma_lo},1): relative error {err:e}");
    let last: Vec<f64> = last
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let want_last: Vec<f64> = (0..b)
        .flat_map(|bi| want[(bi * t + t - 1) * d..(bi * t + t) * d].to_vec())
        .collect();
    assert!(rel_err(&last, &want_last) < 1e-5);
}

#[test]
fn f32_tiled_scan_matches_the_f64_reference() {
    check_f32((4, 300, 130), 0.0, 1);
}

#[test]
fn f32_scan_with_gamma_near_one_matches_the_reference() {
    // γ = 0.999 + 0.001·U: long memory, where error accumulation would show.
    check_f32((2, 4096, 96), 0.999, 2);
}

#[test]
fn f32_chunked_scan_over_65536_steps_matches_the_reference() {
    // B·D = 8 leaves cores idle, so this takes the chunked two-pass path.
    check_f32((1, 65_536, 8), 0.999, 3);
    check_f32((2, 20_000, 3), 0.5, 4);
}

#[test]
fn f64_scan_is_exact_to_rounding() {
    let dims = (3, 1000, 70);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (b, t, d) = dims;
    let gamma = random(b * t * d, 0.0, 1.0, &mut rng);
    let u = random(b * t * d, -1.0, 1.0, &mut rng);
    let h0 = random(b * d, -1.0, 1.0, &mut rng);
    let dev = Device::Cpu;
    let (h, _) = scan(
        &Tensor::from_vec(gamma.clone(), (b, t, d), &dev).unwrap(),
        &Tensor::from_vec(u.clone(), (b, t, d), &dev).unwrap(),
        &Tensor::from_vec(h0.clone(), (b, d), &dev).unwrap(),
    )
    .unwrap();
    let got = h.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert!(rel_err(&got, &reference_scan(&gamma, &u, &h0, dims)) < 1e-14);
}

/// Gradients of L = Σ w ⊙ h with respect to γ, u and h0, analytic against central
/// differences in f64; `t` decides whether the adjoint runs tiled or chunked.
fn check_backward(b: usize, t: usize, d: usize) {
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let gamma = random(b * t * d, 0.3, 0.99, &mut rng);
    let u = random(b * t * d, -1.0, 1.0, &mut rng);
    let h0 = random(b * d, -1.0, 1.0, &mut rng);
    let w = Tensor::from_vec(random(b * t * d, -1.0, 1.0, &mut rng), (b, t, d), &dev).unwrap();
    let loss = |g: &[f64], x: &[f64], h: &[f64]| -> f64 {
        let (hs, _) = scan(
            &Tensor::from_slice(g, (b, t, d), &dev).unwrap(),
            &Tensor::from_slice(x, (b, t, d), &dev).unwrap(),
            &Tensor::from_slice(h, (b, d), &dev).unwrap(),
        )
        .unwrap();
        (hs * &w).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let (vg, vu, vh) = (
        Var::from_slice(&gamma, (b, t, d), &dev).unwrap(),
        Var::from_slice(&u, (b, t, d), &dev).unwrap(),
        Var::from_slice(&h0, (b, d), &dev).unwrap(),
    );
    let (hs, _) = scan(vg.as_tensor(), vu.as_tensor(), vh.as_tensor()).unwrap();
    let grads = (hs * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let analytic = |v: &Var| {
        grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let (ag, au, ah) = (analytic(&vg), analytic(&vu), analytic(&vh));
    let eps = 1e-6;
    let fd = |which: usize, i: usize| {
        let mut args = [gamma.clone(), u.clone(), h0.clone()];
        args[which][i] += eps;
        let up = loss(&args[0], &args[1], &args[2]);
        args[which][i] -= 2.0 * eps;
        let down = loss(&args[0], &args[1], &args[2]);
        (up - down) / (2.0 * eps)
    };
    // A spread of positions, including the first and last steps.
    let n = b * t * d;
    for i in [0, 1, d, n / 3, n / 2, n - d - 1, n - 1] {
        for (which, a) in [(0, &ag), (1, &au)] {
            let f = fd(which, i);
            assert!(
                (a[i] - f).abs() <= 1e-6 * (1.0 + f.abs()),
                "input {which} index {i}: analytic {} vs numeric {f}",
                a[i]
            );
        }
    }
    for (i, &a) in ah.iter().enumerate().take(b * d) {
        let f = fd(2, i);
        assert!(
            (a - f).abs() <= 1e-6 * (1.0 + f.abs()),
            "h0 index {i}: analytic {a} vs numeric {f}"
        );
    }
}

#[test]
fn backward_matches_finite_differences() {
    check_backward(2, 17, 5);
}

#[test]
fn chunked_backward_matches_finite_differences() {
    check_backward(1, 3000, 2);
}

#[test]
fn stacked_scan_matches_the_two_input_scan_and_its_gradients() {
    let (b, t, d) = (2, 37, 3);
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut gamma_u = random(b * t * d, 0.3, 0.99, &mut rng);
    gamma_u.extend(random(b * t * d, -1.0, 1.0, &mut rng));
    let h0 = Var::from_vec(random(b * d, -1.0, 1.0, &mut rng), (b, d), &dev).unwrap();
    let w = Tensor::from_vec(random(b * t * d, -1.0, 1.0, &mut rng), (b, t, d), &dev).unwrap();
    let stacked = Var::from_vec(gamma_u, (2, b, t, d), &dev).unwrap();
    let (h1, last1) = scan_stacked(stacked.as_tensor(), h0.as_tensor()).unwrap();
    let g1 = (&h1 * &w).unwrap().sum_all().unwrap().backward().unwrap();
    // The same inputs as two tensors: the path checked against finite differences above.
    let (vg, vu) = (
        Var::from_tensor(&stacked.as_tensor().get(0).unwrap()).unwrap(),
        Var::from_tensor(&stacked.as_tensor().get(1).unwrap()).unwrap(),
    );
    let (h2, last2) = scan(vg.as_tensor(), vu.as_tensor(), h0.as_tensor()).unwrap();
    let g2 = (&h2 * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(flat(&h1), flat(&h2));
    assert_eq!(flat(&last1), flat(&last2));
    let two = Tensor::stack(&[g2.get(vg.as_tensor()).unwrap(), g2.get(vu.as_tensor()).unwrap()], 0).unwrap();
    assert_eq!(flat(g1.get(stacked.as_tensor()).unwrap()), flat(&two));
    assert_eq!(
        flat(g1.get(h0.as_tensor()).unwrap()),
        flat(g2.get(h0.as_tensor()).unwrap())
    );
}

#[test]
fn adjoint_matches_the_reference_reverse_scan() {
    // g_t = dy_t + γ_{t+1} g_{t+1}: the reverse scan, in f32 against f64.
    let (b, t, d) = (1, 40_000, 4);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let gamma = random(b * t * d, 0.999, 1.0, &mut rng);
    let dy = random(b * t * d, -1.0, 1.0, &mut rng);
    // Reverse time and shift γ by one to express the adjoint as a forward reference scan.
    let rev = |v: &[f64]| -> Vec<f64> { (0..t).rev().flat_map(|s| v[s * d..(s + 1) * d].to_vec()).collect() };
    let mut shifted = vec![0.0; t * d];
    for s in 0..t - 1 {
        shifted[s * d..(s + 1) * d].copy_from_slice(&gamma[(s + 1) * d..(s + 2) * d]);
    }
    let want = rev(&reference_scan(&rev(&shifted), &rev(&dy), &vec![0.0; d], (b, t, d)));
    let dev = Device::Cpu;
    let f = |v: &[f64]| Tensor::from_vec(v.iter().map(|&x| x as f32).collect::<Vec<_>>(), (b, t, d), &dev).unwrap();
    let g = f(&dy)
        .apply_op2_no_bwd(&f(&gamma), &mmrec_kernels::ScanAdjoint)
        .unwrap();
    let got: Vec<f64> = g
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    assert!(rel_err(&got, &want) < 1e-5, "{}", rel_err(&got, &want));
    let _ = DType::F32;
}
