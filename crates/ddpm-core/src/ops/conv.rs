//! 2-D convolution as im2col + one matrix product, with an analytic backward that never runs a
//! transposed convolution.
//!
//! candle's CPU convolution gradient goes through `conv_transpose2d`, a direct loop that is several
//! times slower than PyTorch. Here a convolution of x (B, C, H, W) with w (O, C, k, k) is
//!
//!   cols = im2col(x)                  (C k k, B L),  L = H' W'
//!   y    = w.reshape(O, C k k) @ cols (O, B L)  -> (B, O, H', W')
//!
//! and the backward is two more large, multi-threaded products, dW = dY cols^T and dcols = W^T dY,
//! followed by col2im, the scatter-add adjoint of im2col. The column matrix is rebuilt in the
//! backward pass rather than kept from the forward one: it is k^2 times the size of the input, and
//! keeping one per layer would hold several hundred MB for a batch of 64. On devices or dtypes
//! without these kernels the layer falls back to candle's `conv2d`.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Module, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Geometry of one convolution: input (B, C, H, W), square kernel k, stride s, symmetric padding p;
/// output side H' = (H + 2p - k) / s + 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    /// Rows of the column matrix: C k k.
    fn rows(&self) -> usize {
        self.c * self.k * self.k
    }
    /// Output positions per image: L = H' W'.
    fn positions(&self) -> usize {
        self.oh * self.ow
    }
    /// For kernel offset `ki` and output row `oy`, the input row iy = oy s + ki - p, if inside.
    fn in_row(&self, oy: usize, ki: usize) -> Option<usize> {
        (oy * self.stride + ki).checked_sub(self.pad).filter(|&iy| iy < self.h)
    }
    /// For kernel offset `kj`, the output columns [lo, hi) whose input column ix = ox s + kj - p lies
    /// inside the image: ox >= ceil((p - kj) / s) and ox s + kj - p <= W - 1.
    fn col_range(&self, kj: usize) -> (usize, usize) {
        let lo = self.pad.saturating_sub(kj).div_ceil(self.stride);
        let hi = if self.w + self.pad > kj { ((self.w - 1 + self.pad - kj) / self.stride + 1).min(self.ow) } else { 0 };
        (lo, hi.max(lo))
    }
}

/// im2col: x (B, C, H, W) -> cols (C k k, B L), row r = (c k + ki) k + kj, column b L + oy W' + ox,
/// cols[r, b L + oy W' + ox] = x[b, c, oy s + ki - p, ox s + kj - p] (0 outside the image).
struct Im2Col(Geometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "ddpm-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("ddpm-im2col needs a contiguous f32 input"),
        };
        let (l, kk) = (g.positions(), g.k * g.k);
        let mut cols = vec![0f32; g.rows() * g.b * l];
        cols.par_chunks_mut(g.b * l).enumerate().for_each(|(r, row)| {
            let (c, ki, kj) = (r / kk, (r / g.k) % g.k, r % g.k);
            let (lo, hi) = g.col_range(kj);
            for b in 0..g.b {
                let plane = &x[(b * g.c + c) * g.h * g.w..(b * g.c + c + 1) * g.h * g.w];
                for oy in 0..g.oh {
                    let Some(iy) = g.in_row(oy, ki) else { continue };
                    let src = &plane[iy * g.w..(iy + 1) * g.w];
                    let dst = &mut row[b * l + oy * g.ow..b * l + (oy + 1) * g.ow];
                    // ix = ox s + kj - p over the valid columns (the rest stays 0)
                    let base = kj as isize - g.pad as isize;
                    if g.stride == 1 {
                        let s0 = (lo as isize + base) as usize;
                        dst[lo..hi].copy_from_slice(&src[s0..s0 + hi - lo]);
                    } else {
                        for (ox, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                            *d = src[((ox * g.stride) as isize + base) as usize];
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(cols), Shape::from((g.rows(), g.b * l))))
    }

}

/// col2im, the adjoint of [`Im2Col`]: dcols (C k k, B L) -> dx (B, C, H, W), each column entry added
/// back to the input pixel it was copied from.
struct Col2Im(Geometry);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "ddpm-col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let cols = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("ddpm-col2im needs a contiguous f32 input"),
        };
        let (l, bl) = (g.positions(), g.b * g.positions());
        let mut dx = vec![0f32; g.b * g.c * g.h * g.w];
        // One (b, c) plane per task: every write of a task stays in its own plane.
        dx.par_chunks_mut(g.h * g.w).enumerate().for_each(|(p, plane)| {
            let (b, c) = (p / g.c, p % g.c);
            for ki in 0..g.k {
                for kj in 0..g.k {
                    let r = (c * g.k + ki) * g.k + kj;
                    let src = &cols[r * bl + b * l..r * bl + (b + 1) * l];
                    let (lo, hi) = g.col_range(kj);
                    let base = kj as isize - g.pad as isize;
                    for oy in 0..g.oh {
                        let Some(iy) = g.in_row(oy, ki) else { continue };
                        let dst = &mut plane[iy * g.w..(iy + 1) * g.w];
                        let s = &src[oy * g.ow..(oy + 1) * g.ow];
                        // dx[iy, ox s + kj - p] += dcols[r, oy, ox] over the valid columns
                        if g.stride == 1 {
                            let d0 = (lo as isize + base) as usize;
                            for (d, v) in dst[d0..d0 + hi - lo].iter_mut().zip(&s[lo..hi]) {
                                *d += v;
                            }
                        } else {
                            for (ox, v) in s.iter().enumerate().take(hi).skip(lo) {
                                dst[((ox * g.stride) as isize + base) as usize] += v;
                            }
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(dx), Shape::from((g.b, g.c, g.h, g.w))))
    }
}

/// Carries the convolution's gradient. Its arguments are (x, w, bias); its forward returns a copy of
/// the output y = conv(x, w) + bias computed beforehand without a graph; its backward gives
/// dx = col2im(W^T dY), dW = dY im2col(x)^T and dbias = the sum of dY over batch and positions.
struct ConvBackward {
    g: Geometry,
    y: Tensor,
}

impl CustomOp3 for ConvBackward {
    fn name(&self) -> &'static str {
        "ddpm-conv2d"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let (storage, layout) = self.y.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok((CpuStorage::F32(v[a..b].to_vec()), layout.shape().clone())),
            _ => candle_core::bail!("ddpm-conv2d needs a contiguous f32 output on the CPU"),
        }
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _bias: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.g;
        let o = w.dim(0)?;
        let cols = x.contiguous()?.apply_op1_no_bwd(&Im2Col(g))?;
        // dY as (O, B L): the output's batch and channel axes swapped.
        let dy = swap_leading(grad, g.b, o, g.positions(), None)?.reshape((o, g.b * g.positions()))?;
        // dbias = sum over batch and positions of dY, (O)
        let dbias = dy.sum(1)?;
        // dW = dY cols^T, (O, C k k)
        let dw = dy.matmul(&cols.t()?)?.reshape(w.shape())?;
        // dcols = W^T dY, (C k k, B L); dx = col2im(dcols)
        let dcols = w.reshape((o, g.rows()))?.t()?.matmul(&dy)?;
        let dx = dcols.apply_op1_no_bwd(&Col2Im(g))?;
        Ok((Some(dx), Some(dw), Some(dbias)))
    }
}

/// Swaps the two leading axes of a contiguous (A, B, L) f32 tensor into (B, A, L) by copying whole
/// rows of L values (candle's strided copy computes every element's index with divisions), adding
/// `bias[i]` to every value of row i when there is a bias (A values).
struct SwapLeading(Option<Vec<f32>>);

impl CustomOp1 for SwapLeading {
    fn name(&self) -> &'static str {
        "ddpm-swap-leading"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, b, l) = layout.shape().dims3()?;
        let src = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((s, e))) => &v[s..e],
            _ => candle_core::bail!("ddpm-swap-leading needs a contiguous f32 input"),
        };
        let mut out = vec![0f32; a * b * l];
        // out[j, i, :] = src[i, j, :] (+ bias[i])
        out.par_chunks_mut(a * l).enumerate().for_each(|(j, block)| {
            for (i, row) in block.chunks_exact_mut(l).enumerate() {
                let from = &src[(i * b + j) * l..(i * b + j + 1) * l];
                match &self.0 {
                    Some(bias) => row.iter_mut().zip(from).for_each(|(d, v)| *d = v + bias[i]),
                    None => row.copy_from_slice(from),
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, a, l))))
    }
}

/// (A, B, L) -> (B, A, L), plus `bias` (A) per row, without a gradient, on the CPU in f32.
fn swap_leading(x: &Tensor, a: usize, b: usize, l: usize, bias: Option<&Tensor>) -> Result<Tensor> {
    let bias = bias.map(|t| t.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?;
    x.reshape((a, b, l))?.contiguous()?.apply_op1_no_bwd(&SwapLeading(bias))
}

/// y = conv2d(x, w) + bias, square kernel, stride `stride`, zero padding `pad` on every side.
///
/// On the CPU in f32 this is im2col + one matrix product (see the module docs); elsewhere it is
/// candle's `conv2d`. Both are differentiable in x, w and bias.
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, stride: usize, pad: usize) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (o, ci, k, k2) = w.dims4()?;
    if ci != c || k != k2 {
        candle_core::bail!("conv2d: input has {c} channels, weight is {:?} (need (O, {c}, k, k))", w.dims());
    }
    if stride == 0 || h + 2 * pad < k || wd + 2 * pad < k {
        candle_core::bail!("conv2d: kernel {k} with stride {stride} and padding {pad} does not fit a {h}x{wd} input");
    }
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32) {
        let y = x.conv2d(w, pad, stride, 1, 1)?;
        return match bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, o, 1, 1))?),
            None => Ok(y),
        };
    }
    let g = Geometry { b, c, h, w: wd, k, stride, pad, oh: (h + 2 * pad - k) / stride + 1, ow: (wd + 2 * pad - k) / stride + 1 };
    let cols = x.detach().contiguous()?.apply_op1_no_bwd(&Im2Col(g))?;
    // (O, C k k) @ (C k k, B L) = (O, B L), then (B, O, H', W') with the bias added.
    let y = w.detach().reshape((o, g.rows()))?.matmul(&cols)?;
    let y = swap_leading(&y, o, b, g.positions(), bias)?.reshape((b, o, g.oh, g.ow))?;
    let bias_tracked = bias.is_some_and(|t| t.track_op());
    if !(x.track_op() || w.track_op() || bias_tracked) {
        return Ok(y);
    }
    // Attach the analytic backward; the op itself passes y through.
    let bias = match bias {
        Some(t) => t.clone(),
        None => Tensor::zeros(o, DType::F32, x.device())?,
    };
    x.apply_op3(w, &bias, ConvBackward { g, y })
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
