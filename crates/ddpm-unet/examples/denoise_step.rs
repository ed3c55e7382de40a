//! One reverse step with a UNet loaded from a model folder or Hub repo id, through the scheduler
//! that the model's `scheduler_config.json` names (DDPMScheduler or DDIMScheduler, every field
//! honoured; diffusers' DDPMScheduler defaults when the folder has no scheduler config).
//!
//! ```text
//! cargo run --example denoise_step -- [MODEL_DIR_OR_REPO_ID] [TIMESTEP]
//! ```
//! Defaults to the small MNIST fixture and t = T - 1. For DDPM the step is the paper's Algorithm 2
//! line 4, x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) + sigma_t z,
//! with sigma_t as the config's `variance_type` says.

use candle_core::{DType, Device, Tensor};
use ddpm_core::{NoiseRng, Sampler, Scheduler, SchedulerConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let default_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/diffusers/unet-mnist-small");
    let mut args = std::env::args().skip(1);
    let model_arg = args.next().unwrap_or_else(|| default_dir.to_string());
    let device = Device::Cpu;

    // the UNet, and the scheduler of the same model
    let files = ddpm_unet::resolve_model(&model_arg)?;
    let unet = ddpm_unet::load_from_files(&files.config, &files.weights, &device, DType::F32)?;
    let config = match &files.scheduler_config {
        Some(p) => SchedulerConfig::from_file(p)?,
        None => SchedulerConfig::default(),
    };
    let mut sampler = Sampler::from_config(&config, &device)?;
    let num_t = config.num_train_timesteps;
    // every training timestep the config's steps_offset leaves in range, so that the step goes from t
    // to the timestep below it
    sampler.set_timesteps(num_t.saturating_sub(config.steps_offset).max(1))?;
    let t: usize = match args.next() {
        Some(s) => s.parse()?,
        None => num_t - 1,
    };
    if t >= num_t {
        return Err(format!("timestep {t} is not below num_train_timesteps {num_t}").into());
    }

    let cfg = unet.config();
    let size = cfg.sample_size.unwrap_or(32);
    let mut rng = NoiseRng::new(0);
    let x_t = rng.randn((1, cfg.in_channels, size, size), DType::F32, &device)?;
    let eps = unet.forward(&x_t, &Tensor::new(&[t as i64], &device)?)?;
    // x_{t-1} and the x_0 estimate the step used, (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
    let out = sampler.step_with_rng(&eps, t, &x_t, &mut rng)?;

    let stat = |x: &Tensor| -> candle_core::Result<(f32, f32)> {
        let m = x.mean_all()?.to_scalar::<f32>()?;
        let s = x.broadcast_sub(&x.mean_all()?)?.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?;
        Ok((m, s))
    };
    let schedule = sampler.schedule();
    println!("model: {} ({} parameters), {}", files.config.display(), unet.num_parameters(), sampler.class_name());
    println!("t = {t}, beta_t = {:.6}, alpha_bar_t = {:.6}", schedule.betas()[t], schedule.alphas_cumprod()[t]);
    for (name, x) in [("x_t", &x_t), ("eps_theta", &eps), ("x0_hat", &out.pred_original_sample), ("x_{t-1}", &out.prev_sample)] {
        let (m, s) = stat(x)?;
        println!("{name:>10}: shape {:?}, mean {m:+.4}, std {s:.4}", x.dims());
    }
    Ok(())
}
