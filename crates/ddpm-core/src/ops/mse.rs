//! The training loss L_simple as one fused op: a per-sample weighted mean squared error with an
//! analytic backward.
//!
//! For a prediction p and a target y of shape (N, ...), with M elements per sample and weights w_i:
//!
//!   L        = (1 / N) sum_i w_i (1 / M) sum_j (p_ij - y_ij)^2
//!   dL/dp_ij = g 2 w_i (p_ij - y_ij) / (N M)        (g the incoming gradient of L)
//!
//! candle composes this from sub, sqr, mean (and mul, mean for the weights), each a pass over the
//! batch with its own buffer, and the backward from as many again. Here, for contiguous f32 tensors
//! on the CPU, the forward is one pass (per-sample sums in f64, samples in parallel) and the backward
//! one pass writing dL/dp. The target gets no gradient (it is a constant of the loss). Everything
//! else takes [`weighted_mse_composed`].

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The weight of sample `i`: w_i, or 1 without weights.
fn weight(weights: &Option<Vec<f32>>, i: usize) -> f64 {
    weights.as_ref().map_or(1.0, |w| w[i] as f64)
}

/// The fused forward `(p, y) -> L` (a scalar); the same sizes and weights drive its backward.
#[derive(Clone)]
struct Mse {
    n: usize,
    weights: Option<Vec<f32>>,
}

impl Mse {
    /// The weights a GPU kernel reads and whether there are any: the kernels read 1 for every sample
    /// without, and a one-value placeholder stands in then.
    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn kernel_weights(&self) -> (&[f32], bool) {
        match &self.weights {
            Some(w) => (w, true),
            None => (&[1.0], false),
        }
    }

    /// [`Mse::kernel_weights`] on a CUDA device.
    #[cfg(feature = "cuda")]
    fn device_weights(&self, dev: &candle_core::CudaDevice) -> Result<(candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>, i32)> {
        let (w, has_w) = self.kernel_weights();
        Ok((super::cuda::upload_f32(dev, w)?, has_w as i32))
    }

    /// [`Mse::kernel_weights`] on a Metal device.
    #[cfg(feature = "metal")]
    fn metal_weights(&self, dev: &candle_core::MetalDevice) -> Result<(std::sync::Arc<candle_metal_kernels::metal::Buffer>, u32)> {
        let (w, has_w) = self.kernel_weights();
        Ok((super::metal::upload_f32(dev, w)?, has_w as u32))
    }
}

impl CustomOp2 for Mse {
    fn name(&self) -> &'static str {
        "ddpm-mse"
    }

    fn cpu_fwd(&self, sp: &CpuStorage, lp: &Layout, sy: &CpuStorage, ly: &Layout) -> Result<(CpuStorage, Shape)> {
        let (p, y) = (super::f32_slice(sp, lp, self.name(), "prediction")?, super::f32_slice(sy, ly, self.name(), "target")?);
        let m = p.len() / self.n;
        // per sample: w_i (1 / M) sum_j (p_ij - y_ij)^2, summed in f64
        let total: f64 = p
            .par_chunks(m)
            .zip(y.par_chunks(m))
            .enumerate()
            .map(|(i, (pi, yi))| {
                let mut acc = [0f32; 8];
                let (pc, yc) = (pi.chunks_exact(8), yi.chunks_exact(8));
                let mut s: f64 = pc.remainder().iter().zip(yc.remainder()).map(|(&a, &b)| ((a - b) * (a - b)) as f64).sum();
                for (pl, yl) in pc.zip(yc) {
                    for l in 0..8 {
                        let d = pl[l] - yl[l];
                        acc[l] += d * d;
                    }
                }
                s += acc.iter().map(|&v| v as f64).sum::<f64>();
                weight(&self.weights, i) * s / m as f64
            })
            .sum();
        // L = (1 / N) sum_i ...
        Ok((CpuStorage::F32(vec![(total / self.n as f64) as f32]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, sp: &candle_core::CudaStorage, lp: &Layout, sy: &candle_core::CudaStorage, ly: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        let dev = sp.device().clone();
        let (p, y) = (cuda::f32_view(sp, lp, self.name(), "prediction")?, cuda::f32_view(sy, ly, self.name(), "target")?);
        let (w, has_w) = self.device_weights(&dev)?;
        // sums_i = w_i (1 / M) sum_j (p_ij - y_ij)^2, one block per sample; then L = (1 / N) sum_i sums_i
        let mut sums = cuda::zeros_f64(&dev, self.n)?;
        let (m64, n64) = ((p.len() / self.n) as u64, self.n as u64);
        cuda::launch!(&dev, "ddpm_mse_sample_sums", cuda::per_block(self.n); &p, &y, &w, &has_w, &mut sums, &m64);
        let mut out = cuda::alloc_f32(&dev, 1)?;
        cuda::launch!(&dev, "ddpm_mse_total", cuda::per_block(1); &sums, &n64, &mut out);
        Ok((cuda::wrap(out, sp), Shape::from(())))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, sp: &candle_core::MetalStorage, lp: &Layout, sy: &candle_core::MetalStorage, ly: &Layout) -> Result<(candle_core::MetalStorage, Shape)> {
        use super::metal::{self, uint, Arg, Grid};
        use candle_core::backend::BackendStorage;
        let dev = sp.device();
        let ((p, po, total), (y, yo, _)) = (metal::f32_buffer(sp, lp, self.name(), "prediction")?, metal::f32_buffer(sy, ly, self.name(), "target")?);
        let (w, has_w) = self.metal_weights(dev)?;
        // sums_i = w_i (1 / M) sum_j (p_ij - y_ij)^2, one threadgroup per sample; then L = (1 / N) sum_i sums_i
        let sums = metal::alloc_f32(dev, self.n, self.name())?;
        let (m, n) = (metal::count(total / self.n, self.name())?, metal::count(self.n, self.name())?);
        let args = [Arg::In(p, po), Arg::In(y, yo), Arg::In(&w, 0), uint(has_w), Arg::Out(&sums, 0), uint(m)];
        metal::launch(dev, "ddpm_mse_sample_sums", Grid::Groups(self.n), &args)?;
        let out = metal::alloc_f32(dev, 1, self.name())?;
        metal::launch(dev, "ddpm_mse_total", Grid::Groups(1), &[Arg::In(&sums, 0), uint(n), Arg::Out(&out, 0)])?;
        Ok((metal::wrap(out, dev, 1), Shape::from(())))
    }

    fn bwd(&self, p: &Tensor, y: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _span = super::profile::span(p.device(), "loss");
        let op = MseBackward(self.clone());
        let dp = p.detach().apply_op3_no_bwd(&y.detach(), &grad.detach(), &op)?;
        Ok((Some(dp), None))
    }
}

/// The fused backward `(p, y, g) -> dL/dp = g 2 w_i (p - y) / (N M)` of an [`Mse`].
struct MseBackward(Mse);

impl CustomOp3 for MseBackward {
    fn name(&self) -> &'static str {
        "ddpm-mse-backward"
    }

    fn cpu_fwd(
        &self,
        sp: &CpuStorage,
        lp: &Layout,
        sy: &CpuStorage,
        ly: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (p, y, g) = (super::f32_slice(sp, lp, self.name(), "prediction")?, super::f32_slice(sy, ly, self.name(), "target")?, super::f32_slice(sg, lg, self.name(), "gradient")?);
        let Mse { n, weights } = &self.0;
        let m = p.len() / n;
        let scale = g[0] as f64 * 2.0 / (n * m) as f64;
        let mut dp = vec![0f32; p.len()];
        dp.par_chunks_mut(m).zip(p.par_chunks(m).zip(y.par_chunks(m))).enumerate().for_each(|(i, (d, (pi, yi)))| {
            // k = g 2 w_i / (N M)
            let k = (scale * weight(weights, i)) as f32;
            for ((dv, &a), &b) in d.iter_mut().zip(pi).zip(yi) {
                *dv = k * (a - b);
            }
        });
        Ok((CpuStorage::F32(dp), lp.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sp: &candle_core::CudaStorage,
        lp: &Layout,
        sy: &candle_core::CudaStorage,
        ly: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        let dev = sp.device().clone();
        let (p, y, g) = (cuda::f32_view(sp, lp, self.name(), "prediction")?, cuda::f32_view(sy, ly, self.name(), "target")?, cuda::f32_view(sg, lg, self.name(), "gradient")?);
        let (w, has_w) = self.0.device_weights(&dev)?;
        let total = p.len();
        let m = total / self.0.n;
        let mut dp = cuda::alloc_f32(&dev, total)?;
        // dp_ij = g 2 w_i (p_ij - y_ij) / (N M)
        let (m64, total64, inv_nm) = (m as u64, total as u64, 1.0 / total as f64);
        cuda::launch!(&dev, "ddpm_mse_backward", cuda::elementwise(total); &p, &y, &g, &w, &has_w, &mut dp, &m64, &total64, &inv_nm);
        Ok((cuda::wrap(dp, sp), lp.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        sp: &candle_core::MetalStorage,
        lp: &Layout,
        sy: &candle_core::MetalStorage,
        ly: &Layout,
        sg: &candle_core::MetalStorage,
        lg: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        use super::metal::{self, uint, Arg, Grid};
        use candle_core::backend::BackendStorage;
        let dev = sp.device();
        let (p, po, total) = metal::f32_buffer(sp, lp, self.name(), "prediction")?;
        let ((y, yo, _), (g, go, _)) = (metal::f32_buffer(sy, ly, self.name(), "target")?, metal::f32_buffer(sg, lg, self.name(), "gradient")?);
        let (w, has_w) = self.0.metal_weights(dev)?;
        let dp = metal::alloc_f32(dev, total, self.name())?;
        // dp_ij = g 2 w_i (p_ij - y_ij) / (N M)
        let (m, total32) = (metal::count(total / self.0.n, self.name())?, metal::count(total, self.name())?);
        let args = [Arg::In(p, po), Arg::In(y, yo), Arg::In(g, go), Arg::In(&w, 0), uint(has_w), Arg::Out(&dp, 0), uint(m), uint(total32)];
        metal::launch(dev, "ddpm_mse_backward", Grid::Elementwise(total), &args)?;
        Ok((metal::wrap(dp, dev, total), lp.shape().clone()))
    }
}

/// The weighted mean squared error L = (1 / N) sum_i w_i mean_j (p_ij - y_ij)^2 of a prediction `p`
/// against a target `y` of the same shape (N, ...), with one weight per sample (`None`: all 1, which
/// is the plain mean over every element). A scalar that backpropagates into `p`; `y` is treated as a
/// constant.
///
/// For f32 tensors on the CPU (or CUDA or Metal with the project's kernels, see [`super::cuda_kernels_enabled`] and [`super::metal_kernels_enabled`]) this is one fused op with a fused backward; otherwise it is
/// [`weighted_mse_composed`].
pub fn weighted_mse(p: &Tensor, y: &Tensor, weights: Option<&[f32]>) -> Result<Tensor> {
    let _span = super::profile::span(p.device(), "loss");
    if p.dims() != y.dims() || p.rank() == 0 {
        candle_core::bail!("weighted_mse: prediction {:?} and target {:?} must have the same shape (N, ...)", p.dims(), y.dims());
    }
    let n = p.dim(0)?;
    if let Some(w) = weights {
        if w.len() != n {
            candle_core::bail!("weighted_mse: {} weights for a batch of {n}", w.len());
        }
    }
    let fused = super::fused_device(p.device()) && p.dtype() == DType::F32 && y.dtype() == DType::F32 && p.elem_count() > 0;
    if !fused {
        return weighted_mse_composed(p, y, weights);
    }
    let op = Mse { n, weights: weights.map(|w| w.to_vec()) };
    p.contiguous()?.apply_op2(&y.detach().contiguous()?, op)
}

/// [`weighted_mse`] from candle's differentiable ops: sq = (p - y)^2, then mean_all(sq) without
/// weights or mean_i(w_i mean_j sq_ij) with them. The fallback for other devices and dtypes, and the
/// reference the fused op is tested against.
pub fn weighted_mse_composed(p: &Tensor, y: &Tensor, weights: Option<&[f32]>) -> Result<Tensor> {
    // (p - y)^2
    let sq = (p - y.detach())?.sqr()?;
    match weights {
        None => sq.mean_all(),
        Some(w) => {
            let w = Tensor::from_slice(w, w.len(), p.device())?.to_dtype(p.dtype())?;
            // L = mean_i w_i mse_i, mse_i = mean over the sample's elements
            (sq.flatten_from(1)?.mean(1)? * w)?.mean_all()
        }
    }
}
