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

// The multi-tensor kernels below update many tensors in one launch (src/ops/multi_tensor.rs). Their
// table, in u64 words: the device address of each list's tensors (lists * tensors words, list by list),
// each tensor's length (tensors words), then for each chunk its tensor (chunks words) and its first
// element (chunks words). Block b takes chunk b: elements [first, min(first + chunk_len, length)).
struct Chunk {
    uint64_t tensor, begin, end;
};

// The chunk of block blockIdx.x.
__device__ Chunk table_chunk(const uint64_t* table, uint32_t lists, uint32_t tensors, uint32_t chunks,
                             uint64_t chunk_len) {
    const uint64_t* lens = table + (uint64_t)lists * tensors;
    const uint64_t* chunk_tensor = lens + tensors;
    const uint64_t* chunk_begin = chunk_tensor + chunks;
    Chunk c;
    c.tensor = chunk_tensor[blockIdx.x];
    c.begin = chunk_begin[blockIdx.x];
    c.end = min(c.begin + chunk_len, lens[c.tensor]);
    return c;
}

// The f32 data of tensor t of list `list`.
__device__ float* table_tensor(const uint64_t* table, uint32_t tensors, uint32_t list, uint64_t t) {
    return (float*)table[(uint64_t)list * tensors + t];
}

#define CHUNK_LOOP(i, c) for (uint64_t i = (c).begin + threadIdx.x; i < (c).end; i += blockDim.x)

// AdamW over the lists theta, m, v, g: for each element, the arithmetic of ddpm_adamw_moment (twice)
// and ddpm_adamw_apply in one pass: u = scale[0] g; m <- keep1 m + take1 u; v <- keep2 v + take2 u^2;
// theta <- theta decay - lr (m inv_bc1) / (sqrt(v inv_bc2) + eps).
extern "C" __global__ void ddpm_adamw_multi(const uint64_t* table, uint32_t tensors, uint32_t chunks,
                                            uint64_t chunk_len, const float* scale, float keep1, float take1,
                                            float keep2, float take2, float decay, float lr, float inv_bc1,
                                            float inv_bc2, float eps) {
    const Chunk c = table_chunk(table, 4, tensors, chunks, chunk_len);
    float* theta = table_tensor(table, tensors, 0, c.tensor);
    float* m = table_tensor(table, tensors, 1, c.tensor);
    float* v = table_tensor(table, tensors, 2, c.tensor);
    const float* g = table_tensor(table, tensors, 3, c.tensor);
    const float s = scale[0];
    CHUNK_LOOP(i, c) {
        float u = g[i] * s;
        float sq = u * u;
        float mi = keep1 * m[i] + take1 * u;
        float vi = keep2 * v[i] + take2 * sq;
        m[i] = mi;
        v[i] = vi;
        float update = (mi * inv_bc1) / (sqrtf(vi * inv_bc2) + eps);
        theta[i] = theta[i] * decay - lr * update;
    }
}

// The EMA over the lists a, x: a <- keep a + take x (ddpm_ema's arithmetic).
extern "C" __global__ void ddpm_ema_multi(const uint64_t* table, uint32_t tensors, uint32_t chunks,
                                          uint64_t chunk_len, float keep, float take) {
    const Chunk c = table_chunk(table, 2, tensors, chunks, chunk_len);
    float* a = table_tensor(table, tensors, 0, c.tensor);
    const float* x = table_tensor(table, tensors, 1, c.tensor);
    CHUNK_LOOP(i, c) { a[i] = keep * a[i] + take * x[i]; }
}

// Over the one list g: partials[b] = sum of g_i^2 over chunk b, in f64.
extern "C" __global__ void ddpm_sum_squares_multi(const uint64_t* table, uint32_t tensors, uint32_t chunks,
                                                  uint64_t chunk_len, double* partials) {
    const Chunk c = table_chunk(table, 1, tensors, chunks, chunk_len);
    const float* g = table_tensor(table, tensors, 0, c.tensor);
    double acc = 0.0;
    CHUNK_LOOP(i, c) {
        double x = g[i];
        acc += x * x;
    }
    double s = block_sum(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// One block: norm[0] = sqrt(sum of the n partials); scale[0] = min(1, max_norm / (norm + 1e-6)) rounded to
// f32, or 1 when max_norm <= 0 (global-norm clipping).
extern "C" __global__ void ddpm_clip_scale(const double* partials, uint64_t n, double max_norm, double* norm,
                                           float* scale) {
    double acc = 0.0;
    for (uint64_t i = threadIdx.x; i < n; i += THREADS) acc += partials[i];
    double total = block_sum(acc);
    if (threadIdx.x == 0) {
        double nv = sqrt(total);
        norm[0] = nv;
        scale[0] = max_norm > 0.0 ? (float)fmin(1.0, max_norm / (nv + 1e-6)) : 1.0f;
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
