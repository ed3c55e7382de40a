//! # ddpm-core
//!
//! The diffusion process of Denoising Diffusion Probabilistic Models (Ho, Jain and Abbeel, 2020) on
//! candle, independent of any network: noise schedules, the forward process q(x_t | x_0), training
//! losses, the variational bound, and the reverse process (DDPM ancestral sampling, DDIM and
//! DPM-Solver++ multistep), numerically matched against diffusers.
//!
//! A network plugs in through the [`NoisePredictor`] trait; randomness comes from a caller-owned
//! [`NoiseRng`] so runs repeat bit for bit. A diffusers `scheduler_config.json` builds the scheduler
//! its `_class_name` names (DDPMScheduler, DDIMScheduler or DPMSolverMultistepScheduler, every field
//! honoured or refused with an error naming it) through
//! [`SchedulerConfig::from_file_checked`] and [`Sampler::from_config`].
//!
//! Training is a library too: [`training_loss`] runs the predictor's training forward
//! ([`NoisePredictor::predict_train`], dropout from the caller's generator), [`optim::AdamW`] is a
//! `candle_nn::Optimizer` with global-norm clipping and savable moments, [`optim::Ema`] averages the
//! weights, and [`checkpoint`] saves and restores a run exactly (ddpm-unet's `train_mnist` example).
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use ddpm_core::{sample_from_shape, DdimScheduler, NoiseRng, SchedulerConfig};
//!
//! # fn main() -> ddpm_core::Result<()> {
//! let device = Device::Cpu;
//! let config = SchedulerConfig::default();
//! let mut ddim = DdimScheduler::new(&config, &device)?.with_eta(0.0)?;
//! ddim.set_timesteps(50)?;
//! // Any closure (x_t, t) -> noise is a predictor; a real one would be a UNet.
//! let predictor = |x: &Tensor, _t: &Tensor| x.zeros_like();
//! let mut rng = NoiseRng::new(0);
//! let x0 = sample_from_shape(&predictor, &ddim, (4, 3, 32, 32), DType::F32, &device, &mut rng, |_, _, _| {})?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod error;
pub mod loss;
pub mod ops;
pub mod optim;
pub mod predictor;
pub mod rng;
pub mod sampling;
pub mod schedule;
pub mod timesteps;
pub mod vlb;

pub use config::{
    BetaSchedule, DpmAlgorithmType, DpmSolverOptions, DpmSolverType, FinalSigmasType, PredictionType, SchedulerClass, SchedulerConfig,
    TimestepSpacing, UnknownFields, VarianceType,
};
pub use ddim::DdimScheduler;
pub use ddpm::{DdpmScheduler, StepCoefficients, StepOutput, StepPrecision};
pub use dpm_solver::DpmSolverMultistepScheduler;
pub use error::{Error, Result};
pub use loss::{simple_loss, training_loss, LossWeighting, TrainingLoss};
pub use optim::{AdamW, AdamWParams, Ema};
pub use predictor::{ModulePredictor, NoisePredictor, TimeModule};
pub use rng::NoiseRng;
pub use sampling::{sample, sample_from_shape, Sampler, Scheduler};
pub use schedule::{Gaussian, NoiseSchedule};
pub use timesteps::{dpm_solver_timesteps, inference_timesteps};
pub use vlb::{nll_bits_per_dim, prior_bpd, vlb_terms, NllOutput};
