//! The fused L_simple loss and the fused DDPM step against the composed candle ops they replace, and
//! the loss against a case computed by hand.

use candle_core::{DType, Device, Tensor, Var};
use ddpm_core::config::{PredictionType, SchedulerConfig};
use ddpm_core::ops::{weighted_mse, weighted_mse_composed};
use ddpm_core::DdpmScheduler;

/// Largest |a - b| relative to max(1, max |b|).
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    d / scale.max(1.0)
}

#[test]
fn mse_by_hand() {
    // p = [[1, 2], [3, 5]], y = 0, w = [1, 3]:
    // L = (1 / 2) (1 (1 + 4) / 2 + 3 (9 + 25) / 2) = 26.75, dL/dp_ij = 2 w_i p_ij / 4.
    let dev = Device::Cpu;
    let p = Var::from_vec(vec![1f32, 2., 3., 5.], (2, 2), &dev).unwrap();
    let y = Tensor::zeros((2, 2), DType::F32, &dev).unwrap();
    let loss = weighted_mse(&p, &y, Some(&[1.0, 3.0])).unwrap();
    assert_eq!(loss.to_scalar::<f32>().unwrap(), 26.75);
    let g = loss.backward().unwrap().get(&p).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(g, vec![0.5, 1.0, 4.5, 7.5]);
    // Unweighted: the mean over every element, (1 + 4 + 9 + 25) / 4.
    assert_eq!(weighted_mse(&p, &y, None).unwrap().to_scalar::<f32>().unwrap(), 9.75);
}

#[test]
fn fused_mse_matches_composed_values_and_gradients() {
    let dev = Device::Cpu;
    for (shape, weights) in [(vec![4usize, 3, 5, 5], None), (vec![4, 3, 5, 5], Some(vec![0.5f32, 1.0, 2.0, 0.1])), (vec![1, 1, 28, 28], Some(vec![3.0]))] {
        let p = Var::from_tensor(&Tensor::randn(0f32, 1., shape.as_slice(), &dev).unwrap()).unwrap();
        let y = Tensor::randn(0.3f32, 1.2, shape.as_slice(), &dev).unwrap();
        let a = weighted_mse(&p, &y, weights.as_deref()).unwrap();
        let b = weighted_mse_composed(&p, &y, weights.as_deref()).unwrap();
        assert!(rel_diff(&a, &b) < 1e-6, "loss {a} vs {b}");
        let (ga, gb) = (a.backward().unwrap(), b.backward().unwrap());
        let d = rel_diff(ga.get(&p).unwrap(), gb.get(&p).unwrap());
        assert!(d < 1e-6, "gradient differs by {d} for {shape:?}");
    }
    // Bad arguments are errors, not panics.
    let p = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    assert!(weighted_mse(&p, &p, Some(&[1.0])).is_err());
    assert!(weighted_mse(&p, &Tensor::zeros((3, 2), DType::F32, &dev).unwrap(), None).is_err());
}

#[test]
fn fused_ddpm_step_matches_composed() {
    let dev = Device::Cpu;
    let shape = (3, 2, 9, 7);
    // a wide spread so that clipping is exercised
    let m = Tensor::randn(0f32, 2., shape, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.5, shape, &dev).unwrap();
    let z = Tensor::randn(0f32, 1., shape, &dev).unwrap();
    for pt in [PredictionType::Epsilon, PredictionType::Sample, PredictionType::VPrediction] {
        for clip in [true, false] {
            let cfg = SchedulerConfig { prediction_type: pt, clip_sample: clip, ..SchedulerConfig::default() };
            let mut s = DdpmScheduler::new(&cfg, &dev).unwrap();
            for n in [None, Some(50)] {
                if let Some(n) = n {
                    s.set_timesteps(n).unwrap();
                }
                for &t in [s.timesteps()[0], s.timesteps()[1], 0].iter() {
                    // The reference is the composed step in f64; the fused step (f64 per element,
                    // rounded once) must be at least as close to it as the composed f32 step.
                    let noise = (t > 0).then_some(&z);
                    let f64s = |v: &Tensor| v.to_dtype(DType::F64).unwrap();
                    let r = s.step_composed(&f64s(&m), t, &f64s(&x), noise.map(f64s).as_ref()).unwrap();
                    let a = s.step(&m, t, &x, noise).unwrap();
                    let b = s.step_composed(&m, t, &x, noise).unwrap();
                    let what = format!("{pt:?}, clip {clip}, t = {t}, {n:?} steps");
                    for (name, fa, fb, fr) in [
                        ("prev_sample", &a.prev_sample, &b.prev_sample, &r.prev_sample),
                        ("x0", &a.pred_original_sample, &b.pred_original_sample, &r.pred_original_sample),
                    ] {
                        let fr = fr.to_dtype(DType::F32).unwrap();
                        let (da, db) = (rel_diff(fa, &fr), rel_diff(fb, &fr));
                        assert!(da <= db.max(1e-6) * 1.01, "{name}: fused off by {da}, composed by {db}: {what}");
                        assert_eq!(fa.dims(), fb.dims());
                    }
                }
            }
        }
    }
    // Dynamic thresholding and f64 tensors take the composed path and still step.
    let cfg = SchedulerConfig { thresholding: true, ..SchedulerConfig::default() };
    let s = DdpmScheduler::new(&cfg, &dev).unwrap();
    assert!(s.step(&m, 10, &x, Some(&z)).is_ok());
    let s = DdpmScheduler::new(&SchedulerConfig::default(), &dev).unwrap();
    let (m64, x64, z64) = (m.to_dtype(DType::F64).unwrap(), x.to_dtype(DType::F64).unwrap(), z.to_dtype(DType::F64).unwrap());
    let a = s.step(&m64, 10, &x64, Some(&z64)).unwrap().prev_sample.to_dtype(DType::F32).unwrap();
    let b = s.step(&m, 10, &x, Some(&z)).unwrap().prev_sample;
    assert!(rel_diff(&a, &b) < 2e-6);
    // t > 0 without noise is still an error.
    assert!(s.step(&m, 10, &x, None).is_err());
}
