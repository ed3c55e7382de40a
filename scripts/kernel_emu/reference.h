// What the CPU emulations of the project's GPU kernels check against, shared by the Metal harness
// (scripts/metal_emu/harness.cpp) and the CUDA one (scripts/cuda_emu/harness.cpp): the comparison,
// test data, central differences, the f64 formulas of every op, splitmix64's published sequence, and
// the checks that take a kernel's outputs (each harness runs its own kernels, with their own launch
// shapes and signatures, and hands the results here).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace ref {

using uint = std::uint32_t;
using Vec = std::vector<float>;
using Ref = std::vector<double>;

/// Checks that failed so far.
inline int failures = 0;

/// Passes when max_i |got_i - want_i| <= tol max_i |want_i|.
inline void check(const std::string& name, const Vec& got, const Ref& want, double tol) {
    double err = 0, scale = 1e-30;
    bool sizes = got.size() == want.size();
    for (size_t i = 0; sizes && i < got.size(); i++) {
        err = std::max(err, std::fabs(got[i] - want[i]));
        scale = std::max(scale, std::fabs(want[i]));
    }
    bool ok = sizes && err <= tol * scale && std::isfinite(err);
    std::printf("%s %-64s error %.1e / scale %.1e = %.1e (bound %.0e)\n", ok ? "ok  " : "FAIL", name.c_str(), err, scale, err / scale, tol);
    failures += !ok;
}

/// `n` uniform values in [lo, hi) from seed `seed`.
inline Vec random(size_t n, unsigned seed, float lo = -2.0f, float hi = 2.0f) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> u(lo, hi);
    Vec v(n);
    for (auto& x : v) x = u(gen);
    return v;
}

/// Central differences of the scalar f at `at`, one per value: (f(v + h) - f(v - h)) / 2h.
inline Ref numeric_gradient(Ref at, const std::function<double(const Ref&)>& f, double h = 1e-4) {
    Ref g(at.size());
    for (size_t i = 0; i < at.size(); i++) {
        double v = at[i];
        at[i] = v + h;
        double up = f(at);
        at[i] = v - h;
        double down = f(at);
        at[i] = v;
        g[i] = (up - down) / (2 * h);
    }
    return g;
}

inline Ref widen(const Vec& v) { return Ref(v.begin(), v.end()); }
inline double sigmoid(double y) { return 1 / (1 + std::exp(-y)); }
inline double dot(const Ref& a, const Ref& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); i++) s += a[i] * b[i];
    return s;
}

// ---- the optimizer and the EMA ----

/// a <- keep a + take x.
inline Ref ema(const Vec& a, const Vec& x, double keep, double take) {
    Ref out(a.size());
    for (size_t i = 0; i < a.size(); i++) out[i] = keep * a[i] + take * x[i];
    return out;
}

/// a <- keep a + take f(scale g), f(u) = u or u^2 (AdamW's moments).
inline Ref moment(const Vec& a, const Vec& g, double scale, double keep, double take, bool square) {
    Ref out(a.size());
    for (size_t i = 0; i < a.size(); i++) {
        double u = g[i] * scale;
        out[i] = keep * a[i] + take * (square ? u * u : u);
    }
    return out;
}

/// theta <- theta decay - lr (m inv_bc1) / (sqrt(v inv_bc2) + eps).
inline Ref adamw_apply(const Ref& theta, const Ref& m, const Ref& v, double decay, double lr, double inv_bc1, double inv_bc2, double eps) {
    Ref out(theta.size());
    for (size_t i = 0; i < theta.size(); i++) out[i] = theta[i] * decay - lr * (m[i] * inv_bc1) / (std::sqrt(v[i] * inv_bc2) + eps);
    return out;
}

// ---- the DDPM step and the loss ----

/// The DDPM step's scalars: x_0 = clamp(cx x + cm m, -r, r) (clamp when clip), x' = c0 x_0 + ct x + sigma z.
struct Step {
    double cx, cm, r, c0, ct, sigma;
    bool clip, noise;
};

/// [x' | x_0] of the step `k`.
inline Ref ddpm_step(const Vec& m, const Vec& x, const Vec& z, const Step& k) {
    const size_t n = x.size();
    Ref out(2 * n);
    for (size_t i = 0; i < n; i++) {
        double x0 = k.cx * x[i] + k.cm * m[i];
        if (k.clip) x0 = std::clamp(x0, -k.r, k.r);
        out[n + i] = x0;
        out[i] = k.c0 * x0 + k.ct * x[i] + k.sigma * (k.noise ? z[i] : 0.0);
    }
    return out;
}

/// The weighted loss L = (1 / N) sum_i w_i (1 / M) sum_j (p_ij - y_ij)^2 (w_i = 1 without weights).
inline double mse(const Ref& p, const Vec& y, const Vec& w, uint n, uint m, bool has_w) {
    double total = 0;
    for (uint i = 0; i < n; i++) {
        double s = 0;
        for (uint j = 0; j < m; j++) s += (p[i * m + j] - y[i * m + j]) * (p[i * m + j] - y[i * m + j]);
        total += (has_w ? w[i] : 1.0) * s / m;
    }
    return total / n;
}

// ---- the network's ops ----

/// The f64 group norm (+SiLU) of x (N, C, S) in `groups` groups.
inline Ref group_norm(const Ref& x, const Ref& gamma, const Ref& beta, uint n, uint c, uint groups, uint s, double eps, bool silu) {
    const uint cg = c / groups, m = cg * s;
    Ref out(x.size());
    for (uint ng = 0; ng < n * groups; ng++) {
        const double* xs = &x[(size_t)ng * m];
        double mean = 0, var = 0;
        for (uint j = 0; j < m; j++) mean += xs[j] / m;
        for (uint j = 0; j < m; j++) var += (xs[j] - mean) * (xs[j] - mean) / m;
        for (uint j = 0; j < m; j++) {
            uint ch = ng % groups * cg + j / s;
            double y = (xs[j] - mean) / std::sqrt(var + eps) * gamma[ch] + beta[ch];
            out[(size_t)ng * m + j] = silu ? y * sigmoid(y) : y;
        }
    }
    return out;
}

/// The shapes the group norm kernels are checked on: m = cg s below and above a block of 256
/// threads; s = 300 puts a channel's values on different threads in the two passes of the backward.
struct GroupNormCase {
    uint n, c, groups, s;
    bool silu;
    std::string tag() const {
        return " N" + std::to_string(n) + " C" + std::to_string(c) + " G" + std::to_string(groups) + " S" + std::to_string(s) + (silu ? " silu" : "");
    }
};
inline const GroupNormCase GROUP_NORM_CASES[] = {{3, 8, 4, 37, false}, {2, 6, 3, 300, true}, {2, 4, 1, 5, true}};

/// The group norm's backward outputs of case `cs` (L = sum dout * group_norm(x, gamma, beta), eps
/// `eps`) against central differences of the f64 forward.
inline void check_group_norm_backward(const GroupNormCase& cs, double eps, const Vec& x, const Vec& gamma, const Vec& beta, const Vec& dout, const Vec& dx,
                                      const Vec& dgamma, const Vec& dbeta) {
    Ref xr = widen(x), gr = widen(gamma), br = widen(beta), dr = widen(dout);
    auto loss = [&](const Ref& xv, const Ref& gv, const Ref& bv) { return dot(dr, group_norm(xv, gv, bv, cs.n, cs.c, cs.groups, cs.s, eps, cs.silu)); };
    check("group_norm_backward dx" + cs.tag() + " vs differences", dx, numeric_gradient(xr, [&](const Ref& v) { return loss(v, gr, br); }), 1e-4);
    check("group_norm_params dgamma" + cs.tag() + " vs differences", dgamma, numeric_gradient(gr, [&](const Ref& v) { return loss(xr, v, br); }), 1e-4);
    check("group_norm_params dbeta" + cs.tag() + " vs differences", dbeta, numeric_gradient(br, [&](const Ref& v) { return loss(xr, gr, v); }), 1e-4);
}

/// The softmax of each row.
inline Ref softmax(const Ref& x, uint rows, uint cols) {
    Ref p(x.size());
    for (uint r = 0; r < rows; r++) {
        double mx = -INFINITY, s = 0;
        for (uint j = 0; j < cols; j++) mx = std::max(mx, x[r * cols + j]);
        for (uint j = 0; j < cols; j++) s += std::exp(x[r * cols + j] - mx);
        for (uint j = 0; j < cols; j++) p[r * cols + j] = std::exp(x[r * cols + j] - mx) / s;
    }
    return p;
}

/// Rows shorter and longer than a block, and large logits (most e^(x - m) underflow).
struct SoftmaxCase {
    uint cols;
    float amp;
};
inline const SoftmaxCase SOFTMAX_CASES[] = {{7, 4}, {300, 4}, {600, 4}, {700, 80}};

/// The softmax kernels' outputs p (of x) and dx (of dp) over `rows` rows against the f64 softmax and
/// central differences of it.
inline void check_softmax(const SoftmaxCase& cs, uint rows, const Vec& x, const Vec& p, const Vec& dp, const Vec& dx) {
    const std::string tag = " cols " + std::to_string(cs.cols) + " amplitude " + std::to_string((int)cs.amp);
    check("softmax_rows" + tag, p, softmax(widen(x), rows, cs.cols), 1e-6);
    Ref dpr = widen(dp);
    Ref want = numeric_gradient(widen(x), [&](const Ref& v) { return dot(dpr, softmax(v, rows, cs.cols)); });
    check("softmax_rows_backward" + tag + " vs differences", dx, want, 1e-4);
}

/// splitmix64 as its author publishes it: state += GAMMA, then the finaliser.
inline std::uint64_t splitmix_next(std::uint64_t& state) {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/// Dropout from splitmix64's sequence seeded with `seed`: element 2j + h is kept (times `scale`, the
/// product in f32 as the kernels compute it) when half h (low, high) of the j-th output is >= `threshold`.
inline Ref dropout(const Vec& x, std::uint64_t seed, std::uint64_t threshold, float scale) {
    Ref want(x.size());
    std::uint64_t state = seed;
    for (size_t j = 0; j < x.size(); j += 2) {
        std::uint64_t r = splitmix_next(state);
        for (size_t h = 0; h < 2 && j + h < x.size(); h++) {
            std::uint64_t u = h ? r >> 32 : r & 0xFFFFFFFFull;
            want[j + h] = u >= threshold ? x[j + h] * scale : 0.0f;
        }
    }
    return want;
}

/// A convolution's geometry for the column kernels: x (B, C, H, W), k x k taps, stride, padding.
struct Columns {
    uint b, c, h, w, k, stride, pad;
    uint oh() const { return (h + 2 * pad - k) / stride + 1; }
    uint ow() const { return (w + 2 * pad - k) / stride + 1; }
    /// Rows of the column matrix: C k k.
    uint rows() const { return c * k * k; }
    /// Its columns: B OH OW.
    uint cols() const { return b * oh() * ow(); }
    uint numel() const { return b * c * h * w; }
    std::string tag() const {
        return " B" + std::to_string(b) + " C" + std::to_string(c) + " " + std::to_string(h) + "x" + std::to_string(w) + " k" + std::to_string(k) + " s" +
               std::to_string(stride) + " p" + std::to_string(pad);
    }
    /// The input pixel that column entry (r, j) stands for: row r = (c k + ki) k + kj, column
    /// j = b L + oy OW + ox read x[b, c, oy S + ki - P, ox S + kj - P]; -1 in the zero padding.
    long source(uint r, uint j) const {
        const uint ci = r / (k * k), ki = r / k % k, kj = r % k;
        const uint bi = j / (oh() * ow()), oy = j % (oh() * ow()) / ow(), ox = j % ow();
        const int iy = (int)(oy * stride + ki) - (int)pad, ix = (int)(ox * stride + kj) - (int)pad;
        if (iy < 0 || ix < 0 || iy >= (int)h || ix >= (int)w) return -1;
        return ((long)(bi * c + ci) * h + iy) * w + ix;
    }
};
inline const Columns COLUMN_CASES[] = {{2, 3, 7, 6, 3, 1, 1}, {3, 2, 9, 8, 3, 2, 1}, {2, 4, 4, 5, 1, 1, 0}};

/// im2col's columns `cols` of x, checked through a product: W (O, C k k) @ cols against the
/// convolution summed over channels and taps straight from x, within `tol`.
inline void check_im2col(const std::string& name, const Columns& g, const Vec& x, const Vec& cols, double tol) {
    const uint o = 3, rows = g.rows(), bl = g.cols();
    Vec wt = random(o * rows, 20);
    Vec product(o * bl);
    Ref direct(o * bl, 0.0);
    for (uint oc = 0; oc < o; oc++)
        for (uint j = 0; j < bl; j++) {
            double s = 0;
            for (uint r = 0; r < rows; r++) {
                s += (double)wt[oc * rows + r] * cols[(size_t)r * bl + j];
                if (long src = g.source(r, j); src >= 0) direct[oc * bl + j] += (double)wt[oc * rows + r] * x[src];
            }
            product[oc * bl + j] = (float)s;
        }
    check(name + ": W @ cols vs the direct convolution" + g.tag(), product, direct, tol);
}

/// col2im's dx (a gather) of `dcols` against the scatter-add of every column entry onto the pixel
/// it came from, within `tol`.
inline void check_col2im(const std::string& name, const Columns& g, const Vec& dcols, const Vec& dx, double tol) {
    Ref scattered(g.numel(), 0.0);
    for (uint r = 0; r < g.rows(); r++)
        for (uint j = 0; j < g.cols(); j++)
            if (long src = g.source(r, j); src >= 0) scattered[src] += dcols[(size_t)r * g.cols() + j];
    check(name + " vs the scatter-add" + g.tag(), dx, scattered, tol);
}

}  // namespace ref
