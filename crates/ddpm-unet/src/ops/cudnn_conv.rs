//! The convolution on CUDA through cuDNN, the library PyTorch's convolutions run on: forward,
//! backward data and backward filter as three cuDNN calls, with no column matrix built or kept for
//! the backward pass (the column path of `ops/columns.rs` keeps one of C k^2 times the input's size
//! per layer).
//!
//! ```text
//!   y  = x * w                      cudnnConvolutionForward          (cross-correlation, NCHW)
//!   dx = dy *^T w                   cudnnConvolutionBackwardData     (the transposed convolution)
//!   dw = sum_b dy_b * x_b           cudnnConvolutionBackwardFilter
//! ```
//!
//! The bias, shared (O) or one row per image (B, O), is added in place to cuDNN's output by the
//! project's kernel `ddpm_add_bias_*` (no second output, no graph node of its own); its gradient is
//! the sum of dy over H', W' (and B for a shared bias), in f32.
//! cuDNN is loaded at run time (`ops/cudnn/`); without it, or for a geometry it has no
//! qualifying algorithm for, the convolution takes the column path and says so once. Each
//! geometry's plan (descriptors and algorithms) is made once and cached; f32 runs in full precision,
//! or in TF32 after `candle_core::cuda::set_gemm_reduced_precision_f32(true)` (the products' switch),
//! bf16 and f16 on tensor cores with f32 accumulation.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, DevicePtr, DevicePtrMut, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::conv::Geometry;
use super::cudnn::{self, ConvDType, ConvKey, ConvPlan, CudnnError};

/// The cuDNN plan for a convolution of geometry `g` to `o` output channels, input and weight in
/// `dtype` on `device`, or `None` where the convolution must take another path: not CUDA, the
/// project's kernels off, cuDNN not loaded, a dtype other than f32, bf16 or f16, or no qualifying
/// algorithm for the geometry (deterministic unless `DDPM_CUDNN_DETERMINISTIC=0`; said once).
pub(super) fn plan_for(device: &candle_core::Device, dtype: DType, g: &Geometry, o: usize) -> Option<Arc<ConvPlan>> {
    let candle_core::Device::Cuda(dev) = device else { return None };
    if !super::cuda_kernels_enabled(device) {
        return None;
    }
    let dtype = match dtype {
        DType::F32 if candle_core::cuda::gemm_reduced_precision_f32() => ConvDType::Tf32,
        DType::F32 => ConvDType::F32,
        DType::BF16 => ConvDType::Bf16,
        DType::F16 => ConvDType::F16,
        _ => return None,
    };
    cudnn::library()?;
    let key = ConvKey { n: g.b, c: g.c, h: g.h, w: g.w, o, k: g.k, stride: g.stride, pad: g.pad, dtype };
    let stream = dev.cuda_stream();
    // cudnnCreate binds a handle to the thread's current context: make it the device's
    stream.context().bind_to_thread().ok()?;
    // SAFETY: the stream is the live stream of the device whose context is now current, and the
    // plans of this device are only ever launched on its streams.
    match unsafe { cudnn::plan(stream.context().ordinal(), stream.cu_stream() as *mut std::ffi::c_void, key) } {
        Ok(plan) => Some(plan),
        Err(e) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| eprintln!("ddpm: cuDNN cannot run a convolution ({e}); such convolutions use the built-in CUDA kernels"));
            None
        }
    }
}

/// y = conv2d(x, w) + bias by cuDNN with `plan` (made by [`plan_for`] for these tensors), the bias
/// (in x's dtype) shared (O) or per image (B, O); differentiable in x, w and bias.
pub(super) fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, plan: Arc<ConvPlan>) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match bias {
        None => x.apply_op2(&w, Forward(plan)),
        Some(b) => {
            let per_image = b.rank() == 2;
            x.apply_op3(&w, &b.contiguous()?, ForwardBias { plan, per_image })
        }
    }
}

/// The gradients (dx, dw) of [`conv2d`] with `plan` for the output gradient `dy`, by cuDNN's backward
/// data and backward filter passes outside candle's graph (no bias: its gradient is a sum of dy).
pub(super) fn gradients(x: &Tensor, w: &Tensor, dy: &Tensor, plan: &Arc<ConvPlan>) -> Result<(Tensor, Tensor)> {
    let _span = ddpm_core::ops::profile::span(x.device(), "conv backward");
    let dy = dy.detach().contiguous()?;
    let dx = w.detach().contiguous()?.apply_op2_no_bwd(&dy, &Backward(plan.clone(), Pass::BackwardData))?;
    let dw = x.detach().contiguous()?.apply_op2_no_bwd(&dy, &Backward(plan.clone(), Pass::BackwardFilter))?;
    Ok((dx, dw))
}

/// A cuDNN error as a candle error.
fn error(e: CudnnError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// The elements of a contiguous CUDA storage as a view of `T`, or an error naming the op and the
/// argument.
fn view<'a, T: CudaDType + DeviceRepr>(s: &'a CudaStorage, l: &Layout, op: &str, what: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => candle_core::bail!("{op}: {what} must be contiguous"),
    }
}

/// Which of the plan's three convolutions an op runs, on which two inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// (x, w) -> y.
    Forward,
    /// (w, dy) -> dx.
    BackwardData,
    /// (x, dy) -> dw.
    BackwardFilter,
}

impl Pass {
    /// The shape of the pass's output: y (B, O, H', W'), dx (B, C, H, W) or dw (O, C, k, k).
    fn output_dims(self, plan: &ConvPlan) -> [usize; 4] {
        match self {
            Pass::Forward => plan.output_shape(),
            Pass::BackwardData => plan.key().input_shape(),
            Pass::BackwardFilter => plan.key().filter_shape(),
        }
    }
}

/// Runs `pass` of `plan` on the contiguous storages `a` and `b` (in the pass's argument order) into a
/// fresh output of `T`, with a workspace of the plan's size (from candle's stream-ordered pool).
fn run<T: CudaDType + DeviceRepr>(plan: &ConvPlan, pass: Pass, dev: &CudaDevice, (a, la): (&CudaStorage, &Layout), (b, lb): (&CudaStorage, &Layout)) -> Result<CudaStorage> {
    const OP: &str = "ddpm-conv2d-cudnn";
    let (a, b) = (view::<T>(a, la, OP, "first input")?, view::<T>(b, lb, OP, "second input")?);
    let out_len: usize = pass.output_dims(plan).iter().product();
    let stream = dev.cuda_stream();
    // SAFETY: cuDNN writes every element of the output and reads none before that; the workspace's
    // contents are cuDNN's own.
    let mut out = unsafe { dev.alloc::<T>(out_len) }?;
    let ws_bytes = plan.workspace_bytes();
    let mut ws = unsafe { dev.alloc::<u8>(ws_bytes.max(1)) }?;
    {
        // the guards make the stream wait for the buffers' last writers and record this use
        let (pa, _ga) = a.device_ptr(&stream);
        let (pb, _gb) = b.device_ptr(&stream);
        let (po, _go) = out.device_ptr_mut(&stream);
        let (pw, _gw) = ws.device_ptr_mut(&stream);
        let s = stream.cu_stream() as *mut std::ffi::c_void;
        // SAFETY: the plan was made for these shapes and this dtype (the key), each pointer covers the
        // elements its descriptor describes, and the workspace holds the bytes the algorithm asked for.
        unsafe {
            match pass {
                Pass::Forward => plan.forward(s, pa, pb, po, pw, ws_bytes),
                Pass::BackwardData => plan.backward_data(s, pa, pb, po, pw, ws_bytes),
                Pass::BackwardFilter => plan.backward_filter(s, pa, pb, po, pw, ws_bytes),
            }
        }
        .map_err(error)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// [`run`] in the inputs' dtype.
fn run_any(plan: &ConvPlan, pass: Pass, a: (&CudaStorage, &Layout), b: (&CudaStorage, &Layout)) -> Result<CudaStorage> {
    let dev = a.0.device();
    match a.0.dtype() {
        DType::F32 => run::<f32>(plan, pass, dev, a, b),
        DType::BF16 => run::<half::bf16>(plan, pass, dev, a, b),
        DType::F16 => run::<half::f16>(plan, pass, dev, a, b),
        d => candle_core::bail!("ddpm-conv2d-cudnn: no cuDNN convolution in {d:?}"),
    }
}

/// The forward convolution (x, w) -> y; its backward runs [`Backward`] twice.
struct Forward(Arc<ConvPlan>);

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "ddpm-conv2d-cudnn"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("ddpm-conv2d-cudnn runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, sx: &CudaStorage, lx: &Layout, sw: &CudaStorage, lw: &Layout) -> Result<(CudaStorage, Shape)> {
        let y = run_any(&self.0, Pass::Forward, (sx, lx), (sw, lw))?;
        Ok((y, Shape::from(Pass::Forward.output_dims(&self.0).to_vec())))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = gradients(x, w, dy, &self.0)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The forward convolution with its bias, (x, w, bias) -> y = x * w + bias: [`Forward`], then the
/// bias added in place.
struct ForwardBias {
    plan: Arc<ConvPlan>,
    /// The bias has one row per image (B, O), else one value per channel (O).
    per_image: bool,
}

impl candle_core::CustomOp3 for ForwardBias {
    fn name(&self) -> &'static str {
        "ddpm-conv2d-cudnn-bias"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("ddpm-conv2d-cudnn-bias runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, sx: &CudaStorage, lx: &Layout, sw: &CudaStorage, lw: &Layout, sb: &CudaStorage, lb: &Layout) -> Result<(CudaStorage, Shape)> {
        let mut y = run_any(&self.plan, Pass::Forward, (sx, lx), (sw, lw))?;
        add_bias(&mut y, (sb, lb), Pass::Forward.output_dims(&self.plan), self.per_image)?;
        Ok((y, Shape::from(Pass::Forward.output_dims(&self.plan).to_vec())))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, bias: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = gradients(x, w, dy, &self.plan)?;
        let dbias = super::conv::bias_gradient(dy, self.per_image)?.to_dtype(bias.dtype())?;
        Ok((Some(dx), Some(dw), Some(dbias)))
    }
}

/// y[b, o, p] += bias[r, o] in place (r = b per image, else 0) by the kernel `ddpm_add_bias_*`, for
/// y of dims (B, O, H', W') and a contiguous bias of y's dtype.
fn add_bias(y: &mut CudaStorage, (b, lb): (&CudaStorage, &Layout), [n, o, oh, ow]: [usize; 4], per_image: bool) -> Result<()> {
    const OP: &str = "ddpm-conv2d-cudnn-bias";
    let rows = if per_image { n } else { 1 };
    if lb.shape().elem_count() != rows * o || b.dtype() != y.dtype() {
        candle_core::bail!("{OP}: the bias is {:?} in {:?}, the output ({n}, {o}, {oh}, {ow}) in {:?}", lb.dims(), b.dtype(), y.dtype());
    }
    let (len, l) = (n * o * oh * ow, oh * ow);
    if o >= 1 << 32 || l >= 1 << 32 {
        candle_core::bail!("{OP}: {o} channels of {l} positions are too many for the kernel's 32-bit indices");
    }
    fn launch<T: CudaDType + DeviceRepr>(kernel: &str, y: &mut CudaStorage, b: &CudaStorage, lb: &Layout, (len, o, l, per_image): (usize, u32, u32, u32)) -> Result<()> {
        let dev = y.device().clone();
        let bias = view::<T>(b, lb, OP, "the bias")?;
        let mut out = y.as_cuda_slice_mut::<T>()?.slice_mut(0..len);
        let n = len as u64;
        super::cuda::launch!(&dev, kernel, super::cuda::elementwise(len); &mut out, &bias, &n, &o, &l, &per_image);
        Ok(())
    }
    let args = (len, o as u32, l as u32, per_image as u32);
    match y.dtype() {
        DType::F32 => launch::<f32>("ddpm_add_bias_f32", y, b, lb, args),
        DType::BF16 => launch::<half::bf16>("ddpm_add_bias_bf16", y, b, lb, args),
        DType::F16 => launch::<half::f16>("ddpm_add_bias_f16", y, b, lb, args),
        d => candle_core::bail!("{OP}: no bias kernel for {d:?}"),
    }
}

/// One of the backward convolutions: (w, dy) -> dx or (x, dy) -> dw.
struct Backward(Arc<ConvPlan>, Pass);

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "ddpm-conv2d-cudnn-backward"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("ddpm-conv2d-cudnn-backward runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, sa: &CudaStorage, la: &Layout, sb: &CudaStorage, lb: &Layout) -> Result<(CudaStorage, Shape)> {
        let out = run_any(&self.0, self.1, (sa, la), (sb, lb))?;
        Ok((out, Shape::from(self.1.output_dims(&self.0).to_vec())))
    }
}
