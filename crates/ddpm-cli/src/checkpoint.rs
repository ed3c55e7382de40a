//! The training checkpoints of `ddpm train`: ddpm-core's [`ddpm_core::checkpoint`] (a diffusers-style
//! model folder plus the exact-resume state, written to a temporary name and renamed), re-exported
//! under the path the command's modules have always used.

pub use ddpm_core::checkpoint::*;
