//! Choosing where to run (`--device cpu|cuda|cuda:N|auto`) and what memory it has.

use candle_core::{Device, Tensor};

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

/// Whether this binary has CUDA and the machine a usable GPU (what `auto` picks).
#[cfg(feature = "cuda")]
pub fn gpu_present() -> bool {
    use candle_core::cuda_backend::cudarc::driver::result;
    // candle links the driver library at build time, so a CUDA binary only starts where
    // it exists; a machine can still have the driver and no usable GPU.
    result::init().is_ok() && result::device::get_count().is_ok_and(|n| n > 0)
}

/// Whether this binary has CUDA and the machine a usable GPU (what `auto` picks).
#[cfg(not(feature = "cuda"))]
pub fn gpu_present() -> bool {
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
    memory(dev).0
}

/// Total device memory (GPU), or the memory available now (CPU: what a run can count on).
pub fn total_memory(dev: &Device) -> u64 {
    memory(dev).1
}

/// (free, total) bytes: the GPU's, or the system's available memory twice for the CPU.
fn memory(dev: &Device) -> (u64, u64) {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda
            .cuda_stream()
            .context()
            .mem_get_info()
            .map_or((u64::MAX, u64::MAX), |(free, total)| (free as u64, total as u64)),
        _ => {
            let available = crate::host::meminfo_bytes("MemAvailable").unwrap_or(u64::MAX);
            (available, available)
        }
    }
}

/// The CUDA version the GPU's driver supports (`13.0`); None on the CPU.
pub fn cuda_version(dev: &Device) -> Option<String> {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let mut v = 0i32;
            // SAFETY: a plain driver query writing one integer.
            let ok = unsafe { candle_core::cuda_backend::cudarc::driver::sys::cuDriverGetVersion(&mut v) };
            (ok == candle_core::cuda_backend::cudarc::driver::sys::CUresult::CUDA_SUCCESS)
                .then(|| format!("{}.{}", v / 1000, (v % 1000) / 10))
        }
        _ => None,
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

/// After an out-of-memory error: give the device's cached free memory back (the GPU's
/// stream-ordered pool; nothing on the CPU). Returns the GPU's memory state afterwards.
pub fn release_cached_memory(dev: &Device) -> candle_core::Result<Option<String>> {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => mmrec_kernels::cuda::release_cached_memory(cuda).map(Some),
        _ => Ok(None),
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

/// Host-to-device copies of token batches without a synchronisation: on the GPU the data
/// goes through a small ring of page-locked buffers and is copied asynchronously on the
/// compute stream (a copy from pageable memory waits for the GPU's queue to drain). Each
/// buffer is refilled only once its previous copy has finished, which also bounds how far
/// the host runs ahead of the GPU. On the CPU it is a plain tensor construction.
#[derive(Default)]
pub struct Uploader {
    #[cfg(feature = "cuda")]
    ring: Vec<candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<u32>>,
    #[cfg(feature = "cuda")]
    next: usize,
}

/// Page-locked buffers in the ring: a copy in flight, one being filled, one spare.
#[cfg(feature = "cuda")]
const RING: usize = 3;

impl Uploader {
    /// `data` as a u32 tensor of `shape` on `dev`.
    pub fn u32_tensor(
        &mut self,
        data: &[u32],
        shape: (usize, usize, usize),
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match dev {
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => self.pinned_copy(data, shape, cuda),
            _ => Tensor::from_slice(data, shape, dev),
        }
    }

    #[cfg(feature = "cuda")]
    fn pinned_copy(
        &mut self,
        data: &[u32],
        shape: (usize, usize, usize),
        cuda: &candle_core::CudaDevice,
    ) -> candle_core::Result<Tensor> {
        use candle_core::cuda_backend::WrapErr;
        let stream = cuda.cuda_stream();
        if self.ring.get(self.next).is_none_or(|b| b.len() != data.len()) {
            // SAFETY: the buffer is filled below before any copy reads it.
            let fresh = unsafe { stream.context().alloc_pinned::<u32>(data.len()) }.w()?;
            match self.ring.get_mut(self.next) {
                Some(slot) => *slot = fresh,
                None => self.ring.push(fresh),
            }
        }
        let buf = &mut self.ring[self.next];
        // Waits only for this buffer's previous copy, RING batches ago.
        buf.as_mut_slice().w()?.copy_from_slice(data);
        // SAFETY: the copy below writes every element before anything reads them.
        let mut dst = unsafe { stream.alloc::<u32>(data.len()) }.w()?;
        stream.memcpy_htod(buf, &mut dst).w()?;
        self.next = (self.next + 1) % RING;
        let storage = candle_core::CudaStorage::wrap_cuda_slice(dst, cuda.clone());
        Ok(Tensor::from_storage(
            candle_core::Storage::Cuda(storage),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }
}
