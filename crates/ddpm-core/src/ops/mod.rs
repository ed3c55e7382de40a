//! Fused operations with analytic backward passes and multi-threaded CPU kernels, for the ops that
//! dominate a UNet's training step. Each falls back to the composed candle ops it replaces on devices
//! and dtypes that it has no kernel for, so the same code runs everywhere.

pub mod attention;
pub mod conv;
pub mod ddpm_step;
pub mod group_norm;
pub(crate) mod matmul;
pub mod mse;
pub mod optim;

pub use attention::{attention, attention_composed};
pub use group_norm::{group_norm, group_norm_composed};
pub use mse::{weighted_mse, weighted_mse_composed};

use candle_core::{CpuStorage, Layout, Result};

/// The f32 values of a contiguous CPU storage, or an error naming the op and the argument.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: {what} must be a contiguous f32 tensor"),
    }
}

/// [`f32_slice`] for a storage written in place.
pub(crate) fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str, what: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{op}: {what} must be a contiguous f32 tensor"),
    }
}
