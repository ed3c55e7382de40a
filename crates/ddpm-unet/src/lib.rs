//! # ddpm-unet
//!
//! The time-embedded UNet of Denoising Diffusion Probabilistic Models (Ho, Jain and Abbeel, 2020) on
//! candle, weight-compatible with diffusers' `UNet2DModel`: it reads and writes diffusers'
//! `config.json` and `diffusion_pytorch_model.safetensors` (or the pickled `.bin` of older repos),
//! loads `google/ddpm-*` models from the Hugging Face Hub (cache first), and matches diffusers'
//! outputs to about 1e-5 in f32.
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! let dev = Device::Cpu;
//! let unet = ddpm_unet::from_pretrained("google/ddpm-cifar10-32", &dev, DType::F32)?;
//! let x = Tensor::randn(0f32, 1., (1, 3, 32, 32), &dev)?;
//! let t = Tensor::new(&[999i64], &dev)?;
//! let eps = unet.forward(&x, &t)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! To sample as diffusers' `DDPMPipeline` / `DDIMPipeline` do, load the UNet with its scheduler as a
//! [`DdpmPipeline`] and write the images with [`images::save_pngs`]:
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use ddpm_unet::{images, DdpmPipeline, GenerateOptions};
//! let pipe = DdpmPipeline::from_pretrained("google/ddpm-cifar10-32", &Device::Cpu, DType::F32)?;
//! let imgs = pipe.generate(GenerateOptions::new(4).steps(50).seed(0))?; // (4, 3, 32, 32) in [0, 1]
//! images::save_pngs(&imgs, "samples", "cifar")?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! To train, build it on a [`candle_nn::VarMap`] ([`UNet2DModel::new_trainable`]), optimise
//! `varmap.all_vars()`, use [`UNet2DModel::forward_train`] for dropout, and
//! [`UNet2DModel::save_pretrained`] to write a diffusers-loadable folder.

#![warn(missing_docs)]

pub mod attention;
pub mod blocks;
pub mod config;
pub mod embedding;
pub mod error;
pub mod hub;
pub mod images;
pub mod load;
pub mod nn;
pub mod ops;
pub mod pipeline;
pub mod presets;
pub mod resnet;
pub mod torch_pickle;
pub mod unet;

pub use config::{DownBlockType, UNetConfig, UpBlockType};
pub use error::{Error, Result};
pub use hub::{
    from_pretrained, from_pretrained_with, resolve_model, resolve_model_with, HubOptions,
};
pub use load::{load_dir, load_from_files, save_pretrained, save_varmap, ModelFiles};
pub use pipeline::{DdpmPipeline, GenerateOptions};
pub use presets::{preset, PRESET_NAMES};
pub use unet::{count_parameters, expected_tensors, UNet2DModel};
