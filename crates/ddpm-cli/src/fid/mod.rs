//! The Frechet distance of generated images to a data set's test split (FID), on the features of a
//! network: the trained classifier of a labelled grey data set ([`classifier`]), or Inception-v3 as
//! the FID literature uses it ([`crate::inception`]). The test split's statistics are cached.

pub mod classifier;
pub mod frechet;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

use crate::data::ImageSet;
use classifier::{fnv1a, fnv1a_set, Classifier, FNV_OFFSET};
use frechet::FeatureStats;

/// Images put through the feature network at once.
pub const FEATURE_BATCH: usize = 250;

/// The folder of cached classifiers and reference statistics: `--cache-dir`, else `$DDPM_CACHE`,
/// else `$XDG_CACHE_HOME/ddpm-rs`, else `~/.cache/ddpm-rs`; created if missing.
pub fn cache_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let dir = explicit
        .map(Path::to_path_buf)
        .or_else(|| env("DDPM_CACHE"))
        .or_else(|| env("XDG_CACHE_HOME").map(|p| p.join("ddpm-rs")))
        .or_else(|| env("HOME").map(|p| p.join(".cache/ddpm-rs")))
        .context("no cache folder: set DDPM_CACHE or give --cache-dir")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create the cache folder", dir.display()))?;
    Ok(dir)
}

/// The file name of the FID Inception weights in the cache folder, where `--inception-weights` looks
/// by default (`scripts/inception_weights_to_safetensors.py` writes it from pytorch-fid's weights).
pub const INCEPTION_FILE: &str = "pt_inception-2015-12-05.safetensors";

/// A network whose features the distance is taken on.
pub enum FeatureNet {
    /// The classifier trained on the data set (features of 128 values, and class probabilities).
    Classifier(Classifier),
    /// Inception-v3's 2048 pool3 features, with the key of its weights file.
    Inception(Box<crate::inception::Inception>, u64),
}

impl FeatureNet {
    /// Inception with the weights of `path` (safetensors, pytorch-fid's state-dict names); the
    /// statistics' cache key hashes the file's bytes.
    pub fn inception(path: &Path, device: &Device) -> Result<Self> {
        if !path.is_file() {
            bail!(
                "{}: no Inception weights; convert pytorch-fid's with scripts/inception_weights_to_safetensors.py and give the file with --inception-weights (or put it there)",
                path.display()
            );
        }
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let key = fnv1a(FNV_OFFSET, &bytes);
        drop(bytes);
        Ok(FeatureNet::Inception(Box::new(crate::inception::Inception::load(path, device)?), key))
    }
}

impl FeatureNet {
    /// Its name in the report.
    pub fn name(&self) -> &'static str {
        match self {
            FeatureNet::Classifier(_) => "classifier",
            FeatureNet::Inception(..) => "inception-v3",
        }
    }

    /// A key of the network's weights, part of the reference statistics' cache key.
    fn key(&self) -> u64 {
        match self {
            FeatureNet::Classifier(c) => c.key,
            FeatureNet::Inception(_, key) => *key,
        }
    }

    /// The features (N, d) of images x in [-1, 1], and the class probabilities where the network
    /// classifies.
    pub fn features(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            FeatureNet::Classifier(c) => {
                let (f, p) = c.features_and_probs(x)?;
                Ok((f, Some(p)))
            }
            // Inception takes [0, 1]: (x + 1) / 2
            FeatureNet::Inception(net, _) => Ok((net.features(&((x + 1.0)? * 0.5)?)?, None)),
        }
    }
}

/// The statistics of a set of images on a network's features, and the mean probability of the most
/// probable class (the confidence), where the network classifies.
pub struct SetScore {
    /// Mean and covariance of the features.
    pub stats: FeatureStats,
    /// Mean over images of max_k p(k | image).
    pub mean_confidence: Option<f64>,
}

/// Puts `batches` (images in [-1, 1]) through `net` and gathers their statistics.
pub fn score(net: &FeatureNet, batches: impl IntoIterator<Item = Result<Tensor>>) -> Result<SetScore> {
    let (mut values, mut dim) = (Vec::new(), 0);
    let (mut confidence, mut n, mut classifies) = (0f64, 0usize, false);
    for x in batches {
        let (f, p) = net.features(&x?)?;
        dim = f.dim(1)?;
        values.extend(f.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        n += f.dim(0)?;
        if let Some(p) = p {
            classifies = true;
            confidence += p.max(D::Minus1)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        }
    }
    let stats = FeatureStats::from_features(&values, dim)?;
    Ok(SetScore { stats, mean_confidence: classifies.then(|| confidence / n as f64) })
}

/// The batches of an image set, in order, as [-1, 1] tensors.
pub fn set_batches<'a>(set: &'a ImageSet, device: &'a Device) -> impl Iterator<Item = Result<Tensor>> + 'a {
    (0..set.len).step_by(FEATURE_BATCH).map(move |s| {
        let idx: Vec<usize> = (s..(s + FEATURE_BATCH).min(set.len)).collect();
        set.batch(&idx, &[], device)
    })
}

/// The 8-bit pixels of images in [-1, 1], as `ddpm sample` writes them to PNG:
/// u = clamp(round((x + 1) * 127.5), 0, 255). Generated images are scored as the files a user would
/// keep, and as `--images` scores them.
pub fn to_pixels(x: &Tensor) -> Result<Vec<u8>> {
    let u = ((x.to_dtype(DType::F32)? + 1.0)? * 127.5)?.round()?.clamp(0f32, 255f32)?;
    Ok(u.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?)
}

/// The statistics of `set` (the reference split) on `net`'s features, read from `cache` when they
/// were computed before for the same network and images, else computed and saved there.
pub fn reference_stats(net: &FeatureNet, set: &ImageSet, cache: &Path, device: &Device) -> Result<FeatureStats> {
    let key = fnv1a_set(fnv1a(FNV_OFFSET, &net.key().to_le_bytes()), set);
    let path = cache.join(format!("fid-stats-{}-{key:016x}.safetensors", net.name()));
    if path.is_file() {
        return load_stats(&path);
    }
    eprintln!("computing the reference statistics of {} ({} images); cached in {}", set.source, set.len, path.display());
    let stats = score(net, set_batches(set, device))?.stats;
    save_stats(&stats, &path)?;
    Ok(stats)
}

/// Writes statistics as safetensors: `mean` (d), `cov` (d, d) and `count` (1) in f64.
pub fn save_stats(s: &FeatureStats, path: &Path) -> Result<()> {
    let d = s.dim();
    let mean = Tensor::from_slice(s.mean.as_slice(), d, &Device::Cpu)?;
    // nalgebra stores column-major; the covariance is symmetric, so its transpose is the same matrix
    let cov = Tensor::from_slice(s.cov.as_slice(), (d, d), &Device::Cpu)?;
    let count = Tensor::from_slice(&[s.count as f64], 1, &Device::Cpu)?;
    let tensors = HashMap::from([("mean".to_string(), mean), ("cov".to_string(), cov), ("count".to_string(), count)]);
    ddpm_core::checkpoint::write_safetensors(path, &tensors, None).with_context(|| format!("{}: cannot save the statistics", path.display()))
}

/// Reads statistics written by [`save_stats`].
pub fn load_stats(path: &Path) -> Result<FeatureStats> {
    let t = candle_core::safetensors::load(path, &Device::Cpu).with_context(|| format!("{}: cannot read the cached statistics (delete it to recompute)", path.display()))?;
    let get = |k: &str| t.get(k).with_context(|| format!("{}: no `{k}` (delete it to recompute)", path.display()));
    let (mean, cov) = (get("mean")?.to_vec1::<f64>()?, get("cov")?.flatten_all()?.to_vec1::<f64>()?);
    let count = get("count")?.to_vec1::<f64>()?.first().copied().unwrap_or(0.0) as usize;
    let d = mean.len();
    if cov.len() != d * d {
        bail!("{}: `cov` is not {d}x{d} (delete it to recompute)", path.display());
    }
    Ok(FeatureStats { mean: nalgebra::DVector::from_vec(mean), cov: nalgebra::DMatrix::from_vec(d, d, cov), count, centred: None })
}
