//! `ddpm bench`: training and inference throughput and peak memory of a UNet config, printed as one
//! JSON line in the shape of the PyTorch peer (`scripts/peer_pytorch.py`) so the two compare side by side.
//!
//! Training = forward, backward and AdamW step on L_simple with the linear schedule (T = 1000), exactly
//! as the peer times it: 2 warm-up steps, then `--steps` timed steps; inference = one UNet forward.
//! With `--dtype bf16` (or f16) the model trains in mixed precision, as `ddpm train --dtype bf16` does
//! and as the peer does with `--dtype bfloat16` (autocast): f32 master weights and optimiser state,
//! activations and products in that dtype, the loss in f32. `--pure-dtype` keeps the weights and the
//! optimiser state in that dtype too (the peer's `--pure-dtype`).

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use ddpm_core::{NoiseRng, NoiseSchedule, SchedulerConfig};
use ddpm_unet::UNet2DModel;

use crate::device::{parse_device, parse_dtype};
use crate::optim::{AdamW, AdamWParams};

/// Options of `ddpm bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// UNet preset: mnist-fast, mnist-small, labml or ddpm-cifar10.
    #[arg(long, default_value = "ddpm-cifar10")]
    pub preset: String,
    /// A diffusers config.json instead of a preset.
    #[arg(long)]
    pub unet_config: Option<std::path::PathBuf>,
    /// Images per step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// CPU threads (sets the thread pools of candle and gemm).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Timed steps after 2 warm-up steps.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, or bf16/f16 on CUDA (mixed precision unless --pure-dtype).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// With --dtype bf16/f16: weights and optimiser state in that dtype too, instead of mixed
    /// precision with f32 master weights.
    #[arg(long)]
    pub pure_dtype: bool,
    /// Let f32 matrix products on CUDA use TF32 tensor cores (PyTorch's default for convolutions).
    #[arg(long)]
    pub tf32: bool,
    /// Only write the UNet config.json (for the PyTorch peer) to this path and exit.
    #[arg(long)]
    pub write_config: Option<std::path::PathBuf>,
}

/// Peak resident memory of this process in MiB (VmHWM), 0 where /proc is not available.
pub fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}

/// The high-water mark, in MiB, of the memory that candle's CUDA allocations took from the device's
/// default memory pool (cudarc allocates stream-ordered from it where the device supports pools):
/// the analogue of PyTorch's `torch.cuda.max_memory_allocated`. `None` off CUDA, or where the driver
/// does not answer.
fn cuda_pool_peak_mib(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let ctx = d.cuda_stream().context().clone();
        if !ctx.has_async_alloc() {
            return None;
        }
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut high: u64 = 0;
        // SAFETY: plain queries of the device's default pool into local out-parameters; USED_MEM_HIGH
        // is a cuuint64_t.
        let ok = unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
                && sys::cuMemPoolGetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, (&mut high as *mut u64).cast()) == sys::CUresult::CUDA_SUCCESS
        };
        return ok.then_some(high >> 20);
    }
    let _ = device;
    None
}

/// Waits for queued GPU work so that timings are real.
fn sync(device: &Device) -> Result<()> {
    device.synchronize()?;
    Ok(())
}

/// Lets candle's f32 matrix products on `device` use TF32 tensor cores; an error off CUDA.
fn set_tf32(device: &Device) -> Result<()> {
    if !device.is_cuda() {
        anyhow::bail!("--tf32: only CUDA has TF32; drop it or use --device cuda");
    }
    candle_core::cuda::set_gemm_reduced_precision_f32(true);
    Ok(())
}

/// Runs `ddpm bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    for (flag, v) in [("--batch-size", a.batch_size), ("--threads", a.threads), ("--steps", a.steps)] {
        if v == 0 {
            anyhow::bail!("{flag} 0: must be at least 1");
        }
    }
    // candle and gemm size their pools from RAYON_NUM_THREADS on first use.
    std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    let device = parse_device(&a.device)?;
    let cfg = match &a.unet_config {
        Some(p) => ddpm_unet::UNetConfig::from_file(p)?,
        None => ddpm_unet::presets::preset(&a.preset)?,
    };
    if let Some(p) = &a.write_config {
        cfg.to_file(p)?;
        return Ok(());
    }
    let dtype = parse_dtype(&a.dtype, &device)?;
    if a.tf32 {
        set_tf32(&device)?;
    }
    let varmap = VarMap::new();
    // f32 master weights under mixed precision, the compute dtype's with --pure-dtype
    let weights = if a.pure_dtype { dtype } else { DType::F32 };
    let model = UNet2DModel::new_trainable(&cfg, &varmap, weights, &device)?.with_compute_dtype(dtype);
    let mut rng = NoiseRng::new(0);
    crate::init::seeded_init(&varmap, &mut rng)?;
    // no clipping: the peer times a plain AdamW step
    let mut opt = AdamW::from_varmap(&varmap, AdamWParams { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, max_grad_norm: None })?;
    let params: usize = opt.vars().iter().map(|(_, v)| v.elem_count()).sum();
    let schedule = NoiseSchedule::new(&SchedulerConfig::default(), &device)?;
    let s = crate::model::sample_size(&cfg)?;
    let x0 = rng.randn((a.batch_size, cfg.in_channels, s, s), DType::F32, &device)?;
    let mut step = |rng: &mut NoiseRng| -> Result<()> {
        let t = rng.randint(a.batch_size, 1000, &device)?;
        let eps = rng.randn(x0.shape(), DType::F32, &device)?;
        let xt = schedule.q_sample(&x0, &t, &eps)?.to_dtype(dtype)?;
        let pred = model.forward_train(&xt, &t, rng)?.to_dtype(DType::F32)?;
        let loss = (pred - &eps)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        Ok(opt.step_with(&grads, 2e-4, 1.0)?)
    };
    for _ in 0..2 {
        step(&mut rng)?;
    }
    sync(&device)?;
    let t0 = Instant::now();
    for _ in 0..a.steps {
        step(&mut rng)?;
    }
    sync(&device)?;
    let train = (a.batch_size * a.steps) as f64 / t0.elapsed().as_secs_f64();
    let t = rng.randint(a.batch_size, 1000, &device)?;
    let x0 = x0.to_dtype(dtype)?;
    let infer_once = || -> Result<Tensor> { Ok(model.forward(&x0, &t)?) };
    infer_once()?;
    sync(&device)?;
    let t0 = Instant::now();
    for _ in 0..a.steps {
        infer_once()?;
    }
    sync(&device)?;
    let infer = (a.batch_size * a.steps) as f64 / t0.elapsed().as_secs_f64();
    let round3 = |v: f64| (v * 1000.0).round() / 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "impl": "ddpm-rs (candle 0.11)",
            "params": params,
            "batch": a.batch_size,
            "threads": a.threads,
            "device": crate::device::device_name(&device),
            "dtype": a.dtype,
            "precision": if dtype == DType::F32 { "float32" } else if a.pure_dtype { "pure" } else { "mixed" },
            "tf32": a.tf32,
            "train_img_per_s": round3(train),
            "infer_img_per_s": round3(infer),
            "peak_rss_mib": peak_rss_mib(),
            "cuda_pool_peak_mib": cuda_pool_peak_mib(&device)
        })
    );
    Ok(())
}
