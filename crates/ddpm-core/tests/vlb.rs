//! The variational bound: closed forms, and a finite bound that decreases with T for the true noise.

mod common;

use candle_core::{DType, Device, Tensor};
use common::phi;
use ddpm_core::vlb::{discretized_gaussian_log_likelihood, normal_kl, nll_bits_per_dim};
use ddpm_core::{NoiseRng, NoiseSchedule, SchedulerConfig, VarianceType};

fn scalar(v: f64) -> Tensor {
    Tensor::new(&[v as f32], &Device::Cpu).unwrap()
}

fn first(t: &Tensor) -> f64 {
    common::to_f64(t)[0]
}

#[test]
fn normal_kl_closed_form() {
    // KL(N(m1, v1) || N(m2, v2)) = 0.5 (log(v2/v1) + v1/v2 + (m1 - m2)^2 / v2 - 1)
    for (m1, v1, m2, v2) in [(0.0f64, 1.0f64, 0.0f64, 1.0f64), (1.0, 2.0, 0.0, 1.0), (0.3, 0.5, -0.2, 0.7), (2.0, 1e-3, 1.9, 4e-3)] {
        let want: f64 = 0.5 * ((v2 / v1).ln() + v1 / v2 + (m1 - m2) * (m1 - m2) / v2 - 1.0);
        let got = first(&normal_kl(&scalar(m1), &scalar(v1.ln()), &scalar(m2), &scalar(v2.ln())).unwrap());
        eprintln!("normal_kl({m1}, {v1} || {m2}, {v2}) = {got} (closed form {want})");
        assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{got} vs {want}");
    }
}

#[test]
fn discretized_log_likelihood_closed_form() {
    let d = 1.0 / 255.0;
    for (x, mu, sigma) in [(0.0f64, 0.0f64, 0.01f64), (0.0, 0.0, 0.5), (0.2, 0.21, 0.02), (1.0, 0.98, 0.05), (-1.0, -0.97, 0.03)] {
        // inner bin: log(Phi((x + d - mu)/s) - Phi((x - d - mu)/s)); edges extend to +-infinity
        let want = if x > 0.999 {
            (1.0 - phi((x - d - mu) / sigma)).ln()
        } else if x < -0.999 {
            phi((x + d - mu) / sigma).ln()
        } else {
            (phi((x + d - mu) / sigma) - phi((x - d - mu) / sigma)).ln()
        };
        let got = first(&discretized_gaussian_log_likelihood(&scalar(x), &scalar(mu), &scalar(sigma.ln())).unwrap());
        eprintln!("log p({x} | mu {mu}, sigma {sigma}) = {got} (closed form {want})");
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{got} vs {want}");
    }
    // the middle bin: log erf(1 / (255 sigma sqrt 2))
    let s: f64 = 0.01;
    let want = common::erf(1.0 / (255.0 * s * std::f64::consts::SQRT_2)).ln();
    let got = first(&discretized_gaussian_log_likelihood(&scalar(0.0), &scalar(0.0), &scalar(s.ln())).unwrap());
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
}

/// Toy data in [-1, 1] on the 8-bit grid.
fn toy_x0() -> Tensor {
    let v: Vec<f32> = (0..2 * 3 * 4 * 4).map(|i| ((i * 37 % 256) as f32) / 127.5 - 1.0).collect();
    Tensor::from_vec(v, (2, 3, 4, 4), &Device::Cpu).unwrap()
}

fn true_noise_bpd(t_train: usize, variance_type: VarianceType) -> (f64, f64) {
    let config = SchedulerConfig { num_train_timesteps: t_train, variance_type, ..Default::default() };
    let schedule = NoiseSchedule::new(&config, &Device::Cpu).unwrap();
    let x0 = toy_x0();
    // the predictor that knows x_0: eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)
    let s2 = schedule.clone();
    let x0c = x0.clone();
    let predictor = move |x_t: &Tensor, t: &Tensor| -> candle_core::Result<Tensor> {
        let ts = s2.timesteps_to_vec(t).map_err(candle_core::Error::wrap)?;
        s2.predict_eps_from_x0(&x0c, x_t, &ts).map_err(candle_core::Error::wrap)
    };
    let mut rng = NoiseRng::new(7);
    let mut calls = 0;
    let out = nll_bits_per_dim(&predictor, &schedule, &x0, &mut rng, |done, total| {
        calls += 1;
        assert!(done <= total);
    })
    .unwrap();
    assert_eq!(calls, t_train);
    assert_eq!(out.terms_bpd.dims(), &[2, t_train]);
    let total = common::to_f64(&out.total_bpd);
    let prior = common::to_f64(&out.prior_bpd);
    assert!(total.iter().all(|v| v.is_finite() && *v > 0.0), "{total:?}");
    let mean = total.iter().sum::<f64>() / total.len() as f64;
    (mean, prior.iter().sum::<f64>() / prior.len() as f64)
}

#[test]
fn true_noise_gives_a_finite_bound_that_decreases_with_t() {
    for vt in [VarianceType::FixedSmall, VarianceType::FixedLarge] {
        let (b50, p50) = true_noise_bpd(50, vt);
        let (b1000, p1000) = true_noise_bpd(1000, vt);
        eprintln!("[vlb {vt}] true-noise bound: T=50 {b50:.4} bits/dim (prior {p50:.4}), T=1000 {b1000:.4} bits/dim (prior {p1000:.2e})");
        assert!(b1000 < b50, "{vt}: {b1000} >= {b50}");
        assert!(p1000 < p50);
    }
}

#[test]
fn true_noise_kl_terms_vanish_for_fixed_small() {
    // with the posterior variance and the exact x_0 every KL term is ~0; the decoder term is not
    let config = SchedulerConfig { num_train_timesteps: 100, ..Default::default() };
    let schedule = NoiseSchedule::new(&config, &Device::Cpu).unwrap();
    let x0 = toy_x0();
    let mut rng = NoiseRng::new(3);
    let noise = rng.randn((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let s2 = schedule.clone();
    let x0c = x0.clone();
    let predictor = move |x_t: &Tensor, t: &Tensor| -> candle_core::Result<Tensor> {
        let ts = s2.timesteps_to_vec(t).map_err(candle_core::Error::wrap)?;
        s2.predict_eps_from_x0(&x0c, x_t, &ts).map_err(candle_core::Error::wrap)
    };
    let t = Tensor::new(&[50i64, 0], &Device::Cpu).unwrap();
    let terms = common::to_f64(&ddpm_core::vlb_terms(&predictor, &schedule, &x0, &t, &noise).unwrap());
    assert!(terms[0].abs() < 1e-3, "KL at t=50: {}", terms[0]);
    assert!(terms[1] > 0.1 && terms[1].is_finite(), "decoder: {}", terms[1]);
}
