// Softmax cross-entropy over the vocabulary in one pass per row, forward and backward, as
// llm.c fuses its classifier: the log-softmax is never written out (at the `medium` shape
// it would be 32768 × 8192 f32, 1 GiB, read and written several times by composed ops).
//
// One block per row. Forward: an online max/sum-of-exponentials over the row (f32 whatever
// the logits' dtype), then row r's loss (lse − x[target]) · mask and its lse. Backward:
// dlogits = coef · (softmax − onehot(target)), with coef = upstream gradient · mask and the
// forward's lse, in one read and one write of the row.

#include <cuda_bf16.h>
#include <stdint.h>

#define THREADS 512

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Merge two (max, sum of exp(x − max)) pairs.
__device__ __forceinline__ void merge(float &m, float &s, float m2, float s2) {
    float mx = fmaxf(m, m2);
    s = (m == -INFINITY ? 0.f : s * __expf(m - mx)) + (m2 == -INFINITY ? 0.f : s2 * __expf(m2 - mx));
    m = mx;
}

// The row's log-sum-exp, the same value in every thread.
template <typename T>
__device__ float row_lse(const T *x, int V) {
    float m = -INFINITY, s = 0.f;
    for (int j = threadIdx.x; j < V; j += THREADS) {
        float v = to_f(x[j]);
        if (v > m) {
            s = (m == -INFINITY ? 0.f : s * __expf(m - v)) + 1.f;
            m = v;
        } else {
            s += __expf(v - m);
        }
    }
    for (int off = 16; off > 0; off >>= 1) merge(m, s, __shfl_xor_sync(0xffffffff, m, off), __shfl_xor_sync(0xffffffff, s, off));
    __shared__ float sm[THREADS / 32], ss[THREADS / 32];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    m = lane < THREADS / 32 ? sm[lane] : -INFINITY;
    s = lane < THREADS / 32 ? ss[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) merge(m, s, __shfl_xor_sync(0xffffffff, m, off), __shfl_xor_sync(0xffffffff, s, off));
    return m + __logf(s);
}

// out[r] = ((lse − x[target]) · mask, lse); a target outside the vocabulary gives NaN on an
// unmasked row, so the trainer's non-finite guard sees it.
template <typename T>
__device__ void ce_forward(const T *logits, const uint32_t *targets, const float *mask, float *out, int V) {
    size_t r = blockIdx.x;
    const T *x = logits + r * V;
    float lse = row_lse(x, V);
    if (threadIdx.x == 0) {
        float mk = mask[r];
        uint32_t t = targets[r];
        float nll = t < (uint32_t)V ? lse - to_f(x[t]) : NAN;
        out[2 * r] = mk == 0.f ? 0.f : nll * mk;
        out[2 * r + 1] = lse;
    }
}

// coef_lse[r] = (coef, lse) for row r.
template <typename T>
__device__ void ce_backward(const T *logits, const uint32_t *targets, const float *coef_lse, T *dlogits, int V) {
    size_t r = blockIdx.x;
    const T *x = logits + r * V;
    T *dx = dlogits + r * V;
    float coef = coef_lse[2 * r], lse = coef_lse[2 * r + 1];
    uint32_t t = targets[r];
    for (int j = threadIdx.x; j < V; j += THREADS) {
        float p = coef == 0.f ? 0.f : __expf(to_f(x[j]) - lse);
        dx[j] = from_f<T>(coef * (p - (j == (int)t ? 1.f : 0.f)));
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS) mmrec_ce_fwd_##SUFFIX(                    \
        const T *logits, const uint32_t *targets, const float *mask, float *out, int V) {           \
        ce_forward<T>(logits, targets, mask, out, V);                                               \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS) mmrec_ce_bwd_##SUFFIX(                    \
        const T *logits, const uint32_t *targets, const float *coef_lse, T *dlogits, int V) {       \
        ce_backward<T>(logits, targets, coef_lse, dlogits, V);                                      \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
