//! The library's AdamW and EMA against their closed forms and against candle's AdamW; the exact resume
//! of the optimizer state and of a checkpoint; the training loss's training-mode hook.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use ddpm_core::checkpoint::{self, Checkpoint};
use ddpm_core::optim::{ema_decay, AdamW, AdamWParams, AdamWState, Ema};
use ddpm_core::{training_loss, LossWeighting, ModulePredictor, NoiseRng, NoiseSchedule, SchedulerConfig, TimeModule};

/// The test quadratic loss 0.5 sum(c w^2), whose gradient is c w.
const C: [f64; 3] = [1.0, 3.0, 0.5];

fn quadratic_loss(w: &Var) -> Tensor {
    let c = Tensor::new(&C, &Device::Cpu).unwrap().to_dtype(w.dtype()).unwrap();
    ((w.as_tensor().sqr().unwrap() * 0.5).unwrap() * c).unwrap().sum_all().unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Two AdamW steps with weight decay and clipping written out in f64, against the fused (f32) and the
/// composed (f64) step: k = 1, 2 with g_k = s_k c theta_{k-1} (s_k the clipping scale),
///   m_k = b1 m_{k-1} + (1 - b1) g_k,  v_k = b2 v_{k-1} + (1 - b2) g_k^2,
///   theta_k = theta_{k-1} (1 - lr wd) - lr (m_k / (1 - b1^k)) / (sqrt(v_k / (1 - b2^k)) + eps).
#[test]
fn two_steps_match_the_closed_form() {
    let p = AdamWParams { lr: 0.1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.05, max_grad_norm: Some(2.0) };
    let theta0 = [1.0f64, -2.0, 4.0];
    // by hand
    let (mut th, mut m, mut v) = (theta0.to_vec(), vec![0.0; 3], vec![0.0; 3]);
    let mut norms = vec![];
    for k in 1..=2i32 {
        let g: Vec<f64> = th.iter().zip(C).map(|(t, c)| c * t).collect();
        let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        let s = (2.0 / (norm + 1e-6)).min(1.0);
        norms.push(norm);
        for i in 0..3 {
            let gi = s * g[i];
            m[i] = p.beta1 * m[i] + (1.0 - p.beta1) * gi;
            v[i] = p.beta2 * v[i] + (1.0 - p.beta2) * gi * gi;
            let update = (m[i] / (1.0 - p.beta1.powi(k))) / ((v[i] / (1.0 - p.beta2.powi(k))).sqrt() + p.eps);
            th[i] = th[i] * (1.0 - p.lr * p.weight_decay) - p.lr * update;
        }
    }
    for dtype in [DType::F32, DType::F64] {
        let w = Var::from_tensor(&Tensor::new(&theta0, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()).unwrap();
        let mut opt = AdamW::new_named(vec![("w".into(), w.clone())], p).unwrap();
        for norm in &norms {
            let n = opt.step_and_norm(&quadratic_loss(&w).backward().unwrap()).unwrap();
            assert!((n - norm).abs() < 1e-5 * norm, "{dtype:?}: norm {n} vs {norm}");
        }
        let state = opt.state();
        assert_eq!(state.step, 2);
        for (name, got, want) in [("theta", values(w.as_tensor()), &th), ("m", values(&state.tensors["adam.m.w"]), &m), ("v", values(&state.tensors["adam.v.w"]), &v)] {
            let d = got.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
            println!("{dtype:?} {name}: max |diff| {d:.3e}");
            assert!(d < 1e-6, "{dtype:?} {name}: {got:?} vs {want:?}");
        }
    }
}

/// The values of a seeded (shape) tensor.
fn seeded(rng: &mut NoiseRng, shape: (usize, usize)) -> Tensor {
    rng.randn(shape, DType::F32, &Device::Cpu).unwrap()
}

/// Eight steps of `opt` on loss = sum(tanh(a x)) + sum(b^2 sin(b)) (gradients that change from step to
/// step), the learning rate changed to 0.003 before the fifth.
fn run_optimizer<O: Optimizer>(mut opt: O, a: &Var, b: &Var, x: &Tensor) {
    for k in 0..8 {
        if k == 4 {
            opt.set_learning_rate(0.003);
        }
        let loss = (a.as_tensor().matmul(x).unwrap().tanh().unwrap().sum_all().unwrap() + (b.as_tensor().sqr().unwrap() * b.as_tensor().sin().unwrap()).unwrap().sum_all().unwrap()).unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
    }
    assert_eq!(opt.learning_rate(), 0.003);
}

/// Through `candle_nn::Optimizer` (new, step, set_learning_rate), with the same hyper-parameters and
/// no clipping, the library's AdamW follows candle's.
#[test]
fn matches_candle_adamw() {
    let mut rng = NoiseRng::new(3);
    let (init_a, init_b, x) = (seeded(&mut rng, (4, 16)), rng.randn(16, DType::F32, &Device::Cpu).unwrap(), seeded(&mut rng, (16, 4)));
    let params = candle_nn::ParamsAdamW { lr: 0.01, weight_decay: 0.02, ..Default::default() };
    let run = |ours: bool| -> Vec<Vec<f64>> {
        let (a, b) = (Var::from_tensor(&init_a).unwrap(), Var::from_tensor(&init_b).unwrap());
        let vars = vec![a.clone(), b.clone()];
        if ours {
            run_optimizer(<AdamW as Optimizer>::new(vars, params.clone().into()).unwrap(), &a, &b, &x);
        } else {
            run_optimizer(candle_nn::AdamW::new(vars, params.clone()).unwrap(), &a, &b, &x);
        }
        vec![values(a.as_tensor()), values(b.as_tensor())]
    };
    let (ours, candle) = (run(true), run(false));
    let init = [values(&init_a), values(&init_b)];
    for (i, (o, c)) in ours.iter().zip(&candle).enumerate() {
        let d = o.iter().zip(c).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
        println!("parameter {i}: max |ours - candle| {d:.3e}");
        assert!(d < 1e-6, "parameter {i} differs from candle's AdamW by {d}");
        // and the steps moved it
        assert!(o.iter().zip(&init[i]).any(|(a, b)| (a - b).abs() > 1e-2));
    }
}

/// One training step of the test problem: the quadratic loss on `w` scaled by the step number.
fn train_step(opt: &mut AdamW, ema: &mut Ema, w: &Var, k: u64) {
    let loss = (quadratic_loss(w) * (1.0 + k as f64).sqrt()).unwrap();
    opt.set_learning_rate(0.05 / k as f64);
    opt.step_and_norm(&loss.backward().unwrap()).unwrap();
    ema.update(opt.vars(), ema_decay(0.9, k)).unwrap();
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// Six steps straight through against three steps, state() written to and read from a safetensors
/// file, loaded into a fresh optimizer (and EMA) over a fresh variable, and three more steps: the
/// weights, moments, step count and EMA agree bit for bit.
#[test]
fn state_round_trip_continues_bit_exactly() {
    let p = AdamWParams { lr: 0.05, weight_decay: 0.01, max_grad_norm: Some(1.0), ..Default::default() };
    let fresh = || {
        let w = Var::new(&[1.0f32, -2.0, 4.0], &Device::Cpu).unwrap();
        let opt = AdamW::new_named(vec![("w".into(), w.clone())], p).unwrap();
        let ema = Ema::new(opt.vars()).unwrap();
        (w, opt, ema)
    };
    let (w, mut opt, mut ema) = fresh();
    for k in 1..=6 {
        train_step(&mut opt, &mut ema, &w, k);
    }

    let (w1, mut opt1, mut ema1) = fresh();
    for k in 1..=3 {
        train_step(&mut opt1, &mut ema1, &w1, k);
    }
    let dir = tempfile_dir("state_round_trip");
    let file = dir.join("state.safetensors");
    let st = opt1.state();
    let mut all = st.tensors.clone();
    all.insert("w".into(), w1.as_tensor().clone());
    all.extend(ema1.state().into_iter().map(|(k, t)| (format!("ema.{k}"), t)));
    checkpoint::write_safetensors(&file, &all, None).unwrap();
    drop((opt1, ema1, w1));

    let loaded = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let (w2, mut opt2, mut ema2) = fresh();
    w2.set(&loaded["w"]).unwrap();
    opt2.load_state(&AdamWState { step: st.step, tensors: loaded.clone() }, "state.safetensors").unwrap();
    let ema_saved: HashMap<String, Tensor> = loaded.iter().filter_map(|(k, t)| Some((k.strip_prefix("ema.")?.to_string(), t.clone()))).collect();
    ema2.load_state(&ema_saved, "state.safetensors").unwrap();
    for k in 4..=6 {
        train_step(&mut opt2, &mut ema2, &w2, k);
    }
    assert_eq!(opt2.step_count(), 6);
    assert_eq!(bits(w.as_tensor()), bits(w2.as_tensor()), "weights");
    let (a, b) = (opt.state(), opt2.state());
    for key in ["adam.m.w", "adam.v.w"] {
        assert_eq!(bits(&a.tensors[key]), bits(&b.tensors[key]), "{key}");
    }
    assert_eq!(bits(&ema.weights()["w"]), bits(&ema2.weights()["w"]), "EMA");
    // A state that lacks a moment is a one-line error naming the file and the tensor.
    let mut partial = loaded;
    partial.remove("adam.v.w");
    let e = opt2.load_state(&AdamWState { step: 3, tensors: partial }, "state.safetensors").unwrap_err().to_string();
    assert!(e.contains("state.safetensors") && e.contains("`adam.v.w`"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A fresh folder under the system's temporary directory.
fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ddpm-core-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The EMA against its formula: e_0 = theta_0, e_k = d_k e_{k-1} + (1 - d_k) theta_k with the
/// warm-up decay d_k = min(max, (1 + k) / (10 + k)), for weights set by hand, on the fused (f32) and
/// the composed (f64) path.
#[test]
fn ema_follows_its_formula() {
    let thetas = [[1.0f64, -1.0], [3.0, 0.5], [-2.0, 2.0], [0.25, 8.0]];
    for dtype in [DType::F32, DType::F64] {
        let t = |v: &[f64; 2]| Tensor::new(v, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let w = Var::from_tensor(&t(&thetas[0])).unwrap();
        let vars = vec![("w".to_string(), w.clone())];
        let mut ema = Ema::new(&vars).unwrap();
        let mut want = thetas[0];
        for (k, th) in thetas.iter().enumerate().skip(1) {
            w.set(&t(th)).unwrap();
            let d = ema_decay(0.5, k as u64);
            assert_eq!(d, (0.5f64).min((1.0 + k as f64) / (10.0 + k as f64)));
            ema.update(&vars, d).unwrap();
            for i in 0..2 {
                want[i] = d * want[i] + (1.0 - d) * th[i];
            }
        }
        let got = values(&ema.weights()["w"]);
        let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
        println!("{dtype:?} EMA: max |diff| {diff:.3e}");
        assert!(diff < 1e-6, "{dtype:?}: {got:?} vs {want:?}");
        // the average is a copy: the weights did not move with it
        assert_eq!(values(w.as_tensor()), thetas[3].to_vec());
    }
}

/// A checkpoint of a run saved and loaded restores weights, moments, step, EMA and generator exactly,
/// and names the file and field when the metadata is broken.
#[test]
fn checkpoint_round_trip() {
    let p = AdamWParams { lr: 0.05, max_grad_norm: Some(1.0), ..Default::default() };
    let w = Var::new(&[1.0f32, -2.0, 4.0], &Device::Cpu).unwrap();
    let mut opt = AdamW::new_named(vec![("w".into(), w.clone())], p).unwrap();
    let mut ema = Ema::new(opt.vars()).unwrap();
    for k in 1..=2 {
        train_step(&mut opt, &mut ema, &w, k);
    }
    let mut rng = NoiseRng::new(5);
    rng.next_u64();
    let dir = tempfile_dir("checkpoint_round_trip");
    let ck = Checkpoint::of_run(&opt, &ema, &rng, serde_json::json!({"layers": 1}), serde_json::json!({"num_train_timesteps": 10}), serde_json::json!({"seed": 5}));
    let saved = checkpoint::save(&dir, &ck).unwrap();
    assert_eq!(saved.file_name().unwrap(), "step-000002");
    assert_eq!(checkpoint::list(&dir).iter().map(|x| x.0).collect::<Vec<_>>(), vec![2]);
    let back = checkpoint::load(&saved, &Device::Cpu).unwrap();
    assert_eq!((back.step, back.rng, &back.model_config, &back.options), (2, rng.state(), &ck.model_config, &ck.options));

    let w2 = Var::new(&[0f32; 3], &Device::Cpu).unwrap();
    let mut opt2 = AdamW::new_named(vec![("w".into(), w2.clone())], p).unwrap();
    let mut ema2 = Ema::new(opt2.vars()).unwrap();
    let rng2 = back.restore(&mut opt2, &mut ema2, "ck").unwrap();
    assert_eq!(rng2, rng);
    assert_eq!(opt2.step_count(), 2);
    assert_eq!(bits(w2.as_tensor()), bits(w.as_tensor()));
    assert_eq!(bits(&opt2.state().tensors["adam.v.w"]), bits(&opt.state().tensors["adam.v.w"]));
    assert_eq!(bits(&ema2.weights()["w"]), bits(&ema.weights()["w"]));

    // a hook that fails leaves no folder behind and says the earlier checkpoints are intact
    let mut ck3 = ck.clone();
    ck3.step = 3;
    let fail = |name: &str| if name == checkpoint::STATE_FILE { Err(ddpm_core::Error::arg("disk full")) } else { Ok(()) };
    let e = checkpoint::save_with_hook(&dir, &ck3, &fail).unwrap_err().to_string();
    assert!(e.contains("step-000003") && e.contains("disk full") && e.contains("previous checkpoints are intact"), "{e}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);

    // a training state file without its step: the error names the file and the field
    let state_file = saved.join(checkpoint::STATE_FILE);
    let tensors = candle_core::safetensors::load(&state_file, &Device::Cpu).unwrap();
    let meta = HashMap::from([("format".to_string(), checkpoint::STATE_FORMAT.to_string())]);
    checkpoint::write_safetensors(&state_file, &tensors, Some(meta)).unwrap();
    let e = checkpoint::load(&saved, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains(checkpoint::STATE_FILE) && e.contains("`step`") && !e.contains('\n'), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A network whose training forward differs from its evaluation forward: output 0 in evaluation, and
/// in training a constant drawn from the generator (as dropout would draw its mask).
struct Toy;

impl TimeModule for Toy {
    fn forward_t(&self, x_t: &Tensor, _t: &Tensor, train: Option<&mut NoiseRng>) -> candle_core::Result<Tensor> {
        match train {
            None => x_t.zeros_like(),
            Some(rng) => x_t.ones_like()? * rng.uniform(),
        }
    }
}

/// training_loss runs the predictor's training forward with the caller's generator, after drawing t
/// and eps from it: L = mean((c - eps)^2) with c the network's draw, the draw that follows t and eps.
#[test]
fn training_loss_runs_the_training_forward() {
    let schedule = NoiseSchedule::new(&SchedulerConfig::default(), &Device::Cpu).unwrap();
    let x0 = Tensor::zeros((2, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let mut rng = NoiseRng::new(9);
    let out = training_loss(&ModulePredictor(Toy), &schedule, LossWeighting::None, &x0, &mut rng).unwrap();
    // replay the draws: two timesteps, eight normals, then the network's uniform
    let mut replay = NoiseRng::new(9);
    for _ in 0..2 {
        replay.below(1000);
    }
    let eps = replay.normal_vec(8);
    let c = replay.uniform();
    assert_eq!(rng, replay, "the training forward drew from the caller's generator");
    assert_eq!(values(&out.noise), eps.iter().map(|&v| v as f64).collect::<Vec<_>>());
    let want = eps.iter().map(|&e| (c - e as f64).powi(2)).sum::<f64>() / 8.0;
    let got = out.loss.to_scalar::<f32>().unwrap() as f64;
    assert!((got - want).abs() < 1e-6 * want.max(1.0), "{got} vs {want}");
    // the evaluation forward (predict) is the zeros: L = mean(eps^2) on the same draws
    let eval = (|x: &Tensor, _t: &Tensor| x.zeros_like()) as fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>;
    let out0 = training_loss(&eval, &schedule, LossWeighting::None, &x0, &mut NoiseRng::new(9)).unwrap();
    let want0 = eps.iter().map(|&e| (e as f64).powi(2)).sum::<f64>() / 8.0;
    assert!((out0.loss.to_scalar::<f32>().unwrap() as f64 - want0).abs() < 1e-6 * want0.max(1.0));
}
