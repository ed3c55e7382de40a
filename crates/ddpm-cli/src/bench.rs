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
    /// Also time the training step's phases (`--steps` more steps, the device synchronised between
    /// phases): the forward with the loss, the backward, the optimizer, and the host's time to issue
    /// a whole step against the step's time (medians, in ms, as `phase_*_ms`).
    #[arg(long)]
    pub phases: bool,
    /// Also time each kind of op over `--steps` more steps (ddpm_core::ops::profile: convolutions,
    /// group norm, attention, dropout, the loss, the optimizer, the EMA; on CUDA by events on the
    /// stream): ms per step as `profile_ms`, with `other` for the rest of the step (candle's own ops).
    #[arg(long)]
    pub profile: bool,
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

/// Runs `ddpm bench`: prints [`measure`]'s line (nothing with `--write-config`).
pub fn run(a: BenchArgs) -> Result<()> {
    if let Some(line) = measure(a)? {
        println!("{line}");
    }
    Ok(())
}

/// The figures of `ddpm bench` as its JSON line; `None` with `--write-config`, which only writes the
/// config.
pub fn measure(a: BenchArgs) -> Result<Option<serde_json::Value>> {
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
        return Ok(None);
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
    let job = TrainJob { model: &model, schedule: &schedule, x0: &x0, dtype };
    for _ in 0..2 {
        job.step(&mut opt, &mut rng)?;
    }
    sync(&device)?;
    let t0 = Instant::now();
    for _ in 0..a.steps {
        job.step(&mut opt, &mut rng)?;
    }
    sync(&device)?;
    let train = (a.batch_size * a.steps) as f64 / t0.elapsed().as_secs_f64();
    let phases = if a.phases { Some(job.phases(&mut opt, &mut rng, a.steps, &device)?) } else { None };
    let profile = if a.profile { Some(job.profile(&mut opt, &mut rng, a.steps, &device)?) } else { None };
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
    let mut line = serde_json::json!({
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
    });
    if let (Some(p), Some(obj)) = (phases, line.as_object_mut()) {
        for (name, ms) in PHASES.iter().zip(p) {
            obj.insert(format!("phase_{name}_ms"), round3(ms).into());
        }
    }
    if let (Some((kinds, step_ms)), Some(obj)) = (profile, line.as_object_mut()) {
        let mut ms = serde_json::Map::new();
        for (name, v) in &kinds {
            ms.insert(name.to_string(), round3(*v).into());
        }
        // the step's time that no kind claims: candle's own ops (negative only by timing noise)
        ms.insert("other".into(), round3(step_ms - kinds.iter().map(|(_, v)| v).sum::<f64>()).into());
        obj.insert("profile_ms".into(), ms.into());
        obj.insert("profile_step_ms".into(), round3(step_ms).into());
    }
    Ok(Some(line))
}

/// The names of [`TrainJob::phases`]' figures, in its order (the peer's `--phases` prints the same).
const PHASES: [&str; 5] = ["forward", "backward", "optimizer", "issue", "step"];

/// The benchmark's training step: L_simple of the model at random timesteps of the linear schedule,
/// as the peer computes it.
struct TrainJob<'a> {
    model: &'a UNet2DModel,
    schedule: &'a NoiseSchedule,
    /// The batch of clean images (f32).
    x0: &'a Tensor,
    /// The activations' dtype.
    dtype: DType,
}

impl TrainJob<'_> {
    /// The loss of one batch: x_t = q_sample(x0, t, eps) at random t, mean (model(x_t, t) - eps)^2.
    fn loss(&self, rng: &mut NoiseRng) -> Result<Tensor> {
        let (b, device) = (self.x0.dim(0)?, self.x0.device());
        // the timesteps on the host too: q_sample needs no read back from the device
        let (ts, t) = rng.timesteps(b, 1000, device)?;
        let eps = rng.randn(self.x0.shape(), DType::F32, device)?;
        let xt = self.schedule.q_sample_at(self.x0, &ts, &eps)?.to_dtype(self.dtype)?;
        let pred = self.model.forward_train(&xt, &t, rng)?.to_dtype(DType::F32)?;
        Ok((pred - &eps)?.sqr()?.mean_all()?)
    }

    /// One training step: the loss, its backward, a plain AdamW step (no clipping: the peer times
    /// a plain one).
    fn step(&self, opt: &mut AdamW, rng: &mut NoiseRng) -> Result<()> {
        let grads = self.loss(rng)?.backward()?;
        Ok(opt.step_with(&grads, 2e-4, 1.0)?)
    }

    /// Medians over `steps` steps, in ms, of [`PHASES`]: the forward with the loss, the backward,
    /// the optimizer (each timed from a synchronised device to a synchronised device), then for a
    /// whole step the host's time to issue it and the time until the device has run it. An issue
    /// time close to the step's says the host (launches, candle's bookkeeping) paces the step.
    fn phases(&self, opt: &mut AdamW, rng: &mut NoiseRng, steps: usize, device: &Device) -> Result<[f64; 5]> {
        let mut runs = Vec::with_capacity(steps);
        let since = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
        for _ in 0..steps {
            sync(device)?;
            let t = Instant::now();
            let loss = self.loss(rng)?;
            sync(device)?;
            let forward = since(t);
            let t = Instant::now();
            let grads = loss.backward()?;
            sync(device)?;
            let backward = since(t);
            let t = Instant::now();
            opt.step_with(&grads, 2e-4, 1.0)?;
            sync(device)?;
            let optimizer = since(t);
            drop((loss, grads));
            let t = Instant::now();
            self.step(opt, rng)?;
            let issue = since(t);
            sync(device)?;
            runs.push([forward, backward, optimizer, issue, since(t)]);
        }
        Ok(std::array::from_fn(|i| median(runs.iter().map(|r| r[i]).collect())))
    }

    /// Each kind of op's time per step in ms over `steps` steps ([`ddpm_core::ops::profile`], in order
    /// of first appearance), and the steps' own time per step (the device synchronised at both ends).
    fn profile(&self, opt: &mut AdamW, rng: &mut NoiseRng, steps: usize, device: &Device) -> Result<(Vec<(&'static str, f64)>, f64)> {
        use ddpm_core::ops::profile;
        sync(device)?;
        profile::report()?;
        profile::set_enabled(true);
        let t = Instant::now();
        let run = (0..steps).try_for_each(|_| self.step(opt, rng)).and_then(|()| sync(device));
        let step_ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
        profile::set_enabled(false);
        run?;
        let kinds = profile::report()?.into_iter().map(|(name, ms, _)| (name, ms / steps as f64)).collect();
        Ok((kinds, step_ms))
    }
}

/// The median of `v` (the mean of the middle two for an even count; NaN when empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
