// The MM-Rec scan h_t = γ_t ⊙ h_{t-1} + u_t (DESIGN §3) and its adjoint on the GPU.
//
// One kernel shape serves every B·D and T: a single-pass chunked scan with decoupled
// look-back (Merrill & Garland, 2016). A tile is 32 channels (one warp across d, so every
// load is one coalesced row segment) by CHUNK time steps; each of the tile's warps holds
// STEPS consecutive steps of its 32 channels in registers. The tile
//   1. reduces its steps to one affine map h ↦ A·h + B per channel (A = Πγ),
//   2. publishes that aggregate, looks back over earlier tiles of the same channels for
//      the state entering the chunk, and publishes its own inclusive state,
//   3. replays its steps from the registers, writing every state.
// γ and u are read once and h written once: the bytes of a copy, whatever B·D is. When
// B·D is large the look-back finds its predecessor finished and costs one flag read; when
// B·D is small and T long, the chunks give the GPU its parallelism. Tiles take their chunk
// from an atomic ticket in launch order, so a tile only ever waits for tiles that have
// already started (no deadlock whatever the scheduler does). Arithmetic is f32 for f32 and
// bf16 inputs alike.

#include <cuda_bf16.h>
#include <stdint.h>

#define LANES 32
#define WARPS 8
#define STEPS 16
#define CHUNK (WARPS * STEPS)

// Flag values for a (tile, lane) slot of the look-back scratch.
#define FLAG_NONE 0u
#define FLAG_AGGREGATE 1u
#define FLAG_INCLUSIVE 2u

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Scratch for one launch, zeroed by the caller: a ticket counter, then per (tile, lane)
// a flag, the aggregate (A, B) and the inclusive state.
struct Scratch {
    unsigned *ticket;
    volatile unsigned *flag;
    volatile float *agg_a, *agg_b, *incl;
};

__device__ __forceinline__ Scratch scratch(unsigned *base, int slots) {
    Scratch s;
    s.ticket = base;
    s.flag = base + 1;
    float *f = reinterpret_cast<float *>(base + 1 + slots);
    s.agg_a = f;
    s.agg_b = f + slots;
    s.incl = f + 2 * slots;
    return s;
}

// Where a tile sits: its channel group and its chunk (in processing order).
struct Tile {
    int chunk, b, d, lane, warp;
    bool valid_channel;
};

__device__ __forceinline__ Tile tile_of(unsigned ticket, int groups, int groups_per_row, int D) {
    Tile t;
    t.chunk = ticket / groups;
    int g = ticket % groups;
    t.b = g / groups_per_row;
    t.lane = threadIdx.x % LANES;
    t.warp = threadIdx.x / LANES;
    t.d = (g % groups_per_row) * LANES + t.lane;
    t.valid_channel = t.d < D;
    return t;
}

// Steps 2 of the header: warp 0 turns the per-warp aggregates in `sa`/`sb` into the state
// entering each warp's steps, in `sx`. `init` is the state before the first chunk.
__device__ void carry_in(const Tile &t, unsigned ticket, int groups, Scratch s, float init,
                         float (*sa)[LANES], float (*sb)[LANES], float (*sx)[LANES]) {
    if (t.warp == 0) {
        float a = 1.f, b = 0.f;
        for (int w = 0; w < WARPS; ++w) {  // chunk map = warp maps applied in order
            b = sa[w][t.lane] * b + sb[w][t.lane];
            a = sa[w][t.lane] * a;
        }
        int slot = ticket * LANES + t.lane;
        float x;
        if (t.chunk == 0) {
            x = init;
        } else {
            s.agg_a[slot] = a;
            s.agg_b[slot] = b;
            __threadfence();
            s.flag[slot] = FLAG_AGGREGATE;
            // Walk back over the same channels' earlier chunks, composing aggregates until
            // an inclusive state is found.
            float ca = 1.f, cb = 0.f;
            int prev = slot - groups * LANES;
            for (;;) {
                unsigned f;
                while ((f = s.flag[prev]) == FLAG_NONE) {
                }
                __threadfence();
                if (f == FLAG_INCLUSIVE) {
                    x = ca * s.incl[prev] + cb;
                    break;
                }
                cb = ca * s.agg_b[prev] + cb;
                ca = ca * s.agg_a[prev];
                prev -= groups * LANES;
            }
        }
        s.incl[slot] = a * x + b;
        __threadfence();
        s.flag[slot] = FLAG_INCLUSIVE;
        for (int w = 0; w < WARPS; ++w) {
            sx[w][t.lane] = x;
            x = sa[w][t.lane] * x + sb[w][t.lane];
        }
    }
    __syncthreads();
}

__device__ __forceinline__ unsigned take_ticket(unsigned *counter) {
    __shared__ unsigned ticket;
    if (threadIdx.x == 0) ticket = atomicAdd(counter, 1u);
    __syncthreads();
    return ticket;
}

// The skeleton of every scan here: position `k` of a thread's steps is time ti (forward:
// chunk-major from 0; reverse: from T-1 down). `load(i, ti, g, x)` gives the gate and input
// at time ti (i: the flat index of (b, ti, d)), `store(i, ti, state)` takes the result,
// and `init_row` [B, D] holds the state before the first step (null: zeros).
template <bool REVERSE, typename I, typename Load, typename Store>
__device__ void scan_tiles(int B, int Tn, int D, unsigned *scratch_base, const I *init_row,
                           Load load, Store store) {
    int groups_per_row = (D + LANES - 1) / LANES;
    int groups = B * groups_per_row;
    int chunks = (Tn + CHUNK - 1) / CHUNK;
    Scratch s = scratch(scratch_base, groups * chunks * LANES);
    unsigned ticket = take_ticket(s.ticket);
    Tile t = tile_of(ticket, groups, groups_per_row, D);
    int k0 = t.chunk * CHUNK + t.warp * STEPS;
    size_t base = (size_t)t.b * Tn * D + t.d;
    float g[STEPS], x[STEPS];
#pragma unroll
    for (int k = 0; k < STEPS; ++k) {
        int ti = REVERSE ? Tn - 1 - (k0 + k) : k0 + k;
        g[k] = 1.f;  // identity steps past either end
        x[k] = 0.f;
        if (t.valid_channel && ti >= 0 && ti < Tn) load(base + (size_t)ti * D, ti, g[k], x[k]);
    }
    float a = 1.f, b = 0.f;
#pragma unroll
    for (int k = 0; k < STEPS; ++k) {
        b = g[k] * b + x[k];
        a = g[k] * a;
    }
    __shared__ float sa[WARPS][LANES], sb[WARPS][LANES], sx[WARPS][LANES];
    sa[t.warp][t.lane] = a;
    sb[t.warp][t.lane] = b;
    __syncthreads();
    float init = t.valid_channel && init_row ? to_f(init_row[(size_t)t.b * D + t.d]) : 0.f;
    carry_in(t, ticket, groups, s, init, sa, sb, sx);
    float state = sx[t.warp][t.lane];
#pragma unroll
    for (int k = 0; k < STEPS; ++k) {
        state = g[k] * state + x[k];
        int ti = REVERSE ? Tn - 1 - (k0 + k) : k0 + k;
        if (t.valid_channel && ti >= 0 && ti < Tn) store(base + (size_t)ti * D, ti, state);
    }
}

// The adjoint's gate at time ti is γ_{ti+1}; past the end it is 0 (g_T = 0).
template <typename T>
__device__ __forceinline__ float next_gate(const T *gamma, size_t i, int ti, int Tn, int D) {
    return ti + 1 < Tn ? to_f(gamma[i + D]) : 0.f;
}

#define INSTANTIATE(T, SUFFIX)                                                                      \
    /* Forward: h = scan(γ, u, h0) over [B, T, D]; h0 [B, D].                         */      \
    extern "C" __global__ void __launch_bounds__(WARPS * LANES)                                     \
        mmrec_scan_fwd_##SUFFIX(const T *gamma, const T *u, const T *h0, T *h, int B, int Tn,   \
                                int D, unsigned *scratch) {                                         \
        scan_tiles<false>(                                                                          \
            B, Tn, D, scratch, h0,                                                                  \
            [&](size_t i, int, float &g, float &x) { g = to_f(gamma[i]); x = to_f(u[i]); },         \
            [&](size_t i, int, float state) { h[i] = from_f<T>(state); });                          \
    }                                                                                               \
    /* Backward, fused: the adjoint g_t = dy_t + γ_{t+1} g_{t+1} from the end, and             */  \
    /* dγ_t = g_t h_{t-1} (h_{-1} = h0): dγ to out[0], du = g to out[1], each [B, T, D], in  */  \
    /* the order (γ, u) of the inputs, so a stacked (γ, u) gets its gradient as one tensor.  */  \
    extern "C" __global__ void __launch_bounds__(WARPS * LANES)                                     \
        mmrec_scan_bwd_##SUFFIX(const T *dy, const T *gamma, const T *h, const T *h0, T *out, int B, \
                                int Tn, int D, unsigned *scratch) {                                 \
        size_t n = (size_t)B * Tn * D;                                                              \
        scan_tiles<true>(                                                                           \
            B, Tn, D, scratch, (const float *)nullptr,                                                             \
            [&](size_t i, int ti, float &g, float &x) {                                             \
                g = next_gate(gamma, i, ti, Tn, D);                                                 \
                x = to_f(dy[i]);                                                                    \
            },                                                                                      \
            [&](size_t i, int ti, float state) {                                                    \
                /* h0's index only at t = 0: a 64-bit division per element cost bandwidth. */     \
                float prev = ti > 0 ? to_f(h[i - D])                                                \
                                    : to_f(h0[(i / ((size_t)Tn * D)) * D + i % D]);                 \
                out[i] = from_f<T>(state * prev);                                                   \
                out[n + i] = from_f<T>(state);                                                      \
            });                                                                                     \
    }                                                                                               \
    /* The adjoint alone (g only), as ScanAdjoint on the CPU: dy and γ in, g out. */               \
    extern "C" __global__ void __launch_bounds__(WARPS * LANES)                                     \
        mmrec_scan_adjoint_##SUFFIX(const T *dy, const T *gamma, T *g_out, int B, int Tn, int D,    \
                                    unsigned *scratch) {                                            \
        scan_tiles<true>(                                                                           \
            B, Tn, D, scratch, (const float *)nullptr,                                                             \
            [&](size_t i, int ti, float &g, float &x) {                                             \
                g = next_gate(gamma, i, ti, Tn, D);                                                 \
                x = to_f(dy[i]);                                                                    \
            },                                                                                      \
            [&](size_t i, int, float state) { g_out[i] = from_f<T>(state); });                      \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
