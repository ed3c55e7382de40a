//! The fused attention op and the fused softmax against the composed candle ops they replace (values
//! and gradients), and attention against a case computed by hand.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::max_abs_diff;
use ddpm_unet::ops::attention::attention_products;
use ddpm_unet::ops::{attention, attention_composed, softmax_last_dim};

/// Output and qkv gradient of `f` for the loss sum(out * r).
fn forward_and_grad(f: impl Fn(&Tensor) -> Result<Tensor>, qkv: &[f32], r: &[f32], shape: (usize, usize, usize), out_shape: (usize, usize, usize)) -> (Tensor, Tensor) {
    let x = Var::from_vec(qkv.to_vec(), shape, &Device::Cpu).unwrap();
    let r = Tensor::from_vec(r.to_vec(), out_shape, &Device::Cpu).unwrap();
    let out = f(x.as_tensor()).unwrap();
    let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    (out, grads.get(x.as_tensor()).unwrap().clone())
}

/// The fused op against the composed candle ops, values and gradients, for one and several heads,
/// an odd number of positions, and fewer samples than threads (multi-threaded products).
#[test]
fn fused_matches_composed() {
    for (n, heads, d, l) in [(3, 1, 8, 7), (2, 2, 4, 9), (1, 4, 2, 16), (5, 1, 16, 49)] {
        let c = heads * d;
        let scale = 1.0 / (d as f64).sqrt();
        let qkv = common::lcg_values(n * 3 * c * l, (n * 100 + heads * 10 + l) as u64, 2.0);
        let r = common::lcg_values(n * c * l, 7 + l as u64, 1.0);
        let (fo, fg) = forward_and_grad(|x| attention(x, heads, scale), &qkv, &r, (n, 3 * c, l), (n, c, l));
        let (co, cg) = forward_and_grad(|x| attention_composed(x, heads, scale), &qkv, &r, (n, 3 * c, l), (n, c, l));
        let (eo, eg) = (max_abs_diff(&fo, &co), max_abs_diff(&fg, &cg));
        assert!(eo < 1e-5 && eg < 1e-5, "n {n} heads {heads} d {d} l {l}: output error {eo}, gradient error {eg}");
    }
}

/// The fused softmax (CUDA's attention probabilities; here its CPU kernel) against candle's softmax,
/// values and gradients: rows of 1, 7 and 300 values, large logits (no overflow), rank 2 to 4.
#[test]
fn softmax_matches_candle() {
    for (shape, amp) in [(vec![4, 1], 3.0), (vec![3, 5, 7], 3.0), (vec![2, 300], 80.0), (vec![2, 2, 3, 9], 1.0)] {
        let n: usize = shape.iter().product();
        let x = common::lcg_values(n, n as u64, amp);
        let r = common::lcg_values(n, 3, 1.0);
        let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
            let v = Var::from_vec(x.clone(), shape.as_slice(), &Device::Cpu).unwrap();
            let out = f(v.as_tensor()).unwrap();
            let rt = Tensor::from_vec(r.clone(), shape.as_slice(), &Device::Cpu).unwrap();
            let grads = (&out * &rt).unwrap().sum_all().unwrap().backward().unwrap();
            (out, grads.get(v.as_tensor()).unwrap().clone())
        };
        let (fo, fg) = run(&softmax_last_dim);
        let (co, cg) = run(&|t: &Tensor| candle_nn::ops::softmax(t, candle_core::D::Minus1));
        let (eo, eg) = (max_abs_diff(&fo, &co), max_abs_diff(&fg, &cg));
        assert!(eo < 1e-6 && eg < 1e-6, "shape {shape:?}: output error {eo}, gradient error {eg}");
    }
}

/// Attention as products around the fused softmax (CUDA's path) against the composed ops.
#[test]
fn products_with_fused_softmax_match_composed() {
    for (n, heads, d, l) in [(2, 2, 4, 9), (3, 1, 8, 49)] {
        let c = heads * d;
        let scale = 1.0 / (d as f64).sqrt();
        let qkv = common::lcg_values(n * 3 * c * l, 11 + l as u64, 2.0);
        let r = common::lcg_values(n * c * l, 5, 1.0);
        let (po, pg) = forward_and_grad(|x| attention_products(x, heads, scale, softmax_last_dim), &qkv, &r, (n, 3 * c, l), (n, c, l));
        let (co, cg) = forward_and_grad(|x| attention_composed(x, heads, scale), &qkv, &r, (n, 3 * c, l), (n, c, l));
        let (eo, eg) = (max_abs_diff(&po, &co), max_abs_diff(&pg, &cg));
        assert!(eo < 1e-5 && eg < 1e-5, "n {n} heads {heads} d {d} l {l}: output error {eo}, gradient error {eg}");
    }
}

/// One head, d = 1, two positions: q = (1, 0), k = (0, ln 3), v = (2, 6), scale 1. Row 0 of S is
/// (0, ln 3), so P_0 = (1/4, 3/4) and o_0 = 2/4 + 18/4 = 5; row 1 is (0, 0), P_1 = (1/2, 1/2), o_1 = 4.
/// With dO = (1, 0): dV = P^T dO = (1/4, 3/4); dP_0 = dO_0 v = (2, 6), D_0 = 2/4 + 18/4 = 5,
/// dS_0 = P_0 (dP_0 - 5) = (-3/4, 3/4), dS_1 = 0; dQ_0 = dS_0 k = 3/4 ln 3, dQ_1 = 0;
/// dK = dS^T q = (-3/4, 3/4).
#[test]
fn hand_computed_case() {
    let ln3 = 3f32.ln();
    let qkv = [1.0, 0.0, 0.0, ln3, 2.0, 6.0];
    let (out, grad) = forward_and_grad(|x| attention(x, 1, 1.0), &qkv, &[1.0, 0.0], (1, 3, 2), (1, 1, 2));
    let out: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
    let grad: Vec<f32> = grad.flatten_all().unwrap().to_vec1().unwrap();
    let want_out = [5.0, 4.0];
    let want_grad = [0.75 * ln3, 0.0, -0.75, 0.75, 0.25, 0.75];
    for (got, want) in out.iter().chain(&grad).zip(want_out.iter().chain(&want_grad)) {
        assert!((got - want).abs() < 1e-5, "got {out:?} / {grad:?}, want {want_out:?} / {want_grad:?}");
    }
}

/// A channel count that is not 3 x heads x width, or zero heads, is an error, not a panic.
#[test]
fn bad_channel_count_is_an_error() {
    let x = Tensor::zeros((1, 10, 4), DType::F32, &Device::Cpu).unwrap();
    let err = attention(&x, 2, 1.0).unwrap_err().to_string();
    assert!(err.contains("10 channels"), "{err}");
    // no heads at all (a division by zero before it was checked)
    let x = Tensor::zeros((1, 12, 4), DType::F32, &Device::Cpu).unwrap();
    let err = attention(&x, 0, 1.0).unwrap_err().to_string();
    assert!(err.contains("0 heads"), "{err}");
}
