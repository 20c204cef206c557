// CUDA's device-side vocabulary for a C++ host compiler, so that `../../kernels.cu`, the very
// source nvcc compiles for the GPU, runs on the CPU (`../emulator.cpp`). Each thread of a block is
// an OS thread: `threadIdx`/`blockIdx` are thread-local, `__shared__` variables are statics (one
// block runs at a time), `__syncthreads` is a barrier of the block's threads and
// `__shfl_xor_sync` exchanges through a per-warp slot between two barriers of the warp's 32
// lanes. Shared memory is poisoned (all bits set: NaN) before every block, as uninitialized
// shared memory on the GPU holds anything: every `__shared__` variable is placed in one linker
// section, which the launcher fills. bf16 and f16 convert with round-to-nearest-even, as
// `__float2bfloat16` and `__float2half` do on the GPU. What it cannot show: timing, memory
// coalescing, register spills (`make kernels` has ptxas report those), and the GPU's expf/logf,
// which may differ from glibc's by an ulp or two.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static __attribute__((section("emu_shared"), used))

struct uint3 {
    unsigned x, y, z;
};
using dim3 = uint3;

extern thread_local uint3 threadIdx, blockIdx;
extern uint3 blockDim, gridDim;

void __syncthreads();
double emu_shfl_xor(double v, int lane_mask);

// A float travels widened to double and back, which keeps every value (NaNs as NaNs).
inline float __shfl_xor_sync(unsigned /*mask: the kernels pass the full warp*/, float v, int o) {
    return (float)emu_shfl_xor(v, o);
}

inline double __shfl_xor_sync(unsigned /*mask: the kernels pass the full warp*/, double v, int o) {
    return emu_shfl_xor(v, o);
}

template <typename T> inline T min(T a, T b) { return b < a ? b : a; }

struct __nv_bfloat16 {
    uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t u = (uint32_t)h.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return {0x7fff};
    u += 0x7fffu + ((u >> 16) & 1u); // round to nearest, ties to even
    return {(uint16_t)(u >> 16)};
}

struct __half {
    _Float16 v;
};

inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half(float f) { return {(_Float16)f}; }
