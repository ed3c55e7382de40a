// Shared by the CUDA kernels of ddpm-core (src/ops/cuda/kernels.cu) and ddpm-unet (its
// src/ops/cuda/kernels.cu, which finds this header through the DEP_DDPM_CORE_CUDA_INCLUDE variable):
// the block size, a deterministic block reduction, and the grid-stride loop. Reductions use f64
// accumulators and a fixed tree order, so results do not depend on scheduling.
#pragma once

#include <stdint.h>

// Threads per block of every kernel; the block reductions assume this power of two.
#define THREADS 256

// Sum of v over the block (every thread gets the total). Fixed tree order: deterministic.
__device__ double block_sum(double v) {
    __shared__ double sh[THREADS];
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int s = THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    double total = sh[0];
    __syncthreads();  // sh is reused by the next call
    return total;
}

#define GRID_STRIDE(i, n) \
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < (n); i += (uint64_t)gridDim.x * blockDim.x)
