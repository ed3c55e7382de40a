//! The direct convolution's AVX2 + FMA kernels: blocks of 4 output channels x 16 positions in 8
//! accumulators (two 8-lane vectors per channel), 11 of the 16 vector registers.

use std::arch::x86_64::*;

use super::Padded;

/// Output channels per block.
pub(super) const OB: usize = 4;
/// Lanes of a vector.
pub(super) const LANES: usize = 8;
/// 8-lane vectors of positions per block.
const PV: usize = 2;
/// Positions per block.
const PB: usize = 8 * PV;

/// out (OB, positions) for one block of output channels over all positions, with T taps at padded
/// offsets `taps` and weights `wk` packed as [c][tap][OB]:
/// out[o, p] = sum over c, t of wk[c, t, o] xb[c, p + taps[t]].
///
/// # Safety
/// The CPU must support AVX2 and FMA; `xb` holds `c` padded planes, `wk` c T OB weights, `out`
/// OB pd.positions values, and no tap offset exceeds 2 W' + 2.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn block_row<const T: usize>(xb: &[f32], pd: Padded, c: usize, (wk, taps): (&[f32], &[usize; T]), out: &mut [f32]) {
    assert!(xb.len() >= c * pd.plane && wk.len() >= c * T * OB && out.len() >= OB * pd.positions);
    assert!(taps.iter().all(|&off| off <= 2 * pd.wp + 2) && pd.positions.is_multiple_of(PB));
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

/// The weight gradient of one image for R <= [`OB`] output channels: for each input channel and
/// kernel row ki, R x 3 accumulators of 8 positions summed over p < H W' (rounded up to 8; the
/// positions past it read zero gradient), acc[o][kj] += dYpad[o, W' + 1 + p] xpad[c, ki W' + kj + p],
/// then dw[o, c, ki, kj] += the sum of acc[o][kj]'s lanes.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `xb` holds c padded planes, `dyb` R, and `dw` R c 9 values.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn weight_grad_block<const R: usize>(xb: &[f32], dyb: &[f32], pd: Padded, h: usize, c: usize, dw: &mut [f32]) {
    let n = (h * pd.wp).div_ceil(LANES) * LANES;
    // the farthest reads: dY at W' + 1 + n - 1, x at 2 W' + 2 + n - 1, both inside a plane
    assert!(pd.wp + n < pd.plane && 2 * pd.wp + 2 + n <= pd.plane);
    assert!(xb.len() >= c * pd.plane && dyb.len() >= R * pd.plane && dw.len() >= R * c * 9 * LANES);
    let dy0 = dyb.as_ptr().add(pd.wp + 1);
    for ci in 0..c {
        for ki in 0..3 {
            let x0 = xb.as_ptr().add(ci * pd.plane + ki * pd.wp);
            let mut acc = [[_mm256_setzero_ps(); 3]; R];
            for p in (0..n).step_by(LANES) {
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
                    let slot = dw.as_mut_ptr().add(((o * c + ci) * 9 + ki * 3 + kj) * LANES);
                    _mm256_storeu_ps(slot, _mm256_add_ps(_mm256_loadu_ps(slot), *a));
                }
            }
        }
    }
}
