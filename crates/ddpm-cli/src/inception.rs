//! The Inception-v3 network of the FID literature, up to its 2048-d pool3 features, in candle.
//!
//! This is the network of pytorch-fid's `InceptionV3` with its defaults (`FIDInceptionV3`, the port of
//! the TensorFlow graph `inception-2015-12-05` that the FID paper's code uses): torchvision's
//! Inception-v3 layout with pytorch-fid's changes, run up to the final average pool.
//!
//! Input: images (N, C, H, W) in [0, 1], C = 3 (RGB) or 1 (grayscale, repeated to 3 channels), of
//! any size. They are resized to 299x299 by [`resize_bilinear`] (as pytorch-fid's
//! `F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)`, no antialiasing), then
//! scaled to [-1, 1] by x -> 2x - 1. Output: (N, 2048).
//!
//! Every convolution is a `BasicConv2d`: conv (no bias) + BatchNorm(eps = 0.001, running
//! statistics) + ReLU; the batch norm is folded into the convolution at load time (see
//! [`Inception::load`]). Shapes for a 299x299 input (channels x height x width):
//!
//! | layer | op | output |
//! | --- | --- | --- |
//! | `Conv2d_1a_3x3` | 3x3 stride 2 | 32 x 149 x 149 |
//! | `Conv2d_2a_3x3` | 3x3 | 32 x 147 x 147 |
//! | `Conv2d_2b_3x3` | 3x3 pad 1 | 64 x 147 x 147 |
//! | max pool | 3x3 stride 2 | 64 x 73 x 73 |
//! | `Conv2d_3b_1x1` | 1x1 | 80 x 73 x 73 |
//! | `Conv2d_4a_3x3` | 3x3 | 192 x 71 x 71 |
//! | max pool | 3x3 stride 2 | 192 x 35 x 35 |
//! | `Mixed_5b`, `5c`, `5d` | A (pool features 32, 64, 64) | 256, 288, 288 x 35 x 35 |
//! | `Mixed_6a` | B | 768 x 17 x 17 |
//! | `Mixed_6b` .. `6e` | C (7x7 channels 128, 160, 160, 192) | 768 x 17 x 17 |
//! | `Mixed_7a` | D | 1280 x 8 x 8 |
//! | `Mixed_7b` | E, average pool branch | 2048 x 8 x 8 |
//! | `Mixed_7c` | E, max pool branch | 2048 x 8 x 8 |
//! | average pool | over 8 x 8 | 2048 |
//!
//! The blocks: branches separated by `|`, concatenated along channels in this order; each layer as
//! name, kernel, output channels; `/2` = stride 2, no padding unless given:
//! - A(in, p): `branch1x1` 1x1 64 | `branch5x5_1` 1x1 48, `branch5x5_2` 5x5 pad 2 64 |
//!   `branch3x3dbl_1` 1x1 64, `_2` 3x3 pad 1 96, `_3` 3x3 pad 1 96 | 3x3 average pool (stride 1,
//!   pad 1, padding not counted), `branch_pool` 1x1 p.
//! - B(in): `branch3x3` 3x3/2 384 | `branch3x3dbl_1` 1x1 64, `_2` 3x3 pad 1 96, `_3` 3x3/2 96 | 3x3/2
//!   max pool.
//! - C(in, c7): `branch1x1` 1x1 192 | `branch7x7_1` 1x1 c7, `_2` 1x7 c7, `_3` 7x1 192 |
//!   `branch7x7dbl_1` 1x1 c7, `_2` 7x1 c7, `_3` 1x7 c7, `_4` 7x1 c7, `_5` 1x7 192 | average pool as
//!   in A, `branch_pool` 1x1 192 (1x7 pads 3 columns, 7x1 pads 3 rows).
//! - D(in): `branch3x3_1` 1x1 192, `branch3x3_2` 3x3/2 320 | `branch7x7x3_1` 1x1 192, `_2` 1x7 192,
//!   `_3` 7x1 192, `_4` 3x3/2 192 | 3x3/2 max pool.
//! - E(in): `branch1x1` 1x1 320 | `branch3x3_1` 1x1 384, then both of (`branch3x3_2a` 1x3 384,
//!   `branch3x3_2b` 3x1 384) | `branch3x3dbl_1` 1x1 448, `_2` 3x3 pad 1 384, then both of (`_3a` 1x3
//!   384, `_3b` 3x1 384) | pool, `branch_pool` 1x1 192 (1x3 pads 1 column, 3x1 pads 1 row). The pool is pytorch-fid's patch of the TF graph:
//!   `Mixed_7b` averages without counting padding, `Mixed_7c` takes the 3x3 maximum (stride 1, pad 1).
//!
//! Weights: a safetensors file with the names of pytorch-fid's `fid_inception_v3()` state dict
//! (`Conv2d_1a_3x3.conv.weight` (32, 3, 3, 3), `Conv2d_1a_3x3.bn.weight` / `.bn.bias` /
//! `.bn.running_mean` / `.bn.running_var` (32), `Mixed_5b.branch1x1.conv.weight` (64, 192, 1, 1), ...);
//! other tensors (`fc.*`, `*.num_batches_tracked`) are ignored; f32, f16, bf16 or f64.
//! `scripts/inception_weights_to_safetensors.py` writes that file from pytorch-fid's published
//! weights (`pt_inception-2015-12-05-6726825d.pth`, 95 MB), which pytorch-fid downloads itself on a
//! machine with network access, or from a copy already downloaded (`--pth`):
//!
//! ```text
//! python scripts/inception_weights_to_safetensors.py pt_inception-2015-12-05.safetensors
//! python scripts/inception_weights_to_safetensors.py out.safetensors --pth pt_inception-2015-12-05-6726825d.pth
//! ```
//!
//! The test (`crates/ddpm-cli/tests/inception.rs`) compares the features with pytorch-fid's own
//! network run by PyTorch on closed-form weights (`scripts/make_inception_fixture.py`).
//!
//! Speed: 0.21 CPU-seconds per image on this project's 2-core AVX-512 machine (release build,
//! batches of 16; PyTorch 2.15 with pytorch-fid on the same 2 threads: 0.45). Square convolutions
//! run through ddpm-unet's CPU kernels, the 1xk and kx1 ones as one matrix product per image over k
//! shifted copies of the input (`line_conv`), and the 1x1 convolutions that open a block's branches
//! as one (`Fused`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use ddpm_unet::ops::conv::conv2d as square_conv2d;

/// The side of the square images the network reads: inputs are resized to 299x299.
pub const INPUT_SIZE: usize = 299;

/// The width of the pool3 features.
pub const FEATURES: usize = 2048;

/// BatchNorm's epsilon in every `BasicConv2d` (TensorFlow's 0.001, as torchvision sets it).
const BN_EPS: f64 = 1e-3;

/// Bilinear resize of (N, C, H, W) to (N, C, out_h, out_w) as PyTorch's
/// `F.interpolate(x, size=(out_h, out_w), mode='bilinear', align_corners=False)` without
/// antialiasing: each output pixel interpolates the 2x2 input pixels around its source point, also
/// when shrinking. Along each axis (width first, then height, as PyTorch's CPU kernel nests them):
/// `out[i] = l0 x[i0] + l1 x[i1]`, with the taps of [`linear_taps`].
pub fn resize_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4().context("resize_bilinear: expected (N, C, H, W)")?;
    if h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        bail!("resize_bilinear: cannot resize {h}x{w} to {out_h}x{out_w}");
    }
    let x = resize_axis(x, 3, w, out_w)?;
    resize_axis(&x, 2, h, out_h)
}

/// Linear interpolation of `x` along `dim` from `n_in` to `n_out` samples.
fn resize_axis(x: &Tensor, dim: usize, n_in: usize, n_out: usize) -> Result<Tensor> {
    if n_in == n_out {
        // PyTorch takes the input as it is (i0 = i1 = i, l0 = 1)
        return Ok(x.clone());
    }
    let taps = linear_taps(n_in, n_out);
    let dev = x.device();
    let mut shape = vec![1usize; 4];
    shape[dim] = n_out;
    let i0 = Tensor::from_iter(taps.iter().map(|t| t.0), dev)?;
    let i1 = Tensor::from_iter(taps.iter().map(|t| t.1), dev)?;
    let l0 = Tensor::from_iter(taps.iter().map(|t| t.2), dev)?.reshape(shape.as_slice())?.to_dtype(x.dtype())?;
    let l1 = Tensor::from_iter(taps.iter().map(|t| t.3), dev)?.reshape(shape.as_slice())?.to_dtype(x.dtype())?;
    // out[i] = l0[i] x[i0[i]] + l1[i] x[i1[i]]
    let a = x.index_select(&i0, dim)?.broadcast_mul(&l0)?;
    let b = x.index_select(&i1, dim)?.broadcast_mul(&l1)?;
    Ok((a + b)?)
}

/// The taps (i0, i1, l0, l1) of each of `n_out` output samples resized from `n_in` (n_in != n_out),
/// computed in f32 as PyTorch does for `align_corners=False`:
/// scale = n_in / n_out; src = max(scale (i + 0.5) - 0.5, 0); i0 = min(floor(src), n_in - 1);
/// i1 = i0 + 1 (i0 at the last sample: i0); l1 = clamp(src - i0, 0, 1); l0 = 1 - l1.
pub fn linear_taps(n_in: usize, n_out: usize) -> Vec<(u32, u32, f32, f32)> {
    let scale = n_in as f32 / n_out as f32;
    (0..n_out)
        .map(|i| {
            // src = scale (i + 0.5) - 0.5, clamped at 0
            let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(n_in - 1);
            let i1 = if i0 < n_in - 1 { i0 + 1 } else { i0 };
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            (i0 as u32, i1 as u32, 1.0 - l1, l1)
        })
        .collect()
}

/// One `BasicConv2d` with its batch norm folded in: y = relu(conv(x, w') + b').
#[derive(Debug, Clone)]
struct Conv {
    /// (O, C, kh, kw), the convolution weight times the batch norm's scale.
    w: Tensor,
    /// (O), the batch norm's shift.
    b: Tensor,
    stride: usize,
    /// Zero padding (rows, columns) on each side. A 1xk or kx1 kernel is always stride 1 with
    /// (k - 1) / 2 along the kernel, the only such convolutions Inception-v3 has (`line_conv`).
    pad: (usize, usize),
}

impl Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, kh, kw) = self.w.dims4()?;
        let y = if kh == kw && self.pad.0 == self.pad.1 {
            square_conv2d(x, &self.w, Some(&self.b), self.stride, self.pad.0)?
        } else {
            line_conv(x, &self.w, &self.b)?
        };
        Ok(y.relu()?)
    }
}

/// A stride-1 1xk or kx1 convolution that keeps the size (padding (k - 1) / 2 along the kernel) plus
/// a bias: the k shifted copies of the padded input stacked as columns, then one product per image,
/// `cols[n, (c, j), p] = x_pad[n, c, p shifted by j]`, `y[n] = w.reshape(O, C k) @ cols[n] + b`.
fn line_conv(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (o, _, kh, kw) = w.dims4()?;
    // the axis the kernel runs along, its length and the kernel's
    let (axis, len, k) = if kh == 1 { (3, wd, kw) } else { (2, h, kh) };
    let p = (k - 1) / 2;
    let xp = x.pad_with_zeros(axis, p, p)?;
    let shifted = (0..k).map(|j| xp.narrow(axis, j, len)).collect::<candle_core::Result<Vec<_>>>()?;
    // (N, C, k, H, W) -> (N, C k, H W), rows ordered as the weight's (c, j)
    let cols = Tensor::stack(&shifted, 2)?.reshape((n, c * k, h * wd))?;
    let y = w.reshape((o, c * k))?.broadcast_left(n)?.matmul(&cols)?;
    Ok(y.broadcast_add(&b.reshape((1, o, 1))?)?.reshape((n, o, h, wd))?)
}

/// Several convolutions of one input run as one: their weights stacked along the outputs, the
/// result split back into each one's channels. Used for the parallel 1x1 convolutions that open the
/// branches of a block, so that the block reads its input once.
#[derive(Debug, Clone)]
struct Fused {
    conv: Conv,
    widths: Vec<usize>,
}

impl Fused {
    fn new(convs: &[Conv]) -> Result<Self> {
        let ws: Vec<&Tensor> = convs.iter().map(|c| &c.w).collect();
        let bs: Vec<&Tensor> = convs.iter().map(|c| &c.b).collect();
        let widths = ws.iter().map(|w| w.dim(0)).collect::<candle_core::Result<Vec<_>>>()?;
        let conv = Conv { w: Tensor::cat(&ws, 0)?, b: Tensor::cat(&bs, 0)?, stride: convs[0].stride, pad: convs[0].pad };
        Ok(Self { conv, widths })
    }

    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let y = self.conv.forward(x)?;
        let mut start = 0;
        let mut out = Vec::with_capacity(self.widths.len());
        for &n in &self.widths {
            out.push(y.narrow(1, start, n)?);
            start += n;
        }
        Ok(out)
    }
}

/// The pooling that feeds a block's `branch_pool`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pool {
    /// 3x3, stride 1, padding 1, averaging over the window's pixels inside the image only
    /// (`count_include_pad=False`, TensorFlow's SAME average pool).
    Average,
    /// 3x3, stride 1, padding 1 maximum.
    Max,
}

/// An Inception block, by type (see the module docs for the branches).
#[derive(Debug, Clone)]
enum Mixed {
    A { heads: Fused, b5x5: Conv, b3x3dbl: [Conv; 2], pool: Conv },
    B { b3x3: Conv, b3x3dbl: [Conv; 3] },
    C { heads: Fused, b7x7: [Conv; 2], b7x7dbl: [Conv; 4], pool: Conv },
    D { heads: Fused, b3x3: Conv, b7x7x3: [Conv; 3] },
    E { heads: Fused, b3x3: [Conv; 2], b3x3dbl: [Conv; 3], pool: Conv, pool_kind: Pool },
}

impl Mixed {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let parts = match self {
            Mixed::A { heads, b5x5, b3x3dbl, pool } => {
                let h = heads.forward(x)?;
                let b5 = b5x5.forward(&h[1])?;
                let b3 = b3x3dbl[1].forward(&b3x3dbl[0].forward(&h[2])?)?;
                let bp = pool.forward(&pool3x3(x, Pool::Average)?)?;
                vec![h[0].clone(), b5, b3, bp]
            }
            Mixed::B { b3x3, b3x3dbl } => {
                let b3 = b3x3.forward(x)?;
                let mut d = x.clone();
                for c in b3x3dbl {
                    d = c.forward(&d)?;
                }
                let bp = x.max_pool2d_with_stride(3, 2)?;
                vec![b3, d, bp]
            }
            Mixed::C { heads, b7x7, b7x7dbl, pool } => {
                let h = heads.forward(x)?;
                let mut b7 = h[1].clone();
                for c in b7x7 {
                    b7 = c.forward(&b7)?;
                }
                let mut d = h[2].clone();
                for c in b7x7dbl {
                    d = c.forward(&d)?;
                }
                let bp = pool.forward(&pool3x3(x, Pool::Average)?)?;
                vec![h[0].clone(), b7, d, bp]
            }
            Mixed::D { heads, b3x3, b7x7x3 } => {
                let h = heads.forward(x)?;
                let b3 = b3x3.forward(&h[0])?;
                let mut b7 = h[1].clone();
                for c in b7x7x3 {
                    b7 = c.forward(&b7)?;
                }
                let bp = x.max_pool2d_with_stride(3, 2)?;
                vec![b3, b7, bp]
            }
            Mixed::E { heads, b3x3, b3x3dbl, pool, pool_kind } => {
                let h = heads.forward(x)?;
                let b3 = Tensor::cat(&[b3x3[0].forward(&h[1])?, b3x3[1].forward(&h[1])?], 1)?;
                let d = b3x3dbl[0].forward(&h[2])?;
                let bd = Tensor::cat(&[b3x3dbl[1].forward(&d)?, b3x3dbl[2].forward(&d)?], 1)?;
                let bp = pool.forward(&pool3x3(x, *pool_kind)?)?;
                vec![h[0].clone(), b3, bd, bp]
            }
        };
        Ok(Tensor::cat(&parts, 1)?)
    }
}

/// 3x3 pooling with stride 1 and padding 1 of (N, C, H, W), as the blocks' `branch_pool` reads it.
fn pool3x3(x: &Tensor, kind: Pool) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    match kind {
        Pool::Max => {
            // the window around a border pixel holds that pixel, so repeating the border is the
            // same as padding with -inf
            let p = x.pad_with_same(2, 1, 1)?.pad_with_same(3, 1, 1)?;
            Ok(p.max_pool2d_with_stride(3, 1)?)
        }
        Pool::Average => {
            // mean over the window's in-image pixels = (sum over the zero-padded window) / count,
            // count(i, j) = rows(i) cols(j), rows(i) = #{i-1, i, i+1} within [0, H)
            let p = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
            let mean9 = p.avg_pool2d_with_stride(3, 1)?; // sum / 9
            let inside = |i: usize, n: usize| ((i + 1).min(n - 1) + 1 - i.saturating_sub(1)) as f32;
            let factor: Vec<f32> = (0..h)
                .flat_map(|i| (0..w).map(move |j| 9.0 / (inside(i, h) * inside(j, w))))
                .collect();
            let factor = Tensor::from_vec(factor, (1, 1, h, w), x.device())?.to_dtype(x.dtype())?;
            Ok(mean9.broadcast_mul(&factor)?)
        }
    }
}

/// Tensors by name from one file, with errors that name the file and the tensor.
struct Weights<'a> {
    tensors: &'a HashMap<String, Tensor>,
    source: &'a str,
    device: &'a Device,
}

impl Weights<'_> {
    /// The tensor `name`, checked to have `shape`, as f64 on the CPU.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = match self.tensors.get(name) {
            Some(t) => t,
            None => bail!("{}: missing tensor `{name}`", self.source),
        };
        if t.dims() != shape {
            bail!("{}: tensor `{name}` has shape {:?}, expected {shape:?}", self.source, t.dims());
        }
        if !t.dtype().is_float() {
            bail!("{}: tensor `{name}` is {:?}, expected a float type", self.source, t.dtype());
        }
        Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?)
    }

    /// `BasicConv2d` `name` (C -> O channels, kernel kh x kw) with its batch norm folded in:
    /// s = gamma / sqrt(running_var + eps); w' = w s (per output channel); b' = beta - running_mean s.
    fn conv(&self, name: &str, c: usize, o: usize, k: (usize, usize), stride: usize, pad: (usize, usize)) -> Result<Conv> {
        let w = self.get(&format!("{name}.conv.weight"), &[o, c, k.0, k.1])?;
        let gamma = self.get(&format!("{name}.bn.weight"), &[o])?;
        let beta = self.get(&format!("{name}.bn.bias"), &[o])?;
        let mean = self.get(&format!("{name}.bn.running_mean"), &[o])?;
        let var = self.get(&format!("{name}.bn.running_var"), &[o])?;
        // s = gamma / sqrt(var + eps)
        let s = (gamma / (var + BN_EPS)?.sqrt()?)?;
        // w' = w s
        let w = w.broadcast_mul(&s.reshape((o, 1, 1, 1))?)?;
        // b' = beta - mean s
        let b = (beta - (mean * &s)?)?;
        let cast = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(self.device)?) };
        Ok(Conv { w: cast(w)?, b: cast(b)?, stride, pad })
    }

    /// A 1x1 `BasicConv2d`.
    fn conv1(&self, name: &str, c: usize, o: usize) -> Result<Conv> {
        self.conv(name, c, o, (1, 1), 1, (0, 0))
    }

    /// A square `BasicConv2d` with the same padding on every side.
    fn convk(&self, name: &str, c: usize, o: usize, k: usize, stride: usize, pad: usize) -> Result<Conv> {
        self.conv(name, c, o, (k, k), stride, (pad, pad))
    }

    /// A 1xk (`wide`) or kx1 `BasicConv2d` that keeps the size: padding (k - 1) / 2 along the kernel.
    fn conv_line(&self, name: &str, c: usize, o: usize, k: usize, wide: bool) -> Result<Conv> {
        let p = (k - 1) / 2;
        if wide {
            self.conv(name, c, o, (1, k), 1, (0, p))
        } else {
            self.conv(name, c, o, (k, 1), 1, (p, 0))
        }
    }

    fn block_a(&self, n: &str, c: usize, pool_features: usize) -> Result<Mixed> {
        let heads = Fused::new(&[
            self.conv1(&format!("{n}.branch1x1"), c, 64)?,
            self.conv1(&format!("{n}.branch5x5_1"), c, 48)?,
            self.conv1(&format!("{n}.branch3x3dbl_1"), c, 64)?,
        ])?;
        Ok(Mixed::A {
            heads,
            b5x5: self.convk(&format!("{n}.branch5x5_2"), 48, 64, 5, 1, 2)?,
            b3x3dbl: [
                self.convk(&format!("{n}.branch3x3dbl_2"), 64, 96, 3, 1, 1)?,
                self.convk(&format!("{n}.branch3x3dbl_3"), 96, 96, 3, 1, 1)?,
            ],
            pool: self.conv1(&format!("{n}.branch_pool"), c, pool_features)?,
        })
    }

    fn block_b(&self, n: &str, c: usize) -> Result<Mixed> {
        Ok(Mixed::B {
            b3x3: self.convk(&format!("{n}.branch3x3"), c, 384, 3, 2, 0)?,
            b3x3dbl: [
                self.conv1(&format!("{n}.branch3x3dbl_1"), c, 64)?,
                self.convk(&format!("{n}.branch3x3dbl_2"), 64, 96, 3, 1, 1)?,
                self.convk(&format!("{n}.branch3x3dbl_3"), 96, 96, 3, 2, 0)?,
            ],
        })
    }

    fn block_c(&self, n: &str, c: usize, c7: usize) -> Result<Mixed> {
        let heads = Fused::new(&[
            self.conv1(&format!("{n}.branch1x1"), c, 192)?,
            self.conv1(&format!("{n}.branch7x7_1"), c, c7)?,
            self.conv1(&format!("{n}.branch7x7dbl_1"), c, c7)?,
        ])?;
        Ok(Mixed::C {
            heads,
            b7x7: [
                self.conv_line(&format!("{n}.branch7x7_2"), c7, c7, 7, true)?,
                self.conv_line(&format!("{n}.branch7x7_3"), c7, 192, 7, false)?,
            ],
            b7x7dbl: [
                self.conv_line(&format!("{n}.branch7x7dbl_2"), c7, c7, 7, false)?,
                self.conv_line(&format!("{n}.branch7x7dbl_3"), c7, c7, 7, true)?,
                self.conv_line(&format!("{n}.branch7x7dbl_4"), c7, c7, 7, false)?,
                self.conv_line(&format!("{n}.branch7x7dbl_5"), c7, 192, 7, true)?,
            ],
            pool: self.conv1(&format!("{n}.branch_pool"), c, 192)?,
        })
    }

    fn block_d(&self, n: &str, c: usize) -> Result<Mixed> {
        let heads = Fused::new(&[
            self.conv1(&format!("{n}.branch3x3_1"), c, 192)?,
            self.conv1(&format!("{n}.branch7x7x3_1"), c, 192)?,
        ])?;
        Ok(Mixed::D {
            heads,
            b3x3: self.convk(&format!("{n}.branch3x3_2"), 192, 320, 3, 2, 0)?,
            b7x7x3: [
                self.conv_line(&format!("{n}.branch7x7x3_2"), 192, 192, 7, true)?,
                self.conv_line(&format!("{n}.branch7x7x3_3"), 192, 192, 7, false)?,
                self.convk(&format!("{n}.branch7x7x3_4"), 192, 192, 3, 2, 0)?,
            ],
        })
    }

    fn block_e(&self, n: &str, c: usize, pool_kind: Pool) -> Result<Mixed> {
        let heads = Fused::new(&[
            self.conv1(&format!("{n}.branch1x1"), c, 320)?,
            self.conv1(&format!("{n}.branch3x3_1"), c, 384)?,
            self.conv1(&format!("{n}.branch3x3dbl_1"), c, 448)?,
        ])?;
        Ok(Mixed::E {
            heads,
            b3x3: [
                self.conv_line(&format!("{n}.branch3x3_2a"), 384, 384, 3, true)?,
                self.conv_line(&format!("{n}.branch3x3_2b"), 384, 384, 3, false)?,
            ],
            b3x3dbl: [
                self.convk(&format!("{n}.branch3x3dbl_2"), 448, 384, 3, 1, 1)?,
                self.conv_line(&format!("{n}.branch3x3dbl_3a"), 384, 384, 3, true)?,
                self.conv_line(&format!("{n}.branch3x3dbl_3b"), 384, 384, 3, false)?,
            ],
            pool: self.conv1(&format!("{n}.branch_pool"), c, 192)?,
            pool_kind,
        })
    }
}

/// pytorch-fid's FID Inception-v3 up to the pool3 features, batch norms folded into the
/// convolutions, in f32 on one device.
#[derive(Debug, Clone)]
pub struct Inception {
    /// `Conv2d_1a_3x3`, `2a`, `2b` (then a max pool), `3b`, `4a` (then a max pool).
    stem: [Conv; 5],
    /// `Mixed_5b` .. `Mixed_7c`.
    mixed: Vec<Mixed>,
    device: Device,
}

impl Inception {
    /// Reads the weights from a safetensors file with pytorch-fid's state-dict names (see the module
    /// docs) and folds each batch norm into its convolution, in f64, before casting to f32 on
    /// `device`. A missing or misshaped tensor is a one-line error naming the file and the tensor.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let source = path.display().to_string();
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{source}: cannot read safetensors: {}", e.to_string().lines().next().unwrap_or_default()))?;
        Self::from_tensors(&tensors, &source, device)
    }

    /// As [`Inception::load`], from tensors already read; `source` names them in errors.
    pub fn from_tensors(tensors: &HashMap<String, Tensor>, source: &str, device: &Device) -> Result<Self> {
        let wt = Weights { tensors, source, device };
        let stem = [
            wt.convk("Conv2d_1a_3x3", 3, 32, 3, 2, 0)?,
            wt.convk("Conv2d_2a_3x3", 32, 32, 3, 1, 0)?,
            wt.convk("Conv2d_2b_3x3", 32, 64, 3, 1, 1)?,
            wt.conv1("Conv2d_3b_1x1", 64, 80)?,
            wt.convk("Conv2d_4a_3x3", 80, 192, 3, 1, 0)?,
        ];
        let mixed = vec![
            wt.block_a("Mixed_5b", 192, 32)?,
            wt.block_a("Mixed_5c", 256, 64)?,
            wt.block_a("Mixed_5d", 288, 64)?,
            wt.block_b("Mixed_6a", 288)?,
            wt.block_c("Mixed_6b", 768, 128)?,
            wt.block_c("Mixed_6c", 768, 160)?,
            wt.block_c("Mixed_6d", 768, 160)?,
            wt.block_c("Mixed_6e", 768, 192)?,
            wt.block_d("Mixed_7a", 768)?,
            wt.block_e("Mixed_7b", 1280, Pool::Average)?,
            wt.block_e("Mixed_7c", 2048, Pool::Max)?,
        ];
        Ok(Self { stem, mixed, device: device.clone() })
    }

    /// The device the network runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The pool3 features (N, 2048) of images (N, C, H, W) in [0, 1] with C = 3 (RGB) or C = 1
    /// (grayscale, repeated to 3 channels), any size and float dtype: resized to 299x299 by
    /// [`resize_bilinear`], scaled to [-1, 1], then run through the network in f32. The whole batch
    /// runs at once, about 26 MB of memory per image on the CPU (peak resident 0.65 GB at 16 images,
    /// 1.06 GB at 32, weights included): callers feed batches of tens.
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = match images.dims() {
            &[n, c, h, w] => (n, c, h, w),
            d => bail!("inception: expected images (N, C, H, W), got shape {d:?}"),
        };
        if c != 1 && c != 3 {
            bail!("inception: expected 1 or 3 channels, got {c} (shape [{n}, {c}, {h}, {w}])");
        }
        if n == 0 || h == 0 || w == 0 {
            bail!("inception: empty batch (shape [{n}, {c}, {h}, {w}])");
        }
        let x = images.to_device(&self.device)?.to_dtype(DType::F32)?;
        let x = resize_bilinear(&x, INPUT_SIZE, INPUT_SIZE)?;
        // grayscale: the same plane in R, G and B (resizing is per channel, so repeating after it
        // gives the same numbers)
        let x = if c == 1 { x.repeat((1, 3, 1, 1))? } else { x };
        // [0, 1] -> [-1, 1]: 2x - 1
        let x = x.affine(2.0, -1.0)?;
        let x = self.stem[0].forward(&x)?;
        let x = self.stem[1].forward(&x)?;
        let x = self.stem[2].forward(&x)?;
        let x = x.max_pool2d_with_stride(3, 2)?;
        let x = self.stem[3].forward(&x)?;
        let x = self.stem[4].forward(&x)?;
        let mut x = x.max_pool2d_with_stride(3, 2)?;
        for m in &self.mixed {
            x = m.forward(&x)?;
        }
        // adaptive average pool to 1x1: the mean over the 8x8 positions
        Ok(x.flatten_from(2)?.mean(D::Minus1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_by_hand() {
        // 2 -> 4: scale 0.5, src = 0.5 (i + 0.5) - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25
        let t = linear_taps(2, 4);
        assert_eq!(t, vec![(0, 1, 1.0, 0.0), (0, 1, 0.75, 0.25), (0, 1, 0.25, 0.75), (1, 1, 0.75, 0.25)]);
        // 4 -> 2: scale 2, src = 0.5, 2.5: the average of pixels 0, 1 and of 2, 3 (no antialias)
        assert_eq!(linear_taps(4, 2), vec![(0, 1, 0.5, 0.5), (2, 3, 0.5, 0.5)]);
    }

    #[test]
    fn average_pool_does_not_count_padding() -> Result<()> {
        // 2x3 image of ones plus a ramp: every window mean over in-image pixels only
        let x = Tensor::new(&[[[[1f32, 2., 3.], [4., 5., 6.]]]], &Device::Cpu)?;
        let y = pool3x3(&x, Pool::Average)?.flatten_all()?.to_vec1::<f32>()?;
        // (0,0): mean of 1,2,4,5 = 3; (0,1): mean of 1..6 = 3.5; (0,2): mean of 2,3,5,6 = 4
        let want = [3.0, 3.5, 4.0, 3.0, 3.5, 4.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
        }
        let m = pool3x3(&(x.neg()?), Pool::Max)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(m, vec![-1.0, -1.0, -2.0, -1.0, -1.0, -2.0]);
        Ok(())
    }
}
