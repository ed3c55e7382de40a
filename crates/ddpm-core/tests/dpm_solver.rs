//! DPMSolverMultistepScheduler built from diffusers' saved `scheduler_config.json` matches diffusers
//! 0.42: timesteps, sigmas, the order of every update and whole sampling loops (fixtures in
//! tests/fixtures/diffusers/scheduler-configs/dpm-*, reference numbers in dpm-solver.safetensors,
//! made by `make_fixtures.py --scheduler-configs-only`). Also: the config's refusals, and the
//! solver's run state (order of steps, reset, restart, clones).

mod common;

use candle_core::{Device, Tensor};
use common::{to_f64, ErrStats, Fixtures, SCHEDULER_CONFIGS, TOL};
use ddpm_core::{
    dpm_solver_timesteps, sample, DpmAlgorithmType, DpmSolverMultistepScheduler, DpmSolverType, Error, FinalSigmasType, NoiseRng,
    Sampler, SchedulerClass, SchedulerConfig, StepPrecision, TimestepSpacing,
};

/// Tolerance of single values computed with diffusers' float32 chain (sigmas, one run of the
/// generic loop): |err| <= TOL_F32 * max(1, |ref|).
const TOL_F32: f64 = 1e-6;
/// Tolerance of the sampling loops against diffusers, element by element, |err| <= tol * max(1, |ref|):
///
/// - [`StepPrecision::DiffusersF32`]: the issue's 1e-5. Most cases stay below 1e-6; the worst are
///   the sde-dpmsolver loop (~6e-6), whose update subtracts terms ten times the sample
///   (2 sigma_t (e^h - 1) D0 ~ 13 for a sample ~ 6), so that one-ulp differences between torch's
///   float32 log/exp and correctly rounded ones come out tenfold, and a third-order last step
///   (~2e-6).
/// - [`StepPrecision::F64`]: 2e-5, as the DDIM loops in scheduler_configs.rs: the last step to
///   sigma_min differs by ~1.5e-5 because diffusers' alpha_bar_0 is the float32 0.99989998, so its
///   1 - alpha_bar_0, hence sigma_min, is off by 1.7e-4 (8e-5) relative from the f64 value.
fn loop_tol(precision: StepPrecision) -> f64 {
    match precision {
        StepPrecision::DiffusersF32 => TOL,
        StepPrecision::F64 => 2.0 * TOL,
    }
}

/// One case: its config as diffusers saved it and the solver built from that file.
struct Case {
    name: String,
    config: SchedulerConfig,
    solver: DpmSolverMultistepScheduler,
    meta: serde_json::Value,
}

fn fixtures() -> Fixtures {
    Fixtures::load_file(&format!("{SCHEDULER_CONFIGS}/dpm-solver.safetensors"))
}

fn cases(fx: &Fixtures, precision: StepPrecision) -> Vec<Case> {
    let mut out = Vec::new();
    for (name, meta) in &fx.cases {
        let path = format!("{SCHEDULER_CONFIGS}/{name}/scheduler_config.json");
        let (config, unknown) = SchedulerConfig::from_file_checked(&path).unwrap();
        assert!(unknown.is_empty(), "{name}: {unknown}");
        assert_eq!(config.class_name, SchedulerClass::DpmSolverMultistep, "{name}");
        assert_eq!(meta["class_name"], "DPMSolverMultistepScheduler");
        let mut sampler = Sampler::from_config(&config, &Device::Cpu).unwrap().with_precision(precision);
        sampler.set_timesteps(meta["num_inference_steps"].as_u64().unwrap() as usize).unwrap();
        let Sampler::DpmSolver(solver) = sampler else { panic!("{name}: built {sampler:?}") };
        out.push(Case { name: name.clone(), config, solver, meta: meta.clone() });
    }
    // the cases cover every order, algorithm, solver type and final sigma
    assert_eq!(out.len(), 16);
    let has = |f: &dyn Fn(&SchedulerConfig) -> bool| out.iter().any(|c| f(&c.config));
    for order in 1..=3 {
        assert!(has(&|c| c.dpm_solver.solver_order == order), "order {order}");
    }
    for alg in [DpmAlgorithmType::DpmSolver, DpmAlgorithmType::DpmSolverPlusPlus, DpmAlgorithmType::SdeDpmSolver, DpmAlgorithmType::SdeDpmSolverPlusPlus] {
        assert!(has(&|c| c.dpm_solver.algorithm_type == alg), "{alg}");
    }
    assert!(has(&|c| c.dpm_solver.solver_type == DpmSolverType::Heun));
    assert!(has(&|c| c.dpm_solver.final_sigmas_type == FinalSigmasType::SigmaMin));
    for spacing in [TimestepSpacing::Linspace, TimestepSpacing::Leading, TimestepSpacing::Trailing] {
        assert!(has(&|c| c.timestep_spacing == spacing), "{spacing}");
    }
    out
}

#[test]
fn timesteps_and_sigmas_match_diffusers() {
    let fx = fixtures();
    for precision in [StepPrecision::DiffusersF32, StepPrecision::F64] {
        let mut sigmas = ErrStats::default();
        for c in cases(&fx, precision) {
            let want: Vec<usize> = to_f64(fx.get(&format!("{}.timesteps", c.name))).iter().map(|&t| t as usize).collect();
            assert_eq!(c.solver.timesteps(), &want[..], "{}", c.name);
            sigmas.compare(&c.name, &c.solver.sigmas(), &to_f64(fx.get(&format!("{}.sigmas", c.name))));
        }
        sigmas.report(&format!("DPM-Solver sigmas, {precision:?}"));
        let tol = match precision {
            StepPrecision::DiffusersF32 => TOL_F32,
            StepPrecision::F64 => TOL,
        };
        assert!(sigmas.max_scaled <= tol, "{precision:?}: {:.3e} at {}", sigmas.max_scaled, sigmas.worst_case);
    }
    // lambda_min_clipped = -5.1 removes the noisiest timesteps of the cosine schedule
    let fx_cases = cases(&fx, StepPrecision::F64);
    let clipped = fx_cases.iter().find(|c| c.config.dpm_solver.lambda_min_clipped > f64::NEG_INFINITY).unwrap();
    assert!(clipped.solver.last_timestep() < 1000 && clipped.solver.timesteps()[0] < 999, "{}", clipped.name);
}

/// diffusers' pipeline loop with the model out(x, t) = A x + B t / T, from the fixture's x_T (and,
/// for the SDE algorithms, its noise); returns the sample after each step and the order of each
/// update.
fn run_loop(fx: &Fixtures, c: &Case) -> (Vec<Tensor>, Vec<usize>) {
    let (a, b) = (c.meta["A"].as_f64().unwrap(), c.meta["B"].as_f64().unwrap());
    let big_t = c.config.num_train_timesteps as f64;
    let noise = fx.tensors.get(&format!("{}.loop.noise", c.name));
    let mut x = fx.get(&format!("{}.loop.x_T", c.name)).clone();
    let (mut trajectory, mut orders) = (Vec::new(), Vec::new());
    for (i, &t) in c.solver.timesteps().iter().enumerate() {
        // out = A x + B t / T
        let model_output = x.affine(a, b * t as f64 / big_t).unwrap();
        let z = noise.map(|n| n.get(i).unwrap());
        x = c.solver.step(&model_output, t, &x, z.as_ref()).unwrap().prev_sample;
        trajectory.push(x.clone());
        orders.push(c.solver.last_order().unwrap());
    }
    (trajectory, orders)
}

#[test]
fn sampling_loops_match_diffusers() {
    let fx = fixtures();
    for precision in [StepPrecision::DiffusersF32, StepPrecision::F64] {
        let mut all = ErrStats::default();
        for c in cases(&fx, precision) {
            let (trajectory, orders) = run_loop(&fx, &c);
            let want_orders: Vec<usize> = to_f64(fx.get(&format!("{}.loop.order", c.name))).iter().map(|&o| o as usize).collect();
            assert_eq!(orders, want_orders, "{}: the order of each update", c.name);
            let want = fx.get(&format!("{}.loop.trajectory", c.name));
            let mut case = ErrStats::default();
            for (i, x) in trajectory.iter().enumerate() {
                let name = format!("{} step {i} (t = {}, order {})", c.name, c.solver.timesteps()[i], orders[i]);
                case.compare_tensors(&name, x, &want.get(i).unwrap());
                all.compare_tensors(&name, x, &want.get(i).unwrap());
            }
            case.compare_tensors(&format!("{} x0", c.name), trajectory.last().unwrap(), fx.get(&format!("{}.loop.x0", c.name)));
            case.report(&format!("loop {}, {precision:?}", c.name));
        }
        all.report(&format!("DPM-Solver sampling loops, {precision:?}"));
        let tol = loop_tol(precision);
        assert!(all.max_scaled <= tol, "{precision:?}: worst error {:.3e} > {tol:e} at {}", all.max_scaled, all.worst_case);
    }
}

/// The generic loop ([`sample`]) drives the solver as the fixture loop does, and a second call on
/// the same scheduler starts a new run (it is reset) and gives the same result.
#[test]
fn the_generic_sampling_loop_runs_the_solver_and_restarts() {
    let fx = fixtures();
    let c = cases(&fx, StepPrecision::DiffusersF32).into_iter().find(|c| c.name == "dpm-pp3-trailing-scaled-10").unwrap();
    let (a, b) = (c.meta["A"].as_f64().unwrap(), c.meta["B"].as_f64().unwrap());
    // out = A x + B t / T, t one per sample
    let model = |x: &Tensor, t: &Tensor| {
        let t = t.to_dtype(candle_core::DType::F32)?.reshape((x.dim(0)?, 1, 1, 1))?;
        x.affine(a, 0.0)?.broadcast_add(&(t * (b / 1000.0))?)
    };
    let sampler = Sampler::DpmSolver(c.solver.clone());
    let x_t = fx.get(&format!("{}.loop.x_T", c.name)).clone();
    let want = fx.get(&format!("{}.loop.x0", c.name));
    for run in 0..2 {
        let got = sample(&model, &sampler, x_t.clone(), &mut NoiseRng::new(0), |_, _, _| {}).unwrap();
        let mut err = ErrStats::default();
        err.compare_tensors(&format!("run {run}"), &got, want);
        assert!(err.max_scaled <= TOL_F32, "run {run}: {:.3e}", err.max_scaled);
    }
}

#[test]
fn steps_out_of_order_are_errors_and_reset_or_a_finished_run_starts_anew() {
    let fx = fixtures();
    let c = cases(&fx, StepPrecision::F64).into_iter().find(|c| c.name == "dpm-pp2-midpoint-10").unwrap();
    let ts = c.solver.timesteps().to_vec();
    let x = fx.get(&format!("{}.loop.x_T", c.name)).clone();
    let out = (&x * 0.5).unwrap();
    let s = &c.solver;
    assert_eq!(s.step_index(), None);
    s.step(&out, ts[0], &x, None).unwrap();
    assert_eq!((s.step_index(), s.last_order()), (Some(1), Some(1)));
    // skipping a timestep, or repeating one, is refused with a one-line error
    for t in [ts[2], ts[0]] {
        let e = s.step(&out, t, &x, None).unwrap_err().to_string();
        assert!(e.contains("out of order") && e.contains(&ts[1].to_string()) && !e.contains('\n'), "{e}");
    }
    // a clone carries the history: its next step is second order, as the original's
    let clone = s.clone();
    s.step(&out, ts[1], &x, None).unwrap();
    clone.step(&out, ts[1], &x, None).unwrap();
    assert_eq!((s.last_order(), clone.last_order()), (Some(2), Some(2)));
    // reset: a new run, first order again
    s.reset();
    s.step(&out, ts[0], &x, None).unwrap();
    assert_eq!((s.step_index(), s.last_order()), (Some(1), Some(1)));
    // a run may start at any timestep (a partly noised input), first order
    s.reset();
    s.step(&out, ts[4], &x, None).unwrap();
    assert_eq!((s.step_index(), s.last_order()), (Some(5), Some(1)));
    // a timestep the solver does not visit cannot start a run
    s.reset();
    let e = s.step(&out, ts[0] - 1, &x, None).unwrap_err().to_string();
    assert!(e.contains(&format!("timestep {}", ts[0] - 1)), "{e}");
    // after the last step, the next step from the first timestep starts a new run
    for &t in &ts {
        s.step(&out, t, &x, None).unwrap();
    }
    assert_eq!(s.step_index(), Some(ts.len()));
    s.step(&out, ts[0], &x, None).unwrap();
    assert_eq!((s.step_index(), s.last_order()), (Some(1), Some(1)));
}

#[test]
fn sde_steps_need_noise() {
    let c = SchedulerConfig::from_json_str(r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}"#).unwrap();
    let mut s = DpmSolverMultistepScheduler::new(&c, &Device::Cpu).unwrap();
    s.set_timesteps(10).unwrap();
    let x = Tensor::ones((1, 1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = s.step(&x, s.timesteps()[0], &x, None).unwrap_err().to_string();
    assert!(e.contains("sde-dpmsolver++") && e.contains("noise"), "{e}");
    // the generator supplies it
    s.step_with_rng(&x, s.timesteps()[0], &x, &mut NoiseRng::new(1)).unwrap();
}

#[test]
fn saved_configs_are_what_diffusers_saves() {
    let fx = fixtures();
    for c in cases(&fx, StepPrecision::F64) {
        let path = format!("{SCHEDULER_CONFIGS}/{}/scheduler_config.json", c.name);
        let theirs = std::fs::read_to_string(&path).unwrap();
        // the same text, -Infinity included, so that diffusers reads back what this crate writes
        assert_eq!(c.config.to_json_string().unwrap().trim_end(), theirs.trim_end(), "{}", c.name);
        assert_eq!(SchedulerConfig::from_json_str(&c.config.to_json_string().unwrap()).unwrap(), c.config, "{}", c.name);
    }
    // serde round trip as part of another document (the non-finite value as a string there)
    let c = SchedulerConfig::for_class(SchedulerClass::DpmSolverMultistep);
    let back: SchedulerConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    assert_eq!(back.dpm_solver.lambda_min_clipped, f64::NEG_INFINITY);
}

#[test]
fn omitted_fields_take_diffusers_defaults_and_legacy_names_map() {
    let c = SchedulerConfig::from_json_str(r#"{"_class_name": "DPMSolverMultistepScheduler"}"#).unwrap();
    assert_eq!(c, SchedulerConfig::for_class(SchedulerClass::DpmSolverMultistep));
    assert_eq!(c.timestep_spacing, TimestepSpacing::Linspace);
    let o = &c.dpm_solver;
    assert_eq!((o.solver_order, o.algorithm_type, o.solver_type), (2, DpmAlgorithmType::DpmSolverPlusPlus, DpmSolverType::Midpoint));
    assert!(o.lower_order_final && !o.euler_at_final && o.final_sigmas_type == FinalSigmasType::Zero);
    assert_eq!(o.lambda_min_clipped, f64::NEG_INFINITY);
    // diffusers registers `deis` as dpmsolver++ and `logrho` as midpoint
    let legacy = SchedulerConfig::from_json_str(
        r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "deis", "solver_type": "logrho", "lambda_min_clipped": -5.1}"#,
    )
    .unwrap();
    assert_eq!((legacy.dpm_solver.algorithm_type, legacy.dpm_solver.solver_type), (DpmAlgorithmType::DpmSolverPlusPlus, DpmSolverType::Midpoint));
    assert_eq!(legacy.dpm_solver.lambda_min_clipped, -5.1);
    // the solver's fields are not checked for the other classes, which ignore them (as diffusers)
    SchedulerConfig::from_json_str(r#"{"_class_name": "DDIMScheduler", "solver_order": 7, "use_karras_sigmas": true}"#).unwrap();
}

#[test]
fn unsupported_values_are_one_line_errors_naming_the_field() {
    let dpm = |fields: &str| format!(r#"{{"_class_name": "DPMSolverMultistepScheduler", {fields}}}"#);
    for (fields, field) in [
        (r#""solver_order": 4"#, "solver_order"),
        (r#""solver_order": 0"#, "solver_order"),
        (r#""algorithm_type": "dpmsolver3""#, "algorithm_type"),
        (r#""solver_type": "rk4""#, "solver_type"),
        (r#""final_sigmas_type": "max""#, "final_sigmas_type"),
        // diffusers refuses a zero final sigma for the noise-prediction algorithms
        (r#""algorithm_type": "dpmsolver""#, "final_sigmas_type"),
        (r#""algorithm_type": "sde-dpmsolver""#, "final_sigmas_type"),
        // diffusers has no third-order sde-dpmsolver update
        (r#""algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3"#, "solver_order"),
        (r#""use_karras_sigmas": true"#, "use_karras_sigmas"),
        (r#""use_exponential_sigmas": true"#, "use_exponential_sigmas"),
        (r#""use_beta_sigmas": true"#, "use_beta_sigmas"),
        (r#""use_lu_lambdas": true"#, "use_lu_lambdas"),
        (r#""use_flow_sigmas": true"#, "use_flow_sigmas"),
        (r#""use_dynamic_shifting": true"#, "use_dynamic_shifting"),
        (r#""variance_type": "learned_range""#, "variance_type"),
        (r#""beta_schedule": "sigmoid""#, "beta_schedule"),
        (r#""prediction_type": "flow_prediction""#, "prediction_type"),
        (r#""lambda_min_clipped": "low""#, "lambda_min_clipped"),
        (r#""lambda_min_clipped": NaN"#, "lambda_min_clipped"),
        (r#""time_shift_type": "linear""#, "time_shift_type"),
        (r#""euler_at_final": "yes""#, "euler_at_final"),
        (r#""flow_shift": 0"#, "flow_shift"),
    ] {
        let json = dpm(fields);
        match SchedulerConfig::from_json_str(&json) {
            Err(e @ Error::InvalidConfig { .. }) => {
                let msg = e.to_string();
                let Error::InvalidConfig { field: f, .. } = e else { unreachable!() };
                assert_eq!(f, field, "{json}: {msg}");
                assert!(msg.contains(field) && !msg.contains('\n'), "{msg}");
                eprintln!("{fields} -> {msg}");
            }
            other => panic!("{json}: expected InvalidConfig, got {other:?}"),
        }
    }
    // from a file, the error names the file too
    let dir = std::env::temp_dir().join(format!("ddpm-core-dpm-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scheduler_config.json");
    std::fs::write(&path, dpm(r#""lambda_min_clipped": -Infinity, "use_karras_sigmas": true"#)).unwrap();
    let e = SchedulerConfig::from_file(&path).unwrap_err().to_string();
    assert!(e.contains("scheduler_config.json") && e.contains("use_karras_sigmas"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn timestep_layouts_by_hand() {
    use TimestepSpacing::*;
    // linspace over n + 1 points, the last dropped: round(i * 999 / 4), i = 4..1
    assert_eq!(dpm_solver_timesteps(Linspace, 1000, 1000, 4, 0).unwrap(), [999, 749, 500, 250]);
    // leading: ratio 1000 // 5 = 200, plus the offset
    assert_eq!(dpm_solver_timesteps(Leading, 1000, 1000, 4, 1).unwrap(), [801, 601, 401, 201]);
    // trailing: round(1000 - 250 i) - 1
    assert_eq!(dpm_solver_timesteps(Trailing, 1000, 1000, 4, 0).unwrap(), [999, 749, 499, 249]);
    // clipped to L = 600: trailing keeps T / n strides from L, so fewer steps
    assert_eq!(dpm_solver_timesteps(Trailing, 1000, 600, 4, 0).unwrap(), [599, 349, 99]);
    // np.arange(1000, 0, -1000/61) runs one value past the end (diffusers' timestep -1): dropped
    let t61 = dpm_solver_timesteps(Trailing, 1000, 1000, 61, 0).unwrap();
    assert_eq!((t61.len(), t61[0], t61[60]), (61, 999, 15));
    // as many steps as timesteps: linspace repeats some, leading has no room
    let all = dpm_solver_timesteps(Linspace, 1000, 1000, 1000, 0).unwrap();
    assert!(all.len() == 1000 && all.windows(2).any(|w| w[0] == w[1]));
    assert!(dpm_solver_timesteps(Leading, 1000, 1000, 1000, 0).is_err());
    assert!(dpm_solver_timesteps(Linspace, 1000, 1000, 0, 0).is_err());
    assert!(dpm_solver_timesteps(Linspace, 1000, 0, 10, 0).is_err());
}
