//! Data parallelism across processes (issue 20): the world from a launcher's environment
//! (torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`, or
//! Slurm's `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`), a TCP rendezvous at the
//! master address, and the step's all-reduce in f32. This backend reduces over TCP through
//! rank 0, summing in rank order so that every rank gets the same bits: it runs the whole
//! data-parallel path with one process per rank on any machine (the tests do, on the
//! CPU). On GPUs, a build with the `nccl` feature reduces with NCCL instead
//! (`crate::nccl`), and the TCP group only carries the rendezvous and the checks.
//! `MMREC_DIST_BACKEND` (`tcp` or `nccl`) overrides the choice.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::train::{Error, Result};

/// How the step's sums travel between ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Through rank 0 over TCP, on the host: any device, any build.
    Tcp,
    /// NCCL on the GPUs (a CUDA device and a build with the `nccl` feature).
    Nccl,
}

impl Backend {
    /// `MMREC_DIST_BACKEND`, else NCCL for a CUDA device when this build has it.
    pub fn choose(dev: &Device) -> Result<Backend> {
        match std::env::var("MMREC_DIST_BACKEND").ok().as_deref() {
            Some("tcp") => Ok(Backend::Tcp),
            Some("nccl") if cfg!(feature = "nccl") => Ok(Backend::Nccl),
            Some("nccl") => Err(Error::Config(
                "MMREC_DIST_BACKEND=nccl, but this mmrec-train was built without the nccl feature".into(),
            )),
            Some(other) => Err(Error::Config(format!(
                "MMREC_DIST_BACKEND={other:?}: expected tcp or nccl"
            ))),
            None if cfg!(feature = "nccl") && dev.is_cuda() => Ok(Backend::Nccl),
            None => Ok(Backend::Tcp),
        }
    }
}

/// This process's place among the ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    /// `host:port` where rank 0 waits for the others.
    pub master: String,
}

impl World {
    /// The world the launcher describes, or None for a single process.
    pub fn from_env() -> Result<Option<World>> {
        let var = |k: &str| std::env::var(k).ok();
        let names = if var("WORLD_SIZE").is_some() {
            ["RANK", "WORLD_SIZE", "LOCAL_RANK"]
        } else if var("SLURM_NTASKS").is_some() {
            ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"]
        } else {
            return Ok(None);
        };
        let number = |k: &str, default: Option<usize>| -> Result<usize> {
            match (var(k), default) {
                (Some(v), _) => v
                    .parse()
                    .map_err(|_| Error::Config(format!("{k}={v:?} is not a number"))),
                (None, Some(d)) => Ok(d),
                (None, None) => Err(Error::Config(format!("{} is set but {k} is not", names[1]))),
            }
        };
        let (rank, size, local_rank) = (
            number(names[0], None)?,
            number(names[1], None)?,
            number(names[2], Some(0))?,
        );
        if rank >= size {
            return Err(Error::Config(format!(
                "{}={rank} is not below {}={size}",
                names[0], names[1]
            )));
        }
        let master = format!(
            "{}:{}",
            var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            var("MASTER_PORT").unwrap_or_else(|| "29500".into())
        );
        // One rank needs no group, except to run the NCCL path on one GPU on purpose.
        let forced = std::env::var("MMREC_DIST_BACKEND").is_ok_and(|b| b == "nccl");
        Ok((size > 1 || forced).then_some(World {
            rank,
            size,
            local_rank,
            master,
        }))
    }
}

/// How long a rank waits for the others, at the rendezvous and in each reduction, before
/// it gives up with an error (`MMREC_DIST_TIMEOUT_S`, default 300): a rank that died ends
/// the job, it does not hang it.
pub(crate) fn timeout() -> Duration {
    let secs = std::env::var("MMREC_DIST_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

/// The connected ranks: rank 0 holds a stream to every other rank (in rank order), the
/// others one stream to rank 0; with NCCL, also the ranks' communicator.
pub struct Group {
    pub world: World,
    peers: Vec<TcpStream>,
    #[cfg(feature = "nccl")]
    nccl: Option<crate::nccl::Nccl>,
    /// The last TCP reduction's time on the host, in milliseconds.
    tcp_ms: Option<f64>,
}

fn dist_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Config(format!("data parallel: {what}: {e}"))
}

impl Group {
    /// Meet the other ranks at the master address, then set up `backend` on `dev`.
    #[cfg_attr(not(feature = "nccl"), allow(unused_variables, unused_mut))]
    pub fn connect(world: World, backend: Backend, dev: &Device) -> Result<Group> {
        let mut group = Group::meet(world)?;
        #[cfg(feature = "nccl")]
        if backend == Backend::Nccl {
            group.nccl = Some(crate::nccl::Nccl::connect(&mut group, dev)?);
        }
        Ok(group)
    }

    /// The backend the step's sums go through.
    pub fn backend(&self) -> Backend {
        #[cfg(feature = "nccl")]
        if self.nccl.is_some() {
            return Backend::Nccl;
        }
        Backend::Tcp
    }

    fn meet(world: World) -> Result<Group> {
        let deadline = Instant::now() + timeout();
        let mut peers = Vec::new();
        if world.rank == 0 {
            let listener =
                TcpListener::bind(&world.master).map_err(dist_err(format!("listening on {}", world.master)))?;
            listener
                .set_nonblocking(true)
                .map_err(dist_err("the listener".into()))?;
            let mut slots: Vec<Option<TcpStream>> = (1..world.size).map(|_| None).collect();
            while slots.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).map_err(dist_err("a rank's stream".into()))?;
                        let mut rank = [0u8; 4];
                        s.read_exact(&mut rank).map_err(dist_err("a rank's hello".into()))?;
                        let r = u32::from_le_bytes(rank) as usize;
                        if r == 0 || r >= world.size || slots[r - 1].is_some() {
                            return Err(Error::Config(format!(
                                "data parallel: unexpected rank {r} at the rendezvous"
                            )));
                        }
                        slots[r - 1] = Some(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<usize> = (1..world.size).filter(|r| slots[r - 1].is_none()).collect();
                            return Err(Error::Config(format!(
                                "data parallel: ranks {missing:?} never came to {}",
                                world.master
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(dist_err("accepting a rank".into())(e)),
                }
            }
            peers.extend(slots.into_iter().flatten());
        } else {
            let mut s = loop {
                match TcpStream::connect(&world.master) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => {
                        return Err(dist_err(format!("reaching rank 0 at {}", world.master))(e))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            s.write_all(&(world.rank as u32).to_le_bytes())
                .map_err(dist_err("greeting rank 0".into()))?;
            peers.push(s);
        }
        for s in &peers {
            let io = dist_err("setting up a stream".into());
            s.set_read_timeout(Some(timeout())).map_err(io)?;
            s.set_nodelay(true).map_err(dist_err("setting up a stream".into()))?;
        }
        Ok(Group {
            world,
            peers,
            #[cfg(feature = "nccl")]
            nccl: None,
            tcp_ms: None,
        })
    }

    /// Each tensor summed element-wise across the ranks, in f32. NCCL queues the
    /// reductions on the device and returns; TCP waits for the device and the other ranks.
    pub fn sum(&mut self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let parts: Vec<Tensor> = parts
            .iter()
            .map(|p| p.to_dtype(DType::F32))
            .collect::<candle_core::Result<_>>()?;
        #[cfg(feature = "nccl")]
        if let Some(nccl) = &mut self.nccl {
            return nccl.sum(parts);
        }
        let began = Instant::now();
        let mut flat = Vec::new();
        for p in &parts {
            flat.extend(p.flatten_all()?.to_vec1::<f32>()?);
        }
        self.all_reduce_sum(&mut flat)?;
        let mut at = 0;
        let mut out = Vec::with_capacity(parts.len());
        for p in &parts {
            let n = p.elem_count();
            out.push(Tensor::from_slice(&flat[at..at + n], p.shape(), p.device())?);
            at += n;
        }
        self.tcp_ms = Some(began.elapsed().as_secs_f64() * 1e3);
        Ok(out)
    }

    /// The last measured reduction's milliseconds: NCCL's on the device (the previous
    /// step's, timed by CUDA events once finished), TCP's on the host (copies included).
    pub fn comm_ms(&self) -> Option<f64> {
        #[cfg(feature = "nccl")]
        if let Some(nccl) = &self.nccl {
            return nccl.last_ms();
        }
        self.tcp_ms
    }

    /// Rank 0's `bytes`, into `bytes` on every rank.
    pub fn broadcast(&mut self, bytes: &mut [u8]) -> Result<()> {
        if self.world.rank == 0 {
            for (i, s) in self.peers.iter_mut().enumerate() {
                s.write_all(bytes)
                    .map_err(dist_err(format!("sending to rank {}", i + 1)))?;
            }
        } else {
            self.peers[0]
                .read_exact(bytes)
                .map_err(dist_err("receiving from rank 0".into()))?;
        }
        Ok(())
    }

    /// Every rank's `data` summed element-wise, into `data` on every rank (rank order, so
    /// the same bits everywhere).
    pub fn all_reduce_sum<T: Wire>(&mut self, data: &mut [T]) -> Result<()> {
        let mut bytes = vec![0u8; data.len() * T::BYTES];
        if self.world.rank == 0 {
            for (i, s) in self.peers.iter_mut().enumerate() {
                s.read_exact(&mut bytes)
                    .map_err(dist_err(format!("receiving from rank {}", i + 1)))?;
                for (x, b) in data.iter_mut().zip(bytes.chunks_exact(T::BYTES)) {
                    *x = x.plus(T::read(b));
                }
            }
            encode(data, &mut bytes);
            for (i, s) in self.peers.iter_mut().enumerate() {
                s.write_all(&bytes)
                    .map_err(dist_err(format!("sending to rank {}", i + 1)))?;
            }
        } else {
            encode(data, &mut bytes);
            let s = &mut self.peers[0];
            s.write_all(&bytes).map_err(dist_err("sending to rank 0".into()))?;
            s.read_exact(&mut bytes)
                .map_err(dist_err("receiving from rank 0".into()))?;
            for (x, b) in data.iter_mut().zip(bytes.chunks_exact(T::BYTES)) {
                *x = T::read(b);
            }
        }
        Ok(())
    }
}

/// A number the TCP reduction carries: f32 gradients, u64 counts.
pub trait Wire: Copy {
    const BYTES: usize;
    fn write(self, to: &mut [u8]);
    fn read(from: &[u8]) -> Self;
    fn plus(self, other: Self) -> Self;
}

impl Wire for f32 {
    const BYTES: usize = 4;
    fn write(self, to: &mut [u8]) {
        to.copy_from_slice(&self.to_le_bytes());
    }
    fn read(from: &[u8]) -> Self {
        f32::from_le_bytes([from[0], from[1], from[2], from[3]])
    }
    fn plus(self, other: Self) -> Self {
        self + other
    }
}

impl Wire for u64 {
    const BYTES: usize = 8;
    fn write(self, to: &mut [u8]) {
        to.copy_from_slice(&self.to_le_bytes());
    }
    fn read(from: &[u8]) -> Self {
        let mut b = [0u8; 8];
        b.copy_from_slice(from);
        u64::from_le_bytes(b)
    }
    fn plus(self, other: Self) -> Self {
        self + other
    }
}

fn encode<T: Wire>(data: &[T], bytes: &mut [u8]) {
    for (x, b) in data.iter().zip(bytes.chunks_exact_mut(T::BYTES)) {
        x.write(b);
    }
}

impl Group {
    /// Whether every rank holds the same `value` (rank 0 compares and tells the others).
    pub fn agree(&mut self, value: u64) -> Result<bool> {
        let mut word = [0u8; 8];
        if self.world.rank == 0 {
            let mut same = true;
            for (i, s) in self.peers.iter_mut().enumerate() {
                s.read_exact(&mut word)
                    .map_err(dist_err(format!("receiving from rank {}", i + 1)))?;
                same &= u64::from_le_bytes(word) == value;
            }
            for (i, s) in self.peers.iter_mut().enumerate() {
                s.write_all(&[u8::from(same)])
                    .map_err(dist_err(format!("sending to rank {}", i + 1)))?;
            }
            Ok(same)
        } else {
            let s = &mut self.peers[0];
            s.write_all(&value.to_le_bytes())
                .map_err(dist_err("sending to rank 0".into()))?;
            let mut verdict = [0u8; 1];
            s.read_exact(&mut verdict)
                .map_err(dist_err("receiving from rank 0".into()))?;
            Ok(verdict[0] == 1)
        }
    }
}

/// Whether a piece of queued device work has finished (asked without waiting).
pub type Probe = Box<dyn Fn() -> bool + Send>;

/// Watches device work the host does not wait for (the NCCL reductions): each piece is
/// armed with a probe; when one has not finished `limit` after it was armed, `on_hang`
/// runs on the watchdog's thread, which then ends. A rank whose peer died would otherwise
/// wait in its next read of the device forever.
pub struct Watchdog {
    armed: Arc<Mutex<Option<(Instant, Probe)>>>,
}

impl Watchdog {
    /// A thread that polls every `poll`; `setup` runs on it first (the NCCL backend binds
    /// its CUDA context there, so that the probes may query events).
    pub fn start(
        limit: Duration,
        poll: Duration,
        setup: impl FnOnce() + Send + 'static,
        on_hang: impl FnOnce() + Send + 'static,
    ) -> Watchdog {
        let armed: Arc<Mutex<Option<(Instant, Probe)>>> = Arc::new(Mutex::new(None));
        let slot = armed.clone();
        std::thread::spawn(move || {
            setup();
            loop {
                std::thread::sleep(poll);
                let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
                match slot.as_ref() {
                    Some((_, finished)) if finished() => *slot = None,
                    Some((since, _)) if since.elapsed() > limit => break,
                    _ => {}
                }
            }
            on_hang();
        });
        Watchdog { armed }
    }

    /// Watch a newly queued piece of work (it replaces the last one: work on one stream
    /// finishes in order).
    pub fn arm(&self, finished: Probe) {
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), finished));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    fn watchdog(limit_ms: u64) -> (Watchdog, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel();
        let dog = Watchdog::start(
            Duration::from_millis(limit_ms),
            Duration::from_millis(5),
            || {},
            move || tx.send(()).expect("the test waits"),
        );
        (dog, rx)
    }

    #[test]
    fn work_that_never_finishes_is_reported_after_the_limit() {
        let (dog, hung) = watchdog(50);
        let started = Instant::now();
        dog.arm(Box::new(|| false));
        hung.recv_timeout(Duration::from_secs(30))
            .expect("the hang is reported");
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn work_that_finishes_is_never_reported() {
        // A limit far above the work's 20 ms, so that a loaded machine cannot make it late.
        let (dog, hung) = watchdog(2000);
        // Nothing armed, then work that finishes late but within the limit, again and again.
        std::thread::sleep(Duration::from_millis(150));
        for _ in 0..5 {
            let done = Arc::new(AtomicBool::new(false));
            let seen = done.clone();
            dog.arm(Box::new(move || seen.load(Ordering::Relaxed)));
            std::thread::sleep(Duration::from_millis(20));
            done.store(true, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(60));
        }
        assert!(hung.try_recv().is_err(), "finished work was reported as hung");
    }
}
