//! The whole UNet on a GPU (CUDA, or Metal): diffusers' outputs on the reference fixtures (f32, and
//! bf16 on CUDA), and the training gradients against the CPU's.
//!
//! Compiled with `--features cuda` or `--features metal` only, and needs that GPU: `cargo test -p
//! ddpm-unet --features cuda --test gpu`. Run it twice, with and without `DDPM_CUDA_KERNELS=0`
//! (on a Mac: with and without `DDPM_METAL_KERNELS=1`), to cover both the project's kernels and
//! candle's composed ops.
#![cfg(any(feature = "cuda", feature = "metal"))]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use ddpm_core::NoiseRng;
use ddpm_unet::{load_dir, UNet2DModel, UNetConfig};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/diffusers")).join(name)
}

/// The first CUDA device (with `cuda`), else the first Metal device.
fn gpu() -> Device {
    #[cfg(feature = "cuda")]
    let dev = Device::new_cuda(0).expect("these tests need a CUDA GPU (Device::new_cuda(0) failed)");
    #[cfg(not(feature = "cuda"))]
    let dev = Device::new_metal(0).expect("these tests need a Metal GPU (Device::new_metal(0) failed)");
    dev
}

/// max |a - b| / max(1, max |b|), both brought to the CPU in f32.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let f = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let (a, b) = (f(a), f(b));
    let max = |t: Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    max((&a - &b).unwrap()) / max(b).max(1.0)
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
/// dropout 0.1 (its masks are the same on every device for the same seed).
fn loss_and_grads(dev: &Device) -> (Tensor, Vec<(String, Tensor)>) {
    let mut cfg = UNetConfig::from_file(fixture("unet-mnist-small").join("config.json")).unwrap();
    cfg.dropout = 0.1;
    let mut varmap = VarMap::new();
    let model = UNet2DModel::new_trainable(&cfg, &varmap, DType::F32, dev).unwrap();
    varmap.load(fixture("unet-mnist-small").join("diffusion_pytorch_model.safetensors")).unwrap();
    let mut rng = NoiseRng::new(7);
    let x = rng.randn((4, 1, 28, 28), DType::F32, &Device::Cpu).unwrap().to_device(dev).unwrap();
    let target = rng.randn((4, 1, 28, 28), DType::F32, &Device::Cpu).unwrap().to_device(dev).unwrap();
    let t = Tensor::new(&[3i64, 100, 500, 999], dev).unwrap();
    let pred = model.forward_train(&x, &t, &mut rng).unwrap();
    let loss = (pred - target).unwrap().sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    let mut named: Vec<(String, Tensor)> =
        data.iter().map(|(k, v)| (k.clone(), grads.get(v.as_tensor()).expect("every parameter gets a gradient").clone())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    (loss, named)
}

#[test]
fn training_gradients_match_the_cpu() {
    let (loss_gpu, grads_gpu) = loss_and_grads(&gpu());
    let (loss_cpu, grads_cpu) = loss_and_grads(&Device::Cpu);
    let d = rel_diff(&loss_gpu, &loss_cpu);
    assert!(d < 1e-5, "loss differs by {d}");
    assert_eq!(grads_gpu.len(), grads_cpu.len());
    let max_abs = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    // Each gradient relative to its own scale, floored at 1e-4 of the largest: some gradients are
    // zero in exact arithmetic (a key bias shifts every score of a query alike, which softmax
    // ignores), and both devices then return rounding noise that no relative bound can match.
    let floor = 1e-4 * grads_cpu.iter().map(|(_, c)| max_abs(c)).fold(0f32, f32::max);
    let mut worst = (0f32, String::new());
    for ((name, g), (_, c)) in grads_gpu.iter().zip(&grads_cpu) {
        let diff = max_abs(&(g.to_device(&Device::Cpu).unwrap() - c).unwrap()) / max_abs(c).max(floor);
        if diff > 1e-4 {
            eprintln!("  {name}: {diff:e} of its scale");
        }
        if diff > worst.0 {
            worst = (diff, name.clone());
        }
    }
    eprintln!("{} gradients, worst relative difference {:e} ({})", grads_gpu.len(), worst.0, worst.1);
    assert!(worst.0 < 1e-3, "gradient of {} differs by {} of its scale", worst.1, worst.0);
}
