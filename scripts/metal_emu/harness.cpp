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

#include <cstddef>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "reference.h"  // scripts/kernel_emu: the f64 references and the checks, shared with the CUDA harness

// The layouts that the Rust launchers write as 4-byte words (Arg::Words in src/ops/metal.rs, field
// by field in this order); Metal lays these structs out as C++ does here (natural alignment).
static_assert(sizeof(AdamwScalars) == 5 * 4);
static_assert(sizeof(StepScalars) == 8 * 4 && offsetof(StepScalars, clip) == 6 * 4 && offsetof(StepScalars, with_noise) == 7 * 4);
static_assert(sizeof(GroupNormDims) == 6 * 4 && offsetof(GroupNormDims, eps) == 4 * 4 && offsetof(GroupNormDims, silu) == 5 * 4);
static_assert(sizeof(DropoutScalars) == 6 * 4 && offsetof(DropoutScalars, threshold) == 2 * 4 && offsetof(DropoutScalars, n) == 4 * 4 &&
              offsetof(DropoutScalars, scale) == 5 * 4);
static_assert(sizeof(ColumnGeometry) == 9 * 4 && offsetof(ColumnGeometry, ow) == 8 * 4);

using ref::check;
using ref::random;
using ref::Ref;
using ref::Vec;
using ref::widen;

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

static void optimiser_kernels() {
    const uint n = 1000;
    Vec x = random(n, 1), a0 = random(n, 2);
    const float keep = 0.9f, take = 0.1f;
    {
        Vec a = a0;
        run_elementwise(n, [&](uint i) { ddpm_ema(a.data(), x.data(), n, keep, take, i); });
        check("ema", a, ref::ema(a0, x, keep, take), 1e-6);
    }
    for (uint square = 0; square < 2; square++) {
        Vec a = a0, scale{0.5f};
        run_elementwise(n, [&](uint i) { ddpm_adamw_moment(a.data(), x.data(), scale.data(), n, keep, take, square, i); });
        check(square ? "adamw_moment (squared)" : "adamw_moment", a, ref::moment(a0, x, scale[0], keep, take, square), 1e-6);
    }
    Vec theta = random(n, 3), m = random(n, 4), v = random(n, 5, 0.0f, 1.0f), theta0 = theta;
    AdamwScalars k{0.999f, 1e-3f, 1.1f, 1.3f, 1e-8f};
    run_elementwise(n, [&](uint i) { ddpm_adamw_apply(theta.data(), m.data(), v.data(), n, k, i); });
    check("adamw_apply", theta, ref::adamw_apply(widen(theta0), widen(m), widen(v), k.decay, k.lr, k.inv_bc1, k.inv_bc2, k.eps), 1e-6);
}

static void step_kernel() {
    const uint n = 777;
    Vec m = random(n, 6), x = random(n, 7), z = random(n, 8);
    for (uint clip = 0; clip < 2; clip++)
        for (uint noise = 0; noise < 2; noise++) {
            StepScalars k{1.02f, -0.2f, 1.0f, 0.3f, 0.7f, noise ? 0.05f : 0.0f, clip, noise};
            Vec out(2 * n, std::nanf(""));
            run_elementwise(n, [&](uint i) { ddpm_step(m.data(), x.data(), z.data(), out.data(), n, k, i); });
            ref::Step want{k.cx, k.cm, k.r, k.c0, k.ct, k.sigma, clip != 0, noise != 0};
            check("ddpm_step clip " + std::to_string(clip) + " noise " + std::to_string(noise), out, ref::ddpm_step(m, x, z, want), 1e-6);
        }
}

static void mse_kernels() {
    const uint n = 4, m = 333;
    Vec p = random(n * m, 9), y = random(n * m, 10), w = random(n, 11, 0.1f, 2.0f);
    for (uint has_w = 0; has_w < 2; has_w++) {
        std::string tag = has_w ? " (weights)" : "";
        auto loss = [&](const Ref& pv) { return ref::mse(pv, y, w, n, m, has_w); };
        Vec sums(n), out(1);
        run_groups(n, [&](uint g, uint t, float* sh) { ddpm_mse_sample_sums(p.data(), y.data(), w.data(), has_w, sums.data(), m, sh, g, t); });
        run_groups(1, [&](uint, uint t, float* sh) { ddpm_mse_total(sums.data(), n, out.data(), sh, t); });
        check("mse" + tag, out, {loss(widen(p))}, 1e-6);
        const float g = 1.7f;
        Vec dp(n * m, std::nanf(""));
        run_elementwise(n * m, [&](uint i) { ddpm_mse_backward(p.data(), y.data(), &g, w.data(), has_w, dp.data(), m, n * m, i); });
        Ref want = ref::numeric_gradient(widen(p), [&](const Ref& pv) { return g * loss(pv); });
        check("mse_backward" + tag + " vs differences", dp, want, 1e-6);
    }
}

static void group_norm_kernels() {
    for (const ref::GroupNormCase& cs : ref::GROUP_NORM_CASES) {
        const uint n = cs.n, c = cs.c, groups = cs.groups, s = cs.s, numel = n * c * s;
        const float eps = 1e-5f;
        Vec x = random(numel, 12, -1.0f, 3.0f), gamma = random(c, 13, 0.5f, 1.5f), beta = random(c, 14), dout = random(numel, 15);
        GroupNormDims d{c, groups, c / groups, s, eps, cs.silu};
        Vec out(numel, std::nanf(""));
        run_groups(n * groups, [&](uint g, uint t, float* sh) { ddpm_group_norm(x.data(), gamma.data(), beta.data(), out.data(), d, sh, g, t); });
        check("group_norm" + cs.tag(), out, ref::group_norm(widen(x), widen(gamma), widen(beta), n, c, groups, s, eps, cs.silu), 1e-5);

        Vec dx(numel, std::nanf("")), part_a(n * c, std::nanf("")), part_b(n * c, std::nanf("")), dgamma(c), dbeta(c);
        run_groups(n * groups, [&](uint g, uint t, float* sh) {
            ddpm_group_norm_backward(x.data(), gamma.data(), beta.data(), dout.data(), dx.data(), part_a.data(), part_b.data(), d, sh, g, t);
        });
        run_elementwise(c, [&](uint i) { ddpm_group_norm_params(part_a.data(), part_b.data(), dgamma.data(), dbeta.data(), n, c, i); });
        ref::check_group_norm_backward(cs, eps, x, gamma, beta, dout, dx, dgamma, dbeta);
    }
}

static void softmax_kernels() {
    for (const ref::SoftmaxCase& cs : ref::SOFTMAX_CASES) {
        const uint rows = 5, cols = cs.cols;
        Vec x = random(rows * cols, 16, -cs.amp, cs.amp), dp = random(rows * cols, 17);
        Vec p(rows * cols, std::nanf("")), dx(rows * cols, std::nanf(""));
        run_groups(rows, [&](uint g, uint t, float* sh) { ddpm_softmax_rows(x.data(), p.data(), cols, sh, g, t); });
        run_groups(rows, [&](uint g, uint t, float* sh) { ddpm_softmax_rows_backward(p.data(), dp.data(), dx.data(), cols, sh, g, t); });
        ref::check_softmax(cs, rows, x, p, dp, dx);
    }
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
    check("dropout vs splitmix64's sequence", ys, ref::dropout(xs, k2.seed, k2.threshold, k2.scale), 0.0);
}

static void column_kernels() {
    for (const ref::Columns& cs : ref::COLUMN_CASES) {
        ColumnGeometry g{cs.b, cs.c, cs.h, cs.w, cs.k, cs.stride, cs.pad, cs.oh(), cs.ow()};
        const uint total = cs.rows() * cs.cols(), numel = cs.numel();
        Vec x = random(numel, 19), dcols = random(total, 21);
        Vec cols(total, std::nanf(""));
        run_elementwise(total, [&](uint i) { ddpm_im2col(x.data(), cols.data(), g, total, i); });
        ref::check_im2col("im2col", cs, x, cols, 1e-6);
        Vec dx(numel, std::nanf(""));
        run_elementwise(numel, [&](uint i) { ddpm_col2im(dcols.data(), dx.data(), g, numel, i); });
        ref::check_col2im("col2im", cs, dcols, dx, 1e-6);
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
    std::printf("%s: %d check(s) failed\n", ref::failures ? "FAILED" : "passed", ref::failures);
    return ref::failures ? 1 : 0;
}
