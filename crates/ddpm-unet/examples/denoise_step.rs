//! One DDPM denoising step with a UNet loaded from a model folder or Hub repo id.
//!
//! ```text
//! cargo run -p ddpm-unet --example denoise_step -- [MODEL_DIR_OR_REPO_ID] [TIMESTEP]
//! ```
//! Defaults to the small MNIST fixture and t = T - 1. The step is the paper's Algorithm 2 line 4:
//! x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) + sigma_t z,
//! with a linear beta schedule read from `scheduler_config.json` and sigma_t^2 = beta-tilde_t.

use candle_core::{DType, Device, Tensor};
use ddpm_core::NoiseRng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let default_dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/diffusers/unet-mnist-small"
    );
    let mut args = std::env::args().skip(1);
    let model_arg = args.next().unwrap_or_else(|| default_dir.to_string());
    let device = Device::Cpu;

    // the UNet, and the scheduler config of the same model
    let files = ddpm_unet::resolve_model(&model_arg)?;
    let unet = ddpm_unet::load_from_files(&files.config, &files.weights, &device, DType::F32)?;
    let sched: serde_json::Value = match &files.scheduler_config {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?)?,
        None => serde_json::json!({}),
    };
    let num_t = sched["num_train_timesteps"].as_u64().unwrap_or(1000) as usize;
    let (b0, b1) = (
        sched["beta_start"].as_f64().unwrap_or(1e-4),
        sched["beta_end"].as_f64().unwrap_or(0.02),
    );
    let t: usize = match args.next() {
        Some(s) => s.parse()?,
        None => num_t - 1,
    };
    if t >= num_t {
        return Err(format!("timestep {t} is not below num_train_timesteps {num_t}").into());
    }

    // linear schedule: beta_i = b0 + (b1 - b0) i / (T - 1), alpha_bar_t = prod_{i<=t} (1 - beta_i)
    let betas: Vec<f64> = (0..num_t)
        .map(|i| b0 + (b1 - b0) * i as f64 / (num_t.max(2) - 1) as f64)
        .collect();
    let alpha_bar = |t: usize| betas[..=t].iter().map(|b| 1.0 - b).product::<f64>();
    let (beta_t, ab_t) = (betas[t], alpha_bar(t));
    let ab_prev = if t > 0 { alpha_bar(t - 1) } else { 1.0 };

    let cfg = unet.config();
    let size = cfg.sample_size.unwrap_or(32);
    let mut rng = NoiseRng::new(0);
    let x_t = rng.randn((1, cfg.in_channels, size, size), DType::F32, &device)?;
    let eps = unet.forward(&x_t, &Tensor::new(&[t as i64], &device)?)?;

    // mean = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(1 - beta_t)
    let mean = ((&x_t - (eps.clone() * (beta_t / (1.0 - ab_t).sqrt()))?)? / (1.0 - beta_t).sqrt())?;
    // sigma_t^2 = beta-tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t, no noise at t = 0
    let sigma = ((1.0 - ab_prev) / (1.0 - ab_t) * beta_t).sqrt();
    let x_prev = if t > 0 {
        (mean + (rng.randn(x_t.shape(), DType::F32, &device)? * sigma)?)?
    } else {
        mean
    };
    // the model's estimate of x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
    let x0 = ((&x_t - (eps.clone() * (1.0 - ab_t).sqrt())?)? / ab_t.sqrt())?;

    let stat = |x: &Tensor| -> candle_core::Result<(f32, f32)> {
        let m = x.mean_all()?.to_scalar::<f32>()?;
        let s = x
            .broadcast_sub(&x.mean_all()?)?
            .sqr()?
            .mean_all()?
            .sqrt()?
            .to_scalar::<f32>()?;
        Ok((m, s))
    };
    println!(
        "model: {} ({} parameters)",
        files.config.display(),
        unet.num_parameters()
    );
    println!("t = {t}, beta_t = {beta_t:.6}, alpha_bar_t = {ab_t:.6}, sigma_t = {sigma:.6}");
    for (name, x) in [
        ("x_t", &x_t),
        ("eps_theta", &eps),
        ("x0_hat", &x0),
        ("x_{t-1}", &x_prev),
    ] {
        let (m, s) = stat(x)?;
        println!("{name:>10}: shape {:?}, mean {m:+.4}, std {s:.4}", x.dims());
    }
    Ok(())
}
