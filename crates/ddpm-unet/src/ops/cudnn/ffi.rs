//! The hand-written FFI of cuDNN 9 that the convolutions use: the handle and descriptor types, the
//! enum values, the algorithm-result struct, and the table of entry points resolved at load time.
//! Every enum value, struct layout and signature is cuDNN 9's (headers `cudnn_graph.h`,
//! `cudnn_ops.h`, `cudnn_cnn.h`), checked against the bindgen output for cuDNN 9.21 in cudarc
//! 0.19.10 (`src/cudnn/sys/mod.rs`).

use std::ffi::{c_char, c_int, c_void};

use libloading::Library;

// ---------------------------------------------------------------------------------------------
// FFI: types and constants (cuDNN 9 values)
// ---------------------------------------------------------------------------------------------

/// `struct cudnnContext`, only ever behind a pointer.
#[repr(C)]
pub(super) struct CudnnContext {
    _opaque: [u8; 0],
}
/// `struct cudnnTensorStruct`.
#[repr(C)]
pub(super) struct TensorStruct {
    _opaque: [u8; 0],
}
/// `struct cudnnFilterStruct`.
#[repr(C)]
pub(super) struct FilterStruct {
    _opaque: [u8; 0],
}
/// `struct cudnnConvolutionStruct`.
#[repr(C)]
pub(super) struct ConvStruct {
    _opaque: [u8; 0],
}

/// `cudnnHandle_t`.
pub(super) type Handle = *mut CudnnContext;
/// `cudnnTensorDescriptor_t`.
pub(super) type TensorDesc = *mut TensorStruct;
/// `cudnnFilterDescriptor_t`.
pub(super) type FilterDesc = *mut FilterStruct;
/// `cudnnConvolutionDescriptor_t`.
pub(super) type ConvDesc = *mut ConvStruct;
/// `cudaStream_t` (= `CUstream`, the driver API's stream pointer).
pub(super) type Stream = *mut c_void;

// C enums are passed as `int`-sized values. They are wrapped in distinct `repr(transparent)`
// newtypes (ABI-identical to `c_int`) so that, e.g., swapping the format and data-type arguments
// of cudnnSetTensor4dDescriptor / cudnnSetFilter4dDescriptor (whose orders differ) cannot compile,
// and so that reading an unexpected value back from cuDNN is never undefined behaviour.

/// `cudnnStatus_t`.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Status(pub(super) c_int);
impl Status {
    /// CUDNN_STATUS_SUCCESS
    pub(super) const SUCCESS: Status = Status(0);
}

/// `cudnnDataType_t`.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct DataType(pub(super) c_int);
impl DataType {
    /// CUDNN_DATA_FLOAT
    pub(super) const FLOAT: DataType = DataType(0);
    /// CUDNN_DATA_HALF
    pub(super) const HALF: DataType = DataType(2);
    /// CUDNN_DATA_BFLOAT16
    pub(super) const BFLOAT16: DataType = DataType(9);
}

/// `cudnnTensorFormat_t`.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct TensorFormat(pub(super) c_int);
impl TensorFormat {
    /// CUDNN_TENSOR_NCHW
    pub(super) const NCHW: TensorFormat = TensorFormat(0);
}

/// `cudnnMathType_t`.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct MathType(pub(super) c_int);
impl MathType {
    /// CUDNN_DEFAULT_MATH: FMA kernels, plus TF32 tensor cores for float data on Ampere and later.
    pub(super) const DEFAULT: MathType = MathType(0);
    /// CUDNN_TENSOR_OP_MATH: tensor cores allowed, no down-conversion of the inputs.
    pub(super) const TENSOR_OP: MathType = MathType(1);
    /// CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION: tensor cores allowed, inputs may be down-converted.
    pub(super) const TENSOR_OP_ALLOW_CONVERSION: MathType = MathType(2);
    /// CUDNN_FMA_MATH: only FMA kernels (no TF32, no tensor cores).
    pub(super) const FMA: MathType = MathType(3);
}

/// `cudnnConvolutionMode_t`.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct ConvMode(pub(super) c_int);
impl ConvMode {
    /// CUDNN_CROSS_CORRELATION (what deep-learning frameworks call convolution).
    pub(super) const CROSS_CORRELATION: ConvMode = ConvMode(1);
}

/// One of `cudnnConvolutionFwdAlgo_t`, `cudnnConvolutionBwdDataAlgo_t` or
/// `cudnnConvolutionBwdFilterAlgo_t`; the value is only passed back to cuDNN.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Algo(pub(super) c_int);

/// `cudnnDeterminism_t`.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Determinism(pub(super) c_int);
impl Determinism {
    /// CUDNN_DETERMINISTIC
    pub(super) const DETERMINISTIC: Determinism = Determinism(1);
}

/// `cudnnConvolutionFwdAlgoPerf_t`, `cudnnConvolutionBwdDataAlgoPerf_t` and
/// `cudnnConvolutionBwdFilterAlgoPerf_t`: the three structs differ only in the enum type of
/// `algo`, so one layout serves all of them. On LP64 this is 48 bytes (checked in the tests).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct AlgoPerf {
    pub(super) algo: Algo,
    pub(super) status: Status,
    /// Milliseconds (Find only; not meaningful for the `_v7` heuristics).
    pub(super) time: f32,
    /// Workspace bytes.
    pub(super) memory: usize,
    pub(super) determinism: Determinism,
    pub(super) math_type: MathType,
    pub(super) reserved: [c_int; 3],
}

impl AlgoPerf {
    /// A slot for cuDNN to fill; the status is deliberately not SUCCESS.
    pub(super) const EMPTY: AlgoPerf = AlgoPerf {
        algo: Algo(-1),
        status: Status(-1),
        time: 0.0,
        memory: 0,
        determinism: Determinism(0),
        math_type: MathType(-1),
        reserved: [0; 3],
    };
}

// ---------------------------------------------------------------------------------------------
// FFI: the functions (signatures as in cuDNN 9's headers)
// ---------------------------------------------------------------------------------------------

/// Declares the table of cuDNN entry points; each field is named after its C symbol and holds a
/// plain function pointer copied out of the `libloading::Symbol`.
macro_rules! cudnn_api {
    ($( fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty; )+) => {
        #[allow(non_snake_case)]
        pub(super) struct Api {
            $( pub(super) $name: unsafe extern "C" fn($($arg: $ty),*) -> $ret, )+
        }

        impl Api {
            /// Resolves every entry point, naming the first one that is missing.
            ///
            /// # Safety
            /// `lib` must be a cuDNN library, whose symbols have the signatures declared here.
            pub(super) unsafe fn load(lib: &Library) -> Result<Api, String> {
                // SAFETY: forwarded from this function's contract. The copied function pointers
                // are only called while `lib` stays loaded (CudnnLib owns it).
                Ok(Api {
                    $( $name: *unsafe {
                        lib.get::<unsafe extern "C" fn($($ty),*) -> $ret>(stringify!($name).as_bytes())
                    }
                    .map_err(|e| format!("missing symbol {}: {e}", stringify!($name)))?, )+
                })
            }
        }
    };
}

cudnn_api! {
    // cudnn_graph.h: library, handle, errors
    fn cudnnGetVersion() -> usize;
    fn cudnnGetErrorString(status: Status) -> *const c_char;
    fn cudnnCreate(handle: *mut Handle) -> Status;
    fn cudnnDestroy(handle: Handle) -> Status;
    fn cudnnSetStream(handle: Handle, stream: Stream) -> Status;

    // cudnn_ops.h: tensor and filter descriptors, AddTensor
    fn cudnnCreateTensorDescriptor(desc: *mut TensorDesc) -> Status;
    fn cudnnDestroyTensorDescriptor(desc: TensorDesc) -> Status;
    // NB: format before data type here ...
    fn cudnnSetTensor4dDescriptor(desc: TensorDesc, format: TensorFormat, data_type: DataType,
        n: c_int, c: c_int, h: c_int, w: c_int) -> Status;
    fn cudnnCreateFilterDescriptor(desc: *mut FilterDesc) -> Status;
    fn cudnnDestroyFilterDescriptor(desc: FilterDesc) -> Status;
    // ... but data type before format here.
    fn cudnnSetFilter4dDescriptor(desc: FilterDesc, data_type: DataType, format: TensorFormat,
        k: c_int, c: c_int, h: c_int, w: c_int) -> Status;
    fn cudnnAddTensor(handle: Handle, alpha: *const c_void, a_desc: TensorDesc, a: *const c_void,
        beta: *const c_void, c_desc: TensorDesc, c: *mut c_void) -> Status;

    // cudnn_cnn.h: convolution descriptor
    fn cudnnCreateConvolutionDescriptor(desc: *mut ConvDesc) -> Status;
    fn cudnnDestroyConvolutionDescriptor(desc: ConvDesc) -> Status;
    // u, v = vertical, horizontal stride
    fn cudnnSetConvolution2dDescriptor(desc: ConvDesc, pad_h: c_int, pad_w: c_int, u: c_int,
        v: c_int, dilation_h: c_int, dilation_w: c_int, mode: ConvMode,
        compute_type: DataType) -> Status;
    fn cudnnSetConvolutionMathType(desc: ConvDesc, math_type: MathType) -> Status;
    fn cudnnGetConvolution2dForwardOutputDim(desc: ConvDesc, x_desc: TensorDesc,
        w_desc: FilterDesc, n: *mut c_int, c: *mut c_int, h: *mut c_int, w: *mut c_int) -> Status;

    // cudnn_cnn.h: forward
    fn cudnnGetConvolutionForwardAlgorithmMaxCount(handle: Handle, count: *mut c_int) -> Status;
    fn cudnnGetConvolutionForwardAlgorithm_v7(handle: Handle, x_desc: TensorDesc,
        w_desc: FilterDesc, conv: ConvDesc, y_desc: TensorDesc, requested: c_int,
        returned: *mut c_int, results: *mut AlgoPerf) -> Status;
    fn cudnnFindConvolutionForwardAlgorithm(handle: Handle, x_desc: TensorDesc,
        w_desc: FilterDesc, conv: ConvDesc, y_desc: TensorDesc, requested: c_int,
        returned: *mut c_int, results: *mut AlgoPerf) -> Status;
    fn cudnnGetConvolutionForwardWorkspaceSize(handle: Handle, x_desc: TensorDesc,
        w_desc: FilterDesc, conv: ConvDesc, y_desc: TensorDesc, algo: Algo,
        bytes: *mut usize) -> Status;
    fn cudnnConvolutionForward(handle: Handle, alpha: *const c_void, x_desc: TensorDesc,
        x: *const c_void, w_desc: FilterDesc, w: *const c_void, conv: ConvDesc, algo: Algo,
        workspace: *mut c_void, workspace_bytes: usize, beta: *const c_void, y_desc: TensorDesc,
        y: *mut c_void) -> Status;

    // cudnn_cnn.h: backward data
    fn cudnnGetConvolutionBackwardDataAlgorithmMaxCount(handle: Handle, count: *mut c_int) -> Status;
    fn cudnnGetConvolutionBackwardDataAlgorithm_v7(handle: Handle, w_desc: FilterDesc,
        dy_desc: TensorDesc, conv: ConvDesc, dx_desc: TensorDesc, requested: c_int,
        returned: *mut c_int, results: *mut AlgoPerf) -> Status;
    fn cudnnFindConvolutionBackwardDataAlgorithm(handle: Handle, w_desc: FilterDesc,
        dy_desc: TensorDesc, conv: ConvDesc, dx_desc: TensorDesc, requested: c_int,
        returned: *mut c_int, results: *mut AlgoPerf) -> Status;
    fn cudnnGetConvolutionBackwardDataWorkspaceSize(handle: Handle, w_desc: FilterDesc,
        dy_desc: TensorDesc, conv: ConvDesc, dx_desc: TensorDesc, algo: Algo,
        bytes: *mut usize) -> Status;
    fn cudnnConvolutionBackwardData(handle: Handle, alpha: *const c_void, w_desc: FilterDesc,
        w: *const c_void, dy_desc: TensorDesc, dy: *const c_void, conv: ConvDesc, algo: Algo,
        workspace: *mut c_void, workspace_bytes: usize, beta: *const c_void,
        dx_desc: TensorDesc, dx: *mut c_void) -> Status;

    // cudnn_cnn.h: backward filter
    fn cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(handle: Handle, count: *mut c_int) -> Status;
    fn cudnnGetConvolutionBackwardFilterAlgorithm_v7(handle: Handle, x_desc: TensorDesc,
        dy_desc: TensorDesc, conv: ConvDesc, dw_desc: FilterDesc, requested: c_int,
        returned: *mut c_int, results: *mut AlgoPerf) -> Status;
    fn cudnnFindConvolutionBackwardFilterAlgorithm(handle: Handle, x_desc: TensorDesc,
        dy_desc: TensorDesc, conv: ConvDesc, dw_desc: FilterDesc, requested: c_int,
        returned: *mut c_int, results: *mut AlgoPerf) -> Status;
    fn cudnnGetConvolutionBackwardFilterWorkspaceSize(handle: Handle, x_desc: TensorDesc,
        dy_desc: TensorDesc, conv: ConvDesc, dw_desc: FilterDesc, algo: Algo,
        bytes: *mut usize) -> Status;
    fn cudnnConvolutionBackwardFilter(handle: Handle, alpha: *const c_void, x_desc: TensorDesc,
        x: *const c_void, dy_desc: TensorDesc, dy: *const c_void, conv: ConvDesc, algo: Algo,
        workspace: *mut c_void, workspace_bytes: usize, beta: *const c_void,
        dw_desc: FilterDesc, dw: *mut c_void) -> Status;

    // cudnn_cnn.h: bias gradient
    fn cudnnConvolutionBackwardBias(handle: Handle, alpha: *const c_void, dy_desc: TensorDesc,
        dy: *const c_void, beta: *const c_void, db_desc: TensorDesc, db: *mut c_void) -> Status;
}
