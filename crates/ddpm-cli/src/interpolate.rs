//! `ddpm interpolate`: the interpolation of the DDPM paper's section 4.3. Two images are noised to step t
//! with the same noise, x_t = (1 - lambda) q(x_t | a) + lambda q(x_t | b), and each mix is denoised back
//! to an image by the ancestral sampler.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use ddpm_core::{NoiseRng, NoiseSchedule};

use crate::data::{self, Split};
use crate::device::parse_device;
use crate::{generate, imageio, model, progress};

/// Options of `ddpm interpolate`.
#[derive(Debug, Clone, clap::Args)]
pub struct InterpolateArgs {
    /// A model folder, a training checkpoint folder, or a Hub repo id.
    #[arg(long)]
    pub model: String,
    /// The first image file (must be the model's size).
    #[arg(long, requires = "b")]
    pub a: Option<PathBuf>,
    /// The second image file.
    #[arg(long, requires = "a")]
    pub b: Option<PathBuf>,
    /// Take the two images from this dataset's test split instead (see `train --data`).
    #[arg(long, conflicts_with_all = ["a", "b"])]
    pub data: Option<String>,
    /// Indices of the two test images with --data.
    #[arg(long, value_delimiter = ',', default_values_t = [0usize, 1])]
    pub indices: Vec<usize>,
    /// The diffusion step both images are noised to.
    #[arg(long, default_value_t = 500)]
    pub t: usize,
    /// Mixing weights lambda, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])]
    pub lambdas: Vec<f64>,
    /// Seed of the shared noise and of the denoising.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The strip PNG: a, the denoised mixes, b.
    #[arg(long, default_value = "interpolation.png")]
    pub out: PathBuf,
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Runs `ddpm interpolate`.
pub fn run(a: InterpolateArgs) -> Result<()> {
    imageio::check_parent(&a.out)?;
    if a.lambdas.is_empty() {
        bail!("--lambdas: give at least one mixing weight");
    }
    if let Some(l) = a.lambdas.iter().find(|l| !l.is_finite()) {
        bail!("--lambdas: {l} is not a number; each mixing weight must be finite (0 = image a, 1 = image b)");
    }
    let device = parse_device(&a.device)?;
    let m = model::load(&a.model, &device, DType::F32)?;
    let (size, ch) = (model::sample_size(m.unet.config())?, m.unet.config().in_channels);
    let big_t = m.scheduler.num_train_timesteps;
    if a.t >= big_t {
        bail!("--t {}: must be below the model's {big_t} diffusion steps", a.t);
    }
    let (xa, xb) = match (&a.a, &a.b, &a.data) {
        (Some(pa), Some(pb), _) => (imageio::load_for_model(pa, size, ch, &device)?, imageio::load_for_model(pb, size, ch, &device)?),
        (_, _, Some(d)) => {
            if a.indices.len() != 2 {
                bail!("--indices: give exactly two test-image indices, as in --indices 0,1");
            }
            let set = data::load(d, Split::Test, size, ch)?;
            if set.height != size || set.channels != ch {
                bail!("--data {d}: images are {}x{} with {} channel(s); the model takes {size}x{size} with {ch}", set.height, set.width, set.channels);
            }
            for &i in &a.indices {
                if i >= set.len {
                    bail!("--indices {i}: the test split of {d} has {} images", set.len);
                }
            }
            (set.batch(&a.indices[..1], &[], &device)?, set.batch(&a.indices[1..2], &[], &device)?)
        }
        _ => bail!("give two images with --a and --b, or a dataset with --data"),
    };
    let schedule = NoiseSchedule::new(&m.scheduler, &device)?;
    let mut rng = NoiseRng::new(a.seed);
    let n = a.lambdas.len();
    let noise = rng.randn((1, ch, size, size), DType::F32, &device)?.repeat((2, 1, 1, 1))?;
    let t_vec = Tensor::from_vec(vec![a.t as i64; 2], 2, &device)?;
    // q(x_t | x_0) for both images with the same noise.
    let xt = schedule.q_sample(&Tensor::cat(&[&xa, &xb], 0)?, &t_vec, &noise)?;
    let (xta, xtb) = (xt.get(0)?, xt.get(1)?);
    let mixes: Vec<Tensor> = a
        .lambdas
        .iter()
        .map(|&l| ((&xta * (1.0 - l))? + (&xtb * l)?)?.unsqueeze(0))
        .collect::<candle_core::Result<_>>()?;
    let x_t = Tensor::cat(&mixes, 0)?;
    let bar = progress::bar((a.t + 1) as u64, "denoise");
    let out = generate::denoise_from(&m.unet, &m.scheduler, x_t, a.t, &mut rng, || bar.inc(1))?;
    bar.finish_and_clear();
    let strip = Tensor::cat(&[&xa, &out, &xb], 0)?;
    let img = imageio::grid_image(&strip, n + 2)?;
    imageio::save_png(&image::DynamicImage::ImageRgb8(img), &a.out).context("interpolation strip")?;
    eprintln!("wrote {} ({} mixes between the two images, t = {})", a.out.display(), n, a.t);
    Ok(())
}
