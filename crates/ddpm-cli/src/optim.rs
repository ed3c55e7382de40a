//! The optimizer, clipping, warm-up and EMA of `ddpm train`: ddpm-core's [`ddpm_core::optim`], re-exported
//! under the path the command's modules have always used.

pub use ddpm_core::optim::*;
