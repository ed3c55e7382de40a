//! The fused group norm (+ SiLU) against a reference composed from candle ops written out here:
//! outputs and the gradients of x, gamma and beta, with and without SiLU, for several shapes; and
//! its forward against `candle_nn::GroupNorm`; the backward op alone (`group_norm_backward`) against
//! the reference's autograd.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use ddpm_unet::ops::{group_norm, group_norm_backward, group_norm_composed};

/// Group norm + optional SiLU from elementary candle ops, independent of the crate's code:
/// mean and biased variance over (N, G, M), then the affine map, then x * sigmoid(x).
fn reference(x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64, silu: bool) -> Tensor {
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    let xg = x.reshape((n, groups, ())).unwrap();
    let mean = xg.mean_keepdim(2).unwrap();
    let xc = xg.broadcast_sub(&mean).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(2).unwrap();
    let xhat = xc.broadcast_div(&(var + eps).unwrap().sqrt().unwrap()).unwrap().reshape(dims.as_slice()).unwrap();
    let mut w = vec![1; dims.len()];
    w[1] = c;
    let y = xhat
        .broadcast_mul(&gamma.reshape(w.as_slice()).unwrap())
        .unwrap()
        .broadcast_add(&beta.reshape(w.as_slice()).unwrap())
        .unwrap();
    if silu {
        let sig = (y.neg().unwrap().exp().unwrap() + 1.0).unwrap().recip().unwrap();
        (&y * sig).unwrap()
    } else {
        y
    }
}

/// Compares values and gradients (loss = sum(out * r), r random) of `f` against [`reference`].
fn check_with(
    shape: &[usize],
    groups: usize,
    silu: bool,
    f: impl Fn(&Tensor, usize, &Tensor, &Tensor, f64, bool) -> candle_core::Result<Tensor>,
) {
    let dev = Device::Cpu;
    let (c, n) = (shape[1], shape.iter().product::<usize>());
    // Seeded data: with unseeded draws a group of two nearly equal values now and then made the
    // reference and the op (both f32) disagree by more than the bound, as any f32 group norm would.
    let seed = (n * 31 + groups * 7 + silu as usize) as u64;
    let values = |len: usize, k: u64, amp: f32| Tensor::from_vec(common::lcg_values(len, seed + k, amp), len, &dev).unwrap();
    // a non-zero mean and a non-unit scale, so that the centring matters
    let x = Var::from_tensor(&(values(n, 0, 3.5).reshape(shape).unwrap() + 0.7).unwrap()).unwrap();
    let gamma = Var::from_tensor(&(values(c, 1, 0.85) + 1.0).unwrap()).unwrap();
    let beta = Var::from_tensor(&values(c, 2, 1.7)).unwrap();
    let eps = 1e-5;
    let ours = f(&x, groups, &gamma, &beta, eps, silu).unwrap();
    let want = reference(&x, groups, &gamma, &beta, eps, silu);
    assert_eq!(ours.dims(), want.dims());
    let d = common::rel_diff(&ours, &want);
    assert!(d < 1e-4, "forward differs by {d} (shape {shape:?}, {groups} groups, silu {silu})");
    let r = values(n, 3, 1.7).reshape(shape).unwrap();
    let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in [("x", &x), ("gamma", &gamma), ("beta", &beta)] {
        let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
        assert_eq!(a.dims(), b.dims(), "gradient of {name} has the wrong shape");
        let d = common::rel_diff(a, b);
        assert!(d < 1e-4, "gradient of {name} differs by {d} (shape {shape:?}, {groups} groups, silu {silu})");
    }
}

/// `(len, k, amp) ->` `len` seeded values in [-amp, amp) from seed `seed + k`, on the CPU.
fn seeded(seed: u64) -> impl Fn(usize, u64, f32) -> Tensor {
    move |len, k, amp| Tensor::from_vec(common::lcg_values(len, seed + k, amp), len, &Device::Cpu).unwrap()
}

/// The half-precision tests' inputs in f32 from seed `seed`: x (shape, 8 channels) in [-2.5, 3.5),
/// gamma around 1, beta, and the weights r of the output in the loss sum(out r).
fn half_case(seed: u64, shape: &[usize]) -> [Tensor; 4] {
    let data = seeded(seed);
    let n: usize = shape.iter().product();
    let x = (data(n, 0, 3.0).reshape(shape).unwrap() + 0.5).unwrap();
    [x, (data(8, 1, 0.5) + 1.0).unwrap(), data(8, 2, 1.0), data(n, 3, 1.0).reshape(shape).unwrap()]
}

fn check(shape: &[usize], groups: usize, silu: bool) {
    check_with(shape, groups, silu, group_norm);
}

#[test]
fn four_groups_odd_spatial() {
    check(&[2, 8, 5, 7], 4, false);
    check(&[2, 8, 5, 7], 4, true);
}

#[test]
fn one_channel_per_group() {
    check(&[3, 32, 4, 4], 32, false);
    check(&[3, 32, 4, 4], 32, true);
}

#[test]
fn rank_three() {
    check(&[1, 6, 3], 2, false);
    check(&[1, 6, 3], 2, true);
}

#[test]
fn rank_two() {
    check(&[4, 6], 3, true);
}

#[test]
fn large_groups_exercise_blocks() {
    // 2 channels of 40 x 40 per group: several f32 blocks per channel
    check(&[2, 4, 40, 40], 2, true);
}

#[test]
fn composed_fallback_matches_reference() {
    check_with(&[2, 8, 5, 7], 4, true, group_norm_composed);
    check_with(&[1, 6, 3], 2, false, group_norm_composed);
}

#[test]
fn forward_matches_candle_nn() {
    let dev = Device::Cpu;
    for (shape, groups) in [(vec![2, 8, 5, 7], 4), (vec![3, 32, 4, 4], 32), (vec![1, 6, 3], 2)] {
        let c = shape[1];
        let x = (Tensor::randn(0f32, 3., shape.as_slice(), &dev).unwrap() - 1.5).unwrap();
        let gamma = Tensor::randn(1f32, 0.5, c, &dev).unwrap();
        let beta = Tensor::randn(0f32, 1., c, &dev).unwrap();
        let nn = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, groups, 1e-6).unwrap();
        let want = nn.forward(&x).unwrap();
        let ours = group_norm(&x, groups, &gamma, &beta, 1e-6, false).unwrap();
        assert!(common::rel_diff(&ours, &want) < 1e-4, "shape {shape:?}: {}", common::rel_diff(&ours, &want));
        let ours = group_norm(&x, groups, &gamma, &beta, 1e-6, true).unwrap();
        let want = candle_nn::ops::silu(&want).unwrap();
        assert!(common::rel_diff(&ours, &want) < 1e-4, "silu, shape {shape:?}: {}", common::rel_diff(&ours, &want));
    }
}

#[test]
fn silu_saturates_cleanly() {
    // large |y|: the fast exp must neither overflow into NaN nor lose the identity / zero limits
    let dev = Device::Cpu;
    let x = Tensor::new(&[[-1000f32, -1.0, 0.0, 1.0, 1000.0, 3.0]], &dev).unwrap().reshape((1, 1, 6)).unwrap();
    let gamma = Tensor::new(&[200f32], &dev).unwrap();
    let beta = Tensor::new(&[0f32], &dev).unwrap();
    let ours = group_norm(&x, 1, &gamma, &beta, 1e-5, true).unwrap();
    let want = reference(&x, 1, &gamma, &beta, 1e-5, true);
    let v = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|v| v.is_finite()), "{v:?}");
    assert!(common::rel_diff(&ours, &want) < 1e-5, "{v:?}");
}

#[test]
fn strided_and_f64_inputs_fall_back() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (2, 5, 4, 8), &dev).unwrap();
    let gamma = Tensor::randn(1f32, 0.5, 8, &dev).unwrap();
    let beta = Tensor::randn(0f32, 1., 8, &dev).unwrap();
    // (2, 8, 4, 5) view that is not contiguous
    let xt = x.transpose(1, 3).unwrap();
    assert!(!xt.is_contiguous());
    let ours = group_norm(&xt, 4, &gamma, &beta, 1e-5, true).unwrap();
    let want = group_norm(&xt.contiguous().unwrap(), 4, &gamma, &beta, 1e-5, true).unwrap();
    assert!(common::rel_diff(&ours, &want) < 1e-5);
    let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let ours = group_norm(&f64s(&xt), 4, &f64s(&gamma), &f64s(&beta), 1e-5, true).unwrap();
    assert_eq!(ours.dtype(), DType::F64);
    assert!(common::rel_diff(&ours, &want) < 1e-5);
    let f16s = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
    let ours = group_norm(&f16s(&xt), 4, &f16s(&gamma), &f16s(&beta), 1e-5, true).unwrap();
    assert_eq!(ours.dtype(), DType::F16);
    assert!(common::rel_diff(&ours, &want) < 1e-2);
}

#[test]
fn half_precision_runs_the_f32_op_between_casts() {
    // bf16 and f16 inputs: values and gradients against the f32 reference on the same rounded values,
    // within the half types' rounding (bf16 2^-8, f16 2^-11 relative) of the output and the gradients.
    let (shape, groups) = ([2usize, 8, 5, 3], 4);
    let [x, gamma, beta, r] = half_case(40, &shape);
    for (dtype, bound) in [(DType::BF16, 2e-2), (DType::F16, 3e-3)] {
        let half = |t: &Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
        let (x, gamma, beta) = (half(&x), half(&gamma), half(&beta));
        let (x32, g32, b32) = (common::f32_twin(&x), common::f32_twin(&gamma), common::f32_twin(&beta));
        let ours = group_norm(&x, groups, &gamma, &beta, 1e-5, true).unwrap();
        let want = reference(&x32, groups, &g32, &b32, 1e-5, true);
        let vars = [("x", &x, &x32, bound), ("gamma", &gamma, &g32, bound), ("beta", &beta, &b32, bound)];
        common::check_half_precision(dtype, &ours, &want, &r, bound, &vars);
    }
}

#[test]
fn half_precision_backward_alone_matches_the_graphs() {
    // bf16 and f16 x with f32 gamma and beta (master weights under mixed precision): the backward op
    // alone gives the gradients that candle's graph gets through group_norm's casts, dx exactly (the
    // same f32 op between the same casts), dgamma and dbeta in f32 where the graph rounds them to
    // the half type on their way back through the cast.
    let (shape, groups) = ([2usize, 8, 5, 3], 4);
    let [x, gamma, beta, r] = half_case(41, &shape);
    let (gamma, beta) = (Var::from_tensor(&gamma).unwrap(), Var::from_tensor(&beta).unwrap());
    for (dtype, bound) in [(DType::BF16, 8e-3), (DType::F16, 1e-3)] {
        let x = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
        let r = r.to_dtype(dtype).unwrap();
        for silu in [false, true] {
            let want = (group_norm(&x, groups, &gamma, &beta, 1e-5, silu).unwrap() * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let (dx, dgamma, dbeta) = group_norm_backward(&x, groups, &gamma, &beta, 1e-5, silu, &r).unwrap();
            let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(dx.dtype(), dtype);
            assert_eq!(f32s(&dx), f32s(want.get(&x).unwrap()), "{dtype:?} dx (silu {silu})");
            for (name, ours, v) in [("gamma", &dgamma, &gamma), ("beta", &dbeta, &beta)] {
                assert_eq!(ours.dtype(), DType::F32, "{name}");
                let d = common::rel_diff(ours, want.get(v).unwrap());
                assert!(d > 0.0 && d < bound, "{dtype:?} gradient of {name} differs by {d} (silu {silu})");
            }
        }
    }
}

#[test]
fn rejects_bad_arguments() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 6, 3, 3), DType::F32, &dev).unwrap();
    let g6 = Tensor::ones(6, DType::F32, &dev).unwrap();
    let g4 = Tensor::ones(4, DType::F32, &dev).unwrap();
    assert!(group_norm(&x, 4, &g6, &g6, 1e-5, false).is_err());
    assert!(group_norm(&x, 0, &g6, &g6, 1e-5, false).is_err());
    assert!(group_norm(&x, 2, &g4, &g6, 1e-5, false).is_err());
    assert!(group_norm(&x, 2, &g6, &g4, 1e-5, false).is_err());
    assert!(group_norm(&Tensor::zeros(6, DType::F32, &dev).unwrap(), 2, &g6, &g6, 1e-5, false).is_err());
}

#[test]
fn backward_alone_matches_the_reference() {
    let dev = Device::Cpu;
    let (shape, groups) = ([3usize, 6, 5, 4], 3);
    let n: usize = shape.iter().product();
    let data = seeded(90);
    let x = Var::from_tensor(&(data(n, 0, 2.5).reshape(&shape[..]).unwrap() + 0.4).unwrap()).unwrap();
    let gamma = Var::from_tensor(&(data(6, 1, 0.8) + 1.0).unwrap()).unwrap();
    let beta = Var::from_tensor(&data(6, 2, 1.2)).unwrap();
    let r = data(n, 3, 1.5).reshape(&shape[..]).unwrap();
    for silu in [false, true] {
        // loss = sum(out r): the incoming gradient is r
        let (dx, dgamma, dbeta) = group_norm_backward(&x, groups, &gamma, &beta, 1e-5, silu, &r).unwrap();
        let want = (reference(&x, groups, &gamma, &beta, 1e-5, silu) * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, ours, v) in [("x", &dx, &x), ("gamma", &dgamma, &gamma), ("beta", &dbeta, &beta)] {
            let w = want.get(v).unwrap();
            assert_eq!(ours.dims(), w.dims(), "{name}");
            let d = common::rel_diff(ours, w);
            assert!(d < 1e-4, "gradient of {name} differs by {d} (silu {silu})");
        }
    }
    let short = Tensor::zeros((3, 6, 5, 3), DType::F32, &dev).unwrap();
    let err = group_norm_backward(&x, groups, &gamma, &beta, 1e-5, true, &short).unwrap_err().to_string();
    assert!(err.contains("[3, 6, 5, 3]") && err.contains("[3, 6, 5, 4]"), "{err}");
    let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let err = group_norm_backward(&f64s(&x), groups, &f64s(&gamma), &f64s(&beta), 1e-5, true, &f64s(&r)).unwrap_err().to_string();
    assert!(err.contains("f32"), "{err}");
}
