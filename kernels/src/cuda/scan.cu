// The MM-Rec scan h_t = γ_t ⊙ h_{t-1} + u_t (DESIGN §3) and its adjoint on the GPU.
//
// One kernel shape serves every B·D and T: a single-pass chunked scan with decoupled
// look-back (Merrill & Garland, 2016). A tile is LANES·VEC channels (one warp across d,
// each lane VEC adjacent channels, so every load is one coalesced row segment of 4-, 8- or
// 16-byte accesses) by WARPS·STEPS time steps; each of the tile's warps holds STEPS consecutive
// steps of its channels in registers. The tile
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
//
// The look-back scratch is kept between launches (no memset, no allocation per launch):
// its ticket counter only grows, each launch subtracting the tickets handed out before it
// (`ticket_base`), and a flag counts as set only when it carries this launch's `epoch`.

#include <cuda_bf16.h>
#include <stdint.h>

#define LANES 32

// States of a channel's look-back word, below the launch's epoch.
#define FLAG_AGGREGATE 1u
#define FLAG_INCLUSIVE 2u

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// VEC adjacent elements of T as one aligned access.
template <int BYTES> struct Word;
template <> struct Word<2> { typedef unsigned short type; };
template <> struct Word<4> { typedef unsigned type; };
template <> struct Word<8> { typedef uint2 type; };
template <> struct Word<16> { typedef uint4 type; };

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T *p, float (&out)[VEC]) {
    typedef typename Word<sizeof(T) * VEC>::type W;
    union { W w; T e[VEC]; } v;
    v.w = *reinterpret_cast<const W *>(p);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_f(v.e[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T *p, const float (&in)[VEC]) {
    typedef typename Word<sizeof(T) * VEC>::type W;
    union { W w; T e[VEC]; } v;
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.e[j] = from_f<T>(in[j]);
    *reinterpret_cast<W *>(p) = v.w;
}

// The scratch: a ticket counter, then per (tile, channel) one 16-byte look-back word
// {state, A, B, inclusive state}: the state travels with its values in one access, so a
// look-back step is one L2 round trip and neither side needs a memory fence.
__device__ __forceinline__ uint4 *words_of(unsigned *base) { return reinterpret_cast<uint4 *>(base + 4); }

__device__ __forceinline__ uint4 read_word(const uint4 *p) {
    uint4 w;
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w)
                 : "l"(p));
    return w;
}

__device__ __forceinline__ void write_word(uint4 *p, unsigned state, float a, float b, float x) {
    asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(state), "r"(__float_as_uint(a)),
                 "r"(__float_as_uint(b)), "r"(__float_as_uint(x))
                 : "memory");
}

// Where a tile sits: its channel group and its chunk (in processing order).
struct Tile {
    int chunk, b, d, lane, warp;
    bool valid_channel;
};

template <int VEC>
__device__ __forceinline__ Tile tile_of(unsigned ticket, int groups, int groups_per_row, int D) {
    Tile t;
    t.chunk = ticket / groups;
    int g = ticket % groups;
    t.b = g / groups_per_row;
    t.lane = threadIdx.x % LANES;
    t.warp = threadIdx.x / LANES;
    t.d = (g % groups_per_row) * LANES * VEC + t.lane * VEC;
    t.valid_channel = t.d < D;  // the host picks VEC dividing D
    return t;
}

// Step 2 of the header: warp 0 turns the per-warp aggregates in `sa`/`sb` into the state
// entering each warp's steps, written over `sa`. `x` holds the state before the first chunk.
template <int WARPS, int VEC>
__device__ void carry_in(const Tile &t, unsigned ticket, int groups, uint4 *words, unsigned epoch,
                         float (&x)[VEC], float (*sa)[LANES * VEC], float (*sb)[LANES * VEC]) {
    if (t.warp == 0) {
        int c0 = t.lane * VEC, slot = (ticket * LANES + t.lane) * VEC, stride = groups * LANES * VEC;
        float a[VEC], b[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            a[j] = 1.f;
            b[j] = 0.f;
            for (int w = 0; w < WARPS; ++w) {  // chunk map = warp maps applied in order
                b[j] = sa[w][c0 + j] * b[j] + sb[w][c0 + j];
                a[j] = sa[w][c0 + j] * a[j];
            }
        }
        if (t.chunk > 0) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) write_word(words + slot + j, epoch << 2 | FLAG_AGGREGATE, a[j], b[j], 0.f);
            // Walk back over the same channels' earlier chunks, composing aggregates until
            // an inclusive state is found.
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                float ca = 1.f, cb = 0.f;
                for (int prev = slot + j - stride;; prev -= stride) {
                    uint4 w;
                    do {
                        w = read_word(words + prev);
                    } while ((w.x >> 2) != epoch);
                    if ((w.x & 3u) == FLAG_INCLUSIVE) {
                        x[j] = ca * __uint_as_float(w.w) + cb;
                        break;
                    }
                    cb = ca * __uint_as_float(w.z) + cb;
                    ca = ca * __uint_as_float(w.y);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j)
            write_word(words + slot + j, epoch << 2 | FLAG_INCLUSIVE, 0.f, 0.f, a[j] * x[j] + b[j]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            for (int w = 0; w < WARPS; ++w) {
                float aw = sa[w][c0 + j], bw = sb[w][c0 + j];
                sa[w][c0 + j] = x[j];  // from here on: the state entering warp w
                x[j] = aw * x[j] + bw;
            }
        }
    }
    __syncthreads();
}

__device__ __forceinline__ unsigned take_ticket(unsigned *counter, unsigned ticket_base) {
    __shared__ unsigned ticket;
    if (threadIdx.x == 0) ticket = atomicAdd(counter, 1u) - ticket_base;
    __syncthreads();
    return ticket;
}

// The skeleton of every scan here, for tiles of WARPS warps × STEPS steps: position `k` of
// a thread's steps is time ti (forward: chunk-major from 0; reverse: from T-1 down).
// `load(i, ti, g, x, p)` gives the gates and inputs of VEC channels at time ti (i: the flat
// index of (b, ti, d); p: anything else the store needs, loaded with them so that every
// load is in flight at once), `store(i, ti, p, state)` takes the results, and `init_row`
// [B, D] holds the state before the first step (null: zeros).
template <int WARPS, int STEPS, int VEC, bool REVERSE, typename I, typename Load, typename Store>
__device__ void scan_tiles(int B, int Tn, int D, unsigned *scratch, unsigned ticket_base, unsigned epoch,
                           const I *init_row, Load load, Store store) {
    const int chunk_steps = WARPS * STEPS;
    int groups_per_row = (D + LANES * VEC - 1) / (LANES * VEC);
    int groups = B * groups_per_row;
    unsigned ticket = take_ticket(scratch, ticket_base);
    Tile t = tile_of<VEC>(ticket, groups, groups_per_row, D);
    int k0 = t.chunk * chunk_steps + t.warp * STEPS;
    size_t base = (size_t)t.b * Tn * D + t.d;
    float g[STEPS][VEC], x[STEPS][VEC], p[STEPS][VEC];
#pragma unroll
    for (int k = 0; k < STEPS; ++k) {
        int ti = REVERSE ? Tn - 1 - (k0 + k) : k0 + k;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            g[k][j] = 1.f;  // identity steps past either end
            x[k][j] = 0.f;
        }
        if (t.valid_channel && ti >= 0 && ti < Tn) load(base + (size_t)ti * D, ti, g[k], x[k], p[k]);
    }
    __shared__ float sa[WARPS][LANES * VEC], sb[WARPS][LANES * VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        float a = 1.f, b = 0.f;
#pragma unroll
        for (int k = 0; k < STEPS; ++k) {
            b = g[k][j] * b + x[k][j];
            a = g[k][j] * a;
        }
        sa[t.warp][t.lane * VEC + j] = a;
        sb[t.warp][t.lane * VEC + j] = b;
    }
    __syncthreads();
    float init[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j)
        init[j] = t.valid_channel && init_row ? to_f(init_row[(size_t)t.b * D + t.d + j]) : 0.f;
    carry_in<WARPS, VEC>(t, ticket, groups, words_of(scratch), epoch, init, sa, sb);
    float state[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) state[j] = sa[t.warp][t.lane * VEC + j];
#pragma unroll
    for (int k = 0; k < STEPS; ++k) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) state[j] = g[k][j] * state[j] + x[k][j];
        int ti = REVERSE ? Tn - 1 - (k0 + k) : k0 + k;
        if (t.valid_channel && ti >= 0 && ti < Tn) store(base + (size_t)ti * D, ti, p[k], state);
    }
}

#define SCAN_KERNELS(T, SUFFIX, WARPS, STEPS, VEC)                                                               \
    /* Forward: h = scan(γ, u, h0) over [B, T, D]; h0 [B, D].                         */      \
    extern "C" __global__ void __launch_bounds__(WARPS * LANES)                                     \
        mmrec_scan_fwd_##SUFFIX##_w##WARPS##s##STEPS##v##VEC(const T *gamma, const T *u, const T *h0, T *h, int B,      \
                                         int Tn, int D, unsigned *scratch, unsigned ticket_base,    \
                                         unsigned epoch) {                                          \
        scan_tiles<WARPS, STEPS, VEC, false>(                                                                     \
            B, Tn, D, scratch, ticket_base, epoch, h0,                                              \
            [&](size_t i, int, float(&g)[VEC], float(&x)[VEC], float(&)[VEC]) {                     \
                load_vec<T, VEC>(gamma + i, g);                                                     \
                load_vec<T, VEC>(u + i, x);                                                         \
            },                                                                                      \
            [&](size_t i, int, const float(&)[VEC], const float(&state)[VEC]) {                     \
                store_vec<T, VEC>(h + i, state);                                                    \
            });                                                                                     \
    }                                                                                               \
    /* Backward, fused: the adjoint g_t = dy_t + γ_{t+1} g_{t+1} from the end, and             */  \
    /* dγ_t = g_t h_{t-1} (h_{-1} = h0): dγ to out[0], du = g to out[1], each [B, T, D], in  */  \
    /* the order (γ, u) of the inputs, so a stacked (γ, u) gets its gradient as one tensor.  */  \
    extern "C" __global__ void __launch_bounds__(WARPS * LANES)                                     \
        mmrec_scan_bwd_##SUFFIX##_w##WARPS##s##STEPS##v##VEC(const T *dy, const T *gamma, const T *h, const T *h0,      \
                                         T *out, int B, int Tn, int D, unsigned *scratch,           \
                                         unsigned ticket_base, unsigned epoch) {                    \
        size_t n = (size_t)B * Tn * D;                                                              \
        scan_tiles<WARPS, STEPS, VEC, true>(                                                                      \
            B, Tn, D, scratch, ticket_base, epoch, (const float *)nullptr,                          \
            [&](size_t i, int ti, float(&g)[VEC], float(&x)[VEC], float(&prev)[VEC]) {              \
                /* The adjoint's gate at ti is γ_{ti+1}, 0 past the end (g_T = 0). */              \
                if (ti + 1 < Tn) load_vec<T, VEC>(gamma + i + D, g);                                \
                else for (int j = 0; j < VEC; ++j) g[j] = 0.f;                                      \
                load_vec<T, VEC>(dy + i, x);                                                        \
                /* h0's index only at t = 0: a 64-bit division per element cost bandwidth. */     \
                if (ti > 0) load_vec<T, VEC>(h + i - D, prev);                                      \
                else for (int j = 0; j < VEC; ++j)                                                  \
                    prev[j] = to_f(h0[(i / ((size_t)Tn * D)) * D + i % D + j]);                     \
            },                                                                                      \
            [&](size_t i, int, const float(&prev)[VEC], const float(&state)[VEC]) {                 \
                float dgamma[VEC];                                                                  \
                for (int j = 0; j < VEC; ++j) dgamma[j] = state[j] * prev[j];                       \
                store_vec<T, VEC>(out + i, dgamma);                                                 \
                store_vec<T, VEC>(out + n + i, state);                                              \
            });                                                                                     \
    }                                                                                               \
    /* The adjoint alone (g only), as ScanAdjoint on the CPU: dy and γ in, g out. */               \
    extern "C" __global__ void __launch_bounds__(WARPS * LANES)                                     \
        mmrec_scan_adjoint_##SUFFIX##_w##WARPS##s##STEPS##v##VEC(const T *dy, const T *gamma, T *g_out, int B, int Tn,  \
                                             int D, unsigned *scratch, unsigned ticket_base,        \
                                             unsigned epoch) {                                      \
        scan_tiles<WARPS, STEPS, VEC, true>(                                                                      \
            B, Tn, D, scratch, ticket_base, epoch, (const float *)nullptr,                          \
            [&](size_t i, int ti, float(&g)[VEC], float(&x)[VEC], float(&)[VEC]) {                  \
                if (ti + 1 < Tn) load_vec<T, VEC>(gamma + i + D, g);                                \
                else for (int j = 0; j < VEC; ++j) g[j] = 0.f;                                      \
                load_vec<T, VEC>(dy + i, x);                                                        \
            },                                                                                      \
            [&](size_t i, int, const float(&)[VEC], const float(&state)[VEC]) {                     \
                store_vec<T, VEC>(g_out + i, state);                                                \
            });                                                                                     \
    }

// The tile shapes and widths the host chooses from (kernels/src/cuda.rs, `Config::pick`),
// each the fastest of a sweep (bench/scan_tune.cu) in its regime.
#ifndef SCAN_TUNING
SCAN_KERNELS(float, f32, 8, 8, 2)
SCAN_KERNELS(float, f32, 8, 8, 1)
SCAN_KERNELS(float, f32, 16, 16, 1)
SCAN_KERNELS(float, f32, 4, 16, 2)
SCAN_KERNELS(float, f32, 4, 16, 1)
SCAN_KERNELS(float, f32, 16, 8, 1)
SCAN_KERNELS(__nv_bfloat16, bf16, 4, 8, 1)
SCAN_KERNELS(__nv_bfloat16, bf16, 8, 32, 1)
SCAN_KERNELS(__nv_bfloat16, bf16, 4, 8, 4)
SCAN_KERNELS(__nv_bfloat16, bf16, 16, 8, 1)
#endif
