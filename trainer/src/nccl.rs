//! The NCCL backend of data parallelism (issue 20): one communicator per rank on that
//! rank's GPU, its unique id sent by rank 0 over the TCP group, and the step's sums
//! reduced in place on the device, in f32 buckets, on candle's own stream. Being on that
//! stream orders each reduction after the backward that wrote its gradients with no host
//! synchronisation, and nothing is copied to the host.
//!
//! A rank that dies leaves the others' reduction kernels waiting for it forever, so a
//! watchdog thread ends this process when a reduction has not finished within
//! `MMREC_DIST_TIMEOUT_S` (a bounded failure instead of a hang; `launch`, torchrun or
//! Slurm then stop the other ranks).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, Device, InplaceOp1, Layout, Tensor};

use crate::dist::Group;
use crate::train::{Error, Result};

/// Elements per reduction (64 MB of f32): large enough that NCCL runs at its bandwidth,
/// small enough that a bucket's concatenated copy costs little memory.
const BUCKET_ELEMS: usize = 16 << 20;

pub struct Nccl {
    comm: Comm,
    dev: Device,
    /// Milliseconds since `epoch` when the reduction in flight began; 0 when none is.
    busy_since_ms: Arc<AtomicU64>,
    epoch: Instant,
}

fn nccl_err(what: &str) -> impl FnOnce(candle_core::cuda_backend::cudarc::nccl::result::NcclError) -> Error + '_ {
    move |e| Error::Config(format!("data parallel (NCCL): {what}: {e:?}"))
}

impl Nccl {
    /// The communicator of this rank on `dev`, which must be this rank's GPU.
    pub fn connect(group: &mut Group, dev: &Device) -> Result<Nccl> {
        let Device::Cuda(cuda) = dev else {
            return Err(Error::Config(
                "data parallel: the NCCL backend needs a CUDA device (--device cuda)".into(),
            ));
        };
        let mut id_bytes = [0u8; 128];
        if group.world.rank == 0 {
            let id = Id::new().map_err(nccl_err("creating the unique id"))?;
            for (b, c) in id_bytes.iter_mut().zip(id.internal()) {
                *b = *c as u8;
            }
        }
        group.broadcast(&mut id_bytes)?;
        let id = Id::uninit(id_bytes.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(cuda.cuda_stream(), group.world.rank, group.world.size, id)
            .map_err(nccl_err("joining the communicator"))?;
        let nccl = Nccl {
            comm,
            dev: dev.clone(),
            busy_since_ms: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
        };
        nccl.start_watchdog(group.world.rank, crate::dist::timeout());
        Ok(nccl)
    }

    fn start_watchdog(&self, rank: usize, limit: Duration) {
        let (busy, epoch) = (self.busy_since_ms.clone(), self.epoch);
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let since = busy.load(Ordering::Acquire);
            if since > 0 && epoch.elapsed().as_millis() as u64 - since > limit.as_millis() as u64 {
                eprintln!(
                    "mmrec-train: data parallel (NCCL): rank {rank}: a gradient reduction has not finished after {} s \
                     (MMREC_DIST_TIMEOUT_S): another rank has stopped or hangs; ending this rank",
                    limit.as_secs()
                );
                // _exit: an exit that ran atexit handlers would wait on the CUDA context,
                // whose reduction kernel is the thing that never finishes.
                unsafe { libc::_exit(1) };
            }
        });
    }

    /// Each f32 tensor summed element-wise across the ranks, waited for (so the caller may
    /// time it).
    pub fn sum(&self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        self.busy_since_ms
            .store(self.epoch.elapsed().as_millis() as u64 + 1, Ordering::Release);
        let mut out = Vec::with_capacity(parts.len());
        let mut bucket: Vec<Tensor> = Vec::new();
        let mut filled = 0;
        for part in parts {
            if filled > 0 && filled + part.elem_count() > BUCKET_ELEMS {
                out.extend(self.sum_bucket(std::mem::take(&mut bucket))?);
                filled = 0;
            }
            filled += part.elem_count();
            bucket.push(part);
        }
        out.extend(self.sum_bucket(bucket)?);
        self.dev.synchronize()?;
        self.busy_since_ms.store(0, Ordering::Release);
        Ok(out)
    }

    /// One reduction over the concatenation of `parts` (a fresh buffer: reducing in place
    /// must not write into a tensor that something else still reads).
    fn sum_bucket(&self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if parts.is_empty() {
            return Ok(vec![]);
        }
        let flat: Vec<Tensor> = parts
            .iter()
            .map(Tensor::flatten_all)
            .collect::<candle_core::Result<_>>()?;
        let buffer = if flat.len() == 1 {
            flat[0].copy()?
        } else {
            Tensor::cat(&flat, 0)?
        };
        buffer.inplace_op1(&SumInPlace(&self.comm))?;
        let mut at = 0;
        let mut out = Vec::with_capacity(parts.len());
        for p in &parts {
            let n = p.elem_count();
            out.push(buffer.narrow(0, at, n)?.reshape(p.shape())?);
            at += n;
        }
        Ok(out)
    }
}

/// ncclAllReduce(sum) of an f32 tensor, in place.
struct SumInPlace<'a>(&'a Comm);

impl InplaceOp1 for SumInPlace<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL reduces tensors on a CUDA device only")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((lo, hi)) = layout.contiguous_offsets() else {
            candle_core::bail!("NCCL all-reduce: the buffer must be contiguous")
        };
        let mut view = storage.as_cuda_slice_mut::<f32>()?.slice_mut(lo..hi);
        self.0
            .all_reduce_in_place(&mut view, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok(())
    }
}
