//! With the `cuda` feature, compile the CUDA kernels to PTX with nvcc (loaded at run time
//! through candle's custom-function cache). Without it, nothing: CPU builds need no CUDA.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // sm_90 (Hopper) unless told otherwise; the PTX is JIT-compiled for newer GPUs too.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    for name in ["scan", "loss", "fused"] {
        let src = format!("src/cuda/{name}.cu");
        println!("cargo:rerun-if-changed={src}");
        let status = Command::new("nvcc")
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}"), &src, "-o"])
            .arg(out.join(format!("{name}.ptx")))
            .status()
            .unwrap_or_else(|e| {
                panic!("running nvcc for {src}: {e} (is the CUDA toolkit on PATH? see scripts/build-cuda.sh)")
            });
        assert!(status.success(), "nvcc failed on {src}");
    }
}
