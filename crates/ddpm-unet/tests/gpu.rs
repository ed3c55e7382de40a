//! The network on a GPU (CUDA, or Metal): each op's kernels (group norm, the convolutions, the softmax
//! and attention, dropout) against their CPU kernels (which the ops_* tests check against candle's
//! composed ops and hand-computed cases), values and gradients; then the whole UNet: diffusers'
//! outputs on the reference fixtures (f32, and bf16 on CUDA), and the training gradients against the
//! CPU's.
//!
//! Compiled with `--features cuda` or `--features metal` only, and needs that GPU: `cargo test -p
//! ddpm-unet --features cuda --test gpu`. Run it twice, with and without `DDPM_CUDA_KERNELS=0`
//! (on a Mac: with and without `DDPM_METAL_KERNELS=1`), to cover both the project's kernels and
//! candle's composed ops.
#![cfg(any(feature = "cuda", feature = "metal"))]

mod common;

use common::rel_diff;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use ddpm_core::NoiseRng;
use ddpm_unet::ops::conv::{conv2d, upsample2x_conv2d};
use ddpm_unet::ops::{attention, dropout, group_norm, softmax_last_dim};
use ddpm_unet::{load_dir, UNet2DModel, UNetConfig};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/diffusers")).join(name)
}

/// The first CUDA device (with `cuda`), else the first Metal device.
fn gpu() -> Device {
    #[cfg(feature = "cuda")]
    let dev = ddpm_core::ops::cuda_device(0).expect("these tests need a CUDA GPU (ddpm_core::ops::cuda_device(0) failed)");
    #[cfg(not(feature = "cuda"))]
    let dev = Device::new_metal(0).expect("these tests need a Metal GPU (Device::new_metal(0) failed)");
    dev
}


/// Asserts that each GPU result is within `bound` ([`rel_diff`]) of the CPU's, naming `what` and the
/// result.
fn assert_close<const N: usize>(what: &str, names: [&str; N], on_gpu: &[Tensor; N], on_cpu: &[Tensor; N], bound: f32) {
    for (name, (a, b)) in names.iter().zip(on_gpu.iter().zip(on_cpu)) {
        let d = rel_diff(a, b);
        assert!(d < bound, "{what} {name} differs by {d}");
    }
}

#[test]
fn group_norm_matches_the_cpu_kernel() {
    // f32 within 1e-5. On CUDA also bf16 and f16 x with f32 gamma and beta: there the kernel reads
    // and writes the half type itself, on the CPU the f32 op runs between casts; the same values up
    // to the f32 sums' order, so within one unit of the half type's last place.
    let gpu = gpu();
    let mut cases = vec![(DType::F32, 1e-5)];
    if cfg!(feature = "cuda") {
        cases.extend([(DType::BF16, 1e-2), (DType::F16, 2e-3)]);
    }
    for (dtype, bound) in cases {
        for silu in [false, true] {
            let (n, c, h, w, groups) = (3, 8, 5, 7, 4);
            let run = |dev: &Device| {
                let x = Var::from_tensor(&Tensor::from_vec(common::lcg_values(n * c * h * w, 1, 3.0), (n, c, h, w), dev).unwrap().to_dtype(dtype).unwrap()).unwrap();
                let gamma = Var::from_vec(common::lcg_values(c, 2, 1.5), c, dev).unwrap();
                let beta = Var::from_vec(common::lcg_values(c, 3, 0.5), c, dev).unwrap();
                let r = Tensor::from_vec(common::lcg_values(n * c * h * w, 4, 1.0), (n, c, h, w), dev).unwrap();
                let out = group_norm(&x, groups, &gamma, &beta, 1e-6, silu).unwrap();
                assert_eq!(out.dtype(), dtype);
                let grads = (out.to_dtype(DType::F32).unwrap() * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let g = |v: &Var| grads.get(v).unwrap().to_dtype(DType::F32).unwrap();
                [out.to_dtype(DType::F32).unwrap(), g(&x), g(&gamma), g(&beta)]
            };
            let (on_gpu, on_cpu) = (run(&gpu), run(&Device::Cpu));
            assert_close(&format!("{dtype:?} group norm (silu {silu})"), ["out", "dx", "dgamma", "dbeta"], &on_gpu, &on_cpu, bound);
        }
    }
}

#[test]
fn convolutions_match_the_cpu_kernels() {
    // On the GPU the convolution runs by columns (im2col and col2im kernels around candle's products);
    // on the CPU by the CPU kernels: "same" 3x3, strided, 1x1, a per-image bias and the upsampler.
    let gpu = gpu();
    for (b, c, o, (h, w), (k, stride, pad), per_image, upsample) in [
        (2, 3, 5, (7, 6), (3, 1, 1), false, false),
        (3, 4, 4, (9, 8), (3, 2, 1), true, false),
        (2, 6, 3, (4, 5), (1, 1, 0), false, false),
        (2, 3, 4, (5, 7), (3, 1, 1), true, true),
    ] {
        let run = |dev: &Device| {
            let x = Var::from_vec(common::lcg_values(b * c * h * w, 5, 1.0), (b, c, h, w), dev).unwrap();
            let wt = Var::from_vec(common::lcg_values(o * c * k * k, 6, 0.3), (o, c, k, k), dev).unwrap();
            let bias_shape = if per_image { vec![b, o] } else { vec![o] };
            let bias = Var::from_vec(common::lcg_values(bias_shape.iter().product(), 7, 1.0), bias_shape, dev).unwrap();
            let y = if upsample {
                upsample2x_conv2d(&x, &wt, Some(&bias)).unwrap()
            } else {
                conv2d(&x, &wt, Some(&bias), stride, pad).unwrap()
            };
            let r = Tensor::from_vec(common::lcg_values(y.elem_count(), 8, 1.0), y.shape(), dev).unwrap();
            let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g = |v: &Var| grads.get(v).unwrap().clone();
            [y.clone(), g(&x), g(&wt), g(&bias)]
        };
        let (on_gpu, on_cpu) = (run(&gpu), run(&Device::Cpu));
        assert_close(&format!("convolution (k {k}, stride {stride}, upsample {upsample})"), ["y", "dx", "dw", "dbias"], &on_gpu, &on_cpu, 1e-5);
    }
}


#[test]
#[cfg(feature = "cuda")]
fn half_precision_convolutions_match_the_cpu() {
    // bf16 and f16 on the GPU (the column kernels in the half type, the products on tensor cores)
    // against the CPU's f32 convolution of the same rounded values: outputs and gradients within a
    // few units of the half type's last place. "Same" 3x3, strided, and the upsampler.
    let gpu = gpu();
    for (half, bound) in [(DType::BF16, 2e-2), (DType::F16, 3e-3)] {
        for (b, c, o, (h, w), (k, stride, pad), upsample) in [(2, 6, 5, (7, 6), (3, 1, 1), false), (3, 4, 4, (9, 8), (3, 2, 1), false), (2, 3, 4, (5, 7), (3, 1, 1), true)] {
            let run = |dev: &Device, dtype: DType| {
                let var = |len: usize, shape: Vec<usize>, seed: u64, amp: f32| {
                    // rounded to the half type first, so both sides start from the same values
                    let t = Tensor::from_vec(common::lcg_values(len, seed, amp), shape, &Device::Cpu).unwrap().to_dtype(half).unwrap();
                    Var::from_tensor(&t.to_dtype(dtype).unwrap().to_device(dev).unwrap()).unwrap()
                };
                let x = var(b * c * h * w, vec![b, c, h, w], 15, 1.0);
                let wt = var(o * c * k * k, vec![o, c, k, k], 16, 0.3);
                let bias = var(o, vec![o], 17, 1.0);
                let y = if upsample { upsample2x_conv2d(&x, &wt, Some(&bias)).unwrap() } else { conv2d(&x, &wt, Some(&bias), stride, pad).unwrap() };
                let r = Tensor::from_vec(common::lcg_values(y.elem_count(), 18, 1.0), y.shape(), dev).unwrap();
                let grads = (y.to_dtype(DType::F32).unwrap() * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                let g = |v: &Var| f(grads.get(v).unwrap());
                [f(&y), g(&x), g(&wt), g(&bias)]
            };
            let (on_gpu, on_cpu) = (run(&gpu, half), run(&Device::Cpu, DType::F32));
            assert_close(&format!("{half:?} convolution (k {k}, stride {stride}, upsample {upsample})"), ["y", "dx", "dw", "dbias"], &on_gpu, &on_cpu, bound);
        }
    }
}


#[test]
fn softmax_and_attention_match_the_cpu_kernels() {
    // The softmax kernels (rows shorter and longer than a block of threads, large logits), and
    // attention, which on the GPU runs candle's products around them (qkv is differentiated: as one
    // graph node that recomputes the probabilities in its backward, `ops/attention_node.rs`) and on
    // the CPU its fused kernel.
    let gpu = gpu();
    for (shape, amp) in [(vec![3, 7], 3.0), (vec![2, 700], 80.0)] {
        let run = |dev: &Device| {
            let n = shape.iter().product();
            let x = Var::from_vec(common::lcg_values(n, 9, amp), shape.as_slice(), dev).unwrap();
            let r = Tensor::from_vec(common::lcg_values(n, 10, 1.0), shape.as_slice(), dev).unwrap();
            let p = softmax_last_dim(&x).unwrap();
            let grads = (&p * &r).unwrap().sum_all().unwrap().backward().unwrap();
            [p.clone(), grads.get(&x).unwrap().clone()]
        };
        let (on_gpu, on_cpu) = (run(&gpu), run(&Device::Cpu));
        assert_close(&format!("softmax {shape:?}"), ["p", "dx"], &on_gpu, &on_cpu, 1e-5);
    }
    let (n, heads, d, l) = (2, 2, 8, 49);
    let run = |dev: &Device| {
        let qkv = Var::from_vec(common::lcg_values(n * 3 * heads * d * l, 11, 2.0), (n, 3 * heads * d, l), dev).unwrap();
        let r = Tensor::from_vec(common::lcg_values(n * heads * d * l, 12, 1.0), (n, heads * d, l), dev).unwrap();
        let out = attention(&qkv, heads, 1.0 / (d as f64).sqrt()).unwrap();
        let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        [out.clone(), grads.get(&qkv).unwrap().clone()]
    };
    let (on_gpu, on_cpu) = (run(&gpu), run(&Device::Cpu));
    assert_close("attention", ["out", "dqkv"], &on_gpu, &on_cpu, 1e-5);
}


#[test]
fn dropout_makes_the_cpu_mask_on_the_gpu() {
    // Same (seed, shape), same mask bit for bit: the output, its gradient, and the bf16 path (the f32
    // mask made on the GPU, then multiplied in).
    let gpu = gpu();
    let n = 3 * 70_001;
    for dtype in [DType::F32, DType::BF16] {
        let run = |dev: &Device| {
            let x = Var::from_tensor(&Tensor::from_vec(common::lcg_values(n, 13, 2.0), (3, n / 3), dev).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let r = Tensor::from_vec(common::lcg_values(n, 14, 1.0), (3, n / 3), dev).unwrap().to_dtype(dtype).unwrap();
            let y = dropout(&x, 0.1, 42).unwrap();
            let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            [y.to_dtype(DType::F32).unwrap(), grads.get(&x).unwrap().to_dtype(DType::F32).unwrap()]
        };
        let (on_gpu, on_cpu) = (run(&gpu), run(&Device::Cpu));
        assert_close(&format!("dropout {dtype:?}"), ["y", "dx"], &on_gpu, &on_cpu, 1e-30);
    }
}

/// The fixture's UNet on the GPU in `dtype` against diffusers' f32 output.
fn parity(name: &str, dtype: DType, bound: f32) {
    let io = candle_core::safetensors::load(fixture(name).join("io.safetensors"), &Device::Cpu).unwrap();
    let model = load_dir(fixture(name), &gpu(), dtype).unwrap();
    let x = io["x"].to_device(&gpu()).unwrap().to_dtype(dtype).unwrap();
    let t = io["t"].to_device(&gpu()).unwrap();
    let y = model.forward(&x, &t).unwrap();
    let d = rel_diff(&y, &io["out"]);
    eprintln!("{name} {dtype:?}: relative difference to diffusers {d:e}");
    assert!(d < bound, "{name} in {dtype:?} on the GPU differs from diffusers by {d}");
}

#[test]
fn gpu_matches_diffusers_in_f32() {
    parity("unet-mnist-small", DType::F32, 1e-4);
    parity("unet-cifar10-layout", DType::F32, 1e-4);
}

#[test]
#[cfg(feature = "cuda")]
fn gpu_matches_diffusers_in_bf16() {
    // bf16 keeps 8 bits of mantissa: a relative error of a few 1e-3 per op, some 1e-2 over the network.
    parity("unet-mnist-small", DType::BF16, 5e-2);
}

/// L_simple-like loss and the gradient of every parameter of the mnist fixture's UNet on `dev`, with
/// dropout 0.1 (its masks are the same on every device for the same seed), f32 weights and the
/// activations in `compute` (mixed precision for bf16).
fn loss_and_grads(dev: &Device, compute: DType) -> (Tensor, Vec<(String, Tensor)>) {
    let mut cfg = UNetConfig::from_file(fixture("unet-mnist-small").join("config.json")).unwrap();
    cfg.dropout = 0.1;
    let mut varmap = VarMap::new();
    let model = UNet2DModel::new_trainable(&cfg, &varmap, DType::F32, dev).unwrap().with_compute_dtype(compute);
    varmap.load(fixture("unet-mnist-small").join("diffusion_pytorch_model.safetensors")).unwrap();
    let mut rng = NoiseRng::new(7);
    let x = rng.randn((4, 1, 28, 28), DType::F32, &Device::Cpu).unwrap().to_device(dev).unwrap();
    let target = rng.randn((4, 1, 28, 28), DType::F32, &Device::Cpu).unwrap().to_device(dev).unwrap();
    let t = Tensor::new(&[3i64, 100, 500, 999], dev).unwrap();
    let pred = model.forward_train(&x, &t, &mut rng).unwrap().to_dtype(DType::F32).unwrap();
    let loss = (pred - target).unwrap().sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let mut named: Vec<(String, Tensor)> =
        data.iter().map(|(k, v)| (k.clone(), grads.get(v.as_tensor()).expect("every parameter gets a gradient").clone())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    (loss, named)
}

/// The training gradients on the GPU with activations in `compute` against the CPU's in f32: the
/// loss within `loss_bound` and every gradient within `bound` of its scale (see below). On CUDA
/// with cuDNN each residual block runs as one graph node there (`resnet/node.rs`), recomputing its
/// norms in the backward; run with `DDPM_BLOCK_NODE=0` too for the node-by-node graph.
fn gradients_match_the_cpu(compute: DType, loss_bound: f32, bound: f32) {
    let (loss_gpu, grads_gpu) = loss_and_grads(&gpu(), compute);
    let (loss_cpu, grads_cpu) = loss_and_grads(&Device::Cpu, DType::F32);
    let d = rel_diff(&loss_gpu, &loss_cpu);
    assert!(d < loss_bound, "{compute:?}: loss differs by {d}");
    assert_eq!(grads_gpu.len(), grads_cpu.len());
    let max_abs = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    // Each gradient relative to its own scale, floored at bound / 10 of the largest (1e-4 in f32):
    // some gradients are zero in exact arithmetic (a key bias shifts every score of a query alike,
    // which softmax ignores), and both devices then return rounding noise that no relative bound
    // can match.
    let floor = bound / 10.0 * grads_cpu.iter().map(|(_, c)| max_abs(c)).fold(0f32, f32::max);
    let mut worst = (0f32, String::new());
    for ((name, g), (_, c)) in grads_gpu.iter().zip(&grads_cpu) {
        let diff = max_abs(&(g.to_device(&Device::Cpu).unwrap() - c).unwrap()) / max_abs(c).max(floor);
        assert_eq!(g.dtype(), DType::F32, "{name}: the gradient of an f32 weight");
        if diff > bound / 10.0 {
            eprintln!("  {name}: {diff:e} of its scale");
        }
        if diff > worst.0 {
            worst = (diff, name.clone());
        }
    }
    eprintln!("{compute:?}: {} gradients, worst relative difference {:e} ({})", grads_gpu.len(), worst.0, worst.1);
    assert!(worst.0 < bound, "{compute:?}: gradient of {} differs by {} of its scale", worst.1, worst.0);
}

#[test]
fn training_gradients_match_the_cpu() {
    gradients_match_the_cpu(DType::F32, 1e-5, 1e-3);
}

#[test]
#[cfg(feature = "cuda")]
fn mixed_precision_training_gradients_match_the_cpu() {
    // bf16 activations with f32 weights (`ddpm train --dtype bf16`) against f32 on the CPU: bf16's
    // 8-bit mantissa costs a few 1e-3 per op, a few 1e-2 over the network and its backward; a
    // missing or doubled term of any gradient is off by its own size.
    gradients_match_the_cpu(DType::BF16, 2e-2, 1e-1);
}
