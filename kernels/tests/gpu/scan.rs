//! The CUDA scan kernels on a real GPU: forward and adjoint against the sequential f64
//! reference, the fused backward against the CPU path (itself checked against finite
//! differences in scan.rs), for random inputs, γ near 1, long T and odd sizes, in f32 and
//! bf16. Built only with `--features cuda`; run by scripts/gpu-check.sh.

use super::gpu;
use candle_core::{DType, Device, Tensor, Var};
use mmrec_kernels::{reference_scan, scan, scan_stacked};
use rand::{Rng, SeedableRng};

fn random(n: usize, lo: f64, hi: f64, rng: &mut rand::rngs::StdRng) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    (num / den.max(1e-300)).sqrt()
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Forward on the GPU in `dtype` against the f64 reference; returns the relative error.
fn forward_error(dims: (usize, usize, usize), gamma_lo: f64, dtype: DType, seed: u64) -> f64 {
    let (b, t, d) = dims;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let gamma = random(b * t * d, gamma_lo, 1.0, &mut rng);
    let u = random(b * t * d, -1.0, 1.0, &mut rng);
    let h0 = random(b * d, -1.0, 1.0, &mut rng);
    let dev = gpu();
    // Round the inputs to `dtype` first, so the reference sees exactly what the GPU sees.
    let on = |v: &[f64], shape: &[usize]| {
        Tensor::from_slice(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let (g, x, s) = (on(&gamma, &[b, t, d]), on(&u, &[b, t, d]), on(&h0, &[b, d]));
    let want = reference_scan(&to_f64(&g), &to_f64(&x), &to_f64(&s), dims);
    let (h, last) = scan(
        &g.to_device(&dev).unwrap(),
        &x.to_device(&dev).unwrap(),
        &s.to_device(&dev).unwrap(),
    )
    .unwrap();
    let want_last: Vec<f64> = (0..b)
        .flat_map(|bi| want[(bi * t + t - 1) * d..(bi * t + t) * d].to_vec())
        .collect();
    rel_err(&to_f64(&h), &want).max(rel_err(&to_f64(&last), &want_last))
}

#[test]
fn f32_forward_matches_the_f64_reference_at_many_shapes() {
    for (i, dims) in [
        (1, 1, 1),
        (4, 300, 130),
        (3, 129, 33),
        (32, 1024, 512),
        (1, 65_536, 8),
        (2, 20_000, 3),
    ]
    .into_iter()
    .enumerate()
    {
        let err = forward_error(dims, 0.0, DType::F32, i as u64);
        assert!(err < 1e-5, "dims {dims:?}: relative error {err:e}");
    }
}

#[test]
fn f32_forward_with_gamma_near_one_over_long_sequences() {
    // γ ∈ [0.999, 1): memory of thousands of steps, where accumulated error would show.
    for dims in [(2, 4096, 96), (1, 65_536, 64)] {
        let err = forward_error(dims, 0.999, DType::F32, 7);
        assert!(err < 1e-5, "dims {dims:?}: relative error {err:e}");
    }
}

#[test]
fn bf16_forward_rounds_only_its_output() {
    // Inputs are bf16, arithmetic f32: the error is the output's rounding (2^-9 relative).
    // Few channels (one per lane, long tiles) and many (B·D ≥ 8192: short tiles).
    for dims in [(4, 300, 130), (1, 65_536, 8), (16, 300, 512)] {
        let err = forward_error(dims, 0.5, DType::BF16, 3);
        assert!(err < 4e-3, "dims {dims:?}: relative error {err:e}");
    }
}

#[test]
fn adjoint_matches_the_reference_reverse_scan() {
    let (b, t, d) = (2, 40_000, 40);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let gamma = random(b * t * d, 0.999, 1.0, &mut rng);
    let dy = random(b * t * d, -1.0, 1.0, &mut rng);
    let dev = gpu();
    let f = |v: &[f64]| {
        Tensor::from_slice(v, (b, t, d), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let want = f(&dy)
        .apply_op2_no_bwd(&f(&gamma), &mmrec_kernels::ScanAdjoint)
        .unwrap();
    let got = f(&dy)
        .to_device(&dev)
        .unwrap()
        .apply_op2_no_bwd(&f(&gamma).to_device(&dev).unwrap(), &mmrec_kernels::ScanAdjoint)
        .unwrap();
    let err = rel_err(&to_f64(&got), &to_f64(&want));
    assert!(err < 1e-5, "relative error {err:e}");
}

/// ∂(Σ w ⊙ h)/∂(γ, u, h0) on the GPU in `dtype` against the CPU in f64 (from the same
/// inputs: rounded to bf16 first when the GPU runs in bf16).
fn backward_error(dims: (usize, usize, usize), seed: u64, dtype: DType) -> f64 {
    let (b, t, d) = dims;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let round = |v: Vec<f64>| match dtype {
        DType::BF16 => v.into_iter().map(|x| half::bf16::from_f64(x).to_f64()).collect(),
        _ => v,
    };
    let gamma = round(random(b * t * d, 0.3, 1.0, &mut rng));
    let u = round(random(b * t * d, -1.0, 1.0, &mut rng));
    let h0 = round(random(b * d, -1.0, 1.0, &mut rng));
    let w = round(random(b * t * d, -1.0, 1.0, &mut rng));
    let grads = |dev: &Device, dtype: DType| -> Vec<Vec<f64>> {
        let var = |v: &[f64], shape: &[usize]| {
            Var::from_tensor(
                &Tensor::from_slice(v, shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_device(dev)
                    .unwrap(),
            )
            .unwrap()
        };
        let (vg, vu, vh) = (var(&gamma, &[b, t, d]), var(&u, &[b, t, d]), var(&h0, &[b, d]));
        let wt = Tensor::from_slice(&w, (b, t, d), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_device(dev)
            .unwrap();
        let (h, _) = scan(vg.as_tensor(), vu.as_tensor(), vh.as_tensor()).unwrap();
        let store = (h * wt).unwrap().sum_all().unwrap().backward().unwrap();
        [&vg, &vu, &vh]
            .iter()
            .map(|v| to_f64(store.get(v.as_tensor()).unwrap()))
            .collect()
    };
    let (got, want) = (grads(&gpu(), dtype), grads(&Device::Cpu, DType::F64));
    got.iter().zip(&want).map(|(g, w)| rel_err(g, w)).fold(0.0, f64::max)
}

#[test]
fn fused_backward_matches_the_cpu_path() {
    let shapes = [(2, 17, 5), (4, 1000, 130), (1, 30_000, 8), (16, 300, 512)];
    for (i, dims) in shapes.into_iter().enumerate() {
        let err = backward_error(dims, 20 + i as u64, DType::F32);
        assert!(err < 1e-5, "dims {dims:?}: relative error {err:e}");
    }
}

#[test]
fn bf16_backward_rounds_only_its_outputs() {
    // Few channels (one per lane) and many (four bf16 channels per lane, 8-byte accesses).
    for (i, dims) in [(2, 3000, 40), (16, 300, 512)].into_iter().enumerate() {
        let err = backward_error(dims, 40 + i as u64, DType::BF16);
        assert!(err < 1e-2, "dims {dims:?}: relative error {err:e}");
    }
}

/// The stacked scan (γ and u as one [2, B, T, D] input, as the model runs it) on the GPU in
/// f32 against the CPU in f64: states, final state and the gradients of Σ w ⊙ h.
#[test]
fn stacked_scan_matches_the_cpu_path() {
    // One channel per lane (odd D), and two (the u half starts at an even offset).
    for dims in [(3, 700, 67), (16, 200, 512)] {
        stacked_scan_case(dims);
    }
}

fn stacked_scan_case((b, t, d): (usize, usize, usize)) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    let mut gamma_u = random(b * t * d, 0.3, 1.0, &mut rng);
    gamma_u.extend(random(b * t * d, -1.0, 1.0, &mut rng));
    let h0 = random(b * d, -1.0, 1.0, &mut rng);
    let w = random(b * t * d, -1.0, 1.0, &mut rng);
    let run = |dev: &Device, dtype: DType| -> Vec<Vec<f64>> {
        let on = |v: &[f64], shape: &[usize]| {
            Tensor::from_slice(v, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .to_device(dev)
                .unwrap()
        };
        let stacked = Var::from_tensor(&on(&gamma_u, &[2, b, t, d])).unwrap();
        let start = Var::from_tensor(&on(&h0, &[b, d])).unwrap();
        let (h, last) = scan_stacked(stacked.as_tensor(), start.as_tensor()).unwrap();
        let store = (&h * on(&w, &[b, t, d]))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        vec![
            to_f64(&h),
            to_f64(&last),
            to_f64(store.get(stacked.as_tensor()).unwrap()),
            to_f64(store.get(start.as_tensor()).unwrap()),
        ]
    };
    let (got, want) = (run(&gpu(), DType::F32), run(&Device::Cpu, DType::F64));
    for (what, (g, w)) in ["h", "last", "d(γ, u)", "dh0"].iter().zip(got.iter().zip(&want)) {
        let err = rel_err(g, w);
        assert!(err < 1e-5, "{what} at {:?}: relative error {err:e}", (b, t, d));
    }
}
