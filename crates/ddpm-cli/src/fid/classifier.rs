//! A small convolutional classifier of a labelled data set (MNIST, Fashion-MNIST), the feature network
//! of the FID of small grey images, where Inception-v3 (trained on 299x299 photographs) is a poor judge.
//!
//! Layout, for C x S x S images (S divisible by 4), all 3x3 convolutions with padding 1:
//!
//! | layer | output | |
//! | --- | --- | --- |
//! | `conv1` C -> 32, ReLU | 32 x S x S | |
//! | `conv2` 32 -> 64, stride 2, ReLU | 64 x S/2 x S/2 | |
//! | `conv3` 64 -> 64, stride 2, ReLU | 64 x S/4 x S/4 | |
//! | `fc1` 64 S^2/16 -> 128, ReLU | 128 | the features of the FID |
//! | `fc2` 128 -> K | K logits | |
//!
//! It is trained once per data set, deterministically for a given machine and thread count (weights
//! from a seeded generator, batches in a seeded order, Adam), on the training split, and cached (see
//! [`super::cache_dir`]) under a key of the training images, labels and this layout
//! ([`CLASSIFIER_VERSION`]). Its accuracy on the test split is measured once and saved with it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use ddpm_core::optim::{AdamW, AdamWParams};
use ddpm_core::NoiseRng;
use ddpm_unet::ops::conv::conv2d;

use crate::data::{self, ImageSet};

/// The width of the feature vector (the output of `fc1`).
pub const FEATURE_DIM: usize = 128;
/// Changes with the layout or the training recipe, so that an older cached classifier is not reused.
pub const CLASSIFIER_VERSION: u32 = 1;
/// Images per training step (the whole set when it is smaller).
const BATCH: usize = 128;
/// Passes over the training split.
const EPOCHS: usize = 2;
/// Adam's learning rate.
const LR: f64 = 1e-3;
/// Seed of the initial weights and of the batch order.
const SEED: u64 = 2017;

/// The trained classifier and what is known of it.
pub struct Classifier {
    /// Weights by name (`conv1.weight`, ..., `fc2.bias`).
    weights: HashMap<String, Tensor>,
    /// Accuracy on the test split, measured after training.
    pub test_accuracy: f64,
    /// The cache file it was read from or written to.
    pub path: PathBuf,
    /// The key of its training data and recipe (part of the file name), for the reference statistics.
    pub key: u64,
}

/// The parameter names and shapes of the layout for `c` channels, `size` x `size` images and `k`
/// classes.
fn parameter_shapes(c: usize, size: usize, k: usize) -> Vec<(&'static str, Vec<usize>)> {
    let flat = 64 * (size / 4) * (size / 4);
    vec![
        ("conv1.weight", vec![32, c, 3, 3]),
        ("conv1.bias", vec![32]),
        ("conv2.weight", vec![64, 32, 3, 3]),
        ("conv2.bias", vec![64]),
        ("conv3.weight", vec![64, 64, 3, 3]),
        ("conv3.bias", vec![64]),
        ("fc1.weight", vec![FEATURE_DIM, flat]),
        ("fc1.bias", vec![FEATURE_DIM]),
        ("fc2.weight", vec![k, FEATURE_DIM]),
        ("fc2.bias", vec![k]),
    ]
}

/// The forward pass on images x in [-1, 1] (N, C, S, S): returns (features, logits).
fn forward(w: &dyn Fn(&str) -> Result<Tensor>, x: &Tensor) -> Result<(Tensor, Tensor)> {
    let conv = |x: &Tensor, name: &str, stride: usize| -> Result<Tensor> {
        Ok(conv2d(x, &w(&format!("{name}.weight"))?, Some(&w(&format!("{name}.bias"))?), stride, 1)?.relu()?)
    };
    let linear = |x: &Tensor, name: &str| -> Result<Tensor> {
        // y = x W^T + b
        Ok(x.matmul(&w(&format!("{name}.weight"))?.t()?)?.broadcast_add(&w(&format!("{name}.bias"))?)?)
    };
    let h = conv(&conv(&conv(x, "conv1", 1)?, "conv2", 2)?, "conv3", 2)?;
    let features = linear(&h.flatten_from(1)?, "fc1")?.relu()?;
    let logits = linear(&features, "fc2")?;
    Ok((features, logits))
}

/// FNV-1a (64-bit) of `bytes`, continuing from `h`: the cache keys.
pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The FNV-1a offset basis, the start of every key.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a of an image set's shape and pixels, continuing from `h`.
pub fn fnv1a_set(mut h: u64, set: &ImageSet) -> u64 {
    for v in [set.channels, set.height, set.width, set.len] {
        h = fnv1a(h, &(v as u64).to_le_bytes());
    }
    fnv1a(h, &set.pixels)
}

/// The cache key of a classifier trained on `train` by this recipe.
fn training_key(train: &ImageSet) -> u64 {
    let h = fnv1a_set(fnv1a(FNV_OFFSET, &CLASSIFIER_VERSION.to_le_bytes()), train);
    fnv1a(h, &train.labels)
}

/// The number of classes: the largest label plus one, at least 2.
fn num_classes(labels: &[u8]) -> usize {
    labels.iter().copied().max().map_or(2, |m| (m as usize + 1).max(2))
}

impl Classifier {
    /// The classifier of the data set `spec` (see `train --data`): read from `cache_dir` when a
    /// classifier of the same training split and recipe is there, else trained on the training split,
    /// measured on the test split and saved (through a temporary file). Needs labelled 1- or 3-channel
    /// images whose size is divisible by 4.
    pub fn for_dataset(spec: &str, cache_dir: &Path, device: &Device) -> Result<Self> {
        let train = data::load(spec, data::Split::Train, 28, 1)?;
        if train.labels.len() != train.len {
            bail!("--data {spec}: the training split has no labels (MNIST-style `train-labels-idx1-ubyte` or a parquet `label` column), which the classifier features need; use --features inception");
        }
        if train.height != train.width || !train.height.is_multiple_of(4) {
            bail!("--data {spec}: the classifier takes square images whose size is divisible by 4, not {}x{}", train.height, train.width);
        }
        let key = training_key(&train);
        let path = cache_dir.join(format!("classifier-v{CLASSIFIER_VERSION}-{key:016x}.safetensors"));
        let shapes = parameter_shapes(train.channels, train.height, num_classes(&train.labels));
        if path.is_file() {
            return Self::load(&path, key, &shapes, device);
        }
        let test = data::load(spec, data::Split::Test, train.height, train.channels)?;
        if test.labels.len() != test.len {
            bail!("--data {spec}: the test split has no labels, which the classifier's accuracy needs");
        }
        eprintln!("training the feature classifier of `{spec}` once ({} images, {EPOCHS} epochs); it is cached in {}", train.len, path.display());
        let weights = train_weights(&train, device)?;
        let mut c = Classifier { weights, test_accuracy: 0.0, path, key };
        c.test_accuracy = c.accuracy(&test, device)?;
        eprintln!("feature classifier: {:.2}% accuracy on the test split", c.test_accuracy * 100.0);
        c.save()?;
        Ok(c)
    }

    /// Reads a cached classifier, checking its tensors against the layout's `shapes`.
    fn load(path: &Path, key: u64, shapes: &[(&str, Vec<usize>)], device: &Device) -> Result<Self> {
        let weights = candle_core::safetensors::load(path, device).with_context(|| format!("{}: cannot read the cached classifier (delete it to retrain)", path.display()))?;
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let test_accuracy = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("test_accuracy")?.parse::<f64>().ok())
            .with_context(|| format!("{}: no test_accuracy in the metadata (delete it to retrain)", path.display()))?;
        let c = Classifier { weights, test_accuracy, path: path.to_path_buf(), key };
        for (name, shape) in shapes {
            if c.weight(name)?.dims() != shape.as_slice() {
                bail!("{}: `{name}` has shape {:?}, expected {shape:?} (delete it to retrain)", path.display(), c.weight(name)?.dims());
            }
        }
        Ok(c)
    }

    /// Writes the weights and the test accuracy to [`Classifier::path`] (a temporary name, then renamed).
    fn save(&self) -> Result<()> {
        let meta = HashMap::from([("test_accuracy".to_string(), self.test_accuracy.to_string()), ("version".to_string(), CLASSIFIER_VERSION.to_string())]);
        ddpm_core::checkpoint::write_safetensors(&self.path, &self.weights, Some(meta)).with_context(|| format!("{}: cannot save the classifier", self.path.display()))
    }

    fn weight(&self, name: &str) -> Result<Tensor> {
        self.weights.get(name).cloned().with_context(|| format!("{}: no tensor `{name}`", self.path.display()))
    }

    /// The features (N, 128) and class probabilities (N, K) of images x in [-1, 1] (N, C, S, S).
    pub fn features_and_probs(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (features, logits) = forward(&|n| self.weight(n), x)?;
        Ok((features, candle_nn::ops::softmax(&logits, D::Minus1)?))
    }

    /// The fraction of `set`'s images whose most probable class is their label.
    pub fn accuracy(&self, set: &ImageSet, device: &Device) -> Result<f64> {
        let mut pred = Vec::with_capacity(set.len);
        for x in super::set_batches(set, device) {
            let (_, probs) = self.features_and_probs(&x?)?;
            pred.extend(probs.argmax(D::Minus1)?.to_vec1::<u32>()?);
        }
        let correct = pred.iter().zip(&set.labels).filter(|(p, &l)| **p == l as u32).count();
        Ok(correct as f64 / set.len as f64)
    }
}

/// Trains the classifier's weights on `train`: seeded initial weights (PyTorch's default
/// U(-1/sqrt(fan_in), 1/sqrt(fan_in))), `EPOCHS` passes in seeded orders of batches of `BATCH`,
/// cross-entropy, Adam at `LR`.
pub fn train_weights(train: &ImageSet, device: &Device) -> Result<HashMap<String, Tensor>> {
    let k = num_classes(&train.labels);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    for (name, shape) in parameter_shapes(train.channels, train.height, k) {
        vb.get_with_hints(shape, name, candle_nn::Init::Const(0.0))?;
    }
    let mut rng = NoiseRng::new(SEED);
    crate::init::seeded_init(&varmap, &mut rng)?;
    let params = AdamWParams { lr: LR, weight_decay: 0.0, max_grad_norm: None, ..AdamWParams::default() };
    let mut opt = AdamW::from_varmap(&varmap, params)?;
    let vars: HashMap<String, Tensor> = opt.vars().iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let w = |n: &str| vars.get(n).cloned().with_context(|| format!("no parameter {n}"));
    if train.len == 0 {
        bail!("{}: no images to train the classifier on", train.source);
    }
    let batch = BATCH.min(train.len);
    for _ in 0..EPOCHS {
        let order = data::permutation(train.len, &mut rng);
        for idx in order.chunks_exact(batch) {
            let x = train.batch(idx, &[], device)?;
            let y = Tensor::from_iter(idx.iter().map(|&i| train.labels[i] as u32), device)?;
            let (_, logits) = forward(&w, &x)?;
            // cross-entropy: -mean_i log softmax(logits_i)[y_i]
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            opt.backward_step(&loss)?;
        }
    }
    Ok(vars.into_iter().map(|(n, t)| (n, t.detach())).collect())
}
