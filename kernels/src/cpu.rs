//! CPU scan kernels over contiguous [B, T, D] buffers.
//!
//! The recurrence is sequential in time but independent per (batch, channel), so work is
//! split into (batch, channel-block) tiles run on rayon, and each tile walks time with an
//! inner loop over its contiguous channels, which the compiler vectorises. When B·D is
//! too small to give every core a tile, time is cut into chunks instead (two passes: local
//! scans plus chunk decay products, then a carry fix-up).

use rayon::prelude::*;

/// Narrowest tile: 64 f32 channels are eight AVX2 registers.
const BLOCK: usize = 64;

/// Tile width: as wide as the parallelism allows. A tile walks time with a stride of D
/// elements; a tile spanning whole rows makes that walk one sequential stream per array
/// (what the hardware prefetcher wants), while narrow tiles turn it into thousands of
/// short strided reads. Its state (≤ D values) stays in L1/L2 either way.
fn tile_width(b: usize, d: usize, threads: usize) -> usize {
    let blocks_per_row = (2 * threads).div_ceil(b.max(1)).max(1);
    d.div_ceil(blocks_per_row).div_ceil(16).max(1) * 16
}

pub trait Elem: Copy + Send + Sync + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self> + 'static {
    const ZERO: Self;
    const ONE: Self;
}
impl Elem for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}
impl Elem for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

/// A raw pointer that tiles writing disjoint regions of one buffer can share.
#[derive(Clone, Copy)]
struct Out<T>(*mut T);
unsafe impl<T> Send for Out<T> {}
unsafe impl<T> Sync for Out<T> {}

impl<T> Out<T> {
    /// A method, not field access, so closures capture the Send+Sync wrapper itself.
    fn get(self) -> *mut T {
        self.0
    }
}

/// Direction of the scan: forward computes `h_t = γ_t h_{t-1} + u_t` from `h0`; backward
/// computes the adjoint `g_t = dy_t + γ_{t+1} g_{t+1}` from the end (`init` = 0).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Direction {
    Forward,
    Backward,
}

/// How the work is cut: by (batch, channel-block) tiles, or additionally by time chunks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Strategy {
    /// Tiles when they fill the cores, time chunks otherwise.
    Auto,
    Tiled,
    /// Two-pass chunked scan with this many chunks per sequence.
    Chunked(usize),
}

/// Scan over [b, t, d] buffers; `init` is [b, d]. Returns the [b, t, d] states.
pub fn scan<T: Elem>(gamma: &[T], u: &[T], init: &[T], dims: (usize, usize, usize), dir: Direction) -> Vec<T> {
    scan_with(gamma, u, init, dims, dir, Strategy::Auto)
}

pub fn scan_with<T: Elem>(
    gamma: &[T],
    u: &[T],
    init: &[T],
    dims: (usize, usize, usize),
    dir: Direction,
    strategy: Strategy,
) -> Vec<T> {
    let mut out = alloc_output(dims.0 * dims.1 * dims.2);
    scan_into(gamma, u, init, dims, dir, strategy, &mut out);
    out
}

/// A zeroed output buffer, backed by transparent huge pages where the kernel allows it: a
/// fresh 4 KiB-paged buffer costs one page fault per 4 KiB on first write, which for a
/// memory-bound op is as much time as the scan itself.
fn alloc_output<T: Elem>(n: usize) -> Vec<T> {
    let out = vec![T::ZERO; n];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = n * std::mem::size_of::<T>();
        if bytes >= 4 * HUGE {
            let start = (out.as_ptr() as usize).next_multiple_of(HUGE);
            let end = (out.as_ptr() as usize + bytes) / HUGE * HUGE;
            if end > start {
                // SAFETY: advice on whole pages inside our own allocation; it changes how
                // the pages are backed, never their contents.
                unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
            }
        }
    }
    out
}

/// The scan into a caller-provided buffer of b·t·d elements.
pub fn scan_into<T: Elem>(
    gamma: &[T],
    u: &[T],
    init: &[T],
    (b, t, d): (usize, usize, usize),
    dir: Direction,
    strategy: Strategy,
    out: &mut [T],
) {
    assert_eq!(gamma.len(), b * t * d);
    assert_eq!(u.len(), b * t * d);
    assert_eq!(init.len(), b * d);
    assert_eq!(out.len(), b * t * d);
    if out.is_empty() {
        return;
    }
    let threads = rayon::current_num_threads();
    let tiles = b * d.div_ceil(BLOCK);
    // Chunking costs a second pass over the data: only worth it when tiles leave cores idle
    // and the sequence is long enough to amortise the carry step.
    let strategy = match strategy {
        Strategy::Auto if tiles < threads && t >= 4 * threads * 64 => Strategy::Chunked(threads * 4),
        Strategy::Auto => Strategy::Tiled,
        s => s,
    };
    match strategy {
        Strategy::Chunked(n) => chunked(gamma, u, init, (b, t, d), dir, out, n.max(1)),
        _ => tiled(gamma, u, init, (b, t, d), dir, out),
    }
}

fn tiled<T: Elem>(gamma: &[T], u: &[T], init: &[T], (b, t, d): (usize, usize, usize), dir: Direction, out: &mut [T]) {
    let width = tile_width(b, d, rayon::current_num_threads());
    let blocks = d.div_ceil(width);
    let ptr = Out(out.as_mut_ptr());
    (0..b * blocks).into_par_iter().for_each(|tile| {
        let (bi, blk) = (tile / blocks, tile % blocks);
        let (c0, c1) = (blk * width, ((blk + 1) * width).min(d));
        let mut state = init[bi * d + c0..bi * d + c1].to_vec();
        let base = bi * t * d;
        // SAFETY: tile (bi, blk) writes only rows bi and channels c0..c1: disjoint from
        // every other tile, and inside `out`.
        let out = unsafe { std::slice::from_raw_parts_mut(ptr.get(), b * t * d) };
        walk(gamma, u, out, &mut state, base, c0, d, 0..t, dir);
    });
}

/// One tile's walk through time steps `steps` (in `dir` order) for channels c0..c0+w.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn walk<T: Elem>(
    gamma: &[T],
    u: &[T],
    out: &mut [T],
    state: &mut [T],
    base: usize,
    c0: usize,
    d: usize,
    steps: std::ops::Range<usize>,
    dir: Direction,
) {
    let w = state.len();
    match dir {
        Direction::Forward => {
            for s in steps {
                let o = base + s * d + c0;
                // Zipped iterators: no bounds checks, so the loop vectorises.
                for (((s, &g), &x), y) in state
                    .iter_mut()
                    .zip(&gamma[o..o + w])
                    .zip(&u[o..o + w])
                    .zip(&mut out[o..o + w])
                {
                    *s = g * *s + x;
                    *y = *s;
                }
            }
        }
        Direction::Backward => {
            // `state` carries γ_{s+1} g_{s+1} into step s.
            for s in steps.rev() {
                let o = base + s * d + c0;
                for (((s, &g), &x), y) in state
                    .iter_mut()
                    .zip(&gamma[o..o + w])
                    .zip(&u[o..o + w])
                    .zip(&mut out[o..o + w])
                {
                    let v = x + *s;
                    *y = v;
                    *s = g * v;
                }
            }
        }
    }
}

/// One job of the chunked scan: batch row, time chunk [s0, s1), channels [c0, c1).
struct Span {
    bi: usize,
    ci: usize,
    c0: usize,
    c1: usize,
    s0: usize,
    s1: usize,
}

fn job_span(job: usize, chunks: usize, blocks: usize, len: usize, (t, d): (usize, usize)) -> Span {
    let (bi, rest) = (job / (chunks * blocks), job % (chunks * blocks));
    let (ci, blk) = (rest / blocks, rest % blocks);
    Span {
        bi,
        ci,
        c0: blk * BLOCK,
        c1: ((blk + 1) * BLOCK).min(d),
        s0: ci * len,
        s1: ((ci + 1) * len).min(t),
    }
}

/// The chunked scan's geometry: `chunks` chunks of `len` steps, `blocks` channel blocks.
#[derive(Clone, Copy)]
struct Chunking {
    b: usize,
    t: usize,
    d: usize,
    chunks: usize,
    len: usize,
    blocks: usize,
}

impl Chunking {
    fn span(&self, job: usize) -> Span {
        job_span(job, self.chunks, self.blocks, self.len, (self.t, self.d))
    }

    fn jobs(&self) -> usize {
        self.b * self.chunks * self.blocks
    }
}

fn chunked<T: Elem>(
    gamma: &[T],
    u: &[T],
    init: &[T],
    (b, t, d): (usize, usize, usize),
    dir: Direction,
    out: &mut [T],
    chunks: usize,
) {
    let len = t.div_ceil(chunks.min(t));
    let g = Chunking {
        b,
        t,
        d,
        chunks: t.div_ceil(len),
        len,
        blocks: d.div_ceil(BLOCK),
    };
    let decay = local_scans(gamma, u, g, dir, out);
    let carry_in = chunk_carries(gamma, init, g, dir, out, &decay);
    add_carries(gamma, g, dir, out, &carry_in);
}

/// Pass 1: every chunk scans from a zero state; returns the product of each chunk's decays.
fn local_scans<T: Elem>(gamma: &[T], u: &[T], g: Chunking, dir: Direction, out: &mut [T]) -> Vec<T> {
    let Chunking { b, t, d, chunks, .. } = g;
    let ptr = Out(out.as_mut_ptr());
    let mut decay = vec![T::ONE; b * chunks * d];
    let dptr = Out(decay.as_mut_ptr());
    (0..g.jobs()).into_par_iter().for_each(|job| {
        let Span { bi, ci, c0, c1, s0, s1 } = g.span(job);
        let w = c1 - c0;
        let mut state = [T::ZERO; BLOCK];
        let mut prod = [T::ONE; BLOCK];
        // SAFETY: job (bi, ci, blk) writes rows bi, steps s0..s1, channels c0..c1 of `out`
        // and entry (bi, ci, c0..c1) of `decay`: disjoint across jobs.
        let (out, decay) = unsafe {
            (
                std::slice::from_raw_parts_mut(ptr.get(), b * t * d),
                std::slice::from_raw_parts_mut(dptr.get(), b * chunks * d),
            )
        };
        walk(gamma, u, out, &mut state[..w], bi * t * d, c0, d, s0..s1, dir);
        for s in s0..s1 {
            let o = bi * t * d + s * d + c0;
            for c in 0..w {
                prod[c] = prod[c] * gamma[o + c];
            }
        }
        decay[(bi * chunks + ci) * d + c0..(bi * chunks + ci) * d + c1].copy_from_slice(&prod[..w]);
    });
    decay
}

/// The state carried into each chunk, sequentially over chunks (cheap: b·chunks·d values).
fn chunk_carries<T: Elem>(gamma: &[T], init: &[T], g: Chunking, dir: Direction, out: &[T], decay: &[T]) -> Vec<T> {
    let Chunking {
        b, t, d, chunks, len, ..
    } = g;
    let mut carry_in = vec![T::ZERO; b * chunks * d];
    for bi in 0..b {
        let mut carry: Vec<T> = init[bi * d..(bi + 1) * d].to_vec();
        let order: Vec<usize> = match dir {
            Direction::Forward => (0..chunks).collect(),
            Direction::Backward => (0..chunks).rev().collect(),
        };
        for ci in order {
            let (s0, s1) = (ci * len, ((ci + 1) * len).min(t));
            carry_in[(bi * chunks + ci) * d..(bi * chunks + ci + 1) * d].copy_from_slice(&carry);
            let dec = &decay[(bi * chunks + ci) * d..(bi * chunks + ci + 1) * d];
            match dir {
                // h at the chunk's end = local end + (product of the chunk's γ) · carry.
                Direction::Forward => {
                    let end = &out[bi * t * d + (s1 - 1) * d..bi * t * d + s1 * d];
                    for c in 0..d {
                        carry[c] = end[c] + dec[c] * carry[c];
                    }
                }
                // The carry into step s0-1 is γ_{s0}·g_{s0}, where the true g_{s0} is the local
                // one plus the incoming carry decayed through γ_{s0+1..s1-1}; so it is
                // γ_{s0}·local + (product of the whole chunk's γ)·carry.
                Direction::Backward => {
                    let g0 = &gamma[bi * t * d + s0 * d..bi * t * d + (s0 + 1) * d];
                    let first = &out[bi * t * d + s0 * d..bi * t * d + (s0 + 1) * d];
                    for c in 0..d {
                        carry[c] = first[c] * g0[c] + dec[c] * carry[c];
                    }
                }
            }
        }
    }
    carry_in
}

/// Pass 2: add the carried-in state, decayed through each step.
fn add_carries<T: Elem>(gamma: &[T], g: Chunking, dir: Direction, out: &mut [T], carry_in: &[T]) {
    let Chunking { b, t, d, chunks, .. } = g;
    let ptr = Out(out.as_mut_ptr());
    (0..g.jobs()).into_par_iter().for_each(|job| {
        let Span { bi, ci, c0, c1, s0, s1 } = g.span(job);
        let w = c1 - c0;
        let mut acc = [T::ZERO; BLOCK];
        acc[..w].copy_from_slice(&carry_in[(bi * chunks + ci) * d + c0..(bi * chunks + ci) * d + c1]);
        // SAFETY: job (bi, ci, blk) writes only rows bi, steps s0..s1, channels c0..c1.
        let out = unsafe { std::slice::from_raw_parts_mut(ptr.get(), b * t * d) };
        match dir {
            Direction::Forward => {
                for s in s0..s1 {
                    let o = bi * t * d + s * d + c0;
                    for c in 0..w {
                        acc[c] = acc[c] * gamma[o + c];
                        out[o + c] = out[o + c] + acc[c];
                    }
                }
            }
            Direction::Backward => {
                for s in (s0..s1).rev() {
                    let o = bi * t * d + s * d + c0;
                    for c in 0..w {
                        out[o + c] = out[o + c] + acc[c];
                        acc[c] = acc[c] * gamma[o + c];
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiled_and_chunked_agree_with_the_reference_in_both_directions() {
        let (b, t, d) = (3, 1001, 70);
        let n = b * t * d;
        // Deterministic pseudo-random inputs without a dependency.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        let gamma: Vec<f64> = (0..n).map(|_| 0.5 + 0.5 * next()).collect();
        let u: Vec<f64> = (0..n).map(|_| next() - 0.5).collect();
        let h0: Vec<f64> = (0..b * d).map(|_| next() - 0.5).collect();
        let zeros = vec![0.0; b * d];
        for dir in [Direction::Forward, Direction::Backward] {
            let init = if dir == Direction::Forward { &h0 } else { &zeros };
            let want = scan_with(&gamma, &u, init, (b, t, d), dir, Strategy::Tiled);
            for chunks in [1, 2, 7, 64, 1001, 5000] {
                let got = scan_with(&gamma, &u, init, (b, t, d), dir, Strategy::Chunked(chunks));
                let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                assert!(err < 1e-12, "{dir:?} with {chunks} chunks: max error {err:e}");
            }
        }
        // And the tiled forward is the reference itself.
        let reference = crate::reference_scan(&gamma, &u, &h0, (b, t, d));
        assert_eq!(
            scan_with(&gamma, &u, &h0, (b, t, d), Direction::Forward, Strategy::Tiled),
            reference
        );
    }
}
