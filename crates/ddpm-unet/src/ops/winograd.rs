//! 3x3 stride-1 "same" convolutions by Winograd's minimal filtering F(2x2, 3x3): 16 multiplications
//! per 2x2 output tile and input-output channel pair instead of 36, so the matrix products cost 2.25
//! times fewer flops than im2col's.
//!
//! With the transforms (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016)
//!
//! ```text
//!   B^T = [1  0 -1  0]      G = [1    0    0  ]      A^T = [1  1  1  0]
//!         [0  1  1  0]          [1/2  1/2  1/2]            [0  1 -1 -1]
//!         [0 -1  1  0]          [1/2 -1/2  1/2]
//!         [0  1  0 -1]          [0    0    1  ]
//! ```
//!
//! a 2x2 output tile Y of one output channel o is Y = A^T [ sum_c U[o, c] ⊙ V[c] ] A, where
//! U[o, c] = G w[o, c] G^T (4x4) is the transformed kernel and V[c] = B^T d[c] B (4x4) the transformed
//! 4x4 input tile d[c] (the tile's rows 2ty - 1 .. 2ty + 2 and columns 2tx - 1 .. 2tx + 2, zero outside
//! the image). Gathering the 16 entries of every tile, the sum over c becomes 16 independent matrix
//! products, one per entry p:
//!
//! ```text
//!   M[p] (O, N) = U[p] (O, C) @ V[p] (C, N),   N = tiles of all images
//! ```
//!
//! The backward pass is the adjoint of the same linear maps, so it too is three transforms around two
//! sets of 16 products:
//!
//! ```text
//!   dM = A dY A^T (per tile)       dU[p] = dM[p] @ V[p]^T       dV[p] = U[p]^T @ dM[p]
//!   dw[o, c] = G^T dU[o, c] G      dx = sum over tiles of B dV B^T, added back onto the tile's pixels
//! ```
//!
//! The products run in parallel over p, each on one thread (so the result does not depend on
//! scheduling); the transforms run in parallel over the image planes, eight tiles at a time in 8-wide
//! lanes (compiled for AVX2 too, chosen at run time). Odd sides get a last tile that reaches past the
//! image: its input is zero there and its outputs there are dropped.
//!
//! The transformed tiles take 4x the input's memory (V) and 4x the output's (M); their buffers are
//! pooled between calls. The weights are transformed on every call (training changes them; it costs
//! about 1/N of the products).

use std::ops::{Add, Mul, Neg, Sub};

use rayon::prelude::*;

use super::matmul::{sgemm, with_scratch, View};

/// Entries of a transformed 4x4 tile.
const P: usize = 16;

/// Whether a convolution of `c` input and `o` output channels with a k x k kernel, stride and padding
/// goes through Winograd: 3x3, stride 1, padding 1, and at least
/// [`super::conv::WINOGRAD_MIN_CHANNELS`] input and output channels.
pub(crate) fn applies(c: usize, o: usize, k: usize, stride: usize, pad: usize) -> bool {
    k == 3 && stride == 1 && pad == 1 && c.min(o) >= super::conv::WINOGRAD_MIN_CHANNELS
}

/// The tiling of a batch of (C, H, W) images into 2x2 output tiles.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tiling {
    /// Images.
    pub b: usize,
    /// Input channels.
    pub c: usize,
    /// Output channels.
    pub o: usize,
    /// Image height.
    pub h: usize,
    /// Image width.
    pub w: usize,
}

impl Tiling {
    /// Tile rows ceil(H / 2) and columns ceil(W / 2).
    fn grid(&self) -> (usize, usize) {
        (self.h.div_ceil(2), self.w.div_ceil(2))
    }
    /// Tiles per image.
    fn per_image(&self) -> usize {
        let (th, tw) = self.grid();
        th * tw
    }
    /// Tiles of all images: N, the columns of the products.
    fn tiles(&self) -> usize {
        self.b * self.per_image()
    }
    /// Row length of [`PlaneScratch`]'s `even` and `odd`: tw + 1 columns and 8 of slack, so that a
    /// chunk of eight tiles always loads eight values.
    fn split_row(&self) -> usize {
        self.grid().1 + 9
    }
    /// Rows of a zero-padded plane that holds every tile's 4x4 input, 2 th + 2 (image row y at y + 1).
    fn padded_rows(&self) -> usize {
        2 * self.grid().0 + 2
    }
}

/// A raw pointer shared by parallel tasks that write disjoint elements of one buffer.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: every use writes a set of indices no other task touches, and the buffer outlives the tasks.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// 16 matrices (rows, cols), one per tile entry p, in one buffer. Matrix p starts `stride` values after
/// matrix p - 1, with the stride a cache line more than a multiple of 16 values: the transforms touch
/// the 16 matrices at the same offset together, and addresses a multiple of 4 KiB apart would evict
/// one another from the cache.
struct Entries {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    stride: usize,
}

/// Buffers of [`Entries`] that have been dropped, kept for the next ones: a layer's matrices are 4 to
/// 16 times its input, and fresh ones would be zero-filled and page-faulted in every layer of every
/// step. At most [`POOL_BUFFERS`] are kept.
static POOL: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// How many buffers [`POOL`] keeps: a backward pass has four [`Entries`] alive at once.
const POOL_BUFFERS: usize = 4;

impl Entries {
    /// Matrices with unspecified contents (every user writes all of them before reading): a pooled
    /// buffer, the smallest that is large enough, else the largest one grown.
    fn new(rows: usize, cols: usize) -> Self {
        let stride = (rows * cols).next_multiple_of(16) + 16;
        let len = P * stride;
        let mut data = {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            let fits = pool.iter().enumerate().filter(|(_, v)| v.capacity() >= len).min_by_key(|(_, v)| v.capacity());
            let pick = fits.or_else(|| pool.iter().enumerate().max_by_key(|(_, v)| v.capacity())).map(|(i, _)| i);
            pick.map(|i| pool.swap_remove(i)).unwrap_or_default()
        };
        // only values beyond the buffer's old length are written here
        data.resize(len, 0.0);
        Entries { data, rows, cols, stride }
    }
    /// Matrix p, row-major.
    fn get(&self, p: usize) -> &[f32] {
        &self.data[p * self.stride..p * self.stride + self.rows * self.cols]
    }
    /// The 16 matrices, mutably, for a parallel loop over p.
    fn par_iter_mut(&mut self) -> impl IndexedParallelIterator<Item = &mut [f32]> {
        let len = self.rows * self.cols;
        self.data.par_chunks_exact_mut(self.stride).map(move |m| &mut m[..len])
    }
    /// Row `row`, columns `cols`, of all 16 matrices.
    fn rows16(&self, row: usize, cols: std::ops::Range<usize>) -> [&[f32]; P] {
        std::array::from_fn(|p| &self.get(p)[row * self.cols..][cols.clone()])
    }
    /// Row `row` of all 16 matrices from column `col` to the end of the matrix's storage (past the
    /// row, into the next rows and the slack: at least 16 values).
    fn rows16_tail(&self, row: usize, col: usize) -> [&[f32]; P] {
        std::array::from_fn(|p| &self.data[p * self.stride + row * self.cols + col..(p + 1) * self.stride])
    }
    /// A handle for parallel tasks that each write their own rows.
    fn shared(&mut self) -> SharedEntries {
        SharedEntries { ptr: Shared(self.data.as_mut_ptr()), cols: self.cols, stride: self.stride }
    }
}

impl Drop for Entries {
    fn drop(&mut self) {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(std::mem::take(&mut self.data));
        if pool.len() > POOL_BUFFERS {
            // drop the smallest
            if let Some(i) = pool.iter().enumerate().min_by_key(|(_, v)| v.capacity()).map(|(i, _)| i) {
                pool.swap_remove(i);
            }
        }
    }
}

/// [`Entries`] written by parallel tasks, each into its own (row, columns) of the 16 matrices.
#[derive(Clone, Copy)]
struct SharedEntries {
    ptr: Shared,
    cols: usize,
    stride: usize,
}

impl SharedEntries {
    /// Row `row`, columns `cols`, of all 16 matrices, mutably.
    ///
    /// # Safety
    /// The range must lie inside the matrices and no other task may touch it while the slices live.
    unsafe fn rows16_mut<'a>(self, row: usize, cols: std::ops::Range<usize>) -> [&'a mut [f32]; P] {
        let start = row * self.cols + cols.start;
        std::array::from_fn(|p| unsafe { std::slice::from_raw_parts_mut(self.ptr.0.add(p * self.stride + start), cols.len()) })
    }
}

thread_local! {
    /// Per-thread zero-padded image plane.
    static PLANE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Eight f32 values, one per tile (per input channel in the weight transforms), so that each
/// transform is a handful of 8-wide vector operations (the compiler keeps the fixed-size loops below
/// in vector registers).
#[derive(Clone, Copy, Default)]
struct Lanes([f32; 8]);

impl Lanes {
    /// The first min(8, len) values of `s`, zero in the lanes past its end.
    #[inline(always)]
    fn load(s: &[f32]) -> Self {
        match s.get(..8) {
            Some(full) => Lanes(full.try_into().expect("8 values")),
            // element by element: a library copy call per partial load would cost more than the load
            None => {
                let mut v = [0f32; 8];
                for (d, &x) in v.iter_mut().zip(s) {
                    *d = x;
                }
                Lanes(v)
            }
        }
    }
    /// Writes the first min(8, len) lanes into `d`.
    #[inline(always)]
    fn store(self, d: &mut [f32]) {
        match d.get_mut(..8) {
            Some(full) => full.copy_from_slice(&self.0),
            None => {
                for (d, &v) in d.iter_mut().zip(&self.0) {
                    *d = v;
                }
            }
        }
    }
}

/// `impl $trait for Lanes` lane by lane with the compound operator `$op` (plain loops: the generic
/// array constructors are not always inlined into the AVX2 copies).
macro_rules! lanewise {
    ($trait:ident, $method:ident, $op:tt) => {
        impl $trait for Lanes {
            type Output = Lanes;
            #[inline(always)]
            fn $method(self, r: Lanes) -> Lanes {
                let mut v = self.0;
                for (a, b) in v.iter_mut().zip(r.0) {
                    *a $op b;
                }
                Lanes(v)
            }
        }
    };
}
lanewise!(Add, add, +=);
lanewise!(Sub, sub, -=);

impl Neg for Lanes {
    type Output = Lanes;
    #[inline(always)]
    fn neg(self) -> Lanes {
        let mut v = self.0;
        for x in &mut v {
            *x = -*x;
        }
        Lanes(v)
    }
}

impl Mul<f32> for Lanes {
    type Output = Lanes;
    #[inline(always)]
    fn mul(self, s: f32) -> Lanes {
        let mut v = self.0;
        for x in &mut v {
            *x *= s;
        }
        Lanes(v)
    }
}

/// t = B^T d for a 4-vector d (columns or rows of a tile).
#[inline(always)]
fn bt(d: [Lanes; 4]) -> [Lanes; 4] {
    [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]
}

/// B v for a 4-vector v: the adjoint of [`bt`].
#[inline(always)]
fn b(v: [Lanes; 4]) -> [Lanes; 4] {
    [v[0], v[1] - v[2] + v[3], v[1] + v[2] - v[0], -v[3]]
}

/// G g for a 3-vector g.
#[inline(always)]
fn g(v: [Lanes; 3]) -> [Lanes; 4] {
    [v[0], (v[0] + v[1] + v[2]) * 0.5, (v[0] - v[1] + v[2]) * 0.5, v[2]]
}

/// G^T u for a 4-vector u: the adjoint of [`g`].
#[inline(always)]
fn gt(u: [Lanes; 4]) -> [Lanes; 3] {
    [u[0] + (u[1] + u[2]) * 0.5, (u[1] - u[2]) * 0.5, (u[1] + u[2]) * 0.5 + u[3]]
}

/// A^T m for a 4-vector m.
#[inline(always)]
fn at(m: [Lanes; 4]) -> [Lanes; 2] {
    [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]
}

/// A y for a 2-vector y: the adjoint of [`at`].
#[inline(always)]
fn a(y: [Lanes; 2]) -> [Lanes; 4] {
    [y[0], y[0] + y[1], y[0] - y[1], -y[1]]
}

/// X' = L X R^T for an I x J matrix X given `rows` (L, applied down each column) and `cols` (R,
/// applied along each row): the two-sided transforms B^T d B, B dV B^T, G g G^T, ...
#[inline(always)]
fn two_sided<const I: usize, const J: usize, const K: usize, const L: usize>(
    x: [[Lanes; J]; I],
    rows: impl Fn([Lanes; I]) -> [Lanes; K],
    cols: impl Fn([Lanes; J]) -> [Lanes; L],
) -> [[Lanes; L]; K] {
    // t (J, K): row j is L x[:, j]; then row k of the result is R t[:, k]
    map_columns(map_columns(x, rows), cols)
}

/// The columns of an R x C matrix, each mapped by `f`: row c of the result is f(x[:, c]). (Plain
/// loops: the generic array constructors are not always inlined into the AVX2 copies.)
#[inline(always)]
fn map_columns<const R: usize, const C: usize, const N: usize>(x: [[Lanes; C]; R], f: impl Fn([Lanes; R]) -> [Lanes; N]) -> [[Lanes; N]; C] {
    let mut out = [[Lanes::default(); N]; C];
    for (c, o) in out.iter_mut().enumerate() {
        let mut col = [Lanes::default(); R];
        for (v, row) in col.iter_mut().zip(&x) {
            *v = row[c];
        }
        *o = f(col);
    }
    out
}

/// The 4x4 tile whose entry (i, j) is `entry(4 i + j)`.
#[inline(always)]
fn tile16(entry: impl Fn(usize) -> Lanes) -> [[Lanes; 4]; 4] {
    let mut d = [[Lanes::default(); 4]; 4];
    for (p, e) in d.iter_mut().flatten().enumerate() {
        *e = entry(p);
    }
    d
}

/// dst[..8] += v.
#[inline(always)]
fn add_lanes(dst: &mut [f32], v: Lanes) {
    (Lanes::load(dst) + v).store(dst);
}

/// Lanes past `n` set to zero (the tiles past a row's end when a chunk of eight reaches over it).
#[inline(always)]
fn first(v: Lanes, n: usize) -> Lanes {
    let mut r = v.0;
    for (i, x) in r.iter_mut().enumerate() {
        if i >= n {
            *x = 0.0;
        }
    }
    Lanes(r)
}

/// U (16, O, C): U[p][o][c] = (G w[o, c] G^T)[p] for weights w (O, C, 3, 3).
fn transform_weights(t: &Tiling, w: &[f32]) -> Entries {
    let mut u = Entries::new(t.o, t.c);
    let out = u.shared();
    w.par_chunks_exact(t.c * 9).enumerate().for_each(|(oi, wo)| {
        // SAFETY: row oi belongs to this task
        let mut dst = unsafe { out.rows16_mut(oi, 0..t.c) };
        weights_row(wo, &mut dst);
    });
    u
}

with_avx2! {
    /// One output channel of [`transform_weights`]: w[o] (C, 3, 3) -> row o of the 16 matrices, eight
    /// input channels at a time.
    fn weights_row(wo: &[f32], dst: &mut [&mut [f32]; P]) {
        let c = dst[0].len();
        for c0 in (0..c).step_by(8) {
            let lanes = (c - c0).min(8);
            // kernel entry (r, s) of input channels c0 .. c0 + 8
            let mut k = [[Lanes::default(); 3]; 3];
            for (l, kernel) in wo[c0 * 9..].chunks_exact(9).take(lanes).enumerate() {
                for (e, &v) in k.iter_mut().flatten().zip(kernel) {
                    e.0[l] = v;
                }
            }
            for (d, v) in dst.iter_mut().zip(two_sided(k, g, g).into_iter().flatten()) {
                v.store(&mut d[c0..]);
            }
        }
    }
}

/// dw (O, C, 3, 3): dw[o, c] = G^T dU[o, c] G, the adjoint of [`transform_weights`].
fn transform_weights_grad(t: &Tiling, du: &Entries, dw: &mut [f32]) {
    dw.par_chunks_exact_mut(t.c * 9).enumerate().for_each(|(oi, dwo)| weights_grad_row(&du.rows16(oi, 0..t.c), dwo));
}

with_avx2! {
    /// One output channel of [`transform_weights_grad`]: row o of the 16 matrices of dU -> dw[o].
    fn weights_grad_row(du: &[&[f32]; P], dwo: &mut [f32]) {
        let c = du[0].len();
        for c0 in (0..c).step_by(8) {
            let lanes = (c - c0).min(8);
            let d = tile16(|p| Lanes::load(&du[p][c0..]));
            let grad = two_sided(d, gt, gt);
            for (l, k) in dwo[c0 * 9..].chunks_exact_mut(9).take(lanes).enumerate() {
                for (e, v) in k.iter_mut().zip(grad.as_flattened()) {
                    *e = v.0[l];
                }
            }
        }
    }
}

/// Per-plane scratch: a plane split by column parity plus a staging area for its 16 rows of tiles.
struct PlaneScratch<'a> {
    /// Padded columns 0, 2, 4, ...: (2 th + 2) rows of `row` values.
    even: &'a mut [f32],
    /// Padded columns 1, 3, 5, ....
    odd: &'a mut [f32],
    /// The plane's tiles for each of the 16 entries: 16 rows of `per + 8` values.
    stage: &'a mut [f32],
}

/// Runs `f` with this thread's [`PlaneScratch`] for tiling `t`, the parity planes zeroed.
fn with_plane_scratch<R>(t: &Tiling, f: impl FnOnce(PlaneScratch) -> R) -> R {
    let (ph, row, stage) = (t.padded_rows(), t.split_row(), P * (t.per_image() + 8));
    with_scratch(&PLANE, 2 * ph * row + stage, |buf| {
        let (split, stage) = buf.split_at_mut(2 * ph * row);
        split.fill(0.0);
        let (even, odd) = split.split_at_mut(ph * row);
        f(PlaneScratch { even, odd, stage })
    })
}

/// 16 matrices (`channels`, N) built plane by plane from `src` (B, channels, H, W): `plane_fn` writes a
/// plane's 16 rows of tiles into the scratch's stage, which goes to row c of the matrices, at the
/// columns of image b's tiles.
fn by_plane(t: &Tiling, src: &[f32], channels: usize, plane_fn: impl Fn(&[f32], &mut PlaneScratch) + Sync) -> Entries {
    let per = t.per_image();
    let mut entries = Entries::new(channels, t.tiles());
    let out = entries.shared();
    src.par_chunks_exact(t.h * t.w).enumerate().for_each(|(plane_index, plane)| {
        let (bi, ci) = (plane_index / channels, plane_index % channels);
        with_plane_scratch(t, |mut s| {
            plane_fn(plane, &mut s);
            // SAFETY: the tiles of image b, channel c are this task's own
            let dst = unsafe { out.rows16_mut(ci, bi * per..(bi + 1) * per) };
            for (d, stage) in dst.into_iter().zip(s.stage.chunks_exact(per + 8)) {
                d.copy_from_slice(&stage[..per]);
            }
        });
    });
    entries
}

/// V (16, C, N): V[p][c][b T + tile] = (B^T d B)[p] for the 4x4 input tile d of image b, channel c.
fn transform_input(t: &Tiling, x: &[f32]) -> Entries {
    by_plane(t, x, t.c, |plane, s| input_plane(t, plane, s.even, s.odd, s.stage))
}

with_avx2! {
    /// One plane of [`transform_input`] into `stage` (16 rows of T + 8), by rows of tiles, eight tiles
    /// at a time; `even` and `odd` must be zero.
    fn input_plane(t: &Tiling, plane: &[f32], even: &mut [f32], odd: &mut [f32], stage: &mut [f32]) {
        let (th, tw) = t.grid();
        let (row, per) = (t.split_row(), t.per_image());
        // pixel (y, x) sits at padded (y + 1, x + 1): even x in odd[x / 2], odd x in even[(x + 1) / 2];
        // pair q holds pixels 2q and 2q + 1
        for (y, src) in plane.chunks_exact(t.w).enumerate() {
            let (e, o) = (&mut even[(y + 1) * row..(y + 2) * row], &mut odd[(y + 1) * row..(y + 2) * row]);
            for (q, pair) in src.chunks(2).enumerate() {
                o[q] = pair[0];
                if let Some(&v) = pair.get(1) {
                    e[q + 1] = v;
                }
            }
        }
        for ty in 0..th {
            for k in (0..tw).step_by(8) {
                // tile tx's rows are padded rows 2ty .. 2ty + 3 and its columns 2tx .. 2tx + 3, that is
                // even[tx], odd[tx], even[tx + 1], odd[tx + 1]
                let mut d = [[Lanes::default(); 4]; 4];
                for (i, di) in d.iter_mut().enumerate() {
                    let r = (2 * ty + i) * row + k;
                    *di = [Lanes::load(&even[r..]), Lanes::load(&odd[r..]), Lanes::load(&even[r + 1..]), Lanes::load(&odd[r + 1..])];
                }
                // stores past the row's end land where the next row of tiles (or the slack) goes
                for (p, v) in two_sided(d, bt, bt).into_iter().flatten().enumerate() {
                    v.store(&mut stage[p * (per + 8) + ty * tw + k..]);
                }
            }
        }
    }
}

/// y (B, O, H, W) = conv2d(x, w, padding 1) + bias, bias (O) or (B, O).
pub(crate) fn forward(t: &Tiling, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
    let (o, c, n) = (t.o, t.c, t.tiles());
    let u = transform_weights(t, w);
    let v = transform_input(t, x);
    let mut m = Entries::new(o, n);
    // M[p] (O, N) = U[p] (O, C) @ V[p] (C, N), each product on one thread
    m.par_iter_mut().enumerate().for_each(|(p, mp)| unsafe {
        // SAFETY: the views address (O, C) and (C, N) values of u and v
        sgemm((o, n, c), mp, false, 1.0, View::rows(u.get(p), c), View::rows(v.get(p), n), gemm::Parallelism::None)
    });
    drop(v);
    transform_output(t, &m, bias)
}

/// The gradients (dx, dw) of y = conv2d(x, w, padding 1) for dY = `dy` (B, O, H, W), written into
/// `dx` (B, C, H, W) and `dw` (O, C, 3, 3) (both overwritten).
pub(crate) fn backward(t: &Tiling, x: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], dw: &mut [f32]) {
    let (o, c, n) = (t.o, t.c, t.tiles());
    let dm = transform_output_grad(t, dy);
    let u = transform_weights(t, w);
    let mut v = transform_input(t, x);
    // per p: dU[p] (O, C) = dM[p] @ V[p]^T, then dV[p] (C, N) = U[p]^T @ dM[p] over V[p]'s storage
    let mut du = Entries::new(o, c);
    v.par_iter_mut().zip(du.par_iter_mut()).enumerate().for_each(|(p, (vp, dup))| unsafe {
        // SAFETY: the views address (O, N), (N, C), (C, O) values inside dm, v and u
        sgemm((o, c, n), dup, false, 1.0, View::rows(dm.get(p), n), View::transposed(vp, n), gemm::Parallelism::None);
        sgemm((c, n, o), vp, false, 1.0, View::transposed(u.get(p), c), View::rows(dm.get(p), n), gemm::Parallelism::None);
    });
    drop(dm);
    transform_weights_grad(t, &du, dw);
    transform_input_grad(t, &v, dx);
}

/// y (B, O, H, W) = A^T M A + bias per tile, the outputs past an odd side dropped.
fn transform_output(t: &Tiling, m: &Entries, bias: &[f32]) -> Vec<f32> {
    let (o, hw, per) = (t.o, t.h * t.w, t.per_image());
    let mut y = vec![0f32; t.b * o * hw];
    y.par_chunks_exact_mut(hw).enumerate().for_each(|(plane_index, yp)| {
        let (bi, oi) = (plane_index / o, plane_index % o);
        // the plane's tiles, read on past them (into the following rows, or the slack) so that every
        // chunk of eight loads eight values; the lanes past the plane are not stored
        let mp = m.rows16_tail(oi, bi * per);
        output_plane(t, &mp, super::conv::image_bias(bias, o, bi)[oi], yp);
    });
    y
}

with_avx2! {
    /// One plane of [`transform_output`]: the plane's 16 rows of M -> y (H, W) + shift.
    fn output_plane(t: &Tiling, mp: &[&[f32]; P], shift: f32, yp: &mut [f32]) {
        let tw = t.grid().1;
        let shift = Lanes([shift; 8]);
        for (ty, rows) in yp.chunks_mut(2 * t.w).enumerate() {
            for k in (0..tw).step_by(8) {
                let at0 = ty * tw + k;
                let m = tile16(|p| Lanes::load(&mp[p][at0..]));
                let y = two_sided(m, at, at);
                // image rows 2ty, 2ty + 1 (one when the image ends there); tile tx's outputs are
                // columns 2tx (even) and 2tx + 1 (odd)
                for (i, out) in rows.chunks_exact_mut(t.w).enumerate() {
                    interleave(&(y[i][0] + shift).0, &(y[i][1] + shift).0, &mut out[2 * k..]);
                }
            }
        }
    }
}

/// Interleaves `even` and `odd` into `dst`: dst[2k] = even[k], dst[2k + 1] = odd[k], as far as `dst`
/// reaches.
#[inline(always)]
fn interleave(even: &[f32], odd: &[f32], dst: &mut [f32]) {
    for (pair, (&e, &o)) in dst.chunks_mut(2).zip(even.iter().zip(odd)) {
        pair[0] = e;
        if let Some(d) = pair.get_mut(1) {
            *d = o;
        }
    }
}

/// dM (16, O, N) = A dY A^T per tile, the adjoint of [`transform_output`] (dY zero past an odd side).
fn transform_output_grad(t: &Tiling, dy: &[f32]) -> Entries {
    by_plane(t, dy, t.o, |plane, s| output_grad_plane(t, plane, s.even, s.stage))
}

with_avx2! {
    /// One plane of [`transform_output_grad`] into `stage` (16 rows of T + 8). `parts` (zeroed, at
    /// least 4 split rows) holds a row of tiles' two image rows split by column parity.
    fn output_grad_plane(t: &Tiling, dyp: &[f32], parts: &mut [f32], stage: &mut [f32]) {
        let (row, per, tw) = (t.split_row(), t.per_image(), t.grid().1);
        for (ty, rows) in dyp.chunks(2 * t.w).enumerate() {
            // parts rows: image row 2ty even columns, odd columns, row 2ty + 1 even, odd; zero past the image
            parts[..4 * row].fill(0.0);
            for (i, src) in rows.chunks_exact(t.w).enumerate() {
                for (x, pair) in src.chunks(2).enumerate() {
                    parts[2 * i * row + x] = pair[0];
                    parts[(2 * i + 1) * row + x] = pair.get(1).copied().unwrap_or(0.0);
                }
            }
            for k in (0..tw).step_by(8) {
                let part = |q: usize| Lanes::load(&parts[q * row + k..]);
                let dy = [[part(0), part(1)], [part(2), part(3)]];
                for (p, v) in two_sided(dy, a, a).into_iter().flatten().enumerate() {
                    v.store(&mut stage[p * (per + 8) + ty * tw + k..]);
                }
            }
        }
    }
}

/// dx (B, C, H, W) = the sum over tiles of B dV B^T, each added back onto the pixels of its 4x4 input
/// window: the adjoint of [`transform_input`].
fn transform_input_grad(t: &Tiling, dv: &Entries, dx: &mut [f32]) {
    let (c, per) = (t.c, t.per_image());
    dx.par_chunks_exact_mut(t.h * t.w).enumerate().for_each(|(plane_index, dxp)| {
        let (bi, ci) = (plane_index / c, plane_index % c);
        let vp = dv.rows16_tail(ci, bi * per);
        with_plane_scratch(t, |s| input_grad_plane(t, &vp, s.even, s.odd, dxp));
    });
}

with_avx2! {
    /// One plane of [`transform_input_grad`]: the plane's 16 rows of dV -> dx (H, W), through the
    /// padded plane's gradient split by column parity (`even`, `odd`, zeroed).
    fn input_grad_plane(t: &Tiling, vp: &[&[f32]; P], even: &mut [f32], odd: &mut [f32], dxp: &mut [f32]) {
        let (th, tw) = t.grid();
        let row = t.split_row();
        for ty in 0..th {
            for k in (0..tw).step_by(8) {
                // lanes past the row of tiles are zeroed: they would add another row's values
                let lanes = tw - k;
                let v = tile16(|p| first(Lanes::load(&vp[p][ty * tw + k..]), lanes));
                let d = two_sided(v, b, b);
                for (r, dr) in d.iter().enumerate() {
                    // window row 2ty + r, columns 2tx .. 2tx + 3: even[tx], odd[tx], even[tx + 1], odd[tx + 1]
                    let at0 = (2 * ty + r) * row + k;
                    add_lanes(&mut even[at0..], dr[0]);
                    add_lanes(&mut odd[at0..], dr[1]);
                    add_lanes(&mut even[at0 + 1..], dr[2]);
                    add_lanes(&mut odd[at0 + 1..], dr[3]);
                }
            }
        }
        // pixel (y, x) is padded (y + 1, x + 1): odd x in even[(x + 1) / 2], even x in odd[x / 2]
        for (y, out) in dxp.chunks_exact_mut(t.w).enumerate() {
            let r = (y + 1) * row;
            interleave(&odd[r..r + row], &even[r + 1..r + row], out);
        }
    }
}
