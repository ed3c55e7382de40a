// Metal kernels of ddpm-unet's network ops (f32 data): group norm (+SiLU) and its backward, the row
// softmax and its backward, dropout, im2col and col2im. ddpm-core's src/ops/metal.rs compiles its
// prelude.metal (THREADS, group_sum, group_max, logistic) followed by this source at run time, with
// the `metal` feature. Each kernel computes what the CUDA kernel of the same name in
// src/ops/cuda/kernels.cu computes (the Rust module docs give the formulas); the reductions sum in
// f32 in a fixed tree order, and the kernels call precise::exp and precise::sqrt (the driver compiles
// with fast math).

// Mean and rstd = 1 / sqrt(var + eps) of the threadgroup's group xs[0..M) (two passes).
inline void group_stats(device const float* xs, uint m, float eps, threadgroup float* sh, uint tid,
                        thread float& mean, thread float& rstd) {
    float acc = 0.0f;
    for (uint j = tid; j < m; j += THREADS) acc += xs[j];
    mean = group_sum(acc, sh, tid) / (float)m;
    acc = 0.0f;
    for (uint j = tid; j < m; j += THREADS) {
        float d = xs[j] - mean;
        acc += d * d;
    }
    float var = group_sum(acc, sh, tid) / (float)m;
    rstd = 1.0f / precise::sqrt(var + eps);
}

// The shape of a group norm: `groups` groups of `cg` channels of `s` positions per sample, C channels.
struct GroupNormDims {
    uint c, groups, cg, s;
    float eps;
    uint silu;
};

// One threadgroup per (sample, group) pair ng (M = cg s values):
// out = y or y sigmoid(y), y = (x - mean) rstd gamma_c + beta_c.
kernel void ddpm_group_norm(device const float* x [[buffer(0)]], device const float* gamma [[buffer(1)]],
                            device const float* beta [[buffer(2)]], device float* out [[buffer(3)]],
                            constant GroupNormDims& d [[buffer(4)]], threadgroup float* sh [[threadgroup(0)]],
                            uint ng [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {
    const uint g = ng % d.groups, m = d.cg * d.s;
    device const float* xs = x + (ulong)ng * m;
    device float* os = out + (ulong)ng * m;
    float mean, rstd;
    group_stats(xs, m, d.eps, sh, tid, mean, rstd);
    for (uint j = tid; j < m; j += THREADS) {
        uint c = g * d.cg + j / d.s;
        float a = rstd * gamma[c];
        float y = xs[j] * a + (beta[c] - mean * a);
        os[j] = d.silu ? y * logistic(y) : y;
    }
}

// Backward of ddpm_group_norm, one threadgroup per (sample, group) pair ng. Writes dx and, per
// channel c of the group, part_a[n C + c] = sum_s dy and part_b[n C + c] = sum_s dy xhat (reduced
// over the samples by ddpm_group_norm_params):
//   dy = dout (no SiLU) or dout sg (1 + y (1 - sg)), sg = sigmoid(y)
//   dx = rstd (gamma_c dy - m1 - xhat m2), m1 = sum_c gamma_c A_c / M, m2 = sum_c gamma_c B_c / M
kernel void ddpm_group_norm_backward(device const float* x [[buffer(0)]], device const float* gamma [[buffer(1)]],
                                     device const float* beta [[buffer(2)]], device const float* dout [[buffer(3)]],
                                     device float* dx [[buffer(4)]], device float* part_a [[buffer(5)]],
                                     device float* part_b [[buffer(6)]], constant GroupNormDims& d [[buffer(7)]],
                                     threadgroup float* sh [[threadgroup(0)]],
                                     uint ng [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {
    const uint n = ng / d.groups, g = ng % d.groups, m = d.cg * d.s;
    device const float* xs = x + (ulong)ng * m;
    device const float* ds = dout + (ulong)ng * m;
    device float* dxs = dx + (ulong)ng * m;
    float mean, rstd;
    group_stats(xs, m, d.eps, sh, tid, mean, rstd);
    float s1 = 0.0f, s2 = 0.0f;
    for (uint ci = 0; ci < d.cg; ci++) {
        const uint c = g * d.cg + ci;
        const float a = rstd * gamma[c], b = beta[c] - mean * a;
        float acc_a = 0.0f, acc_b = 0.0f;
        for (uint j = ci * d.s + tid; j < (ci + 1) * d.s; j += THREADS) {
            float dy = ds[j];
            if (d.silu) {
                float y = xs[j] * a + b;
                float sg = logistic(y);
                dy = dy * sg * (1.0f + y * (1.0f - sg));
            }
            dxs[j] = dy;  // dy kept in dx until the second pass
            acc_a += dy;
            acc_b += dy * ((xs[j] - mean) * rstd);
        }
        float ta = group_sum(acc_a, sh, tid), tb = group_sum(acc_b, sh, tid);
        if (tid == 0) {
            part_a[n * d.c + c] = ta;
            part_b[n * d.c + c] = tb;
        }
        s1 += gamma[c] * ta;
        s2 += gamma[c] * tb;
    }
    const float m1 = s1 / (float)m, m2 = s2 / (float)m;
    // dx = k1 dy + k2 x + k3 with k1 = rstd gamma_c, k2 = -rstd^2 m2, k3 = -rstd m1 + mean rstd^2 m2
    const float k2 = -rstd * rstd * m2, k3 = -rstd * m1 + mean * rstd * rstd * m2;
    // the second pass reads dy values that other threads of the group wrote to device memory
    threadgroup_barrier(mem_flags::mem_device);
    for (uint j = tid; j < m; j += THREADS) {
        float k1 = rstd * gamma[g * d.cg + j / d.s];
        dxs[j] = k1 * dxs[j] + k2 * xs[j] + k3;
    }
}

// dbeta_c = sum_n part_a[n C + c], dgamma_c = sum_n part_b[n C + c], summed in sample order; `n`
// samples, one thread per channel c.
kernel void ddpm_group_norm_params(device const float* part_a [[buffer(0)]], device const float* part_b [[buffer(1)]],
                                   device float* dgamma [[buffer(2)]], device float* dbeta [[buffer(3)]],
                                   constant uint& n [[buffer(4)]], constant uint& c_total [[buffer(5)]],
                                   uint c [[thread_position_in_grid]]) {
    if (c >= c_total) return;
    float sa = 0.0f, sb = 0.0f;
    for (uint k = 0; k < n; k++) {
        sa += part_a[k * c_total + c];
        sb += part_b[k * c_total + c];
    }
    dbeta[c] = sa;
    dgamma[c] = sb;
}

// Softmax of each row of `cols` values (src/ops/softmax.rs), one threadgroup per row:
// p_j = e^(x_j - m) / sum_k e^(x_k - m), m = max_k x_k.
kernel void ddpm_softmax_rows(device const float* x [[buffer(0)]], device float* p [[buffer(1)]],
                              constant uint& cols [[buffer(2)]], threadgroup float* sh [[threadgroup(0)]],
                              uint row [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {
    device const float* xr = x + (ulong)row * cols;
    device float* pr = p + (ulong)row * cols;
    // the lowest finite float, not -INFINITY: the driver compiles with fast math, which may assume
    // that no value is infinite
    float m = -MAXFLOAT;
    for (uint j = tid; j < cols; j += THREADS) m = max(m, xr[j]);
    m = group_max(m, sh, tid);
    float s = 0.0f;
    for (uint j = tid; j < cols; j += THREADS) s += precise::exp(xr[j] - m);
    float inv = 1.0f / group_sum(s, sh, tid);
    for (uint j = tid; j < cols; j += THREADS) pr[j] = precise::exp(xr[j] - m) * inv;
}

// Its backward, one threadgroup per row: dx_j = p_j (dp_j - D), D = sum_k p_k dp_k.
kernel void ddpm_softmax_rows_backward(device const float* p [[buffer(0)]], device const float* dp [[buffer(1)]],
                                       device float* dx [[buffer(2)]], constant uint& cols [[buffer(3)]],
                                       threadgroup float* sh [[threadgroup(0)]],
                                       uint row [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {
    device const float* pr = p + (ulong)row * cols;
    device const float* gr = dp + (ulong)row * cols;
    device float* dr = dx + (ulong)row * cols;
    float acc = 0.0f;
    for (uint j = tid; j < cols; j += THREADS) acc += pr[j] * gr[j];
    float dd = group_sum(acc, sh, tid);
    for (uint j = tid; j < cols; j += THREADS) dr[j] = pr[j] * (gr[j] - dd);
}

// Dropout (src/ops/dropout.rs): y_i = x_i m_i, m_i = scale if u_i >= threshold else 0, where u_{2j} and
// u_{2j+1} are the low and high 32 bits of splitmix64's mix(seed + j GAMMA): the same mask, bit for
// bit, as the CPU and CUDA kernels.
constant ulong SPLITMIX_GAMMA = 0x9E3779B97F4A7C15ul;

inline ulong splitmix_mix(ulong z) {
    z += SPLITMIX_GAMMA;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ul;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBul;
    return z ^ (z >> 31);
}

// The scalars of ddpm_dropout (DropoutScalars in src/ops/metal.rs).
struct DropoutScalars {
    ulong seed, threshold;
    uint n;
    float scale;
};

kernel void ddpm_dropout(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                         constant DropoutScalars& k [[buffer(2)]], uint i [[thread_position_in_grid]]) {
    if (i >= k.n) return;
    ulong r = splitmix_mix(k.seed + (ulong)(i >> 1) * SPLITMIX_GAMMA);
    ulong u = (i & 1) ? (r >> 32) : (r & 0xFFFFFFFFul);
    y[i] = x[i] * (u >= k.threshold ? k.scale : 0.0f);
}

// The geometry of a convolution by columns (src/ops/columns.rs): x (B, C, H, W), a k x k kernel
// with stride S and zero padding P, output OH x OW (L = OH OW positions per image).
struct ColumnGeometry {
    uint b, c, h, w, k, stride, pad, oh, ow;
};

// cols (C k k, B L), one thread per entry idx = r B L + j: row r = (c k + ki) k + kj, column
// j = b L + oy OW + ox; cols[r, j] = x[b, c, oy S + ki - P, ox S + kj - P], 0 outside the image.
kernel void ddpm_im2col(device const float* x [[buffer(0)]], device float* cols [[buffer(1)]],
                        constant ColumnGeometry& g [[buffer(2)]], constant uint& total [[buffer(3)]],
                        uint idx [[thread_position_in_grid]]) {
    if (idx >= total) return;
    const uint bl = g.b * g.oh * g.ow, r = idx / bl, j = idx - r * bl;
    const uint l = g.oh * g.ow, b = j / l, pos = j - b * l, oy = pos / g.ow, ox = pos - oy * g.ow;
    const uint kj = r % g.k, ki = (r / g.k) % g.k, c = r / (g.k * g.k);
    // input row and column, signed: negative above and left of the image
    const int iy = (int)(oy * g.stride + ki) - (int)g.pad, ix = (int)(ox * g.stride + kj) - (int)g.pad;
    const bool inside = iy >= 0 && iy < (int)g.h && ix >= 0 && ix < (int)g.w;
    cols[idx] = inside ? x[((ulong)(b * g.c + c) * g.h + (uint)iy) * g.w + (uint)ix] : 0.0f;
}

// The adjoint of ddpm_im2col as a gather, one thread per pixel idx of dx (B, C, H, W):
// dx[b, c, iy, ix] = sum over ki, kj (in that order) of dcols[(c k + ki) k + kj, b L + oy OW + ox] for
// the outputs with oy S + ki - P = iy and ox S + kj - P = ix inside the output.
kernel void ddpm_col2im(device const float* dcols [[buffer(0)]], device float* dx [[buffer(1)]],
                        constant ColumnGeometry& g [[buffer(2)]], constant uint& total [[buffer(3)]],
                        uint idx [[thread_position_in_grid]]) {
    if (idx >= total) return;
    const uint hw = g.h * g.w, plane = idx / hw, p = idx - plane * hw, b = plane / g.c, c = plane - b * g.c;
    const uint iy = p / g.w, ix = p - iy * g.w, l = g.oh * g.ow, bl = g.b * l;
    float s = 0.0f;
    for (uint ki = 0; ki < g.k; ++ki) {
        const int ty = (int)(iy + g.pad) - (int)ki;  // oy S
        if (ty < 0 || ty % (int)g.stride != 0 || ty / (int)g.stride >= (int)g.oh) continue;
        const uint oy = (uint)ty / g.stride;
        for (uint kj = 0; kj < g.k; ++kj) {
            const int tx = (int)(ix + g.pad) - (int)kj;  // ox S
            if (tx < 0 || tx % (int)g.stride != 0 || tx / (int)g.stride >= (int)g.ow) continue;
            const uint ox = (uint)tx / g.stride;
            s += dcols[(ulong)((c * g.k + ki) * g.k + kj) * bl + b * l + oy * g.ow + ox];
        }
    }
    dx[idx] = s;
}
