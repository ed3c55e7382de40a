//! The GPU kernels of the diffusion process's fused ops (CUDA, or Metal: the loss, the DDPM step,
//! AdamW and the EMA) against their CPU kernels (which ops_loss_step checks against the composed
//! candle ops): values and gradients. The network's kernels have theirs in ddpm-unet's tests/gpu.rs.
//!
//! Compiled with `--features cuda` or `--features metal` only, and needs that GPU: `cargo test -p
//! ddpm-core --features cuda --test ops_gpu` (nvcc on PATH, CUDA_COMPUTE_CAP set for the GPU), or
//! `--features metal` on a Mac (the Metal kernels are opt-in; the tests switch them on). Without the
//! GPU the tests fail with a message saying so.
#![cfg(any(feature = "cuda", feature = "metal"))]

use candle_core::{DType, Device, Tensor, Var};
use ddpm_core::NoiseRng;
use ddpm_core::ops::ddpm_step::{ddpm_step, StepScalars};
use ddpm_core::ops::optim::{adamw_step_, ema_update_, AdamWStep};
use ddpm_core::ops::weighted_mse;

/// The first CUDA device, with the project's kernels switched on.
#[cfg(feature = "cuda")]
fn gpu() -> Device {
    // All tests set the same value, before any op reads it.
    std::env::set_var("DDPM_CUDA_KERNELS", "1");
    let dev = ddpm_core::ops::cuda_device(0).expect("these tests need a CUDA GPU (ddpm_core::ops::cuda_device(0) failed)");
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

/// `len` normal values times `amp` from seed `seed`: repeatable test data, the same on every device.
fn values(len: usize, seed: u64, amp: f32) -> Vec<f32> {
    NoiseRng::new(seed).normal_vec(len).into_iter().map(|v| v * amp).collect()
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
fn weighted_mse_matches_the_cpu_kernel() {
    let gpu = gpu();
    for weights in [None, Some(vec![0.5f32, 2.0, 1.0, 3.0])] {
        let run = |dev: &Device| {
            let p = Var::from_vec(values(4 * 3 * 6 * 6, 5, 2.0), (4, 3, 6, 6), dev).unwrap();
            let y = Tensor::from_vec(values(4 * 3 * 6 * 6, 6, 2.0), (4, 3, 6, 6), dev).unwrap();
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
            let t = |seed| Tensor::from_vec(values(2 * 3 * 8 * 8, seed, 2.0), (2, 3, 8, 8), dev).unwrap();
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
    let step = |k| AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: k };
    let run = |dev: &Device| {
        let t = |seed, amp| Tensor::from_vec(values(1000, seed, amp), 1000, dev).unwrap();
        let (theta, m, v, ema) = (t(10, 1.0), Tensor::zeros(1000, DType::F32, dev).unwrap(), Tensor::zeros(1000, DType::F32, dev).unwrap(), t(10, 1.0));
        // the gradient's scale is read from device memory (clipping computes it there)
        let scale = Tensor::new(&[0.8f32], dev).unwrap();
        for k in 1..=3 {
            adamw_step_(&theta, &m, &v, &t(10 + k, 0.1), &scale, &step(k)).unwrap();
            ema_update_(&ema, &theta, 0.99).unwrap();
        }
        [theta, m, v, ema]
    };
    let (on_gpu, on_cpu) = (run(&gpu), run(&Device::Cpu));
    assert_close("AdamW and EMA", ["theta", "m", "v", "ema"], &on_gpu, &on_cpu, 1e-6);
}


#[test]
#[cfg(feature = "cuda")]
fn multi_tensor_updates_match_the_per_tensor_cpu_kernels() {
    // AdamW and the EMA of several tensors in one launch each (ops::multi_tensor) against the CPU's
    // per-tensor kernels, over lengths on both sides of the chunk boundary (a chunk left out, or run
    // twice, leaves values off by a whole update); then the global norm and the clipping scale
    // against the host's f64 sum of the same gradient values.
    use ddpm_core::ops::multi_tensor::{self, CHUNK_LEN};
    let gpu = gpu();
    let lens = [1, 255, CHUNK_LEN - 1, CHUNK_LEN, CHUNK_LEN + 1, 3 * CHUNK_LEN + 17, 1000];
    let step = |k| AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: k };
    let tensors = |dev: &Device, seed: u64, amp| -> Vec<Tensor> { lens.iter().enumerate().map(|(i, &n)| Tensor::from_vec(values(n, seed + i as u64, amp), n, dev).unwrap()).collect() };
    let zeros = |dev: &Device| -> Vec<Tensor> { lens.iter().map(|&n| Tensor::zeros(n, DType::F32, dev).unwrap()).collect() };
    /// The tensors as the list of references that the multi-tensor functions take.
    fn l(ts: &[Tensor]) -> Vec<&Tensor> {
        ts.iter().collect()
    }
    let run = |dev: &Device| {
        let (theta, m, v, ema) = (tensors(dev, 10, 1.0), zeros(dev), zeros(dev), tensors(dev, 10, 1.0));
        let scale = Tensor::new(&[0.8f32], dev).unwrap();
        for k in 1..=3 {
            let grads = tensors(dev, 100 * k, 0.1);
            if dev.is_cpu() {
                for i in 0..lens.len() {
                    adamw_step_(&theta[i], &m[i], &v[i], &grads[i], &scale, &step(k)).unwrap();
                    ema_update_(&ema[i], &theta[i], 0.99).unwrap();
                }
            } else {
                let lists = [l(&theta), l(&m), l(&v), l(&grads)];
                assert!(multi_tensor::available(&[&lists[0], &lists[1], &lists[2], &lists[3], &[&scale]]));
                multi_tensor::adamw_(&lists[0], &lists[1], &lists[2], &lists[3], &scale, &step(k)).unwrap();
                multi_tensor::ema_(&l(&ema), &lists[0], 0.99).unwrap();
            }
        }
        [theta, m, v, ema].map(|ts| Tensor::cat(&ts, 0).unwrap())
    };
    let (on_gpu, on_cpu) = (run(&gpu), run(&Device::Cpu));
    assert_close("multi-tensor AdamW and EMA", ["theta", "m", "v", "ema"], &on_gpu, &on_cpu, 1e-6);

    // norm: sqrt of the sum of squares over every value of every tensor, in f64 on the host (about
    // 1.3 for these values, so that a max norm of 0.5 clips and 1e3 does not)
    let host: Vec<Vec<f32>> = lens.iter().enumerate().map(|(i, &n)| values(n, 500 + i as u64, 0.003)).collect();
    let grads: Vec<Tensor> = host.iter().map(|h| Tensor::from_vec(h.clone(), h.len(), &gpu).unwrap()).collect();
    let expected = host.iter().flatten().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    assert!(expected > 0.5 && expected < 1e3, "test data: the norm {expected} should lie between the thresholds below");
    for (max, clips) in [(0.0, false), (0.5, true), (1e3, false)] {
        let (norm, scale) = multi_tensor::norm_and_clip_scale(&l(&grads), max).unwrap();
        let (norm, scale) = (norm.to_scalar::<f64>().unwrap(), scale.to_vec1::<f32>().unwrap());
        assert!((norm - expected).abs() <= 1e-12 * expected, "norm {norm}, expected {expected}");
        // min(1, max / (n + 1e-6)) of the norm it returned; 1 when clipping is off
        let want = if clips { (max / (norm + 1e-6)) as f32 } else { 1.0 };
        assert_eq!(scale, [want], "clip scale for max norm {max}, norm {norm}");
    }
}

#[test]
fn clipped_adamw_on_the_device_matches_the_cpu() {
    // AdamW::step_clipped: the gradient norm and the clipping scale computed on the device and read
    // there by the moment kernels (no host round trip). Two variables, a loss whose gradient norm is
    // about 90 (clipped to 1) and then, after the weights shrink, a step without clipping.
    use ddpm_core::optim::{AdamW, AdamWParams};
    let gpu = gpu();
    let run = |dev: &Device| {
        let var = |seed, n| Var::from_tensor(&Tensor::from_vec(values(n, seed, 1.0), n, dev).unwrap()).unwrap();
        let (a, b) = (var(31, 700), var(32, 300));
        let p = AdamWParams { lr: 1e-2, weight_decay: 0.01, max_grad_norm: Some(1.0), ..Default::default() };
        let mut opt = AdamW::new_named(vec![("a".into(), a.clone()), ("b".into(), b.clone())], p).unwrap();
        let mut norms = vec![];
        for scale in [1.0, 0.01] {
            // L = scale (sum a^2 + 2 sum b^2)
            let loss = ((a.sqr().unwrap().sum_all().unwrap() + (b.sqr().unwrap().sum_all().unwrap() * 2.0).unwrap()).unwrap() * scale).unwrap();
            let n = opt.step_clipped(&loss.backward().unwrap()).unwrap();
            norms.push(n.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap());
        }
        (norms, [a.as_tensor().clone(), b.as_tensor().clone()])
    };
    let ((n_gpu, on_gpu), (n_cpu, on_cpu)) = (run(&gpu), run(&Device::Cpu));
    assert!(n_cpu[0] > 1.0 && n_cpu[1] < 1.0, "the first step must clip and the second not: {n_cpu:?}");
    for (g, c) in n_gpu.iter().zip(&n_cpu) {
        assert!((g - c).abs() <= 1e-5 * c, "gradient norms {n_gpu:?} vs {n_cpu:?}");
    }
    assert_close("clipped AdamW", ["a", "b"], &on_gpu, &on_cpu, 1e-6);
}

#[test]
#[cfg(feature = "cuda")]
fn uploads_through_reused_staging_buffers_arrive_intact() {
    // More uploads of one size than there are staging buffers, queued behind a long product so
    // that the copies are still pending when the host refills a buffer: each tensor must hold its
    // own values (a buffer refilled before its copy ran would show a later upload's), for f32 and
    // i64, and match the CPU's tensor of the same values.
    let gpu = gpu();
    let big = Tensor::from_vec(values(2048 * 2048, 1, 1.0), (2048, 2048), &gpu).unwrap();
    let mut queued = Vec::new();
    for i in 0..12u64 {
        let busy = big.matmul(&big).unwrap();
        let floats = values(100_003, 100 + i, 1.0);
        let ints: Vec<i64> = (0..5_001).map(|k| (k * 7 + i as i64 * 1_000_003) % 999_983).collect();
        let f = ddpm_core::ops::upload(floats.clone(), 100_003, &gpu).unwrap();
        let n = ddpm_core::ops::upload(ints.clone(), 5_001, &gpu).unwrap();
        queued.push((busy, f, floats, n, ints));
    }
    for (i, (_, f, floats, n, ints)) in queued.iter().enumerate() {
        assert_eq!(f.to_vec1::<f32>().unwrap(), *floats, "f32 upload {i}");
        assert_eq!(n.to_vec1::<i64>().unwrap(), *ints, "i64 upload {i}");
    }
    let on_cpu = ddpm_core::ops::upload(values(10, 3, 1.0), (2, 5), &Device::Cpu).unwrap();
    let on_gpu = ddpm_core::ops::upload(values(10, 3, 1.0), (2, 5), &gpu).unwrap();
    assert_eq!(on_gpu.dims(), [2, 5]);
    assert_eq!(on_gpu.to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), on_cpu.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    // more sizes than the staging rings kept: the older rings are freed after their copies ran
    let sized: Vec<(Tensor, Vec<f32>)> = (1..=20usize)
        .map(|k| {
            let v = values(1000 * k, 200 + k as u64, 1.0);
            (ddpm_core::ops::upload(v.clone(), 1000 * k, &gpu).unwrap(), v)
        })
        .collect();
    for (i, (t, v)) in sized.iter().enumerate() {
        assert_eq!(t.to_vec1::<f32>().unwrap(), *v, "upload of size {}", 1000 * (i + 1));
    }
    let err = ddpm_core::ops::upload(vec![1f32; 3], (2, 2), &gpu).unwrap_err().to_string();
    assert!(err.contains("3 values") && err.contains("[2, 2]"), "{err}");
}
