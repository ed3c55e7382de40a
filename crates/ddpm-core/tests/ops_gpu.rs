//! The GPU kernels of the fused ops (CUDA, or Metal) against their CPU kernels (which the other
//! ops_* tests check against the composed candle ops and hand-computed cases): values and gradients.
//!
//! Compiled with `--features cuda` or `--features metal` only, and needs that GPU: `cargo test -p
//! ddpm-core --features cuda --test ops_gpu` (nvcc on PATH, CUDA_COMPUTE_CAP set for the GPU), or
//! `--features metal` on a Mac (the Metal kernels are opt-in; the tests switch them on). Without the
//! GPU the tests fail with a message saying so.
#![cfg(any(feature = "cuda", feature = "metal"))]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use ddpm_core::ops::ddpm_step::{ddpm_step, StepScalars};
use ddpm_core::ops::optim::{adamw_step_, ema_update_, AdamWStep};
use ddpm_core::ops::conv::{conv2d, upsample2x_conv2d};
use ddpm_core::ops::{attention, dropout, group_norm, softmax_last_dim, weighted_mse};

/// The first CUDA device, with the project's kernels switched on.
#[cfg(feature = "cuda")]
fn gpu() -> Device {
    // All tests set the same value, before any op reads it.
    std::env::set_var("DDPM_CUDA_KERNELS", "1");
    let dev = Device::new_cuda(0).expect("these tests need a CUDA GPU (Device::new_cuda(0) failed)");
    assert!(ddpm_core::ops::cuda_kernels_enabled(&dev));
    dev
}

/// The first Metal device, with the project's Metal kernels switched on (they are opt-in).
#[cfg(not(feature = "cuda"))]
fn gpu() -> Device {
    std::env::set_var("DDPM_METAL_KERNELS", "1");
    let dev = Device::new_metal(0).expect("these tests need a Metal GPU (Device::new_metal(0) failed)");
    assert!(ddpm_core::ops::metal_kernels_enabled(&dev));
    dev
}

/// Largest |a - b| relative to max(1, max |b|), with `a` brought to the CPU.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_device(&Device::Cpu).unwrap();
    let d = (&a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    d / scale.max(1.0)
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
    let gpu = gpu();
    for silu in [false, true] {
        let (n, c, h, w, groups) = (3, 8, 5, 7, 4);
        let run = |dev: &Device| {
            let x = Var::from_vec(common::lcg_values(n * c * h * w, 1, 3.0), (n, c, h, w), dev).unwrap();
            let gamma = Var::from_vec(common::lcg_values(c, 2, 1.5), c, dev).unwrap();
            let beta = Var::from_vec(common::lcg_values(c, 3, 0.5), c, dev).unwrap();
            let r = Tensor::from_vec(common::lcg_values(n * c * h * w, 4, 1.0), (n, c, h, w), dev).unwrap();
            let out = group_norm(&x, groups, &gamma, &beta, 1e-6, silu).unwrap();
            let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g = |v: &Var| grads.get(v).unwrap().clone();
            [out.clone(), g(&x), g(&gamma), g(&beta)]
        };
        let (on_gpu, on_cpu) = (run(&gpu), run(&Device::Cpu));
        assert_close(&format!("group norm (silu {silu})"), ["out", "dx", "dgamma", "dbeta"], &on_gpu, &on_cpu, 1e-5);
    }
}

#[test]
fn weighted_mse_matches_the_cpu_kernel() {
    let gpu = gpu();
    for weights in [None, Some(vec![0.5f32, 2.0, 1.0, 3.0])] {
        let run = |dev: &Device| {
            let p = Var::from_vec(common::lcg_values(4 * 3 * 6 * 6, 5, 2.0), (4, 3, 6, 6), dev).unwrap();
            let y = Tensor::from_vec(common::lcg_values(4 * 3 * 6 * 6, 6, 2.0), (4, 3, 6, 6), dev).unwrap();
            let loss = weighted_mse(&p, &y, weights.as_deref()).unwrap();
            let grad = loss.backward().unwrap().get(&p).unwrap().clone();
            (loss, grad)
        };
        let ((lg, gg), (lc, gc)) = (run(&gpu), run(&Device::Cpu));
        assert!(rel_diff(&lg, &lc) < 1e-6, "loss {lg} vs {lc}");
        assert!(rel_diff(&gg, &gc) < 1e-6, "gradient differs by {}", rel_diff(&gg, &gc));
    }
}

#[test]
fn ddpm_step_matches_the_cpu_kernel() {
    let gpu = gpu();
    let s = StepScalars { x0_from_sample: 1.3, x0_from_output: -0.7, clip: Some(1.0), coef_x0: 0.4, coef_xt: 0.55, sigma: 0.12 };
    for (clip, noisy) in [(Some(1.0), true), (None, true), (Some(1.0), false)] {
        let s = StepScalars { clip, ..s };
        let run = |dev: &Device| {
            let t = |seed| Tensor::from_vec(common::lcg_values(2 * 3 * 8 * 8, seed, 2.0), (2, 3, 8, 8), dev).unwrap();
            let (m, x, z) = (t(7), t(8), t(9));
            ddpm_step(&m, &x, noisy.then_some(&z), s).unwrap()
        };
        let ((pg, xg), (pc, xc)) = (run(&gpu), run(&Device::Cpu));
        assert!(rel_diff(&pg, &pc) < 1e-6 && rel_diff(&xg, &xc) < 1e-6, "clip {clip:?}, noise {noisy}");
    }
}

#[test]
fn adamw_and_ema_match_the_cpu_kernels() {
    let gpu = gpu();
    let step = |k| AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: k, grad_scale: 0.8 };
    let run = |dev: &Device| {
        let t = |seed, amp| Tensor::from_vec(common::lcg_values(1000, seed, amp), 1000, dev).unwrap();
        let (theta, m, v, ema) = (t(10, 1.0), Tensor::zeros(1000, DType::F32, dev).unwrap(), Tensor::zeros(1000, DType::F32, dev).unwrap(), t(10, 1.0));
        for k in 1..=3 {
            adamw_step_(&theta, &m, &v, &t(10 + k, 0.1), &step(k)).unwrap();
            ema_update_(&ema, &theta, 0.99).unwrap();
        }
        [theta, m, v, ema]
    };
    let (on_gpu, on_cpu) = (run(&gpu), run(&Device::Cpu));
    assert_close("AdamW and EMA", ["theta", "m", "v", "ema"], &on_gpu, &on_cpu, 1e-6);
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
    // attention, which on the GPU runs candle's products around them and on the CPU its fused kernel.
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
