//! Multi-head scaled dot-product attention over spatial positions as one fused op with an analytic
//! backward, in the channel-major layout the UNet's convolutions produce.
//!
//! The input packs the projections of a sample as qkv (N, 3C, L): channels [0, C) are q, [C, 2C) k
//! and [2C, 3C) v, and head h of each owns channels h d .. (h + 1) d (C = heads d, L positions). With
//! Q, K, V the (L, d) matrices of one sample and head (so Q^T is a contiguous (d, L) block of qkv),
//!
//!   S = scale Q K^T            (L, L)
//!   P = softmax_rows(S)
//!   O = P V                    (L, d), written as O^T = V^T P^T into channels h d .. of out (N, C, L)
//!
//! and, with dO the incoming gradient and D_i = sum_j P_ij dP_ij,
//!
//!   dV = P^T dO        dP = dO V^T        dS = P * (dP - D)   (elementwise, D broadcast over rows)
//!   dQ = scale dS K    dK = scale dS^T Q
//!
//! candle composes this from two transposed copies, a batched product, a scale, a five-op softmax and a
//! second product, each with its own buffer and backward. Here, for contiguous f32 tensors on the CPU,
//! each (sample, head) pair is two `gemm` products forward and five backward on strided views of qkv,
//! with the (L, L) probabilities in a per-thread scratch buffer; P is recomputed in the backward rather
//! than kept. Samples run in parallel. CUDA and Metal with the project's kernels enabled run candle's
//! products around the fused softmax of `ops/softmax.rs` (f32, bf16, f16; on CUDA in training as one
//! graph node, `ops/attention_node.rs`); everything else takes [`attention_composed`].

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::matmul::{inner_parallelism, sgemm, with_scratch, View};
use super::softmax::{softmax_row, softmax_row_backward};

thread_local! {
    /// Per-thread scratch for one (sample, head) pair's probabilities P (L, L).
    static PROBS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Per-thread scratch for dP and then dS (L, L).
    static DPROBS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Sizes of one call: `n` samples, `heads` heads of width `d` (C = heads d), `l` positions.
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    heads: usize,
    d: usize,
    l: usize,
}

impl Dims {
    /// Channels of the output, C = heads d.
    fn c(&self) -> usize {
        self.heads * self.d
    }
    /// Values of one head's q (or k, or v, or output) block, d L.
    fn block(&self) -> usize {
        self.d * self.l
    }
}

/// The (d, L) blocks Q^T, K^T, V^T of head `h` in one sample's qkv (3C, L).
fn head_blocks(qkv: &[f32], dims: Dims, h: usize) -> [&[f32]; 3] {
    let (c, bl) = (dims.c() * dims.l, dims.block());
    [0, 1, 2].map(|part| &qkv[part * c + h * bl..][..bl])
}

/// P = softmax_rows(scale Q K^T) = softmax_rows(scale (Q^T)^T K^T) into `p` (L, L).
fn probabilities(qt: &[f32], kt: &[f32], dims: Dims, scale: f32, p: &mut [f32], par: gemm::Parallelism) {
    let (d, l) = (dims.d, dims.l);
    unsafe { sgemm((l, l, d), p, false, scale, View::transposed(qt, l), View::rows(kt, l), par) };
    // p_ij = exp(s_ij - max_j s_ij) / sum_j exp(s_ij - max_j s_ij)
    p.chunks_exact_mut(l).for_each(softmax_row);
}

/// The fused forward `qkv (N, 3C, L) -> out (N, C, L)`; its backward is [`AttentionGrad`].
#[derive(Clone, Copy)]
struct AttentionOp {
    heads: usize,
    scale: f32,
}

impl AttentionOp {
    /// The sizes of a call on a tensor of shape `shape`, checked against the head count.
    fn dims(&self, shape: &Shape) -> Result<Dims> {
        let (n, c3, l) = shape.dims3()?;
        if self.heads == 0 || c3 % (3 * self.heads) != 0 {
            candle_core::bail!("attention: {c3} channels are not 3 x {} heads x a width", self.heads);
        }
        Ok(Dims { n, heads: self.heads, d: c3 / 3 / self.heads, l })
    }
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "ddpm-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(layout.shape())?;
        let qkv = super::f32_slice(s, layout, self.name(), "qkv")?;
        let (c, l) = (dims.c(), dims.l);
        let par = inner_parallelism(dims.n);
        let mut out = vec![0f32; dims.n * c * l];
        out.par_chunks_mut(c * l).zip(qkv.par_chunks(3 * c * l)).for_each(|(ob, sample)| {
            with_scratch(&PROBS, l * l, |p| {
                for (h, ot) in ob.chunks_exact_mut(dims.block()).enumerate() {
                    let [qt, kt, vt] = head_blocks(sample, dims, h);
                    probabilities(qt, kt, dims, self.scale, p, par);
                    // O^T = V^T P^T
                    unsafe { sgemm((dims.d, l, l), ot, false, 1.0, View::rows(vt, l), View::transposed(p, l), par) };
                }
            })
        });
        Ok((CpuStorage::F32(out), Shape::from((dims.n, c, l))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _span = ddpm_core::ops::profile::span(qkv.device(), "attention backward");
        let dqkv = qkv.detach().apply_op2_no_bwd(&grad.detach().contiguous()?, &AttentionGrad(*self))?;
        Ok(Some(dqkv))
    }
}

/// The gradient `(qkv (N, 3C, L), dout (N, C, L)) -> dqkv (N, 3C, L)` of an [`AttentionOp`], per
/// sample and head, in the transposed blocks the layout stores:
///
///   dV^T = dO^T P      dP = (dO^T)^T V^T      dS = P * (dP - D)
///   dQ^T = scale K^T dS^T                      dK^T = scale Q^T dS
struct AttentionGrad(AttentionOp);

impl CustomOp2 for AttentionGrad {
    fn name(&self) -> &'static str {
        "ddpm-attention-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, layout: &Layout, sg: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = self.0.dims(layout.shape())?;
        let (qkv, dout) = (super::f32_slice(s, layout, self.name(), "qkv")?, super::f32_slice(sg, lg, self.name(), "gradient")?);
        let (c, l, d, scale) = (dims.c(), dims.l, dims.d, self.0.scale);
        if dout.len() != dims.n * c * l {
            candle_core::bail!("ddpm-attention-grad: gradient has {} values, expected {}", dout.len(), dims.n * c * l);
        }
        let par = inner_parallelism(dims.n);
        let mut dqkv = vec![0f32; qkv.len()];
        dqkv.par_chunks_mut(3 * c * l).zip(qkv.par_chunks(3 * c * l)).zip(dout.par_chunks(c * l)).for_each(|((dsample, sample), dob)| {
            with_scratch(&PROBS, l * l, |p| {
                with_scratch(&DPROBS, l * l, |ds| {
                    let (dq, rest) = dsample.split_at_mut(c * l);
                    let (dk, dv) = rest.split_at_mut(c * l);
                    let blocks = dq.chunks_exact_mut(dims.block()).zip(dk.chunks_exact_mut(dims.block())).zip(dv.chunks_exact_mut(dims.block()));
                    for (h, ((dqt, dkt), dvt)) in blocks.enumerate() {
                        let [qt, kt, vt] = head_blocks(sample, dims, h);
                        let dot = &dob[h * dims.block()..][..dims.block()];
                        probabilities(qt, kt, dims, scale, p, par);
                        unsafe {
                            // dV^T = dO^T P
                            sgemm((d, l, l), dvt, false, 1.0, View::rows(dot, l), View::rows(p, l), par);
                            // dP = dO V^T = (dO^T)^T V^T
                            sgemm((l, l, d), ds, false, 1.0, View::transposed(dot, l), View::rows(vt, l), par);
                        }
                        // dS_ij = P_ij (dP_ij - D_i), D_i = sum_j P_ij dP_ij
                        for (prow, drow) in p.chunks_exact(l).zip(ds.chunks_exact_mut(l)) {
                            softmax_row_backward(prow, drow);
                        }
                        unsafe {
                            // dQ^T = scale K^T dS^T
                            sgemm((d, l, l), dqt, false, scale, View::rows(kt, l), View::transposed(ds, l), par);
                            // dK^T = scale Q^T dS
                            sgemm((d, l, l), dkt, false, scale, View::rows(qt, l), View::rows(ds, l), par);
                        }
                    }
                })
            })
        });
        Ok((CpuStorage::F32(dqkv), layout.shape().clone()))
    }
}

/// Multi-head attention `qkv (N, 3C, L) -> out (N, C, L)` with `heads` heads (see the module docs):
/// out = softmax(scale Q K^T) V per sample and head. Fused on the CPU for contiguous f32 input,
/// [`attention_products`] with the fused softmax on CUDA or Metal with the project's kernels enabled
/// (f32, bf16, f16), on CUDA as one graph node that recomputes the probabilities in its backward
/// when qkv is differentiated (`ops/attention_node.rs`),
/// [`attention_composed`] elsewhere; differentiable every way.
pub fn attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let _span = ddpm_core::ops::profile::span(qkv.device(), "attention forward");
    let op = AttentionOp { heads, scale: scale as f32 };
    let dims = op.dims(qkv.shape())?;
    let fused = qkv.device().is_cpu() && qkv.dtype() == DType::F32 && qkv.is_contiguous() && dims.d > 0 && dims.l > 0;
    let half_or_f32 = matches!(qkv.dtype(), DType::F32 | DType::BF16 | DType::F16);
    if fused {
        qkv.apply_op1(op)
    } else if super::cuda_kernels_enabled(qkv.device()) && half_or_f32 && qkv.track_op() && dims.d > 0 && dims.l > 0 && super::block_nodes_enabled() {
        // training on CUDA: one graph node that keeps only qkv (`ops/attention_node.rs`)
        super::attention_node::attention_node(qkv, heads, scale)
    } else if (super::cuda_kernels_enabled(qkv.device()) || super::metal_kernels_enabled(qkv.device())) && half_or_f32 {
        // candle's products around the fused softmax (CUDA or Metal kernels), which runs in f32 for f16 and bf16
        // scores as the composed path's does
        attention_products(qkv, heads, scale, |s| super::softmax_last_dim(&s.to_dtype(DType::F32)?)?.to_dtype(s.dtype()))
    } else {
        attention_composed(qkv, heads, scale)
    }
}

/// [`attention`] built from candle's differentiable tensor ops: the fallback for devices, dtypes and
/// layouts the fused kernel does not handle, and the reference it is tested against. The softmax runs
/// in f32 for f16 and bf16 inputs (diffusers' `upcast_softmax`).
///
///   q, k, v = qkv split into three (N heads, L, d)
///   out     = softmax((q k^T) scale) v, back to (N, C, L)
pub fn attention_composed(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let upcast_softmax = |scores: &Tensor| candle_nn::ops::softmax(&scores.to_dtype(DType::F32)?, D::Minus1)?.to_dtype(scores.dtype());
    attention_products(qkv, heads, scale, upcast_softmax)
}

/// [`attention`] as batched products around `softmax` (over the last dimension of the (N heads, L, L)
/// scores): [`attention_composed`] with candle's softmax, CUDA and Metal with [`super::softmax_last_dim`].
pub fn attention_products(qkv: &Tensor, heads: usize, scale: f64, softmax: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let [q, k, v] = split_heads(qkv, heads)?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let probs = softmax(&scores)?;
    // (N heads, L, d) -> (N heads, d, L) -> (N, C, L)
    probs.matmul(&v)?.transpose(1, 2)?.reshape(output_shape(qkv)?)
}

/// q, k and v of `qkv` (N, 3C, L) split into `heads` heads, each a contiguous (N heads, L, d) tensor:
/// channels [i C, (i + 1) C) for i = 0, 1, 2.
pub(super) fn split_heads(qkv: &Tensor, heads: usize) -> Result<[Tensor; 3]> {
    let dims = AttentionOp { heads, scale: 1.0 }.dims(qkv.shape())?;
    let (n, c, d, l) = (dims.n, dims.c(), dims.d, dims.l);
    let part = |i: usize| qkv.narrow(1, i * c, c)?.reshape((n * heads, d, l))?.transpose(1, 2)?.contiguous();
    Ok([part(0)?, part(1)?, part(2)?])
}

/// The shape (N, C, L) of the output of attention on `qkv` (N, 3C, L).
pub(super) fn output_shape(qkv: &Tensor) -> Result<Shape> {
    let (n, c3, l) = qkv.dims3()?;
    Ok(Shape::from((n, c3 / 3, l)))
}
