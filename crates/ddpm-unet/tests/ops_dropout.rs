//! Dropout's counter-based mask: a known answer from splitmix64's published sequence, the fused op
//! against the host mask, the kept fraction, the gradient, and the half-precision path.

use candle_core::{DType, Device, Tensor, Var};
use ddpm_unet::ops::{dropout, dropout_mask};

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn known_answer_from_splitmix64() {
    // splitmix64 seeded with 0 outputs 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F:
    // u = 0x7B1DCDAF, 0xE220A839, 0xA1B965F4, 0x6E789E6A, 0x8009454F, 0x06C45D18 (low half first).
    // With p = 1/2 an element is kept when u >= 2^31 and then doubled.
    let x = Tensor::new(&[1f32, 2., 3., 4., 5., 6.], &Device::Cpu).unwrap();
    assert_eq!(values(&dropout(&x, 0.5, 0).unwrap()), [0., 4., 6., 0., 10., 0.]);
    assert_eq!(dropout_mask(6, 0.5, 0), [0., 2., 2., 0., 2., 0.]);
}

#[test]
fn fused_op_equals_the_host_mask() {
    // an odd length over several parallel chunks of the CPU kernel
    let n = 3 * (1 << 14) + 5;
    let x = Tensor::randn(0f32, 1., n, &Device::Cpu).unwrap();
    for (p, seed) in [(0.1, 7u64), (0.5, u64::MAX), (0.9, 12345)] {
        let m = Tensor::from_vec(dropout_mask(n, p, seed), n, &Device::Cpu).unwrap();
        assert_eq!(values(&dropout(&x, p, seed).unwrap()), values(&(&x * &m).unwrap()), "p {p} seed {seed}");
    }
}

#[test]
fn keeps_one_minus_p_of_the_elements_scaled() {
    let n = 1 << 20;
    for p in [0.1, 0.3] {
        let m = dropout_mask(n, p, 99);
        let kept = m.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
        // binomial standard deviation sqrt(p (1 - p) / n) < 5e-4
        assert!((kept - (1.0 - p)).abs() < 3e-3, "p {p}: kept {kept}");
        assert!(m.iter().all(|&v| v == 0.0 || v == (1.0 / (1.0 - p)) as f32));
    }
    // a different seed gives a different mask
    assert_ne!(dropout_mask(64, 0.5, 1), dropout_mask(64, 0.5, 2));
}

#[test]
fn gradient_is_the_upstream_gradient_times_the_mask() {
    let (n, p, seed) = (1000, 0.2, 3);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (10, n / 10), &Device::Cpu).unwrap()).unwrap();
    let r = Tensor::randn(0f32, 1., (10, n / 10), &Device::Cpu).unwrap();
    let grads = (dropout(&x, p, seed).unwrap() * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let m = Tensor::from_vec(dropout_mask(n, p, seed), (10, n / 10), &Device::Cpu).unwrap();
    assert_eq!(values(grads.get(&x).unwrap()), values(&(&r * &m).unwrap()));
}

#[test]
fn half_precision_multiplies_by_the_same_mask() {
    let n = 257;
    let x = Tensor::randn(0f32, 1., n, &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap();
    let y = dropout(&x, 0.25, 5).unwrap();
    assert_eq!(y.dtype(), DType::F16);
    let m = Tensor::from_vec(dropout_mask(n, 0.25, 5), n, &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap();
    assert_eq!(values(&y), values(&(&x * &m).unwrap()));
}

#[test]
fn p_zero_keeps_everything_and_bad_p_is_an_error() {
    let x = Tensor::randn(0f32, 1., 100, &Device::Cpu).unwrap();
    assert_eq!(values(&dropout(&x, 0.0, 1).unwrap()), values(&x));
    for p in [1.0, -0.1, f64::NAN] {
        let e = dropout(&x, p, 1).unwrap_err().to_string();
        assert!(e.contains("dropout: p =") && e.contains("must be in [0, 1)"), "{e}");
    }
}
