//! Launching the network's CUDA kernels (`src/ops/cuda/kernels.cu`, compiled to PTX by build.rs when
//! the `cuda` feature is on), through ddpm-core's launcher and helpers.
//!
//! The ops use them on every CUDA device unless `DDPM_CUDA_KERNELS=0` is set
//! ([`ddpm_core::ops::cuda_kernels_enabled`]), which gives candle's composed ops instead. `cargo test
//! -p ddpm-unet --features cuda --test gpu` on a CUDA machine compares every kernel with the CPU kernel
//! of the same op.

pub(crate) use ddpm_core::ops::cuda::{alloc_f32, elementwise, f32_view, per_block, wrap, zeros_f64};

/// The PTX of `kernels.cu`.
pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ddpm_unet_kernels.ptx"));

/// The name the module is cached under in each CUDA device.
pub(crate) const MODULE: &str = "ddpm_unet_kernels";

/// [`ddpm_core::launch_ptx!`] for this crate's kernels: launches kernel `$name` on `$dev` with
/// configuration `$cfg` and the arguments after the `;`, in the kernel's order.
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {
        ddpm_core::launch_ptx!($crate::ops::cuda::MODULE, $crate::ops::cuda::PTX, $dev, $name, $cfg; $($arg),*)
    };
}
pub(crate) use launch;
