//! Direct 3x3 stride-1 "same" convolution with AVX2 + FMA or AVX-512 for the narrow layers (fewer
//! than `WINOGRAD_MIN_CHANNELS` input or output channels), where im2col + a matrix product spends as
//! much time building and packing the column matrix as multiplying: here each block of output
//! channels x positions is accumulated in vector registers straight from the input planes (4 x 16 in
//! 8 registers with AVX2, 8 x 32 in 16 with AVX-512, `direct_conv/simd.rs`; the widest the CPU has is
//! chosen at run time).
//!
//! Each input plane is first copied into a zero-padded plane of width W' = W + 1: a zero row above
//! and below, and one zero column that serves as both the right padding of a row and the left
//! padding of the next. Output position (i, j) reads padded pixels (i + ki, j + kj) for the taps
//! (ki, kj). Flattening the padded grid, output p = i W' + j reads input p + ki W' + kj: the output
//! rows run together into one contiguous range of H W' positions (the column j = W of each row is
//! computed and dropped), so the kernel has no edges to handle. The weights are repacked per block of
//! output channels as [c][tap][block] (zero for channels past O), so a block's inner step per tap is
//! 2 vector loads of positions, one broadcast weight per channel and 2 fused multiply-adds per channel:
//!
//!   out[o, p] = sum over c, ki, kj of W[o, c, ki, kj] padded[c, p + ki W' + kj]
//!   y[o, i, j] = out[o, i W' + j] + bias[o]
//!
//! The upsampler's four 2x2 phase convolutions (`ops/upsample_conv.rs`) run on the same padded planes
//! with 4 taps each instead of 9, their outputs placed on every other pixel ([`upsample_forward`]).
//!
//! Only on x86-64 CPUs with AVX2 and FMA, or AVX-512F ([`available`]); elsewhere the caller keeps
//! im2col.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::conv::{image_bias, Plane};
use super::matmul::{as_uninit, assume_init_vec, uninit_vec, with_scratch};
use super::upsample_conv::PHASES;

#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
use simd::{avx2, avx512};

/// Positions per block of the widest kernel (AVX-512's 32; AVX2's 16 divides it): each plane's
/// output range is rounded up to it.
const PB: usize = 32;

/// The vector instructions the kernels run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Isa {
    /// AVX2 + FMA: 8 lanes, 16 registers (`simd::avx2`).
    Avx2,
    /// AVX-512F: 16 lanes, 32 registers (`simd::avx512`).
    Avx512,
}

impl Isa {
    /// Output channels per block of this instruction set's kernels.
    fn block(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::OB,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::OB,
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("direct convolution off x86-64"),
        }
    }

    /// Lanes of a vector: the partial sums per weight that the weight gradient keeps.
    fn lanes(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::LANES,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::LANES,
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("direct convolution off x86-64"),
        }
    }

    /// The instruction sets this CPU supports, widest first (tests run every one).
    fn supported() -> Vec<Isa> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut all = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                all.push(Isa::Avx512);
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                all.push(Isa::Avx2);
            }
        }
        all
    }
}

/// The widest instruction set the kernels have for this CPU, or None (not x86-64, or no AVX2 and FMA).
fn isa() -> Option<Isa> {
    static ISA: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| Isa::supported().first().copied())
}

/// Whether the direct kernel can run here: x86-64 with AVX2 and FMA, or AVX-512F.
pub(crate) fn available() -> bool {
    isa().is_some()
}

/// The instruction set of a caller that checked [`available`].
fn checked_isa() -> Isa {
    isa().expect("direct convolution called without checking `available`")
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

/// W (O, C, T) (T taps per kernel, e.g. a 3x3 kernel's 9) repacked per block of `ob` output
/// channels as [c][tap][ob], zero for the channels past O.
fn pack_weights(w: &[f32], o: usize, c: usize, t: usize, ob: usize) -> Vec<f32> {
    let blocks = o.div_ceil(ob);
    let mut packed = vec![0f32; blocks * c * t * ob];
    for (oi, wo) in w.chunks_exact(c * t).enumerate() {
        let (blk, lane) = (oi / ob, oi % ob);
        for (ci, kernel) in wo.chunks_exact(t).enumerate() {
            for (ti, &v) in kernel.iter().enumerate() {
                packed[((blk * c + ci) * t + ti) * ob + lane] = v;
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
    forward_on(checked_isa(), p, b, x, w, bias)
}

/// [`forward`] with the kernels of `isa`, which the CPU must support.
fn forward_on(isa: Isa, p: Plane, b: usize, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
    let pd = Padded::new(p);
    let mut y = uninit_vec(b * w.len() / (9 * p.c) * p.h * p.w);
    conv_padded(isa, p, pd, &padded(p, pd, x), (w, taps_3x3(pd)), bias, &mut y, Placement::dense(p));
    // SAFETY: conv_padded writes every output value
    unsafe { assume_init_vec(y) }
}

/// y = the convolution + bias of the images whose padded planes (B, C, plane) are `xp`, with the
/// kernel (w (O, C, T), taps) whose tap t reads padded offset taps[t] from the output position, the
/// outputs placed by `place`; every value of y that `place` names is written. The tasks are
/// (image, block of output channels) pairs.
#[allow(clippy::too_many_arguments)]
fn conv_padded<const T: usize>(
    isa: Isa,
    p: Plane,
    pd: Padded,
    xp: &[f32],
    (w, taps): (&[f32], [usize; T]),
    bias: &[f32],
    y: &mut [MaybeUninit<f32>],
    place: Placement,
) {
    let (o, ob) = (w.len() / (T * p.c), isa.block());
    let packed = pack_weights(w, o, p.c, T, ob);
    y.par_chunks_mut(o * place.plane).zip(xp.par_chunks(p.c * pd.plane)).enumerate().for_each(|(bi, (yb, xb))| {
        let bias = image_bias(bias, o, bi);
        yb.par_chunks_mut(ob * place.plane).enumerate().for_each(|(blk, yblk)| {
            with_scratch(&OUT, ob * pd.positions, |out| {
                let wk = &packed[blk * p.c * T * ob..(blk + 1) * p.c * T * ob];
                // SAFETY: the CPU supports `isa`; xb holds C planes of pd.plane values, out ob rows of
                // pd.positions, wk C T ob weights, and every tap lies within 2 W' + 2
                unsafe { block_row(isa, xb, pd, p.c, (wk, &taps), out) };
                for (lane, yo) in yblk.chunks_exact_mut(place.plane).enumerate() {
                    let (src, bv) = (&out[lane * pd.positions..], bias[blk * ob + lane]);
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
        conv_padded(checked_isa(), p, pd, &xp, (k, taps), bias, &mut y, place);
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
/// accumulated by the kernels' `weight_grad_block` for a block of output channels and one kernel row
/// at a time, as one partial sum per vector lane: the lanes are summed once per group of images, not
/// per image (on a 7x7 plane a per-image sum of lanes cost as much as the products). The images are
/// split into one fixed group per thread, each group sums its dW in image order and the groups are
/// added in order, so the result does not depend on scheduling.
pub(crate) fn backward(p: Plane, b: usize, x: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], dw_total: &mut [f32]) {
    backward_on(checked_isa(), p, b, x, w, dy, dx, dw_total)
}

/// [`backward`] with the kernels of `isa`, which the CPU must support.
#[allow(clippy::too_many_arguments)]
fn backward_on(isa: Isa, p: Plane, b: usize, x: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], dw_total: &mut [f32]) {
    let (c, o, ob) = (p.c, w.len() / (9 * p.c), isa.block());
    let pd = Padded::new(p);
    let pdy = Plane { c: o, ..p };
    let (xp, dyp) = (padded(p, pd, x), padded(pdy, pd, dy));
    let flipped = super::conv::flip_kernel(w, o, c, 3);
    conv_padded(isa, pdy, pd, &dyp, (&flipped, taps_3x3(pd)), &vec![0f32; c], as_uninit(dx), Placement::dense(p));
    let per_group = b.div_ceil(rayon::current_num_threads().max(1)).max(1);
    // tasks: (group of images, block of output channels), each summing its images in order
    let blocks = o.div_ceil(ob);
    let partials: Vec<Vec<f32>> = (0..b.div_ceil(per_group) * blocks)
        .into_par_iter()
        .map(|task| {
            let (group, blk) = (task / blocks, task % blocks);
            let rows = ob.min(o - blk * ob);
            let mut dw_lanes = vec![0f32; rows * c * 9 * isa.lanes()];
            for bi in group * per_group..((group + 1) * per_group).min(b) {
                let xb = &xp[bi * c * pd.plane..(bi + 1) * c * pd.plane];
                let dyb = &dyp[(bi * o + blk * ob) * pd.plane..(bi * o + blk * ob + rows) * pd.plane];
                weight_grad(isa, xb, dyb, pd, p.h, c, &mut dw_lanes);
            }
            // dw[o, c, ki, kj] = the sum of its lanes
            dw_lanes.chunks_exact(isa.lanes()).map(|v| v.iter().sum::<f32>()).collect::<Vec<f32>>()
        })
        .collect();
    dw_total.fill(0.0);
    for (task, dw) in partials.iter().enumerate() {
        let blk = task % blocks;
        let at = blk * ob * c * 9;
        for (d, v) in dw_total[at..at + dw.len()].iter_mut().zip(dw) {
            *d += v;
        }
    }
}

thread_local! {
    /// Per-thread scratch for one block's output rows (block, positions).
    static OUT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// out (block, positions) = one block of output channels over all positions, by `isa`'s kernel
/// (`block_row` in `simd::avx2` or `simd::avx512`): taps at padded offsets `taps`, weights `wk` packed as
/// [c][tap][block].
///
/// # Safety
/// The CPU must support `isa`; `xb` holds `c` padded planes, `wk` c T block weights, `out` block
/// pd.positions values, and no tap offset exceeds 2 W' + 2.
unsafe fn block_row<const T: usize>(isa: Isa, xb: &[f32], pd: Padded, c: usize, kernel: (&[f32], &[usize; T]), out: &mut [f32]) {
    // SAFETY (both arms): the caller's guarantees are the kernels'
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::block_row(xb, pd, c, kernel, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::block_row(xb, pd, c, kernel, out) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("direct convolution off x86-64: {xb:?} {pd:?} {c} {kernel:?} {out:?}"),
    }
}

/// dw (rows, C, 3, 3, lanes) += the weight gradient of one image, as partial sums per vector lane,
/// for `rows` <= the block's output channels whose padded output-gradient planes are `dyb`, with the
/// image's padded planes `xb`, by `isa`'s `weight_grad_block`. The CPU must support `isa`.
fn weight_grad(isa: Isa, xb: &[f32], dyb: &[f32], pd: Padded, h: usize, c: usize, dw: &mut [f32]) {
    let rows = dyb.len() / pd.plane;
    /// The instruction set's `weight_grad_block` for `rows`, one arm per row count.
    #[cfg(target_arch = "x86_64")]
    macro_rules! by_rows {
        ($isa_mod:ident: $($r:literal)*) => {
            match rows {
                // SAFETY: the CPU supports `isa`; the planes are whole (see Padded)
                $($r => unsafe { $isa_mod::weight_grad_block::<$r>(xb, dyb, pd, h, c, dw) },)*
                r => unreachable!("weight_grad: {r} rows in a block of {}", isa.block()),
            }
        };
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => by_rows!(avx2: 1 2 3 4),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => by_rows!(avx512: 1 2 3 4 5 6 7 8),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("direct convolution off x86-64: {xb:?} {dyb:?} {pd:?} {h} {c} {dw:?} {rows}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random value in [-1, 1) for index i of stream k.
    fn value(i: usize, k: usize) -> f32 {
        ((i * 7919 + k * 104_729) % 1000) as f32 / 500.0 - 1.0
    }

    /// Every instruction set this CPU has, against the convolution's definition summed in f64, with
    /// s = (i + ki - 1, j + kj - 1) the input pixel that tap (ki, kj) of output (i, j) reads:
    /// y[b, o, i, j] = bias[o] + sum over c, ki, kj of w[o, c, ki, kj] x[b, c, s],
    /// dx[b, c, s] = sum over o, ki, kj, (i, j) of w[o, c, ki, kj] dy[b, o, i, j],
    /// dw[o, c, ki, kj] = sum over b, (i, j) of dy[b, o, i, j] x[b, c, s], for s inside the image.
    /// Output channels in whole and partial blocks of both widths, sides narrower than a block and
    /// a plane of many blocks. (The integration tests reach only the widest set.)
    #[test]
    fn every_instruction_set_matches_the_definition() {
        for isa in Isa::supported() {
            for (b, c, o, h, w) in [(2, 3, 9, 5, 4), (1, 5, 8, 28, 28), (3, 2, 13, 7, 7), (2, 1, 1, 2, 9)] {
                let p = Plane { c, h, w };
                let x: Vec<f32> = (0..b * c * h * w).map(|i| value(i, 1)).collect();
                let wt: Vec<f32> = (0..o * c * 9).map(|i| value(i, 2)).collect();
                let bias: Vec<f32> = (0..o).map(|i| value(i, 3)).collect();
                let dy: Vec<f32> = (0..b * o * h * w).map(|i| value(i, 4)).collect();
                let mut y_ref: Vec<f64> = (0..b * o * h * w).map(|n| bias[n / (h * w) % o] as f64).collect();
                let (mut dx_ref, mut dw_ref) = (vec![0f64; x.len()], vec![0f64; wt.len()]);
                for (bi, oi, ci, i, j, ki, kj) in taps(b, o, c, h, w) {
                    let (si, sj) = ((i + ki).wrapping_sub(1), (j + kj).wrapping_sub(1));
                    if si >= h || sj >= w {
                        continue;
                    }
                    let (xi, yi, wi) = (((bi * c + ci) * h + si) * w + sj, ((bi * o + oi) * h + i) * w + j, (oi * c + ci) * 9 + ki * 3 + kj);
                    y_ref[yi] += wt[wi] as f64 * x[xi] as f64;
                    dx_ref[xi] += wt[wi] as f64 * dy[yi] as f64;
                    dw_ref[wi] += dy[yi] as f64 * x[xi] as f64;
                }
                let y = forward_on(isa, p, b, &x, &wt, &bias);
                let (mut dx, mut dw) = (vec![f32::NAN; x.len()], vec![f32::NAN; wt.len()]);
                backward_on(isa, p, b, &x, &wt, &dy, &mut dx, &mut dw);
                for (name, ours, reference) in [("y", &y, &y_ref), ("dx", &dx, &dx_ref), ("dw", &dw, &dw_ref)] {
                    let scale = reference.iter().fold(1f64, |m, v| m.max(v.abs()));
                    let diff = ours.iter().zip(reference).map(|(&a, r)| (a as f64 - r).abs()).fold(0f64, f64::max);
                    assert!(diff / scale < 1e-5, "{isa:?} {name}: b {b}, c {c}, o {o}, {h}x{w}: differs by {diff} of {scale}");
                }
            }
        }
    }

    /// Every (b, o, c, i, j, ki, kj) of a convolution's sums.
    fn taps(b: usize, o: usize, c: usize, h: usize, w: usize) -> impl Iterator<Item = (usize, usize, usize, usize, usize, usize, usize)> {
        (0..b * o * c * h * w * 9).map(move |n| {
            let (kj, n) = (n % 3, n / 3);
            let (ki, n) = (n % 3, n / 3);
            let (j, n) = (n % w, n / w);
            let (i, n) = (n % h, n / h);
            let (ci, n) = (n % c, n / c);
            (n / o, n % o, ci, i, j, ki, kj)
        })
    }
}
