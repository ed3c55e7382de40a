// CUDA kernels of ddpm-unet's network ops: group norm (+SiLU, f32, bf16, f16) and its backward, the
// convolution's im2col, col2im and bias (f32, bf16, f16), the row softmax and its backward, dropout.
// Compiled to PTX by build.rs with the `cuda` feature and launched from src/ops/cuda.rs. Each kernel
// computes what the CPU kernel of the same op computes (see the Rust module docs for the formulas);
// reductions use f64 accumulators and a fixed tree order, so results do not depend on scheduling.

#include "common.cuh"  // from ddpm-core: THREADS, block_sum, GRID_STRIDE
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Mean and rstd = 1 / sqrt(var + eps) of the block's group xs[0..M) (two passes, f64 sums), for
// f32, bf16 or f16 values (widened to f32).
template <typename T>
__device__ void group_stats(const T* xs, uint64_t m, double eps, float* mean_out, float* rstd_out) {
    double acc = 0.0;
    for (uint64_t j = threadIdx.x; j < m; j += THREADS) acc += (double)(float)xs[j];
    float mean = (float)(block_sum(acc) / (double)m);
    acc = 0.0;
    for (uint64_t j = threadIdx.x; j < m; j += THREADS) {
        float d = (float)xs[j] - mean;
        acc += (double)(d * d);
    }
    double var = block_sum(acc) / (double)m;
    *mean_out = mean;
    *rstd_out = (float)(1.0 / sqrt(var + eps));
}

__device__ float sigmoidf(float y) { return 1.0f / (1.0f + expf(-y)); }

// One block per (sample, group) pair ng, groups of cg channels of s positions (M = cg s):
// out = y or y sigmoid(y), y = (x - mean) rstd gamma_c + beta_c. x and out in f32, bf16 or f16 (the
// arithmetic in f32, one rounding at the end: what the f32 kernel between two casts computes),
// gamma and beta in f32.
template <typename T>
__device__ void group_norm_forward(const T* x, const float* gamma, const float* beta, T* out, uint64_t groups,
                                   uint64_t cg, uint64_t s, double eps, int silu) {
    const uint64_t ng = blockIdx.x, g = ng % groups, m = cg * s;
    const T* xs = x + ng * m;
    T* os = out + ng * m;
    float mean, rstd;
    group_stats(xs, m, eps, &mean, &rstd);
    for (uint64_t j = threadIdx.x; j < m; j += THREADS) {
        uint64_t c = g * cg + j / s;
        float a = rstd * gamma[c];
        float y = (float)xs[j] * a + (beta[c] - mean * a);
        os[j] = T(silu ? y * sigmoidf(y) : y);
    }
}

#define GROUP_NORM_KERNEL(name, T)                                                                           \
    extern "C" __global__ void name(const T* x, const float* gamma, const float* beta, T* out, uint64_t groups, \
                                    uint64_t cg, uint64_t s, double eps, int silu) {                          \
        group_norm_forward<T>(x, gamma, beta, out, groups, cg, s, eps, silu);                                \
    }
GROUP_NORM_KERNEL(ddpm_group_norm, float)
GROUP_NORM_KERNEL(ddpm_group_norm_bf16, __nv_bfloat16)
GROUP_NORM_KERNEL(ddpm_group_norm_f16, __half)

// Backward of ddpm_group_norm, one block per (sample, group) pair ng. Writes dx and, per channel c of
// the group, part_a[n C + c] = sum_s dy and part_b[n C + c] = sum_s dy xhat (reduced over the samples
// by ddpm_group_norm_params):
//   dy = dout (no SiLU) or dout sg (1 + y (1 - sg)), sg = sigmoid(y)
//   dx = rstd (gamma_c dy - m1 - xhat m2), m1 = sum_c gamma_c A_c / M, m2 = sum_c gamma_c B_c / M
extern "C" __global__ void ddpm_group_norm_backward(const float* x, const float* gamma, const float* beta,
                                                    const float* dout, float* dx, double* part_a, double* part_b,
                                                    uint64_t c_total, uint64_t groups, uint64_t cg, uint64_t s,
                                                    double eps, int silu) {
    const uint64_t ng = blockIdx.x, n = ng / groups, g = ng % groups, m = cg * s;
    const float* xs = x + ng * m;
    const float* ds = dout + ng * m;
    float* dxs = dx + ng * m;
    float mean, rstd;
    group_stats(xs, m, eps, &mean, &rstd);
    double s1 = 0.0, s2 = 0.0;
    for (uint64_t ci = 0; ci < cg; ci++) {
        const uint64_t c = g * cg + ci;
        const float a = rstd * gamma[c], b = beta[c] - mean * a;
        double acc_a = 0.0, acc_b = 0.0;
        for (uint64_t j = ci * s + threadIdx.x; j < (ci + 1) * s; j += THREADS) {
            float dy = ds[j];
            if (silu) {
                float y = xs[j] * a + b;
                float sg = sigmoidf(y);
                dy = dy * sg * (1.0f + y * (1.0f - sg));
            }
            dxs[j] = dy;  // dy kept in dx until the second pass
            acc_a += (double)dy;
            acc_b += (double)(dy * ((xs[j] - mean) * rstd));
        }
        double ta = block_sum(acc_a), tb = block_sum(acc_b);
        if (threadIdx.x == 0) {
            part_a[n * c_total + c] = ta;
            part_b[n * c_total + c] = tb;
        }
        s1 += (double)gamma[c] * ta;
        s2 += (double)gamma[c] * tb;
    }
    const double m1 = s1 / (double)m, m2 = s2 / (double)m, r = (double)rstd;
    // dx = k1 dy + k2 x + k3 with k1 = rstd gamma_c, k2 = -rstd^2 m2, k3 = -rstd m1 + mean rstd^2 m2
    const float k2 = (float)(-r * r * m2), k3 = (float)(-r * m1 + (double)mean * r * r * m2);
    // the barriers inside block_sum above order every first-pass write before these reads
    for (uint64_t j = threadIdx.x; j < m; j += THREADS) {
        float k1 = rstd * gamma[g * cg + j / s];
        dxs[j] = k1 * dxs[j] + k2 * xs[j] + k3;
    }
}

// dbeta_c = sum_n part_a[n C + c], dgamma_c = sum_n part_b[n C + c], summed in sample order.
extern "C" __global__ void ddpm_group_norm_params(const double* part_a, const double* part_b, float* dgamma,
                                                  float* dbeta, uint64_t n, uint64_t c_total) {
    GRID_STRIDE(c, c_total) {
        double sa = 0.0, sb = 0.0;
        for (uint64_t k = 0; k < n; k++) {
            sa += part_a[k * c_total + c];
            sb += part_b[k * c_total + c];
        }
        dbeta[c] = (float)sa;
        dgamma[c] = (float)sb;
    }
}

// The convolution by columns (src/ops/columns.rs), for f32, bf16 and f16 data: x (B, C, H, W),
// cols (C K K, B L), L = OH OW, row r = (c K + ki) K + kj, column j = b L + oy OW + ox;
// cols[r, j] = x[b, c, oy S + ki - P, ox S + kj - P], 0 outside the image.
// Grid: x over the B L columns (one thread each), y over the rows (with a stride of gridDim.y); the
// per-element indices are 32-bit (the launcher checks that B L and B H W fit), the offsets 64-bit.
template <typename T>
__device__ void im2col(const T* x, T* cols, uint32_t B, uint32_t C, uint32_t H, uint32_t W, uint32_t K,
                       uint32_t S, uint32_t P, uint32_t OH, uint32_t OW) {
    const uint32_t L = OH * OW, BL = B * L, R = C * K * K;
    const uint32_t j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= BL) return;
    const uint32_t b = j / L, pos = j - b * L, oy = pos / OW, ox = pos - oy * OW;
    for (uint32_t r = blockIdx.y; r < R; r += gridDim.y) {
        const uint32_t kj = r % K, ki = (r / K) % K, c = r / (K * K);
        // input row and column, signed: negative above and left of the image
        const int iy = (int)(oy * S + ki) - (int)P, ix = (int)(ox * S + kj) - (int)P;
        const bool inside = iy >= 0 && iy < (int)H && ix >= 0 && ix < (int)W;
        cols[(uint64_t)r * BL + j] = inside ? x[((uint64_t)(b * C + c) * H + (uint32_t)iy) * W + (uint32_t)ix] : T(0.0f);
    }
}

// The adjoint of im2col as a gather: dx[b, c, iy, ix] = sum over ki, kj (in that order, in f32) of
// dcols[(c K + ki) K + kj, b L + oy OW + ox] for the outputs with oy S + ki - P = iy and
// ox S + kj - P = ix inside the output. Grid: x over the B H W pixels, y over the channels.
template <typename T>
__device__ void col2im(const T* dcols, T* dx, uint32_t B, uint32_t C, uint32_t H, uint32_t W, uint32_t K,
                       uint32_t S, uint32_t P, uint32_t OH, uint32_t OW) {
    const uint32_t L = OH * OW, BL = B * L, HW = H * W;
    const uint32_t j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= B * HW) return;
    const uint32_t b = j / HW, p = j - b * HW, iy = p / W, ix = p - iy * W;
    for (uint32_t c = blockIdx.y; c < C; c += gridDim.y) {
        float s = 0.0f;
        for (uint32_t ki = 0; ki < K; ++ki) {
            const int ty = (int)(iy + P) - (int)ki;  // oy S
            if (ty < 0 || ty % (int)S != 0 || ty / (int)S >= (int)OH) continue;
            const uint32_t oy = (uint32_t)ty / S;
            for (uint32_t kj = 0; kj < K; ++kj) {
                const int tx = (int)(ix + P) - (int)kj;  // ox S
                if (tx < 0 || tx % (int)S != 0 || tx / (int)S >= (int)OW) continue;
                const uint32_t ox = (uint32_t)tx / S;
                s += (float)dcols[(uint64_t)((c * K + ki) * K + kj) * BL + b * L + oy * OW + ox];
            }
        }
        dx[(uint64_t)(b * C + c) * HW + p] = T(s);
    }
}

#define COLUMN_KERNELS(suffix, T)                                                                          \
    extern "C" __global__ void ddpm_im2col_##suffix(const T* x, T* cols, uint32_t B, uint32_t C, uint32_t H, \
                                                    uint32_t W, uint32_t K, uint32_t S, uint32_t P,       \
                                                    uint32_t OH, uint32_t OW) {                           \
        im2col<T>(x, cols, B, C, H, W, K, S, P, OH, OW);                                                 \
    }                                                                                                     \
    extern "C" __global__ void ddpm_col2im_##suffix(const T* dcols, T* dx, uint32_t B, uint32_t C,        \
                                                    uint32_t H, uint32_t W, uint32_t K, uint32_t S,       \
                                                    uint32_t P, uint32_t OH, uint32_t OW) {               \
        col2im<T>(dcols, dx, B, C, H, W, K, S, P, OH, OW);                                               \
    }
COLUMN_KERNELS(f32, float)
COLUMN_KERNELS(bf16, __nv_bfloat16)
COLUMN_KERNELS(f16, __half)

// The convolution's bias added in place to its output y (B, O, L) (src/ops/cudnn_conv.rs):
// y[b, o, p] += bias[r O + o], r = b for a per-image (B, O) bias, 0 for a shared (O) one; the sum in
// f32, rounded once. n = B O L elements.
template <typename T>
__device__ void add_bias(T* y, const T* bias, uint64_t n, uint32_t O, uint32_t L, uint32_t per_image) {
    GRID_STRIDE(i, n) {
        const uint64_t bo = i / L;  // b O + o
        const uint64_t row = per_image ? bo / O : 0;
        y[i] = T((float)y[i] + (float)bias[row * O + bo % O]);
    }
}

#define BIAS_KERNEL(suffix, T)                                                                               \
    extern "C" __global__ void ddpm_add_bias_##suffix(T* y, const T* bias, uint64_t n, uint32_t O, uint32_t L, \
                                                      uint32_t per_image) {                                  \
        add_bias<T>(y, bias, n, O, L, per_image);                                                           \
    }
BIAS_KERNEL(f32, float)
BIAS_KERNEL(bf16, __nv_bfloat16)
BIAS_KERNEL(f16, __half)

// Maximum of v over the block (every thread gets it).
__device__ float block_max(float v) {
    __shared__ float sh[THREADS];
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int s = THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
        __syncthreads();
    }
    float m = sh[0];
    __syncthreads();  // sh is reused by the next call
    return m;
}

// Softmax of each row of `cols` values (src/ops/softmax.rs), one block per row:
// p_j = e^(x_j - m) / sum_k e^(x_k - m), m = max_k x_k.
extern "C" __global__ void ddpm_softmax_rows(const float* x, float* p, uint64_t cols) {
    const float* xr = x + blockIdx.x * cols;
    float* pr = p + blockIdx.x * cols;
    float m = -INFINITY;
    for (uint64_t j = threadIdx.x; j < cols; j += THREADS) m = fmaxf(m, xr[j]);
    m = block_max(m);
    double s = 0.0;
    for (uint64_t j = threadIdx.x; j < cols; j += THREADS) s += (double)expf(xr[j] - m);
    float inv = (float)(1.0 / block_sum(s));
    for (uint64_t j = threadIdx.x; j < cols; j += THREADS) pr[j] = expf(xr[j] - m) * inv;
}

// Its backward, one block per row: dx_j = p_j (dp_j - D), D = sum_k p_k dp_k.
extern "C" __global__ void ddpm_softmax_rows_backward(const float* p, const float* dp, float* dx, uint64_t cols) {
    const float* pr = p + blockIdx.x * cols;
    const float* gr = dp + blockIdx.x * cols;
    float* dr = dx + blockIdx.x * cols;
    double d = 0.0;
    for (uint64_t j = threadIdx.x; j < cols; j += THREADS) d += (double)pr[j] * (double)gr[j];
    float dd = (float)block_sum(d);
    for (uint64_t j = threadIdx.x; j < cols; j += THREADS) dr[j] = pr[j] * (gr[j] - dd);
}

// Dropout (src/ops/dropout.rs): y_i = x_i m_i, m_i = scale if u_i >= threshold else 0, where u_{2j} and
// u_{2j+1} are the low and high 32 bits of splitmix64's mix(seed + j GAMMA). n = elements.
#define SPLITMIX_GAMMA 0x9E3779B97F4A7C15ull
__device__ uint64_t splitmix_mix(uint64_t z) {
    z += SPLITMIX_GAMMA;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

extern "C" __global__ void ddpm_dropout(const float* x, float* y, uint64_t n, uint64_t seed, uint64_t threshold, float scale) {
    GRID_STRIDE(i, n) {
        uint64_t r = splitmix_mix(seed + (i >> 1) * SPLITMIX_GAMMA);
        uint64_t u = (i & 1) ? (r >> 32) : (r & 0xFFFFFFFFull);
        y[i] = x[i] * (u >= threshold ? scale : 0.0f);
    }
}
