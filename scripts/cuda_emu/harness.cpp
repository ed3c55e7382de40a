// Runs every CUDA kernel of the project (ddpm-core's and ddpm-unet's kernels.cu) on the CPU, through
// the stand-in of cuda_emu.h, and compares it with the references of scripts/kernel_emu/reference.h:
// the formula in f64, central differences of the f64 forward for the backward kernels, splitmix64's
// published sequence for dropout, and for the bf16/f16 kernels the f32 kernel's result rounded once.
// Each kernel is launched with the grid its Rust launcher gives it (ops::cuda::elementwise, per_block,
// the column kernels' two-dimensional grid), so the grid-stride loops and bounds checks run as on a
// GPU. Built and run by scripts/check_cuda.sh (no CUDA toolkit needed). Exit status 1 if any check fails.

#include "cuda_emu.h"
#include "../../crates/ddpm-core/src/ops/cuda/kernels.cu"
#include "../../crates/ddpm-unet/src/ops/cuda/kernels.cu"

#include <string>

#include "reference.h"  // scripts/kernel_emu: the f64 references and the checks, shared with the Metal harness

using cuda_emu::Dim3;
using ref::check;
using ref::random;
using ref::Ref;
using ref::Vec;
using ref::widen;

/// The grid of ops::cuda::elementwise(n): one thread per value, at most 65536 blocks (grid-stride).
static Dim3 elementwise(std::uint64_t n) { return {(std::uint32_t)std::clamp<std::uint64_t>((n + THREADS - 1) / THREADS, 1, 1 << 16), 1, 1}; }

/// The grid of ops::cuda::per_block(blocks).
static Dim3 per_block(std::uint64_t blocks) { return {(std::uint32_t)blocks, 1, 1}; }

/// `kernel` over `grid` with THREADS threads per block, with barriers when it calls __syncthreads.
static void run(Dim3 grid, bool barriers, const std::function<void()>& kernel) { cuda_emu::launch(grid, THREADS, barriers, kernel); }

/// Bounds for results rounded once to bf16 and f16: the unit roundoff (2^-8 for bf16's 8 significant
/// bits, 2^-11 for f16's 11) relative to the largest value, and 5% for the f32 arithmetic before it.
constexpr double BF16_TOL = 0x1p-8 * 1.05, F16_TOL = 0x1p-11 * 1.05;

/// `v` rounded to T and widened back to f32 (the values a T tensor holds).
template <typename T>
static Vec rounded(const Vec& v) {
    Vec out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = (float)T(v[i]);
    return out;
}

/// `v` as T values.
template <typename T>
static std::vector<T> narrow(const Vec& v) {
    return std::vector<T>(v.begin(), v.end());
}

/// T values widened to f32.
template <typename T>
static Vec widened(const std::vector<T>& v) {
    return Vec(v.begin(), v.end());
}

static void optimiser_kernels() {
    const std::uint64_t n = 1000;
    Vec x = random(n, 1), a0 = random(n, 2);
    const float keep = 0.9f, take = 0.1f;
    {
        Vec a = a0;
        run(elementwise(n), false, [&] { ddpm_ema(a.data(), x.data(), n, keep, take); });
        check("ema", a, ref::ema(a0, x, keep, take), 1e-6);
    }
    for (int square = 0; square < 2; square++) {
        Vec a = a0, scale{0.5f};
        run(elementwise(n), false, [&] { ddpm_adamw_moment(a.data(), x.data(), scale.data(), n, keep, take, square); });
        check(square ? "adamw_moment (squared)" : "adamw_moment", a, ref::moment(a0, x, scale[0], keep, take, square), 1e-6);
    }
    Vec theta = random(n, 3), m = random(n, 4), v = random(n, 5, 0.0f, 1.0f), theta0 = theta;
    const float decay = 0.999f, lr = 1e-3f, inv_bc1 = 1.1f, inv_bc2 = 1.3f, eps = 1e-8f;
    run(elementwise(n), false, [&] { ddpm_adamw_apply(theta.data(), m.data(), v.data(), n, decay, lr, inv_bc1, inv_bc2, eps); });
    check("adamw_apply", theta, ref::adamw_apply(widen(theta0), widen(m), widen(v), decay, lr, inv_bc1, inv_bc2, eps), 1e-6);
}

/// The table of the multi-tensor kernels (kernels.cu; built in Rust by ops::multi_tensor::table): each
/// list's addresses, the lengths, each chunk's tensor, each chunk's first element. Returns the chunks.
static std::uint32_t multi_table(const std::vector<std::vector<Vec>*>& lists, std::uint64_t chunk_len, std::vector<std::uint64_t>& table) {
    const size_t tensors = lists[0]->size();
    table.clear();
    for (auto* list : lists)
        for (auto& t : *list) table.push_back((std::uint64_t)(std::uintptr_t)t.data());
    std::vector<std::uint64_t> chunk_tensor, chunk_begin;
    for (size_t t = 0; t < tensors; t++) {
        const std::uint64_t len = (*lists[0])[t].size();
        table.push_back(len);
        for (std::uint64_t begin = 0; begin < len; begin += chunk_len) {
            chunk_tensor.push_back(t);
            chunk_begin.push_back(begin);
        }
    }
    table.insert(table.end(), chunk_tensor.begin(), chunk_tensor.end());
    table.insert(table.end(), chunk_begin.begin(), chunk_begin.end());
    return (std::uint32_t)chunk_tensor.size();
}

static void multi_tensor_kernels() {
    // lengths on both sides of a chunk of 300, an empty tensor, and one value; chunks this short put
    // several on one tensor (the launcher's are 32768 long)
    const std::vector<size_t> lens{1, 299, 300, 301, 0, 1000, 77};
    const std::uint64_t chunk_len = 300;
    const std::uint32_t tensors = (std::uint32_t)lens.size();
    auto make = [&](unsigned seed, float lo, float hi) {
        std::vector<Vec> ts;
        for (size_t i = 0; i < lens.size(); i++) ts.push_back(random(lens[i], seed + (unsigned)i, lo, hi));
        return ts;
    };
    auto flat = [](const std::vector<Vec>& ts) {
        Vec all;
        for (auto& t : ts) all.insert(all.end(), t.begin(), t.end());
        return all;
    };
    std::vector<Vec> theta = make(30, -2, 2), m = make(40, -1, 1), v = make(50, 0, 1), g = make(60, -3, 3), ema = make(70, -2, 2);
    const Vec theta0 = flat(theta), m0 = flat(m), v0 = flat(v), g0 = flat(g), ema0 = flat(ema);
    std::vector<std::uint64_t> table;

    // AdamW: the moments' and the apply's formulas, per value, on every tensor
    Vec scale{0.7f};
    const float keep1 = 0.9f, take1 = 0.1f, keep2 = 0.999f, take2 = 1e-3f, decay = 0.99f, lr = 1e-2f, inv_bc1 = 1.5f, inv_bc2 = 2.5f, eps = 1e-8f;
    std::uint32_t chunks = multi_table({&theta, &m, &v, &g}, chunk_len, table);
    run(per_block(chunks), false, [&] {
        ddpm_adamw_multi(table.data(), tensors, chunks, chunk_len, scale.data(), keep1, take1, keep2, take2, decay, lr, inv_bc1, inv_bc2, eps);
    });
    Ref m1 = ref::moment(m0, g0, scale[0], keep1, take1, false), v1 = ref::moment(v0, g0, scale[0], keep2, take2, true);
    check("adamw_multi m", flat(m), m1, 1e-6);
    check("adamw_multi v", flat(v), v1, 1e-6);
    check("adamw_multi theta", flat(theta), ref::adamw_apply(widen(theta0), m1, v1, decay, lr, inv_bc1, inv_bc2, eps), 1e-6);

    // the EMA towards the updated weights
    const Vec theta1 = flat(theta);
    chunks = multi_table({&ema, &theta}, chunk_len, table);
    run(per_block(chunks), false, [&] { ddpm_ema_multi(table.data(), tensors, chunks, chunk_len, 0.95f, 0.05f); });
    check("ema_multi", flat(ema), ref::ema(ema0, theta1, 0.95f, 0.05f), 1e-6);

    // the global norm of the gradients and the clipping scale: off, clipping, and not reached
    chunks = multi_table({&g}, chunk_len, table);
    std::vector<double> partials(chunks, std::nan(""));
    run(per_block(chunks), true, [&] { ddpm_sum_squares_multi(table.data(), tensors, chunks, chunk_len, partials.data()); });
    const double norm_ref = std::sqrt(ref::dot(widen(g0), widen(g0)));
    for (double max_norm : {0.0, 1.0, 1e4}) {
        double norm = std::nan("");
        Vec clip{std::nanf("")};
        run(per_block(1), true, [&] { ddpm_clip_scale(partials.data(), chunks, max_norm, &norm, clip.data()); });
        char tag[32];
        std::snprintf(tag, sizeof tag, " (max norm %g)", max_norm);
        check(std::string("sum_squares_multi + clip_scale: norm") + tag, {(float)norm}, {norm_ref}, 1e-7);
        const double want = max_norm > 0 ? std::min(1.0, max_norm / (norm_ref + 1e-6)) : 1.0;
        check(std::string("clip_scale: scale") + tag, clip, {want}, 1e-6);
    }
}

static void step_kernel() {
    const std::uint64_t n = 777;
    Vec m = random(n, 6), x = random(n, 7), z = random(n, 8);
    for (int clip = 0; clip < 2; clip++)
        for (int noise = 0; noise < 2; noise++) {
            ref::Step k{1.02, -0.2, 1.0, 0.3, 0.7, noise ? 0.05 : 0.0, clip != 0, noise != 0};
            Vec out(2 * n, std::nanf(""));
            run(elementwise(n), false, [&] { ddpm_step(m.data(), x.data(), z.data(), out.data(), n, k.cx, k.cm, clip, k.r, k.c0, k.ct, k.sigma, noise); });
            check("ddpm_step clip " + std::to_string(clip) + " noise " + std::to_string(noise), out, ref::ddpm_step(m, x, z, k), 1e-6);
        }
}

static void mse_kernels() {
    const std::uint64_t n = 4, m = 333;
    Vec p = random(n * m, 9), y = random(n * m, 10), w = random(n, 11, 0.1f, 2.0f);
    for (int has_w = 0; has_w < 2; has_w++) {
        std::string tag = has_w ? " (weights)" : "";
        auto loss = [&](const Ref& pv) { return ref::mse(pv, y, w, n, m, has_w); };
        std::vector<double> sums(n, std::nan(""));
        Vec out{std::nanf("")};
        run(per_block(n), true, [&] { ddpm_mse_sample_sums(p.data(), y.data(), w.data(), has_w, sums.data(), m); });
        run(per_block(1), true, [&] { ddpm_mse_total(sums.data(), n, out.data()); });
        check("mse" + tag, out, {loss(widen(p))}, 1e-6);
        const float g = 1.7f;
        Vec dp(n * m, std::nanf(""));
        run(elementwise(n * m), false, [&] { ddpm_mse_backward(p.data(), y.data(), &g, w.data(), has_w, dp.data(), m, n * m, 1.0 / (double)(n * m)); });
        check("mse_backward" + tag + " vs differences", dp, ref::numeric_gradient(widen(p), [&](const Ref& pv) { return g * loss(pv); }), 1e-6);
    }
}

/// The group norm forward in T (bf16 or f16) of case `cs`: against the f32 kernel on the same
/// (rounded) values, rounded once, exactly; and against the f64 reference within T's rounding `tol`.
template <typename T>
static void group_norm_half(const char* name, const ref::GroupNormCase& cs, const Vec& x, const Vec& gamma, const Vec& beta, double eps, double tol,
                            void (*kernel)(const T*, const float*, const float*, T*, std::uint64_t, std::uint64_t, std::uint64_t, double, int)) {
    const std::uint64_t numel = (std::uint64_t)cs.n * cs.c * cs.s, cg = cs.c / cs.groups;
    const Vec xr = rounded<T>(x);
    std::vector<T> xt = narrow<T>(xr), out(numel);
    run(per_block(cs.n * cs.groups), true, [&] { kernel(xt.data(), gamma.data(), beta.data(), out.data(), cs.groups, cg, cs.s, eps, cs.silu); });
    Vec f32(numel, std::nanf(""));
    run(per_block(cs.n * cs.groups), true, [&] { ddpm_group_norm(xr.data(), gamma.data(), beta.data(), f32.data(), cs.groups, cg, cs.s, eps, cs.silu); });
    check(std::string(name) + cs.tag() + " vs the f32 kernel rounded once", widened(out), widen(rounded<T>(f32)), 0.0);
    check(std::string(name) + cs.tag(), widened(out), ref::group_norm(widen(xr), widen(gamma), widen(beta), cs.n, cs.c, cs.groups, cs.s, eps, cs.silu), tol);
}

static void group_norm_kernels() {
    for (const ref::GroupNormCase& cs : ref::GROUP_NORM_CASES) {
        const std::uint64_t n = cs.n, c = cs.c, groups = cs.groups, s = cs.s, numel = n * c * s, cg = c / groups;
        const double eps = 1e-5;
        Vec x = random(numel, 12, -1.0f, 3.0f), gamma = random(c, 13, 0.5f, 1.5f), beta = random(c, 14), dout = random(numel, 15);
        Vec out(numel, std::nanf(""));
        run(per_block(n * groups), true, [&] { ddpm_group_norm(x.data(), gamma.data(), beta.data(), out.data(), groups, cg, s, eps, cs.silu); });
        check("group_norm" + cs.tag(), out, ref::group_norm(widen(x), widen(gamma), widen(beta), cs.n, cs.c, cs.groups, cs.s, eps, cs.silu), 1e-5);
        group_norm_half<__nv_bfloat16>("group_norm_bf16", cs, x, gamma, beta, eps, BF16_TOL, ddpm_group_norm_bf16);
        group_norm_half<__half>("group_norm_f16", cs, x, gamma, beta, eps, F16_TOL, ddpm_group_norm_f16);

        Vec dx(numel, std::nanf("")), dgamma(c, std::nanf("")), dbeta(c, std::nanf(""));
        std::vector<double> part_a(n * c, std::nan("")), part_b(n * c, std::nan(""));
        run(per_block(n * groups), true, [&] {
            ddpm_group_norm_backward(x.data(), gamma.data(), beta.data(), dout.data(), dx.data(), part_a.data(), part_b.data(), c, groups, cg, s, eps, cs.silu);
        });
        run(elementwise(c), false, [&] { ddpm_group_norm_params(part_a.data(), part_b.data(), dgamma.data(), dbeta.data(), n, c); });
        ref::check_group_norm_backward(cs, eps, x, gamma, beta, dout, dx, dgamma, dbeta);
    }
}

/// The column kernels' geometry arguments, in their order: B, C, H, W, K, stride, padding, OH, OW.
struct ColumnArgs {
    std::uint32_t b, c, h, w, k, s, p, oh, ow;
};

/// Column kernel `K` called with the geometry `g`.
template <typename T, void (*K)(const T*, T*, std::uint32_t, std::uint32_t, std::uint32_t, std::uint32_t, std::uint32_t, std::uint32_t, std::uint32_t,
                                std::uint32_t, std::uint32_t)>
static void column_call(const T* in, T* out, ColumnArgs g) {
    K(in, out, g.b, g.c, g.h, g.w, g.k, g.s, g.p, g.oh, g.ow);
}

/// The column kernels in T of geometry `cs` (the launcher's grid: x over the columns or pixels, y over
/// the rows or channels): im2col copies (checked through the product with the rounded input), col2im
/// sums in f32 and rounds once (within `tol`).
template <typename T>
static void column_kernels_in(const char* type, const ref::Columns& cs, double tol, void (*im2col)(const T*, T*, ColumnArgs),
                              void (*col2im)(const T*, T*, ColumnArgs)) {
    const std::uint32_t total = cs.rows() * cs.cols(), numel = cs.numel();
    const Vec x = rounded<T>(random(numel, 19)), dcols = rounded<T>(random(total, 21));
    const ColumnArgs g{cs.b, cs.c, cs.h, cs.w, cs.k, cs.stride, cs.pad, cs.oh(), cs.ow()};
    std::vector<T> xt = narrow<T>(x), cols(total), dct = narrow<T>(dcols), dx(numel);
    const auto grid = [](std::uint32_t threads, std::uint32_t rows) { return Dim3{(threads + 255) / 256, std::clamp<std::uint32_t>(rows, 1, 65535), 1}; };
    run(grid(cs.cols(), cs.rows()), false, [&] { im2col(xt.data(), cols.data(), g); });
    ref::check_im2col(std::string("im2col_") + type, cs, x, widened(cols), 1e-6);
    run(grid(cs.b * cs.h * cs.w, cs.c), false, [&] { col2im(dct.data(), dx.data(), g); });
    ref::check_col2im(std::string("col2im_") + type, cs, dcols, widened(dx), tol);
}

static void column_kernels() {
    for (const ref::Columns& cs : ref::COLUMN_CASES) {
        column_kernels_in<float>("f32", cs, 1e-6, column_call<float, ddpm_im2col_f32>, column_call<float, ddpm_col2im_f32>);
        column_kernels_in<__nv_bfloat16>("bf16", cs, BF16_TOL, column_call<__nv_bfloat16, ddpm_im2col_bf16>, column_call<__nv_bfloat16, ddpm_col2im_bf16>);
        column_kernels_in<__half>("f16", cs, F16_TOL, column_call<__half, ddpm_im2col_f16>, column_call<__half, ddpm_col2im_f16>);
    }
}

/// The bias kernel in T on y (B, O, L), shared (O) or per image (B, O): against y + bias in f64,
/// within T's rounding `tol`.
template <typename T>
static void bias_kernel_in(const char* type, double tol, void (*kernel)(T*, const T*, std::uint64_t, std::uint32_t, std::uint32_t, std::uint32_t)) {
    const std::uint32_t b = 3, o = 5, l = 97;
    const std::uint64_t n = (std::uint64_t)b * o * l;
    for (std::uint32_t per_image = 0; per_image < 2; per_image++) {
        const Vec y0 = rounded<T>(random(n, 22)), bias = rounded<T>(random(per_image ? b * o : o, 23));
        std::vector<T> y = narrow<T>(y0), bt = narrow<T>(bias);
        run(elementwise(n), false, [&] { kernel(y.data(), bt.data(), n, o, l, per_image); });
        Ref want(n);
        for (std::uint64_t i = 0; i < n; i++) want[i] = (double)y0[i] + bias[(per_image ? i / l / o : 0) * o + i / l % o];
        check(std::string("add_bias_") + type + (per_image ? " per image" : " shared"), widened(y), want, tol);
    }
}

static void softmax_kernels() {
    for (const ref::SoftmaxCase& cs : ref::SOFTMAX_CASES) {
        const std::uint64_t rows = 5, cols = cs.cols;
        Vec x = random(rows * cols, 16, -cs.amp, cs.amp), dp = random(rows * cols, 17);
        Vec p(rows * cols, std::nanf("")), dx(rows * cols, std::nanf(""));
        run(per_block(rows), true, [&] { ddpm_softmax_rows(x.data(), p.data(), cols); });
        run(per_block(rows), true, [&] { ddpm_softmax_rows_backward(p.data(), dp.data(), dx.data(), cols); });
        ref::check_softmax(cs, (std::uint32_t)rows, x, p, dp, dx);
    }
}

static void dropout_kernel() {
    // splitmix64 seeded with 0 outputs 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F;
    // with threshold 2^31 an element is kept (and doubled) when its 32-bit half is >= 2^31
    Vec x{1, 2, 3, 4, 5, 6}, y(6, std::nanf(""));
    run(elementwise(6), false, [&] { ddpm_dropout(x.data(), y.data(), 6, 0, 1ull << 31, 2.0f); });
    check("dropout known answer", y, {0, 4, 6, 0, 10, 0}, 0.0);
    // the generator's sequence from another seed, over an odd length
    const std::uint64_t n = 1001, seed = ~0ull, threshold = 0x4000'0000ull;
    Vec xs = random(n, 18), ys(n, std::nanf(""));
    run(elementwise(n), false, [&] { ddpm_dropout(xs.data(), ys.data(), n, seed, threshold, 1.25f); });
    check("dropout vs splitmix64's sequence", ys, ref::dropout(xs, seed, threshold, 1.25f), 0.0);
}

int main() {
    optimiser_kernels();
    multi_tensor_kernels();
    step_kernel();
    mse_kernels();
    group_norm_kernels();
    column_kernels();
    bias_kernel_in<float>("f32", 1e-7, ddpm_add_bias_f32);
    bias_kernel_in<__nv_bfloat16>("bf16", BF16_TOL, ddpm_add_bias_bf16);
    bias_kernel_in<__half>("f16", F16_TOL, ddpm_add_bias_f16);
    softmax_kernels();
    dropout_kernel();
    std::printf("%s: %d check(s) failed\n", ref::failures ? "FAILED" : "passed", ref::failures);
    return ref::failures ? 1 : 0;
}
