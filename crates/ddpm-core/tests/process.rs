//! Forward process, loss, samplers, rng.

use candle_core::{DType, Device, Tensor, Var};
use ddpm_core::loss::{simple_loss, LossWeighting};
use ddpm_core::{
    sample, sample_from_shape, DdimScheduler, DdpmScheduler, NoiseRng, NoiseSchedule, PredictionType, Sampler, SchedulerConfig,
};

#[test]
fn rng_is_deterministic_and_resumable() {
    let mut a = NoiseRng::new(42);
    let mut b = NoiseRng::new(42);
    let x = a.randn((2, 3), DType::F32, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
    let y = b.randn((2, 3), DType::F32, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(x, y);
    let saved = a.state();
    let next_a = a.randint(5, 1000, &Device::Cpu).unwrap().to_vec1::<i64>().unwrap();
    let mut c = NoiseRng::from_state(saved);
    assert_eq!(c.randint(5, 1000, &Device::Cpu).unwrap().to_vec1::<i64>().unwrap(), next_a);
    assert!(next_a.iter().all(|&t| (0..1000).contains(&t)));
    let z = NoiseRng::new(43).randn((2, 3), DType::F32, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
    assert_ne!(x, z);
    // timesteps(): randint's draws, on the host and as the tensor, leaving the generator where
    // randint leaves it
    let (mut d, mut e) = (NoiseRng::from_state(saved), NoiseRng::from_state(saved));
    let (host, t) = d.timesteps(5, 1000, &Device::Cpu).unwrap();
    assert_eq!(host.iter().map(|&v| v as i64).collect::<Vec<_>>(), next_a);
    assert_eq!(t.to_vec1::<i64>().unwrap(), next_a);
    e.randint(5, 1000, &Device::Cpu).unwrap();
    assert_eq!(d.state(), e.state());
    assert!(d.timesteps(2, 0, &Device::Cpu).is_err());
}

#[test]
fn q_sample_closed_form_and_posterior() {
    let s = NoiseSchedule::new(&SchedulerConfig::default(), &Device::Cpu).unwrap();
    let x0 = Tensor::new(&[[0.5f32, -0.25], [1.0, 0.0]], &Device::Cpu).unwrap();
    let eps = Tensor::new(&[[1.0f32, 2.0], [-1.0, 0.5]], &Device::Cpu).unwrap();
    let t = Tensor::new(&[10u32, 900], &Device::Cpu).unwrap();
    let xt = s.q_sample(&x0, &t, &eps).unwrap().to_vec2::<f32>().unwrap();
    let ab = s.alphas_cumprod();
    // x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    let want = |tt: usize, x: f64, e: f64| ab[tt].sqrt() * x + (1.0 - ab[tt]).sqrt() * e;
    assert!((xt[0][0] as f64 - want(10, 0.5, 1.0)).abs() < 1e-6);
    assert!((xt[1][1] as f64 - want(900, 0.0, 0.5)).abs() < 1e-6);
    // posterior mean of q(x_{t-1} | x_t, x_0) is a convex-like combination; with x_t = q_sample it
    // matches coef1 x0 + coef2 xt
    let xt_t = s.q_sample(&x0, &t, &eps).unwrap();
    let post = s.posterior_mean_variance(&x0, &xt_t, &t).unwrap();
    let m = post.mean.to_vec2::<f32>().unwrap();
    let c1 = s.posterior_mean_coef1()[10];
    let c2 = s.posterior_mean_coef2()[10];
    assert!((m[0][0] as f64 - (c1 * 0.5 + c2 * xt[0][0] as f64)).abs() < 1e-6);
    // variance beta-tilde = beta (1 - abar_prev) / (1 - abar)
    let v = post.variance.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bt = s.betas()[10] * (1.0 - ab[9]) / (1.0 - ab[10]);
    assert!((v[0] as f64 - bt).abs() < 1e-9);
    let q = s.q_mean_variance(&x0, &t).unwrap();
    assert!((q.variance.flatten_all().unwrap().to_vec1::<f32>().unwrap()[1] as f64 - (1.0 - ab[900])).abs() < 1e-6);
}

#[test]
fn loss_targets_and_gradients() {
    let dev = Device::Cpu;
    let mut rng = NoiseRng::new(1);
    let x0 = rng.randn((2, 1, 2, 2), DType::F32, &dev).unwrap();
    let noise = rng.randn((2, 1, 2, 2), DType::F32, &dev).unwrap();
    let t = Tensor::new(&[3i64, 700], &dev).unwrap();
    for pt in [PredictionType::Epsilon, PredictionType::Sample, PredictionType::VPrediction] {
        let config = SchedulerConfig { prediction_type: pt, ..Default::default() };
        let s = NoiseSchedule::new(&config, &dev).unwrap();
        let target = ddpm_core::loss::target(&s, pt, &x0, &noise, &[3, 700]).unwrap();
        // output = target gives zero loss
        let l0 = simple_loss(&s, LossWeighting::None, &target, &x0, &noise, &t).unwrap();
        assert!(l0.to_scalar::<f32>().unwrap().abs() < 1e-12);
        // output = target + 1 gives loss 1 (weight 1), and the gradient 2 (out - target) / n
        let out = Var::from_tensor(&(target.clone() + 1.0).unwrap()).unwrap();
        let l = simple_loss(&s, LossWeighting::None, out.as_tensor(), &x0, &noise, &t).unwrap();
        assert!((l.to_scalar::<f32>().unwrap() - 1.0).abs() < 1e-6);
        let grads = l.backward().unwrap();
        let g = grads.get(&out).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(g.iter().all(|v| (v - 2.0 / 8.0).abs() < 1e-6), "{g:?}");
        // min-SNR: loss = mean_i w_i
        let gamma = 5.0;
        let lw = simple_loss(&s, LossWeighting::MinSnr { gamma }, out.as_tensor(), &x0, &noise, &t).unwrap();
        let w: Vec<f64> = [3usize, 700]
            .iter()
            .map(|&tt| {
                let snr = s.snr(tt).unwrap();
                match pt {
                    PredictionType::Epsilon => snr.min(gamma) / snr,
                    PredictionType::Sample => snr.min(gamma),
                    PredictionType::VPrediction => snr.min(gamma) / (snr + 1.0),
                }
            })
            .collect();
        let want = (w[0] + w[1]) / 2.0;
        assert!((lw.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-5 * want.max(1.0), "{pt}");
        assert!(lw.backward().unwrap().get(&out).is_some());
    }
    // v = sqrt(abar) eps - sqrt(1 - abar) x0
    let s = NoiseSchedule::new(&SchedulerConfig::default(), &dev).unwrap();
    let v = s.velocity(&x0, &noise, &[3, 700]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (x, e) = (x0.flatten_all().unwrap().to_vec1::<f32>().unwrap(), noise.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let ab = s.alphas_cumprod()[700];
    assert!((v[5] as f64 - (ab.sqrt() * e[5] as f64 - (1.0 - ab).sqrt() * x[5] as f64)).abs() < 1e-6);
}

#[test]
fn samplers_run_and_repeat_exactly() {
    let dev = Device::Cpu;
    let config = SchedulerConfig::default();
    // a predictor that says the noise is x_t scaled: keeps things bounded
    let predictor = |x: &Tensor, t: &Tensor| -> candle_core::Result<Tensor> {
        assert_eq!(t.dtype(), DType::I64);
        x * 0.5
    };
    let mut ddpm = DdpmScheduler::new(&config, &dev).unwrap();
    ddpm.set_timesteps(10).unwrap();
    let mut ddim = DdimScheduler::new(&config, &dev).unwrap().with_eta(0.5).unwrap();
    ddim.set_timesteps(10).unwrap();
    for sampler in [Sampler::from(ddpm), Sampler::from(ddim)] {
        let mut seen = Vec::new();
        let a = sample_from_shape(&predictor, &sampler, (2, 1, 4, 4), DType::F32, &dev, &mut NoiseRng::new(5), |i, t, x| {
            assert_eq!(x.dims(), &[2, 1, 4, 4]);
            seen.push((i, t));
        })
        .unwrap();
        assert_eq!(seen.len(), 10);
        assert_eq!(seen[0], (0, 900));
        assert_eq!(seen[9], (9, 0));
        let b = sample_from_shape(&predictor, &sampler, (2, 1, 4, 4), DType::F32, &dev, &mut NoiseRng::new(5), |_, _, _| {}).unwrap();
        let (a, b) = (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(a, b);
        assert!(a.iter().all(|v| v.is_finite()));
    }
    // deterministic DDIM (eta 0) from a given x_T needs no randomness
    let mut d = DdimScheduler::new(&config, &dev).unwrap();
    d.set_timesteps(5).unwrap();
    let x_t = NoiseRng::new(9).randn((1, 1, 2, 2), DType::F32, &dev).unwrap();
    let r1 = sample(&predictor, &d, x_t.clone(), &mut NoiseRng::new(1), |_, _, _| {}).unwrap();
    let r2 = sample(&predictor, &d, x_t, &mut NoiseRng::new(2), |_, _, _| {}).unwrap();
    assert_eq!(r1.flatten_all().unwrap().to_vec1::<f32>().unwrap(), r2.flatten_all().unwrap().to_vec1::<f32>().unwrap());
}

#[test]
fn dynamic_thresholding_and_errors() {
    let dev = Device::Cpu;
    // per-sample quantile of |x0| clamped to [1, max]; then clamp and divide
    let x = Tensor::new(&[[[[0.5f32, 3.0], [-2.0, 1.0]]], [[[0.1f32, 0.2], [-0.3, 0.4]]]], &dev).unwrap();
    let y = ddpm_core::ddpm::dynamic_threshold(&x, 0.5, 2.5).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // sample 0: |x| sorted 0.5 1 2 3, quantile 0.5 at position 1.5 -> 1.5; s = 1.5
    let s = 1.5f32;
    let want0 = [0.5 / s, 1.0, -1.0, 1.0 / s];
    for (g, w) in y[..4].iter().zip(want0) {
        assert!((g - w).abs() < 1e-6, "{g} vs {w}");
    }
    // sample 1: quantile 0.25 -> s = 1 (clamped up), values unchanged
    for (g, w) in y[4..].iter().zip([0.1f32, 0.2, -0.3, 0.4]) {
        assert!((g - w).abs() < 1e-6);
    }
    // wrong shapes and missing noise are errors, not panics
    let s = DdpmScheduler::new(&SchedulerConfig::default(), &dev).unwrap();
    let a = Tensor::zeros((1, 1, 2, 2), DType::F32, &dev).unwrap();
    let b = Tensor::zeros((1, 2, 2, 2), DType::F32, &dev).unwrap();
    assert!(s.step(&a, 5, &b, None).is_err());
    assert!(s.step(&a, 5, &a, None).is_err());
    assert!(s.step(&a, 1000, &a, Some(&a)).is_err());
    assert!(s.step(&a, 0, &a, None).is_ok());
    let mut s2 = s.clone();
    assert!(s2.set_timesteps(0).is_err());
    assert!(s2.set_timesteps(1001).is_err());
    assert!(DdimScheduler::new(&SchedulerConfig::default(), &dev).unwrap().with_eta(-1.0).is_err());
}
