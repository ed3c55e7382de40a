//! Launching the Metal kernels of the fused ops (`src/ops/metal/kernels.metal`), with the `metal`
//! feature, and the launcher that other crates' kernels use ([`launch_in`] with their own
//! [`Kernels`]: ddpm-unet's network kernels). A source is compiled once per device, after the shared
//! prelude (`src/ops/metal/prelude.metal`: the block size, the threadgroup reductions), at its first
//! launch, and each kernel's pipeline is kept for the next.
//!
//! The kernels are opt-in: the fused ops use them on a Metal device only when `DDPM_METAL_KERNELS=1`
//! is set (see [`super::metal_kernels_enabled`]), and take candle's composed ops otherwise. They have
//! run only in the CPU emulation of `scripts/check_metal.sh` (every kernel against an f64 reference),
//! not yet on Apple hardware. They are f32 only: for f16 and bf16, group norm, the dropout mask, the
//! column convolution and attention's softmax run the f32 kernels between casts, and the other ops
//! keep the composed ones.

use std::collections::hash_map::{Entry, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, MetalDevice, MetalError, MetalStorage, Result};
use candle_metal_kernels::metal::{Buffer, ComputeCommandEncoder, ComputePipeline, Library};
use objc2_metal::MTLSize;

/// The declarations every kernel source is compiled after (THREADS, `group_sum`, `group_max`,
/// `logistic`).
pub const PRELUDE: &str = include_str!("metal/prelude.metal");

/// One crate's Metal kernels: a source compiled, after [`PRELUDE`], into one library per device.
#[derive(Debug)]
pub struct Kernels {
    /// A name unique among the sources (the library cache's key).
    pub name: &'static str,
    /// The kernels' source.
    pub source: &'static str,
}

/// This crate's kernels (`kernels.metal`).
static CORE: Kernels = Kernels { name: "ddpm-core", source: include_str!("metal/kernels.metal") };

/// Threads per threadgroup; the prelude's reductions are written for this size (its `THREADS`).
pub const THREADS: usize = 256;

/// How a kernel's threads are laid out.
#[derive(Debug, Clone, Copy)]
pub enum Grid {
    /// One thread per element of `n`, rounded up to whole threadgroups (the kernel checks i < n).
    Elementwise(usize),
    /// One threadgroup of [`THREADS`] threads per unit of work (row, sample, (sample, group) pair),
    /// with THREADS floats of threadgroup memory at index 0.
    Groups(usize),
}

/// One kernel argument, at the index of its position in the argument list (`[[buffer(i)]]`).
pub enum Arg<'a> {
    /// A buffer the kernel reads, from a byte offset.
    In(&'a Buffer, usize),
    /// A buffer the kernel writes (or reads and writes), from a byte offset.
    Out(&'a Buffer, usize),
    /// A scalar or a struct of scalars passed by value (`constant T&`), as its 4-byte words in the
    /// order of the fields in `kernels.metal`: a float as its bits, a ulong as [`ulong_words`].
    Words(Vec<u32>),
}

/// A `constant uint&` argument.
pub fn uint(v: u32) -> Arg<'static> {
    Arg::Words(vec![v])
}

/// A `constant float&` argument.
pub fn float(v: f32) -> Arg<'static> {
    Arg::Words(vec![v.to_bits()])
}

/// The two words of a `ulong` field: low, then high (Apple GPUs are little-endian).
pub fn ulong_words(v: u64) -> [u32; 2] {
    [v as u32, (v >> 32) as u32]
}

/// One device's compiled source and the pipelines made from it so far.
struct Compiled {
    library: Library,
    pipelines: HashMap<&'static str, ComputePipeline>,
}

/// The pipeline of kernel `name` of `kernels` on `dev`, compiling the prelude and the source the first
/// time a device needs it.
fn pipeline(dev: &MetalDevice, kernels: &'static Kernels, name: &'static str) -> Result<ComputePipeline> {
    // keyed by the device's registry id and the source's name
    static LIBRARIES: OnceLock<Mutex<HashMap<(u64, &'static str), Compiled>>> = OnceLock::new();
    let mut libraries = LIBRARIES.get_or_init(Default::default).lock().map_err(|_| MetalError::Message("ddpm metal kernels: pipeline cache poisoned".into()))?;
    let compiled = match libraries.entry((dev.metal_device().registry_id(), kernels.name)) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => {
            let source = format!("{PRELUDE}\n{}", kernels.source);
            let library = dev.metal_device().new_library_with_source(&source, None).map_err(MetalError::from)?;
            e.insert(Compiled { library, pipelines: HashMap::new() })
        }
    };
    if let Some(p) = compiled.pipelines.get(name) {
        return Ok(p.clone());
    }
    let function = compiled.library.get_function(name, None).map_err(MetalError::from)?;
    let p = dev.metal_device().new_compute_pipeline_state_with_function(&function).map_err(MetalError::from)?;
    if p.max_total_threads_per_threadgroup() < THREADS {
        candle_core::bail!("ddpm metal kernel {name}: the device allows {} threads per threadgroup, the kernel needs {THREADS}", p.max_total_threads_per_threadgroup());
    }
    compiled.pipelines.insert(name, p.clone());
    Ok(p)
}

/// Encodes this crate's kernel `name` on `dev`'s current command buffer with `args` (in
/// `[[buffer(i)]]` order) over `grid`. Nothing is launched for an empty grid.
pub(crate) fn launch(dev: &MetalDevice, name: &'static str, grid: Grid, args: &[Arg]) -> Result<()> {
    launch_in(dev, &CORE, name, grid, args)
}

/// Encodes kernel `name` of `kernels` on `dev`'s current command buffer with `args` (in
/// `[[buffer(i)]]` order) over `grid`. Nothing is launched for an empty grid.
pub fn launch_in(dev: &MetalDevice, kernels: &'static Kernels, name: &'static str, grid: Grid, args: &[Arg]) -> Result<()> {
    let groups = match grid {
        Grid::Elementwise(n) => n.div_ceil(THREADS),
        Grid::Groups(g) => g,
    };
    if groups == 0 {
        return Ok(());
    }
    let pipeline = pipeline(dev, kernels, name)?;
    let guard = dev.command_encoder()?;
    let encoder: &ComputeCommandEncoder = guard.as_ref();
    encoder.set_compute_pipeline_state(&pipeline);
    for (i, arg) in args.iter().enumerate() {
        match arg {
            // the encoder orders a kernel after the earlier ones that wrote its inputs
            Arg::In(b, offset) => encoder.set_input_buffer(i, Some(b), *offset),
            Arg::Out(b, offset) => encoder.set_output_buffer(i, Some(b), *offset),
            Arg::Words(w) => encoder.set_bytes_directly(i, 4 * w.len(), w.as_ptr().cast()),
        }
    }
    if let Grid::Groups(_) = grid {
        encoder.set_threadgroup_memory_length(0, THREADS * std::mem::size_of::<f32>());
    }
    let size = |width| MTLSize { width, height: 1, depth: 1 };
    encoder.dispatch_thread_groups(size(groups), size(THREADS));
    Ok(())
}

/// The buffer, byte offset and length of a contiguous f32 Metal storage, or an error naming the op
/// and the argument.
pub fn f32_buffer<'a>(s: &'a MetalStorage, l: &Layout, op: &str, what: &str) -> Result<(&'a Buffer, usize, usize)> {
    match (s.dtype(), l.contiguous_offsets()) {
        (DType::F32, Some((a, b))) => Ok((s.buffer(), a * 4, b - a)),
        _ => candle_core::bail!("{op}: {what} must be a contiguous f32 tensor"),
    }
}

/// A fresh f32 buffer of `len` values on `dev` (the kernel writes them all).
pub fn alloc_f32(dev: &MetalDevice, len: usize, label: &str) -> Result<Arc<Buffer>> {
    dev.new_buffer(len, DType::F32, label)
}

/// Host values copied to `dev` (per-sample weights).
pub fn upload_f32(dev: &MetalDevice, values: &[f32]) -> Result<Arc<Buffer>> {
    dev.new_buffer_with_data(values)
}

/// The storage of `len` f32 values computed into `buffer` on `dev`.
pub fn wrap(buffer: Arc<Buffer>, dev: &MetalDevice, len: usize) -> MetalStorage {
    MetalStorage::new(buffer, dev.clone(), len, DType::F32)
}

/// `n` as the 32-bit count the kernels index with, or an error naming the op.
pub fn count(n: usize, op: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{op}: {n} values is more than the Metal kernels index (2^32 - 1)")))
}
