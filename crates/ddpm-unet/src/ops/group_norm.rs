//! Group normalisation, optionally followed by SiLU, as one fused op with an analytic backward.
//!
//! For x of shape (N, C, *) split into G groups of Cg = C / G channels, with S the product of the
//! spatial dims and M = Cg S the size of one group of one sample:
//!
//!   mean_{n,g} = (1 / M) sum_{c in g, s} x[n, c, s]
//!   var_{n,g}  = (1 / M) sum_{c in g, s} (x[n, c, s] - mean_{n,g})^2      (biased, as PyTorch)
//!   rstd_{n,g} = 1 / sqrt(var_{n,g} + eps)
//!   xhat       = (x - mean) rstd
//!   y          = xhat gamma_c + beta_c
//!   out        = y                       (silu = false)
//!   out        = y sigmoid(y)            (silu = true)
//!
//! and, with dout the incoming gradient,
//!
//!   dy       = dout                                          (silu = false)
//!   dy       = dout s (1 + y (1 - s)),  s = sigmoid(y)       (silu = true)
//!   dbeta_c  = sum_{n, s} dy
//!   dgamma_c = sum_{n, s} dy xhat
//!   dx       = rstd (gamma_c dy - m1 - xhat m2),
//!              m1 = (1 / M) sum_{c in g, s} gamma_c dy,  m2 = (1 / M) sum_{c in g, s} gamma_c dy xhat.
//!
//! candle composes group norm from about ten small ops whose backward is a further chain of small
//! ops (and SiLU adds four more); on the CPU that backward runs ~20x slower than PyTorch's. Here, for
//! contiguous f32 tensors on the CPU, the forward is one pass over the input per (sample, group) pair
//! (after the two passes that compute the statistics) and the backward one custom op returning dx,
//! dgamma and dbeta together, both multi-threaded over (sample, group) with rayon. Mean and rstd
//! are recomputed in the backward rather than stored: a group is a few KB and sits in cache.
//! CUDA f32 tensors take the same two passes as CUDA kernels, one block per (sample, group), when
//! [`super::cuda_kernels_enabled`], and Metal f32 tensors as Metal kernels when
//! [`super::metal_kernels_enabled`]. Everything else (f64, strided input, Metal without the opt-in)
//! takes the composed candle ops, which are differentiable too; f16 and bf16 run the f32 kernels
//! between casts, except the CUDA forward, which reads and writes them itself (same values).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::{assume_init_vec, uninit_vec};

/// Number of f32 accumulators per reduction: independent lanes let the compiler vectorise the inner
/// loops (a single scalar accumulator would force a serial dependency chain), and 32 of them are four
/// 8-wide vectors, so consecutive vector adds do not wait on each other either.
const LANES: usize = 32;

/// Elements summed in f32 lanes before the partial sums are flushed into an f64 total, which bounds
/// the rounding error of large groups.
const BLOCK: usize = 1024;

/// Problem size of one call: `n` samples, `c` channels in `groups` groups, `s` elements per channel.
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    c: usize,
    groups: usize,
    s: usize,
}

impl Dims {
    /// Channels per group, Cg = C / G.
    fn cg(&self) -> usize {
        self.c / self.groups
    }
    /// Elements per (sample, group) pair, M = Cg S.
    fn m(&self) -> usize {
        self.cg() * self.s
    }
    /// Elements of x.
    fn numel(&self) -> usize {
        self.n * self.c * self.s
    }
}

/// e^x in f32 without a libm call, so that loops around it vectorise: Cephes' `expf`.
///
/// x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2 (ln2 split in a high and a low part so
/// that r is exact), e^r by a degree-7 polynomial (relative error ~1e-7), and 2^n built from its
/// exponent bits. x is clamped to [-87, 88] so that 2^n stays a normal float; e^x then saturates at
/// ~6e-39 and ~1.6e38, which is harmless for sigmoid.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to the nearest integer, which lands in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = p * z + r + 1.0;
    // t's bits are 0x4B40_0000 + n; 2^n has biased exponent n + 127.
    let two_n = f32::from_bits((t.to_bits().wrapping_sub(0x4B40_0000 - 127)) << 23);
    er * two_n
}

/// sigmoid(y) = 1 / (1 + e^-y).
#[inline(always)]
fn sigmoid_f32(y: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-y))
}

/// The sum of a block's [`LANES`] partial sums, added in the order of a vector reduction (lane l
/// with lane l + n for n = LANES / 2, LANES / 4, ..., 1). `black_box` keeps the lanes one array in
/// memory at the end of the block, so the loops that fill them compile to whole 8-wide vector adds
/// (summing the lanes as f64 in registers made the compiler split them into 1-, 2- and 4-wide
/// pieces). The block's total is one f32 sum of at most [`BLOCK`] values.
#[inline(always)]
fn lane_sum(acc: [f32; LANES]) -> f64 {
    let mut acc = std::hint::black_box(acc);
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for l in 0..n {
            acc[l] += acc[l + n];
        }
    }
    acc[0] as f64
}

/// Mean and rstd = 1 / sqrt(var + eps) of one group's values, two-pass (mean first, then the sum of
/// squared deviations), f32 lanes within blocks of [`BLOCK`] elements, f64 across blocks.
#[inline(always)]
fn group_stats(xs: &[f32], eps: f64) -> (f32, f32) {
    let m = xs.len().max(1) as f64;
    let mut total = 0f64;
    for block in xs.chunks(BLOCK) {
        let mut acc = [0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        let rest: f32 = chunks.remainder().iter().sum();
        for ch in chunks {
            for l in 0..LANES {
                acc[l] += ch[l];
            }
        }
        total += lane_sum(acc) + rest as f64;
    }
    let mean = total / m;
    let mean32 = mean as f32;
    let mut sq = 0f64;
    for block in xs.chunks(BLOCK) {
        let mut acc = [0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        let rest: f32 = chunks.remainder().iter().map(|&v| (v - mean32) * (v - mean32)).sum();
        for ch in chunks {
            for l in 0..LANES {
                let d = ch[l] - mean32;
                acc[l] += d * d;
            }
        }
        sq += lane_sum(acc) + rest as f64;
    }
    let var = sq / m;
    (mean32, (1.0 / (var + eps).sqrt()) as f32)
}

/// (sum dy, sum dy xhat) over one channel, xhat = (x - mean) rstd: f32 lanes within blocks of
/// [`BLOCK`] elements, f64 across blocks.
#[inline(always)]
fn sum_dy_dyxhat(dy: &[f32], x: &[f32], mean: f32, rstd: f32) -> (f64, f64) {
    let (mut ta, mut tb) = (0f64, 0f64);
    for (db, xb) in dy.chunks(BLOCK).zip(x.chunks(BLOCK)) {
        let mut acc_a = [0f32; LANES];
        let mut acc_b = [0f32; LANES];
        let dc = db.chunks_exact(LANES);
        let xc = xb.chunks_exact(LANES);
        for (&dv, &xv) in dc.remainder().iter().zip(xc.remainder()) {
            ta += dv as f64;
            tb += (dv * ((xv - mean) * rstd)) as f64;
        }
        for (dl, xl) in dc.zip(xc) {
            for l in 0..LANES {
                acc_a[l] += dl[l];
                acc_b[l] += dl[l] * ((xl[l] - mean) * rstd);
            }
        }
        ta += lane_sum(acc_a);
        tb += lane_sum(acc_b);
    }
    (ta, tb)
}

/// One group's gamma and beta, the channel plane size `s`, eps and whether SiLU follows.
#[derive(Clone, Copy)]
struct GroupArgs<'a> {
    gamma: &'a [f32],
    beta: &'a [f32],
    s: usize,
    eps: f64,
    silu: bool,
}

with_avx2! {
    /// The forward of one group (x's channel planes `xs`): out = a x + b per channel, a = rstd gamma,
    /// b = beta - mean a, then out = y sigmoid(y) with `silu`.
    fn forward_group(xs: &[f32], o: &mut [MaybeUninit<f32>], args: GroupArgs<'_>) {
        let GroupArgs { gamma, beta, s, eps, silu } = args;
        let (mean, rstd) = group_stats(xs, eps);
        for (ci, (xr, or)) in xs.chunks_exact(s).zip(o.chunks_exact_mut(s)).enumerate() {
            // y = (x - mean) rstd gamma + beta = a x + b
            let a = rstd * gamma[ci];
            let b = beta[ci] - mean * a;
            if silu {
                // out = y sigmoid(y)
                for (ov, &xv) in or.iter_mut().zip(xr) {
                    let y = xv * a + b;
                    ov.write(y * sigmoid_f32(y));
                }
            } else {
                for (ov, &xv) in or.iter_mut().zip(xr) {
                    ov.write(xv * a + b);
                }
            }
        }
    }
}

with_avx2! {
    /// The backward of one group: dx from x and the output gradient `ds`, and the group's
    /// per-channel partial sums `part` = [A_c = sum dy | B_c = sum dy xhat].
    fn backward_group(xs: &[f32], ds: &[f32], dxs: &mut [f32], part: &mut [f64], args: GroupArgs<'_>) {
        let GroupArgs { gamma, beta, s, eps, silu } = args;
        let (cg, m) = (gamma.len(), xs.len());
        let (mean, rstd) = group_stats(xs, eps);
        let (mut s1, mut s2) = (0f64, 0f64);
        // pass 1: dy -> dx buffer, A_c = sum dy, B_c = sum dy xhat
        for ci in 0..cg {
            let (gam, bet) = (gamma[ci], beta[ci]);
            let a = rstd * gam;
            let b = bet - mean * a;
            let xr = &xs[ci * s..(ci + 1) * s];
            let dr = &ds[ci * s..(ci + 1) * s];
            let dyr = &mut dxs[ci * s..(ci + 1) * s];
            if silu {
                // dy = dout s (1 + y (1 - s)),  y = a x + b,  s = sigmoid(y)
                for ((dy, &xv), &dv) in dyr.iter_mut().zip(xr).zip(dr) {
                    let y = xv * a + b;
                    let sg = sigmoid_f32(y);
                    *dy = dv * sg * (1.0 + y * (1.0 - sg));
                }
            } else {
                dyr.copy_from_slice(dr);
            }
            let (ta, tb) = sum_dy_dyxhat(dyr, xr, mean, rstd);
            part[ci] = ta;
            part[cg + ci] = tb;
            s1 += gam as f64 * ta;
            s2 += gam as f64 * tb;
        }
        let m1 = s1 / m as f64;
        let m2 = s2 / m as f64;
        // pass 2: dx = rstd (gamma dy - m1 - (x - mean) rstd m2) = k1 dy + k2 x + k3
        let r = rstd as f64;
        let k2 = (-r * r * m2) as f32;
        let k3 = (-r * m1 + mean as f64 * r * r * m2) as f32;
        for ci in 0..cg {
            let k1 = rstd * gamma[ci];
            let xr = &xs[ci * s..(ci + 1) * s];
            let dyr = &mut dxs[ci * s..(ci + 1) * s];
            for (v, &xv) in dyr.iter_mut().zip(xr) {
                *v = k1 * *v + k2 * xv + k3;
            }
        }
    }
}

/// The fused forward: `(x, gamma, beta) -> out`, see the module docs for the formulas.
struct GroupNormOp {
    dims: Dims,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "ddpm-group-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims;
        let x = super::f32_slice(sx, lx, self.name(), "x")?;
        let gamma = super::f32_slice(sg, lg, self.name(), "gamma")?;
        let beta = super::f32_slice(sb, lb, self.name(), "beta")?;
        if x.len() != d.numel() || gamma.len() != d.c || beta.len() != d.c {
            candle_core::bail!("ddpm-group-norm: argument sizes do not match {:?}", d);
        }
        let (cg, s, m) = (d.cg(), d.s, d.m());
        let mut out = uninit_vec(x.len());
        out.par_chunks_mut(m).zip(x.par_chunks(m)).enumerate().for_each(|(ng, (o, xs))| {
            let cs = (ng % d.groups) * cg..(ng % d.groups + 1) * cg;
            forward_group(xs, o, GroupArgs { gamma: &gamma[cs.clone()], beta: &beta[cs], s, eps: self.eps, silu: self.silu });
        });
        // SAFETY: forward_group writes every value of its group, and the groups cover x
        let out = unsafe { assume_init_vec(out) };
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
        use candle_core::cuda_backend::CudaDType;
        let d = self.dims;
        let gamma = cuda::f32_view(sg, lg, self.name(), "gamma")?;
        let beta = cuda::f32_view(sb, lb, self.name(), "beta")?;
        let Some((lo, hi)) = lx.contiguous_offsets() else { candle_core::bail!("ddpm-group-norm: x must be contiguous") };
        if hi - lo != d.numel() || gamma.len() != d.c || beta.len() != d.c {
            candle_core::bail!("ddpm-group-norm: argument sizes do not match {:?}", d);
        }
        // x and out in T (f32, or bf16 and f16 read and written by the kernel itself), gamma and beta in f32
        fn typed<T: CudaDType + DeviceRepr>(kernel: &str, op: &GroupNormOp, sx: &candle_core::CudaStorage, (lo, hi): (usize, usize), gamma: &CudaView<'_, f32>, beta: &CudaView<'_, f32>) -> Result<candle_core::CudaStorage> {
            let d = op.dims;
            let dev = sx.device().clone();
            let x = sx.as_cuda_slice::<T>()?.slice(lo..hi);
            // SAFETY: the kernel writes every value of every (sample, group)
            let mut out = unsafe { dev.alloc::<T>(hi - lo) }?;
            let (groups, cg, s, silu) = (d.groups as u64, d.cg() as u64, d.s as u64, op.silu as i32);
            // one block per (sample, group) pair
            cuda::launch!(&dev, kernel, cuda::per_block(d.n * d.groups); &x, gamma, beta, &mut out, &groups, &cg, &s, &op.eps, &silu);
            Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev))
        }
        let out = match sx.dtype() {
            DType::F32 => typed::<f32>("ddpm_group_norm", self, sx, (lo, hi), &gamma, &beta)?,
            DType::BF16 => typed::<half::bf16>("ddpm_group_norm_bf16", self, sx, (lo, hi), &gamma, &beta)?,
            DType::F16 => typed::<half::f16>("ddpm_group_norm_f16", self, sx, (lo, hi), &gamma, &beta)?,
            dt => candle_core::bail!("ddpm-group-norm: no CUDA kernel for x in {dt:?}"),
        };
        Ok((out, lx.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        sx: &candle_core::MetalStorage,
        lx: &Layout,
        sg: &candle_core::MetalStorage,
        lg: &Layout,
        sb: &candle_core::MetalStorage,
        lb: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        use super::metal::{self, Arg, Grid};
        use candle_core::backend::BackendStorage;
        let d = self.dims;
        let dev = sx.device();
        let (x, xo, n_x) = metal::f32_buffer(sx, lx, self.name(), "x")?;
        let (gamma, go, n_g) = metal::f32_buffer(sg, lg, self.name(), "gamma")?;
        let (beta, bo, n_b) = metal::f32_buffer(sb, lb, self.name(), "beta")?;
        if n_x != d.numel() || n_g != d.c || n_b != d.c {
            candle_core::bail!("ddpm-group-norm: argument sizes do not match {:?}", d);
        }
        let out = metal::alloc_f32(dev, n_x, self.name())?;
        // one threadgroup per (sample, group) pair
        let args = [Arg::In(x, xo), Arg::In(gamma, go), Arg::In(beta, bo), Arg::Out(&out, 0), metal_dims(d, self.eps, self.silu)?];
        metal::launch(dev, "ddpm_group_norm", Grid::Groups(d.n * d.groups), &args)?;
        Ok((metal::wrap(out, dev, n_x), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // through the public entry point, which also takes the half-precision x of the CUDA forward
        let d = self.dims;
        let (dx, dgamma, dbeta) = group_norm_backward(x, d.groups, gamma, beta, self.eps, self.silu, grad)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// (dx, dgamma, dbeta) of the fused group norm `op` for the incoming gradient `dout`, by one
/// [`GroupNormBackward`] op outside the graph.
fn gradients(op: &GroupNormOp, x: &Tensor, gamma: &Tensor, beta: &Tensor, dout: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let d = op.dims;
    // A custom op takes three tensors: gamma and beta travel together as one (2C) vector.
    let gb = Tensor::cat(&[&gamma.detach(), &beta.detach()], 0)?;
    let dout = dout.detach().contiguous()?;
    let packed = x.detach().apply_op3_no_bwd(&gb, &dout, &GroupNormBackward { dims: d, eps: op.eps, silu: op.silu })?;
    // packed = [dx (N C S) | dgamma (C) | dbeta (C)]
    let numel = d.numel();
    let dx = packed.narrow(0, 0, numel)?.reshape(x.shape())?;
    let dgamma = packed.narrow(0, numel, d.c)?.reshape(gamma.shape())?;
    let dbeta = packed.narrow(0, numel + d.c, d.c)?.reshape(beta.shape())?;
    Ok((dx, dgamma, dbeta))
}

/// The fused backward: `(x, [gamma | beta], dout) -> [dx | dgamma | dbeta]` (flat), see the module
/// docs for the formulas.
///
/// Per (sample, group), in parallel: recompute mean and rstd; pass 1 writes dy into the dx buffer and
/// collects the per-(n, c) sums A = sum_s dy and B = sum_s dy xhat; pass 2 turns dy into
/// dx = rstd (gamma dy - m1 - xhat m2) with m1 = sum_c gamma_c A_c / M, m2 = sum_c gamma_c B_c / M.
/// Finally dbeta_c = sum_n A_{n,c} and dgamma_c = sum_n B_{n,c}.
struct GroupNormBackward {
    dims: Dims,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "ddpm-group-norm-backward"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sgb: &CpuStorage,
        lgb: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims;
        let x = super::f32_slice(sx, lx, self.name(), "x")?;
        let gb = super::f32_slice(sgb, lgb, self.name(), "gamma and beta")?;
        let dout = super::f32_slice(sd, ld, self.name(), "the output gradient")?;
        if x.len() != d.numel() || dout.len() != d.numel() || gb.len() != 2 * d.c {
            candle_core::bail!("ddpm-group-norm-backward: argument sizes do not match {:?}", d);
        }
        let (gamma, beta) = gb.split_at(d.c);
        let (cg, s, m) = (d.cg(), d.s, d.m());
        let numel = d.numel();
        let mut packed = vec![0f32; numel + 2 * d.c];
        // partials[ng] = [A_{c} for c in group | B_{c} for c in group]
        let mut partials = vec![0f64; d.n * d.groups * 2 * cg];
        let (dx, dparams) = packed.split_at_mut(numel);
        dx.par_chunks_mut(m).zip(partials.par_chunks_mut(2 * cg)).enumerate().for_each(|(ng, (dxs, part))| {
            let cs = (ng % d.groups) * cg..(ng % d.groups + 1) * cg;
            let (xs, ds) = (&x[ng * m..(ng + 1) * m], &dout[ng * m..(ng + 1) * m]);
            backward_group(xs, ds, dxs, part, GroupArgs { gamma: &gamma[cs.clone()], beta: &beta[cs], s, eps: self.eps, silu: self.silu });
        });
        // dbeta_c = sum_n A_{n,c}, dgamma_c = sum_n B_{n,c}
        let (dgamma, dbeta) = dparams.split_at_mut(d.c);
        for c in 0..d.c {
            let (g, ci) = (c / cg, c % cg);
            let (mut sa, mut sb) = (0f64, 0f64);
            for n in 0..d.n {
                let part = &partials[(n * d.groups + g) * 2 * cg..(n * d.groups + g + 1) * 2 * cg];
                sa += part[ci];
                sb += part[cg + ci];
            }
            dbeta[c] = sa as f32;
            dgamma[c] = sb as f32;
        }
        Ok((CpuStorage::F32(packed), Shape::from(numel + 2 * d.c)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sgb: &candle_core::CudaStorage,
        lgb: &Layout,
        sd: &candle_core::CudaStorage,
        ld: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        let d = self.dims;
        let dev = sx.device().clone();
        let x = cuda::f32_view(sx, lx, self.name(), "x")?;
        let gb = cuda::f32_view(sgb, lgb, self.name(), "gamma and beta")?;
        let dout = cuda::f32_view(sd, ld, self.name(), "the output gradient")?;
        if x.len() != d.numel() || dout.len() != d.numel() || gb.len() != 2 * d.c {
            candle_core::bail!("ddpm-group-norm-backward: argument sizes do not match {:?}", d);
        }
        let (gamma, beta) = (gb.slice(0..d.c), gb.slice(d.c..2 * d.c));
        let numel = d.numel();
        let mut packed = cuda::alloc_f32(&dev, numel + 2 * d.c)?;
        // part_a[n C + c] = A_{n,c} = sum_s dy, part_b[n C + c] = B_{n,c} = sum_s dy xhat
        let mut part_a = cuda::zeros_f64(&dev, d.n * d.c)?;
        let mut part_b = cuda::zeros_f64(&dev, d.n * d.c)?;
        let (n, c, groups, cg, s, silu) = (d.n as u64, d.c as u64, d.groups as u64, d.cg() as u64, d.s as u64, self.silu as i32);
        {
            let mut dx = packed.slice_mut(0..numel);
            cuda::launch!(&dev, "ddpm_group_norm_backward", cuda::per_block(d.n * d.groups);
                &x, &gamma, &beta, &dout, &mut dx, &mut part_a, &mut part_b, &c, &groups, &cg, &s, &self.eps, &silu);
        }
        // dgamma_c = sum_n B_{n,c}, dbeta_c = sum_n A_{n,c}
        let mut params = packed.slice_mut(numel..numel + 2 * d.c);
        let (mut dgamma, mut dbeta) = params.split_at_mut(d.c);
        cuda::launch!(&dev, "ddpm_group_norm_params", cuda::elementwise(d.c); &part_a, &part_b, &mut dgamma, &mut dbeta, &n, &c);
        Ok((cuda::wrap(packed, sx), Shape::from(numel + 2 * d.c)))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        sx: &candle_core::MetalStorage,
        lx: &Layout,
        sgb: &candle_core::MetalStorage,
        lgb: &Layout,
        sd: &candle_core::MetalStorage,
        ld: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        use super::metal::{self, uint, Arg, Grid};
        use candle_core::backend::BackendStorage;
        let d = self.dims;
        let dev = sx.device();
        let (x, xo, n_x) = metal::f32_buffer(sx, lx, self.name(), "x")?;
        let (gb, gbo, n_gb) = metal::f32_buffer(sgb, lgb, self.name(), "gamma and beta")?;
        let (dout, dout_o, n_d) = metal::f32_buffer(sd, ld, self.name(), "the output gradient")?;
        if n_x != d.numel() || n_d != d.numel() || n_gb != 2 * d.c {
            candle_core::bail!("ddpm-group-norm-backward: argument sizes do not match {:?}", d);
        }
        let numel = d.numel();
        let packed = metal::alloc_f32(dev, numel + 2 * d.c, self.name())?;
        // part_a[n C + c] = A_{n,c} = sum_s dy, part_b[n C + c] = B_{n,c} = sum_s dy xhat
        let part_a = metal::alloc_f32(dev, d.n * d.c, self.name())?;
        let part_b = metal::alloc_f32(dev, d.n * d.c, self.name())?;
        let args = [Arg::In(x, xo), Arg::In(gb, gbo), Arg::In(gb, gbo + 4 * d.c), Arg::In(dout, dout_o), Arg::Out(&packed, 0), Arg::Out(&part_a, 0), Arg::Out(&part_b, 0), metal_dims(d, self.eps, self.silu)?];
        metal::launch(dev, "ddpm_group_norm_backward", Grid::Groups(d.n * d.groups), &args)?;
        // packed = [dx | dgamma | dbeta]: dgamma_c = sum_n B_{n,c}, dbeta_c = sum_n A_{n,c}
        let (n, c) = (metal::count(d.n, self.name())?, metal::count(d.c, self.name())?);
        let args = [Arg::In(&part_a, 0), Arg::In(&part_b, 0), Arg::Out(&packed, 4 * numel), Arg::Out(&packed, 4 * (numel + d.c)), uint(n), uint(c)];
        metal::launch(dev, "ddpm_group_norm_params", Grid::Elementwise(d.c), &args)?;
        Ok((metal::wrap(packed, dev, numel + 2 * d.c), Shape::from(numel + 2 * d.c)))
    }
}

/// `GroupNormDims` of kernels.metal: C, groups, Cg, S (u32) of `d`, then eps (f32) and silu.
#[cfg(feature = "metal")]
fn metal_dims(d: Dims, eps: f64, silu: bool) -> Result<super::metal::Arg<'static>> {
    let count = |v: usize| super::metal::count(v, "ddpm-group-norm");
    Ok(super::metal::Arg::Words(vec![count(d.c)?, count(d.groups)?, count(d.cg())?, count(d.s)?, (eps as f32).to_bits(), silu as u32]))
}

/// Checks the arguments of [`group_norm`] and returns (N, C, S).
fn check_args(
    x: &Tensor,
    num_groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
) -> Result<(usize, usize, usize)> {
    let dims = x.dims();
    if dims.len() < 2 {
        candle_core::bail!("group_norm: x must be (N, C, ...), got shape {:?}", dims);
    }
    let (n, c) = (dims[0], dims[1]);
    if num_groups == 0 || c % num_groups != 0 {
        candle_core::bail!("group_norm: {num_groups} groups do not divide {c} channels");
    }
    for (name, t) in [("gamma", gamma), ("beta", beta)] {
        if t.dims() != [c] {
            candle_core::bail!("group_norm: {name} must have shape ({c}), got {:?}", t.dims());
        }
    }
    Ok((n, c, dims[2..].iter().product()))
}

/// Group normalisation of x (N, C, ...) over `num_groups` groups of channels, scaled by `gamma` (C)
/// and shifted by `beta` (C), followed by SiLU when `silu` is set:
///
///   y   = (x - mean_g) / sqrt(var_g + eps) * gamma_c + beta_c
///   out = silu ? y * sigmoid(y) : y
///
/// with mean_g and the biased var_g taken over each sample's C / num_groups channels and all of
/// their spatial positions (PyTorch's `GroupNorm`). x may have any rank >= 2 (rank 2 is a spatial
/// size of 1).
///
/// For contiguous f32 tensors on the CPU (or CUDA or Metal with the project's kernels, see [`super::cuda_kernels_enabled`] and [`super::metal_kernels_enabled`]) this is one fused custom op whose backward
/// (also fused) gives the gradients of x, gamma and beta; bf16 and f16 tensors there run the same op in
/// f32 between casts; otherwise it is [`group_norm_composed`]. All are differentiable. gamma and beta
/// in another dtype than x (f32 master weights under mixed precision) are cast to x's
/// ([`super::cast_like`]).
pub fn group_norm(
    x: &Tensor,
    num_groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let _span = ddpm_core::ops::profile::span(x.device(), "group norm forward");
    let (gamma, beta) = (&super::cast_like(gamma, x)?, &super::cast_like(beta, x)?);
    if let Some(op) = fused_op(x, num_groups, gamma, beta, (eps, silu), &[])? {
        return x.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op);
    }
    let half = matches!(x.dtype(), DType::BF16 | DType::F16) && [gamma, beta].iter().all(|t| t.dtype() == x.dtype());
    if half && super::fused_device(x.device()) && x.elem_count() > 0 {
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        if super::cuda_kernels_enabled(x.device()) && x.is_contiguous() {
            // the CUDA kernel reads and writes the half type itself, in f32 inside: the values of
            // the f32 op between casts below, without the casts' two passes over x and the output
            let (n, c, s) = check_args(x, num_groups, gamma, beta)?;
            let op = GroupNormOp { dims: Dims { n, c, groups: num_groups, s }, eps, silu };
            return x.apply_op3(&f(gamma)?.contiguous()?, &f(beta)?.contiguous()?, op);
        }
        // normalised in f32 by the f32 op, between casts: two elementwise passes instead of the ten
        // or so of the composed ops, and the affine map and SiLU in f32 before the one rounding
        return group_norm(&f(x)?, num_groups, &f(gamma)?, &f(beta)?, eps, silu)?.to_dtype(x.dtype());
    }
    group_norm_composed(x, num_groups, gamma, beta, eps, silu)
}

/// The gradients (dx, dgamma, dbeta) of [`group_norm`] (same arguments) for the incoming gradient
/// `dout` (x's shape), computed by the op that [`group_norm`]'s backward pass runs but outside
/// candle's graph: for a custom backward pass that holds x. Contiguous f32 tensors on the CPU (or
/// CUDA, see [`super::cuda_kernels_enabled`]), where [`group_norm`] runs its fused op; bf16 and f16
/// x and dout there run it in f32 between casts, as [`group_norm`] does (gamma and beta rounded to
/// x's dtype first, as there), with dx in x's dtype and dgamma, dbeta in f32.
pub fn group_norm_backward(x: &Tensor, num_groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64, silu: bool, dout: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let _span = ddpm_core::ops::profile::span(x.device(), "group norm backward");
    let half = matches!(x.dtype(), DType::BF16 | DType::F16) && dout.dtype() == x.dtype();
    if half && super::fused_device(x.device()) && x.elem_count() > 0 {
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let (gamma, beta) = (super::cast_like(gamma, x)?, super::cast_like(beta, x)?);
        let (dx, dgamma, dbeta) = group_norm_backward(&f(x)?, num_groups, &f(&gamma)?, &f(&beta)?, eps, silu, &f(dout)?)?;
        return Ok((dx.to_dtype(x.dtype())?, dgamma, dbeta));
    }
    let Some(op) = fused_op(x, num_groups, gamma, beta, (eps, silu), &[dout])? else {
        candle_core::bail!("group_norm_backward: x, gamma, beta and dout must be f32 tensors on the CPU (or CUDA or Metal with the project's kernels), x contiguous");
    };
    if dout.dims() != x.dims() {
        candle_core::bail!("group_norm_backward: dout is {:?}, x is {:?}", dout.dims(), x.dims());
    }
    gradients(&op, x, gamma, beta, dout)
}

/// Checks the arguments of [`group_norm`] and returns its fused op if they (and `others`) are f32
/// tensors on x's device, a device with the kernels, and x is contiguous and not empty.
fn fused_op(x: &Tensor, num_groups: usize, gamma: &Tensor, beta: &Tensor, (eps, silu): (f64, bool), others: &[&Tensor]) -> Result<Option<GroupNormOp>> {
    let (n, c, s) = check_args(x, num_groups, gamma, beta)?;
    let fused = super::fused_device(x.device())
        && [x, gamma, beta].iter().chain(others).all(|t| t.dtype() == DType::F32 && t.device().same_device(x.device()))
        && x.is_contiguous()
        && x.elem_count() > 0;
    Ok(fused.then_some(GroupNormOp { dims: Dims { n, c, groups: num_groups, s }, eps, silu }))
}

/// [`group_norm`] built from candle's differentiable tensor ops (what `candle_nn::GroupNorm` does,
/// plus `Tensor::silu`): the fallback for devices, dtypes and layouts the fused kernel does not
/// handle, and the reference it is tested against. f16 and bf16 inputs are normalised in f32.
///
///   xg   = x.reshape(N, G, M)
///   mean = sum(xg) / M,  var = sum((xg - mean)^2) / M
///   y    = ((xg - mean) / sqrt(var + eps)).reshape(x.shape) * gamma[1, C, 1..] + beta[1, C, 1..]
pub fn group_norm_composed(
    x: &Tensor,
    num_groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let (n, c, s) = check_args(x, num_groups, gamma, beta)?;
    let dtype = x.dtype();
    let internal = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let m = (c / num_groups) * s;
    let xg = x.reshape((n, num_groups, m))?.to_dtype(internal)?;
    let mean = (xg.sum_keepdim(2)? / m as f64)?;
    let xc = xg.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim(2)? / m as f64)?;
    let xhat = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    let mut w_dims = vec![1; x.rank()];
    w_dims[1] = c;
    let y = xhat
        .to_dtype(dtype)?
        .reshape(x.shape())?
        .broadcast_mul(&gamma.reshape(w_dims.clone())?)?
        .broadcast_add(&beta.reshape(w_dims)?)?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}
