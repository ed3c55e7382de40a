//! Number-for-number parity with diffusers 0.42 (fixtures made by `make_fixtures.py`).
//! Tolerance: |err| <= 1e-5 * max(1, |ref|) element by element.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use common::{to_f64, ErrStats, Fixtures};
use ddpm_core::{
    BetaSchedule, DdimScheduler, DdpmScheduler, NoiseSchedule, PredictionType, SchedulerConfig, StepPrecision, TimestepSpacing,
    VarianceType,
};

fn parse<T: std::str::FromStr>(v: &serde_json::Value, key: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    v[key].as_str().unwrap_or_else(|| panic!("case field {key}")).parse().unwrap()
}

#[test]
fn schedule_arrays_match_diffusers() {
    let fx = Fixtures::load();
    let mut betas = ErrStats::default();
    let mut abar = ErrStats::default();
    let mut abar32 = ErrStats::default();
    let mut n = 0;
    for bs in [BetaSchedule::Linear, BetaSchedule::ScaledLinear, BetaSchedule::SquaredcosCapV2, BetaSchedule::Sigmoid] {
        for t in [1000usize, 50] {
            let config = SchedulerConfig { num_train_timesteps: t, beta_schedule: bs, ..Default::default() };
            let s = NoiseSchedule::new(&config, &Device::Cpu).unwrap();
            let key = format!("{bs}.T{t}");
            betas.compare(&key, s.betas(), &to_f64(fx.get(&format!("{key}.betas"))));
            abar.compare(&key, s.alphas_cumprod(), &to_f64(fx.get(&format!("{key}.alphas_cumprod"))));
        abar32.compare(&key, s.alphas_cumprod_diffusers_f32(), &to_f64(fx.get(&format!("{key}.alphas_cumprod"))));
            n += 1;
        }
    }
    assert_eq!(n, 8);
    betas.report("schedule betas");
    abar.report("schedule alphas_cumprod");
    abar32.report("schedule alphas_cumprod, diffusers f32 emulation");
    betas.assert_within("schedule betas");
    abar32.assert_within("schedule alphas_cumprod f32");
    abar.assert_within("schedule alphas_cumprod");
}

/// Runs every `ddpm.*` step case with injected fixture noise; returns (prev_sample, pred_original_sample)
/// stats, overall and by timestep.
/// The pred_original_sample stats leave out epsilon prediction at t = 999, which go to the fourth
/// value: there x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) multiplies a one-ulp f32 difference of
/// the numerator by 1 / sqrt(abar_999) = 158, so diffusers' own rounding is ~2e-5 relative and up to
/// ~1e-4 absolute where x_0 reaches ~1e3 (fixtures README); clipping keeps the in-range values.
fn run_ddpm_cases(precision: StepPrecision) -> (ErrStats, ErrStats, BTreeMap<usize, ErrStats>, ErrStats) {
    let fx = Fixtures::load();
    let mut prev = ErrStats::default();
    let mut x0 = ErrStats::default();
    let mut x0_noclip_999 = ErrStats::default();
    let mut by_t: BTreeMap<usize, ErrStats> = BTreeMap::new();
    let mut cases = 0;
    let mut steps = 0;
    for (key, case) in &fx.cases {
        let config = SchedulerConfig {
            num_train_timesteps: case["num_train_timesteps"].as_u64().unwrap() as usize,
            beta_schedule: parse::<BetaSchedule>(case, "beta_schedule"),
            variance_type: parse::<VarianceType>(case, "variance_type"),
            prediction_type: parse::<PredictionType>(case, "prediction_type"),
            clip_sample: case["clip_sample"].as_bool().unwrap(),
            ..Default::default()
        };
        let sched = DdpmScheduler::new(&config, &Device::Cpu).unwrap().with_precision(precision);
        for t in [999usize, 500, 1, 0] {
            let k = format!("{key}.t{t}");
            let out = sched
                .step(fx.get(&format!("{k}.model_output")), t, fx.get(&format!("{k}.sample")), Some(fx.get(&format!("{k}.noise"))))
                .unwrap();
            let name = format!(
                "{k} ({}, {}, {}, clip {})",
                config.beta_schedule, config.variance_type, config.prediction_type, config.clip_sample
            );
            prev.compare_tensors(&name, &out.prev_sample, fx.get(&format!("{k}.prev_sample")));
            by_t.entry(t).or_default().compare_tensors(&name, &out.prev_sample, fx.get(&format!("{k}.prev_sample")));
            let x0_stats = if t == 999 && config.prediction_type == PredictionType::Epsilon { &mut x0_noclip_999 } else { &mut x0 };
            x0_stats.compare_tensors(&name, &out.pred_original_sample, fx.get(&format!("{k}.pred_original_sample")));
            steps += 1;
        }
        cases += 1;
    }
    assert_eq!(cases, 48, "every ddpm.* case");
    assert_eq!(steps, 192);
    (prev, x0, by_t, x0_noclip_999)
}

#[test]
fn ddpm_steps_match_diffusers() {
    // Coefficients computed as diffusers does (f32): every case within 1e-5 * max(1, |ref|).
    let (prev, x0, by_t, x0_999) = run_ddpm_cases(StepPrecision::DiffusersF32);
    prev.report("ddpm step prev_sample, DiffusersF32 (all 192)");
    x0.report("ddpm step pred_original_sample, DiffusersF32 (176 of 192)");
    x0_999.report("ddpm step pred_original_sample, DiffusersF32, t=999 epsilon (16 of 192)");
    assert!(x0_999.max_abs < 2e-4, "t=999 epsilon x0: {:e}", x0_999.max_abs);
    assert!(x0_999.max_scaled < 5e-5, "t=999 epsilon x0: {:e}", x0_999.max_scaled);
    for (t, s) in &by_t {
        s.report(&format!("ddpm step prev_sample, DiffusersF32, t={t}"));
    }
    prev.assert_within("ddpm prev_sample (DiffusersF32)");
    x0.assert_within("ddpm pred_original_sample (DiffusersF32)");
}

#[test]
fn ddpm_steps_f64_match_diffusers_up_to_its_f32_rounding() {
    // Coefficients in f64 (the default): equal to diffusers within 1e-5 except where diffusers' own
    // f32 arithmetic loses precision: at t = 1, beta_t = 1 - alpha_bar_1 / alpha_bar_0 cancels
    // (~1e-3 relative in f32), and at t = 999 with clip_sample off x_0 reaches ~1e3.
    let (prev, x0, by_t, x0_999) = run_ddpm_cases(StepPrecision::F64);
    prev.report("ddpm step prev_sample, F64 (all 192)");
    x0.report("ddpm step pred_original_sample, F64 (176 of 192)");
    x0_999.report("ddpm step pred_original_sample, F64, t=999 epsilon (16 of 192)");
    assert!(x0_999.max_abs < 2e-4, "t=999 epsilon x0: {:e}", x0_999.max_abs);
    assert!(x0_999.max_scaled < 5e-5, "t=999 epsilon x0: {:e}", x0_999.max_scaled);
    for (t, s) in &by_t {
        s.report(&format!("ddpm step prev_sample, F64, t={t}"));
    }
    x0.assert_within("ddpm pred_original_sample (F64)");
    by_t[&0].assert_within("ddpm prev_sample (F64) t=0");
    by_t[&500].assert_within("ddpm prev_sample (F64) t=500");
    by_t[&999].assert_within("ddpm prev_sample (F64) t=999");
    // t = 1: bounded by diffusers' own rounding
    assert!(by_t[&1].max_scaled < 1e-3, "t=1: {:e}", by_t[&1].max_scaled);
}

#[test]
fn fixed_large_log_is_exp_half_log_beta_not_nan() {
    // The step with fixed_large_log adds exp(0.5 log beta_t) z: equal to fixed_large, never NaN.
    let dev = Device::Cpu;
    let mk = |v| DdpmScheduler::new(&SchedulerConfig { variance_type: v, ..Default::default() }, &dev).unwrap();
    let (a, b) = (mk(VarianceType::FixedLargeLog), mk(VarianceType::FixedLarge));
    for t in [999, 500, 1] {
        let (sa, sb) = (a.noise_std(t).unwrap(), b.noise_std(t).unwrap());
        assert!(sa.is_finite() && (sa - sb).abs() < 1e-12, "t={t}: {sa} vs {sb}");
        assert!((sa - a.schedule().betas()[t].sqrt()).abs() < 1e-12);
    }
    let learned = SchedulerConfig { variance_type: VarianceType::Learned, ..Default::default() };
    let s = DdpmScheduler::new(&learned, &dev).unwrap();
    let x = candle_core::Tensor::zeros((1, 1, 2, 2), DType::F32, &dev).unwrap();
    assert!(matches!(s.step(&x, 5, &x, Some(&x)), Err(ddpm_core::Error::Unsupported(_))));
}

#[test]
fn set_timesteps_match_diffusers() {
    let fx = Fixtures::load();
    for spacing in [TimestepSpacing::Leading, TimestepSpacing::Trailing, TimestepSpacing::Linspace] {
        let config = SchedulerConfig { timestep_spacing: spacing, ..Default::default() };
        let mut ddpm = DdpmScheduler::new(&config, &Device::Cpu).unwrap();
        ddpm.set_timesteps(50).unwrap();
        let want: Vec<i64> = fx.get(&format!("ddpm.set_timesteps50.{spacing}")).to_vec1().unwrap();
        let got: Vec<i64> = ddpm.timesteps().iter().map(|&t| t as i64).collect();
        assert_eq!(got, want, "ddpm {spacing}");
        let mut ddim = DdimScheduler::new(&config, &Device::Cpu).unwrap();
        ddim.set_timesteps(20).unwrap();
        let want: Vec<i64> = fx.get(&format!("ddim.set_timesteps20.{spacing}")).to_vec1().unwrap();
        let got: Vec<i64> = ddim.timesteps().iter().map(|&t| t as i64).collect();
        assert_eq!(got, want, "ddim {spacing}");
        eprintln!("[set_timesteps {spacing}] ddpm 50 and ddim 20 steps: exact match");
    }
}

#[test]
fn strided_ddpm_steps_to_next_listed_timestep() {
    // diffusers PR #2076: with fewer inference steps, the step from t goes to the next entry of the list.
    let mut s = DdpmScheduler::new(&SchedulerConfig::default(), &Device::Cpu).unwrap();
    assert_eq!(s.previous_timestep(500).unwrap(), Some(499));
    s.set_timesteps(50).unwrap();
    assert_eq!(s.timesteps()[0], 980);
    assert_eq!(s.previous_timestep(980).unwrap(), Some(960));
    assert_eq!(s.previous_timestep(0).unwrap(), None);
    assert!(s.previous_timestep(981).is_err());
    // the strided variance uses alpha_bar of the listed previous timestep
    let ab = s.schedule().alphas_cumprod();
    let beta = 1.0 - ab[980] / ab[960];
    let var = (1.0 - ab[960]) / (1.0 - ab[980]) * beta;
    assert!((s.noise_std(980).unwrap() - var.sqrt()).abs() < 1e-12);
}

#[test]
fn ddim_steps_match_diffusers() {
    let fx = Fixtures::load();
    let mut stats = ErrStats::default();
    let mut n = 0;
    for eta in [0.0f64, 1.0] {
        let config = SchedulerConfig { clip_sample: true, ..Default::default() };
        let mut d = DdimScheduler::new(&config, &Device::Cpu).unwrap().with_eta(eta).unwrap();
        d.set_timesteps(20).unwrap();
        let prefix = format!("ddim.eta{eta:.1}.t");
        let mut ts: Vec<usize> = fx
            .keys_with_prefix(&prefix)
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix)?.strip_suffix(".prev_sample")?.parse().ok())
            .collect();
        ts.sort();
        assert_eq!(ts, vec![0, 450, 950]);
        let mut case_stats = ErrStats::default();
        for t in ts {
            let k = format!("{prefix}{t}");
            let out = d
                .step(fx.get(&format!("{k}.model_output")), t, fx.get(&format!("{k}.sample")), Some(fx.get(&format!("{k}.noise"))))
                .unwrap();
            stats.compare_tensors(&k, &out.prev_sample, fx.get(&format!("{k}.prev_sample")));
            case_stats.compare_tensors(&k, &out.prev_sample, fx.get(&format!("{k}.prev_sample")));
            n += 1;
        }
        case_stats.report(&format!("ddim eta {eta} prev_sample"));
    }
    assert_eq!(n, 6);
    stats.report("ddim prev_sample (all 6)");
    stats.assert_within("ddim prev_sample");
}

#[test]
fn add_noise_matches_diffusers() {
    let fx = Fixtures::load();
    let s = NoiseSchedule::new(&SchedulerConfig::default(), &Device::Cpu).unwrap();
    let t = fx.get("add_noise.t");
    assert_eq!(t.dtype(), DType::I64);
    let xt = s.q_sample(fx.get("add_noise.x0"), t, fx.get("add_noise.noise")).unwrap();
    let mut stats = ErrStats::default();
    stats.compare_tensors("add_noise", &xt, fx.get("add_noise.xt"));
    // u32 timesteps give the same
    let xt32 = s.q_sample(fx.get("add_noise.x0"), &t.to_dtype(DType::U32).unwrap(), fx.get("add_noise.noise")).unwrap();
    stats.compare_tensors("add_noise u32", &xt32, fx.get("add_noise.xt"));
    stats.report("add_noise (q_sample)");
    stats.assert_within("add_noise");
    // out-of-range timesteps are errors, not panics
    let bad = candle_core::Tensor::new(&[0i64, 1000], &Device::Cpu).unwrap();
    assert!(s.q_sample(fx.get("add_noise.x0"), &bad, fx.get("add_noise.noise")).is_err());
    let neg = candle_core::Tensor::new(&[-1i64, 3], &Device::Cpu).unwrap();
    assert!(s.q_sample(fx.get("add_noise.x0"), &neg, fx.get("add_noise.noise")).is_err());
}
