//! Fused operations with analytic backward passes and multi-threaded CPU kernels, for the ops that
//! dominate a UNet's training step. Each falls back to the composed candle ops it replaces on devices
//! and dtypes that it has no kernel for, so the same code runs everywhere.

pub mod conv;
pub mod ddpm_step;
pub mod group_norm;
pub mod mse;
pub mod optim;

pub use group_norm::{group_norm, group_norm_composed};
pub use mse::{weighted_mse, weighted_mse_composed};
