//! Launching the network's Metal kernels (`src/ops/metal/kernels.metal`), with the `metal` feature,
//! through ddpm-core's launcher, which compiles them after its prelude (the block size and the
//! threadgroup reductions) once per device.
//!
//! Opt-in: the ops use them on a Metal device only when `DDPM_METAL_KERNELS=1` is set
//! ([`ddpm_core::ops::metal_kernels_enabled`]). They are f32 only: for f16 and bf16, group norm, the
//! dropout mask, the column convolution and attention's softmax run them between casts.

use candle_core::{MetalDevice, Result};
use ddpm_core::ops::metal::Kernels;

pub(crate) use ddpm_core::ops::metal::{alloc_f32, count, f32_buffer, ulong_words, uint, wrap, Arg, Grid};

/// This crate's kernels.
static NETWORK: Kernels = Kernels { name: "ddpm-unet", source: include_str!("metal/kernels.metal") };

/// Encodes this crate's kernel `name` on `dev`'s current command buffer with `args` (in
/// `[[buffer(i)]]` order) over `grid` ([`ddpm_core::ops::metal::launch_in`]).
pub(crate) fn launch(dev: &MetalDevice, name: &'static str, grid: Grid, args: &[Arg]) -> Result<()> {
    ddpm_core::ops::metal::launch_in(dev, &NETWORK, name, grid, args)
}
