//! Direct 3x3 stride-1 "same" convolution with AVX2 + FMA for the narrow layers (fewer than
//! `WINOGRAD_MIN_CHANNELS` input channels), where im2col + a matrix product spends as much time
//! building and packing the column matrix as multiplying: here each block of 4 output channels x 16
//! positions is accumulated in 8 vector registers straight from the input planes.
//!
//! Each input plane is first copied into a zero-padded plane of width W' = W + 1: a zero row above
//! and below, and one zero column that serves as both the right padding of a row and the left
//! padding of the next. Output position (i, j) reads padded pixels (i + ki, j + kj) for the taps
//! (ki, kj). Flattening the padded grid, output p = i W' + j reads input p + ki W' + kj: the output
//! rows run together into one contiguous range of H W' positions (the column j = W of each row is
//! computed and dropped), so the kernel has no edges to handle. The weights are repacked per block of
//! 4 output channels as [c][tap][4] (zero for channels past O), so a block's inner step is 2 loads of
//! 8 positions, 4 broadcasts and 8 fused multiply-adds:
//!
//!   out[o, p] = sum over c, ki, kj of W[o, c, ki, kj] padded[c, p + ki W' + kj]
//!   y[o, i, j] = out[o, i W' + j] + bias[o]
//!
//! The upsampler's four 2x2 phase convolutions (`ops/upsample_conv.rs`) run on the same padded planes
//! with 4 taps each instead of 9, their outputs placed on every other pixel ([`upsample_forward`]).
//!
//! Only on x86-64 CPUs with AVX2 and FMA ([`available`]); elsewhere the caller keeps im2col.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::conv::{image_bias, Plane};
use super::matmul::{as_uninit, assume_init_vec, uninit_vec, with_scratch};
use super::upsample_conv::PHASES;

/// Output channels per block.
const OB: usize = 4;
/// 8-lane vectors of positions per block.
const PV: usize = 2;
/// Positions per block.
const PB: usize = 8 * PV;

/// Whether the direct kernel can run here: x86-64 with AVX2 and FMA.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The padded layout of one image: width W' = W + 1, the flattened output range rounded up to whole
/// blocks, and the stride between padded planes (room for the last block's farthest tap).
#[derive(Debug, Clone, Copy)]
struct Padded {
    /// Width of a padded row: W + 1.
    wp: usize,
    /// Output positions computed per plane: H W' rounded up to whole blocks of [`PB`].
    positions: usize,
    /// Values per padded plane.
    plane: usize,
}

impl Padded {
    fn new(p: Plane) -> Self {
        let wp = p.w + 1;
        let positions = (p.h * wp).div_ceil(PB) * PB;
        // the last block reads up to positions - 1 + 2 W' + 2; (H + 2) W' covers the padded image
        let plane = (positions + 2 * wp + 2).max((p.h + 2) * wp).div_ceil(8) * 8;
        Padded { wp, positions, plane }
    }
}

/// The zero-padded planes (B, C, plane) of the images x (B, C, H, W): pixel (i, j) of plane c goes
/// to (i + 1) W' + j + 1, everything else is 0 (row 0, row H + 1 and on, and column 0, which padded
/// row i + 1 reads as column W' when it reaches past its right edge). One pass writes each value once.
fn padded(p: Plane, pd: Padded, x: &[f32]) -> Vec<f32> {
    let mut padded = uninit_vec(x.len() / (p.h * p.w) * pd.plane);
    let zero = MaybeUninit::new(0f32);
    padded.par_chunks_mut(pd.plane).zip(x.par_chunks(p.h * p.w)).for_each(|(dst, src)| {
        // the top row and row 1's left padding
        dst[..pd.wp + 1].fill(zero);
        for (i, row) in src.chunks_exact(p.w).enumerate() {
            let at = (i + 1) * pd.wp + 1;
            for (d, &v) in dst[at..at + p.w].iter_mut().zip(row) {
                d.write(v);
            }
            // column 0 of padded row i + 2: row i's right padding and row i + 1's left padding
            dst[at + p.w..at + pd.wp].fill(zero);
        }
        // the bottom row and the tail
        dst[(p.h + 1) * pd.wp + 1..].fill(zero);
    });
    // SAFETY: the ranges above cover every plane from 0 to pd.plane
    unsafe { assume_init_vec(padded) }
}

/// W (O, C, T) (T taps per kernel, e.g. a 3x3 kernel's 9) repacked per block of [`OB`] output
/// channels as [c][tap][OB], zero for the channels past O.
fn pack_weights(w: &[f32], o: usize, c: usize, t: usize) -> Vec<f32> {
    let blocks = o.div_ceil(OB);
    let mut packed = vec![0f32; blocks * c * t * OB];
    for (oi, wo) in w.chunks_exact(c * t).enumerate() {
        let (blk, lane) = (oi / OB, oi % OB);
        for (ci, kernel) in wo.chunks_exact(t).enumerate() {
            for (ti, &v) in kernel.iter().enumerate() {
                packed[((blk * c + ci) * t + ti) * OB + lane] = v;
            }
        }
    }
    packed
}

/// The padded-plane offsets of a 3x3 kernel's taps (ki, kj): ki W' + kj.
fn taps_3x3(pd: Padded) -> [usize; 9] {
    std::array::from_fn(|t| (t / 3) * pd.wp + t % 3)
}

/// Where a block's outputs go: output p = i W' + j (i < H, j < W) of channel o is written to
/// y[o * plane + start + i * row + j * col] of the image's output.
#[derive(Debug, Clone, Copy)]
struct Placement {
    /// Values per output channel.
    plane: usize,
    /// Distance between consecutive output rows i.
    row: usize,
    /// Distance between consecutive output columns j.
    col: usize,
    /// Where output (0, 0) goes.
    start: usize,
}

impl Placement {
    /// Same-size output, row by row: y[o, i, j].
    fn dense(p: Plane) -> Self {
        Placement { plane: p.h * p.w, row: p.w, col: 1, start: 0 }
    }
}

/// y (B, O, H, W) = conv3x3(x, w, padding 1) + bias for x (B, C, H, W), w (O, C, 3, 3) and bias (O) or
/// (B, O). Requires [`available`].
pub(crate) fn forward(p: Plane, b: usize, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
    let pd = Padded::new(p);
    let mut y = uninit_vec(b * w.len() / (9 * p.c) * p.h * p.w);
    conv_padded(p, pd, &padded(p, pd, x), (w, taps_3x3(pd)), bias, &mut y, Placement::dense(p));
    // SAFETY: conv_padded writes every output value
    unsafe { assume_init_vec(y) }
}

/// y = the convolution + bias of the images whose padded planes (B, C, plane) are `xp`, with the
/// kernel (w (O, C, T), taps) whose tap t reads padded offset taps[t] from the output position, the
/// outputs placed by `place`; every value of y that `place` names is written.
fn conv_padded<const T: usize>(
    p: Plane,
    pd: Padded,
    xp: &[f32],
    (w, taps): (&[f32], [usize; T]),
    bias: &[f32],
    y: &mut [MaybeUninit<f32>],
    place: Placement,
) {
    let o = w.len() / (T * p.c);
    let packed = pack_weights(w, o, p.c, T);
    y.par_chunks_mut(o * place.plane).zip(xp.par_chunks(p.c * pd.plane)).enumerate().for_each(|(bi, (yb, xb))| {
        let bias = image_bias(bias, o, bi);
        yb.par_chunks_mut(OB * place.plane).enumerate().for_each(|(blk, yblk)| {
            with_scratch(&OUT, OB * pd.positions, |out| {
                let wk = &packed[blk * p.c * T * OB..(blk + 1) * p.c * T * OB];
                // SAFETY: `available` was checked by the caller; xb holds C planes of pd.plane values,
                // out OB rows of pd.positions, wk C T OB weights, and every tap lies within 2 W' + 2
                unsafe { block_row(xb, pd, p.c, (wk, &taps), out) };
                for (lane, yo) in yblk.chunks_exact_mut(place.plane).enumerate() {
                    let (src, bv) = (&out[lane * pd.positions..], bias[blk * OB + lane]);
                    for i in 0..p.h {
                        // y[o, i, j] = out[o, i W' + j] + bias[o], at the place of (i, j)
                        let (row, dst) = (&src[i * pd.wp..i * pd.wp + p.w], &mut yo[place.start + i * place.row..]);
                        // contiguous rows (the plain convolution) as a plain zip, which vectorises
                        if place.col == 1 {
                            dst.iter_mut().zip(row).for_each(|(d, s)| {
                                d.write(s + bv);
                            });
                        } else {
                            dst.iter_mut().step_by(place.col).zip(row).for_each(|(d, s)| {
                                d.write(s + bv);
                            });
                        }
                    }
                }
            })
        });
    });
}

/// y (B, O, 2H, 2W) = conv3x3(up2(x)) + bias of a nearest x2 upsampling and a 3x3 convolution, for
/// x (B, C, H, W), bias (O) or (B, O) and the kernels (O, C, 2, 2) of the four output phases in
/// `upsample_conv::PHASES` order: phase (a, b) is a 2x2 convolution whose tap (t, s)
/// reads x[i + a - 1 + t, j + b - 1 + s], padded offset (a + t) W' + b + s from output i W' + j, and
/// whose output (i, j) goes to pixel (2i + a, 2j + b). Requires [`available`].
pub(crate) fn upsample_forward(p: Plane, b: usize, x: &[f32], kernels: &[Vec<f32>; 4], bias: &[f32]) -> Vec<f32> {
    let pd = Padded::new(p);
    let o = kernels[0].len() / (4 * p.c);
    let xp = padded(p, pd, x);
    let mut y = uninit_vec(b * o * 4 * p.h * p.w);
    for (&(a, bb), k) in PHASES.iter().zip(kernels) {
        let taps = [a * pd.wp + bb, a * pd.wp + bb + 1, (a + 1) * pd.wp + bb, (a + 1) * pd.wp + bb + 1];
        let place = Placement { plane: 4 * p.h * p.w, row: 4 * p.w, col: 2, start: a * 2 * p.w + bb };
        conv_padded(p, pd, &xp, (k, taps), bias, &mut y, place);
    }
    // SAFETY: PHASES holds each (a, b) once, so the four phases place every pixel (2i + a, 2j + b)
    unsafe { assume_init_vec(y) }
}

/// dx (B, C, H, W) and dW (O, C, 3, 3) of [`forward`] for the output gradient dy (B, O, H, W), both
/// overwritten. Requires [`available`].
///
/// dx is the convolution of dY with the flipped kernel (channels swapped), by the same kernel. dW
/// needs no column matrix: with dY in the padded layout too, dY_b's output p sits at padded index
/// p + W' + 1 (the dropped column p = i W' + W lands on zero padding), so for tap
/// (ki, kj)
///
///   dW[o, c, ki, kj] = sum over b and p < H W' of dYpad_b[o, W' + 1 + p] xpad_b[c, ki W' + kj + p]
///
/// accumulated by [`weight_grad_block`] for 4 output channels and one kernel row at a time. The
/// images are split into one fixed group per thread, each group sums its dW in image order and the
/// groups are added in order, so the result does not depend on scheduling.
pub(crate) fn backward(p: Plane, b: usize, x: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], dw_total: &mut [f32]) {
    let (c, o) = (p.c, w.len() / (9 * p.c));
    let pd = Padded::new(p);
    let pdy = Plane { c: o, ..p };
    let (xp, dyp) = (padded(p, pd, x), padded(pdy, pd, dy));
    let flipped = super::conv::flip_kernel(w, o, c, 3);
    conv_padded(pdy, pd, &dyp, (&flipped, taps_3x3(pd)), &vec![0f32; c], as_uninit(dx), Placement::dense(p));
    let per_group = b.div_ceil(rayon::current_num_threads().max(1)).max(1);
    // tasks: (group of images, block of output channels), each summing its images in order
    let blocks = o.div_ceil(OB);
    let partials: Vec<Vec<f32>> = (0..b.div_ceil(per_group) * blocks)
        .into_par_iter()
        .map(|task| {
            let (group, blk) = (task / blocks, task % blocks);
            let rows = OB.min(o - blk * OB);
            let mut dw = vec![0f32; rows * c * 9];
            for bi in group * per_group..((group + 1) * per_group).min(b) {
                let xb = &xp[bi * c * pd.plane..(bi + 1) * c * pd.plane];
                let dyb = &dyp[(bi * o + blk * OB) * pd.plane..(bi * o + blk * OB + rows) * pd.plane];
                weight_grad(xb, dyb, pd, p.h, c, &mut dw);
            }
            dw
        })
        .collect();
    dw_total.fill(0.0);
    for (task, dw) in partials.iter().enumerate() {
        let blk = task % blocks;
        let at = blk * OB * c * 9;
        for (d, v) in dw_total[at..at + dw.len()].iter_mut().zip(dw) {
            *d += v;
        }
    }
}

/// dw (rows, C, 3, 3) += the weight gradient of one image for `rows` <= [`OB`] output channels whose
/// padded output-gradient planes are `dyb`, with the image's padded planes `xb`.
fn weight_grad(xb: &[f32], dyb: &[f32], pd: Padded, h: usize, c: usize, dw: &mut [f32]) {
    // SAFETY (all arms): the caller checked `available`; the planes are whole (see Padded)
    match dyb.len() / pd.plane {
        4 => unsafe { weight_grad_block::<4>(xb, dyb, pd, h, c, dw) },
        3 => unsafe { weight_grad_block::<3>(xb, dyb, pd, h, c, dw) },
        2 => unsafe { weight_grad_block::<2>(xb, dyb, pd, h, c, dw) },
        1 => unsafe { weight_grad_block::<1>(xb, dyb, pd, h, c, dw) },
        r => unreachable!("weight_grad: {r} rows in a block of {OB}"),
    }
}

/// [`weight_grad`] for R rows: for each input channel and kernel row ki, R x 3 accumulators of 8
/// positions, summed over p < H W' (rounded up to 8; the positions past it read zero gradient):
/// acc[o][kj] += dYpad[o, W' + 1 + p] xpad[c, ki W' + kj + p], then dw[o, c, ki, kj] += the sum of
/// acc[o][kj]'s lanes.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `xb` holds c padded planes, `dyb` R, and `dw` R c 9 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weight_grad_block<const R: usize>(xb: &[f32], dyb: &[f32], pd: Padded, h: usize, c: usize, dw: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = (h * pd.wp).div_ceil(8) * 8;
    // the farthest reads: dY at W' + 1 + n - 1, x at 2 W' + 2 + n - 1, both inside a plane
    assert!(pd.wp + n < pd.plane && 2 * pd.wp + 2 + n <= pd.plane);
    assert!(xb.len() >= c * pd.plane && dyb.len() >= R * pd.plane && dw.len() >= R * c * 9);
    let dy0 = dyb.as_ptr().add(pd.wp + 1);
    for ci in 0..c {
        for ki in 0..3 {
            let x0 = xb.as_ptr().add(ci * pd.plane + ki * pd.wp);
            let mut acc = [[_mm256_setzero_ps(); 3]; R];
            for p in (0..n).step_by(8) {
                let xv = [_mm256_loadu_ps(x0.add(p)), _mm256_loadu_ps(x0.add(p + 1)), _mm256_loadu_ps(x0.add(p + 2))];
                for (o, acc_o) in acc.iter_mut().enumerate() {
                    let d = _mm256_loadu_ps(dy0.add(o * pd.plane + p));
                    for (a, &xk) in acc_o.iter_mut().zip(&xv) {
                        *a = _mm256_fmadd_ps(d, xk, *a);
                    }
                }
            }
            for (o, acc_o) in acc.iter().enumerate() {
                for (kj, a) in acc_o.iter().enumerate() {
                    // the sum of the 8 lanes
                    let s4 = _mm_add_ps(_mm256_castps256_ps128(*a), _mm256_extractf128_ps(*a, 1));
                    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
                    dw[(o * c + ci) * 9 + ki * 3 + kj] += _mm_cvtss_f32(s1);
                }
            }
        }
    }
}

/// Never called: [`available`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn weight_grad_block<const R: usize>(_: &[f32], _: &[f32], _: Padded, _: usize, _: usize, _: &mut [f32]) {
    unreachable!("direct convolution without AVX2")
}

thread_local! {
    /// Per-thread scratch for one block's output rows (OB, positions).
    static OUT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// out (OB, positions) for one block of output channels over all positions, with T taps at padded
/// offsets `taps` and weights `wk` packed as [c][tap][OB].
///
/// # Safety
/// The CPU must support AVX2 and FMA; `xb` holds `c` padded planes, `wk` c T OB weights, `out`
/// OB pd.positions values, and no tap offset exceeds 2 W' + 2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_row<const T: usize>(xb: &[f32], pd: Padded, c: usize, (wk, taps): (&[f32], &[usize; T]), out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(xb.len() >= c * pd.plane && wk.len() >= c * T * OB && out.len() >= OB * pd.positions);
    assert!(taps.iter().all(|&off| off <= 2 * pd.wp + 2));
    for p0 in (0..pd.positions).step_by(PB) {
        let mut acc = [[_mm256_setzero_ps(); PV]; OB];
        for ci in 0..c {
            let xc = xb.as_ptr().add(ci * pd.plane + p0);
            let wc = wk.as_ptr().add(ci * T * OB);
            for (t, &off) in taps.iter().enumerate() {
                let mut v = [_mm256_setzero_ps(); PV];
                for (k, vk) in v.iter_mut().enumerate() {
                    *vk = _mm256_loadu_ps(xc.add(off + 8 * k));
                }
                for (lane, acc_o) in acc.iter_mut().enumerate() {
                    let wv = _mm256_broadcast_ss(&*wc.add(t * OB + lane));
                    for (a, &vk) in acc_o.iter_mut().zip(&v) {
                        *a = _mm256_fmadd_ps(wv, vk, *a);
                    }
                }
            }
        }
        for (lane, acc_o) in acc.iter().enumerate() {
            for (k, a) in acc_o.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(lane * pd.positions + p0 + 8 * k), *a);
            }
        }
    }
}

/// Never called: [`available`] is false off x86-64.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_row<const T: usize>(_: &[f32], _: Padded, _: usize, _: (&[f32], &[usize; T]), _: &mut [f32]) {
    unreachable!("direct convolution without AVX2")
}
