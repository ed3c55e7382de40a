//! The direct convolution's vector kernels, written once ([`kernels!`]) and instantiated for two
//! instruction sets:
//!
//! - [`avx2`]: AVX2 + FMA, 8 lanes, 16 registers: blocks of 4 output channels x 16 positions in 8
//!   accumulators, so a tap's 2 loads and 4 broadcasts feed 8 fused multiply-adds;
//! - [`avx512`]: AVX-512F, 16 lanes, 32 registers: blocks of 8 output channels x 32 positions in 16
//!   accumulators, so a tap's 2 loads and 8 broadcasts feed 16 fused multiply-adds of twice the width.
//!
//! Each module has `block_row` (the convolution of one block of output channels over all positions)
//! and `weight_grad_block` (the weight gradient of one image for up to a block of output channels),
//! with the same arguments and results in both.

/// Defines a module of the two kernels for one instruction set: `$feature` (the target features),
/// `$v` (the vector type), `$lanes` (its f32 lanes), `$ob` (output channels per block) and the
/// intrinsics for zero, load, store, broadcast, fused multiply-add and add.
macro_rules! kernels {
    ($(#[$doc:meta])* mod $name:ident: $feature:literal, $v:ty, $lanes:expr, $ob:expr,
     $zero:ident, $load:ident, $store:ident, $set1:ident, $fmadd:ident, $add:ident) => {
        $(#[$doc])*
        pub(super) mod $name {
            use std::arch::x86_64::*;

            use super::super::Padded;

            /// Output channels per block.
            pub(in super::super) const OB: usize = $ob;
            /// Lanes of a vector.
            pub(in super::super) const LANES: usize = $lanes;
            /// Vectors of positions per block.
            const PV: usize = 2;
            /// Positions per block.
            const PB: usize = LANES * PV;

            /// out (OB, positions) for one block of output channels over all positions, with T taps at
            /// padded offsets `taps` and weights `wk` packed as [c][tap][OB]:
            /// out[o, p] = sum over c, t of wk[c, t, o] xb[c, p + taps[t]].
            ///
            /// # Safety
            /// The CPU must support the module's instruction set; `xb` holds `c` padded planes, `wk`
            /// c T OB weights, `out` OB pd.positions values, and no tap offset exceeds 2 W' + 2.
            #[target_feature(enable = $feature)]
            pub(in super::super) unsafe fn block_row<const T: usize>(
                xb: &[f32],
                pd: Padded,
                c: usize,
                (wk, taps): (&[f32], &[usize; T]),
                out: &mut [f32],
            ) {
                assert!(xb.len() >= c * pd.plane && wk.len() >= c * T * OB && out.len() >= OB * pd.positions);
                assert!(taps.iter().all(|&off| off <= 2 * pd.wp + 2) && pd.positions.is_multiple_of(PB));
                for p0 in (0..pd.positions).step_by(PB) {
                    let mut acc = [[$zero(); PV]; OB];
                    for ci in 0..c {
                        let xc = xb.as_ptr().add(ci * pd.plane + p0);
                        let wc = wk.as_ptr().add(ci * T * OB);
                        for (t, &off) in taps.iter().enumerate() {
                            let mut v = [$zero(); PV];
                            for (k, vk) in v.iter_mut().enumerate() {
                                *vk = $load(xc.add(off + LANES * k));
                            }
                            for (lane, acc_o) in acc.iter_mut().enumerate() {
                                let wv = $set1(*wc.add(t * OB + lane));
                                for (a, &vk) in acc_o.iter_mut().zip(&v) {
                                    *a = $fmadd(wv, vk, *a);
                                }
                            }
                        }
                    }
                    for (lane, acc_o) in acc.iter().enumerate() {
                        for (k, a) in acc_o.iter().enumerate() {
                            $store(out.as_mut_ptr().add(lane * pd.positions + p0 + LANES * k), *a);
                        }
                    }
                }
            }

            /// The weight gradient of one image for R <= [`OB`] output channels, in [`LANES`] partial
            /// sums per weight: for each input channel and kernel row ki, R x 3 accumulators of LANES
            /// positions summed over p < H W' (rounded up to LANES; the positions past it read zero
            /// gradient), acc[o][kj] += dYpad[o, W' + 1 + p] xpad[c, ki W' + kj + p], then
            /// dw[o, c, ki, kj][lane] += acc[o][kj][lane] (the caller sums the lanes once all its
            /// images are in).
            ///
            /// # Safety
            /// The CPU must support the module's instruction set; `xb` holds c padded planes, `dyb` R,
            /// and `dw` R c 9 [`LANES`] values.
            #[target_feature(enable = $feature)]
            pub(in super::super) unsafe fn weight_grad_block<const R: usize>(
                xb: &[f32],
                dyb: &[f32],
                pd: Padded,
                h: usize,
                c: usize,
                dw: &mut [f32],
            ) {
                let n = (h * pd.wp).div_ceil(LANES) * LANES;
                // the farthest reads: dY at W' + 1 + n - 1, x at 2 W' + 2 + n - 1, both inside a plane
                assert!(pd.wp + n < pd.plane && 2 * pd.wp + 2 + n <= pd.plane);
                assert!(xb.len() >= c * pd.plane && dyb.len() >= R * pd.plane && dw.len() >= R * c * 9 * LANES);
                let dy0 = dyb.as_ptr().add(pd.wp + 1);
                for ci in 0..c {
                    for ki in 0..3 {
                        let x0 = xb.as_ptr().add(ci * pd.plane + ki * pd.wp);
                        let mut acc = [[$zero(); 3]; R];
                        for p in (0..n).step_by(LANES) {
                            let xv = [$load(x0.add(p)), $load(x0.add(p + 1)), $load(x0.add(p + 2))];
                            for (o, acc_o) in acc.iter_mut().enumerate() {
                                let d = $load(dy0.add(o * pd.plane + p));
                                for (a, &xk) in acc_o.iter_mut().zip(&xv) {
                                    *a = $fmadd(d, xk, *a);
                                }
                            }
                        }
                        for (o, acc_o) in acc.iter().enumerate() {
                            for (kj, a) in acc_o.iter().enumerate() {
                                let slot = dw.as_mut_ptr().add(((o * c + ci) * 9 + ki * 3 + kj) * LANES);
                                $store(slot, $add($load(slot), *a));
                            }
                        }
                    }
                }
            }
        }
    };
}

kernels! {
    /// The AVX2 + FMA kernels.
    mod avx2: "avx2,fma", __m256, 8, 4,
        _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps
}

kernels! {
    /// The AVX-512F kernels.
    mod avx512: "avx512f", __m512, 16, 8,
        _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps
}
