// Stand-in for CUDA's cuda_bf16.h (scripts/cuda_emu): __nv_bfloat16 as its 16 bits, converted from
// f32 with rounding to nearest, ties to even (as CUDA's __float2bfloat16), and widened exactly.
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    std::uint16_t bits;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) {
        std::uint32_t u;
        std::memcpy(&u, &f, 4);
        if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
            bits = (std::uint16_t)((u >> 16) | 0x40);  // NaN stays a (quiet) NaN
        } else {
            u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest, ties to even
            bits = (std::uint16_t)(u >> 16);
        }
    }
    operator float() const {
        std::uint32_t u = (std::uint32_t)bits << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
};
