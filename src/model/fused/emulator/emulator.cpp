// `../kernels.cu` on the CPU: the very source nvcc compiles, built by a host C++ compiler against
// `include/cuda_emu.h` and launched like `cuLaunchKernel` (a name, the grid, the block and a
// pointer to each argument). `emulator.py` builds it and `test_kernels_cu.py` holds every kernel
// to torch. One launch at a time.

#include "../kernels.cu"

#include <barrier>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

thread_local uint3 threadIdx, blockIdx;

// The `__shared__` variables' section (`include/cuda_emu.h`), bounded by the linker.
extern "C" char __start_emu_shared[], __stop_emu_shared[];
uint3 blockDim, gridDim;

namespace {

std::unique_ptr<std::barrier<>> block_barrier;
std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
std::vector<double> shfl_slots; // a float lane's value widened exactly

template <typename... A, std::size_t... I>
void call(void (*k)(A...), void **args, std::index_sequence<I...>) {
    k(*static_cast<A *>(args[I])...);
}

// A kernel called with `cuLaunchKernel`'s argument array: args[i] points to parameter i.
template <typename... A> std::function<void(void **)> entry(void (*k)(A...)) {
    return [k](void **args) { call(k, args, std::index_sequence_for<A...>{}); };
}

struct Entry {
    const char *name;
    std::function<void(void **)> run;
};

#define ENTRY(name) Entry{#name, entry(name)},
#define ENTRIES(T, S)                                                                              \
    ENTRY(attn_softmax_fwd_##S)                                                                    \
    ENTRY(attn_softmax_bwd_##S)                                                                    \
    ENTRY(rms_norm_fwd_##S)                                                                        \
    ENTRY(rms_norm_bwd_##S)                                                                        \
    ENTRY(rope_##S)                                                                                \
    ENTRY(swiglu_fwd_##S)                                                                          \
    ENTRY(swiglu_bwd_##S)                                                                          \
    ENTRY(logp_lse_##S)                                                                            \
    ENTRY(accumulate_##S)                                                                          \
    ENTRY(embed_grad_##S)                                                                          \
    ENTRY(logp_grad_##S)
#define ENTRIES_WF32(T, S) ENTRY(rms_norm_fwd_##S##_wf32) ENTRY(rms_norm_bwd_##S##_wf32)

const std::vector<Entry> &kernels() {
    static const std::vector<Entry> all = {FOR_FLOATS(ENTRIES) FOR_HALVES(ENTRIES_WF32)};
    return all;
}

} // namespace

void __syncthreads() { block_barrier->arrive_and_wait(); }

double emu_shfl_xor(double v, int lane_mask) {
    const unsigned warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    double *slot = &shfl_slots[warp * 32];
    slot[lane] = v;
    warp_barriers[warp]->arrive_and_wait();
    const double other = slot[lane ^ (unsigned)lane_mask];
    warp_barriers[warp]->arrive_and_wait(); // every lane has read before the next write
    return other;
}

extern "C" {

int emu_kernel_count() { return (int)kernels().size(); }

const char *emu_kernel_name(int i) { return kernels().at(i).name; }

// Runs kernel `name` over `grid` blocks of `block` threads (a multiple of 32, at most 1024), the
// blocks one after another, each block's threads as OS threads. 0 on success, -1 for an unknown
// kernel, -2 for a block size the GPU would refuse or the kernels' warp reductions assume away.
int emu_launch(const char *name, unsigned grid, unsigned block, void **args) {
    const Entry *k = nullptr;
    for (const Entry &e : kernels())
        if (std::strcmp(e.name, name) == 0) k = &e;
    if (k == nullptr) return -1;
    if (block == 0 || block % 32 != 0 || block > 1024) return -2;
    blockDim = {block, 1, 1};
    gridDim = {grid, 1, 1};
    block_barrier = std::make_unique<std::barrier<>>(block);
    warp_barriers.clear();
    for (unsigned w = 0; w < block / 32; ++w)
        warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    shfl_slots.assign(block, 0.0);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t)
        threads.emplace_back([k, t, grid, args] {
            threadIdx = {t, 0, 0};
            for (unsigned b = 0; b < grid; ++b) {
                blockIdx = {b, 0, 0};
                if (t == 0) // poison shared memory before any thread of the block runs
                    std::memset(__start_emu_shared, 0xff, __stop_emu_shared - __start_emu_shared);
                block_barrier->arrive_and_wait();
                k->run(args);
                block_barrier->arrive_and_wait(); // the block is done before the next one starts
            }
        });
    for (std::thread &t : threads) t.join();
    return 0;
}
}
