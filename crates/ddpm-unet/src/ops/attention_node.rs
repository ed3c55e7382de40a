//! Attention as one node of candle's graph, for training on CUDA (the project's kernels on).
//!
//! Built from candle's ops ([`super::attention::attention_products`]), attention is a dozen graph
//! nodes per block: the q, k and v copies, two batched products, the scale, the casts and the
//! softmax. Each keeps its inputs alive until the backward pass (three (L, d) copies and three or
//! four (L, L) score and probability tensors per sample and head, the largest activations of an
//! attention block), and each edge costs a zeroed buffer and an add in the backward. The node keeps
//! only its input qkv and, as the CPU's fused op does (`ops/attention.rs`), recomputes the
//! probabilities in its backward:
//!
//! ```text
//!   S  = scale Q K^T         P = softmax_rows(S)          O = P V
//!   dV = P^T dO              dP = dO V^T                  dS = P (dP - D),  D_i = sum_j P_ij dP_ij
//!   dQ = scale dS K          dK = scale dS^T Q
//! ```
//!
//! per sample and head, with Q, K, V, O the (L, d) matrices: the products in qkv's dtype (bf16 and
//! f16 on tensor cores), the softmax and its backward in f32, the forward's values those of
//! [`super::attention::attention_products`] with the fused softmax, op for op.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

use super::attention::{output_shape, split_heads};
use super::softmax::{softmax_last_dim, softmax_last_dim_backward};

/// The op's name, in its errors too.
const NAME: &str = "ddpm-attention-node";

/// Attention on `qkv` (N, 3C, L) with `heads` heads and score scale `scale` as one graph node (see
/// the module docs): out (N, C, L). Any device and dtype that candle's products and
/// [`softmax_last_dim`] take; [`super::attention::attention`] sends CUDA training here.
pub(crate) fn attention_node(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let qkv = qkv.contiguous()?;
    let [q, k, v] = split_heads(&qkv.detach(), heads)?;
    let p = probabilities(&q, &k, scale)?.to_dtype(qkv.dtype())?;
    // O^T per sample and head: (N heads, d, L), a transposed view; the op's forward lays it out as
    // (N, C, L)
    let out = p.matmul(&v)?.transpose(1, 2)?;
    qkv.apply_op1(AttentionNode { heads, scale, out: Mutex::new(Some(out)) })
}

/// P = softmax_rows(scale Q K^T) in f32 for q, k (N heads, L, d): the scores in q's dtype, then
/// the softmax in f32.
fn probabilities(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?)
}

/// The graph node: the head count and scale for the backward, and (until the op's forward has run)
/// the forward's output.
struct AttentionNode {
    heads: usize,
    scale: f64,
    /// O^T (N heads, d, L), taken by the forward.
    out: Mutex<Option<Tensor>>,
}

impl AttentionNode {
    /// The forward's output and its (N, C, L) shape, taken once; checked against the input's.
    fn take_out(&self, layout: &Layout) -> Result<(Tensor, Shape)> {
        let out = self.out.lock().map_err(|_| candle_core::Error::Msg(format!("{NAME}: poisoned lock")))?.take();
        let Some(out) = out else { candle_core::bail!("{NAME}: the node's forward ran twice") };
        let (n, c3, l) = layout.shape().dims3()?;
        let shape = Shape::from((n, c3 / 3, l));
        if out.elem_count() != shape.elem_count() {
            candle_core::bail!("{NAME}: the output has {} values, {shape:?} needs {}", out.elem_count(), shape.elem_count());
        }
        Ok((out, shape))
    }
}

impl CustomOp1 for AttentionNode {
    fn name(&self) -> &'static str {
        NAME
    }

    /// O^T (N heads, d, L) laid out contiguously, which is (N, C, L).
    fn cpu_fwd(&self, _s: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out, shape) = self.take_out(layout)?;
        let out = out.contiguous()?;
        let (storage, _) = out.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.clone(), shape)),
            _ => candle_core::bail!("{NAME}: the output of a CPU input must be on the CPU"),
        }
    }

    /// The same on CUDA: one strided copy of O^T into a fresh buffer.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _s: &candle_core::CudaStorage, layout: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let (out, shape) = self.take_out(layout)?;
        let (storage, lo) = out.storage_and_layout();
        let Storage::Cuda(src) = &*storage else { candle_core::bail!("{NAME}: the output of a CUDA input must be on CUDA") };
        // SAFETY: copy_strided_src writes every element of the fresh buffer before it is read
        let mut dst = unsafe { src.device().alloc_uninit(&shape, out.dtype())? };
        src.copy_strided_src(&mut dst, 0, lo)?;
        Ok((dst, shape))
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _span = ddpm_core::ops::profile::span(qkv.device(), "attention backward");
        let (n, c3, l) = qkv.dims3()?;
        let (c, dtype) = (c3 / 3, qkv.dtype());
        let [q, k, v] = split_heads(&qkv.detach(), self.heads)?;
        let p = probabilities(&q, &k, self.scale)?;
        let pc = p.to_dtype(dtype)?;
        // dO per sample and head as (N heads, L, d), from the (N, C, L) gradient
        let d_out = grad.detach().reshape((n * self.heads, c / self.heads, l))?.transpose(1, 2)?.contiguous()?;
        let dv = pc.t()?.matmul(&d_out)?;
        let dp = d_out.matmul(&v.t()?)?.to_dtype(DType::F32)?;
        let ds = softmax_last_dim_backward(&p, &dp)?.to_dtype(dtype)?;
        let dq = (ds.matmul(&k)? * self.scale)?;
        let dk = (ds.t()?.matmul(&q)? * self.scale)?;
        // each (N heads, L, d) back to (N, C, L), then [dQ | dK | dV] along the channels
        let shape = output_shape(qkv)?;
        let back = |t: Tensor| t.transpose(1, 2)?.reshape(shape.clone());
        Ok(Some(Tensor::cat(&[back(dq)?, back(dk)?, back(dv)?], 1)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use ddpm_core::NoiseRng;

    use super::*;
    use crate::ops::attention::attention_composed;

    /// max |a - b| / max |b|, both in f32.
    fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let m = |t: Tensor| t.to_dtype(DType::F32).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        m((a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap()) / m(b.clone()).max(1e-30)
    }

    /// The node on the CPU (its backward is device-generic; CUDA adds only the forward's copy)
    /// against candle's composed attention: values and the gradient of sum(out r) in qkv, for one and
    /// two heads, in f32 and in bf16 (the same products in bf16 and softmax in f32 on both sides).
    #[test]
    fn node_matches_the_composed_attention() {
        let dev = Device::Cpu;
        for (dtype, bound) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            for (n, heads, d, l) in [(2, 1, 4, 6), (3, 2, 3, 5)] {
                let mut rng = NoiseRng::new(5);
                let c = heads * d;
                let qkv = Var::from_tensor(&rng.randn((n, 3 * c, l), DType::F32, &dev).unwrap().to_dtype(dtype).unwrap()).unwrap();
                let r = rng.randn((n, c, l), DType::F32, &dev).unwrap().to_dtype(dtype).unwrap();
                let scale = 1.0 / (d as f64).sqrt();
                let ours = attention_node(&qkv, heads, scale).unwrap();
                let want = attention_composed(&qkv, heads, scale).unwrap();
                assert_eq!(ours.dims(), want.dims());
                assert!(rel_diff(&ours, &want) < bound, "{dtype:?} heads {heads}: forward differs by {}", rel_diff(&ours, &want));
                let grad = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap().get(&qkv).unwrap().clone();
                let (g, gw) = (grad(&ours), grad(&want));
                assert_eq!(g.dtype(), dtype);
                assert!(rel_diff(&g, &gw) < bound, "{dtype:?} heads {heads}: gradient differs by {}", rel_diff(&g, &gw));
            }
        }
    }
}
