//! Nearest x2 upsampling followed by a 3x3 "same" convolution (a UNet's upsampler), computed on the
//! low-resolution input as four 2x2 convolutions, one per output phase: 4/9 of the flops of the 3x3
//! convolution on the upsampled image, which is never built.
//!
//! With u the upsampled image (u[2i + a', 2j + b'] = x[i, j]), output pixel (2i + a, 2j + b) of the
//! 3x3 convolution reads u's rows 2i + a + ki - 1 (ki = 0, 1, 2), which are x's rows
//! i + floor((a + ki - 1) / 2): only two distinct rows, i + a - 1 + t with tap t = t(a, ki) =
//! ceil((a + ki) / 2) - a in {0, 1}; the same holds for the columns. So phase (a, b),
//! the outputs y[:, 2i + a, 2j + b], is the 2x2 convolution of x with the phase kernel
//!
//!   K_ab[o, c, t, s] = sum of W[o, c, ki, kj] over t(a, ki) = t and t(b, kj) = s
//!
//! whose window starts at (i + a - 1, j + b - 1): a same-size convolution with top/left padding
//! (1 - a, 1 - b). The zero padding agrees: u's rows -1 and 2H are x's rows -1 and H.
//!
//! The backward, per phase, with dY_ab = dy[:, a::2, b::2] and cols_ab the phase's column matrix:
//!
//!   dK_ab = dY_ab @ cols_ab^T,   dW[o, c, ki, kj] = sum over a, b of dK_ab[o, c, t(a, ki), t(b, kj)]
//!   dx   += the same-size 2x2 convolution of dY_ab with flip(K_ab) and padding (a, b)
//!
//! the last being the adjoint of the phase convolution: x's pixel (i', j') met dY_ab[i, j] through tap
//! (t, s) when i' = i + t - 1 + a, i.e. i = i' + (1 - t) - a.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::conv::{im2col_shifted, image_bias, Plane};
use super::direct_conv;
use super::matmul::{assume_init_vec, inner_parallelism, sgemm, uninit_vec, with_scratch, View};

/// The four output phases (a, b): row parity a, column parity b.
pub(crate) const PHASES: [(usize, usize); 4] = [(0, 0), (0, 1), (1, 0), (1, 1)];

/// Tap t(a, k) in {0, 1} of the phase-`a` 2x2 kernel that 3x3 kernel index `k` joins.
fn tap(a: usize, k: usize) -> usize {
    // t = floor((a + k - 1) / 2) - (a - 1) = ceil((a + k) / 2) - a
    (a + k).div_ceil(2) - a
}

thread_local! {
    /// Per-thread scratch for one phase's column matrix (4 C, H W).
    static COLS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Per-thread scratch for one phase's output or output gradient (O, H W).
    static PHASE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Per-thread scratch for the column matrix of one phase's output gradient (4 O, H W).
    static DCOLS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The phase kernels K_ab (O, C, 2, 2) of a 3x3 kernel w (O, C, 3, 3), in [`PHASES`] order.
fn phase_kernels(w: &[f32]) -> [Vec<f32>; 4] {
    PHASES.map(|(a, b)| {
        let mut k = vec![0f32; w.len() / 9 * 4];
        for (kc, wc) in k.chunks_exact_mut(4).zip(w.chunks_exact(9)) {
            for (r, &v) in wc.iter().enumerate() {
                // K_ab[o, c, t(a, ki), t(b, kj)] += W[o, c, ki, kj]
                kc[tap(a, r / 3) * 2 + tap(b, r % 3)] += v;
            }
        }
        k
    })
}

/// The pixels of phase (a, b) in one plane: (index in the 2H x 2W plane, index in the H x W phase
/// plane), for the pixels (2i + a, 2j + b).
fn phase_pixels((h, w): (usize, usize), (a, b): (usize, usize)) -> impl Iterator<Item = (usize, usize)> {
    (0..h).flat_map(move |i| (0..w).map(move |j| ((2 * i + a) * 2 * w + 2 * j + b, i * w + j)))
}

/// Writes `phase` (rows, H W) into phase (a, b) of the (rows, 2H, 2W) image `full`.
fn scatter_phase(phase: &[f32], full: &mut [MaybeUninit<f32>], (h, w): (usize, usize), ab: (usize, usize)) {
    for (f, p) in full.chunks_exact_mut(4 * h * w).zip(phase.chunks_exact(h * w)) {
        phase_pixels((h, w), ab).for_each(|(fi, pi)| {
            f[fi].write(p[pi]);
        });
    }
}

/// Reads phase (a, b) of the (rows, 2H, 2W) image `full` into `phase` (rows, H W).
fn gather_phase(full: &[f32], phase: &mut [f32], (h, w): (usize, usize), ab: (usize, usize)) {
    for (f, p) in full.chunks_exact(4 * h * w).zip(phase.chunks_exact_mut(h * w)) {
        phase_pixels((h, w), ab).for_each(|(fi, pi)| p[pi] = f[fi]);
    }
}

/// y (B, O, 2H, 2W) = conv3x3(up2(x)) + bias for x (B, C, H, W), w (O, C, 3, 3) and bias (O) or
/// (B, O): the phase convolutions by the direct kernel (`ops/direct_conv.rs`) on CPUs with AVX2 and
/// FMA, else by im2col and a matrix product.
pub(crate) fn forward(p: Plane, b: usize, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
    let kernels = phase_kernels(w);
    if direct_conv::available() {
        direct_conv::upsample_forward(p, b, x, &kernels, bias)
    } else {
        forward_im2col(p, b, x, &kernels, bias)
    }
}

/// [`forward`] by im2col and one matrix product per phase and image, from the phase kernels.
fn forward_im2col(p: Plane, b: usize, x: &[f32], kernels: &[Vec<f32>; 4], bias: &[f32]) -> Vec<f32> {
    let (hw, o) = (p.h * p.w, kernels[0].len() / (4 * p.c));
    let par = inner_parallelism(b);
    let mut y = uninit_vec(b * o * 4 * hw);
    y.par_chunks_mut(o * 4 * hw).zip(x.par_chunks(p.c * hw)).enumerate().for_each(|(bi, (yb, xb))| {
        with_scratch(&COLS, 4 * p.c * hw, |cols| {
            with_scratch(&PHASE, o * hw, |out| {
                for (&(a, bb), k) in PHASES.iter().zip(kernels) {
                    im2col_shifted(p, 2, (1 - a, 1 - bb), xb, cols);
                    // out (O, H W) = bias + K_ab (O, 4 C) @ cols_ab
                    for (row, &bv) in out.chunks_exact_mut(hw).zip(image_bias(bias, o, bi)) {
                        row.fill(bv);
                    }
                    unsafe { sgemm((o, hw, 4 * p.c), out, true, 1.0, View::rows(k, 4 * p.c), View::rows(cols, hw), par) };
                    scatter_phase(out, yb, (p.h, p.w), (a, bb));
                }
            })
        })
    });
    // SAFETY: the four phases write every pixel of every plane
    unsafe { assume_init_vec(y) }
}

/// dx (B, C, H, W, zero on entry) and dW (O, C, 3, 3) of [`forward`] for the output gradient dy.
/// The images are split into one fixed group per thread, each group sums its phase-kernel gradients
/// in image order and the groups are added in order, so the result does not depend on scheduling.
pub(crate) fn backward(p: Plane, b: usize, x: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], dw_total: &mut [f32]) {
    let (hw, c, o) = (p.h * p.w, p.c, w.len() / (9 * p.c));
    // flip(K_ab) (C, O, 2, 2): the kernels of the adjoint convolutions
    let flipped = phase_kernels(w).map(|k| super::conv::flip_kernel(&k, o, c, 2));
    let par = inner_parallelism(b);
    let per_group = b.div_ceil(rayon::current_num_threads().max(1)).max(1);
    let dy_plane = Plane { c: o, ..p };
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(per_group * c * hw)
        .zip(x.par_chunks(per_group * c * hw))
        .zip(dy.par_chunks(per_group * o * 4 * hw))
        .map(|((dxg, xg), dyg)| {
            // dK_ab (O, 4 C) for the four phases, one after the other
            let mut dk = vec![0f32; 4 * o * 4 * c];
            for ((dxb, xb), dyb) in dxg.chunks_exact_mut(c * hw).zip(xg.chunks_exact(c * hw)).zip(dyg.chunks_exact(o * 4 * hw)) {
                for (ph, (&(a, bb), wf)) in PHASES.iter().zip(&flipped).enumerate() {
                    with_scratch(&PHASE, o * hw, |dyp| {
                        gather_phase(dyb, dyp, (p.h, p.w), (a, bb));
                        // dK_ab += dY_ab @ cols_ab^T
                        with_scratch(&COLS, 4 * c * hw, |cols| {
                            im2col_shifted(p, 2, (1 - a, 1 - bb), xb, cols);
                            let dkp = &mut dk[ph * o * 4 * c..(ph + 1) * o * 4 * c];
                            unsafe { sgemm((o, 4 * c, hw), dkp, true, 1.0, View::rows(dyp, hw), View::transposed(cols, hw), par) };
                        });
                        // dx_b += flip(K_ab) (C, 4 O) @ im2col(dY_ab) with padding (a, b)
                        with_scratch(&DCOLS, 4 * o * hw, |dcols| {
                            im2col_shifted(dy_plane, 2, (a, bb), dyp, dcols);
                            unsafe { sgemm((c, hw, 4 * o), dxb, true, 1.0, View::rows(wf, 4 * o), View::rows(dcols, hw), par) };
                        });
                    });
                }
            }
            dk
        })
        .collect();
    for dk in &partials {
        for (ph, &(a, bb)) in PHASES.iter().enumerate() {
            let dkp = &dk[ph * o * 4 * c..(ph + 1) * o * 4 * c];
            for (dwc, dkc) in dw_total.chunks_exact_mut(9).zip(dkp.chunks_exact(4)) {
                for (r, d) in dwc.iter_mut().enumerate() {
                    // dW[o, c, ki, kj] += dK_ab[o, c, t(a, ki), t(b, kj)]
                    *d += dkc[tap(a, r / 3) * 2 + tap(bb, r % 3)];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct kernel's phase convolutions agree with im2col + products (the integration tests
    /// reach only the one the CPU selects).
    #[test]
    fn direct_and_im2col_phases_agree() {
        if !direct_conv::available() {
            return;
        }
        // sides odd and even, output channels in whole and partial blocks, a shared and a per-image bias
        for (b, c, o, h, w, per_image) in [(2, 3, 5, 5, 4, false), (1, 8, 4, 3, 7, true), (3, 1, 1, 1, 1, false)] {
            let value = |i: usize, k: usize| ((i * 7919 + k * 104_729) % 1000) as f32 / 500.0 - 1.0;
            let x: Vec<f32> = (0..b * c * h * w).map(|i| value(i, 1)).collect();
            let wt: Vec<f32> = (0..o * c * 9).map(|i| value(i, 2)).collect();
            let bias: Vec<f32> = (0..if per_image { b * o } else { o }).map(|i| value(i, 3)).collect();
            let p = Plane { c, h, w };
            let kernels = phase_kernels(&wt);
            let direct = direct_conv::upsample_forward(p, b, &x, &kernels, &bias);
            let im2col = forward_im2col(p, b, &x, &kernels, &bias);
            let diff = direct.iter().zip(&im2col).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-5, "b {b}, c {c}, o {o}, {h}x{w}: differ by {diff}");
        }
    }
}
