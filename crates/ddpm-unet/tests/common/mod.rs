//! Shared helpers for the ddpm-unet op tests: seeded test data and the half-precision checks.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};

/// `len` values uniform in [-amp, amp) from a fixed linear congruential generator: repeatable test data
/// that needs no RNG crate and is the same on every device.
pub fn lcg_values(len: usize, seed: u64, amp: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect()
}

/// max |a - b| / max(max |b|, 1), both brought to the CPU and compared in f32: the error relative to
/// the reference's scale.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let b = b.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let d = (&a - &b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    d.to_scalar::<f32>().unwrap() / scale.max(1.0)
}

/// A variable's f32 twin: the same (rounded) values, in f32, as a new variable.
pub fn f32_twin(v: &Var) -> Var {
    Var::from_tensor(&v.to_dtype(DType::F32).unwrap()).unwrap()
}

/// A half-precision op's output `ours` (of dtype `dtype`) against `reference`, the same op in f32 on
/// the f32 twins of its inputs: the output within `bound` ([`rel_diff`]), then the gradients of
/// sum(y r): each `(name, half, twin, bound)` of `vars` must get a gradient in `dtype` within its
/// bound of the twin's.
pub fn check_half_precision(dtype: DType, ours: &Tensor, reference: &Tensor, r: &Tensor, bound: f32, vars: &[(&str, &Var, &Var, f32)]) {
    assert_eq!(ours.dtype(), dtype);
    let d = rel_diff(ours, reference);
    assert!(d < bound, "{dtype:?} forward differs by {d}");
    let g1 = (ours.to_dtype(DType::F32).unwrap() * r).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (reference * r).unwrap().sum_all().unwrap().backward().unwrap();
    for &(name, v, twin, bound) in vars {
        let a = g1.get(v).unwrap();
        assert_eq!(a.dtype(), dtype, "gradient of {name}");
        let d = rel_diff(a, g2.get(twin).unwrap());
        assert!(d < bound, "{dtype:?} gradient of {name} differs by {d}");
    }
}

/// max |a - b| over all elements (f32 tensors on one device).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}
