//! Multi-tensor updates on CUDA: AdamW, the EMA and the global gradient norm of every parameter in one
//! or two kernel launches, instead of one or more launches per parameter.
//!
//! A UNet has a few hundred parameter tensors. Per tensor, [`super::optim`]'s kernels take three
//! launches for AdamW and one for the EMA, and the gradient norm composed of candle's ops four (square,
//! sum, cast, and its share of the stack): about 8 launches per tensor, a couple of thousand per
//! training step, each with its host-side cost, where the step of a small model is itself a few
//! milliseconds of GPU work. Here a table of the tensors' device addresses and lengths is uploaded
//! once per call (`ops::cuda::upload_pinned`, with the `cuda` feature, so the copy does not wait for
//! the device), and each block of one launch updates one chunk of [`CHUNK_LEN`] elements of one
//! tensor ([`chunks`]). The arithmetic per element is that of the per-tensor kernels, so the results
//! are the same; the gradient norm sums in f64 in a fixed order (deterministic).
//!
//! [`available`] says whether a set of tensors qualifies: contiguous f32 tensors on one CUDA device with
//! the project's kernels ([`super::cuda_kernels_enabled`]), unless `DDPM_MULTI_TENSOR=0` is set. Other
//! devices keep the per-tensor updates; the functions here return an error for them.

use candle_core::{DType, Result, Tensor};

/// Elements of one tensor that one block of a multi-tensor launch updates (128 per thread).
pub const CHUNK_LEN: usize = 1 << 15;

/// The chunks of tensors of lengths `lens`, in order: (tensor index, first element) for each run of up
/// to `chunk_len` elements. An empty tensor has none.
pub fn chunks(lens: &[usize], chunk_len: usize) -> Vec<(usize, usize)> {
    lens.iter().enumerate().flat_map(|(t, &n)| (0..n).step_by(chunk_len.max(1)).map(move |begin| (t, begin))).collect()
}

/// The table a multi-tensor kernel reads (see `kernels.cu`), in u64 words: `addresses[l][t]` for each
/// list l and tensor t, then each tensor's length, then the tensor of each chunk, then its first
/// element. Returns the table and the number of chunks.
pub fn table(addresses: &[Vec<u64>], lens: &[usize], chunk_len: usize) -> (Vec<u64>, usize) {
    let parts = chunks(lens, chunk_len);
    let mut words: Vec<u64> = addresses.iter().flatten().copied().collect();
    words.extend(lens.iter().map(|&n| n as u64));
    words.extend(parts.iter().map(|&(t, _)| t as u64));
    words.extend(parts.iter().map(|&(_, begin)| begin as u64));
    (words, parts.len())
}

/// Whether the multi-tensor kernels are switched on: unless `DDPM_MULTI_TENSOR=0` is in the
/// environment (read once), which keeps the per-tensor kernels (to measure what this saves).
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| !std::env::var("DDPM_MULTI_TENSOR").is_ok_and(|v| v == "0"))
}

/// Whether every tensor of `lists` is a contiguous f32 tensor on one CUDA device whose project kernels
/// are enabled, and the multi-tensor kernels are [`enabled`]: what [`adamw_`], [`ema_`] and
/// [`norm_and_clip_scale`] take. False in a build without the `cuda` feature.
pub fn available(lists: &[&[&Tensor]]) -> bool {
    let Some(first) = lists.iter().flat_map(|l| l.iter()).next() else {
        return false;
    };
    cfg!(feature = "cuda")
        && enabled()
        && super::cuda_kernels_enabled(first.device())
        && lists.iter().flat_map(|l| l.iter()).all(|t| t.device().same_device(first.device()) && t.dtype() == DType::F32 && t.is_contiguous())
}

/// One AdamW step over the lists of parameters, first and second moments and gradients, written in
/// place: for each tensor the update of [`super::optim::adamw_step_`] (same formulas, same f32
/// arithmetic), with the gradient scale c read from `grad_scale` (one f32 value on the device).
/// The four lists must pass [`available`] and hold tensors of equal lengths, position by position;
/// the tensors written (parameters and moments) must not share storage with any other tensor here.
pub fn adamw_(thetas: &[&Tensor], ms: &[&Tensor], vs: &[&Tensor], grads: &[&Tensor], grad_scale: &Tensor, s: &super::optim::AdamWStep) -> Result<()> {
    imp::adamw(thetas, ms, vs, grads, grad_scale, s)
}

/// The EMA update ema = d ema + (1 - d) theta for every pair of `emas` and `thetas` (equal lengths,
/// passing [`available`]; an average must not share storage with a weight), in place:
/// [`super::optim::ema_update_`]'s arithmetic, in one launch.
pub fn ema_(emas: &[&Tensor], thetas: &[&Tensor], decay: f64) -> Result<()> {
    imp::ema(emas, thetas, decay)
}

/// The global L2 norm n = sqrt(sum_i sum(g_i^2)) of `grads` (passing [`available`]), summed in f64,
/// and the clipping scale min(1, max_norm / (n + 1e-6)) (1 when `max_norm` <= 0): a scalar f64 tensor
/// and a one-element f32 tensor on the device, computed in two launches without a host round trip.
pub fn norm_and_clip_scale(grads: &[&Tensor], max_norm: f64) -> Result<(Tensor, Tensor)> {
    imp::norm_and_clip_scale(grads, max_norm)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    //! Without the `cuda` feature no tensor passes [`super::available`].
    use candle_core::{Result, Tensor};

    /// The error for a build without CUDA.
    fn unavailable<T>() -> Result<T> {
        candle_core::bail!("multi-tensor updates run on CUDA only (this build has no `cuda` feature)")
    }

    /// [`super::adamw_`]: an error.
    pub fn adamw(_: &[&Tensor], _: &[&Tensor], _: &[&Tensor], _: &[&Tensor], _: &Tensor, _: &crate::ops::optim::AdamWStep) -> Result<()> {
        unavailable()
    }

    /// [`super::ema_`]: an error.
    pub fn ema(_: &[&Tensor], _: &[&Tensor], _: f64) -> Result<()> {
        unavailable()
    }

    /// [`super::norm_and_clip_scale`]: an error.
    pub fn norm_and_clip_scale(_: &[&Tensor], _: f64) -> Result<(Tensor, Tensor)> {
        unavailable()
    }
}

#[cfg(feature = "cuda")]
mod imp {
    //! The CUDA launches: the table of addresses, then one kernel of `kernels.cu`.
    use super::{available, table, CHUNK_LEN};
    use crate::ops::cuda::{self, launch};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
    use candle_core::cuda_backend::CudaDevice;
    use candle_core::{Result, Storage, Tensor};

    /// A table uploaded for one launch, with its device and sizes.
    struct Table {
        dev: CudaDevice,
        table: CudaSlice<u64>,
        tensors: u32,
        chunks: u32,
    }

    /// The table of `lists` (checked with [`available`] and for equal lengths, position by position)
    /// on their device; `None` when they hold no values (nothing to launch). The addresses are taken
    /// outside cudarc's event tracking, which is sound because every use of a device's buffers is
    /// ordered by its one stream ([`crate::ops::cuda_device`]); the callers' references keep the
    /// tensors alive until the launch is queued, and a buffer freed later is freed in stream order,
    /// after the launch.
    fn upload(op: &str, lists: &[&[&Tensor]]) -> Result<Option<Table>> {
        if !available(lists) {
            candle_core::bail!("{op}: the multi-tensor update takes contiguous f32 tensors on one CUDA device (with DDPM_CUDA_KERNELS and DDPM_MULTI_TENSOR not 0)");
        }
        let n = lists[0].len();
        if let Some(l) = lists.iter().find(|l| l.len() != n) {
            candle_core::bail!("{op}: lists of {n} and {} tensors", l.len());
        }
        let lens: Vec<usize> = lists[0].iter().map(|t| t.elem_count()).collect();
        let mut dev = None;
        let mut addresses = Vec::with_capacity(lists.len());
        for list in lists {
            let mut row = Vec::with_capacity(n);
            for (t, &len) in list.iter().zip(&lens) {
                if t.elem_count() != len {
                    candle_core::bail!("{op}: tensors of {len} and {} values at one position", t.elem_count());
                }
                let (storage, layout) = t.storage_and_layout();
                let Storage::Cuda(s) = &*storage else { candle_core::bail!("{op}: a tensor is not on a CUDA device") };
                let Some((a, b)) = layout.contiguous_offsets() else { candle_core::bail!("{op}: a tensor is not contiguous") };
                let stream = s.device().cuda_stream();
                row.push(s.as_cuda_slice::<f32>()?.slice(a..b).device_ptr(&stream).0);
                dev.get_or_insert_with(|| s.device().clone());
            }
            addresses.push(row);
        }
        let Some(dev) = dev else { return Ok(None) };
        let (words, chunks) = table(&addresses, &lens, CHUNK_LEN);
        if chunks == 0 {
            return Ok(None);
        }
        let count = |k: usize| u32::try_from(k).map_err(|_| candle_core::Error::Msg(format!("{op}: {k} tensors or chunks is too many for one launch")));
        let table = cuda::upload_pinned(&dev, &words)?;
        Ok(Some(Table { tensors: count(n)?, chunks: count(chunks)?, dev, table }))
    }

    /// [`super::adamw_`]: kernel `ddpm_adamw_multi`, one block per chunk.
    pub fn adamw(thetas: &[&Tensor], ms: &[&Tensor], vs: &[&Tensor], grads: &[&Tensor], grad_scale: &Tensor, s: &crate::ops::optim::AdamWStep) -> Result<()> {
        let op = "ddpm-adamw-multi";
        if !available(&[&[grad_scale]]) || grad_scale.elem_count() != 1 {
            candle_core::bail!("{op}: the gradient scale must be one contiguous f32 value on the CUDA device");
        }
        let Some(u) = upload(op, &[thetas, ms, vs, grads])? else { return Ok(()) };
        let (storage, layout) = grad_scale.storage_and_layout();
        let Storage::Cuda(scale) = &*storage else { candle_core::bail!("{op}: the gradient scale is not on a CUDA device") };
        let scale = cuda::f32_view(scale, layout, op, "gradient scale")?;
        let k = crate::ops::optim::AdamWScalars::new(s);
        let chunk_len = CHUNK_LEN as u64;
        #[rustfmt::skip]
        launch!(&u.dev, "ddpm_adamw_multi", cuda::per_block(u.chunks as usize); &u.table, &u.tensors, &u.chunks, &chunk_len, &scale,
            &k.keep1, &k.take1, &k.keep2, &k.take2, &k.decay, &k.lr, &k.inv_bc1, &k.inv_bc2, &k.eps);
        Ok(())
    }

    /// [`super::ema_`]: kernel `ddpm_ema_multi`, one block per chunk.
    pub fn ema(emas: &[&Tensor], thetas: &[&Tensor], decay: f64) -> Result<()> {
        let Some(u) = upload("ddpm-ema-multi", &[emas, thetas])? else { return Ok(()) };
        let (keep, take) = crate::ops::optim::keep_take(decay);
        let chunk_len = CHUNK_LEN as u64;
        launch!(&u.dev, "ddpm_ema_multi", cuda::per_block(u.chunks as usize); &u.table, &u.tensors, &u.chunks, &chunk_len, &keep, &take);
        Ok(())
    }

    /// [`super::norm_and_clip_scale`]: kernel `ddpm_sum_squares_multi` (a partial sum per chunk), then
    /// `ddpm_clip_scale` (one block: their sum, its root and the scale).
    pub fn norm_and_clip_scale(grads: &[&Tensor], max_norm: f64) -> Result<(Tensor, Tensor)> {
        let op = "ddpm-clip-multi";
        let Some(u) = upload(op, &[grads])? else {
            // no values: n = 0, and a scale of 1 (there is nothing to scale)
            let dev = grads.first().map(|g| g.device().clone()).unwrap_or(candle_core::Device::Cpu);
            return Ok((Tensor::zeros((), candle_core::DType::F64, &dev)?, Tensor::ones(1, candle_core::DType::F32, &dev)?));
        };
        // SAFETY: each of the `chunks` blocks writes its own partial sum before the second kernel reads them
        let mut partials = unsafe { u.dev.alloc::<f64>(u.chunks as usize) }?;
        let chunk_len = CHUNK_LEN as u64;
        launch!(&u.dev, "ddpm_sum_squares_multi", cuda::per_block(u.chunks as usize); &u.table, &u.tensors, &u.chunks, &chunk_len, &mut partials);
        // SAFETY: the one block of the second kernel writes both values
        let (mut norm, mut scale) = unsafe { (u.dev.alloc::<f64>(1)?, u.dev.alloc::<f32>(1)?) };
        let n = u.chunks as u64;
        launch!(&u.dev, "ddpm_clip_scale", cuda::per_block(1); &partials, &n, &max_norm, &mut norm, &mut scale);
        let (norm, scale) = (candle_core::CudaStorage::wrap_cuda_slice(norm, u.dev.clone()), candle_core::CudaStorage::wrap_cuda_slice(scale, u.dev.clone()));
        Ok((cuda::tensor(norm, ()), cuda::tensor(scale, 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_each_tensor_once_in_order_and_skip_empty_tensors() {
        // lengths 5, 0, 4, 1 in chunks of 2: [0, 2), [2, 4), [4, 5) of tensor 0; none of tensor 1; [0, 2),
        // [2, 4) of tensor 2; [0, 1) of tensor 3
        assert_eq!(chunks(&[5, 0, 4, 1], 2), [(0, 0), (0, 2), (0, 4), (2, 0), (2, 2), (3, 0)]);
        assert_eq!(chunks(&[CHUNK_LEN, CHUNK_LEN + 1], CHUNK_LEN), [(0, 0), (1, 0), (1, CHUNK_LEN)]);
        assert!(chunks(&[0, 0], 4).is_empty());
    }

    #[test]
    fn the_table_holds_the_addresses_list_by_list_then_lengths_then_chunks() {
        // two lists of two tensors of lengths 3 and 1, chunks of 2: chunks (0, 0), (0, 2), (1, 0)
        let (words, n) = table(&[vec![100, 200], vec![300, 400]], &[3, 1], 2);
        assert_eq!(n, 3);
        assert_eq!(words, [100, 200, 300, 400, 3, 1, 0, 0, 1, 0, 2, 0]);
    }

    #[test]
    fn cpu_tensors_do_not_take_the_multi_tensor_kernels() {
        let t = Tensor::zeros(4, DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(!available(&[&[&t]]));
        assert!(!available(&[]));
        let err = ema_(&[&t], &[&t], 0.9).unwrap_err().to_string();
        assert!(err.contains("multi-tensor") || err.contains("CUDA"), "{err}");
    }
}
