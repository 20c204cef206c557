// refdpo's fused CUDA kernels, compiled to PTX by build.rs under `--features cuda` and loaded by
// `fused/launch.rs`. Each kernel mirrors a CPU implementation in `fused/*.rs` loop for loop (the
// tests hold those to the composed candle ops), and this very source also runs on the CPU
// (`emulator/`: built by the host's C++ compiler, held to torch, checked for shared-memory races
// under ThreadSanitizer); every reduction accumulates in f32 (a vocabulary row's sum of exps in
// f64), and a result is rounded to the compute dtype where transformers rounds it. Element counts
// are 32-bit: the callers keep every tensor below 2^31 elements.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define FULL_MASK 0xffffffffu

namespace {

__device__ __forceinline__ float load(const float *p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16 *p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load(const __half *p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float *p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16 *p, size_t i, float v) { p[i] = __float2bfloat16(v); }
__device__ __forceinline__ void store(__half *p, size_t i, float v) { p[i] = __float2half(v); }

// v rounded to T and back: where transformers keeps an intermediate in the compute dtype.
template <typename T> __device__ __forceinline__ float round_to(float v) {
    T t;
    store(&t, 0, v);
    return load(&t, 0);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// The block's sum in every thread (blockDim.x a multiple of 32, at most 1024).
__device__ float block_sum(float v) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads(); // the previous call's readers are done with `part`
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.f;
    return warp_sum(v);
}

// Online softmax state (running max m, sum s of exp(x - m) in S) merged with another. S is f32 for
// a row of attention scores, f64 for a vocabulary row: there the thread holding the row's top
// logit has s near 1 and would drop, in f32, every exp(x − m) below 2^-25, so the log-sum-exp
// came out low on every row (a one-sided error, measured on real SmolLM2-135M logits; BENCHMARKS.md).
template <typename S> __device__ __forceinline__ void merge(float &m, S &s, float m2, S s2) {
    const float mx = fmaxf(m, m2);
    if (mx == -INFINITY) return; // both empty
    s = s * (S)expf(m - mx) + s2 * (S)expf(m2 - mx);
    m = mx;
}

template <typename S> __device__ __forceinline__ void push(float &m, S &s, float v) {
    if (v == -INFINITY) return; // adds exp(−inf) = 0; and −inf − −inf would be NaN
    if (v > m) {
        s = s * (S)expf(m - v) + (S)1;
        m = v;
    } else {
        s += (S)expf(v - m);
    }
}

// The block's (max, sum of exp(x - max)) in every thread.
template <typename S> __device__ void block_max_sum(float &m, S &s) {
    __shared__ float pm[32];
    __shared__ S ps[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1)
        merge(m, s, __shfl_xor_sync(FULL_MASK, m, o), __shfl_xor_sync(FULL_MASK, s, o));
    __syncthreads();
    if (lane == 0) {
        pm[warp] = m;
        ps[warp] = s;
    }
    __syncthreads();
    const bool live = lane < (int)(blockDim.x >> 5);
    m = live ? pm[lane] : -INFINITY;
    s = live ? ps[lane] : (S)0;
    for (int o = 16; o > 0; o >>= 1)
        merge(m, s, __shfl_xor_sync(FULL_MASK, m, o), __shfl_xor_sync(FULL_MASK, s, o));
}

// Attention row op, one block per row of scores [rows, cols]: p = softmax(round(x · scale) +
// causal/sliding mask) in f32, cast. The query of row r is at position (r % group_rows) +
// q_offset: grouped-query attention stacks a kv head's query heads as groups of rows. Keys
// q - window < j <= q are seen (window 0: no window).
template <typename T>
__device__ void attn_softmax_fwd(const T *x, T *y, uint32_t cols, uint32_t group_rows,
                                 uint32_t q_offset, uint32_t window, float scale) {
    const size_t row = blockIdx.x;
    const T *xr = x + row * cols;
    T *yr = y + row * cols;
    const uint32_t q = (uint32_t)(row % group_rows) + q_offset;
    const uint32_t lo = (window != 0 && q + 1 > window) ? q + 1 - window : 0;
    const uint32_t hi = min(q + 1, cols);
    float m = -INFINITY, s = 0.f;
    for (uint32_t j = lo + threadIdx.x; j < hi; j += blockDim.x)
        push(m, s, round_to<T>(load(xr, j) * scale));
    block_max_sum(m, s);
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
        const float p = (j >= lo && j < hi) ? expf(round_to<T>(load(xr, j) * scale) - m) / s : 0.f;
        store(yr, j, p);
    }
}

// Its backward from the probabilities p and their gradient g: dx = scale · p · (g − Σ p·g).
template <typename T>
__device__ void attn_softmax_bwd(const T *p, const T *g, T *dx, uint32_t cols, float scale) {
    const size_t at = (size_t)blockIdx.x * cols;
    float dot = 0.f;
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) dot += load(p, at + j) * load(g, at + j);
    dot = block_sum(dot);
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x)
        store(dx, at + j, scale * load(p, at + j) * (load(g, at + j) - dot));
}

// RMSNorm's scale: transformers rounds the normalized row to the compute dtype before the
// weight (W = T); Gemma's (1 + w) is kept in f32 and the product rounded once (W = float).
template <typename T, typename W> struct NormScale {
    __device__ static float apply(float n, float w) { return round_to<T>(n) * w; }
};
template <typename T> struct NormScale<T, float> {
    __device__ static float apply(float n, float w) { return n * w; }
};

// One block per row of x [rows, h].
template <typename T, typename W>
__device__ void rms_norm_fwd(const T *x, const W *w, T *y, uint32_t h, float eps) {
    const size_t at = (size_t)blockIdx.x * h;
    float ss = 0.f;
    for (uint32_t j = threadIdx.x; j < h; j += blockDim.x) {
        const float v = load(x, at + j);
        ss += v * v;
    }
    const float denom = sqrtf(block_sum(ss) / (float)h + eps);
    for (uint32_t j = threadIdx.x; j < h; j += blockDim.x)
        store(y, at + j, NormScale<T, W>::apply(load(x, at + j) / denom, load(w, j)));
}

// Its backward, dx and dw in one kernel: out [rows + gridDim.x, h] f32 holds dx in its first
// rows and, per block, that block's partial dw (summed by the caller: deterministic, no
// atomics). dx = rstd · (g·w − x̂ · mean(g·w·x̂)), dw = Σ_rows g · x̂.
template <typename T, typename W>
__device__ void rms_norm_bwd(const T *x, const W *w, const T *g, float *out, uint32_t rows,
                             uint32_t h, float eps) {
    float *dw = out + ((size_t)rows + blockIdx.x) * h;
    for (uint32_t j = threadIdx.x; j < h; j += blockDim.x) dw[j] = 0.f;
    for (uint32_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const size_t at = (size_t)r * h;
        float ss = 0.f;
        for (uint32_t j = threadIdx.x; j < h; j += blockDim.x) {
            const float v = load(x, at + j);
            ss += v * v;
        }
        const float rstd = 1.f / sqrtf(block_sum(ss) / (float)h + eps);
        float dot = 0.f;
        for (uint32_t j = threadIdx.x; j < h; j += blockDim.x)
            dot += load(g, at + j) * load(w, j) * load(x, at + j) * rstd;
        dot = block_sum(dot) / (float)h;
        for (uint32_t j = threadIdx.x; j < h; j += blockDim.x) {
            const float xhat = load(x, at + j) * rstd, gj = load(g, at + j);
            out[at + j] = rstd * (gj * load(w, j) - xhat * dot);
            dw[j] += gj * xhat;
        }
    }
}

// RoPE, rotate-half form, over x [b, heads, t, 2·half] (inner 1) or [b, t, heads, 2·half]
// (inner = heads: that many rows per position) with cos, sin [t, half]; each product rounded to T
// as transformers does. sign −1 is the backward (rope with −sin).
template <typename T>
__device__ void rope(const T *x, const T *cos, const T *sin, T *y, uint32_t pairs, uint32_t t,
                     uint32_t inner, uint32_t half, float sign) {
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < pairs; i += blockDim.x * gridDim.x) {
        const uint32_t k = i % half, row = i / half;
        const size_t base = (size_t)row * 2 * half, tab = (size_t)(row / inner % t) * half + k;
        const float x1 = load(x, base + k), x2 = load(x, base + half + k);
        const float c = load(cos, tab), s = sign * load(sin, tab);
        store(y, base + k, round_to<T>(x1 * c) - round_to<T>(x2 * s));
        store(y, base + half + k, round_to<T>(x2 * c) + round_to<T>(x1 * s));
    }
}

// SwiGLU: silu(gate) rounded to T, times up.
template <typename T>
__device__ void swiglu_fwd(const T *gate, const T *up, T *y, uint32_t n) {
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        const float a = load(gate, i);
        store(y, i, round_to<T>(a / (1.f + expf(-a))) * load(up, i));
    }
}

// Its backward: out [2, n] = (d gate, d up).
template <typename T>
__device__ void swiglu_bwd(const T *gate, const T *up, const T *dy, T *out, uint32_t n) {
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        const float a = load(gate, i), d = load(dy, i);
        const float sig = 1.f / (1.f + expf(-a));
        store(out, i, d * load(up, i) * sig * (1.f + a * (1.f - sig)));
        store(out, (size_t)n + i, d * round_to<T>(a / (1.f + expf(-a))));
    }
}

// Completion log-probs of logits z [n, v], one block per row: out [2, n] f32 = (z[target] − lse,
// lse). A target outside the vocabulary gives NaN.
template <typename T>
__device__ void logp_lse(const T *z, const uint32_t *target, float *out, uint32_t n, uint32_t v) {
    const size_t at = (size_t)blockIdx.x * v;
    float m = -INFINITY;
    double s = 0.0;
    for (uint32_t j = threadIdx.x; j < v; j += blockDim.x) push(m, s, load(z, at + j));
    block_max_sum(m, s);
    if (threadIdx.x == 0) {
        const double lse = (double)m + log(s);
        const uint32_t t = target[blockIdx.x];
        out[blockIdx.x] = t < v ? (float)((double)load(z, at + t) - lse) : NAN;
        out[n + blockIdx.x] = (float)lse;
    }
}

// d logp / d z for a vocabulary chunk z [n, len] starting at column v0, upstream g:
// g · (onehot(target) − exp(z − lse)). lg [2, n] f32 = (lse, g).
template <typename T>
__device__ void logp_grad(const T *z, const uint32_t *target, const float *lg, T *dz, uint32_t n,
                          uint32_t len, uint32_t v0) {
    const uint32_t total = n * len;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const uint32_t row = i / len, col = i % len;
        const float g = lg[n + row];
        const float hit = target[row] == v0 + col ? g : 0.f;
        store(dz, i, hit - g * expf(load(z, i) - lg[row]));
    }
}

// acc += g (f32), the sum rounded once to the accumulator's dtype.
template <typename T>
__device__ void accumulate(T *acc, const float *g, uint32_t n) {
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        store(acc, i, load(acc, i) + g[i]);
}

// An embedding's gradient added into its table in place: the rows of g [n, h] (f32) of each
// distinct token summed in f32, in row order, and added into the table's row of that token,
// rounded once to the table's dtype. `order` lists g's rows grouped by token, `starts` [u + 1]
// where each token's rows begin in it, `tokens` [u] the table rows; one block per token. It
// replaces a zero-fill, candle's index_add (one thread per column walking all n rows), a gather,
// casts, an add and a scatter.
template <typename T>
__device__ void embed_grad(T *acc, const float *g, const uint32_t *order, const uint32_t *starts,
                           const uint32_t *tokens, uint32_t h) {
    const uint32_t s0 = starts[blockIdx.x], s1 = starts[blockIdx.x + 1];
    const size_t dst = (size_t)tokens[blockIdx.x] * h;
    for (uint32_t j = threadIdx.x; j < h; j += blockDim.x) {
        float sum = 0.f;
        for (uint32_t r = s0; r < s1; ++r) sum += g[(size_t)order[r] * h + j];
        store(acc, dst + j, load(acc, dst + j) + sum);
    }
}

} // namespace

#define FOR_FLOATS(M) M(float, f32) M(__nv_bfloat16, bf16) M(__half, f16)
#define FOR_HALVES(M) M(__nv_bfloat16, bf16) M(__half, f16)

#define KERNELS(T, S)                                                                              \
    extern "C" __global__ void attn_softmax_fwd_##S(const T *x, T *y, uint32_t cols,              \
                                                   uint32_t group_rows, uint32_t q_offset,         \
                                                   uint32_t window, float scale) {                 \
        attn_softmax_fwd<T>(x, y, cols, group_rows, q_offset, window, scale);                      \
    }                                                                                              \
    extern "C" __global__ void attn_softmax_bwd_##S(const T *p, const T *g, T *dx, uint32_t cols,  \
                                                   float scale) {                                  \
        attn_softmax_bwd<T>(p, g, dx, cols, scale);                                                \
    }                                                                                              \
    extern "C" __global__ void rms_norm_fwd_##S(const T *x, const T *w, T *y, uint32_t h,          \
                                               float eps) {                                        \
        rms_norm_fwd<T, T>(x, w, y, h, eps);                                                       \
    }                                                                                              \
    extern "C" __global__ void rms_norm_bwd_##S(const T *x, const T *w, const T *g, float *out,    \
                                               uint32_t rows, uint32_t h, float eps) {             \
        rms_norm_bwd<T, T>(x, w, g, out, rows, h, eps);                                            \
    }                                                                                              \
    extern "C" __global__ void rope_##S(const T *x, const T *cos, const T *sin, T *y,              \
                                       uint32_t pairs, uint32_t t, uint32_t inner, uint32_t half,  \
                                       float sign) {                                               \
        rope<T>(x, cos, sin, y, pairs, t, inner, half, sign);                                      \
    }                                                                                              \
    extern "C" __global__ void swiglu_fwd_##S(const T *gate, const T *up, T *y, uint32_t n) {      \
        swiglu_fwd<T>(gate, up, y, n);                                                             \
    }                                                                                              \
    extern "C" __global__ void swiglu_bwd_##S(const T *gate, const T *up, const T *dy, T *out,     \
                                             uint32_t n) {                                         \
        swiglu_bwd<T>(gate, up, dy, out, n);                                                       \
    }                                                                                              \
    extern "C" __global__ void logp_lse_##S(const T *z, const uint32_t *target, float *out,        \
                                           uint32_t n, uint32_t v) {                               \
        logp_lse<T>(z, target, out, n, v);                                                         \
    }                                                                                              \
    extern "C" __global__ void accumulate_##S(T *acc, const float *g, uint32_t n) {               \
        accumulate<T>(acc, g, n);                                                                  \
    }                                                                                              \
    extern "C" __global__ void embed_grad_##S(T *acc, const float *g, const uint32_t *order,      \
                                             const uint32_t *starts, const uint32_t *tokens,       \
                                             uint32_t h) {                                         \
        embed_grad<T>(acc, g, order, starts, tokens, h);                                           \
    }                                                                                              \
    extern "C" __global__ void logp_grad_##S(const T *z, const uint32_t *target, const float *lg,  \
                                            T *dz, uint32_t n, uint32_t len, uint32_t v0) {        \
        logp_grad<T>(z, target, lg, dz, n, len, v0);                                               \
    }

// Gemma's norms: activations in T, (1 + w) in f32.
#define NORMS_F32_WEIGHT(T, S)                                                                     \
    extern "C" __global__ void rms_norm_fwd_##S##_wf32(const T *x, const float *w, T *y,           \
                                                      uint32_t h, float eps) {                     \
        rms_norm_fwd<T, float>(x, w, y, h, eps);                                                   \
    }                                                                                              \
    extern "C" __global__ void rms_norm_bwd_##S##_wf32(const T *x, const float *w, const T *g,     \
                                                      float *out, uint32_t rows, uint32_t h,       \
                                                      float eps) {                                 \
        rms_norm_bwd<T, float>(x, w, g, out, rows, h, eps);                                        \
    }

FOR_FLOATS(KERNELS)
FOR_HALVES(NORMS_F32_WEIGHT)
