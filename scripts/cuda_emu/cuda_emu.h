// A CPU stand-in for the parts of CUDA that the project's kernels use (crates/ddpm-core/src/ops/cuda/
// kernels.cu and common.cuh, crates/ddpm-unet/src/ops/cuda/kernels.cu), so that g++ compiles them as
// C++20 and scripts/cuda_emu/harness.cpp runs them on the CPU. Included before the kernels.
//
// Modelled: the thread and block indices (thread-local, set by cuda_emu::launch), __syncthreads (a
// std::barrier per block), __shared__ arrays (function-local statics: one array for the whole
// program, which is the block's own because blocks run one after another), the execution-space
// qualifiers (nothing), and the math functions (the C library's, in f32 and f64 as CUDA's are).
// Not modelled: warps, memory ordering without a barrier, and nvcc's own floating-point contraction
// (fused multiply-adds), so results can differ from a GPU's in the last bits.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <math.h>
#include <thread>
#include <vector>

namespace cuda_emu {

/// CUDA's dim3.
struct Dim3 {
    std::uint32_t x = 1, y = 1, z = 1;
};

inline thread_local Dim3 thread_idx{0, 0, 0}, block_idx{0, 0, 0}, block_dim, grid_dim;
/// The barrier of the calling thread's block; null in a launch without barriers.
inline thread_local std::barrier<>* block_barrier = nullptr;

/// Runs `kernel` (one kernel called with its arguments) over a grid of `grid` blocks of `threads`
/// threads, block after block. With `barriers` the threads of a block run at once (a std::thread
/// each, sharing one std::barrier), as a kernel that calls __syncthreads needs; without, one after
/// another on the calling thread.
inline void launch(Dim3 grid, std::uint32_t threads, bool barriers, const std::function<void()>& kernel) {
    for (std::uint32_t by = 0; by < grid.y; by++)
        for (std::uint32_t bx = 0; bx < grid.x; bx++) {
            auto run = [&](std::uint32_t t, std::barrier<>* bar) {
                thread_idx = {t, 0, 0};
                block_idx = {bx, by, 0};
                block_dim = {threads, 1, 1};
                grid_dim = grid;
                block_barrier = bar;
                kernel();
            };
            if (!barriers) {
                for (std::uint32_t t = 0; t < threads; t++) run(t, nullptr);
                continue;
            }
            std::barrier<> bar(threads);
            std::vector<std::thread> ts;
            for (std::uint32_t t = 0; t < threads; t++) ts.emplace_back(run, t, &bar);
            for (auto& t : ts) t.join();
        }
}

}  // namespace cuda_emu

#define threadIdx cuda_emu::thread_idx
#define blockIdx cuda_emu::block_idx
#define blockDim cuda_emu::block_dim
#define gridDim cuda_emu::grid_dim
#define __global__
#define __device__
#define __shared__ static

/// Waits for every thread of the block.
inline void __syncthreads() {
    if (!cuda_emu::block_barrier) {
        std::fprintf(stderr, "cuda_emu: __syncthreads in a launch without barriers\n");
        std::abort();
    }
    cuda_emu::block_barrier->arrive_and_wait();
}

// CUDA's integer min and max overloads.
using std::max;
using std::min;
