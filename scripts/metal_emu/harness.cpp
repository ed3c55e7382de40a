// Runs every kernel of the Metal sources (ddpm-core's prelude.metal and kernels.metal, ddpm-unet's
// kernels.metal) on the CPU and compares it with a reference: the formula in f64, central
// differences of the f64 forward for the backward kernels, and splitmix64's published sequence for
// dropout. Built and run by scripts/check_metal.sh, which
// strips the kernels' attributes into build/kernels.cpp first. Exit status 1 if any check fails.
//
// Emulation: a threadgroup is THREADS std::threads sharing one std::barrier and one threadgroup
// buffer, run one group after another; an elementwise grid is rounded up to whole threadgroups, as
// src/ops/metal.rs launches it, so the kernels' bounds checks are exercised.

#include "metal_stdlib"
#include "kernels.cpp"
#undef kernel
#undef device
#undef threadgroup
#undef thread
#undef constant

#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <cstddef>

// The layouts that the Rust launchers write as 4-byte words (Arg::Words in src/ops/metal.rs, field
// by field in this order); Metal lays these structs out as C++ does here (natural alignment).
static_assert(sizeof(AdamwScalars) == 5 * 4);
static_assert(sizeof(StepScalars) == 8 * 4 && offsetof(StepScalars, clip) == 6 * 4 && offsetof(StepScalars, with_noise) == 7 * 4);
static_assert(sizeof(GroupNormDims) == 6 * 4 && offsetof(GroupNormDims, eps) == 4 * 4 && offsetof(GroupNormDims, silu) == 5 * 4);
static_assert(sizeof(DropoutScalars) == 6 * 4 && offsetof(DropoutScalars, threshold) == 2 * 4 && offsetof(DropoutScalars, n) == 4 * 4 &&
              offsetof(DropoutScalars, scale) == 5 * 4);
static_assert(sizeof(ColumnGeometry) == 9 * 4 && offsetof(ColumnGeometry, ow) == 8 * 4);

using Vec = std::vector<float>;
using Ref = std::vector<double>;

static int failures = 0;

// Passes when max_i |got_i - want_i| <= tol max_i |want_i|.
static void check(const std::string& name, const Vec& got, const Ref& want, double tol) {
    double err = 0, scale = 1e-30;
    bool sizes = got.size() == want.size();
    for (size_t i = 0; sizes && i < got.size(); i++) {
        err = std::max(err, std::fabs(got[i] - want[i]));
        scale = std::max(scale, std::fabs(want[i]));
    }
    bool ok = sizes && err <= tol * scale && std::isfinite(err);
    std::printf("%s %-58s error %.1e / scale %.1e = %.1e (bound %.0e)\n", ok ? "ok  " : "FAIL", name.c_str(), err, scale, err / scale, tol);
    failures += !ok;
}

static Vec random(size_t n, unsigned seed, float lo = -2.0f, float hi = 2.0f) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> u(lo, hi);
    Vec v(n);
    for (auto& x : v) x = u(gen);
    return v;
}

// One call per thread of a grid of n threads rounded up to whole threadgroups.
static void run_elementwise(uint n, const std::function<void(uint)>& f) {
    for (uint i = 0; i < (n + THREADS - 1) / THREADS * THREADS; i++) f(i);
}

// `groups` threadgroups of THREADS threads: f(group, thread, threadgroup memory).
static void run_groups(uint groups, const std::function<void(uint, uint, float*)>& f) {
    for (uint g = 0; g < groups; g++) {
        std::barrier<> bar(THREADS);
        Vec sh(THREADS, std::nanf(""));
        std::vector<std::thread> ts;
        for (uint t = 0; t < THREADS; t++)
            ts.emplace_back([&, t] {
                metal_emu::group_barrier = &bar;
                f(g, t, sh.data());
            });
        for (auto& t : ts) t.join();
    }
}

// Central differences of the scalar f at `at`, one per value: (f(v + h) - f(v - h)) / 2h.
static Ref numeric_gradient(Ref at, const std::function<double(const Ref&)>& f, double h = 1e-4) {
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

static Ref widen(const Vec& v) { return Ref(v.begin(), v.end()); }
static double sigmoid_ref(double y) { return 1 / (1 + std::exp(-y)); }
static double dot(const Ref& a, const Ref& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); i++) s += a[i] * b[i];
    return s;
}

static void optimiser_kernels() {
    const uint n = 1000;
    Vec x = random(n, 1), a0 = random(n, 2);
    {
        Vec a = a0;
        float keep = 0.9f, take = 0.1f;
        run_elementwise(n, [&](uint i) { ddpm_ema(a.data(), x.data(), n, keep, take, i); });
        Ref want(n);
        for (uint i = 0; i < n; i++) want[i] = keep * (double)a0[i] + take * (double)x[i];
        check("ema", a, want, 1e-6);
    }
    for (uint square = 0; square < 2; square++) {
        Vec a = a0, scale{0.5f};
        float keep = 0.9f, take = 0.1f;
        run_elementwise(n, [&](uint i) { ddpm_adamw_moment(a.data(), x.data(), scale.data(), n, keep, take, square, i); });
        Ref want(n);
        for (uint i = 0; i < n; i++) {
            double u = (double)x[i] * scale[0];
            want[i] = keep * (double)a0[i] + take * (square ? u * u : u);
        }
        check(square ? "adamw_moment (squared)" : "adamw_moment", a, want, 1e-6);
    }
    Vec theta = random(n, 3), m = random(n, 4), v = random(n, 5, 0.0f, 1.0f), theta0 = theta;
    AdamwScalars k{0.999f, 1e-3f, 1.1f, 1.3f, 1e-8f};
    run_elementwise(n, [&](uint i) { ddpm_adamw_apply(theta.data(), m.data(), v.data(), n, k, i); });
    Ref want(n);
    for (uint i = 0; i < n; i++)
        want[i] = theta0[i] * (double)k.decay - k.lr * (m[i] * (double)k.inv_bc1) / (std::sqrt(v[i] * (double)k.inv_bc2) + k.eps);
    check("adamw_apply", theta, want, 1e-6);
}

static void step_kernel() {
    const uint n = 777;
    Vec m = random(n, 6), x = random(n, 7), z = random(n, 8);
    for (uint clip = 0; clip < 2; clip++)
        for (uint noise = 0; noise < 2; noise++) {
            StepScalars k{1.02f, -0.2f, 1.0f, 0.3f, 0.7f, noise ? 0.05f : 0.0f, clip, noise};
            Vec out(2 * n, std::nanf(""));
            run_elementwise(n, [&](uint i) { ddpm_step(m.data(), x.data(), z.data(), out.data(), n, k, i); });
            Ref want(2 * n);
            for (uint i = 0; i < n; i++) {
                double x0 = (double)k.cx * x[i] + (double)k.cm * m[i];
                if (clip) x0 = std::clamp(x0, -(double)k.r, (double)k.r);
                want[n + i] = x0;
                want[i] = k.c0 * x0 + k.ct * (double)x[i] + (double)k.sigma * (noise ? z[i] : 0.0);
            }
            check("ddpm_step clip " + std::to_string(clip) + " noise " + std::to_string(noise), out, want, 1e-6);
        }
}

static void mse_kernels() {
    const uint n = 4, m = 333;
    Vec p = random(n * m, 9), y = random(n * m, 10), w = random(n, 11, 0.1f, 2.0f);
    for (uint has_w = 0; has_w < 2; has_w++) {
        std::string tag = has_w ? " (weights)" : "";
        // L = (1 / N) sum_i w_i (1 / M) sum_j (p_ij - y_ij)^2
        auto loss = [&](const Ref& pv) {
            double total = 0;
            for (uint i = 0; i < n; i++) {
                double s = 0;
                for (uint j = 0; j < m; j++) s += (pv[i * m + j] - y[i * m + j]) * (pv[i * m + j] - y[i * m + j]);
                total += (has_w ? w[i] : 1.0) * s / m;
            }
            return total / n;
        };
        Vec sums(n), out(1);
        run_groups(n, [&](uint g, uint t, float* sh) { ddpm_mse_sample_sums(p.data(), y.data(), w.data(), has_w, sums.data(), m, sh, g, t); });
        run_groups(1, [&](uint, uint t, float* sh) { ddpm_mse_total(sums.data(), n, out.data(), sh, t); });
        check("mse" + tag, out, {loss(widen(p))}, 1e-6);
        const float g = 1.7f;
        Vec dp(n * m, std::nanf(""));
        run_elementwise(n * m, [&](uint i) { ddpm_mse_backward(p.data(), y.data(), &g, w.data(), has_w, dp.data(), m, n * m, i); });
        Ref want = numeric_gradient(widen(p), [&](const Ref& pv) { return g * loss(pv); });
        check("mse_backward" + tag + " vs differences", dp, want, 1e-6);
    }
}

// The f64 group norm (+SiLU) of x (N, C, S) in `groups` groups.
static Ref group_norm_ref(const Ref& x, const Ref& gamma, const Ref& beta, uint n, uint c, uint groups, uint s, double eps, bool silu) {
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
            out[(size_t)ng * m + j] = silu ? y * sigmoid_ref(y) : y;
        }
    }
    return out;
}

static void group_norm_kernels() {
    struct Case { uint n, c, groups, s; bool silu; };
    // m = cg s below and above THREADS; s = 300 puts a channel's values on different threads in the two
    // passes of the backward
    for (Case cs : {Case{3, 8, 4, 37, false}, Case{2, 6, 3, 300, true}, Case{2, 4, 1, 5, true}}) {
        const uint n = cs.n, c = cs.c, groups = cs.groups, s = cs.s, numel = n * c * s;
        const float eps = 1e-5f;
        Vec x = random(numel, 12, -1.0f, 3.0f), gamma = random(c, 13, 0.5f, 1.5f), beta = random(c, 14), dout = random(numel, 15);
        GroupNormDims d{c, groups, c / groups, s, eps, cs.silu};
        std::string tag = " N" + std::to_string(n) + " C" + std::to_string(c) + " G" + std::to_string(groups) + " S" + std::to_string(s) + (cs.silu ? " silu" : "");
        Vec out(numel, std::nanf(""));
        run_groups(n * groups, [&](uint g, uint t, float* sh) { ddpm_group_norm(x.data(), gamma.data(), beta.data(), out.data(), d, sh, g, t); });
        Ref xr = widen(x), gr = widen(gamma), br = widen(beta), dr = widen(dout);
        check("group_norm" + tag, out, group_norm_ref(xr, gr, br, n, c, groups, s, eps, cs.silu), 1e-5);

        Vec dx(numel, std::nanf("")), part_a(n * c, std::nanf("")), part_b(n * c, std::nanf("")), dgamma(c), dbeta(c);
        run_groups(n * groups, [&](uint g, uint t, float* sh) {
            ddpm_group_norm_backward(x.data(), gamma.data(), beta.data(), dout.data(), dx.data(), part_a.data(), part_b.data(), d, sh, g, t);
        });
        run_elementwise(c, [&](uint i) { ddpm_group_norm_params(part_a.data(), part_b.data(), dgamma.data(), dbeta.data(), n, c, i); });
        // L = sum dout * group_norm(x, gamma, beta)
        auto loss = [&](const Ref& xv, const Ref& gv, const Ref& bv) { return dot(dr, group_norm_ref(xv, gv, bv, n, c, groups, s, eps, cs.silu)); };
        check("group_norm_backward dx" + tag + " vs differences", dx, numeric_gradient(xr, [&](const Ref& v) { return loss(v, gr, br); }), 1e-4);
        check("group_norm_params dgamma" + tag + " vs differences", dgamma, numeric_gradient(gr, [&](const Ref& v) { return loss(xr, v, br); }), 1e-4);
        check("group_norm_params dbeta" + tag + " vs differences", dbeta, numeric_gradient(br, [&](const Ref& v) { return loss(xr, gr, v); }), 1e-4);
    }
}

static Ref softmax_ref(const Ref& x, uint rows, uint cols) {
    Ref p(x.size());
    for (uint r = 0; r < rows; r++) {
        double mx = -INFINITY, s = 0;
        for (uint j = 0; j < cols; j++) mx = std::max(mx, x[r * cols + j]);
        for (uint j = 0; j < cols; j++) s += std::exp(x[r * cols + j] - mx);
        for (uint j = 0; j < cols; j++) p[r * cols + j] = std::exp(x[r * cols + j] - mx) / s;
    }
    return p;
}

static void softmax_kernels() {
    // rows shorter and longer than a threadgroup, and large logits (most e^(x - m) underflow)
    struct Case { uint cols; float amp; };
    for (Case cs : {Case{7, 4}, Case{300, 4}, Case{600, 4}, Case{700, 80}}) {
        const uint rows = 5, cols = cs.cols;
        Vec x = random(rows * cols, 16, -cs.amp, cs.amp), dp = random(rows * cols, 17);
        Vec p(rows * cols, std::nanf("")), dx(rows * cols, std::nanf(""));
        run_groups(rows, [&](uint g, uint t, float* sh) { ddpm_softmax_rows(x.data(), p.data(), cols, sh, g, t); });
        const std::string tag = " cols " + std::to_string(cols) + " amplitude " + std::to_string((int)cs.amp);
        check("softmax_rows" + tag, p, softmax_ref(widen(x), rows, cols), 1e-6);
        run_groups(rows, [&](uint g, uint t, float* sh) { ddpm_softmax_rows_backward(p.data(), dp.data(), dx.data(), cols, sh, g, t); });
        Ref dpr = widen(dp);
        Ref want = numeric_gradient(widen(x), [&](const Ref& v) { return dot(dpr, softmax_ref(v, rows, cols)); });
        check("softmax_rows_backward" + tag + " vs differences", dx, want, 1e-4);
    }
}

// splitmix64 as its author publishes it: state += GAMMA, then the finaliser.
static std::uint64_t splitmix_next(std::uint64_t& state) {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void dropout_kernel() {
    // splitmix64 seeded with 0 outputs 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F;
    // with threshold 2^31 an element is kept (and doubled) when its 32-bit half is >= 2^31
    Vec x{1, 2, 3, 4, 5, 6}, y(6, std::nanf(""));
    DropoutScalars k{0, 1ull << 31, 6, 2.0f};
    run_elementwise(6, [&](uint i) { ddpm_dropout(x.data(), y.data(), k, i); });
    check("dropout known answer", y, {0, 4, 6, 0, 10, 0}, 0.0);
    // the generator's sequence from another seed, over an odd length
    const uint n = 1001;
    Vec xs = random(n, 18), ys(n, std::nanf(""));
    DropoutScalars k2{~0ull, 0x4000'0000ull, n, 1.25f};
    run_elementwise(n, [&](uint i) { ddpm_dropout(xs.data(), ys.data(), k2, i); });
    Ref want(n);
    std::uint64_t state = k2.seed;
    for (uint j = 0; j < n; j += 2) {
        std::uint64_t r = splitmix_next(state);
        for (uint h = 0; h < 2 && j + h < n; h++) {
            std::uint64_t u = h ? r >> 32 : r & 0xFFFFFFFFull;
            want[j + h] = u >= k2.threshold ? xs[j + h] * k2.scale : 0.0f;  // the product in f32, as the kernel
        }
    }
    check("dropout vs splitmix64's sequence", ys, want, 0.0);
}

static void column_kernels() {
    struct Case { uint b, c, h, w, k, stride, pad; };
    for (Case cs : {Case{2, 3, 7, 6, 3, 1, 1}, Case{3, 2, 9, 8, 3, 2, 1}, Case{2, 4, 4, 5, 1, 1, 0}}) {
        const uint oh = (cs.h + 2 * cs.pad - cs.k) / cs.stride + 1, ow = (cs.w + 2 * cs.pad - cs.k) / cs.stride + 1;
        ColumnGeometry g{cs.b, cs.c, cs.h, cs.w, cs.k, cs.stride, cs.pad, oh, ow};
        const uint rows = cs.c * cs.k * cs.k, bl = cs.b * oh * ow, o = 3, numel = cs.b * cs.c * cs.h * cs.w;
        std::string tag = " B" + std::to_string(cs.b) + " C" + std::to_string(cs.c) + " " + std::to_string(cs.h) + "x" + std::to_string(cs.w) +
                          " k" + std::to_string(cs.k) + " s" + std::to_string(cs.stride) + " p" + std::to_string(cs.pad);
        Vec x = random(numel, 19), wt = random(o * rows, 20), dcols = random(rows * bl, 21);
        Vec cols(rows * bl, std::nanf(""));
        run_elementwise(rows * bl, [&](uint i) { ddpm_im2col(x.data(), cols.data(), g, rows * bl, i); });
        // The input pixel that column entry (r, j) stands for: row r = (c k + ki) k + kj, column
        // j = b L + oy OW + ox read x[b, c, oy S + ki - P, ox S + kj - P]; -1 in the zero padding.
        auto source = [&](uint r, uint j) -> long {
            const uint c = r / (cs.k * cs.k), ki = r / cs.k % cs.k, kj = r % cs.k;
            const uint b = j / (oh * ow), oy = j % (oh * ow) / ow, ox = j % ow;
            const int iy = (int)(oy * cs.stride + ki) - (int)cs.pad, ix = (int)(ox * cs.stride + kj) - (int)cs.pad;
            if (iy < 0 || ix < 0 || iy >= (int)cs.h || ix >= (int)cs.w) return -1;
            return ((long)(b * cs.c + c) * cs.h + iy) * cs.w + ix;
        };
        // W (O, C k k) @ cols against the convolution summed over channels and taps straight from x
        Vec product(o * bl);
        Ref direct(o * bl, 0.0);
        for (uint oc = 0; oc < o; oc++)
            for (uint j = 0; j < bl; j++) {
                double s = 0;
                for (uint r = 0; r < rows; r++) {
                    s += (double)wt[oc * rows + r] * cols[(size_t)r * bl + j];
                    if (long src = source(r, j); src >= 0) direct[oc * bl + j] += (double)wt[oc * rows + r] * x[src];
                }
                product[oc * bl + j] = (float)s;
            }
        check("im2col: W @ cols vs the direct convolution" + tag, product, direct, 1e-6);
        // col2im (a gather) against the scatter-add of every column entry onto the pixel it came from
        Vec dx(numel, std::nanf(""));
        run_elementwise(numel, [&](uint i) { ddpm_col2im(dcols.data(), dx.data(), g, numel, i); });
        Ref scattered(numel, 0.0);
        for (uint r = 0; r < rows; r++)
            for (uint j = 0; j < bl; j++)
                if (long src = source(r, j); src >= 0) scattered[src] += dcols[(size_t)r * bl + j];
        check("col2im vs the scatter-add" + tag, dx, scattered, 1e-6);
    }
}

int main() {
    optimiser_kernels();
    step_kernel();
    mse_kernels();
    group_norm_kernels();
    softmax_kernels();
    dropout_kernel();
    column_kernels();
    std::printf("%s: %d check(s) failed\n", failures ? "FAILED" : "passed", failures);
    return failures ? 1 : 0;
}
