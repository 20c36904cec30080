//! The CUDA kernels on a real GPU, each against the CPU path or the f64 reference. Built
//! only with `--features cuda` (one test binary, so the GPU machine gets one executable);
//! run by scripts/gpu-check.sh.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};

#[path = "gpu/fused.rs"]
mod fused;
#[path = "gpu/loss.rs"]
mod loss;
#[path = "gpu/scan.rs"]
mod scan;

/// Norm-wise relative error ‖a − b‖ / ‖b‖ of two tensors on any device, in f64.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    diff_norm(a, b) / norm(b).max(1e-150)
}

/// ‖t‖₂ in f64, on any device.
fn norm(t: &Tensor) -> f64 {
    let t = t.to_dtype(DType::F64).unwrap().to_device(&Device::Cpu).unwrap();
    t.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt()
}

/// ‖a − b‖₂ in f64, on any device.
fn diff_norm(a: &Tensor, b: &Tensor) -> f64 {
    let f64_cpu = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_device(&Device::Cpu).unwrap();
    norm(&(f64_cpu(a) - f64_cpu(b)).unwrap())
}

fn gpu() -> Device {
    let dev = Device::new_cuda(0).expect("these tests need a CUDA GPU");
    mmrec_kernels::cuda::keep_freed_memory(dev.as_cuda_device().expect("a CUDA device"))
        .expect("the memory pool accepts its release threshold");
    dev
}
