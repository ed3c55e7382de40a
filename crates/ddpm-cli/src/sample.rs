//! `ddpm sample`: images from a model folder, a training checkpoint or a Hub repo id.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Tensor;
use ddpm_core::sampling::Scheduler;
use ddpm_core::NoiseRng;

use crate::device::{parse_device, parse_dtype};
use crate::generate::{self, SamplerArgs};
use crate::{imageio, model, progress};

/// Options of `ddpm sample`.
#[derive(Debug, Clone, clap::Args)]
pub struct SampleArgs {
    /// A model folder, a training checkpoint folder, or a Hub repo id such as google/ddpm-cifar10-32.
    #[arg(long)]
    pub model: String,
    /// Number of images.
    #[arg(long, default_value_t = 16)]
    pub num: usize,
    /// Images denoised at once.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// The sampler.
    #[command(flatten)]
    pub sampler: SamplerArgs,
    /// Seed of the noise: the same seed gives the same images.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write all images as one near-square grid PNG.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Enlarge the --out grid this many times (nearest neighbour), e.g. 4 for 28x28 digits.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub scale: u32,
    /// Write each image as its own PNG in this folder.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Write a GIF of the denoising of the first batch.
    #[arg(long)]
    pub animate: Option<PathBuf>,
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32, f16 or bf16 (bf16 needs CUDA).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Runs `ddpm sample`.
pub fn run(a: SampleArgs) -> Result<()> {
    if a.out.is_none() && a.out_dir.is_none() && a.animate.is_none() {
        bail!("nothing to write: give --out grid.png, --out-dir DIR and/or --animate anim.gif");
    }
    if a.num == 0 || a.batch_size == 0 {
        bail!("--num and --batch-size must be at least 1");
    }
    for p in a.out.iter().chain(a.animate.iter()) {
        imageio::check_writable(p)?;
    }
    if let Some(d) = &a.out_dir {
        std::fs::create_dir_all(d).map_err(|e| anyhow::anyhow!("--out-dir {}: cannot create: {e}", d.display()))?;
        imageio::check_writable(&d.join("00000.png")).map_err(|e| anyhow::anyhow!("--out-dir {}: {e}", d.display()))?;
    }
    let device = parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype, &device)?;
    let m = model::load(&a.model, &device, dtype)?;
    let sampler = a.sampler.sampler(&m.scheduler, &device)?;
    let (size, ch) = (model::sample_size(m.unet.config())?, m.unet.config().in_channels);
    let n_steps = sampler.timesteps().len();
    let bar = progress::bar((a.num.div_ceil(a.batch_size) * n_steps) as u64, "sample");
    let mut rng = NoiseRng::new(a.seed);
    let mut images = Vec::new();
    let mut frames = Vec::new();
    let start = Instant::now();
    let mut done = 0usize;
    while done < a.num {
        let b = a.batch_size.min(a.num - done);
        let shape = (b, ch, size, size);
        let record = a.animate.is_some() && done == 0;
        let every = (n_steps / 50).max(1);
        let x = generate::generate(&m.unet, &sampler, shape, dtype, &device, &mut rng, |i, x| {
            bar.inc(1);
            bar.set_message(format!("{:.2} img/s", (done + b * (i + 1) / n_steps) as f64 / start.elapsed().as_secs_f64()));
            if record && (i % every == 0 || i + 1 == n_steps) {
                frames.push(imageio::grid_image(x, imageio::grid_cols(b))?);
            }
            Ok(())
        })?;
        images.push(x);
        done += b;
    }
    bar.finish_and_clear();
    let all = Tensor::cat(&images, 0)?;
    eprintln!("{} images in {:.1} s ({:.2} img/s) from {}", a.num, start.elapsed().as_secs_f64(), a.num as f64 / start.elapsed().as_secs_f64(), m.origin);
    if let Some(p) = &a.out {
        imageio::save_grid_scaled(&all, a.scale, p)?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(d) = &a.out_dir {
        for i in 0..a.num {
            imageio::save_png(&imageio::single_image(&all.get(i)?)?, &d.join(format!("{i:05}.png")))?;
        }
        eprintln!("wrote {} images to {}", a.num, d.display());
    }
    if let Some(p) = &a.animate {
        imageio::save_gif(frames, 80, p)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
