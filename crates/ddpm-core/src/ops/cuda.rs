//! Launching the CUDA kernels of the fused ops (`src/ops/cuda/kernels.cu`, compiled to PTX by
//! build.rs when the `cuda` feature is on), and the helpers that other crates' kernels launch with
//! ([`launch_ptx!`](crate::launch_ptx), the views, the buffers): `ddpm-unet` compiles its network
//! kernels against this crate's `common.cuh` (block reductions; its build script finds the header
//! through the `DEP_DDPM_CORE_CUDA_INCLUDE` variable that this crate's build script exports).
//!
//! The fused ops use them on every CUDA device unless `DDPM_CUDA_KERNELS=0` is set (see
//! [`super::cuda_kernels_enabled`]), which gives candle's composed ops instead. `cargo test --features
//! cuda` on a CUDA machine compares every kernel with the CPU kernel of the same op
//! (`tests/ops_gpu.rs`); `scripts/gpu_check.sh` runs those tests and the benchmarks on a GPU.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, Layout, Result};

/// The trait that pushes a kernel argument; [`launch_ptx!`](crate::launch_ptx) calls it.
pub use candle_core::cuda_backend::cudarc::driver::PushKernelArg;

/// The PTX of `kernels.cu`.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ddpm_kernels.ptx"));

/// The name the module is cached under in each CUDA device.
pub const MODULE: &str = "ddpm_core_kernels";

/// Threads per block; `common.cuh`'s block reductions are written for this size (its `THREADS`).
pub const THREADS: u32 = 256;

/// A launch configuration for a grid-stride loop over `n` elements.
pub fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// A launch configuration with one block per unit of work (sample, or (sample, group) pair).
pub fn per_block(blocks: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Launches kernel `$name` of the PTX source `$ptx` (loaded once per device, cached under the module
/// name `$module`) on `$dev` with configuration `$cfg` and the arguments after the `;`, each a reference
/// to a device view or to a scalar of the C type the kernel declares, in its order. Returns from the
/// enclosing function with a candle error if the launch fails.
///
/// # Safety
/// Expands to an `unsafe` launch: the caller's arguments must follow the kernel's signature, and the
/// views must cover the elements the kernel indexes.
#[macro_export]
macro_rules! launch_ptx {
    ($module:expr, $ptx:expr, $dev:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let func = $dev.get_or_load_custom_func($name, $module, $ptx)?;
        let mut builder = func.builder();
        $( $crate::ops::cuda::PushKernelArg::arg(&mut builder, $arg); )*
        // SAFETY: the arguments follow the kernel's signature of `$name`, and the views cover the
        // elements the kernel indexes (the caller's contract).
        unsafe { builder.launch($cfg) }.map_err($crate::ops::cuda::launch_error)?;
    }};
}

/// [`launch_ptx!`](crate::launch_ptx) for this crate's kernels (`kernels.cu`).
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {
        $crate::launch_ptx!($crate::ops::cuda::MODULE, $crate::ops::cuda::PTX, $dev, $name, $cfg; $($arg),*)
    };
}
pub(crate) use launch;

/// A failed kernel launch as a candle error.
pub fn launch_error(e: candle_core::cuda_backend::cudarc::driver::DriverError) -> candle_core::Error {
    candle_core::Error::Cuda(Box::new(e))
}

/// The f32 values of a contiguous CUDA storage, or an error naming the op and the argument.
pub fn f32_view<'a>(s: &'a CudaStorage, l: &Layout, op: &str, what: &str) -> Result<CudaView<'a, f32>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<f32>()?.slice(a..b)),
        None => candle_core::bail!("{op}: {what} must be a contiguous f32 tensor"),
    }
}

/// [`f32_view`] for a storage written in place.
pub fn f32_view_mut<'a>(s: &'a mut CudaStorage, l: &Layout, op: &str, what: &str) -> Result<CudaViewMut<'a, f32>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(a..b)),
        None => candle_core::bail!("{op}: {what} must be a contiguous f32 tensor"),
    }
}

/// A fresh f32 buffer of `len` values on `dev` (contents unspecified: the kernel writes them all).
pub fn alloc_f32(dev: &CudaDevice, len: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: every caller launches a kernel that writes each of the `len` values before they are read.
    unsafe { dev.alloc::<f32>(len) }
}

/// A zeroed f64 buffer of `len` values on `dev` (reduction partials).
pub fn zeros_f64(dev: &CudaDevice, len: usize) -> Result<CudaSlice<f64>> {
    dev.alloc_zeros::<f64>(len)
}

/// Host values copied to `dev` (per-sample weights).
pub fn upload_f32(dev: &CudaDevice, values: &[f32]) -> Result<CudaSlice<f32>> {
    dev.cuda_stream().clone_htod(values).w()
}

/// The storage of a result computed on the device of `like`.
pub fn wrap(slice: CudaSlice<f32>, like: &CudaStorage) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, like.device().clone())
}
