//! Fused operations with analytic backward passes and multi-threaded CPU kernels, for the ops that
//! dominate a UNet's training step. Each falls back to the composed candle ops it replaces on devices
//! and dtypes that it has no kernel for, so the same code runs everywhere.
//!
//! With the `cuda` feature, group norm (+SiLU), the loss, the DDPM step, AdamW and the EMA also have
//! CUDA kernels (`ops/cuda/kernels.cu`), used when [`cuda_kernels_enabled`]; so does the convolution,
//! as im2col and col2im kernels around candle's (cuBLAS) matrix products (`ops/columns.rs`), so that
//! its gradient runs no transposed convolution; attention as cuBLAS products around a fused softmax
//! with its analytic backward (`ops/softmax.rs`).
//!
//! With the `metal` feature the same f32 kernels, the convolution's im2col and col2im included, exist
//! in Metal (`ops/metal/kernels.metal`), opt-in with `DDPM_METAL_KERNELS=1` ([`metal_kernels_enabled`]): they
//! have run in a CPU emulation (`scripts/check_metal.sh`), not yet on Apple hardware. Without it,
//! Metal takes the composed ops.

/// Defines `fn $name(args) body` twice, once compiled for AVX2, and calls the AVX2 copy when the CPU
/// has it (8-wide lanes then take one instruction instead of two). Same results either way: the
/// compiler fuses or reorders no floating-point operation. The function returns nothing.
macro_rules! with_avx2 {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $body
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body
        }
    };
}

pub mod attention;
pub(crate) mod columns;
pub mod conv;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "metal")]
pub(crate) mod metal;
pub mod ddpm_step;
pub mod dropout;
pub(crate) mod direct_conv;
pub mod group_norm;
pub(crate) mod matmul;
pub mod mse;
pub mod optim;
pub mod softmax;
pub(crate) mod upsample_conv;
pub(crate) mod winograd;

pub use attention::{attention, attention_composed};
pub use dropout::{dropout, dropout_mask};
pub use group_norm::{group_norm, group_norm_backward, group_norm_composed};
pub use mse::{weighted_mse, weighted_mse_composed};
pub use softmax::softmax_last_dim;

use candle_core::{CpuStorage, Device, Layout, Result};

/// Whether the fused ops run their own CUDA kernels on `device`: in a build with the `cuda` feature,
/// on a CUDA device, unless `DDPM_CUDA_KERNELS=0` is in the environment (read once), which makes CUDA
/// tensors take candle's composed ops instead (about 3x slower to train: `scripts/gpu_check.sh`).
pub fn cuda_kernels_enabled(device: &Device) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    cfg!(feature = "cuda") && device.is_cuda() && *ENABLED.get_or_init(|| !std::env::var("DDPM_CUDA_KERNELS").is_ok_and(|v| v == "0"))
}

/// Whether the fused ops run their own Metal kernels on `device`: in a build with the `metal` feature,
/// on a Metal device, when `DDPM_METAL_KERNELS=1` is in the environment (read once). Opt-in until
/// they have run on Apple hardware; otherwise Metal tensors take candle's composed ops.
pub fn metal_kernels_enabled(device: &Device) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    cfg!(feature = "metal") && device.is_metal() && *ENABLED.get_or_init(|| std::env::var("DDPM_METAL_KERNELS").is_ok_and(|v| v == "1"))
}

/// Whether the fused ops have a kernel for tensors on `device`: the CPU, CUDA when
/// [`cuda_kernels_enabled`], Metal when [`metal_kernels_enabled`].
pub(crate) fn fused_device(device: &Device) -> bool {
    device.is_cpu() || cuda_kernels_enabled(device) || metal_kernels_enabled(device)
}

/// The sum of `values` in 16 interleaved partial sums (lane l adds values l, l + 16, ...), then the
/// lanes and the tail: independent additions that vectorise, where a plain `iter().sum()` waits for
/// each addition before the next (a fixed order too, so the result does not depend on threads).
pub(crate) fn sum_in_lanes(values: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = values.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The f32 values of a contiguous CPU storage, or an error naming the op and the argument (for the
/// `cpu_fwd` of a custom op).
pub fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str, what: &str) -> Result<&'a [f32]> {
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
