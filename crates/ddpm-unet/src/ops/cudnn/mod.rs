//! 2-D convolutions through NVIDIA cuDNN 9, loaded at run time with `libloading`.
//!
//! Nothing here links against cuDNN: [`library`] `dlopen`s `libcudnn.so.9` (then `libcudnn.so`)
//! the first time it is asked for, and every later call reuses that result. When the library is
//! missing, is not version 9, or `DDPM_CUDNN=0` is set, [`library`] returns `None` and [`plan`]
//! returns an error, so the caller can fall back to its own kernels.
//!
//! The unit of work is a [`ConvPlan`]: the cuDNN descriptors for one [`ConvKey`] (shapes, stride,
//! padding and data type) and the algorithm chosen for each direction. With `x` of shape
//! (N, C, H, W), `w` of shape (O, C, k, k), bias `b` of shape (O) and `y` of shape (N, O, Ho, Wo):
//!
//! * forward:         `y[n,o,i,j]  = sum_{c,p,q} x[n,c, i*s+p-pad, j*s+q-pad] * w[o,c,p,q]`
//!   (cross-correlation, zero padding, dilation 1, one group)
//! * add_bias:        `y[n,o,i,j] += b[o]`
//! * backward_data:   `dx = conv_transpose(dy, w)`, i.e. `dx[n,c,h,w] = sum_{o,p,q} dy[n,o,i,j] * w[o,c,p,q]`
//!   over the (i, j, p, q) with `i*s+p-pad = h` and `j*s+q-pad = w`
//! * backward_filter: `dw[o,c,p,q] = sum_{n,i,j} dy[n,o,i,j] * x[n,c, i*s+p-pad, j*s+q-pad]`
//! * backward_bias:   `db[o] = sum_{n,i,j} dy[n,o,i,j]`
//!
//! Only deterministic algorithms are used unless `DDPM_CUDNN_DETERMINISTIC=0`, so repeated runs
//! give bit-identical results.
//!
//! Environment (each read once per process):
//! * `DDPM_CUDNN=0` (or `false`/`off`): never load cuDNN.
//! * `DDPM_CUDNN_BENCHMARK=1`: choose algorithms by timing them ([`AlgoSearch::Benchmark`])
//!   instead of cuDNN's heuristics ([`AlgoSearch::Heuristic`]).
//! * `DDPM_CUDNN_DETERMINISTIC=0`: let non-deterministic algorithms qualify too, as PyTorch does by
//!   default ([`deterministic_only`]).
//!
//! Threading: a cuDNN handle is not thread-safe, so each device's handle sits behind a mutex that
//! is held for every call that uses it (algorithm search and each launch).
//!
//! The FFI (`cudnn/ffi.rs`) is written by hand, checked against cuDNN 9's headers; the loading and
//! the environment switches are in `cudnn/library.rs`; this file holds the keys, the per-device
//! handles and the plans.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::fmt;
use std::ptr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

mod ffi;
mod library;

use ffi::*;
pub use library::{algo_search, deterministic_only, library, AlgoSearch, CudnnLib};
// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A cuDNN failure, or a reason cuDNN cannot be used, as one human-readable line.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CudnnError {
    message: String,
}

impl CudnnError {
    fn new(message: impl Into<String>) -> CudnnError {
        CudnnError {
            message: message.into(),
        }
    }

    /// The message (also what `Display` prints).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for CudnnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CudnnError {}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// Largest workspace any chosen algorithm may need (1 GiB); algorithms that need more are skipped.
pub const MAX_WORKSPACE_BYTES: usize = 1 << 30;

/// Element type and arithmetic of a convolution. Scaling factors (alpha, beta) are `f32` for all
/// of these, as cuDNN requires for float, half and bfloat16 data.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ConvDType {
    /// f32 data, f32 compute, CUDNN_FMA_MATH: full fp32, never TF32 or tensor cores.
    F32,
    /// f32 data, f32 compute, CUDNN_DEFAULT_MATH: cuDNN may use TF32 tensor cores (Ampere and
    /// later), as PyTorch does with `allow_tf32 = True`. `NVIDIA_TF32_OVERRIDE=0` turns TF32 off.
    Tf32,
    /// bf16 data, f32 compute, CUDNN_TENSOR_OP_MATH.
    Bf16,
    /// f16 data, f32 compute, CUDNN_TENSOR_OP_MATH.
    F16,
}

impl ConvDType {
    /// Bytes per element of `x`, `w`, `y` and the bias.
    pub fn element_bytes(self) -> usize {
        match self {
            ConvDType::F32 | ConvDType::Tf32 => 4,
            ConvDType::Bf16 | ConvDType::F16 => 2,
        }
    }

    /// cudnnDataType_t of the tensors and filters.
    fn data_type(self) -> DataType {
        match self {
            ConvDType::F32 | ConvDType::Tf32 => DataType::FLOAT,
            ConvDType::Bf16 => DataType::BFLOAT16,
            ConvDType::F16 => DataType::HALF,
        }
    }

    /// Compute type of the convolution descriptor: always float (cuDNN's FLOAT_CONFIG,
    /// PSEUDO_HALF_CONFIG and PSEUDO_BFLOAT16_CONFIG).
    fn compute_type(self) -> DataType {
        DataType::FLOAT
    }

    /// Math type requested on the convolution descriptor before the algorithm search.
    fn math_type(self) -> MathType {
        match self {
            ConvDType::F32 => MathType::FMA,
            ConvDType::Tf32 => MathType::DEFAULT,
            ConvDType::Bf16 | ConvDType::F16 => MathType::TENSOR_OP,
        }
    }

    /// Whether an algorithm reported with `math` keeps this type's numerics: plain f32 must stay
    /// on FMA kernels (as PyTorch asserts when TF32 is off); nothing may down-convert its inputs.
    fn accepts(self, math: MathType) -> bool {
        match self {
            ConvDType::F32 => math == MathType::FMA,
            _ => math != MathType::TENSOR_OP_ALLOW_CONVERSION,
        }
    }
}

/// One convolution: `x` (n, c, h, w) and `w` (o, c, k, k) to `y` (n, o, ho, wo), all NCHW
/// contiguous, square kernel k, stride and zero padding the same on both axes, dilation 1, one
/// group, cross-correlation. `ho = (h + 2 pad - k) / stride + 1`, likewise `wo`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ConvKey {
    /// Batch size N.
    pub n: usize,
    /// Input channels C.
    pub c: usize,
    /// Input height H.
    pub h: usize,
    /// Input width W.
    pub w: usize,
    /// Output channels O.
    pub o: usize,
    /// Kernel side k.
    pub k: usize,
    /// Stride s.
    pub stride: usize,
    /// Zero padding on each side.
    pub pad: usize,
    /// Element type and arithmetic.
    pub dtype: ConvDType,
}

impl ConvKey {
    /// `[n, c, h, w]`.
    pub fn input_shape(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }

    /// `[o, c, k, k]`.
    pub fn filter_shape(&self) -> [usize; 4] {
        [self.o, self.c, self.k, self.k]
    }

    /// `[n, o, (h + 2 pad - k) / stride + 1, (w + 2 pad - k) / stride + 1]`, or `None` when the
    /// kernel does not fit in the padded input, the stride is 0, or the arithmetic overflows.
    pub fn output_shape(&self) -> Option<[usize; 4]> {
        let side = |len: usize| -> Option<usize> {
            let padded = self.pad.checked_mul(2)?.checked_add(len)?;
            Some(padded.checked_sub(self.k)?.checked_div(self.stride)? + 1)
        };
        Some([self.n, self.o, side(self.h)?, side(self.w)?])
    }

    /// Checks the key can be described to cuDNN and returns the output shape: every size at
    /// least 1 (padding may be 0), every dimension within `i32`, the kernel within the padded
    /// input, and each of x, w, y at most `i32::MAX` elements (cuDNN's per-tensor limit).
    pub fn validate(&self) -> Result<[usize; 4], CudnnError> {
        let fail = |what: String| Err(CudnnError::new(format!("cuDNN conv: {what} in {self:?}")));
        let dims = [
            ("n", self.n),
            ("c", self.c),
            ("h", self.h),
            ("w", self.w),
            ("o", self.o),
            ("k", self.k),
            ("stride", self.stride),
            ("pad", self.pad),
        ];
        for (name, value) in dims {
            if value == 0 && name != "pad" {
                return fail(format!("{name} is 0"));
            }
            if to_i32(value).is_none() {
                return fail(format!("{name} = {value} does not fit in i32"));
            }
        }
        let Some(out) = self.output_shape() else {
            return fail("the kernel is larger than the padded input".to_string());
        };
        for (name, value) in [("output height", out[2]), ("output width", out[3])] {
            if to_i32(value).is_none() {
                return fail(format!("{name} = {value} does not fit in i32"));
            }
        }
        let tensors = [
            ("x", self.input_shape()),
            ("w", self.filter_shape()),
            ("y", out),
        ];
        for (name, shape) in tensors {
            let elements = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
            if elements.and_then(to_i32).is_none() {
                return fail(format!("{name} {shape:?} has more than i32::MAX elements"));
            }
        }
        Ok(out)
    }
}

fn to_i32(value: usize) -> Option<c_int> {
    c_int::try_from(value).ok()
}

// ---------------------------------------------------------------------------------------------
// Handles and descriptors
// ---------------------------------------------------------------------------------------------

/// A cuDNN handle; the mutex serialises every call that uses it.
struct DeviceHandle {
    lib: &'static CudnnLib,
    raw: Mutex<SendHandle>,
}

struct SendHandle(Handle);
// SAFETY: a cuDNN handle may be used from any thread as long as calls are not concurrent, which
// the Mutex around it guarantees.
unsafe impl Send for SendHandle {}

impl Drop for DeviceHandle {
    fn drop(&mut self) {
        let raw = lock(&self.raw).0;
        // SAFETY: created by cudnnCreate and no longer shared (we are the last owner).
        unsafe { (self.lib.api.cudnnDestroy)(raw) };
    }
}

/// The handle for `device`, created on first use with the CUDA context current on this thread.
fn device_handle(lib: &'static CudnnLib, device: usize) -> Result<Arc<DeviceHandle>, CudnnError> {
    static HANDLES: OnceLock<Mutex<HashMap<usize, Arc<DeviceHandle>>>> = OnceLock::new();
    let mut handles = lock(HANDLES.get_or_init(Default::default));
    if let Some(handle) = handles.get(&device) {
        return Ok(handle.clone());
    }
    let mut raw: Handle = ptr::null_mut();
    // SAFETY: `raw` is a valid out-pointer.
    let status = unsafe { (lib.api.cudnnCreate)(&mut raw) };
    let context = format!("device {device} (is its CUDA context current on this thread?)");
    lib.check(status, "cudnnCreate", &context)?;
    let handle = Arc::new(DeviceHandle {
        lib,
        raw: Mutex::new(SendHandle(raw)),
    });
    handles.insert(device, handle.clone());
    Ok(handle)
}

/// Owns one cuDNN descriptor and destroys it on drop.
struct Desc<T> {
    raw: *mut T,
    destroy: unsafe extern "C" fn(*mut T) -> Status,
}

impl<T> Desc<T> {
    fn new(
        lib: &CudnnLib,
        (create, destroy): (
            unsafe extern "C" fn(*mut *mut T) -> Status,
            unsafe extern "C" fn(*mut T) -> Status,
        ),
        function: &str,
        context: &dyn fmt::Display,
    ) -> Result<Desc<T>, CudnnError> {
        let mut raw = ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer.
        lib.check(unsafe { create(&mut raw) }, function, context)?;
        Ok(Desc { raw, destroy })
    }
}

impl<T> Drop for Desc<T> {
    fn drop(&mut self) {
        // SAFETY: created by the matching create function, destroyed exactly once.
        unsafe { (self.destroy)(self.raw) };
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Plans
// ---------------------------------------------------------------------------------------------

/// The three convolution directions.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Direction {
    Forward,
    BackwardData,
    BackwardFilter,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Forward => "forward",
            Direction::BackwardData => "backward-data",
            Direction::BackwardFilter => "backward-filter",
        })
    }
}

/// The algorithm picked for one direction.
#[derive(Clone, Copy, Debug)]
struct Choice {
    algo: Algo,
    math_type: MathType,
    workspace: usize,
}

impl Choice {
    /// Placeholder until the search has run.
    const UNSET: Choice = Choice {
        algo: Algo(-1),
        math_type: MathType(-1),
        workspace: 0,
    };
}

/// Whether cuDNN's report `p` qualifies: succeeded, deterministic (where `deterministic_only`),
/// workspace within `max_bytes`, and a math type that keeps `dtype`'s numerics.
fn qualifies(p: &AlgoPerf, dtype: ConvDType, max_bytes: usize, deterministic_only: bool) -> bool {
    p.status == Status::SUCCESS
        && (p.determinism == Determinism::DETERMINISTIC || !deterministic_only)
        && p.memory <= max_bytes
        && dtype.accepts(p.math_type)
}

/// Descriptors and chosen algorithms for one [`ConvKey`] on one device; see the module docs for
/// what each launch computes. Obtain one with [`plan`]; it is cached and shared.
pub struct ConvPlan {
    key: ConvKey,
    out: [usize; 4],
    handle: Arc<DeviceHandle>,
    /// x and dx: (n, c, h, w).
    x: Desc<TensorStruct>,
    /// y and dy: (n, o, ho, wo).
    y: Desc<TensorStruct>,
    /// bias and db: (1, o, 1, 1).
    bias: Desc<TensorStruct>,
    /// w and dw: (o, c, k, k).
    w: Desc<FilterStruct>,
    // One convolution descriptor per direction, because each carries the math type cuDNN
    // reported for the algorithm chosen for that direction (see `choose`).
    conv_fwd: Desc<ConvStruct>,
    conv_bwd_data: Desc<ConvStruct>,
    conv_bwd_filter: Desc<ConvStruct>,
    fwd: Choice,
    bwd_data: Choice,
    bwd_filter: Choice,
}

// SAFETY: the descriptors are only written while the plan is built and are read-only afterwards;
// every cuDNN call that uses them also takes the device handle's mutex.
unsafe impl Send for ConvPlan {}
// SAFETY: as above.
unsafe impl Sync for ConvPlan {}

impl fmt::Debug for ConvPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |c: &Choice| {
            format!(
                "algo {} math {} ws {} B",
                c.algo.0, c.math_type.0, c.workspace
            )
        };
        f.debug_struct("ConvPlan")
            .field("key", &self.key)
            .field("output_shape", &self.out)
            .field("forward", &show(&self.fwd))
            .field("backward_data", &show(&self.bwd_data))
            .field("backward_filter", &show(&self.bwd_filter))
            .finish()
    }
}

/// The plan for `key` on CUDA device ordinal `device`, built on first use and cached per
/// (device, key) for the life of the process. Fails (without panicking) when cuDNN is unavailable
/// (see [`library`]), `key` is invalid (see [`ConvKey::validate`]), or no qualifying algorithm
/// within [`MAX_WORKSPACE_BYTES`] exists for some direction; a key that failed on a device keeps
/// failing there (the error is cached), so falling back is cheap.
///
/// The cuDNN handle for `device` is created on the first call for that ordinal and then lives for
/// the process. Algorithms are chosen per [`algo_search`]; in benchmark mode the trial runs are
/// queued on `stream`.
///
/// # Safety
/// * The CUDA context of `device` must be current on the calling thread (cudarc:
///   `CudaContext::bind_to_thread`): cuDNN binds a handle to the device that is current when it is
///   created, and `device` is only used as a cache key.
/// * `stream` must be null (the legacy default stream) or a live `CUstream` of that context.
pub unsafe fn plan(
    device: usize,
    stream: *mut c_void,
    key: ConvKey,
) -> Result<Arc<ConvPlan>, CudnnError> {
    type Plans = Mutex<HashMap<(usize, ConvKey), Result<Arc<ConvPlan>, CudnnError>>>;
    static PLANS: OnceLock<Plans> = OnceLock::new();

    key.validate()?;
    let lib = library().ok_or_else(|| {
        CudnnError::new(format!(
            "cuDNN is not available (not found, not 9.x, or DDPM_CUDNN=0); cannot plan {key:?}"
        ))
    })?;
    // Held while building, so concurrent callers of one key wait for a single search.
    let mut plans = lock(PLANS.get_or_init(Default::default));
    if let Some(cached) = plans.get(&(device, key)) {
        return cached.clone();
    }
    // A handle failure is not cached: it may be a context that was not yet current.
    let handle = device_handle(lib, device)?;
    // SAFETY: forwarded from this function's contract.
    let built = unsafe { ConvPlan::build(lib, handle, stream, key, algo_search()) }.map(Arc::new);
    plans.insert((device, key), built.clone());
    built
}

impl ConvPlan {
    /// # Safety
    /// As [`plan`]; `handle` belongs to the current context.
    unsafe fn build(
        lib: &'static CudnnLib,
        handle: Arc<DeviceHandle>,
        stream: Stream,
        key: ConvKey,
        search: AlgoSearch,
    ) -> Result<ConvPlan, CudnnError> {
        let out = key.validate()?;
        let api = &lib.api;
        let ctx: &dyn fmt::Display = &DebugAsDisplay(&key);
        let dt = key.dtype.data_type();
        // Validated above: every value fits.
        let i = |v: usize| to_i32(v).unwrap_or(c_int::MAX);

        let tensor_fns = (
            api.cudnnCreateTensorDescriptor,
            api.cudnnDestroyTensorDescriptor,
        );
        let tensor = |[n, c, h, w]: [usize; 4]| -> Result<Desc<TensorStruct>, CudnnError> {
            let d = Desc::new(lib, tensor_fns, "cudnnCreateTensorDescriptor", ctx)?;
            let (n, c, h, w) = (i(n), i(c), i(h), i(w));
            // SAFETY: live descriptor. Fully packed NCHW; note format comes before data type.
            let st = unsafe {
                (api.cudnnSetTensor4dDescriptor)(d.raw, TensorFormat::NCHW, dt, n, c, h, w)
            };
            lib.check(st, "cudnnSetTensor4dDescriptor", ctx)?;
            Ok(d)
        };
        let x = tensor(key.input_shape())?;
        let y = tensor(out)?;
        let bias = tensor([1, key.o, 1, 1])?;

        let filter_fns = (
            api.cudnnCreateFilterDescriptor,
            api.cudnnDestroyFilterDescriptor,
        );
        let w = Desc::new(lib, filter_fns, "cudnnCreateFilterDescriptor", ctx)?;
        let [o, c, kh, kw] = key.filter_shape().map(i);
        // SAFETY: live descriptor. KCRS = (o, c, k, k); note data type comes before format.
        let st = unsafe {
            (api.cudnnSetFilter4dDescriptor)(w.raw, dt, TensorFormat::NCHW, o, c, kh, kw)
        };
        lib.check(st, "cudnnSetFilter4dDescriptor", ctx)?;

        let conv_fns = (
            api.cudnnCreateConvolutionDescriptor,
            api.cudnnDestroyConvolutionDescriptor,
        );
        let conv = || -> Result<Desc<ConvStruct>, CudnnError> {
            let d = Desc::new(lib, conv_fns, "cudnnCreateConvolutionDescriptor", ctx)?;
            let (p, s, mode) = (i(key.pad), i(key.stride), ConvMode::CROSS_CORRELATION);
            let compute = key.dtype.compute_type();
            // SAFETY: live descriptor. (pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w).
            let st = unsafe {
                (api.cudnnSetConvolution2dDescriptor)(d.raw, p, p, s, s, 1, 1, mode, compute)
            };
            lib.check(st, "cudnnSetConvolution2dDescriptor", ctx)?;
            // SAFETY: live descriptor.
            let st = unsafe { (api.cudnnSetConvolutionMathType)(d.raw, key.dtype.math_type()) };
            lib.check(st, "cudnnSetConvolutionMathType", ctx)?;
            Ok(d)
        };
        let (conv_fwd, conv_bwd_data, conv_bwd_filter) = (conv()?, conv()?, conv()?);

        // Cross-check our output-size arithmetic against cuDNN's.
        let mut dims = [0 as c_int; 4];
        let [dn, dc, dh, dw] = &mut dims;
        // SAFETY: live descriptors, valid out-pointers.
        let st = unsafe {
            (api.cudnnGetConvolution2dForwardOutputDim)(conv_fwd.raw, x.raw, w.raw, dn, dc, dh, dw)
        };
        lib.check(st, "cudnnGetConvolution2dForwardOutputDim", ctx)?;
        if dims.map(|d| usize::try_from(d).unwrap_or(0)) != out {
            return Err(CudnnError::new(format!(
                "cuDNN says the output of {key:?} is {dims:?}, expected {out:?}"
            )));
        }

        let mut plan = ConvPlan {
            key,
            out,
            handle,
            x,
            y,
            bias,
            w,
            conv_fwd,
            conv_bwd_data,
            conv_bwd_filter,
            fwd: Choice::UNSET,
            bwd_data: Choice::UNSET,
            bwd_filter: Choice::UNSET,
        };
        let handle = plan.handle.clone();
        let guard = lock(&handle.raw);
        // SAFETY: forwarded from the contract of `plan`.
        let st = unsafe { (api.cudnnSetStream)(guard.0, stream) };
        lib.check(st, "cudnnSetStream", ctx)?;
        for dir in [
            Direction::Forward,
            Direction::BackwardData,
            Direction::BackwardFilter,
        ] {
            // SAFETY: the handle is locked and its stream set; the descriptors are live.
            let choice = unsafe { plan.choose(guard.0, dir, search)? };
            match dir {
                Direction::Forward => plan.fwd = choice,
                Direction::BackwardData => plan.bwd_data = choice,
                Direction::BackwardFilter => plan.bwd_filter = choice,
            }
        }
        drop(guard);
        Ok(plan)
    }

    /// Picks the algorithm for `dir`: asks cuDNN for its ranked list (heuristic or timed), keeps
    /// the entries that [`qualifies`], and takes the first whose workspace, re-queried with the
    /// entry's math type set on this direction's convolution descriptor, is within the cap.
    ///
    /// Setting the reported math type follows PyTorch (Note [behavior of cudnnFind and cudnnGet]):
    /// cuDNN picks kernels by (algo, math type), so the descriptor used to run must carry the
    /// math type of the entry that was chosen.
    ///
    /// # Safety
    /// `h` is this plan's handle, locked by the caller, with its stream set.
    unsafe fn choose(
        &self,
        h: Handle,
        dir: Direction,
        search: AlgoSearch,
    ) -> Result<Choice, CudnnError> {
        use {AlgoSearch::*, Direction::*};
        let lib = self.handle.lib;
        let api = &lib.api;
        let ctx = DebugAsDisplay(&self.key);
        // x/dx, y/dy, w/dw descriptors and this direction's convolution descriptor.
        let (x, y, w) = (self.x.raw, self.y.raw, self.w.raw);
        let conv = match dir {
            Forward => self.conv_fwd.raw,
            BackwardData => self.conv_bwd_data.raw,
            BackwardFilter => self.conv_bwd_filter.raw,
        };

        let (max_count, name) = match dir {
            Forward => (
                api.cudnnGetConvolutionForwardAlgorithmMaxCount,
                "cudnnGetConvolutionForwardAlgorithmMaxCount",
            ),
            BackwardData => (
                api.cudnnGetConvolutionBackwardDataAlgorithmMaxCount,
                "cudnnGetConvolutionBackwardDataAlgorithmMaxCount",
            ),
            BackwardFilter => (
                api.cudnnGetConvolutionBackwardFilterAlgorithmMaxCount,
                "cudnnGetConvolutionBackwardFilterAlgorithmMaxCount",
            ),
        };
        let mut max: c_int = 0;
        // SAFETY: valid handle (caller's contract) and out-pointer.
        lib.check(unsafe { max_count(h, &mut max) }, name, &ctx)?;

        let requested = max.clamp(1, 1024);
        let mut perfs = vec![AlgoPerf::EMPTY; requested as usize];
        let mut returned: c_int = 0;
        let (n, r, res) = (requested, &mut returned, perfs.as_mut_ptr());
        // SAFETY: valid handle and descriptors, in each function's argument order; `res` has
        // room for `n` results and cuDNN writes at most `n`.
        let (st, name) = unsafe {
            match (dir, search) {
                (Forward, Heuristic) => (
                    (api.cudnnGetConvolutionForwardAlgorithm_v7)(h, x, w, conv, y, n, r, res),
                    "cudnnGetConvolutionForwardAlgorithm_v7",
                ),
                (Forward, Benchmark) => (
                    (api.cudnnFindConvolutionForwardAlgorithm)(h, x, w, conv, y, n, r, res),
                    "cudnnFindConvolutionForwardAlgorithm",
                ),
                (BackwardData, Heuristic) => (
                    (api.cudnnGetConvolutionBackwardDataAlgorithm_v7)(h, w, y, conv, x, n, r, res),
                    "cudnnGetConvolutionBackwardDataAlgorithm_v7",
                ),
                (BackwardData, Benchmark) => (
                    (api.cudnnFindConvolutionBackwardDataAlgorithm)(h, w, y, conv, x, n, r, res),
                    "cudnnFindConvolutionBackwardDataAlgorithm",
                ),
                (BackwardFilter, Heuristic) => (
                    (api.cudnnGetConvolutionBackwardFilterAlgorithm_v7)(
                        h, x, y, conv, w, n, r, res,
                    ),
                    "cudnnGetConvolutionBackwardFilterAlgorithm_v7",
                ),
                (BackwardFilter, Benchmark) => (
                    (api.cudnnFindConvolutionBackwardFilterAlgorithm)(h, x, y, conv, w, n, r, res),
                    "cudnnFindConvolutionBackwardFilterAlgorithm",
                ),
            }
        };
        lib.check(st, name, &ctx)?;
        perfs.truncate(usize::try_from(returned.clamp(0, requested)).unwrap_or(0));

        let (dtype, only_deterministic) = (self.key.dtype, deterministic_only());
        for p in perfs
            .iter()
            .filter(|p| qualifies(p, dtype, MAX_WORKSPACE_BYTES, only_deterministic))
        {
            let mut bytes = 0usize;
            // SAFETY: valid handle and descriptors (argument order as above), out-pointer.
            let st = unsafe {
                if (api.cudnnSetConvolutionMathType)(conv, p.math_type) != Status::SUCCESS {
                    continue;
                }
                let (a, b) = (p.algo, &mut bytes);
                match dir {
                    Forward => {
                        (api.cudnnGetConvolutionForwardWorkspaceSize)(h, x, w, conv, y, a, b)
                    }
                    BackwardData => {
                        (api.cudnnGetConvolutionBackwardDataWorkspaceSize)(h, w, y, conv, x, a, b)
                    }
                    BackwardFilter => {
                        (api.cudnnGetConvolutionBackwardFilterWorkspaceSize)(h, x, y, conv, w, a, b)
                    }
                }
            };
            let bytes = bytes.max(p.memory);
            if st == Status::SUCCESS && bytes <= MAX_WORKSPACE_BYTES {
                return Ok(Choice {
                    algo: p.algo,
                    math_type: p.math_type,
                    workspace: bytes,
                });
            }
        }

        let seen: Vec<String> = perfs
            .iter()
            .map(|p| {
                let (a, s, d, m) = (p.algo.0, p.status.0, p.determinism.0, p.math_type.0);
                format!("algo {a} status {s} det {d} math {m} ws {}", p.memory)
            })
            .collect();
        Err(CudnnError::new(format!(
            "cuDNN has no {}{dir} algorithm within {} MiB of workspace for {:?} \
             ({search:?} search; cuDNN reported [{}])",
            if only_deterministic { "deterministic " } else { "" },
            MAX_WORKSPACE_BYTES >> 20,
            self.key,
            seen.join(", ")
        )))
    }

    /// The key this plan was built for.
    pub fn key(&self) -> ConvKey {
        self.key
    }

    /// `[n, o, ho, wo]`, the shape of `y` and `dy`.
    pub fn output_shape(&self) -> [usize; 4] {
        self.out
    }

    /// Workspace bytes enough for any of the three directions (the max of their needs).
    pub fn workspace_bytes(&self) -> usize {
        let each = [self.fwd, self.bwd_data, self.bwd_filter];
        each.iter().map(|c| c.workspace).max().unwrap_or(0)
    }

    /// Checks the workspace, takes the handle lock, points the handle at `stream`, runs `call`,
    /// and turns a failure into an error naming `function`.
    ///
    /// # Safety
    /// As for the public launch methods; `call` must be a valid cuDNN call on the given handle.
    unsafe fn launch(
        &self,
        stream: Stream,
        function: &str,
        (ws, ws_bytes, needed): (u64, usize, usize),
        call: impl FnOnce(&Api, Handle) -> Status,
    ) -> Result<(), CudnnError> {
        if ws_bytes < needed || (needed > 0 && ws == 0) {
            return Err(CudnnError::new(format!(
                "{function}: a workspace of {ws_bytes} bytes at {ws:#x} was given, {needed} are \
                 needed, for {:?}",
                self.key
            )));
        }
        let lib = self.handle.lib;
        let ctx = DebugAsDisplay(&self.key);
        let guard = lock(&self.handle.raw);
        // SAFETY: the handle is locked; `stream` is valid per the caller's contract.
        let st = unsafe { (lib.api.cudnnSetStream)(guard.0, stream) };
        lib.check(st, "cudnnSetStream", &ctx)?;
        lib.check(call(&lib.api, guard.0), function, &ctx)
    }

    /// `y = conv(x, w)` (y is overwritten: beta = 0).
    ///
    /// # Safety
    /// For this and the other launch methods:
    /// * The CUDA context of the plan's device is current on this thread, and `stream` is null
    ///   or a live `CUstream` of that context. The work is queued on `stream` and runs
    ///   asynchronously: every buffer must stay allocated until it has completed.
    /// * Each tensor argument is a device pointer (`CUdeviceptr`) in that context to a
    ///   contiguous NCHW buffer of the key's element type, at least as large as its shape:
    ///   x, dx [`ConvKey::input_shape`]; w, dw [`ConvKey::filter_shape`]; y, dy
    ///   [`ConvPlan::output_shape`]; bias, db `o` elements. Pointers should be 16-byte aligned
    ///   (cuDNN may reject misaligned ones with an error).
    /// * Outputs do not overlap inputs or the workspace; nothing else uses them meanwhile.
    /// * `ws` points to at least `ws_bytes` bytes of device memory (it may be 0 when
    ///   [`ConvPlan::workspace_bytes`] is 0). A too-small `ws_bytes` is reported as an error.
    pub unsafe fn forward(
        &self,
        stream: *mut c_void,
        x: u64,
        w: u64,
        y: u64,
        ws: u64,
        ws_bytes: usize,
    ) -> Result<(), CudnnError> {
        let (conv, algo, needed) = (self.conv_fwd.raw, self.fwd.algo, self.fwd.workspace);
        let (xd, wd, yd) = (self.x.raw, self.w.raw, self.y.raw);
        // SAFETY: forwarded from this function's contract; arguments in cuDNN's order.
        unsafe {
            self.launch(
                stream,
                "cudnnConvolutionForward",
                (ws, ws_bytes, needed),
                |api, h| {
                    let (x, w, y, ws) = (dptr(x), dptr(w), dptr_mut(y), dptr_mut(ws));
                    (api.cudnnConvolutionForward)(
                        h,
                        one(),
                        xd,
                        x,
                        wd,
                        w,
                        conv,
                        algo,
                        ws,
                        ws_bytes,
                        zero(),
                        yd,
                        y,
                    )
                },
            )
        }
    }

    /// `y[n, o, i, j] += bias[o]` (cudnnAddTensor with alpha = 1 on the (1, O, 1, 1) bias and
    /// beta = 1 on y). No workspace.
    ///
    /// # Safety
    /// As for [`ConvPlan::forward`].
    pub unsafe fn add_bias(
        &self,
        stream: *mut c_void,
        bias: u64,
        y: u64,
    ) -> Result<(), CudnnError> {
        let (bd, yd) = (self.bias.raw, self.y.raw);
        // SAFETY: forwarded from this function's contract; arguments in cuDNN's order.
        unsafe {
            self.launch(stream, "cudnnAddTensor", (0, 0, 0), |api, h| {
                (api.cudnnAddTensor)(h, one(), bd, dptr(bias), one(), yd, dptr_mut(y))
            })
        }
    }

    /// `dx = conv_transpose(dy, w)`, the gradient of the forward pass with respect to x
    /// (dx is overwritten: beta = 0).
    ///
    /// # Safety
    /// As for [`ConvPlan::forward`].
    pub unsafe fn backward_data(
        &self,
        stream: *mut c_void,
        w: u64,
        dy: u64,
        dx: u64,
        ws: u64,
        ws_bytes: usize,
    ) -> Result<(), CudnnError> {
        let (conv, algo, needed) = (
            self.conv_bwd_data.raw,
            self.bwd_data.algo,
            self.bwd_data.workspace,
        );
        let (wd, dyd, dxd) = (self.w.raw, self.y.raw, self.x.raw);
        // SAFETY: forwarded from this function's contract; arguments in cuDNN's order.
        unsafe {
            self.launch(
                stream,
                "cudnnConvolutionBackwardData",
                (ws, ws_bytes, needed),
                |api, h| {
                    let (w, dy, dx, ws) = (dptr(w), dptr(dy), dptr_mut(dx), dptr_mut(ws));
                    (api.cudnnConvolutionBackwardData)(
                        h,
                        one(),
                        wd,
                        w,
                        dyd,
                        dy,
                        conv,
                        algo,
                        ws,
                        ws_bytes,
                        zero(),
                        dxd,
                        dx,
                    )
                },
            )
        }
    }

    /// `dw[o, c, p, q] = sum_{n, i, j} dy[n, o, i, j] * x[n, c, i*s + p - pad, j*s + q - pad]`,
    /// the gradient with respect to w (dw is overwritten: beta = 0).
    ///
    /// # Safety
    /// As for [`ConvPlan::forward`].
    pub unsafe fn backward_filter(
        &self,
        stream: *mut c_void,
        x: u64,
        dy: u64,
        dw: u64,
        ws: u64,
        ws_bytes: usize,
    ) -> Result<(), CudnnError> {
        let (conv, algo, needed) = (
            self.conv_bwd_filter.raw,
            self.bwd_filter.algo,
            self.bwd_filter.workspace,
        );
        let (xd, dyd, dwd) = (self.x.raw, self.y.raw, self.w.raw);
        // SAFETY: forwarded from this function's contract; arguments in cuDNN's order.
        unsafe {
            self.launch(
                stream,
                "cudnnConvolutionBackwardFilter",
                (ws, ws_bytes, needed),
                |api, h| {
                    let (x, dy, dw, ws) = (dptr(x), dptr(dy), dptr_mut(dw), dptr_mut(ws));
                    (api.cudnnConvolutionBackwardFilter)(
                        h,
                        one(),
                        xd,
                        x,
                        dyd,
                        dy,
                        conv,
                        algo,
                        ws,
                        ws_bytes,
                        zero(),
                        dwd,
                        dw,
                    )
                },
            )
        }
    }

    /// `db[o] = sum_{n, i, j} dy[n, o, i, j]`, the bias gradient (db is overwritten: beta = 0).
    /// No workspace.
    ///
    /// # Safety
    /// As for [`ConvPlan::forward`].
    pub unsafe fn backward_bias(
        &self,
        stream: *mut c_void,
        dy: u64,
        db: u64,
    ) -> Result<(), CudnnError> {
        let (dyd, dbd) = (self.y.raw, self.bias.raw);
        // SAFETY: forwarded from this function's contract; arguments in cuDNN's order.
        unsafe {
            self.launch(
                stream,
                "cudnnConvolutionBackwardBias",
                (0, 0, 0),
                |api, h| {
                    (api.cudnnConvolutionBackwardBias)(
                        h,
                        one(),
                        dyd,
                        dptr(dy),
                        zero(),
                        dbd,
                        dptr_mut(db),
                    )
                },
            )
        }
    }
}

/// Host scaling factors: float for float, half and bfloat16 data.
static ONE: f32 = 1.0;
static ZERO: f32 = 0.0;

fn one() -> *const c_void {
    ptr::addr_of!(ONE).cast()
}

fn zero() -> *const c_void {
    ptr::addr_of!(ZERO).cast()
}

/// A `CUdeviceptr` as the `const void*` cuDNN takes.
fn dptr(p: u64) -> *const c_void {
    p as usize as *const c_void
}

/// A `CUdeviceptr` as the `void*` cuDNN takes.
fn dptr_mut(p: u64) -> *mut c_void {
    p as usize as *mut c_void
}

/// Formats a key with `{:?}` where a `Display` is wanted (error contexts).
struct DebugAsDisplay<'a, T: fmt::Debug>(&'a T);

impl<T: fmt::Debug> fmt::Display for DebugAsDisplay<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Tests (no GPU or cuDNN needed)
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::library::{disabled_by, enabled_by, version_string, version_supported};
    use super::*;

    fn key(h: usize, w: usize, k: usize, stride: usize, pad: usize) -> ConvKey {
        ConvKey {
            n: 2,
            c: 3,
            h,
            w,
            o: 8,
            k,
            stride,
            pad,
            dtype: ConvDType::F32,
        }
    }

    #[test]
    fn output_size_arithmetic() {
        assert_eq!(key(32, 32, 3, 1, 1).validate(), Ok([2, 8, 32, 32]));
        assert_eq!(key(32, 32, 3, 2, 1).validate(), Ok([2, 8, 16, 16]));
        assert_eq!(key(32, 32, 1, 1, 0).validate(), Ok([2, 8, 32, 32]));
        assert_eq!(key(7, 7, 3, 2, 0).validate(), Ok([2, 8, 3, 3]));
        // Non-square input: (5 + 2 - 3) / 2 + 1 = 3 and (9 + 2 - 3) / 2 + 1 = 5.
        assert_eq!(key(5, 9, 3, 2, 1).validate(), Ok([2, 8, 3, 5]));
        // Kernel as large as the padded input: a single output position.
        assert_eq!(key(1, 1, 3, 1, 1).validate(), Ok([2, 8, 1, 1]));
        assert_eq!(key(4, 4, 3, 1, 0).output_shape(), Some([2, 8, 2, 2]));
        assert_eq!(key(2, 2, 5, 1, 1).output_shape(), None);
        assert_eq!(key(4, 4, 3, 0, 0).output_shape(), None);
    }

    #[test]
    fn invalid_keys_are_rejected_with_the_key_named() {
        let too_big = i32::MAX as usize + 1;
        let err = key(too_big, 4, 3, 1, 1).validate().unwrap_err();
        assert!(
            err.message().contains("h = 2147483648 does not fit in i32"),
            "{err}"
        );
        assert!(err.message().contains("ConvKey {"), "{err}");

        let err = ConvKey {
            o: too_big,
            ..key(4, 4, 3, 1, 1)
        }
        .validate()
        .unwrap_err();
        assert!(err.message().contains("o = "), "{err}");
        let err = key(4, 4, 3, 1, too_big).validate().unwrap_err();
        assert!(err.message().contains("pad = "), "{err}");

        // Every dimension fits, but x has 2^32 elements.
        let err = ConvKey {
            n: 65536,
            c: 65536,
            h: 1,
            w: 1,
            k: 1,
            pad: 0,
            ..key(1, 1, 1, 1, 0)
        }
        .validate()
        .unwrap_err();
        assert!(err.message().contains("x [65536, 65536, 1, 1]"), "{err}");

        assert!(key(4, 4, 3, 0, 1)
            .validate()
            .unwrap_err()
            .message()
            .contains("stride is 0"));
        assert!(ConvKey {
            n: 0,
            ..key(4, 4, 3, 1, 1)
        }
        .validate()
        .is_err());
        let err = key(2, 2, 5, 1, 1).validate().unwrap_err();
        assert!(err.message().contains("kernel is larger"), "{err}");
        // Padding may be 0.
        assert!(key(4, 4, 3, 1, 0).validate().is_ok());
    }

    #[test]
    fn missing_library_gives_errors_not_panics() {
        let k = key(8, 8, 3, 1, 1);
        match library() {
            None => {
                // SAFETY: fails before any cuDNN call (library unavailable).
                let err = unsafe { plan(0, ptr::null_mut(), k) }.unwrap_err();
                assert!(err.message().contains("cuDNN is not available"), "{err}");
                assert!(err.message().contains("ConvKey"), "{err}");
                // Asked again: still None, still an error (the load is attempted once).
                assert!(library().is_none());
                // SAFETY: as above.
                assert!(unsafe { plan(1, ptr::null_mut(), k) }.is_err());
            }
            Some(lib) => eprintln!(
                "cuDNN {} present; skipping the load-failure checks",
                lib.version()
            ),
        }
        // An invalid key is rejected before cuDNN is touched, present or not.
        // SAFETY: validation fails before any cuDNN call.
        let err = unsafe { plan(0, ptr::null_mut(), key(2, 2, 5, 1, 0)) }.unwrap_err();
        assert!(err.message().contains("kernel is larger"), "{err}");
    }

    #[test]
    fn load_failure_message_is_one_line() {
        if library().is_some() {
            return;
        }
        let message = CudnnLib::open().err().expect("no cuDNN on this machine");
        assert!(!message.contains('\n'), "{message}");
        assert!(
            message.starts_with("ddpm: cuDNN not found (libcudnn.so.9: "),
            "{message}"
        );
        assert!(message.contains("; libcudnn.so: "), "{message}");
        assert!(
            message.ends_with("); convolutions use the built-in CUDA kernels"),
            "{message}"
        );
    }

    #[test]
    fn environment_switches() {
        for off in ["0", "false", "OFF", " no "] {
            assert!(disabled_by(Some(off)), "{off}");
        }
        for on in [None, Some("1"), Some(""), Some("yes")] {
            assert!(!disabled_by(on), "{on:?}");
        }
        assert!(enabled_by(Some("1")) && enabled_by(Some("true")));
        assert!(!enabled_by(None) && !enabled_by(Some("0")));
    }

    #[test]
    fn versions() {
        assert!(version_supported(90000) && version_supported(90100) && version_supported(92100));
        assert!(!version_supported(8907) && !version_supported(100000));
        assert_eq!(version_string(91002), "9.10.2");
        assert_eq!(version_string(8907), "8.9.7");
    }

    #[test]
    fn perf_struct_matches_the_c_layout() {
        use std::mem::{align_of, offset_of, size_of};
        // enum algo; enum status; float time; size_t memory; enum determinism; enum mathType;
        // int reserved[3]  (LP64: 4 + 4 + 4 + pad 4 + 8 + 4 + 4 + 12 + tail pad 4 = 48).
        assert_eq!(size_of::<AlgoPerf>(), 48);
        assert_eq!(align_of::<AlgoPerf>(), 8);
        assert_eq!(offset_of!(AlgoPerf, status), 4);
        assert_eq!(offset_of!(AlgoPerf, time), 8);
        assert_eq!(offset_of!(AlgoPerf, memory), 16);
        assert_eq!(offset_of!(AlgoPerf, determinism), 24);
        assert_eq!(offset_of!(AlgoPerf, math_type), 28);
        assert_eq!(offset_of!(AlgoPerf, reserved), 32);
        assert_eq!(size_of::<Status>(), size_of::<c_int>());
    }

    #[test]
    fn dtype_mapping() {
        use ConvDType::*;
        assert_eq!(
            (F32.data_type(), F32.math_type()),
            (DataType::FLOAT, MathType::FMA)
        );
        assert_eq!(
            (Tf32.data_type(), Tf32.math_type()),
            (DataType::FLOAT, MathType::DEFAULT)
        );
        assert_eq!(
            (Bf16.data_type(), Bf16.math_type()),
            (DataType::BFLOAT16, MathType::TENSOR_OP)
        );
        assert_eq!(
            (F16.data_type(), F16.math_type()),
            (DataType::HALF, MathType::TENSOR_OP)
        );
        for dt in [F32, Tf32, Bf16, F16] {
            assert_eq!(dt.compute_type(), DataType::FLOAT);
        }
        assert_eq!(
            [F32, Tf32, Bf16, F16].map(|d| d.element_bytes()),
            [4, 4, 2, 2]
        );
        // cuDNN 9 values.
        assert_eq!(
            [DataType::FLOAT.0, DataType::HALF.0, DataType::BFLOAT16.0],
            [0, 2, 9]
        );
        assert_eq!(
            [
                MathType::DEFAULT.0,
                MathType::TENSOR_OP.0,
                MathType::TENSOR_OP_ALLOW_CONVERSION.0,
                MathType::FMA.0
            ],
            [0, 1, 2, 3]
        );
        assert_eq!(
            (
                TensorFormat::NCHW.0,
                ConvMode::CROSS_CORRELATION.0,
                Determinism::DETERMINISTIC.0
            ),
            (0, 1, 1)
        );
    }

    #[test]
    fn algorithm_filter() {
        let good = AlgoPerf {
            algo: Algo(1),
            status: Status::SUCCESS,
            time: 0.5,
            memory: 1024,
            determinism: Determinism::DETERMINISTIC,
            math_type: MathType::FMA,
            reserved: [0; 3],
        };
        assert!(qualifies(&good, ConvDType::F32, MAX_WORKSPACE_BYTES, true));
        assert!(!qualifies(
            &AlgoPerf {
                status: Status(3000),
                ..good
            },
            ConvDType::F32,
            MAX_WORKSPACE_BYTES,
            true
        ));
        assert!(!qualifies(
            &AlgoPerf {
                determinism: Determinism(0),
                ..good
            },
            ConvDType::F32,
            MAX_WORKSPACE_BYTES,
            true
        ));
        assert!(!qualifies(&good, ConvDType::F32, 1023, true));
        // a non-deterministic algorithm qualifies where determinism is not asked for
        let atomic = AlgoPerf { determinism: Determinism(0), ..good };
        assert!(qualifies(&atomic, ConvDType::F32, MAX_WORKSPACE_BYTES, false));
        assert!(!qualifies(&atomic, ConvDType::F32, MAX_WORKSPACE_BYTES, true));
        assert!(!qualifies(
            &AlgoPerf::EMPTY,
            ConvDType::Tf32,
            MAX_WORKSPACE_BYTES,
            true
        ));

        // Plain f32 stays on FMA kernels; the others may use tensor cores but never down-convert.
        let tensor_op = AlgoPerf {
            math_type: MathType::TENSOR_OP,
            ..good
        };
        let default = AlgoPerf {
            math_type: MathType::DEFAULT,
            ..good
        };
        let convert = AlgoPerf {
            math_type: MathType::TENSOR_OP_ALLOW_CONVERSION,
            ..good
        };
        assert!(!qualifies(&tensor_op, ConvDType::F32, MAX_WORKSPACE_BYTES, true));
        assert!(!qualifies(&default, ConvDType::F32, MAX_WORKSPACE_BYTES, true));
        for dt in [ConvDType::Tf32, ConvDType::Bf16, ConvDType::F16] {
            assert!(qualifies(&tensor_op, dt, MAX_WORKSPACE_BYTES, true));
            assert!(qualifies(&default, dt, MAX_WORKSPACE_BYTES, true));
            assert!(qualifies(&good, dt, MAX_WORKSPACE_BYTES, true));
            assert!(!qualifies(&convert, dt, MAX_WORKSPACE_BYTES, true));
        }
    }

    #[test]
    fn errors_display_their_message() {
        let e = CudnnError::new("cudnnConvolutionForward failed: X");
        assert_eq!(e.to_string(), "cudnnConvolutionForward failed: X");
        let _: &dyn std::error::Error = &e;
    }
}
