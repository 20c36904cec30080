//! The CUDA kernels on a real GPU, each against the CPU path or the f64 reference. Built
//! only with `--features cuda` (one test binary, so the GPU machine gets one executable);
//! run by scripts/gpu-check.sh.
#![cfg(feature = "cuda")]

use candle_core::Device;

#[path = "gpu/fused.rs"]
mod fused;
#[path = "gpu/loss.rs"]
mod loss;
#[path = "gpu/scan.rs"]
mod scan;

fn gpu() -> Device {
    let dev = Device::new_cuda(0).expect("these tests need a CUDA GPU");
    mmrec_kernels::cuda::keep_freed_memory(dev.as_cuda_device().expect("a CUDA device"))
        .expect("the memory pool accepts its release threshold");
    dev
}
