// Element-wise chains of the MM-Rec block fused into one pass each, forward and backward
// (DESIGN §1 steps 1, 3-4; §6 for the precisions). candle ran each of these as 8-25
// separate kernels over [B, T, D] tensors, which made them most of a training step.
//
// RMSNorm: y = w ⊙ x / r, r = sqrt(mean(x²) + 1e-6), statistics in f32. Backward:
// dx = (w ⊙ dy − n · mean(w ⊙ dy ⊙ n)) / r with n = x / r, and dw = Σ_rows dy ⊙ n.
//
// MDI gate: γ = clamp(σ(a) σ(b), 1e-6, 1 − 1e-6), u = (1 − γ) σ(g) z, with a, b the two
// gate MLPs' outputs and z, g columns 2D.. and 3D.. of the fused projection [q k z g]; γ
// and u in f32 whatever the inputs' dtype (bf16 would round every γ above ~0.998 to 1).

#include <cuda_bf16.h>
#include <stdint.h>

#define NORM_THREADS 256
#define NORM_WARPS (NORM_THREADS / 32)
#define NORM_MAX_WIDTH 2048  // 32 lanes × the largest PER_LANE instantiated below

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
    return v;
}

// RMSNorm runs one warp per row: lane l holds columns l, l + 32, … (PER_LANE of them, a
// compile-time count so they stay in registers) and the row's sums are warp shuffles. A
// block per row with block-wide reductions spent most of its time in barriers (5.4 ms a
// `medium` step for the backward, 4× its memory traffic).
template <typename T, int PER_LANE>
__device__ void rmsnorm_forward(const T *x, const T *w, T *y, int N, int D) {
    const int lane = threadIdx.x % 32;
    for (size_t r = (size_t)blockIdx.x * NORM_WARPS + threadIdx.x / 32; r < (size_t)N; r += (size_t)gridDim.x * NORM_WARPS) {
        const T *xr = x + r * D;
        float v[PER_LANE], ss = 0.f;
#pragma unroll
        for (int k = 0; k < PER_LANE; ++k) {
            int j = lane + 32 * k;
            v[k] = j < D ? to_f(xr[j]) : 0.f;
            ss += v[k] * v[k];
        }
        float inv = rsqrtf(warp_sum(ss) / D + 1e-6f);
#pragma unroll
        for (int k = 0; k < PER_LANE; ++k) {
            int j = lane + 32 * k;
            if (j < D) y[r * D + j] = from_f<T>(v[k] * inv * to_f(w[j]));
        }
    }
}

// dx into dx, or (with dx null) dw: each warp sums its rows' dy ⊙ n in registers, the
// block's warps meet in shared memory, and one atomic per column and block goes to dw
// (f32, zeroed by the caller). Two launches, since the outputs differ in dtype and shape.
template <typename T, int PER_LANE>
__device__ void rmsnorm_backward(const T *x, const T *w, const T *dy, T *dx, float *dw, int N, int D) {
    __shared__ float block_dw[NORM_MAX_WIDTH];
    const int lane = threadIdx.x % 32;
    float dw_acc[PER_LANE];
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) dw_acc[k] = 0.f;
    for (size_t r = (size_t)blockIdx.x * NORM_WARPS + threadIdx.x / 32; r < (size_t)N; r += (size_t)gridDim.x * NORM_WARPS) {
        const T *xr = x + r * D, *dyr = dy + r * D;
        float v[PER_LANE], g[PER_LANE], ss = 0.f, dot = 0.f;
#pragma unroll
        for (int k = 0; k < PER_LANE; ++k) {
            int j = lane + 32 * k;
            bool in = j < D;
            v[k] = in ? to_f(xr[j]) : 0.f;
            g[k] = in ? to_f(dyr[j]) : 0.f;
            ss += v[k] * v[k];
            dot += in ? g[k] * to_f(w[j]) * v[k] : 0.f;
        }
        float inv = rsqrtf(warp_sum(ss) / D + 1e-6f);
        float mean_wgn = warp_sum(dot) * inv / D;  // mean(w ⊙ dy ⊙ n)
#pragma unroll
        for (int k = 0; k < PER_LANE; ++k) {
            int j = lane + 32 * k;
            dw_acc[k] += g[k] * v[k] * inv;
            if (dx && j < D) dx[r * D + j] = from_f<T>((g[k] * to_f(w[j]) - v[k] * inv * mean_wgn) * inv);
        }
    }
    if (!dw) return;
    for (int j = threadIdx.x; j < D; j += blockDim.x) block_dw[j] = 0.f;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        int j = lane + 32 * k;
        if (j < D) atomicAdd(&block_dw[j], dw_acc[k]);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < D; j += blockDim.x) atomicAdd(&dw[j], block_dw[j]);
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

#define GAMMA_LO 1e-6f
#define GAMMA_HI (1.f - 1e-6f)

// a, b: [N, D]; p: the projection [N, 4D]. out: γ [N, D] then u [N, D], f32.
template <typename T>
__device__ void gate_forward(const T *a, const T *b, const T *p, float *out, int N, int D) {
    size_t n = (size_t)N * D;
    // Rows over blocks and columns over threads: no per-element division by D (a 64-bit
    // division is emulated in software and made this kernel compute-bound).
    for (size_t r = blockIdx.x; r < (size_t)N; r += gridDim.x)
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        size_t i = r * D + c;
        float z = to_f(p[r * 4 * D + 2 * D + c]), g = to_f(p[r * 4 * D + 3 * D + c]);
        float gamma = fminf(fmaxf(sigmoid(to_f(a[i])) * sigmoid(to_f(b[i])), GAMMA_LO), GAMMA_HI);
        out[i] = gamma;
        out[n + i] = (1.f - gamma) * sigmoid(g) * z;
    }
}

// grad: dγ [N, D] then du [N, D] (f32). out, block after block: da [N, D], db [N, D], then
// dp [N, 4D] (per row dq = 0 | dk = 0 | dz | dg), so each is a contiguous slice of it and
// no copy is needed to hand them to autograd.
template <typename T>
__device__ void gate_backward(const T *a, const T *b, const T *p, const float *grad, T *out, int N, int D) {
    size_t n = (size_t)N * D;
    for (size_t r = blockIdx.x; r < (size_t)N; r += gridDim.x)
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        size_t i = r * D + c;
        float z = to_f(p[r * 4 * D + 2 * D + c]), sg = sigmoid(to_f(p[r * 4 * D + 3 * D + c]));
        float sa = sigmoid(to_f(a[i])), sb = sigmoid(to_f(b[i]));
        float raw = sa * sb, gamma = fminf(fmaxf(raw, GAMMA_LO), GAMMA_HI);
        float dgamma = grad[i], du = grad[n + i];
        float draw = (raw >= GAMMA_LO && raw <= GAMMA_HI) ? dgamma - du * sg * z : 0.f;
        out[i] = from_f<T>(draw * sb * sa * (1.f - sa));
        out[n + i] = from_f<T>(draw * sa * sb * (1.f - sb));
        T *dp = out + 2 * n + r * 4 * D;
        dp[c] = from_f<T>(0.f);
        dp[D + c] = from_f<T>(0.f);
        dp[2 * D + c] = from_f<T>(du * (1.f - gamma) * sg);
        dp[3 * D + c] = from_f<T>(du * (1.f - gamma) * z * sg * (1.f - sg));
    }
}

// RMSNorm kernels per row width: mmrec_rmsnorm_{fwd,bwd}_<PER_LANE>_<dtype> serves D ≤ 32 · PER_LANE.
#define INSTANTIATE_NORM(T, SUFFIX, P)                                                                \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                        \
        mmrec_rmsnorm_fwd_##P##_##SUFFIX(const T *x, const T *w, T *y, int N, int D) {                \
        rmsnorm_forward<T, P>(x, w, y, N, D);                                                         \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                        \
        mmrec_rmsnorm_bwd_##P##_##SUFFIX(const T *x, const T *w, const T *dy, T *dx, float *dw, int N, \
                                         int D) {                                                     \
        rmsnorm_backward<T, P>(x, w, dy, dx, dw, N, D);                                               \
    }

#define INSTANTIATE(T, SUFFIX)                                                                        \
    INSTANTIATE_NORM(T, SUFFIX, 2)                                                                    \
    INSTANTIATE_NORM(T, SUFFIX, 4)                                                                    \
    INSTANTIATE_NORM(T, SUFFIX, 8)                                                                    \
    INSTANTIATE_NORM(T, SUFFIX, 16)                                                                   \
    INSTANTIATE_NORM(T, SUFFIX, 32)                                                                   \
    INSTANTIATE_NORM(T, SUFFIX, 64)                                                                   \
    extern "C" __global__ void mmrec_gate_fwd_##SUFFIX(const T *a, const T *b, const T *p, float *out,  \
                                                       int N, int D) {                                \
        gate_forward<T>(a, b, p, out, N, D);                                                          \
    }                                                                                                 \
    extern "C" __global__ void mmrec_gate_bwd_##SUFFIX(const T *a, const T *b, const T *p,             \
                                                       const float *grad, T *out, int N, int D) {     \
        gate_backward<T>(a, b, p, grad, out, N, D);                                                   \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)

// AdamW in two in-place passes over f32 tensors (the trainer's master weights and moments),
// instead of fifteen allocating element-wise ops per parameter tensor. ctl [3] (written by
// mmrec_adamw_control): the gradient scale s, a skip flag, the norm; read on the device so
// that the host never waits for the norm or the loss.
// moments [2, n] (m then v), g [n]: m ← β1 m + (1 − β1) s g, v ← β2 v + (1 − β2) (s g)².
extern "C" __global__ void mmrec_adamw_moments(float *mv, const float *g, const float *ctl, unsigned long long n,
                                               float b1, float b2) {
    if (ctl[1] != 0.f) return;
    const float scale = ctl[0];
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float gi = g[i] * scale;
        mv[i] = b1 * mv[i] + (1.f - b1) * gi;
        mv[n + i] = b2 * mv[n + i] + (1.f - b2) * gi * gi;
    }
}

// acc[0] += Σ g²: one launch per gradient tensor towards the global gradient norm (the
// composed square, sum, cast and add were four launches and a full-size temporary each).
extern "C" __global__ void mmrec_add_squares(const float *g, float *acc, unsigned long long n) {
    float s = 0.f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        s += g[i] * g[i];
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
    if (threadIdx.x % 32 == 0) atomicAdd(acc, s);
}

// ctl = [accum · min(1, clip / norm), skip, norm] with norm = sqrt(Σ g²) · accum; skip when
// the loss or the norm is not finite (adamw.rs `control_values` is the same on the CPU).
extern "C" __global__ void mmrec_adamw_control(const float *squares, const float *loss, float *ctl, float accum,
                                               float clip) {
    const float norm = sqrtf(squares[0]) * accum;
    const bool finite = isfinite(loss[0]) && isfinite(norm);
    const float clipped = (clip > 0.f && norm > clip) ? clip / norm : 1.f;
    ctl[0] = accum * clipped;
    ctl[1] = finite ? 0.f : 1.f;
    ctl[2] = norm;
}

// θ ← θ · decay − lr · (m / c1) / (sqrt(v / c2) + ε), unless ctl says skip.
extern "C" __global__ void mmrec_adamw_apply(float *theta, const float *mv, const float *ctl, unsigned long long n,
                                             float lr, float decay, float c1, float c2, float eps) {
    if (ctl[1] != 0.f) return;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float update = (mv[i] / c1) / (sqrtf(mv[n + i] / c2) + eps);
        theta[i] = theta[i] * decay - lr * update;
    }
}

// GELU (erf form), y = x Φ(x), and its derivative Φ(x) + x φ(x), in f32 per element.
template <typename T>
__device__ void gelu(const T *x, const T *dy, T *out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float v = to_f(x[i]);
        float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
        if (dy) {
            float pdf = 0.39894228040143268f * __expf(-0.5f * v * v);
            out[i] = from_f<T>(to_f(dy[i]) * (cdf + v * pdf));
        } else {
            out[i] = from_f<T>(v * cdf);
        }
    }
}

#define INSTANTIATE_GELU(T, SUFFIX)                                                                   \
    extern "C" __global__ void mmrec_gelu_##SUFFIX(const T *x, const T *dy, T *out, unsigned long long n) { \
        gelu<T>(x, dy, out, n);                                                                       \
    }

INSTANTIATE_GELU(float, f32)
INSTANTIATE_GELU(__nv_bfloat16, bf16)

// The embedding's backward: dtable[ids[r]] += dy[r] for every row r, accumulated in f32 with
// atomics, one block per row. (candle's index_add walked all N rows sequentially in each of
// only D threads: 32 768 dependent read-modify-writes per thread at the `medium` shape.)
template <typename T>
__device__ void embedding_backward(const uint32_t *ids, const T *dy, float *dtable, int N, int D, int V) {
    for (int r = blockIdx.x; r < N; r += gridDim.x) {
        uint32_t id = ids[r];
        if (id >= (uint32_t)V) continue;  // refused on the host before the forward ran
        for (int j = threadIdx.x; j < D; j += blockDim.x) atomicAdd(&dtable[(size_t)id * D + j], to_f(dy[(size_t)r * D + j]));
    }
}

#define INSTANTIATE_EMBEDDING(T, SUFFIX)                                                              \
    extern "C" __global__ void mmrec_embedding_bwd_##SUFFIX(const uint32_t *ids, const T *dy, float *dtable, \
                                                            int N, int D, int V) {                    \
        embedding_backward<T>(ids, dy, dtable, N, D, V);                                              \
    }

INSTANTIATE_EMBEDDING(float, f32)
INSTANTIATE_EMBEDDING(__nv_bfloat16, bf16)

// Softmax over the last dimension, one warp per row, statistics in f32: y = exp(x − max) /
// Σ exp(x − max); a row that is all −∞ (nothing visible) gives zeros. With `dy`, the
// backward from (y, dy): dx = y ⊙ (dy − Σ y ⊙ dy).
template <typename T>
__device__ void softmax_rows(const T *x, const T *dy, T *out, int N, int E) {
    int lane = threadIdx.x % 32;
    int warps = blockDim.x / 32;
    for (int r = blockIdx.x * warps + threadIdx.x / 32; r < N; r += gridDim.x * warps) {
        const T *xr = x + (size_t)r * E;
        T *outr = out + (size_t)r * E;
        if (dy) {
            const T *dyr = dy + (size_t)r * E;
            float dot = 0.f;
            for (int j = lane; j < E; j += 32) dot += to_f(xr[j]) * to_f(dyr[j]);
            for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, off);
            for (int j = lane; j < E; j += 32) outr[j] = from_f<T>(to_f(xr[j]) * (to_f(dyr[j]) - dot));
            continue;
        }
        float m = -INFINITY;
        for (int j = lane; j < E; j += 32) m = fmaxf(m, to_f(xr[j]));
        for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
        float s = 0.f;
        if (m != -INFINITY) {
            for (int j = lane; j < E; j += 32) s += __expf(to_f(xr[j]) - m);
        }
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
        float inv = s > 0.f ? 1.f / s : 0.f;
        for (int j = lane; j < E; j += 32) outr[j] = from_f<T>(m == -INFINITY ? 0.f : __expf(to_f(xr[j]) - m) * inv);
    }
}

#define INSTANTIATE_SOFTMAX(T, SUFFIX)                                                                \
    extern "C" __global__ void mmrec_softmax_##SUFFIX(const T *x, const T *dy, T *out, int N, int E) { \
        softmax_rows<T>(x, dy, out, N, E);                                                            \
    }

INSTANTIATE_SOFTMAX(float, f32)
INSTANTIATE_SOFTMAX(__nv_bfloat16, bf16)

// out[r, j] = y[r, j] + b[j] over y [N, D]: a linear layer's bias in one pass (a broadcast
// add ran candle's strided kernel; a rank-1 product wrote a full [N, D] tensor first).
template <typename T>
__device__ void bias_add(const T *y, const T *b, T *out, size_t n, unsigned int d) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = from_f<T>(to_f(y[i]) + to_f(b[i % d]));
}

#define INSTANTIATE_BIAS(T, SUFFIX)                                                                   \
    extern "C" __global__ void mmrec_bias_add_##SUFFIX(const T *y, const T *b, T *out, unsigned long long n, \
                                                       unsigned int d) {                              \
        bias_add<T>(y, b, out, n, d);                                                                 \
    }

INSTANTIATE_BIAS(float, f32)
INSTANTIATE_BIAS(__nv_bfloat16, bf16)
