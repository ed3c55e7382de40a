//! `ddpm bench`: training and inference throughput and peak memory of a UNet config, printed as one
//! JSON line in the shape of the PyTorch peer (`scripts/peer_pytorch.py`) so the two compare side by side.
//!
//! Training = forward, backward and AdamW step on L_simple with the linear schedule (T = 1000), exactly
//! as the peer times it: 2 warm-up steps, then `--steps` timed steps; inference = one UNet forward.
//! With `--dtype bf16` (or f16) the weights, the optimiser state and the UNet's input are in that dtype
//! and the loss is taken in f32, as the peer does with `--dtype bfloat16`.

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
    /// UNet preset: mnist-small, labml or ddpm-cifar10.
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
    /// Parameter and activation dtype: f32, or bf16/f16 on CUDA.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
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
    let model = UNet2DModel::new_trainable(&cfg, &varmap, dtype, &device)?;
    let mut rng = NoiseRng::new(0);
    crate::init::seeded_init(&varmap, &mut rng)?;
    let vars: Vec<(String, candle_core::Var)> = varmap.data().lock().map_err(|_| anyhow::anyhow!("lock"))?.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = AdamW::new(vars, AdamWParams { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 })?;
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
        opt.step(&grads, 2e-4, 1.0)
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
            "tf32": a.tf32,
            "train_img_per_s": round3(train),
            "infer_img_per_s": round3(infer),
            "peak_rss_mib": peak_rss_mib()
        })
    );
    Ok(())
}
