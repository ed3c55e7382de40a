//! A UNet and its scheduler as one object: the candle twin of diffusers' `DDPMPipeline` and
//! `DDIMPipeline`. It loads what diffusers saves (a pipeline folder with `model_index.json`, `unet/`
//! and `scheduler/`, or a model repo such as `google/ddpm-cifar10-32` with the UNet and
//! `scheduler_config.json` at its root), generates images in [0, 1] as the diffusers pipelines
//! return them, and saves a folder that diffusers loads.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use ddpm_unet::{DdpmPipeline, GenerateOptions};
//! # fn main() -> ddpm_unet::Result<()> {
//! let pipe = DdpmPipeline::from_pretrained("google/ddpm-cifar10-32", &Device::Cpu, DType::F32)?;
//! let images = pipe.generate(GenerateOptions::new(4).steps(50).seed(0))?; // (4, 3, 32, 32) in [0, 1]
//! ddpm_unet::images::save_pngs(&images, "samples", "cifar")?;
//! # Ok(()) }
//! ```
//!
//! The reverse process itself is ddpm-core's ([`ddpm_core::sampling::sample`]); the pipeline only
//! chooses its timesteps, eta and noise, and maps x_0 to [0, 1].

use std::cell::Cell;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ddpm_core::sampling::{self, Sampler, Scheduler};
use ddpm_core::{
    NoiseRng, NoiseSchedule, SchedulerClass, SchedulerConfig, StepOutput, StepPrecision,
};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::hub::{resolve_model_with, HubOptions};
use crate::load::{find_model_files, load_from_files, SCHEDULER_CONFIG_NAME};
use crate::unet::UNet2DModel;

/// File name of a pipeline folder's index of its components.
pub const MODEL_INDEX_NAME: &str = "model_index.json";
/// The `_class_name` of a pipeline that samples with a DDPMScheduler.
pub const DDPM_PIPELINE: &str = "DDPMPipeline";
/// The `_class_name` of a pipeline that samples with a DDIMScheduler.
pub const DDIM_PIPELINE: &str = "DDIMPipeline";

/// The diffusers pipeline class that samples with a scheduler of `class`: DDIMPipeline for
/// DDIMScheduler, DDPMPipeline for the others (its loop steps any scheduler, DPM-Solver included).
pub fn pipeline_class(class: SchedulerClass) -> &'static str {
    match class {
        SchedulerClass::Ddpm | SchedulerClass::DpmSolverMultistep => DDPM_PIPELINE,
        SchedulerClass::Ddim => DDIM_PIPELINE,
    }
}

/// What [`DdpmPipeline::generate`] makes: how many images, with how many steps, from which noise.
///
/// Built with [`GenerateOptions::new`] and the builder methods, or as a struct literal with
/// `..Default::default()`.
#[derive(Default)]
pub struct GenerateOptions<'a> {
    /// Number of images N (default 1 through [`GenerateOptions::new`]; 0 is an error).
    pub num_images: usize,
    /// Denoising steps; `None` takes diffusers' pipeline defaults: every training step (1000) for
    /// DDPM, 50 for DDIM.
    pub steps: Option<usize>,
    /// Seed of the [`NoiseRng`] that draws x_T and each step's noise (ignored where both are given).
    pub seed: u64,
    /// DDIM's eta: 0 is deterministic, 1 adds DDPM's posterior noise. Must be 0 for DDPM.
    pub eta: f64,
    /// The initial noise x_T, shape (N, C, H, W), instead of a draw from the seed (it is scaled by
    /// the scheduler's `init_noise_sigma`, 1 for DDPM and DDIM).
    pub noise: Option<Tensor>,
    /// The standard-normal noise of every step, shape (steps, N, C, H, W), entry i for the i-th
    /// timestep; a step that adds no noise (DDPM's last, DDIM's with eta 0) ignores its entry.
    pub step_noise: Option<Tensor>,
    /// Called after each step with (steps done, total steps).
    pub progress: Option<&'a mut dyn FnMut(usize, usize)>,
}

impl<'a> GenerateOptions<'a> {
    /// `num_images` images with the pipeline's default steps, seed 0, eta 0, noise from the seed.
    pub fn new(num_images: usize) -> Self {
        Self {
            num_images,
            ..Default::default()
        }
    }

    /// Sets the number of denoising steps.
    pub fn steps(mut self, steps: usize) -> Self {
        self.steps = Some(steps);
        self
    }

    /// Sets the seed of the noise.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets DDIM's eta.
    pub fn eta(mut self, eta: f64) -> Self {
        self.eta = eta;
        self
    }

    /// Starts from the given x_T (N, C, H, W) instead of drawing it.
    pub fn noise(mut self, noise: Tensor) -> Self {
        self.noise = Some(noise);
        self
    }

    /// Uses the given noise (steps, N, C, H, W) in the steps instead of drawing it.
    pub fn step_noise(mut self, noise: Tensor) -> Self {
        self.step_noise = Some(noise);
        self
    }

    /// Reports progress to `f(steps done, total)` after each step.
    pub fn progress(mut self, f: &'a mut dyn FnMut(usize, usize)) -> Self {
        self.progress = Some(f);
        self
    }
}

impl std::fmt::Debug for GenerateOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerateOptions")
            .field("num_images", &self.num_images)
            .field("steps", &self.steps)
            .field("seed", &self.seed)
            .field("eta", &self.eta)
            .field("noise", &self.noise.as_ref().map(|t| t.dims().to_vec()))
            .field(
                "step_noise",
                &self.step_noise.as_ref().map(|t| t.dims().to_vec()),
            )
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// A scheduler whose steps take their noise from a given (steps, N, C, H, W) tensor, entry i for the
/// i-th step, instead of from the generator: how a caller replays another implementation's noise.
struct InjectedNoise<'s> {
    inner: &'s Sampler,
    noise: Tensor,
    next: Cell<usize>,
}

impl Scheduler for InjectedNoise<'_> {
    fn timesteps(&self) -> &[usize] {
        self.inner.timesteps()
    }
    fn step(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> ddpm_core::Result<StepOutput> {
        self.inner.step(model_output, t, sample, noise)
    }
    fn step_with_rng(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        _rng: &mut NoiseRng,
    ) -> ddpm_core::Result<StepOutput> {
        let i = self.next.replace(self.next.get() + 1);
        let z = self
            .noise
            .get(i)?
            .to_dtype(sample.dtype())?
            .to_device(sample.device())?;
        self.inner.step(model_output, t, sample, Some(&z))
    }
    fn schedule(&self) -> &NoiseSchedule {
        self.inner.schedule()
    }
    fn init_noise_sigma(&self) -> f64 {
        self.inner.init_noise_sigma()
    }
    fn reset(&self) {
        self.inner.reset()
    }
}

/// A UNet and the scheduler that samples from it: diffusers' `DDPMPipeline` (ancestral sampling)
/// or `DDIMPipeline`, by the scheduler's class.
#[derive(Debug, Clone)]
pub struct DdpmPipeline {
    unet: UNet2DModel,
    sampler: Sampler,
}

impl DdpmPipeline {
    /// A pipeline from a loaded UNet and a scheduler (e.g. [`Sampler::from_config`]), for models
    /// without a scheduler config. [`DdpmPipeline::generate`] uses the sampler's class and config;
    /// its steps and eta come from the [`GenerateOptions`].
    pub fn from_parts(unet: UNet2DModel, sampler: Sampler) -> Self {
        Self { unet, sampler }
    }

    /// Loads a pipeline from a local folder or a Hub repo id (cache first, network unless
    /// `HF_HUB_OFFLINE`), with [`HubOptions::from_env`]; see [`DdpmPipeline::from_pretrained_with`].
    pub fn from_pretrained(folder_or_repo_id: &str, device: &Device, dtype: DType) -> Result<Self> {
        Self::from_pretrained_with(folder_or_repo_id, device, dtype, &HubOptions::from_env())
    }

    /// Loads a pipeline with explicit Hub options. Where there is a `model_index.json`, its `unet`
    /// and `scheduler` entries name the subfolders and classes (`DDIMPipeline` samples with DDIM
    /// whatever the scheduler's class, as diffusers converts it); otherwise the model-repo layout is
    /// read: `config.json` and the weights at the root (or in `unet/`), `scheduler_config.json`
    /// beside them (or in `scheduler/`), the scheduler class by its `_class_name`. Fields of the
    /// scheduler config that no scheduler reads are named in one warning on stderr. A model without a
    /// scheduler config is an error ([`Error::MissingScheduler`]); use [`DdpmPipeline::from_parts`].
    pub fn from_pretrained_with(
        folder_or_repo_id: &str,
        device: &Device,
        dtype: DType,
        opts: &HubOptions,
    ) -> Result<Self> {
        let files = resolve_model_with(folder_or_repo_id, opts)?;
        let as_dir = Path::new(folder_or_repo_id);
        // the folder that holds model_index.json in the pipeline layout
        let root: PathBuf = if as_dir.is_dir() {
            as_dir.to_path_buf()
        } else {
            let unet_dir = files.unet_dir();
            match unet_dir.file_name() {
                Some(n) if n == "unet" => unet_dir.parent().unwrap_or(unet_dir).to_path_buf(),
                _ => unet_dir.to_path_buf(),
            }
        };
        let index_path = root.join(MODEL_INDEX_NAME);
        // a Hub pipeline repo (UNet in unet/) whose model_index.json is not cached yet
        #[cfg(feature = "hub")]
        if !as_dir.is_dir() && !index_path.is_file() && files.unet_dir().ends_with("unet") {
            fetch_model_index(folder_or_repo_id, opts);
        }
        if index_path.is_file() {
            return Self::from_pipeline_folder(&root, &index_path, device, dtype);
        }
        let unet = load_from_files(&files.config, &files.weights, device, dtype)?;
        let Some(sched_path) = files.scheduler_config else {
            let looked_for = [
                root.join(SCHEDULER_CONFIG_NAME),
                root.join("scheduler").join(SCHEDULER_CONFIG_NAME),
            ]
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
            return Err(Error::MissingScheduler {
                what: folder_or_repo_id.to_string(),
                looked_for,
            });
        };
        let config = read_scheduler_config(&sched_path)?;
        let sampler = Sampler::from_config(&config, device)?;
        Ok(Self { unet, sampler })
    }

    /// Loads the pipeline layout: `model_index.json` names the pipeline class, the UNet's and the
    /// scheduler's subfolders (the entry keys) and classes.
    fn from_pipeline_folder(
        root: &Path,
        index_path: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::Io {
            path: index_path.into(),
            source: e,
        })?;
        let index: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: index_path.into(),
            source: e,
        })?;
        let bad = |field: &str, reason: String| Error::ModelIndex {
            path: index_path.into(),
            field: field.into(),
            reason,
        };
        let pipeline = index
            .get("_class_name")
            .and_then(Value::as_str)
            .unwrap_or(DDPM_PIPELINE);
        if pipeline != DDPM_PIPELINE && pipeline != DDIM_PIPELINE {
            return Err(bad(
                "_class_name",
                format!(
                    "`{pipeline}` is not supported; expected {DDPM_PIPELINE} or {DDIM_PIPELINE}"
                ),
            ));
        }
        // an entry `"name": ["library", "Class"]`: the component lives in the subfolder `name`
        let class_of = |field: &str| -> Result<String> {
            match index
                .get(field)
                .and_then(Value::as_array)
                .map(|a| a.as_slice())
            {
                Some([_, Value::String(class)]) => Ok(class.clone()),
                Some(_) => Err(bad(field, "expected [\"diffusers\", CLASS]".into())),
                None => Err(bad(
                    field,
                    "missing; a DDPM pipeline needs `unet` and `scheduler`".into(),
                )),
            }
        };
        let unet_class = class_of("unet")?;
        if unet_class != "UNet2DModel" {
            return Err(bad(
                "unet",
                format!("class `{unet_class}` is not supported; expected UNet2DModel"),
            ));
        }
        let sched_class = class_of("scheduler")?;
        let class: SchedulerClass = sched_class.parse().map_err(|_| {
            bad(
                "scheduler",
                format!(
                    "class `{sched_class}` is not supported; expected one of {}",
                    SchedulerClass::NAMES.join(", ")
                ),
            )
        })?;
        // DDIMPipeline.__init__ turns any scheduler into a DDIMScheduler with the same config
        let class = if pipeline == DDIM_PIPELINE {
            SchedulerClass::Ddim
        } else {
            class
        };
        let files = find_model_files(root.join("unet"))?;
        let unet = load_from_files(&files.config, &files.weights, device, dtype)?;
        let sched_path = root.join("scheduler").join(SCHEDULER_CONFIG_NAME);
        if !sched_path.is_file() {
            return Err(Error::MissingScheduler {
                what: root.display().to_string(),
                looked_for: sched_path.display().to_string(),
            });
        }
        let config = read_scheduler_config(&sched_path)?;
        let sampler = Sampler::from_config(
            &SchedulerConfig {
                class_name: class,
                ..config
            },
            device,
        )?;
        Ok(Self { unet, sampler })
    }

    /// Chooses how the scheduler's step coefficients are computed: [`StepPrecision::F64`] (the
    /// default) or [`StepPrecision::DiffusersF32`], diffusers' float32 arithmetic, to reproduce its
    /// numbers to the last bits.
    pub fn with_precision(mut self, precision: StepPrecision) -> Self {
        self.sampler = self.sampler.with_precision(precision);
        self
    }

    /// The UNet.
    pub fn unet(&self) -> &UNet2DModel {
        &self.unet
    }

    /// The scheduler, as loaded (all training timesteps, eta 0 until a call sets them).
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// The diffusers class of this pipeline: DDPMPipeline or DDIMPipeline.
    pub fn class_name(&self) -> &'static str {
        pipeline_class(self.sampler.class_name())
    }

    /// The shape (C, H, W) of the images: the UNet's `in_channels` (the channels of x_T, as
    /// diffusers' pipelines take them) by `sample_size` squared.
    pub fn image_shape(&self) -> Result<(usize, usize, usize)> {
        let c = self.unet.config();
        let size = c.sample_size.ok_or_else(|| {
            Error::config(
                "sample_size",
                "null",
                "the UNet config needs the image side to generate images",
            )
        })?;
        Ok((c.in_channels, size, size))
    }

    /// The sampler of one call: the pipeline's class and config with the options' steps and eta.
    fn sampler_for(&self, steps: Option<usize>, eta: f64) -> Result<Sampler> {
        if steps == Some(0) {
            return Err(Error::InvalidArgument(
                "steps = 0: sampling needs at least one denoising step".into(),
            ));
        }
        let mut sampler = self.sampler.clone();
        match &mut sampler {
            Sampler::Ddim(d) => {
                d.set_eta(eta)?;
                // DDIMPipeline's default num_inference_steps
                d.set_timesteps(steps.unwrap_or(50))?;
            }
            other => {
                if eta != 0.0 {
                    return Err(Error::InvalidArgument(format!(
                        "eta = {eta}: only DDIM takes eta; this is a {}",
                        self.class_name()
                    )));
                }
                match steps {
                    Some(n) => other.set_timesteps(n)?,
                    // DDPMPipeline's default: every training step
                    None => other.set_timesteps(other.config().num_train_timesteps)?,
                }
            }
        }
        Ok(sampler)
    }

    /// Generates `num_images` images (N, C, H, W), f32 in [0, 1] on the UNet's device, as diffusers'
    /// pipeline returns them: x_T ~ N(0, I) (or the given noise), the scheduler's reverse steps with
    /// the UNet as noise predictor, then `(x_0 / 2 + 0.5).clamp(0, 1)`.
    pub fn generate(&self, opts: GenerateOptions<'_>) -> Result<Tensor> {
        let GenerateOptions {
            num_images,
            steps,
            seed,
            eta,
            noise,
            step_noise,
            mut progress,
        } = opts;
        let sampler = self.sampler_for(steps, eta)?;
        let (c, h, w) = self.image_shape()?;
        let shape = [num_images, c, h, w];
        let device = self.unet.device().clone();
        let dtype = self.unet.dtype();
        // one generator for x_T and then the steps, as sample_from_shape and diffusers' generator
        let mut rng = NoiseRng::new(seed);
        let z = match noise {
            Some(z) if z.dims() != shape => {
                return Err(Error::InvalidArgument(format!(
                    "noise has shape {:?}; the pipeline makes {shape:?}",
                    z.dims()
                )))
            }
            Some(z) => z.to_dtype(dtype)?.to_device(&device)?,
            None if num_images == 0 => {
                return Err(Error::InvalidArgument(
                    "num_images = 0: nothing to generate".into(),
                ))
            }
            None => rng.randn(shape.as_slice(), dtype, &device)?,
        };
        // x_T = init_noise_sigma z
        let x_t = (z * sampler.init_noise_sigma())?;
        let total = sampler.timesteps().len();
        let mut report = |i: usize, _t: usize, _x: &Tensor| {
            if let Some(f) = progress.as_mut() {
                f(i + 1, total)
            }
        };
        let x0 = match step_noise {
            None => sampling::sample(&self.unet, &sampler, x_t, &mut rng, &mut report)?,
            Some(z) => {
                let want = [&[total][..], &shape[..]].concat();
                if z.dims() != want.as_slice() {
                    return Err(Error::InvalidArgument(format!(
                        "step_noise has shape {:?}; {total} steps of {shape:?} need {want:?}",
                        z.dims()
                    )));
                }
                let injected = InjectedNoise {
                    inner: &sampler,
                    noise: z,
                    next: Cell::new(0),
                };
                sampling::sample(&self.unet, &injected, x_t, &mut rng, &mut report)?
            }
        };
        crate::images::to_unit_range(&x0)
    }

    /// Writes a folder that diffusers loads with `DDPMPipeline.from_pretrained(dir)` (or
    /// `DDIMPipeline`, by the scheduler's class) and [`DdpmPipeline::from_pretrained`] reads back:
    /// `model_index.json`, `unet/` (config.json, diffusion_pytorch_model.safetensors) and
    /// `scheduler/scheduler_config.json`. Files already in `dir` under other names are left alone.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        for sub in ["unet", "scheduler"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|e| Error::Io { path: p, source: e })?;
        }
        self.unet.save_pretrained(dir.join("unet"))?;
        let class = self.sampler.class_name();
        let config = SchedulerConfig {
            class_name: class,
            ..self.sampler.config().clone()
        };
        config.to_file(dir.join("scheduler").join(SCHEDULER_CONFIG_NAME))?;
        let index = json!({
            "_class_name": pipeline_class(class),
            "_diffusers_version": ddpm_core::config::DIFFUSERS_VERSION,
            "scheduler": ["diffusers", class.as_str()],
            "unet": ["diffusers", "UNet2DModel"]
        });
        let index_path = dir.join(MODEL_INDEX_NAME);
        let text = serde_json::to_string_pretty(&index).map_err(|e| Error::Json {
            path: index_path.clone(),
            source: e,
        })?;
        std::fs::write(&index_path, text + "\n").map_err(|e| Error::Io {
            path: index_path,
            source: e,
        })
    }
}

/// Downloads a Hub repo's `model_index.json` into the cache beside its other files, when the network
/// may be used; a repo without one (or no network) is read in the model-repo layout.
#[cfg(feature = "hub")]
fn fetch_model_index(repo_id: &str, opts: &HubOptions) {
    if opts.offline {
        return;
    }
    if let (Ok((owner, name)), Ok(client)) = (
        crate::hub::parse_repo_id(repo_id),
        crate::hub::client(&opts.cache_dir),
    ) {
        let _ = client
            .model(owner, name)
            .download_file()
            .filename(MODEL_INDEX_NAME)
            .send();
    }
}

/// Reads a `scheduler_config.json`, printing its warning about fields no scheduler reads once.
fn read_scheduler_config(path: &Path) -> Result<SchedulerConfig> {
    let (config, unknown) = SchedulerConfig::from_file_checked(path)?;
    if let Some(w) = unknown.warning() {
        eprintln!("{w}");
    }
    Ok(config)
}
