//! The network's fused operations, with analytic backward passes and multi-threaded CPU kernels, for
//! the ops that dominate a UNet's training step: the convolution ([`conv`]), group norm (+SiLU),
//! attention and its softmax, dropout. Each falls back to the composed candle ops it replaces on
//! devices and dtypes that it has no kernel for, so the same code runs everywhere.
//!
//! With the `cuda` feature, group norm, the softmax and dropout also have CUDA kernels
//! (`ops/cuda/kernels.cu`), used when [`cuda_kernels_enabled`]; the convolution runs through cuDNN,
//! loaded at run time (`ops/cudnn.rs`, `ops/cudnn_conv.rs`), or where cuDNN is missing as im2col and
//! col2im kernels around candle's (cuBLAS) matrix products (`ops/columns.rs`), so that its gradient
//! runs no transposed convolution; attention runs as cuBLAS products around the fused softmax with its
//! analytic backward (`ops/softmax.rs`), in training as one graph node that recomputes the
//! probabilities in its backward (`ops/attention_node.rs`).
//!
//! With the `metal` feature the same f32 kernels, the convolution's im2col and col2im included, exist
//! in Metal (`ops/metal/kernels.metal`), opt-in with `DDPM_METAL_KERNELS=1`
//! ([`metal_kernels_enabled`]): they have run in a CPU emulation (`scripts/check_metal.sh`), not yet
//! on Apple hardware. Without it, Metal takes the composed ops.
//!
//! The switches and the launch helpers are ddpm-core's ([`ddpm_core::ops`]), shared with the diffusion
//! process's own fused ops (the loss, the sampler step, the optimizer).

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
pub(crate) mod attention_node;
pub(crate) mod columns;
pub mod conv;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "cuda")]
pub mod cudnn;
#[cfg(feature = "cuda")]
pub(crate) mod cudnn_conv;
pub(crate) mod direct_conv;
pub mod dropout;
pub mod group_norm;
pub(crate) mod matmul;
#[cfg(feature = "metal")]
pub(crate) mod metal;
pub mod softmax;
pub(crate) mod upsample_conv;
pub(crate) mod winograd;

pub use attention::{attention, attention_composed};
pub use ddpm_core::ops::{cuda_kernels_enabled, f32_slice, metal_kernels_enabled};
pub use dropout::{dropout, dropout_mask};
pub use group_norm::{group_norm, group_norm_backward, group_norm_composed};
pub use softmax::softmax_last_dim;

pub(crate) use ddpm_core::ops::fused_device;

use candle_core::{Result, Tensor};

/// Whether the residual blocks and (on CUDA) attention run as one graph node each in training
/// (`resnet/node.rs`, `ops/attention_node.rs`): yes unless `DDPM_BLOCK_NODE=0` is in the environment
/// (read once), which runs them node by node, to measure what the nodes save.
pub fn block_nodes_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| !std::env::var("DDPM_BLOCK_NODE").is_ok_and(|v| v == "0"))
}

/// `p` in the dtype of `x`: under mixed precision the parameters stay in f32 (the optimizer's master
/// weights) while the activations, and so the products, run in bf16 or f16, as PyTorch's autocast
/// does. The cast is differentiable (its gradient is cast back to `p`'s dtype) and free when the
/// dtypes already agree.
pub fn cast_like(p: &Tensor, x: &Tensor) -> Result<Tensor> {
    p.to_dtype(x.dtype())
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
