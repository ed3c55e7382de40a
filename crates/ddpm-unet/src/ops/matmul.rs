//! The matrix product the fused CPU kernels share: strided f32 views, one `gemm` call, per-thread
//! scratch buffers, output buffers that are not zero-filled first, and the choice between parallel
//! tasks and parallel products.

use std::cell::RefCell;
use std::mem::{ManuallyDrop, MaybeUninit};
use std::thread::LocalKey;

/// A strided view of an f32 matrix for [`sgemm`]: element (i, j) is at `ptr[i rs + j cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl View {
    /// A row-major (rows, cols) matrix.
    pub(crate) fn rows(m: &[f32], cols: usize) -> Self {
        View { ptr: m.as_ptr(), rs: cols as isize, cs: 1 }
    }

    /// The transpose of a row-major (rows, cols) matrix.
    pub(crate) fn transposed(m: &[f32], cols: usize) -> Self {
        View { ptr: m.as_ptr(), rs: 1, cs: cols as isize }
    }
}

/// dst (m, n, row-major) = scale lhs (m, k) @ rhs (k, n), or dst += scale lhs @ rhs when `accumulate`.
///
/// # Safety
/// `lhs` and `rhs` must address m x k and k x n readable f32 values through their strides.
pub(crate) unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    scale: f32,
    lhs: View,
    rhs: View,
    par: gemm::Parallelism,
) {
    assert!(dst.len() >= m * n, "sgemm: destination too small");
    // dst = alpha dst + beta lhs rhs, with alpha read only when read_dst
    gemm::gemm(
        m, n, k, dst.as_mut_ptr(), 1, n as isize, accumulate, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs, rhs.rs,
        1.0, scale, false, false, false, par,
    );
}

/// A per-thread scratch buffer, kept between calls so that a training step does not allocate (and
/// page-fault) fresh temporaries in every layer.
pub(crate) type Scratch = LocalKey<RefCell<Vec<f32>>>;

/// Runs `f` with a slice of `len` values from the scratch buffer `cell` (contents unspecified).
///
/// A thread that waits inside a multi-threaded product may pick up another task of the same op, which
/// then finds this thread's buffer in use; that task gets a fresh buffer instead.
pub(crate) fn with_scratch<R>(cell: &'static Scratch, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    cell.with(|c| match c.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0.0);
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// How `tasks` independent products share the threads: one task per thread with single-threaded
/// products when there are at least as many tasks as threads, else each product multi-threaded.
pub(crate) fn inner_parallelism(tasks: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if tasks >= threads || threads == 1 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(threads)
    }
}

/// A buffer of `len` values for a kernel that writes every one of them: no zero-fill pass (which
/// for a layer's output costs as much as writing it).
pub(crate) fn uninit_vec(len: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: MaybeUninit values need no initialisation
    unsafe { v.set_len(len) };
    v
}

/// The values of a buffer from [`uninit_vec`] once written.
///
/// # Safety
/// Every value of `v` must have been written.
pub(crate) unsafe fn assume_init_vec(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = ManuallyDrop::new(v);
    // SAFETY: MaybeUninit<f32> has f32's layout, and the caller wrote every value
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

/// An initialised slice seen as one that a kernel for [`uninit_vec`] buffers writes to (it only
/// writes valid values, so the slice stays initialised).
pub(crate) fn as_uninit(s: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: same layout; MaybeUninit<f32> accepts every f32 and nothing else writes uninit values
    unsafe { &mut *(s as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// Writes `values[r]` into every value of row r (rows of `row_len` values) and returns the slice,
/// now initialised.
pub(crate) fn init_rows<'a>(s: &'a mut [MaybeUninit<f32>], row_len: usize, values: &[f32]) -> &'a mut [f32] {
    assert_eq!(s.len(), row_len * values.len(), "init_rows: {} values are not {} rows of {row_len}", s.len(), values.len());
    for (row, &v) in s.chunks_exact_mut(row_len).zip(values) {
        row.fill(MaybeUninit::new(v));
    }
    // SAFETY: every value was written just above
    unsafe { &mut *(s as *mut [MaybeUninit<f32>] as *mut [f32]) }
}
