//! The im2col convolution against candle's own conv2d: outputs and the gradients of input, weight and
//! bias, for the kernel, stride and padding combinations the UNet uses and odd image sizes.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use ddpm_unet::ops::conv::{conv2d, conv2d_backward, conv2d_backward_per_image_bias, conv2d_columns, upsample2x_conv2d, upsample_nearest2x, WINOGRAD_MIN_CHANNELS};

/// Largest |a - b| over all elements.
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Largest |a| over all elements.
fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn check(b: usize, c: usize, o: usize, (h, w): (usize, usize), (k, stride, pad): (usize, usize, usize)) {
    check_bias(b, c, o, (h, w), (k, stride, pad), 1);
}

/// [`check`] with a bias of `bias_rows` rows: 1 for a shared (O) bias, b for a per-image (B, O) one.
fn check_bias(b: usize, c: usize, o: usize, (h, w): (usize, usize), (k, stride, pad): (usize, usize, usize), bias_rows: usize) {
    compare(b, c, o, (h, w), (k, stride, pad), bias_rows, Path::Conv);
}

/// Which of our convolutions a test runs.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    /// [`conv2d`] (the CPU kernels).
    Conv,
    /// [`upsample2x_conv2d`], against upsampling and then a 3x3 convolution.
    Upsample,
    /// [`conv2d_columns`] (what CUDA runs with the project's kernels).
    Columns,
    /// [`conv2d`] forward, its gradients by [`conv2d_backward`] (shared bias) or
    /// [`conv2d_backward_per_image_bias`] (one bias row per image) outside the graph.
    BackwardOp,
}

/// Our convolution on `path` against candle's `conv2d` (plus the bias) on random data: outputs, and the
/// gradients of x, weight and bias. For [`Path::Upsample`] the reference upsamples x first (3x3
/// kernel, stride 1, padding 1).
fn compare(b: usize, c: usize, o: usize, (h, w): (usize, usize), (k, stride, pad): (usize, usize, usize), bias_rows: usize, path: Path) {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (b, c, h, w), &dev).unwrap()).unwrap();
    let wt = Var::from_tensor(&Tensor::randn(0f32, 0.3, (o, c, k, k), &dev).unwrap()).unwrap();
    let bias_shape = if bias_rows == 1 { vec![o] } else { vec![bias_rows, o] };
    let bias = Var::from_tensor(&Tensor::randn(0f32, 1., bias_shape, &dev).unwrap()).unwrap();
    let (ours, input) = match path {
        Path::Upsample => (upsample2x_conv2d(&x, &wt, Some(&bias)).unwrap(), upsample_nearest2x(&x).unwrap()),
        Path::Conv | Path::BackwardOp => (conv2d(&x, &wt, Some(&bias), stride, pad).unwrap(), x.as_tensor().clone()),
        Path::Columns => (conv2d_columns(&x, &wt, Some(&bias), stride, pad).unwrap(), x.as_tensor().clone()),
    };
    let reference = input.conv2d(&wt, pad, stride, 1, 1).unwrap().broadcast_add(&bias.reshape((bias_rows, o, 1, 1)).unwrap()).unwrap();
    assert_eq!(ours.dims(), reference.dims());
    // relative to the largest output (the reference sums C k k products in another order)
    let d = max_diff(&ours, &reference) / max_abs(&reference).max(1.0);
    assert!(d < 1e-5, "forward differs by {d} (k {k}, stride {stride}, pad {pad}, {c} channels)");
    // loss = sum(y * r) with a random r, so every output position gets its own gradient.
    let r = Tensor::randn(0f32, 1., ours.dims(), &dev).unwrap();
    let g2 = (reference * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g1: [Tensor; 3] = if path == Path::BackwardOp {
        let backward = if bias_rows == 1 { conv2d_backward } else { conv2d_backward_per_image_bias };
        let (dx, dw, db) = backward(&x, &wt, &r, stride, pad).unwrap();
        [dx, dw, db]
    } else {
        let g = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        [&x, &wt, &bias].map(|v| g.get(v).unwrap().clone())
    };
    for ((name, v), a) in [("x", &x), ("weight", &wt), ("bias", &bias)].into_iter().zip(&g1) {
        let b = g2.get(v).unwrap();
        assert_eq!(a.dims(), b.dims(), "gradient of {name}");
        let d = max_diff(a, b) / max_abs(b).max(1.0);
        assert!(d < 1e-4, "gradient of {name} differs by {d} (k {k}, stride {stride}, pad {pad})");
    }
}

#[test]
fn same_padding_3x3() {
    check(2, 3, 4, (7, 5), (3, 1, 1));
    // 5x5 kernel, padding 2: shifts of up to two rows and columns
    check(2, 3, 4, (9, 6), (5, 1, 2));
    // a kernel as large as the image, and larger: every shifted plane is partly or wholly padding
    check(1, 2, 3, (3, 3), (3, 1, 1));
    check(2, 2, 3, (1, 1), (3, 1, 1));
    check(1, 2, 3, (2, 1), (5, 1, 2));
}

#[test]
fn narrow_3x3() {
    // 3x3 "same" convolutions below the Winograd threshold (the direct kernel on CPUs with AVX2 and
    // FMA or AVX-512): output channels in whole and partial blocks of 4 and 8, one input channel, one
    // image, a 28x28 image (many position blocks), sides narrower than a block, a per-image bias.
    check(2, 5, 9, (28, 28), (3, 1, 1));
    check(1, 1, 4, (9, 2), (3, 1, 1));
    check(3, 7, 1, (2, 9), (3, 1, 1));
    check(2, 32, 6, (7, 7), (3, 1, 1));
    check_bias(2, 3, 5, (6, 5), (3, 1, 1), 2);
}

#[test]
fn winograd_3x3() {
    // From WINOGRAD_MIN_CHANNELS input and output channels on, 3x3 stride-1 convolutions take the
    // Winograd F(2x2, 3x3) path: even and odd sides (an odd side's last tile reaches past the image),
    // one image, a 1x1 image, a per-image bias; one channel fewer on either side takes the direct
    // kernel (or im2col).
    let c = WINOGRAD_MIN_CHANNELS;
    check(2, c, c, (6, 6), (3, 1, 1));
    check(3, c + 1, c + 2, (7, 5), (3, 1, 1));
    check(1, c, c, (1, 1), (3, 1, 1));
    check(2, c + 3, c, (2, 3), (3, 1, 1));
    check(1, c, c + 1, (17, 18), (3, 1, 1));
    check_bias(3, c, c, (5, 8), (3, 1, 1), 3);
    check(2, c - 1, c, (6, 7), (3, 1, 1));
    check(2, c, c - 1, (6, 7), (3, 1, 1));
}

#[test]
fn upsample_then_3x3() {
    // The four-phase 2x2 convolutions against upsampling then a 3x3 convolution: odd and even sides,
    // a 1x1 image, one image (products on all threads), a per-image bias, more outputs than inputs.
    for (b, c, o, side, bias_rows) in [(2, 3, 4, (5, 7), 1), (3, 4, 2, (6, 6), 3), (1, 2, 3, (1, 1), 1), (1, 5, 6, (4, 3), 1), (2, 1, 1, (2, 9), 1)] {
        compare(b, c, o, side, (3, 1, 1), bias_rows, Path::Upsample);
    }
}

#[test]
fn by_columns() {
    // The column-matrix convolution (CUDA's path, here with the CPU im2col and col2im): "same" 3x3 and
    // 5x5, strided with and without padding, 1x1, a 1x1 image, a per-image bias.
    for (b, c, o, side, kernel, bias_rows) in [
        (2, 3, 4, (7, 5), (3, 1, 1), 1),
        (2, 3, 4, (9, 6), (5, 1, 2), 1),
        (3, 2, 5, (8, 8), (3, 2, 1), 3),
        (2, 4, 4, (9, 7), (3, 2, 0), 1),
        (2, 6, 3, (4, 5), (1, 1, 0), 2),
        (2, 2, 3, (1, 1), (3, 1, 1), 1),
    ] {
        compare(b, c, o, side, kernel, bias_rows, Path::Columns);
    }
}

#[test]
fn by_columns_in_half_precision() {
    // The column path in bf16 and f16 (what CUDA runs for half-precision models; here f32 im2col
    // between casts, the products in the half dtype) against candle's f32 convolution of the same
    // rounded values. Bounds: a few units of the half types' last place (bf16 2^-8, f16 2^-11) for the
    // output and the x and weight gradients (the products accumulate in f32); the bias gradient is
    // candle's sum of dY over the n = B H' W' positions in the half type itself, whose worst-case
    // error is n units of roundoff (2^-9, 2^-12).
    let dev = Device::Cpu;
    let (b, c, o, h, w) = (2, 5, 4, 7, 6);
    let n = (b * h * w) as f32;
    for (dtype, bound, bias_bound) in [(DType::BF16, 2e-2, n / 512.0), (DType::F16, 3e-3, n / 4096.0)] {
        let data = |len: usize, seed: u64, amp: f32| Tensor::from_vec(common::lcg_values(len, seed, amp), len, &dev).unwrap();
        let half = |t: Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
        let x = half(data(b * c * h * w, 1, 1.5).reshape((b, c, h, w)).unwrap());
        let wt = half(data(o * c * 9, 2, 0.5).reshape((o, c, 3, 3)).unwrap());
        let bias = half(data(o, 3, 1.0));
        let ours = conv2d_columns(&x, &wt, Some(&bias), 1, 1).unwrap();
        let (x32, w32, b32) = (common::f32_twin(&x), common::f32_twin(&wt), common::f32_twin(&bias));
        let reference = x32.conv2d(&w32, 1, 1, 1, 1).unwrap().broadcast_add(&b32.reshape((1, o, 1, 1)).unwrap()).unwrap();
        let r = data(ours.elem_count(), 4, 1.0).reshape(ours.dims()).unwrap();
        let vars = [("x", &x, &x32, bound), ("weight", &wt, &w32, bound), ("bias", &bias, &b32, bias_bound)];
        common::check_half_precision(dtype, &ours, &reference, &r, bound, &vars);
    }
}

#[test]
fn nearest_upsampling_copies_each_pixel_four_times() {
    // against candle's own nearest upsampling
    let x = Tensor::randn(0f32, 1., (2, 3, 4, 5), &Device::Cpu).unwrap();
    let ours = upsample_nearest2x(&x).unwrap();
    assert_eq!(max_diff(&ours, &x.upsample_nearest2d(8, 10).unwrap()), 0.0);
}

#[test]
fn strided_3x3_without_padding() {
    // Odd sides: candle's own conv2d backward (the reference) fails on even sides with stride 2 and no
    // padding (its transposed convolution returns one column too few).
    check(2, 4, 4, (9, 7), (3, 2, 0));
}

#[test]
fn strided_3x3_with_padding() {
    check(3, 2, 5, (8, 8), (3, 2, 1));
    // a 1x1 image: every kernel offset but the centre lands in the padding
    check(2, 2, 3, (1, 1), (3, 2, 1));
}

#[test]
fn pointwise_1x1() {
    check(2, 6, 3, (4, 5), (1, 1, 0));
}

#[test]
fn per_image_bias() {
    // a (B, O) bias: one row per image, as the residual blocks fold the time embedding into conv1
    check_bias(3, 4, 5, (7, 7), (3, 1, 1), 3);
    check_bias(2, 6, 3, (4, 5), (1, 1, 0), 2);
    check_bias(1, 3, 4, (6, 6), (3, 2, 1), 1);
}

#[test]
fn rejects_a_bias_of_the_wrong_shape() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 4, 4), candle_core::DType::F32, &dev).unwrap();
    let w = Tensor::zeros((5, 3, 3, 3), candle_core::DType::F32, &dev).unwrap();
    for shape in [vec![4], vec![3, 5], vec![2, 5, 1]] {
        let bias = Tensor::zeros(shape, candle_core::DType::F32, &dev).unwrap();
        let e = conv2d(&x, &w, Some(&bias), 1, 1).unwrap_err().to_string();
        assert!(e.contains("need (5) or (2, 5)"), "{e}");
    }
}

#[test]
fn rejects_mismatched_weight() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 3, 4, 4), candle_core::DType::F32, &dev).unwrap();
    let w = Tensor::zeros((2, 4, 3, 3), candle_core::DType::F32, &dev).unwrap();
    let e = conv2d(&x, &w, None, 1, 1).unwrap_err().to_string();
    assert!(e.contains("3 channels"), "{e}");
}

#[test]
fn one_image_and_an_uneven_batch() {
    // One image: each product multi-threaded; five images: groups of unequal size per thread.
    check(1, 3, 4, (6, 6), (3, 1, 1));
    check(5, 3, 2, (6, 5), (3, 1, 1));
    check(5, 4, 3, (5, 5), (1, 1, 0));
}

#[test]
fn gradients_do_not_depend_on_scheduling() {
    // The same backward twice gives the same bits (resumed training relies on it).
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (7, 8, 9, 9), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (6, 8, 3, 3), &dev).unwrap()).unwrap();
    let grads = || {
        let g = conv2d(&x, &w, None, 1, 1).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        g.get(&w).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let first = grads();
    for _ in 0..5 {
        assert!(grads().iter().zip(&first).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

/// `conv2d_backward` against the gradients that candle's own conv2d (plus the bias) gets from
/// autograd ([`compare`]): the direct kernel's 3x3 "same" case, Winograd's (wide on both sides), a
/// strided one (im2col) and a 1x1 one. A dy of the wrong shape is an error naming both.
#[test]
fn backward_alone_matches_autograd() {
    let wide = WINOGRAD_MIN_CHANNELS;
    for (b, c, o, side, kernel) in [(2, 5, 8, 9, (3, 1, 1)), (1, wide, wide, 4, (3, 1, 1)), (2, 3, 4, 9, (3, 2, 1)), (2, 6, 3, 5, (1, 1, 0))] {
        compare(b, c, o, (side, side), kernel, 1, Path::BackwardOp);
    }
    // a (B, O) bias: its gradient one row per image
    compare(3, 4, 5, (7, 7), (3, 1, 1), 3, Path::BackwardOp);
    compare(2, 6, 3, (4, 5), (1, 1, 0), 2, Path::BackwardOp);
    let dev = Device::Cpu;
    let (x, wt) = (Tensor::zeros((1, 2, 5, 5), DType::F32, &dev).unwrap(), Tensor::zeros((3, 2, 3, 3), DType::F32, &dev).unwrap());
    let err = conv2d_backward(&x, &wt, &Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap(), 1, 1).unwrap_err().to_string();
    assert!(err.contains("[1, 3, 4, 4]") && err.contains("[1, 3, 5, 5]"), "{err}");
    // dy in another dtype than x: an error naming both
    let f16 = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
    let err = conv2d_backward(&f16(&x), &wt, &Tensor::zeros((1, 3, 5, 5), DType::F32, &dev).unwrap(), 1, 1).unwrap_err().to_string();
    assert!(err.contains("F32") && err.contains("F16") && err.contains("x's dtype"), "{err}");
}

/// `conv2d_backward` in f16 on the CPU (candle's conv2d gradient, the fallback where neither the CPU
/// kernels nor cuDNN run) against the f32 kernels on the same rounded values: dx and dW in f16 within
/// its rounding, dbias in f32.
#[test]
fn backward_alone_in_half_precision_falls_back_to_candles_gradient() {
    let dev = Device::Cpu;
    let (b, c, o, side) = (2, 3, 4, 6);
    let rounded = |n: usize, seed: u64, shape: Vec<usize>| {
        let t = Tensor::from_vec(common::lcg_values(n, seed, 1.0), shape, &dev).unwrap();
        t.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap()
    };
    let x = rounded(b * c * side * side, 31, vec![b, c, side, side]);
    let wt = rounded(o * c * 9, 32, vec![o, c, 3, 3]);
    let dy = rounded(b * o * side * side, 33, vec![b, o, side, side]);
    let f16 = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
    for per_image in [false, true] {
        let backward = if per_image { conv2d_backward_per_image_bias } else { conv2d_backward };
        let (dx, dw, db) = backward(&f16(&x), &wt, &f16(&dy), 1, 1).unwrap();
        let (dx32, dw32, db32) = backward(&x, &wt, &dy, 1, 1).unwrap();
        assert_eq!((dx.dtype(), dw.dtype(), db.dtype()), (DType::F16, DType::F16, DType::F32));
        for (name, half, full) in [("dx", &dx, &dx32), ("dw", &dw, &dw32), ("dbias", &db, &db32)] {
            let d = common::rel_diff(&half.to_dtype(DType::F32).unwrap(), full);
            assert!(d < 3e-3, "{name} (per image {per_image}) differs by {d}");
        }
    }
}
