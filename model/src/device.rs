//! Choosing where to run (`--device cpu|cuda|cuda:N|auto`) and what memory it has.

use candle_core::Device;

/// `cpu`, `cuda` (GPU 0), `cuda:N`, or `auto`: a GPU when this binary was built with CUDA
/// and a driver and GPU are present, else the CPU.
pub fn parse(spec: &str) -> Result<Device, String> {
    match spec.trim() {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if gpu_present() { open_cuda(0)? } else { Device::Cpu }),
        "cuda" => open_cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => open_cuda(n),
            _ => Err(format!("unknown device {other:?}: use cpu, cuda, cuda:N or auto")),
        },
    }
}

/// A short name for logs and benchmark records: `cpu`, `cuda:0`.
pub fn name(dev: &Device) -> String {
    match dev.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(feature = "cuda")]
fn gpu_present() -> bool {
    use candle_core::cuda_backend::cudarc::driver::result;
    // candle links the driver library at build time, so a CUDA binary only starts where
    // it exists; a machine can still have the driver and no usable GPU.
    result::init().is_ok() && result::device::get_count().is_ok_and(|n| n > 0)
}

#[cfg(not(feature = "cuda"))]
fn gpu_present() -> bool {
    false
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device, String> {
    if !gpu_present() {
        return Err("--device cuda: no NVIDIA driver or GPU found on this machine".into());
    }
    let dev = Device::new_cuda(ordinal).map_err(|e| format!("opening GPU {ordinal}: {e}"))?;
    mmrec_kernels::cuda::keep_freed_memory(dev.as_cuda_device().map_err(|e| e.to_string())?)
        .map_err(|e| format!("GPU {ordinal}: memory pool: {e}"))?;
    Ok(dev)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> Result<Device, String> {
    Err("this binary was built without CUDA: build it with scripts/build-cuda.sh (cargo feature `cuda`)".into())
}

/// Bytes free for activations on `dev`: the GPU's free memory, or the system's available
/// memory for the CPU (`u64::MAX` when it cannot be read).
pub fn free_memory(dev: &Device) -> u64 {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda
            .cuda_stream()
            .context()
            .mem_get_info()
            .map_or(u64::MAX, |(free, _total)| free as u64),
        _ => crate::host::meminfo_bytes("MemAvailable").unwrap_or(u64::MAX),
    }
}

/// The GPU's name (`NVIDIA H200`), or the CPU's model for the CPU.
pub fn gpu_name(dev: &Device) -> String {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda
            .cuda_stream()
            .context()
            .name()
            .unwrap_or_else(|e| format!("unknown GPU ({e})")),
        _ => crate::host::cpu_name(),
    }
}

/// Peak device memory in use since [`reset_peak_memory`]; None on the CPU.
pub fn peak_memory(dev: &Device) -> candle_core::Result<Option<u64>> {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => mmrec_kernels::cuda::peak_memory(cuda).map(Some),
        _ => Ok(None),
    }
}

pub fn reset_peak_memory(dev: &Device) -> candle_core::Result<()> {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => mmrec_kernels::cuda::reset_peak_memory(cuda),
        _ => Ok(()),
    }
}
