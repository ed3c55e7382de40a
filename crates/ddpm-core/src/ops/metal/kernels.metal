// Metal kernels of ddpm-core's fused ops (f32 data): the optimizer and EMA updates, the DDPM step and
// the loss. src/ops/metal.rs compiles prelude.metal followed by this source at run time, with the
// `metal` feature. Each kernel computes what the CUDA kernel of the same name in
// src/ops/cuda/kernels.cu computes (the Rust module docs give the formulas). Metal has no double
// type, so the reductions sum in f32, in a fixed tree order: results do not depend on scheduling,
// and differ from the CPU's f64 sums by f32 rounding only.
//
// The driver compiles this source with its default options (fast math), so the kernels call
// precise::exp and precise::sqrt where the CPU kernels round correctly.

// a <- keep a + take x (the EMA of the weights).
kernel void ddpm_ema(device float* a [[buffer(0)]], device const float* x [[buffer(1)]],
                     constant uint& n [[buffer(2)]], constant float& keep [[buffer(3)]],
                     constant float& take [[buffer(4)]], uint i [[thread_position_in_grid]]) {
    if (i >= n) return;
    a[i] = keep * a[i] + take * x[i];
}

// a <- keep a + take f(scale[0] g), f(u) = u or u^2 (AdamW's moments); the gradient's scale (global-norm
// clipping) is read from device memory, so the host never waits for it.
kernel void ddpm_adamw_moment(device float* a [[buffer(0)]], device const float* g [[buffer(1)]],
                              device const float* scale [[buffer(2)]], constant uint& n [[buffer(3)]],
                              constant float& keep [[buffer(4)]], constant float& take [[buffer(5)]],
                              constant uint& square [[buffer(6)]], uint i [[thread_position_in_grid]]) {
    if (i >= n) return;
    float u = g[i] * scale[0];
    float fu = square ? u * u : u;
    a[i] = keep * a[i] + take * fu;
}

// The scalars of ddpm_adamw_apply (AdamwScalars in src/ops/metal.rs).
struct AdamwScalars {
    float decay, lr, inv_bc1, inv_bc2, eps;
};

// theta <- theta decay - lr (m inv_bc1) / (sqrt(v inv_bc2) + eps).
kernel void ddpm_adamw_apply(device float* theta [[buffer(0)]], device const float* m [[buffer(1)]],
                             device const float* v [[buffer(2)]], constant uint& n [[buffer(3)]],
                             constant AdamwScalars& k [[buffer(4)]], uint i [[thread_position_in_grid]]) {
    if (i >= n) return;
    float update = (m[i] * k.inv_bc1) / (precise::sqrt(v[i] * k.inv_bc2) + k.eps);
    theta[i] = theta[i] * k.decay - k.lr * update;
}

// The scalars of ddpm_step (StepScalars in src/ops/metal.rs).
struct StepScalars {
    float cx, cm, r, c0, ct, sigma;
    uint clip, with_noise;
};

// out = [x' | x_0]: x_0 = clamp(cx x + cm m, -r, r) (clamp when clip), x' = c0 x_0 + ct x + sigma z.
kernel void ddpm_step(device const float* m [[buffer(0)]], device const float* x [[buffer(1)]],
                      device const float* z [[buffer(2)]], device float* out [[buffer(3)]],
                      constant uint& n [[buffer(4)]], constant StepScalars& k [[buffer(5)]],
                      uint i [[thread_position_in_grid]]) {
    if (i >= n) return;
    float xv = x[i];
    float x0 = k.cx * xv + k.cm * m[i];
    if (k.clip) x0 = clamp(x0, -k.r, k.r);
    float zv = k.with_noise ? z[i] : 0.0f;
    out[i] = k.c0 * x0 + k.ct * xv + k.sigma * zv;
    out[n + i] = x0;
}

// One threadgroup per sample i: sums[i] = w_i (1 / M) sum_j (p_ij - y_ij)^2 (w_i = 1 without weights).
kernel void ddpm_mse_sample_sums(device const float* p [[buffer(0)]], device const float* y [[buffer(1)]],
                                 device const float* w [[buffer(2)]], constant uint& has_w [[buffer(3)]],
                                 device float* sums [[buffer(4)]], constant uint& m [[buffer(5)]],
                                 threadgroup float* sh [[threadgroup(0)]],
                                 uint i [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {
    const ulong base = (ulong)i * m;
    float acc = 0.0f;
    for (uint j = tid; j < m; j += THREADS) {
        float d = p[base + j] - y[base + j];
        acc += d * d;
    }
    float s = group_sum(acc, sh, tid);
    if (tid == 0) sums[i] = (has_w ? w[i] : 1.0f) * s / (float)m;
}

// One threadgroup: out[0] = (1 / N) sum_i sums[i].
kernel void ddpm_mse_total(device const float* sums [[buffer(0)]], constant uint& n [[buffer(1)]],
                           device float* out [[buffer(2)]], threadgroup float* sh [[threadgroup(0)]],
                           uint tid [[thread_index_in_threadgroup]]) {
    float acc = 0.0f;
    for (uint i = tid; i < n; i += THREADS) acc += sums[i];
    float s = group_sum(acc, sh, tid);
    if (tid == 0) out[0] = s / (float)n;
}

// dp_ij = k_i (p_ij - y_ij), k_i = g 2 w_i / (N M), g = grad[0] (on the device); `total` = N M.
kernel void ddpm_mse_backward(device const float* p [[buffer(0)]], device const float* y [[buffer(1)]],
                              device const float* grad [[buffer(2)]], device const float* w [[buffer(3)]],
                              constant uint& has_w [[buffer(4)]], device float* dp [[buffer(5)]],
                              constant uint& m [[buffer(6)]], constant uint& total [[buffer(7)]],
                              uint idx [[thread_position_in_grid]]) {
    if (idx >= total) return;
    float k = grad[0] * 2.0f / (float)total * (has_w ? w[idx / m] : 1.0f);
    dp[idx] = k * (p[idx] - y[idx]);
}
