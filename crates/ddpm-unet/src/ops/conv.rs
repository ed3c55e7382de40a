//! 2-D convolution as im2col + a matrix product per image, with an analytic backward that never
//! runs a transposed convolution.
//!
//! candle's CPU convolution gradient goes through `conv_transpose2d`, a direct loop that is several
//! times slower than PyTorch. Here a convolution of x (B, C, H, W) with w (O, C, k, k) is, for each
//! image b,
//!
//!   cols_b = im2col(x_b)                     (C k k, L),  L = H' W'
//!   y_b    = w.reshape(O, C k k) @ cols_b    (O, L), which is already y's (b) slice
//!
//! and the backward is two more products per image, dW += dY_b cols_b^T and dcols_b = W^T dY_b,
//! followed by col2im, the scatter-add adjoint of im2col; for a stride-1 "same" convolution dx_b is
//! instead W' @ im2col(dY_b), the convolution of dY with the flipped kernel. One image's column
//! matrix lives in a per-thread scratch buffer that is reused from layer to layer and step to step, so
//! no layer allocates a k^2-times-the-input buffer; it is rebuilt in the backward pass rather than
//! kept. A 1x1 kernel needs no column matrix at all. The images run in parallel on rayon's pool, each
//! product on one thread (or, with fewer images than threads, each product on all of them). The
//! products call the `gemm` crate (the kernel candle's own CPU matmul uses). CUDA tensors with the
//! project's kernels enabled take the same column-matrix formulation with CUDA im2col / col2im and
//! candle's products (`ops/columns.rs`); other devices and dtypes fall back to candle's `conv2d`.
//!
//! 3x3 stride-1 convolutions with padding 1 take one of two other paths: with at least
//! [`WINOGRAD_MIN_CHANNELS`] input and output channels Winograd's F(2x2, 3x3) (`ops/winograd.rs`):
//! 2.25x fewer flops in the products, plus tile transforms linear in C + O where the products are
//! linear in C O, so it pays off for wide layers only; with fewer, on CPUs with AVX2 and FMA or
//! AVX-512, a direct kernel on zero-padded planes for the output, the input gradient and the weight
//! gradient (`ops/direct_conv.rs`), which skips the column matrix and the products' packing.
//!
//! A nearest x2 upsampling followed by a 3x3 convolution ([`upsample2x_conv2d`]) runs on the
//! low-resolution input as four 2x2 convolutions, one per output phase (`ops/upsample_conv.rs`).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

use super::columns;
use super::matmul::{assume_init_vec, init_rows, inner_parallelism, sgemm, uninit_vec, with_scratch, View};
use super::{direct_conv, upsample_conv, winograd};

/// Input and output channels from which a 3x3 stride-1 convolution with padding 1 runs as Winograd
/// F(2x2, 3x3) rather than the direct kernel (or im2col without AVX2 or AVX-512): both at least this.
/// The products shrink 2.25x but the tile transforms cost in proportion to C + O per tile, the
/// products to C O, so Winograd pays off when both are wide. Measured with `cargo bench -p ddpm-unet
/// --bench conv` on 2 cores of an AVX-512 CPU (forward + backward, GFLOP/s of the direct
/// convolution, Winograd / direct): the CIFAR-10 model's 128 -> 128 at 32x32 356 / 282, 256 -> 256
/// at 16x16 430 / 247; mnist-small's 128 -> 64 at 14x14 214 / 256 and at 7x7 138 / 165. (On an AVX2
/// CPU, with the input channels alone deciding, Winograd trained the CIFAR-10 model 1.4x faster than
/// im2col, and 32-64 channels ran faster by the direct kernel.)
pub const WINOGRAD_MIN_CHANNELS: usize = 128;

/// How the CPU computes a convolution (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    /// Nearest x2 upsampling + 3x3: four 2x2 phase convolutions (`ops/upsample_conv.rs`).
    UpsamplePhases,
    /// Winograd F(2x2, 3x3) (`ops/winograd.rs`).
    Winograd,
    /// The direct AVX2 + FMA or AVX-512 3x3 kernel (`ops/direct_conv.rs`).
    Direct,
    /// im2col + one matrix product per image.
    Im2col,
}

/// Geometry of one convolution: input (B, C, H, W), square kernel k, stride s, symmetric padding p;
/// output side H' = (H + 2p - k) / s + 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Geometry {
    pub(super) b: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) k: usize,
    pub(super) stride: usize,
    pub(super) pad: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
    /// The input is upsampled x2 (nearest) before the convolution: H, W are the input's sides and
    /// H', W' = 2H, 2W (a 3x3 kernel with stride 1 and padding 1 only).
    pub(super) upsample: bool,
}

impl Geometry {
    /// The geometry of a convolution (no upsampling) of input (B, C, H, W) = `dims`.
    fn new((b, c, h, w): (usize, usize, usize, usize), k: usize, stride: usize, pad: usize) -> Self {
        Geometry { b, c, h, w, k, stride, pad, oh: (h + 2 * pad - k) / stride + 1, ow: (w + 2 * pad - k) / stride + 1, upsample: false }
    }
    /// Rows of the column matrix: C k k.
    pub(super) fn rows(&self) -> usize {
        self.c * self.k * self.k
    }
    /// Output positions per image: L = H' W'.
    pub(super) fn positions(&self) -> usize {
        self.oh * self.ow
    }
    /// Stride 1 with "same" padding (2p = k - 1): the output has the input's size, and each row of
    /// the column matrix is the image plane shifted by (ki - p, kj - p).
    fn same_size(&self) -> bool {
        self.stride == 1 && self.oh == self.h && self.ow == self.w
    }
    /// A 1x1 kernel with stride 1 and no padding: the column matrix is the image itself.
    fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
    /// For kernel offset `ki` and output row `oy`, the input row iy = oy s + ki - p, if inside.
    fn in_row(&self, oy: usize, ki: usize) -> Option<usize> {
        (oy * self.stride + ki).checked_sub(self.pad).filter(|&iy| iy < self.h)
    }
    /// The algorithm that computes this convolution (forward and backward alike): the upsampler's
    /// phase convolutions; Winograd for a wide 3x3 "same" convolution; the direct kernel for a
    /// narrower one on a CPU with AVX2 and FMA or AVX-512; im2col for everything else.
    fn algorithm(&self, o: usize) -> Algorithm {
        if self.upsample {
            Algorithm::UpsamplePhases
        } else if winograd::applies(self.c, o, self.k, self.stride, self.pad) {
            Algorithm::Winograd
        } else if self.k == 3 && self.stride == 1 && self.pad == 1 && direct_conv::available() {
            Algorithm::Direct
        } else {
            Algorithm::Im2col
        }
    }
    /// The shape of one input image.
    fn plane(&self) -> Plane {
        Plane { c: self.c, h: self.h, w: self.w }
    }
    /// The images' 2x2 tiling for a Winograd convolution to `o` output channels.
    fn tiling(&self, o: usize) -> winograd::Tiling {
        winograd::Tiling { b: self.b, c: self.c, o, h: self.h, w: self.w }
    }
    /// For kernel offset `kj`, the output columns [lo, hi) whose input column ix = ox s + kj - p lies
    /// inside the image: ox >= ceil((p - kj) / s) and ox s + kj - p <= W - 1 (empty, lo = hi, when the
    /// offset reaches past a narrow image).
    fn col_range(&self, kj: usize) -> (usize, usize) {
        let lo = self.pad.saturating_sub(kj).div_ceil(self.stride).min(self.ow);
        let hi = if self.w + self.pad > kj { ((self.w - 1 + self.pad - kj) / self.stride + 1).min(self.ow) } else { 0 };
        (lo, hi.max(lo))
    }
}

/// im2col of one image: x (C, H, W) -> cols (C k k, L), row r = (c k + ki) k + kj, column oy W' + ox,
/// cols[r, oy W' + ox] = x[c, oy s + ki - p, ox s + kj - p] (0 outside the image).
pub(super) fn im2col_image(g: &Geometry, x: &[f32], cols: &mut [f32]) {
    if g.same_size() {
        return im2col_same_size(g, x, cols);
    }
    let (l, kk, hw) = (g.positions(), g.k * g.k, g.h * g.w);
    for (r, row) in cols.chunks_exact_mut(l).enumerate() {
        let (c, ki, kj) = (r / kk, (r / g.k) % g.k, r % g.k);
        let plane = &x[c * hw..(c + 1) * hw];
        let (lo, hi) = g.col_range(kj);
        // ix = ox s + kj - p over the valid columns [lo, hi)
        let base = kj as isize - g.pad as isize;
        for (oy, dst) in row.chunks_exact_mut(g.ow).enumerate() {
            let Some(iy) = g.in_row(oy, ki) else {
                dst.fill(0.0);
                continue;
            };
            let src = &plane[iy * g.w..(iy + 1) * g.w];
            dst[..lo].fill(0.0);
            dst[hi..].fill(0.0);
            if g.stride == 1 && lo < hi {
                let s0 = (lo as isize + base) as usize;
                dst[lo..hi].copy_from_slice(&src[s0..s0 + hi - lo]);
            } else {
                for (ox, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                    *d = src[((ox * g.stride) as isize + base) as usize];
                }
            }
        }
    }
}

/// [`im2col_image`] for a stride-1 "same" convolution: [`im2col_shifted`] with the padding on every
/// side.
fn im2col_same_size(g: &Geometry, x: &[f32], cols: &mut [f32]) {
    im2col_shifted(g.plane(), g.k, (g.pad, g.pad), x, cols)
}

/// The shape of one image: C planes of H x W.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plane {
    /// Channels.
    pub c: usize,
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
}

/// The column matrix (C k k, H W) of a stride-1 convolution whose output has the input's size, with
/// kernel k, `py` rows of zero padding on top and `px` columns on the left (and what the kernel needs
/// at the bottom and right). Row r = (c k + ki) k + kj is plane c shifted by (dy, dx) = (ki - py,
/// kj - px): cols[r, j] = x[c, j + dy W + dx] for j = oy W + ox, except where oy + dy or ox + dx falls
/// outside the image (0 there). One contiguous copy per row, then the |dx| edge columns whose source
/// wrapped into the neighbouring image row are zeroed; the per-output-row copies of the general path
/// cost a library call each, which dominated im2col for narrow images.
pub(crate) fn im2col_shifted(p: Plane, k: usize, (py, px): (usize, usize), x: &[f32], cols: &mut [f32]) {
    let (w, hw, kk) = (p.w, p.h * p.w, k * k);
    for (r, row) in cols.chunks_exact_mut(hw).enumerate().take(p.c * kk) {
        let (c, ki, kj) = (r / kk, (r / k) % k, r % k);
        let plane = &x[c * hw..(c + 1) * hw];
        let (dy, dx) = (ki as isize - py as isize, kj as isize - px as isize);
        // output rows whose source row oy + dy is inside the image
        let oy_lo = ((-dy).max(0) as usize).min(p.h);
        let oy_hi = (p.h as isize - dy).clamp(0, p.h as isize) as usize;
        let (j0, j1) = (oy_lo * w, (oy_hi * w).max(oy_lo * w));
        // cols[r, j] = plane[j + shift] for j in [lo, hi): the valid rows [j0, j1) clipped to the plane
        // (what the clip leaves out is an edge column); zero before and after
        let shift = dy * w as isize + dx;
        let lo = ((-shift).max(0) as usize).clamp(j0, j1);
        let hi = ((hw as isize - shift).max(0) as usize).clamp(lo, j1);
        row[..lo].fill(0.0);
        if lo < hi {
            row[lo..hi].copy_from_slice(&plane[(lo as isize + shift) as usize..(hi as isize + shift) as usize]);
        }
        row[hi..].fill(0.0);
        // columns ox < -dx and ox >= W - dx read across a row boundary: zero them, one column at a
        // time down the rows (a fill per row would be a library call per row again)
        let edges = (0..((-dx).max(0) as usize).min(w)).chain(w.saturating_sub(dx.max(0) as usize)..w);
        for ox in edges {
            for v in row[j0..j1].iter_mut().skip(ox).step_by(w) {
                *v = 0.0;
            }
        }
    }
}

/// col2im of one image, the adjoint of [`im2col_image`]: dcols (C k k, L) is added into dx (C, H, W),
/// each entry back onto the input pixel it was copied from. `dx` must start at zero.
pub(super) fn col2im_image(g: &Geometry, cols: &[f32], dx: &mut [f32]) {
    let (l, kk, hw) = (g.positions(), g.k * g.k, g.h * g.w);
    for (r, row) in cols.chunks_exact(l).enumerate() {
        let (c, ki, kj) = (r / kk, (r / g.k) % g.k, r % g.k);
        let plane = &mut dx[c * hw..(c + 1) * hw];
        let (lo, hi) = g.col_range(kj);
        let base = kj as isize - g.pad as isize;
        for (oy, src) in row.chunks_exact(g.ow).enumerate() {
            let Some(iy) = g.in_row(oy, ki) else { continue };
            let dst = &mut plane[iy * g.w..(iy + 1) * g.w];
            // dx[c, iy, ox s + kj - p] += dcols[r, oy, ox] over the valid columns
            if g.stride == 1 && lo < hi {
                let d0 = (lo as isize + base) as usize;
                for (d, v) in dst[d0..d0 + hi - lo].iter_mut().zip(&src[lo..hi]) {
                    *d += v;
                }
            } else {
                for (ox, v) in src.iter().enumerate().take(hi).skip(lo) {
                    dst[((ox * g.stride) as isize + base) as usize] += v;
                }
            }
        }
    }
}

thread_local! {
    /// Per-thread scratch for one image's column matrix.
    static COLS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Per-thread scratch for one image's column-matrix gradient.
    static DCOLS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The bias of image `b` among `o` output channels: the shared (O) bias, or row b of a per-image (B, O)
/// bias.
pub(crate) fn image_bias(bias: &[f32], o: usize, b: usize) -> &[f32] {
    if bias.len() == o {
        bias
    } else {
        &bias[b * o..(b + 1) * o]
    }
}

/// The convolution `(x, w, bias) -> y` by the geometry's [`Algorithm`], with bias (O) shared by the
/// images or (B, O) one row per image. Its backward is [`ConvGrad`].
struct ConvOp(Geometry);

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "ddpm-conv2d"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout, sb: &CpuStorage, lb: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (x, w, bias) = (super::f32_slice(sx, lx, self.name(), "x")?, super::f32_slice(sw, lw, self.name(), "weight")?, super::f32_slice(sb, lb, self.name(), "bias")?);
        let (rows, chw) = (g.rows(), g.c * g.h * g.w);
        let o = w.len() / rows;
        if x.len() != g.b * chw || w.len() != o * rows || (bias.len() != o && bias.len() != g.b * o) {
            candle_core::bail!("ddpm-conv2d: argument sizes do not match {g:?}");
        }
        let y = match g.algorithm(o) {
            Algorithm::UpsamplePhases => upsample_conv::forward(g.plane(), g.b, x, w, bias),
            Algorithm::Winograd => winograd::forward(&g.tiling(o), x, w, bias),
            Algorithm::Direct => direct_conv::forward(g.plane(), g.b, x, w, bias),
            Algorithm::Im2col => conv_im2col(&g, o, x, w, bias),
        };
        Ok((CpuStorage::F32(y), Shape::from((g.b, o, g.oh, g.ow))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, bias: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _span = ddpm_core::ops::profile::span(x.device(), "conv backward");
        let (dx, dw, dbias) = gradients(self.0, x, w, bias.shape(), grad)?;
        Ok((Some(dx), Some(dw), Some(dbias)))
    }
}

/// (dx, dW, dbias) of the convolution of geometry `g` for the output gradient `dy`, by one
/// [`ConvGrad`] op outside the graph; the bias has the shape `bias_shape`, (O) or (B, O).
fn gradients(g: Geometry, x: &Tensor, w: &Tensor, bias_shape: &Shape, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let op = ConvGrad { g, bias_len: bias_shape.elem_count() };
    let packed = x.detach().contiguous()?.apply_op3_no_bwd(&w.detach().contiguous()?, &dy.detach().contiguous()?, &op)?;
    // packed = [dx (B C H W) | dW (O C k k) | dbias (O or B O)]
    let (nx, nw) = (x.elem_count(), w.elem_count());
    let dx = packed.narrow(0, 0, nx)?.reshape(x.shape())?;
    let dw = packed.narrow(0, nx, nw)?.reshape(w.shape())?;
    let dbias = packed.narrow(0, nx + nw, op.bias_len)?.reshape(bias_shape)?;
    Ok((dx, dw, dbias))
}

/// The gradients (dx, dW, dbias) of [`conv2d`] with a shared (O) bias, for the output gradient dy
/// (B, O, H', W'), computed by the ops that [`conv2d`]'s backward pass runs but outside candle's graph:
/// no gradient store around them (a zeroed buffer and an add per argument, which `cargo bench --bench
/// conv` shows as the gap between its "fwd+bwd" and "bwd op" columns). For a custom backward pass, and
/// for timing the kernels alone. The CPU kernels take f32 on the CPU, cuDNN f32, bf16 and f16 on
/// CUDA, and candle's conv2d gradient by autograd the rest (f16 on the CPU, for one); x and dy share
/// one dtype, w is cast to it (as [`conv2d`] casts f32 master weights). dx and dW come in x's dtype,
/// dbias in f32 (summed in f32).
pub fn conv2d_backward(x: &Tensor, w: &Tensor, dy: &Tensor, stride: usize, pad: usize) -> Result<(Tensor, Tensor, Tensor)> {
    checked_gradients(x, w, dy, stride, pad, false)
}

/// [`conv2d_backward`] for a convolution with a per-image (B, O) bias: dbias is (B, O), row b the sum
/// of dy's image b over its positions.
pub fn conv2d_backward_per_image_bias(x: &Tensor, w: &Tensor, dy: &Tensor, stride: usize, pad: usize) -> Result<(Tensor, Tensor, Tensor)> {
    checked_gradients(x, w, dy, stride, pad, true)
}

/// The checks of [`conv2d_backward`], then [`gradients`] (CPU) or cuDNN's passes and the bias' sums
/// (CUDA), with a shared or a per-image bias.
fn checked_gradients(x: &Tensor, w: &Tensor, dy: &Tensor, stride: usize, pad: usize, per_image: bool) -> Result<(Tensor, Tensor, Tensor)> {
    let _span = ddpm_core::ops::profile::span(x.device(), "conv backward");
    let w = &super::cast_like(w, x)?;
    let (b, c, h, wd, k, _) = check_conv(x, w, None, stride, pad)?;
    let g = Geometry::new((b, c, h, wd), k, stride, pad);
    let o = w.dim(0)?;
    if dy.dims() != [b, o, g.oh, g.ow] {
        candle_core::bail!("conv2d_backward: dy is {:?}, the convolution's output is {:?}", dy.dims(), [b, o, g.oh, g.ow]);
    }
    if fused(x, w, None) && dy.device().is_cpu() && dy.dtype() == DType::F32 {
        let bias_shape = if per_image { Shape::from((b, o)) } else { Shape::from(o) };
        return gradients(g, x, w, &bias_shape, dy);
    }
    if dy.dtype() != x.dtype() || !dy.device().same_device(x.device()) {
        candle_core::bail!("conv2d_backward: dy ({:?} on {:?}) must have x's dtype and device ({:?} on {:?})", dy.dtype(), dy.device().location(), x.dtype(), x.device().location());
    }
    let (dx, dw) = match cudnn_gradients(x, w, dy, &g)? {
        Some(grads) => grads,
        None => composed_gradients(x, w, dy, stride, pad)?,
    };
    Ok((dx, dw, bias_gradient(dy, per_image)?))
}

/// dx and dW of the convolution for the output gradient dy by candle's own conv2d and its autograd,
/// on detached copies of x and w: `conv2d_backward`'s fallback for the devices and dtypes that
/// neither the CPU kernels (f32) nor cuDNN take, as far as candle's convolution goes (f16 on the
/// CPU, for example). Since sum(y dy) has the gradient dy at y, its gradients are dx and dW.
fn composed_gradients(x: &Tensor, w: &Tensor, dy: &Tensor, stride: usize, pad: usize) -> Result<(Tensor, Tensor)> {
    let (xv, wv) = (candle_core::Var::from_tensor(&x.detach())?, candle_core::Var::from_tensor(&w.detach())?);
    let y = xv.conv2d(&wv, pad, stride, 1, 1)?;
    let grads = (y * dy.detach())?.sum_all()?.backward()?;
    let grad = |v: &candle_core::Var, what: &str| match grads.get(v) {
        Some(g) => Ok(g.clone()),
        None => candle_core::bail!("conv2d_backward: candle's autograd gave no gradient for {what}"),
    };
    Ok((grad(&xv, "x")?, grad(&wv, "the weight")?))
}

/// The bias' gradient for the output gradient dy (B, O, H', W'), in f32: dbias_b[o] = sum over the
/// positions of dy_b[o], (B, O) for a per-image bias, summed over b to (O) for a shared one.
pub(super) fn bias_gradient(dy: &Tensor, per_image: bool) -> Result<Tensor> {
    let per_image_sums = dy.to_dtype(DType::F32)?.sum((2, 3))?;
    if per_image {
        Ok(per_image_sums)
    } else {
        per_image_sums.sum(0)
    }
}

/// The convolution's gradient `(x, W, dY) -> [dx | dW | dbias]` (flat), per image b:
///
///   dW    += dY_b (O, L) @ im2col(x_b)^T      dbias_b[o] = sum_l dY_b[o, l]  (summed over b for a shared bias)
///   dx_b   = col2im(W^T (C k k, O) @ dY_b)
///
/// The images are split into one fixed group per thread; each group sums its dW in image order and
/// the groups and the images' bias sums are added in order, so the result does not depend on
/// scheduling (a resumed run reproduces an uninterrupted one bit for bit).
struct ConvGrad {
    g: Geometry,
    /// Elements of the bias: O when shared by the images, B O for one row per image.
    bias_len: usize,
}

impl CustomOp3 for ConvGrad {
    fn name(&self) -> &'static str {
        "ddpm-conv2d-grad"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout, sd: &CpuStorage, ld: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let (x, w, dy) = (super::f32_slice(sx, lx, self.name(), "x")?, super::f32_slice(sw, lw, self.name(), "weight")?, super::f32_slice(sd, ld, self.name(), "gradient")?);
        let (rows, l, chw) = (g.rows(), g.positions(), g.c * g.h * g.w);
        let o = w.len() / rows;
        if x.len() != g.b * chw || dy.len() != g.b * o * l || (self.bias_len != o && self.bias_len != g.b * o) {
            candle_core::bail!("ddpm-conv2d-grad: argument sizes do not match {g:?}");
        }
        let (nx, nw) = (x.len(), o * rows);
        let mut packed = vec![0f32; nx + nw + self.bias_len];
        let (dx, dparams) = packed.split_at_mut(nx);
        let (dw_total, dbias) = dparams.split_at_mut(nw);
        match g.algorithm(o) {
            Algorithm::UpsamplePhases => upsample_conv::backward(g.plane(), g.b, x, w, dy, dx, dw_total),
            Algorithm::Winograd => winograd::backward(&g.tiling(o), x, w, dy, dx, dw_total),
            Algorithm::Direct => direct_conv::backward(g.plane(), g.b, x, w, dy, dx, dw_total),
            Algorithm::Im2col => conv_grad_im2col(&g, o, x, w, dy, dx, dw_total),
        }
        // s_b[o] = sum over the positions of dY_b[o]; dbias = s, or sum_b s_b for a shared bias
        let sums: Vec<f32> = dy.par_chunks(l).map(super::sum_in_lanes).collect();
        if self.bias_len == sums.len() {
            dbias.copy_from_slice(&sums);
        } else {
            for sb in sums.chunks_exact(o) {
                dbias.iter_mut().zip(sb).for_each(|(d, v)| *d += v);
            }
        }
        Ok((CpuStorage::F32(packed), Shape::from(nx + nw + self.bias_len)))
    }
}

/// y (B, O, H', W') of the im2col convolution: per image, y_b = bias_b + W (O, C k k) @ im2col(x_b)
/// (x_b itself for a pointwise kernel), the product written onto the bias.
fn conv_im2col(g: &Geometry, o: usize, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
    let (rows, l, chw) = (g.rows(), g.positions(), g.c * g.h * g.w);
    let par = inner_parallelism(g.b);
    let mut y = uninit_vec(g.b * o * l);
    y.par_chunks_mut(o * l).zip(x.par_chunks(chw)).enumerate().for_each(|(b, (yb, xb))| {
        // y_b starts as bias_b[o] at every position of channel o; the product is added onto it
        let yb = init_rows(yb, l, image_bias(bias, o, b));
        // y_b += W @ cols_b (cols_b = x_b for a pointwise kernel)
        let product = |cols: &[f32], yb: &mut [f32]| unsafe { sgemm((o, l, rows), yb, true, 1.0, View::rows(w, rows), View::rows(cols, l), par) };
        if g.pointwise() {
            product(xb, yb);
        } else {
            with_scratch(&COLS, rows * l, |cols| {
                im2col_image(g, xb, cols);
                product(cols, yb);
            });
        }
    });
    // SAFETY: init_rows wrote every image's rows
    unsafe { assume_init_vec(y) }
}

/// dx and dW of the im2col convolution (see [`ConvGrad`]; for a stride-1 "same" convolution dx is the
/// convolution of dY with the flipped kernel): the images are split into one fixed group per thread,
/// each group sums its dW in image order, and the groups' partial sums are added in order.
fn conv_grad_im2col(g: &Geometry, o: usize, x: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], dw_total: &mut [f32]) {
    let (rows, l, chw) = (g.rows(), g.positions(), g.c * g.h * g.w);
    let (par, nw) = (inner_parallelism(g.b), o * rows);
    let per_group = g.b.div_ceil(rayon::current_num_threads().max(1)).max(1);
    // A stride-1 "same" convolution's dx is itself a "same" convolution, of dY with the kernel flipped
    // and its channels swapped: dx[c] = sum_o dY[o] * flip(W[o, c]). So dx_b (C, L) = W' (C, O k k) @
    // im2col(dY_b), a product as large as the forward's written straight into dx, instead of
    // W^T dY_b (C k k, L), whose inner dimension is only O, and a col2im scatter.
    let flipped = (g.same_size() && !g.pointwise()).then(|| flip_kernel(w, o, g.c, g.k));
    let gy = Geometry { c: o, ..*g };
    // One dW partial per group of images.
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(per_group * chw)
        .zip(x.par_chunks(per_group * chw))
        .zip(dy.par_chunks(per_group * o * l))
        .map(|((dxg, xg), dyg)| {
            let mut dw = vec![0f32; nw];
            for ((dxb, xb), dyb) in dxg.chunks_exact_mut(chw).zip(xg.chunks_exact(chw)).zip(dyg.chunks_exact(o * l)) {
                // dW += dY_b @ cols_b^T
                let dw_product = |cols: &[f32], dw: &mut [f32]| unsafe { sgemm((o, rows, l), dw, true, 1.0, View::rows(dyb, l), View::transposed(cols, l), par) };
                // dcols_b = W^T @ dY_b
                let dcols_product = |dcols: &mut [f32]| unsafe { sgemm((rows, l, o), dcols, false, 1.0, View::transposed(w, rows), View::rows(dyb, l), par) };
                if g.pointwise() {
                    dw_product(xb, &mut dw);
                    dcols_product(dxb);
                    continue;
                }
                with_scratch(&COLS, rows * l, |cols| {
                    im2col_image(g, xb, cols);
                    dw_product(cols, &mut dw);
                });
                match &flipped {
                    // dx_b = W' @ im2col(dY_b)
                    Some(wf) => with_scratch(&DCOLS, gy.rows() * l, |cols| {
                        im2col_image(&gy, dyb, cols);
                        unsafe { sgemm((g.c, l, gy.rows()), dxb, false, 1.0, View::rows(wf, gy.rows()), View::rows(cols, l), par) };
                    }),
                    None => with_scratch(&DCOLS, rows * l, |dcols| {
                        dcols_product(dcols);
                        col2im_image(g, dcols, dxb);
                    }),
                }
            }
            dw
        })
        .collect();
    for p in &partials {
        dw_total.iter_mut().zip(p).for_each(|(d, v)| *d += v);
    }
}

/// W' (C, O, k, k) with W'[c, o, i, j] = W[o, c, k - 1 - i, k - 1 - j]: the kernel of the convolution
/// that maps dY to dx for a stride-1 "same" convolution with kernel W (O, C, k, k).
pub(crate) fn flip_kernel(w: &[f32], o: usize, c: usize, k: usize) -> Vec<f32> {
    let kk = k * k;
    let mut flipped = vec![0f32; w.len()];
    for (oi, wo) in w.chunks_exact(c * kk).enumerate() {
        for (ci, kernel) in wo.chunks_exact(kk).enumerate() {
            let dst = &mut flipped[(ci * o + oi) * kk..(ci * o + oi + 1) * kk];
            // reversing the k k entries flips both axes
            for (d, v) in dst.iter_mut().zip(kernel.iter().rev()) {
                *d = *v;
            }
        }
    }
    flipped
}

/// y = conv2d(x, w) + bias, square kernel, stride `stride`, zero padding `pad` on every side. The bias
/// is (O), shared by the images, or (B, O), one row per image (a per-sample shift such as a time
/// embedding, added without a separate pass over y).
///
/// On the CPU in f32 this is im2col + one matrix product per image, Winograd F(2x2, 3x3) for a wide
/// 3x3 "same" convolution or the direct AVX2 / AVX-512 kernel for a narrower one, with the analytic
/// backward (see the module docs); on CUDA in f32, bf16 or f16 with the project's kernels enabled
/// ([`super::cuda_kernels_enabled`]) it runs through cuDNN (`ops/cudnn_conv.rs`) where cuDNN is
/// loaded, else [`conv2d_columns`], as it does on Metal with [`super::metal_kernels_enabled`];
/// elsewhere candle's `conv2d`. All are differentiable in x, w and bias. Weight and bias in another
/// dtype than x (f32 master weights under mixed precision) are cast to x's ([`super::cast_like`]).
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, stride: usize, pad: usize) -> Result<Tensor> {
    let _span = ddpm_core::ops::profile::span(x.device(), "conv forward");
    let (w, bias) = params_like(x, w, bias)?;
    let (w, bias) = (&w, bias.as_ref());
    let (b, c, h, wd, k, bias_rows) = check_conv(x, w, bias, stride, pad)?;
    let g = Geometry::new((b, c, h, wd), k, stride, pad);
    if fused(x, w, bias) {
        apply(x, w, bias, g)
    } else if let Some(y) = by_cudnn(x, w, bias, &g)? {
        Ok(y)
    } else if by_columns(x, w, bias) {
        add_bias(columns::conv2d(x, w, g)?, bias, bias_rows)
    } else {
        add_bias(x.conv2d(w, pad, stride, 1, 1)?, bias, bias_rows)
    }
}

/// [`conv2d`] as a column matrix and a matrix product on any device (`ops/columns.rs`): im2col of all
/// images side by side, one product by candle's matmul, col2im in the backward; what CUDA tensors run with the
/// project's kernels enabled. x, weight and bias share one dtype: f32, bf16 or f16, in which the
/// products run (and, on CUDA, im2col and col2im).
pub fn conv2d_columns(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, stride: usize, pad: usize) -> Result<Tensor> {
    let (b, c, h, wd, k, bias_rows) = check_conv(x, w, bias, stride, pad)?;
    if !columns_dtype(x, w, bias) {
        candle_core::bail!("conv2d_columns: x, weight and bias must share one dtype of f32, bf16 and f16");
    }
    let g = Geometry::new((b, c, h, wd), k, stride, pad);
    add_bias(columns::conv2d(x, w, g)?, bias, bias_rows)
}

/// y = conv2d(upsample_nearest2x(x), w) + bias with a 3x3 kernel, stride 1 and padding 1: a UNet's
/// upsampler, (B, C, H, W) -> (B, O, 2H, 2W), bias as in [`conv2d`].
///
/// On the CPU in f32 it runs on x itself as four 2x2 convolutions, one per output phase, with 4/9 of
/// the flops and no upsampled image (`ops/upsample_conv.rs`); elsewhere it upsamples with
/// [`upsample_nearest2x`] and convolves as [`conv2d`] does there. Differentiable in x, w and bias.
pub fn upsample2x_conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let _span = ddpm_core::ops::profile::span(x.device(), "conv forward");
    let (w, bias) = params_like(x, w, bias)?;
    let (w, bias) = (&w, bias.as_ref());
    let (b, c, h, wd, k, bias_rows) = check_conv(x, w, bias, 1, 1)?;
    if k != 3 {
        candle_core::bail!("upsample2x_conv2d: the kernel must be 3x3, weight is {:?}", w.dims());
    }
    if !fused(x, w, bias) {
        let u = upsample_nearest2x(x)?;
        let g = Geometry::new((b, c, 2 * h, 2 * wd), k, 1, 1);
        if let Some(y) = by_cudnn(&u, w, bias, &g)? {
            return Ok(y);
        }
        if by_columns(x, w, bias) {
            return add_bias(columns::conv2d(&u, w, g)?, bias, bias_rows);
        }
        return add_bias(u.conv2d(w, 1, 1, 1, 1)?, bias, bias_rows);
    }
    let g = Geometry { b, c, h, w: wd, k, stride: 1, pad: 1, oh: 2 * h, ow: 2 * wd, upsample: true };
    apply(x, w, bias, g)
}

/// Nearest-neighbour x2 upsampling of (N, C, H, W) to (N, C, 2H, 2W) by broadcast and reshape:
/// y[n, c, 2i + a, 2j + b] = x[n, c, i, j] for a, b in {0, 1}. Its gradient sums the four copies.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h, 1, w, 1))?.broadcast_as((n, c, h, 2, w, 2))?.reshape((n, c, 2 * h, 2 * w))
}

/// The weight and bias in x's dtype ([`super::cast_like`]: f32 master weights meet bf16 or f16
/// activations under mixed precision).
fn params_like(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
    Ok((super::cast_like(w, x)?, bias.map(|b| super::cast_like(b, x)).transpose()?))
}

/// Checks the arguments of a convolution and returns (B, C, H, W, k, rows of the bias): 1 for a
/// shared (O) bias, B for a per-image (B, O) one.
fn check_conv(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, stride: usize, pad: usize) -> Result<(usize, usize, usize, usize, usize, usize)> {
    let (b, c, h, wd) = x.dims4()?;
    let (o, ci, k, k2) = w.dims4()?;
    if ci != c || k != k2 {
        candle_core::bail!("conv2d: input has {c} channels, weight is {:?} (need (O, {c}, k, k))", w.dims());
    }
    if stride == 0 || h + 2 * pad < k || wd + 2 * pad < k {
        candle_core::bail!("conv2d: kernel {k} with stride {stride} and padding {pad} does not fit a {h}x{wd} input");
    }
    let bias_rows = match bias.map(|t| t.dims()) {
        None => 1,
        Some([bo]) if *bo == o => 1,
        Some([bb, bo]) if *bb == b && *bo == o => b,
        Some(d) => candle_core::bail!("conv2d: bias is {d:?}, need ({o}) or ({b}, {o})"),
    };
    Ok((b, c, h, wd, k, bias_rows))
}

/// Whether the fused CPU kernels take these tensors: all on the CPU in f32.
fn fused(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 && bias.is_none_or(|t| t.dtype() == DType::F32)
}

/// The convolution of geometry `g` with its bias (checked by [`check_conv`]), by cuDNN where it runs
/// this one (`ops/cudnn_conv.rs`: CUDA with the project's kernels enabled, cuDNN loaded, one dtype of
/// f32, bf16 and f16), else `None`.
fn by_cudnn(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, g: &Geometry) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if columns_dtype(x, w, bias) {
        if let Some(plan) = super::cudnn_conv::plan_for(x.device(), x.dtype(), g, w.dim(0)?) {
            return super::cudnn_conv::conv2d(x, w, bias, plan).map(Some);
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (x, w, bias, g);
    Ok(None)
}

/// Whether cuDNN runs `conv` on an input of `dims` (B, C, H, W) in `dtype` on `device` (what
/// [`conv2d`] does there, and what lets [`conv2d_backward`] take CUDA tensors): always false without
/// the `cuda` feature.
pub(crate) fn cudnn_convolves(device: &candle_core::Device, dtype: DType, dims: (usize, usize, usize, usize), conv: &Conv2d) -> bool {
    #[cfg(feature = "cuda")]
    {
        let Ok((o, _, k, _)) = conv.weight.dims4() else { return false };
        let g = Geometry::new(dims, k, conv.stride, conv.padding);
        super::cudnn_conv::plan_for(device, dtype, &g, o).is_some()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, dtype, dims, conv);
        false
    }
}

/// dx and dW of the convolution of geometry `g` by cuDNN's backward passes, for x, w and dy in one
/// dtype that cuDNN convolves on their CUDA device, else `None`.
fn cudnn_gradients(x: &Tensor, w: &Tensor, dy: &Tensor, g: &Geometry) -> Result<Option<(Tensor, Tensor)>> {
    #[cfg(feature = "cuda")]
    if columns_dtype(x, w, Some(dy)) && dy.device().same_device(x.device()) {
        if let Some(plan) = super::cudnn_conv::plan_for(x.device(), x.dtype(), g, w.dim(0)?) {
            return super::cudnn_conv::gradients(x, w, dy, &plan).map(Some);
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (x, w, dy, g);
    Ok(None)
}

/// Whether these tensors take [`conv2d_columns`]: on CUDA or Metal with the project's kernels
/// enabled, in a dtype it takes.
fn by_columns(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> bool {
    (super::cuda_kernels_enabled(x.device()) || super::metal_kernels_enabled(x.device())) && columns_dtype(x, w, bias)
}

/// Whether x, w and bias share one dtype of f32, bf16 and f16 (what [`conv2d_columns`] takes).
fn columns_dtype(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> bool {
    matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) && [w].into_iter().chain(bias).all(|t| t.dtype() == x.dtype())
}

/// y + bias broadcast over the positions, for candle's convolution and the column path (whose y is a
/// transposed view: the result is contiguous either way).
fn add_bias(y: Tensor, bias: Option<&Tensor>, bias_rows: usize) -> Result<Tensor> {
    match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((bias_rows, y.dim(1)?, 1, 1))?),
        None => y.contiguous(),
    }
}

/// Runs the fused convolution op of geometry `g` (a missing bias is zero).
fn apply(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, g: Geometry) -> Result<Tensor> {
    let bias = match bias {
        Some(t) => t.contiguous()?,
        None => Tensor::zeros(w.dim(0)?, DType::F32, x.device())?,
    };
    x.contiguous()?.apply_op3(&w.contiguous()?, &bias, ConvOp(g))
}

/// A convolution layer with square kernel, bias, stride and symmetric zero padding, computed by
/// [`conv2d`].
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// Weight (O, C, k, k).
    pub weight: Tensor,
    /// Bias (O).
    pub bias: Option<Tensor>,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl Conv2d {
    /// A layer from its parameters.
    pub fn new(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Self {
        Self { weight, bias, stride, padding }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(x, &self.weight, self.bias.as_ref(), self.stride, self.padding)
    }
}
