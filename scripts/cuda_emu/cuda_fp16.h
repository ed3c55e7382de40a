// Stand-in for CUDA's cuda_fp16.h (scripts/cuda_emu): __half as the compiler's IEEE binary16
// (_Float16), converted from f32 with rounding to nearest, ties to even (as CUDA's __float2half), and
// widened exactly.
#pragma once

struct __half {
    _Float16 v;
    __half() = default;
    __half(float f) : v((_Float16)f) {}
    operator float() const { return (float)v; }
};
