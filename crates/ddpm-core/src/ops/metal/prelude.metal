// The prelude of the Metal kernels of ddpm-core (kernels.metal beside this file) and ddpm-unet (its
// src/ops/metal/kernels.metal): src/ops/metal.rs compiles this text followed by one crate's kernels
// as one library.
//
// Conventions (both crates): one thread per element for elementwise kernels (`i`: thread_position_in_grid, the
// launcher rounds the grid up, so each kernel checks i < n); one threadgroup of THREADS threads per
// row, sample or (sample, group) pair for reductions, with THREADS floats of threadgroup memory at
// index 0 (`sh`). Scalars come by value through setBytes (`constant T&`).
//
// scripts/metal_emu/ compiles this prelude and both crates' kernels as C++ and runs every kernel on the CPU (one thread per
// Metal thread) against references; see scripts/check_metal.sh.

#include <metal_stdlib>
using namespace metal;

// Threads per threadgroup of the reduction kernels (src/ops/metal.rs launches them so); the tree
// reductions assume this power of two.
constant uint THREADS = 256;

// Sum of v over the threadgroup (every thread gets the total). Fixed tree order: deterministic.
inline float group_sum(float v, threadgroup float* sh, uint tid) {
    sh[tid] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = THREADS / 2; s > 0; s >>= 1) {
        if (tid < s) sh[tid] += sh[tid + s];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    float total = sh[0];
    threadgroup_barrier(mem_flags::mem_threadgroup);  // sh is reused by the next call
    return total;
}

// Maximum of v over the threadgroup (every thread gets it).
inline float group_max(float v, threadgroup float* sh, uint tid) {
    sh[tid] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = THREADS / 2; s > 0; s >>= 1) {
        if (tid < s) sh[tid] = max(sh[tid], sh[tid + s]);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    float m = sh[0];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return m;
}

// sigmoid(y) = 1 / (1 + e^-y)
inline float logistic(float y) { return 1.0f / (1.0f + precise::exp(-y)); }
