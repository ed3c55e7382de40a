//! The diffusion process's fused operations, with analytic backward passes and multi-threaded CPU
//! kernels: the loss ([`weighted_mse`]), the DDPM sampler step ([`ddpm_step`]), and the optimizer
//! and EMA updates ([`optim`], and on CUDA [`multi_tensor`]: every parameter in one launch). Each
//! falls back to the composed candle ops it replaces on devices and dtypes that it has no kernel for,
//! so the same code runs everywhere.
//!
//! With the `cuda` feature they also have CUDA kernels (`ops/cuda/kernels.cu`), used when
//! [`cuda_kernels_enabled`]; with the `metal` feature Metal kernels (`ops/metal/kernels.metal`),
//! opt-in with `DDPM_METAL_KERNELS=1` ([`metal_kernels_enabled`]): they have run in a CPU emulation
//! (`scripts/check_metal.sh`), not yet on Apple hardware. Without it, Metal takes the composed ops.
//!
//! The network's kernels (convolutions, group norm, attention, dropout) live with the network, in
//! `ddpm-unet`'s `ops`, and launch through this module's public helpers: [`fused_device`],
//! [`f32_slice`], and the `cuda` and `metal` modules' launchers, which take a crate's own kernel
//! source.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod ddpm_step;
#[cfg(feature = "metal")]
pub mod metal;
pub mod mse;
pub mod multi_tensor;
pub mod optim;
pub mod profile;

pub use mse::{weighted_mse, weighted_mse_composed};

use candle_core::{CpuStorage, Device, Layout, Result};

/// CUDA device `ordinal` as this project runs it: candle's device with cudarc's per-buffer event
/// tracking turned off, unless `DDPM_CUDA_EVENTS=1` is in the environment (read at each call).
///
/// candle creates each device's stream with `new_stream`, which puts cudarc in its multi-stream mode:
/// every buffer then gets two CUDA events at allocation, every use of it as a kernel argument a wait
/// on its last write and a record (two driver calls), and every free two more waits; host work that
/// paces a small model's training step, where each op is short. Everything of a device runs on its
/// one stream (candle's ops, cuBLAS, cuRAND, this project's kernels, cuDNN), and on one stream the
/// stream's order alone puts every write before the later reads and every (stream-ordered) free after
/// the earlier uses: what the events would enforce. Tensors that another stream touches need the
/// events: keep them on (`DDPM_CUDA_EVENTS=1`) or create the device with candle's `Device::new_cuda`.
/// Without the `cuda` feature this is candle's error for a build without CUDA.
pub fn cuda_device(ordinal: usize) -> Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        if !std::env::var("DDPM_CUDA_EVENTS").is_ok_and(|v| v == "1") {
            // SAFETY: every use of this device's buffers is ordered by its one stream (above); buffers
            // made before this call keep their events, which stay correct
            unsafe { d.disable_event_tracking() };
        }
    }
    Ok(device)
}

/// `values` as a tensor of `shape` on `device`: `Tensor::from_vec`, except on CUDA with the project's
/// kernels ([`cuda_kernels_enabled`]), where f32, f64, i64, u32 and u8 values are copied through
/// page-locked staging buffers (`cuda::upload_pinned`) so that the copy does not wait for the GPU's
/// queued work (the training loop uploads each step's batch, noise and timesteps while the previous
/// step still runs).
pub fn upload<T: candle_core::WithDType + 'static, S: Into<candle_core::Shape>>(values: Vec<T>, shape: S, device: &Device) -> Result<candle_core::Tensor> {
    let shape = shape.into();
    if values.len() != shape.elem_count() {
        candle_core::bail!("upload: {} values for the shape {shape:?}", values.len());
    }
    #[cfg(feature = "cuda")]
    if let (true, Device::Cuda(dev)) = (cuda_kernels_enabled(device), device) {
        if let Some(storage) = cuda::upload_storage(dev, &values)? {
            return Ok(cuda::tensor(storage, shape));
        }
    }
    candle_core::Tensor::from_vec(values, shape, device)
}

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

/// Whether the fused ops (this crate's and the network's) have a kernel for tensors on `device`: the CPU, CUDA when
/// [`cuda_kernels_enabled`], Metal when [`metal_kernels_enabled`].
pub fn fused_device(device: &Device) -> bool {
    device.is_cpu() || cuda_kernels_enabled(device) || metal_kernels_enabled(device)
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
pub fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str, what: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{op}: {what} must be a contiguous f32 tensor"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_on_the_cpu_is_the_tensor_of_its_values_and_checks_the_shape() {
        let t = upload(vec![1i64, 2, 3, 4, 5, 6], (2, 3), &Device::Cpu).unwrap();
        assert_eq!(t.to_vec2::<i64>().unwrap(), [[1, 2, 3], [4, 5, 6]]);
        let err = upload(vec![1f32; 3], (2, 2), &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("3 values") && err.contains("[2, 2]"), "{err}");
    }
}
