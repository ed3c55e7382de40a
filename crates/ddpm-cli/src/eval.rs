//! `ddpm eval`: the negative log-likelihood bound of the DDPM paper (L_vlb in bits/dim, with the
//! discretized Gaussian decoder) of a model on a dataset's test split.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::DType;
use ddpm_core::{NoiseRng, NoiseSchedule};

use crate::data::{self, Split};
use crate::device::parse_device;
use crate::{model, progress};

/// Options of `ddpm eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// A model folder, a training checkpoint folder, or a Hub repo id.
    #[arg(long)]
    pub model: String,
    /// The dataset whose test split is scored (see `train --data`).
    #[arg(long, default_value = "mnist")]
    pub data: String,
    /// Number of test images (the first N).
    #[arg(long, default_value_t = 64)]
    pub num: usize,
    /// Images scored at once.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Seed of the noise of the Monte-Carlo terms.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Runs `ddpm eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    if a.num == 0 || a.batch_size == 0 {
        bail!("--num and --batch-size must be at least 1");
    }
    let device = parse_device(&a.device)?;
    let m = model::load(&a.model, &device, DType::F32)?;
    let (size, ch) = (model::sample_size(m.unet.config())?, m.unet.config().in_channels);
    let mut set = data::load(&a.data, Split::Test, size, ch)?;
    if set.height != size || set.channels != ch {
        bail!("--data {}: images are {}x{} with {} channel(s); the model takes {size}x{size} with {ch}", a.data, set.height, set.width, set.channels);
    }
    set.truncate(a.num);
    let schedule = NoiseSchedule::new(&m.scheduler, &device)?;
    let big_t = m.scheduler.num_train_timesteps;
    let batches = set.len.div_ceil(a.batch_size);
    let bar = progress::bar((batches * big_t) as u64, "eval");
    let mut rng = NoiseRng::new(a.seed);
    let start = Instant::now();
    let mut total = 0f64;
    for b in 0..batches {
        let idx: Vec<usize> = (b * a.batch_size..((b + 1) * a.batch_size).min(set.len)).collect();
        let x0 = set.batch(&idx, &[], &device)?;
        let nll = ddpm_core::vlb::nll_bits_per_dim(&m.unet, &schedule, &x0, &mut rng, |_, _| bar.inc(1))?;
        total += nll.total_bpd.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    }
    bar.finish_and_clear();
    println!(
        "{}",
        serde_json::json!({
            "model": m.origin,
            "data": a.data,
            "split": "test",
            "num": set.len,
            "timesteps": big_t,
            "nll_bits_per_dim": (total / set.len as f64 * 1e4).round() / 1e4,
            "seconds": (start.elapsed().as_secs_f64() * 10.0).round() / 10.0
        })
    );
    Ok(())
}
