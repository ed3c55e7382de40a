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

/// Host values copied to `dev` (per-sample weights), through [`upload_pinned`]'s page-locked staging
/// buffers (the copy does not wait for the device's queued work).
pub fn upload_f32(dev: &CudaDevice, values: &[f32]) -> Result<CudaSlice<f32>> {
    upload_pinned(dev, values)
}

/// The storage of a result computed on the device of `like`.
pub fn wrap(slice: CudaSlice<f32>, like: &CudaStorage) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, like.device().clone())
}

/// A tensor of `storage` with `shape` (contiguous, outside any graph): how a buffer that a kernel or a
/// copy filled becomes a candle tensor.
pub fn tensor(storage: CudaStorage, shape: impl Into<candle_core::Shape>) -> candle_core::Tensor {
    candle_core::Tensor::from_storage(candle_core::Storage::Cuda(storage), shape, candle_core::op::BackpropOp::none(), false)
}

/// [`upload_pinned`] of `values` as a candle storage on `dev` when their type is f32, f64, i64, u32
/// or u8 (`None` for another type: the caller copies those as candle does).
pub fn upload_storage<T: 'static>(dev: &CudaDevice, values: &[T]) -> Result<Option<CudaStorage>> {
    /// `v` as a slice of `U` when `T` is `U` itself (same type, so the same layout).
    fn same<T: 'static, U: 'static>(v: &[T]) -> Option<&[U]> {
        // SAFETY: T and U are one type (equal TypeIds)
        (std::any::TypeId::of::<T>() == std::any::TypeId::of::<U>()).then(|| unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<U>(), v.len()) })
    }
    // the first of these types that T is
    macro_rules! upload_as {
        ($($u:ty),*) => {$(
            if let Some(v) = same::<T, $u>(values) {
                return Ok(Some(CudaStorage::wrap_cuda_slice(upload_pinned(dev, v)?, dev.clone())));
            }
        )*};
    }
    upload_as!(f32, f64, i64, u32, u8);
    Ok(None)
}

/// Which staging ring: the device, the element type and the number of elements.
type StagingKey = (candle_core::cuda_backend::DeviceId, std::any::TypeId, usize);

/// A ring of page-locked staging buffers (below) with its element type erased.
trait StagingRing: Send {
    /// Waits until no copy reads any of the ring's buffers (before they are freed).
    fn drain(&self) -> Result<()>;
    /// The ring itself, to recover its element type.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// The staging buffers of one (device, type, length), used in turn, each with the event recorded
/// after the last copy out of it.
struct Ring<T> {
    slots: Vec<(candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<T>, candle_core::cuda_backend::cudarc::driver::CudaEvent)>,
    next: usize,
}

impl<T: Send + 'static> StagingRing for Ring<T> {
    fn drain(&self) -> Result<()> {
        for (_, copied) in &self.slots {
            copied.synchronize().w()?;
        }
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// Staging buffers per (device, type, length) that [`upload_pinned`] keeps: a copy waits for the copy
/// this many uploads of the same size before it, not for the device's queue.
const STAGING_DEPTH: usize = 4;

/// Rings kept at most (a training run uses three or four sizes): a new size beyond this frees the
/// other rings' buffers, each once the copy out of it has run, so that varying sizes do not pile up
/// pinned memory.
const STAGING_SIZES: usize = 16;

/// `values` copied to a fresh buffer on `dev` through a page-locked (pinned) staging buffer, without
/// waiting for the work queued on the device's stream.
///
/// A copy from pageable memory (a `Vec`, what candle's `Tensor::from_vec` copies from) may make the
/// driver wait for the stream's queued work before it returns (CUDA's "API synchronization
/// behavior"), so a training step that uploads its batch and noise would wait for the previous step
/// to finish on the GPU before it could queue any more. From pinned memory the copy is queued like a
/// kernel. Each (device, type, length) has [`STAGING_DEPTH`] staging buffers used in turn; a buffer
/// is refilled only after the event recorded behind its previous copy has completed (the events are
/// the ring's own: cudarc's are off with [`crate::ops::cuda_device`]).
pub fn upload_pinned<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits + Copy + Send + 'static>(dev: &CudaDevice, values: &[T]) -> Result<CudaSlice<T>> {
    static RINGS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<StagingKey, Box<dyn StagingRing>>>> = std::sync::OnceLock::new();
    let stream = dev.cuda_stream();
    let ctx = stream.context().clone();
    let key: StagingKey = (dev.id(), std::any::TypeId::of::<T>(), values.len());
    let mut rings = RINGS.get_or_init(Default::default).lock().map_err(|_| candle_core::Error::Msg("upload_pinned: poisoned lock".into()))?;
    if !rings.contains_key(&key) && rings.len() >= STAGING_SIZES {
        for (_, ring) in rings.drain() {
            ring.drain()?;
        }
    }
    let ring = rings.entry(key).or_insert_with(|| Box::new(Ring::<T> { slots: Vec::new(), next: 0 }));
    let Some(ring) = ring.as_any_mut().downcast_mut::<Ring<T>>() else {
        candle_core::bail!("upload_pinned: a staging ring of another type under this type's key")
    };
    if ring.slots.len() < STAGING_DEPTH {
        // SAFETY: the buffer is written in full below before any copy reads it
        let buffer = unsafe { ctx.alloc_pinned::<T>(values.len()) }.w()?;
        ring.slots.push((buffer, ctx.new_event(None).w()?));
    }
    let slot = ring.next % ring.slots.len();
    ring.next += 1;
    let (buffer, copied) = &mut ring.slots[slot];
    // the previous copy out of this buffer has finished reading it
    copied.synchronize().w()?;
    buffer.as_mut_slice().w()?.copy_from_slice(values);
    // SAFETY: the copy below writes every element
    let mut dst = unsafe { dev.alloc::<T>(values.len()) }?;
    stream.memcpy_htod(&*buffer, &mut dst).w()?;
    copied.record(&stream).w()?;
    Ok(dst)
}
