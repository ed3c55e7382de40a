// CUDA kernels of ddpm-core's fused ops (f32 data): the optimizer and EMA updates, the DDPM step and
// the loss. Compiled to PTX by build.rs with the `cuda` feature and launched from src/ops/cuda.rs.
// Each kernel computes what the CPU kernel of the same op computes (see the Rust module docs for the
// formulas); reductions use f64 accumulators and a fixed tree order, so results do not depend on
// scheduling.

#include "common.cuh"

// a <- keep a + take x (the EMA of the weights).
extern "C" __global__ void ddpm_ema(float* a, const float* x, uint64_t n, float keep, float take) {
    GRID_STRIDE(i, n) { a[i] = keep * a[i] + take * x[i]; }
}

// a <- keep a + take f(scale[0] g), f(u) = u or u^2 (AdamW's moments); the gradient's scale (global-norm
// clipping) is read from device memory, so the host never waits for it.
extern "C" __global__ void ddpm_adamw_moment(float* a, const float* g, const float* scale, uint64_t n, float keep,
                                             float take, int square) {
    const float s = scale[0];
    GRID_STRIDE(i, n) {
        float u = g[i] * s;
        float fu = square ? u * u : u;
        a[i] = keep * a[i] + take * fu;
    }
}

// theta <- theta decay - lr (m inv_bc1) / (sqrt(v inv_bc2) + eps).
extern "C" __global__ void ddpm_adamw_apply(float* theta, const float* m, const float* v, uint64_t n, float decay,
                                            float lr, float inv_bc1, float inv_bc2, float eps) {
    GRID_STRIDE(i, n) {
        float update = (m[i] * inv_bc1) / (sqrtf(v[i] * inv_bc2) + eps);
        theta[i] = theta[i] * decay - lr * update;
    }
}

// out = [x' | x_0]: x_0 = clamp(cx x + cm m, -r, r) (clamp when clip), x' = c0 x_0 + ct x + sigma z.
extern "C" __global__ void ddpm_step(const float* m, const float* x, const float* z, float* out, uint64_t n,
                                     double cx, double cm, int clip, double r, double c0, double ct, double sigma,
                                     int with_noise) {
    GRID_STRIDE(i, n) {
        double xv = x[i], mv = m[i];
        double x0 = cx * xv + cm * mv;
        if (clip) x0 = fmin(fmax(x0, -r), r);
        double zv = with_noise ? (double)z[i] : 0.0;
        out[i] = (float)(c0 * x0 + ct * xv + sigma * zv);
        out[n + i] = (float)x0;
    }
}

// One block per sample i: sums[i] = w_i (1 / M) sum_j (p_ij - y_ij)^2 (w_i = 1 without weights).
extern "C" __global__ void ddpm_mse_sample_sums(const float* p, const float* y, const float* w, int has_w,
                                                double* sums, uint64_t m) {
    const uint64_t base = blockIdx.x * m;
    double acc = 0.0;
    for (uint64_t j = threadIdx.x; j < m; j += THREADS) {
        float d = p[base + j] - y[base + j];
        acc += (double)(d * d);
    }
    double s = block_sum(acc);
    if (threadIdx.x == 0) sums[blockIdx.x] = (has_w ? (double)w[blockIdx.x] : 1.0) * s / (double)m;
}

// One block: out[0] = (1 / N) sum_i sums[i].
extern "C" __global__ void ddpm_mse_total(const double* sums, uint64_t n, float* out) {
    double acc = 0.0;
    for (uint64_t i = threadIdx.x; i < n; i += THREADS) acc += sums[i];
    double s = block_sum(acc);
    if (threadIdx.x == 0) out[0] = (float)(s / (double)n);
}

// dp_ij = k_i (p_ij - y_ij), k_i = g 2 w_i / (N M) rounded to f32, g = grad[0] (on the device).
extern "C" __global__ void ddpm_mse_backward(const float* p, const float* y, const float* grad, const float* w,
                                             int has_w, float* dp, uint64_t m, uint64_t total, double inv_nm) {
    GRID_STRIDE(idx, total) {
        uint64_t i = idx / m;
        float k = (float)((double)grad[0] * 2.0 * inv_nm * (has_w ? (double)w[i] : 1.0));
        dp[idx] = k * (p[idx] - y[idx]);
    }
}
