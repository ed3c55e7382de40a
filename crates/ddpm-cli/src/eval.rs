//! `ddpm eval`: the negative log-likelihood bound of the DDPM paper (L_vlb in bits/dim, with the
//! discretized Gaussian decoder) of a model on a dataset's test split (`--metric nll`), or the
//! Frechet distance of its samples, or of a folder of images, to that split (`--metric fid`, see
//! [`crate::fid`]).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use ddpm_core::sampling::Scheduler;
use ddpm_core::{NoiseRng, NoiseSchedule};

use crate::data::{self, ImageSet, Split};
use crate::device::parse_device;
use crate::fid::{self, classifier::Classifier, FeatureNet};
use crate::generate::{self, SamplerArgs};
use crate::{model, progress};

/// What `ddpm eval` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Metric {
    /// The variational bound in bits/dim on the test split.
    Nll,
    /// The Frechet distance of generated images (or of --images) to the test split.
    Fid,
}

/// The network whose features the FID compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Features {
    /// The classifier for labelled one-channel data (MNIST, Fashion-MNIST), Inception otherwise.
    Auto,
    /// A classifier trained once on the data set's labelled training split (grey digits and the like).
    Classifier,
    /// Inception-v3's pool3 features, as the FID literature computes them (RGB data).
    Inception,
}

/// Options of `ddpm eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// nll (the bound on test images) or fid (the Frechet distance of samples to the test split).
    #[arg(long, value_enum, default_value = "nll")]
    pub metric: Metric,
    /// A model folder, a training checkpoint folder, or a Hub repo id (fid: whose samples are scored).
    #[arg(long, required_unless_present = "images")]
    pub model: Option<String>,
    /// fid: score the images of this folder instead of samples of --model.
    #[arg(long, conflicts_with = "model")]
    pub images: Option<PathBuf>,
    /// The dataset whose test split is scored (see `train --data`).
    #[arg(long, default_value = "mnist")]
    pub data: String,
    /// nll: test images scored (the first N) [default 64]; fid: images generated [default 500].
    #[arg(long)]
    pub num: Option<usize>,
    /// fid: the feature network.
    #[arg(long, value_enum, default_value = "auto")]
    pub features: Features,
    /// fid: Inception weights as safetensors (pytorch-fid's, converted by
    /// scripts/inception_weights_to_safetensors.py) [default: pt_inception-2015-12-05.safetensors in
    /// the cache folder].
    #[arg(long)]
    pub inception_weights: Option<PathBuf>,
    /// fid: the size image folders are read at (--data or --images folders) [default: the model's
    /// sample size, else 64].
    #[arg(long)]
    pub image_size: Option<usize>,
    /// fid: the sampler of the generated images.
    #[command(flatten)]
    pub sampler: SamplerArgs,
    /// fid: where the classifier and the reference statistics are cached [default: $DDPM_CACHE,
    /// else ~/.cache/ddpm-rs].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Images scored at once.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Seed of the noise (the Monte-Carlo terms of nll, the samples of fid).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Runs `ddpm eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    if a.num == Some(0) || a.batch_size == 0 {
        bail!("--num and --batch-size must be at least 1");
    }
    match a.metric {
        Metric::Nll => run_nll(a),
        Metric::Fid => {
            println!("{}", fid_report(&a)?);
            Ok(())
        }
    }
}

/// `--metric nll`: the bound on the first `--num` test images.
fn run_nll(a: EvalArgs) -> Result<()> {
    let Some(model) = &a.model else { bail!("--metric nll needs --model") };
    let device = parse_device(&a.device)?;
    let m = model::load(model, &device, DType::F32)?;
    let (size, ch) = (model::sample_size(m.unet.config())?, m.unet.config().in_channels);
    let mut set = data::load(&a.data, Split::Test, size, ch)?;
    if set.height != size || set.channels != ch {
        bail!("--data {}: images are {}x{} with {} channel(s); the model takes {size}x{size} with {ch}", a.data, set.height, set.width, set.channels);
    }
    set.truncate(a.num.unwrap_or(64));
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

/// The images `--metric fid` scores: `--images`, or `--num` samples of `--model`, at the reference
/// set's size and channels, rounded to 8 bits as written to PNG.
fn images_to_score(a: &EvalArgs, m: Option<&model::LoadedModel>, reference: &ImageSet, device: &Device) -> Result<(ImageSet, String)> {
    let (size, ch) = (reference.height, reference.channels);
    if let Some(dir) = &a.images {
        let set = data::load_image_folder(dir, size, ch)?;
        return Ok((set, dir.display().to_string()));
    }
    let Some(m) = m else { bail!("--metric fid needs --model or --images") };
    let (msize, mch) = (model::sample_size(m.unet.config())?, m.unet.config().in_channels);
    if (msize, mch) != (size, ch) {
        bail!("--data {}: test images are {size}x{size} with {ch} channel(s); the model makes {msize}x{msize} with {mch}", a.data);
    }
    let sampler = a.sampler.sampler(&m.scheduler, device)?;
    let num = a.num.unwrap_or(500);
    let bar = progress::bar((num.div_ceil(a.batch_size) * sampler.timesteps().len()) as u64, "sample");
    let mut rng = NoiseRng::new(a.seed);
    let mut pixels = Vec::with_capacity(num * ch * size * size);
    for start in (0..num).step_by(a.batch_size) {
        let b = a.batch_size.min(num - start);
        let x = generate::generate(&m.unet, &sampler, (b, ch, size, size), DType::F32, device, &mut rng, |_, _| {
            bar.inc(1);
            Ok(())
        })?;
        pixels.extend(fid::to_pixels(&x)?);
    }
    bar.finish_and_clear();
    let set = ImageSet { pixels, len: num, channels: ch, height: size, width: size, source: m.origin.clone(), labels: Vec::new() };
    Ok((set, m.origin.clone()))
}

/// `--metric fid`: the report (one JSON object) of the Frechet distance between the features of the generated images (or
/// `--images`) and those of the whole test split, with the classifier's test accuracy and the mean
/// confidence of its predictions on the scored images.
pub fn fid_report(a: &EvalArgs) -> Result<serde_json::Value> {
    let device = parse_device(&a.device)?;
    let cache = fid::cache_dir(a.cache_dir.as_deref())?;
    let start = Instant::now();
    // image folders are read at --image-size, else the model's size; 3 channels for Inception
    // what the user named is checked before the feature network (which may train for minutes)
    if let Some(dir) = a.images.as_ref().filter(|d| !d.is_dir()) {
        bail!("--images {}: no such folder", dir.display());
    }
    let m = a.model.as_ref().map(|spec| model::load(spec, &device, DType::F32)).transpose()?;
    let model_size = m.as_ref().map(|m| model::sample_size(m.unet.config())).transpose()?;
    let size = a.image_size.or(model_size).unwrap_or(64);
    let reference = data::load(&a.data, Split::Test, size, 3)?;
    let grey_and_labelled = reference.channels == 1 && reference.labels.len() == reference.len;
    let classifier = match a.features {
        Features::Classifier => true,
        Features::Auto => grey_and_labelled,
        Features::Inception => false,
    };
    let net = if classifier {
        FeatureNet::Classifier(Classifier::for_dataset(&a.data, &cache, &device)?)
    } else {
        FeatureNet::inception(&a.inception_weights.clone().unwrap_or_else(|| cache.join(fid::INCEPTION_FILE)), &device)?
    };
    let ref_stats = fid::reference_stats(&net, &reference, &cache, &device)?;
    let (images, origin) = images_to_score(a, m.as_ref(), &reference, &device)?;
    if images.len < 2 {
        bail!("{origin}: {} image(s); the FID needs at least 2 (and hundreds for a stable value)", images.len);
    }
    let scored = fid::score(&net, fid::set_batches(&images, &device))?;
    let distance = fid::frechet::frechet_distance(&scored.stats, &ref_stats)?;
    let round = |v: f64, d: f64| (v * d).round() / d;
    let mut report = serde_json::json!({
        "metric": "fid",
        "images": origin,
        "num": images.len,
        "data": a.data,
        "reference": format!("test split ({} images)", reference.len),
        "features": net.name(),
        "fid": round(distance, 1e3),
    });
    if let FeatureNet::Classifier(c) = &net {
        report["classifier_test_accuracy"] = round(c.test_accuracy, 1e4).into();
    }
    if let Some(conf) = scored.mean_confidence {
        report["mean_confidence"] = round(conf, 1e4).into();
    }
    report["seconds"] = round(start.elapsed().as_secs_f64(), 10.0).into();
    Ok(report)
}
