//! The NCCL backend of data parallelism (issue 20): one communicator per rank on that
//! rank's GPU, its unique id sent by rank 0 over the TCP group, and the step's sums
//! reduced in place on the device, in f32 buckets, on candle's own stream. Being on that
//! stream orders each reduction after the backward that wrote its gradients and before
//! the update that reads them, with no host synchronisation and no copy to the host: the
//! host queues the reduction and goes on. CUDA events around it time it on the device.
//!
//! A rank that dies leaves the others' reduction kernels waiting for it forever, so a
//! watchdog thread ends this process when a reduction's end event has not completed
//! within `MMREC_DIST_TIMEOUT_S` of its queueing (a bounded failure instead of a hang;
//! `launch`, torchrun or Slurm then stop the other ranks).

use std::sync::Arc;
use std::time::Duration;

use candle_core::cuda_backend::cudarc::driver::{sys::CUevent_flags, CudaEvent, CudaStream, DriverError};
use candle_core::cuda_backend::cudarc::nccl::result::NcclError;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::cudarc::nccl::sys as nccl_sys;
use candle_core::{CpuStorage, CudaStorage, Device, InplaceOp1, Layout, Tensor};

use crate::dist::{Group, Watchdog};
use crate::train::{Error, Result};

/// Elements per reduction (64 MB of f32): large enough that NCCL runs at its bandwidth,
/// small enough that a bucket's concatenated copy costs little memory.
const BUCKET_ELEMS: usize = 16 << 20;

pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
    /// Ends this rank when a reduction does not finish (a peer died).
    watchdog: Watchdog,
    /// The last reduction's start and end events, timed once it has finished.
    last: Option<(CudaEvent, Arc<CudaEvent>)>,
    last_ms: Option<f64>,
}

fn nccl_err(what: &str) -> impl FnOnce(NcclError) -> Error + '_ {
    move |e| Error::Config(format!("data parallel (NCCL): {what}: {}", nccl_message(e)))
}

/// NCCL's result code and its own last message (cudarc prints neither).
fn nccl_message(e: NcclError) -> String {
    // SAFETY: ncclGetLastError takes a null communicator (the thread's last error) and
    // returns a NUL-terminated string that NCCL owns.
    let last = unsafe { std::ffi::CStr::from_ptr(nccl_sys::ncclGetLastError(std::ptr::null_mut())) };
    match last.to_string_lossy().trim() {
        "" => format!("{:?}", e.0),
        text => format!("{:?}: {text}", e.0),
    }
}

fn cuda_err(e: DriverError) -> Error {
    Error::Config(format!("data parallel (NCCL): CUDA: {e:?}"))
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
        let stream = cuda.cuda_stream();
        // ncclCommInitRank takes its GPU from the thread's current context: this rank's.
        stream.context().bind_to_thread().map_err(cuda_err)?;
        let comm = Comm::from_rank(stream.clone(), group.world.rank, group.world.size, id)
            .map_err(nccl_err("joining the communicator"))?;
        let (rank, limit, ctx) = (group.world.rank, crate::dist::timeout(), stream.context().clone());
        let watchdog = Watchdog::start(
            limit,
            Duration::from_millis(200),
            move || {
                let _ = ctx.bind_to_thread();
            },
            move || {
                eprintln!(
                    "mmrec-train: data parallel (NCCL): rank {rank}: a gradient reduction has not finished \
                     after {} s (MMREC_DIST_TIMEOUT_S): another rank has stopped or hangs; ending this rank",
                    limit.as_secs()
                );
                // _exit: an exit that ran atexit handlers would wait on the CUDA context,
                // whose reduction kernel is what never finishes.
                unsafe { libc::_exit(1) };
            },
        );
        Ok(Nccl {
            comm,
            stream,
            watchdog,
            last: None,
            last_ms: None,
        })
    }

    /// The last finished reduction's time on the device, in milliseconds.
    pub fn last_ms(&self) -> Option<f64> {
        self.last_ms
    }

    /// Each f32 tensor summed element-wise across the ranks: queued on the device, not
    /// waited for (the step's first read of a result waits, as for any other kernel).
    pub fn sum(&mut self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if let Some((start, end)) = self.last.take() {
            if end.is_complete() {
                self.last_ms = Some(f64::from(start.elapsed_ms(&end).map_err(cuda_err)?));
            }
        }
        let timed = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream.record_event(timed).map_err(cuda_err)?;
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
        let end = Arc::new(self.stream.record_event(timed).map_err(cuda_err)?);
        let watched = end.clone();
        self.watchdog.arm(Box::new(move || watched.is_complete()));
        self.last = Some((start, end));
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
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {}", nccl_message(e))))?;
        Ok(())
    }
}
