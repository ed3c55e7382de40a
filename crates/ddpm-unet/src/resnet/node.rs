//! A residual block's training forward as one node of candle's graph, with the block's backward
//! written out.
//!
//! Built from the fused ops one by one, a block is about ten nodes of candle's graph, and candle's
//! backward pass gives every input of every node a zeroed buffer of the input's size and adds the
//! node's gradient into it (its gradient store): two passes over memory per activation inside the
//! block that compute nothing. Here the block's forward runs on detached tensors (no graph) and one
//! custom op stands for the whole block, with inputs x, the block's parameters as one flat vector
//! and the projected time embedding t (N, C_out), whose backward is, with the forward's
//! intermediates of [`ResnetBlock2D::parts`] kept by the node:
//!
//! ```text
//!   dy              = grad / output_scale_factor
//!   dh2, dW2, db2   = conv2's gradients at h2 for dy
//!   dh2             = dropout(dh2), with the forward's mask
//!   dh, dg2, dbeta2 = SiLU(norm2)'s gradients at h for dh2
//!   dh1, dW1, dt    = conv1's gradients at h1 for dh, with dt (N, C_out) its per-image bias' gradient
//!   db1             = sum_n dt
//!   dx1, dg1, dbeta1 = SiLU(norm1)'s gradients at x for dh1
//!   dx              = dx1 + dy, or dx1 + conv_shortcut's input gradient at x for dy (and dWs, dbs)
//! ```
//!
//! each line one op outside the graph ([`conv2d_backward`], [`GroupNorm::backward_silu`]). The values
//! and gradients are those of the node-by-node graph, computed by the same kernels.
//!
//! On the CPU the node takes f32 tensors and keeps h1, h and h2 for the backward. On CUDA (the
//! project's kernels on, cuDNN running the block's convolutions) it takes f32, bf16 or f16
//! activations with f32 or same-dtype parameters, and keeps h alone: the backward recomputes
//! h1 = SiLU(norm1(x)) and h2 = dropout(SiLU(norm2(h))) (the same values: the norms are
//! deterministic and the dropout mask comes from its seed), two activations fewer per block held
//! from the forward to the backward, for two group norms' passes over memory. Under mixed precision
//! the parameters' gradients are computed in the activations' dtype where candle's graph computes
//! them (dW; dbias and the norms' in f32) and returned in the parameters' dtype.
//! `DDPM_BLOCK_NODE=0` in the environment turns the node off (the block then runs node by node), to
//! measure what it saves ([`crate::ops::block_nodes_enabled`]).
//!
//! [`GroupNorm::backward_silu`]: crate::nn::GroupNorm

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use crate::ops::conv::{conv2d_backward, conv2d_backward_per_image_bias, cudnn_convolves, Conv2d};
use crate::ops::f32_slice;
use rayon::prelude::*;

use super::ResnetBlock2D;

/// Whether [`forward`] takes the block at `x`: something to differentiate (x or a parameter tracked
/// by candle's graph), every convolution with a bias, `DDPM_BLOCK_NODE=0` not set, and either
/// everything in f32 on the CPU or [`on_cuda`].
pub(super) fn applies(block: &ResnetBlock2D, x: &Tensor) -> bool {
    let Some(params) = block.params() else { return false };
    let tracked = x.track_op() || params.iter().any(|p| p.track_op());
    let on_cpu = x.device().is_cpu() && x.dtype() == DType::F32 && params.iter().all(|p| p.device().is_cpu() && p.dtype() == DType::F32);
    tracked && crate::ops::block_nodes_enabled() && (on_cpu || on_cuda(block, x, &params))
}

/// Whether the node runs the block at `x` on CUDA: x (B, C, H, W) in f32, bf16 or f16 on a CUDA
/// device, the parameters there in f32 or x's dtype, and cuDNN running each of the block's
/// convolutions (their backward passes are cuDNN's, [`conv2d_backward`]).
fn on_cuda(block: &ResnetBlock2D, x: &Tensor, params: &[&Tensor]) -> bool {
    let (dev, dtype) = (x.device(), x.dtype());
    let Ok((b, c, h, w)) = x.dims4() else { return false };
    let Ok(o) = block.conv1.weight.dim(0) else { return false };
    dev.is_cuda()
        && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        && params.iter().all(|p| p.device().same_device(dev) && (p.dtype() == DType::F32 || p.dtype() == dtype))
        && cudnn_convolves(dev, dtype, (b, c, h, w), &block.conv1)
        && cudnn_convolves(dev, dtype, (b, o, h, w), &block.conv2)
        && block.conv_shortcut.as_ref().is_none_or(|s| cudnn_convolves(dev, dtype, (b, c, h, w), s))
}

/// The block at `x` with projected time embedding `t` (N, C_out) and dropout mask seed `seed`, as one
/// node of candle's graph (see the module docs): on the CPU the node keeps conv1's and conv2's
/// inputs, elsewhere the backward recomputes them.
pub(super) fn forward(block: &ResnetBlock2D, x: &Tensor, t: &Tensor, seed: Option<u64>) -> Result<Tensor> {
    node(block, x, t, seed, x.device().is_cpu())
}

/// [`forward`], keeping h1 and h2 for the backward (`keep`) or recomputing them there.
fn node(block: &ResnetBlock2D, x: &Tensor, t: &Tensor, seed: Option<u64>, keep: bool) -> Result<Tensor> {
    let Some(params) = block.params() else {
        candle_core::bail!("resnet block: a convolution without bias cannot run as one graph node")
    };
    let flat = Tensor::cat(&params.iter().map(|p| p.flatten_all()).collect::<Result<Vec<_>>>()?, 0)?;
    let x = x.contiguous()?;
    let detached = block.detached();
    let parts = detached.parts(&x.detach(), &t.detach(), seed)?;
    let shortcut = detached.conv_shortcut.is_some().then(|| parts.skip.clone());
    let node = Node {
        block: detached,
        h1: keep.then_some(parts.h1),
        h: parts.h,
        h2: keep.then_some(parts.h2),
        seed,
        sum: Mutex::new(Some((shortcut, parts.out))),
    };
    x.apply_op3(&flat, &t.contiguous()?, node)
}

/// The node's op name, in its errors too.
const NAME: &str = "ddpm-resnet-block";

/// The graph node of one block application: the block on detached parameters, the forward's
/// intermediates its backward reads, and (until the op's forward has run) the two terms of the
/// block's output.
struct Node {
    block: ResnetBlock2D,
    /// SiLU(norm1(x)), if kept (else recomputed from x).
    h1: Option<Tensor>,
    /// conv1's output.
    h: Tensor,
    /// conv2's input, if kept (else recomputed from h).
    h2: Option<Tensor>,
    /// The dropout mask's seed (None: no dropout).
    seed: Option<u64>,
    /// conv_shortcut(x) (None: the shortcut is x itself) and conv2's output, taken by the forward.
    sum: Mutex<Option<(Option<Tensor>, Tensor)>>,
}

impl Node {
    /// The two terms of the output (the shortcut, None for x itself, and conv2's output), taken once.
    fn take_sum(&self) -> Result<(Option<Tensor>, Tensor)> {
        match self.sum.lock().map_err(|_| candle_core::Error::Msg(format!("{NAME}: poisoned lock")))?.take() {
            Some(terms) => Ok(terms),
            None => candle_core::bail!("{NAME}: the node's forward ran twice"),
        }
    }
}

/// The contiguous f32 values of the CPU tensor `t` (named `what` in errors), passed to `f` under the
/// storage's read lock.
fn with_values<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => Ok(f(f32_slice(s, layout, NAME, what)?)),
        _ => candle_core::bail!("{NAME}: {what} must be a CPU tensor"),
    }
}

impl CustomOp3 for Node {
    fn name(&self) -> &'static str {
        NAME
    }

    /// y = (skip + out) / output_scale_factor, skip = x or conv_shortcut(x), out = conv2's output:
    /// in parallel for f32, by candle's storage ops ([`terms_sum`]) for other dtypes.
    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, _sp: &CpuStorage, _lp: &Layout, _st: &CpuStorage, _lt: &Layout) -> Result<(CpuStorage, Shape)> {
        let (shortcut, out) = self.take_sum()?;
        check_terms(shortcut.as_ref(), lx, &out)?;
        let scale = self.block.output_scale_factor;
        if out.dtype() != DType::F32 {
            let cpu: fn(&Storage) -> Option<&CpuStorage> = |s| match s {
                Storage::Cpu(c) => Some(c),
                _ => None,
            };
            return Ok((terms_sum(sx, lx, shortcut.as_ref(), &out, scale, cpu)?, out.shape().clone()));
        }
        let sum = |skip: &[f32], out: &[f32]| -> Vec<f32> {
            if scale == 1.0 {
                skip.par_iter().zip(out).map(|(s, o)| s + o).collect()
            } else {
                let inv = (1.0 / scale) as f32;
                skip.par_iter().zip(out).map(|(s, o)| (s + o) * inv).collect()
            }
        };
        let y = match &shortcut {
            Some(skip) => with_values(skip, "the shortcut", |s| with_values(&out, "conv2's output", |o| sum(s, o)))??,
            None => with_values(&out, "conv2's output", |o| f32_slice(sx, lx, NAME, "x").map(|x| sum(x, o)))??,
        };
        Ok((CpuStorage::F32(y), out.shape().clone()))
    }

    /// The same sum on CUDA ([`terms_sum`]).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        _sp: &candle_core::CudaStorage,
        _lp: &Layout,
        _st: &candle_core::CudaStorage,
        _lt: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (shortcut, out) = self.take_sum()?;
        check_terms(shortcut.as_ref(), lx, &out)?;
        let cuda: fn(&Storage) -> Option<&candle_core::CudaStorage> = |s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        };
        Ok((terms_sum(sx, lx, shortcut.as_ref(), &out, self.block.output_scale_factor, cuda)?, out.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, params: &Tensor, t: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let b = &self.block;
        let s = b.output_scale_factor;
        let dy = if s == 1.0 { grad.detach() } else { (grad.detach() / s)? }.contiguous()?;
        let x = x.detach();
        let conv_grads = |c: &Conv2d, input: &Tensor, d: &Tensor| conv2d_backward(input, &c.weight, d, c.stride, c.padding);
        let h2 = match &self.h2 {
            Some(h2) => h2.clone(),
            None => b.h2(&self.h, self.seed)?,
        };
        let (dh2, dw2, db2) = conv_grads(&b.conv2, &h2, &dy)?;
        drop(h2);
        let dh2 = match self.seed {
            Some(s) => crate::ops::dropout(&dh2, b.dropout, s)?,
            None => dh2,
        };
        let (dh, dg2, dbeta2) = b.norm2.backward_silu(&self.h, &dh2)?;
        let c1 = &b.conv1;
        let h1 = match &self.h1 {
            Some(h1) => h1.clone(),
            None => b.h1(&x)?,
        };
        let (dh1, dw1, dt) = conv2d_backward_per_image_bias(&h1, &c1.weight, &dh, c1.stride, c1.padding)?;
        drop(h1);
        let db1 = dt.sum(0)?;
        let (dx1, dg1, dbeta1) = b.norm1.backward_silu(&x, &dh1)?;
        // the gradients in the order of ResnetBlock2D::params
        let mut grads = vec![dg1, dbeta1, dw1, db1, dg2, dbeta2, dw2, db2];
        let dx = match &b.conv_shortcut {
            Some(c) => {
                let (dxs, dws, dbs) = conv_grads(c, &x, &dy)?;
                grads.extend([dws, dbs]);
                (dx1 + dxs)?
            }
            None => (dx1 + dy)?,
        };
        // each gradient in its argument's dtype (f32 master weights under mixed precision)
        let dparams = Tensor::cat(&grads.iter().map(|g| g.flatten_all()?.to_dtype(params.dtype())).collect::<Result<Vec<_>>>()?, 0)?;
        Ok((Some(dx.to_dtype(x.dtype())?), Some(dparams), Some(dt.to_dtype(t.dtype())?)))
    }
}

/// (skip + out) / scale by candle's storage ops on the backend whose storages `backend` picks out:
/// skip is the shortcut, or x itself (storage `sx`, layout `lx`) when None; out is conv2's output.
fn terms_sum<B: BackendStorage>(sx: &B, lx: &Layout, shortcut: Option<&Tensor>, out: &Tensor, scale: f64, backend: fn(&Storage) -> Option<&B>) -> Result<B> {
    let (go, lo) = out.storage_and_layout();
    let Some(so) = backend(&go) else { candle_core::bail!("{NAME}: conv2's output is on another device than x") };
    let y = match shortcut {
        Some(skip) => {
            let (gs, ls) = skip.storage_and_layout();
            let Some(ss) = backend(&gs) else { candle_core::bail!("{NAME}: the shortcut is on another device than x") };
            ss.binary_impl::<candle_core::op::Add>(so, ls, lo)?
        }
        None => sx.binary_impl::<candle_core::op::Add>(so, lx, lo)?,
    };
    if scale == 1.0 {
        Ok(y)
    } else {
        y.affine(&Layout::contiguous(out.shape()), 1.0 / scale, 0.0)
    }
}

/// Checks that the shortcut (x itself, of layout `lx`, when None) and conv2's output have one shape.
fn check_terms(shortcut: Option<&Tensor>, lx: &Layout, out: &Tensor) -> Result<()> {
    let skip_shape = shortcut.map_or(lx.shape(), |s| s.shape());
    if skip_shape != out.shape() {
        candle_core::bail!("{NAME}: the shortcut is {skip_shape:?}, conv2's output {:?}", out.shape());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use candle_nn::{VarBuilder, VarMap};
    use ddpm_core::NoiseRng;

    use super::*;
    use crate::nn::Recorder;
    use crate::resnet::ResnetParams;

    /// The block at (x, t) from candle's own differentiable ops (its conv2d, the composed group norm,
    /// SiLU, dropout as a product with the mask): the reference, sharing no kernel with the node.
    fn reference(b: &ResnetBlock2D, x: &Tensor, t: &Tensor, seed: Option<u64>) -> Tensor {
        let norm_silu = |n: &crate::nn::GroupNorm, x: &Tensor| {
            let [w, bias] = n.params();
            crate::ops::group_norm_composed(x, n.groups, w, bias, n.eps, true).unwrap()
        };
        let conv = |c: &Conv2d, x: &Tensor| {
            let y = x.conv2d(&c.weight, c.padding, c.stride, 1, 1).unwrap();
            y.broadcast_add(&c.bias.as_ref().unwrap().reshape((1, (), 1, 1)).unwrap()).unwrap()
        };
        let h = conv(&b.conv1, &norm_silu(&b.norm1, x)).broadcast_add(&t.unsqueeze(2).unwrap().unsqueeze(3).unwrap()).unwrap();
        let mut h2 = norm_silu(&b.norm2, &h);
        if let Some(s) = seed {
            let m = crate::ops::dropout_mask(h2.elem_count(), b.dropout, s);
            h2 = (h2 * Tensor::from_vec(m, h.shape(), x.device()).unwrap()).unwrap();
        }
        let skip = b.conv_shortcut.as_ref().map_or_else(|| x.clone(), |c| conv(c, x));
        ((skip + conv(&b.conv2, &h2)).unwrap() / b.output_scale_factor).unwrap()
    }

    /// max |a - b| / max |b|.
    fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let m = |t: Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        m((a - b).unwrap()) / m(b.clone()).max(1e-30)
    }

    /// A block (in_c -> out_c channels, dropout p, scale factor s) with f32 parameters drawn from
    /// `rng` in the order of their names, so that every run tests the same numbers (the variable
    /// map's own initialisation is not seeded): the norms' weights and biases 1 and 0 plus a normal
    /// draw (so that their gradients are tested in general), the convolutions' and projections'
    /// weights normal over sqrt(fan-in), their biases normal times 0.1. Returns it with the recorder
    /// that names its parameters.
    fn test_block(in_c: usize, out_c: usize, p: f64, scale: f64, rng: &mut NoiseRng) -> (ResnetBlock2D, Recorder) {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let rec = Recorder::default();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let params = ResnetParams { temb_channels: 5, groups: 2, eps: 1e-5, dropout: p };
        let block = ResnetBlock2D::new(vb, &rec, in_c, out_c, params, scale).unwrap();
        let mut vars: Vec<(String, Var)> = varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in vars {
            let draw = rng.randn(var.shape(), DType::F32, &dev).unwrap();
            let value = if name.contains("norm") {
                (var.as_tensor() + draw).unwrap()
            } else if var.rank() > 1 {
                // fan-in: the values of one output channel
                (draw / ((var.elem_count() / var.dims()[0]) as f64).sqrt()).unwrap()
            } else {
                (draw * 0.1).unwrap()
            };
            var.set(&value).unwrap();
        }
        (block, rec)
    }

    /// One block (in_c -> out_c channels on 6x5 images of 3 samples, dropout p, scale factor s): the
    /// node's output and the gradients of sum(y r) in x, t and every parameter, against the
    /// reference's and against the block's node-by-node graph.
    fn check(in_c: usize, out_c: usize, p: f64, scale: f64) {
        let dev = Device::Cpu;
        let mut rng = NoiseRng::new(3);
        let (block, rec) = test_block(in_c, out_c, p, scale, &mut rng);
        let mut randn = |shape: (usize, usize, usize, usize)| rng.randn(shape, DType::F32, &dev).unwrap();
        let x = Var::from_tensor(&randn((3, in_c, 6, 5))).unwrap();
        let t = Var::from_tensor(&randn((3, out_c, 1, 1)).flatten_from(1).unwrap()).unwrap();
        let r = randn((3, out_c, 6, 5));
        let seed = (p > 0.0).then_some(11);
        assert!(applies(&block, &x));
        let node = forward(&block, &x, &t, seed).unwrap();
        // the same node recomputing h1 and h2 in its backward (what it does on CUDA)
        let recomputing = super::node(&block, &x, &t, seed, false).unwrap();
        let parts = block.parts(&x, &t, seed).unwrap();
        let graph = block.output(&parts.skip, &parts.out).unwrap();
        let reference = reference(&block, &x, &t, seed);
        assert!(rel_diff(&node, &graph) < 1e-6, "node vs graph forward {}", rel_diff(&node, &graph));
        assert!(rel_diff(&node, &reference) < 1e-5, "node vs reference forward {}", rel_diff(&node, &reference));
        let grads = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (gn, gg, gr) = (grads(&node), grads(&graph), grads(&reference));
        let g_recomputing = grads(&recomputing);
        assert_eq!(recomputing.flatten_all().unwrap().to_vec1::<f32>().unwrap(), node.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let mut wrt: Vec<(String, Tensor)> = vec![("x".into(), x.as_tensor().clone()), ("t".into(), t.as_tensor().clone())];
        // the block's own parameters (t stands for time_emb_proj's output here)
        wrt.extend(rec.into_inner().into_iter().filter(|(name, _)| !name.starts_with("time_emb_proj")));
        assert_eq!(wrt.len(), 2 + if in_c == out_c { 8 } else { 10 });
        for (name, v) in &wrt {
            let (a, b, c) = (gn.get(v).unwrap(), gg.get(v).unwrap(), gr.get(v).unwrap());
            assert_eq!(a.dims(), v.dims(), "{name}");
            assert!(rel_diff(a, b) < 1e-5, "{name}: node vs graph gradient {}", rel_diff(a, b));
            assert!(rel_diff(a, c) < 1e-4, "{name}: node vs reference gradient {}", rel_diff(a, c));
            let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(g_recomputing.get(v).unwrap()), bits(a), "{name}: recomputing h1 and h2 changed the gradient");
        }
    }

    /// One block in f16 on the CPU with f32 master weights (mixed precision; the convolutions'
    /// gradients there come from candle's autograd, on CUDA from cuDNN): the node against the
    /// block's node-by-node graph in f16, the output bit for bit and every gradient (x, t, each
    /// parameter, in its own dtype) within f16's rounding; keeping h1 and h2 or recomputing them
    /// gives the same bits.
    fn check_half(in_c: usize, out_c: usize, p: f64, scale: f64) {
        let dev = Device::Cpu;
        let mut rng = NoiseRng::new(4);
        let (block, rec) = test_block(in_c, out_c, p, scale, &mut rng);
        let mut randn = |shape: (usize, usize, usize, usize)| rng.randn(shape, DType::F32, &dev).unwrap();
        let half = |t: Tensor| Var::from_tensor(&t.to_dtype(DType::F16).unwrap()).unwrap();
        let x = half(randn((3, in_c, 6, 5)));
        let t = half(randn((3, out_c, 1, 1)).flatten_from(1).unwrap());
        let r = randn((3, out_c, 6, 5));
        let seed = (p > 0.0).then_some(11);
        let kept = super::node(&block, &x, &t, seed, true).unwrap();
        let recomputing = super::node(&block, &x, &t, seed, false).unwrap();
        let parts = block.parts(&x, &t, seed).unwrap();
        let graph = block.output(&parts.skip, &parts.out).unwrap();
        assert_eq!(kept.dtype(), DType::F16);
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(f32s(&kept), f32s(&graph), "the forward");
        let grads = |y: &Tensor| (y.to_dtype(DType::F32).unwrap() * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (gk, gr, gg) = (grads(&kept), grads(&recomputing), grads(&graph));
        let mut wrt: Vec<(String, Tensor)> = vec![("x".into(), x.as_tensor().clone()), ("t".into(), t.as_tensor().clone())];
        wrt.extend(rec.into_inner().into_iter().filter(|(name, _)| !name.starts_with("time_emb_proj")));
        for (name, v) in &wrt {
            let (a, b, c) = (gk.get(v).unwrap(), gr.get(v).unwrap(), gg.get(v).unwrap());
            assert_eq!((a.dtype(), a.dims()), (v.dtype(), v.dims()), "{name}");
            assert_eq!(f32s(a), f32s(b), "{name}: recomputing h1 and h2 changed the gradient");
            let d = rel_diff(&a.to_dtype(DType::F32).unwrap(), &c.to_dtype(DType::F32).unwrap());
            assert!(d < 1e-2, "{name}: node vs graph gradient in f16 {d}");
        }
    }

    #[test]
    fn half_precision_node_matches_the_graph() {
        check_half(4, 4, 0.0, 1.0);
        check_half(4, 6, 0.3, 2.0);
    }

    #[test]
    fn node_matches_the_graph_and_candles_ops() {
        check(4, 4, 0.0, 1.0);
        check(4, 6, 0.0, 1.0);
        check(6, 4, 0.3, 2.0);
    }
}
