//! `ddpm train` end to end on a tiny UNet and the shipped MNIST: exact resume, crash-safe checkpoints,
//! metrics cut back to the checkpoint on resume, a used run folder refused without --overwrite, options
//! validated before anything is written, one-line errors on bad input, the sample grids equal to
//! `ddpm sample` of the checkpoint.

use ddpm_cli::checkpoint;
use ddpm_tests::{ddpm, ddpm_err, parse, read_tensors, tiny_unet_config};

/// Common options of the tiny runs: 64 MNIST images, batch 8, explicit warm-up (it must not depend on
/// --steps for the runs to be comparable), no sample grids.
fn tiny_args<'a>(cfg: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train", "--unet-config", cfg, "--max-images", "64", "--batch-size", "8", "--warmup-steps", "2",
        "--steps", steps, "--save-every", "3", "--sample-every", "0", "--num-samples", "0", "--device", "cpu",
        "--num-train-timesteps", "100", "--out", out, "--seed", "11",
    ]
}

/// A scratch folder with the tiny UNet config in it: (the folder, the config's path, `run/` in it).
fn tiny_run() -> (tempfile::TempDir, String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_unet_config(tmp.path()).display().to_string();
    let out = tmp.path().join("run").display().to_string();
    (tmp, cfg, out)
}

/// The `step` of each line of a run's metrics.jsonl, in order.
fn logged_steps(run: &str) -> Vec<u64> {
    let text = std::fs::read_to_string(std::path::Path::new(run).join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect()
}

#[test]
fn resume_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_unet_config(tmp.path());
    let cfg = cfg.to_str().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    // Straight through: 10 steps (an epoch is 64 / 8 = 8 steps, so the run crosses an epoch boundary).
    ddpm(&tiny_args(cfg, a, "10")).unwrap();
    // 5 steps, stop, resume to 10.
    ddpm(&tiny_args(cfg, b, "5")).unwrap();
    let mut resume = tiny_args(cfg, b, "10");
    resume.extend(["--resume", "auto"]);
    ddpm(&resume).unwrap();

    let last = |run: &str| checkpoint::list(&std::path::Path::new(run).join("checkpoints")).pop().unwrap();
    let (sa, da) = last(a);
    let (sb, db) = last(b);
    assert_eq!((sa, sb), (10, 10));
    let (ta, tb) = (read_tensors(&da.join(checkpoint::STATE_FILE)), read_tensors(&db.join(checkpoint::STATE_FILE)));
    assert!(ta.len() > 10 && ta.keys().eq(tb.keys()));
    for (k, v) in &ta {
        assert!(v.iter().zip(&tb[k]).all(|(x, y)| x.to_bits() == y.to_bits()), "tensor {k} differs after resume");
    }
    let model = |d: &std::path::Path| read_tensors(&d.join("model").join(checkpoint::WEIGHTS_FILE));
    assert_eq!(model(&da), model(&db), "EMA weights differ after resume");
    // Training moved the weights: the EMA differs from the raw weights' initial values, and the loss
    // in metrics.jsonl is finite.
    let metrics = std::fs::read_to_string(std::path::Path::new(a).join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 10);
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["loss"].as_f64().unwrap().is_finite());
    }
    // The resumed run continued b's metrics (steps 1 to 10, once each); a fresh run into a directory
    // that has metrics starts them over instead of appending a second run to the first.
    let steps = logged_steps;
    assert_eq!(steps(b), (1..=10).collect::<Vec<_>>());
    // A fresh run into a folder holding another run is refused (issue 22: it pruned the old run's
    // checkpoints and truncated its metrics), and nothing of the old run is touched...
    let e = ddpm_err(&tiny_args(cfg, a, "4"));
    assert!(e.contains("holds another run") && e.contains("--overwrite") && !e.contains('\n'), "{e}");
    assert_eq!(steps(a), (1..=10).collect::<Vec<_>>());
    assert_eq!(checkpoint::list(&std::path::Path::new(a).join("checkpoints")).last().unwrap().0, 10);
    // ... unless told: --overwrite starts the metrics over and leaves only the new run's checkpoints.
    let mut over = tiny_args(cfg, a, "4");
    over.push("--overwrite");
    ddpm(&over).unwrap();
    assert_eq!(steps(a), (1..=4).collect::<Vec<_>>());
    let kept: Vec<u64> = checkpoint::list(&std::path::Path::new(a).join("checkpoints")).iter().map(|c| c.0).collect();
    assert_eq!(kept, vec![3, 4]);
}

#[test]
fn resume_after_a_kill_logs_each_step_once() {
    // issue 22: a run killed after its last checkpoint left the steps past it in metrics.jsonl, and
    // the resumed run logged them again (a 20-step run killed at 9, resumed from 5, had 24 lines).
    let (_tmp, cfg, out) = tiny_run();
    let (cfg, out) = (cfg.as_str(), out.as_str());
    // "Killed" at step 5: the checkpoint of step 6 fails after steps 4 to 6 were logged; the last
    // good checkpoint is step 3 (--save-every 3). A torn line as a kill can leave follows.
    let ddpm_cli::Cli::Train(args) = parse(&tiny_args(cfg, out, "8")) else { panic!("not a train command") };
    let calls = std::cell::Cell::new(0);
    let kill = |name: &str| -> anyhow::Result<()> {
        if name == checkpoint::WEIGHTS_FILE {
            calls.set(calls.get() + 1);
            if calls.get() == 2 {
                anyhow::bail!("killed");
            }
        }
        Ok(())
    };
    assert!(ddpm_cli::train::run_with_hook(*args, &kill).is_err());
    let metrics = std::path::Path::new(out).join("metrics.jsonl");
    let mut f = std::fs::OpenOptions::new().append(true).open(&metrics).unwrap();
    std::io::Write::write_all(&mut f, b"{\"step\":7,\"lo").unwrap();
    let mut resume = tiny_args(cfg, out, "8");
    resume.extend(["--resume", "auto"]);
    ddpm(&resume).unwrap();
    assert_eq!(logged_steps(out), (1..=8).collect::<Vec<_>>());
}

#[test]
fn options_are_validated_before_anything_is_written() {
    // issue 22: these were accepted, failed only after training, or reported success with an empty
    // model path; each must fail up front, naming the option, and leave an existing run as it was.
    let (tmp, cfg, out) = tiny_run();
    let (cfg, out) = (cfg.as_str(), out.as_str());
    ddpm(&tiny_args(cfg, out, "3")).unwrap();
    let metrics = std::fs::read_to_string(std::path::Path::new(out).join("metrics.jsonl")).unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--steps", "0"], "--steps 0"),
        (&["--ema-decay", "2"], "--ema-decay 2"),
        (&["--ema-decay", "-1"], "--ema-decay -1"),
        (&["--ema-decay", "nan"], "--ema-decay NaN"),
        (&["--grad-clip", "nan"], "--grad-clip NaN"),
        (&["--weight-decay", "-5"], "--weight-decay -5"),
        (&["--weight-decay", "nan"], "--weight-decay NaN"),
        (&["--lr", "0"], "--lr 0"),
        (&["--sample-steps", "0"], "--sample-steps 0"),
        (&["--sample-steps", "101"], "--sample-steps 101"),
        (&["--sample-eta", "-1"], "--sample-eta -1"),
        (&["--sample-eta", "nan"], "--sample-eta NaN"),
        (&["--num-samples", "100000000"], "--num-samples 100000000"),
        (&["--max-images", "0"], "--max-images 0"),
    ];
    for (flag, expect) in cases {
        let mut a = tiny_args(cfg, out, "3");
        match a.iter().position(|x| *x == flag[0]) {
            Some(i) => a[i + 1] = flag[1],
            None => a.extend(*flag),
        }
        a.extend(["--resume", "auto"]);
        let e = ddpm_err(&a);
        assert!(e.contains(expect) && !e.contains('\n'), "{flag:?}: {e}");
    }
    for epochs in ["nan", "-1", "0"] {
        let mut a: Vec<&str> = tiny_args(cfg, out, "3");
        let i = a.iter().position(|x| *x == "--steps").unwrap();
        a.drain(i..i + 2);
        a.extend(["--epochs", epochs, "--resume", "auto"]);
        let e = ddpm_err(&a);
        assert!(e.contains("--epochs"), "--epochs {epochs}: {e}");
    }
    assert_eq!(std::fs::read_to_string(std::path::Path::new(out).join("metrics.jsonl")).unwrap(), metrics);
    // --num-samples 0 with --sample-every 1 writes no grid (it wrote empty PNGs)
    let fresh = tmp.path().join("fresh");
    let mut a = tiny_args(cfg, fresh.to_str().unwrap(), "1");
    let i = a.iter().position(|x| *x == "--sample-every").unwrap();
    a[i + 1] = "1";
    ddpm(&a).unwrap();
    assert_eq!(std::fs::read_dir(fresh.join("samples")).unwrap().count(), 0);
}

#[test]
fn resuming_with_other_data_order_options_is_refused() {
    // issue 22: a resume with another --data, --batch-size, --seed or --max-images was accepted
    // silently; it would not continue the same run.
    let (_tmp, cfg, out) = tiny_run();
    let (cfg, out) = (cfg.as_str(), out.as_str());
    ddpm(&tiny_args(cfg, out, "3")).unwrap();
    for (flag, value) in [("--batch-size", "4"), ("--seed", "12"), ("--max-images", "32")] {
        let mut a = tiny_args(cfg, out, "4");
        let i = a.iter().position(|x| *x == flag).unwrap();
        a[i + 1] = value;
        a.extend(["--resume", "auto"]);
        let e = ddpm_err(&a);
        assert!(e.contains(&format!("trained with {flag}")) && e.contains(&format!("but {value} now")), "{flag}: {e}");
    }
    // the same options resume
    let mut a = tiny_args(cfg, out, "4");
    a.extend(["--resume", "auto"]);
    ddpm(&a).unwrap();
}

#[test]
fn failed_save_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_unet_config(tmp.path());
    let out = tmp.path().join("run");
    let args = tiny_args(cfg.to_str().unwrap(), out.to_str().unwrap(), "6");
    let ddpm_cli::Cli::Train(train_args) = parse(&args) else { panic!("not a train command") };
    // Fail while writing the weights of the second checkpoint (step 6), after the config files are
    // already in the temporary folder.
    let calls = std::cell::Cell::new(0);
    let hook = |name: &str| -> anyhow::Result<()> {
        if name == checkpoint::WEIGHTS_FILE {
            calls.set(calls.get() + 1);
            if calls.get() == 2 {
                anyhow::bail!("injected failure: disk full");
            }
        }
        Ok(())
    };
    let err = ddpm_cli::train::run_with_hook(*train_args, &hook).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("disk full") && msg.contains("previous checkpoints are intact"), "{msg}");
    let ckpts = out.join("checkpoints");
    let list = checkpoint::list(&ckpts);
    assert_eq!(list.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3]);
    // Nothing half-written is left, and the surviving checkpoint loads.
    let names: Vec<String> = std::fs::read_dir(&ckpts).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(names, vec!["step-000003".to_string()]);
    let ck = checkpoint::load(&list[0].1, &candle_core::Device::Cpu).unwrap();
    assert_eq!(ck.step, 3);
    ddpm_unet::load_dir(list[0].1.join("model"), &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
}

#[test]
fn bad_input_gives_one_line_errors() {
    let (tmp, cfg, out) = tiny_run();
    let (cfg, out) = (cfg.as_str(), out.as_str());
    // The tiny options with one flag's value replaced (or the flag added).
    let with = |extra: &[&str]| {
        let mut a = tiny_args(cfg, out, "2");
        match a.iter().position(|x| *x == extra[0]) {
            Some(i) => a[i + 1] = extra[1],
            None => a.extend(extra),
        }
        ddpm_err(&a)
    };
    let e = with(&["--batch-size", "0"]);
    assert!(e.contains("--batch-size 0"), "{e}");
    let e = with(&["--data", "/no/such/folder"]);
    assert!(e.contains("/no/such/folder") && e.contains("no such folder"), "{e}");
    let e = with(&["--beta-schedule", "quadratic"]);
    assert!(e.contains("beta_schedule"), "{e}");
    // A config field of the wrong type: the file and the field, each named once.
    let bad = tmp.path().join("bad.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(cfg).unwrap()).unwrap();
    json["block_out_channels"] = serde_json::json!([8, "x"]);
    std::fs::write(&bad, json.to_string()).unwrap();
    let e = ddpm_err(&["bench", "--unet-config", bad.to_str().unwrap(), "--steps", "1", "--batch-size", "1"]);
    assert!(e.contains("bad.json") && e.matches("`block_out_channels`").count() == 1, "{e}");
    // issue 22: it failed inside a kernel with a backtrace
    let e = ddpm_err(&["bench", "--unet-config", cfg, "--steps", "1", "--batch-size", "0"]);
    assert_eq!(e, "--batch-size 0: must be at least 1");
    // The ddpm-cifar10 preset takes 32x32 RGB images, MNIST is 28x28 grey.
    let e = ddpm_err(&["train", "--preset", "ddpm-cifar10", "--max-images", "16", "--out", out, "--device", "cpu"]);
    assert!(e.contains("28x28") && e.contains("sample_size is 32"), "{e}");
    // A checkpoint from another config.
    ddpm(&tiny_args(cfg, out, "3")).unwrap();
    let e = ddpm_err(&["train", "--preset", "mnist-small", "--max-images", "64", "--batch-size", "8", "--out", out, "--resume", "auto", "--device", "cpu", "--steps", "4", "--num-train-timesteps", "100"]);
    assert!(e.contains("checkpoint from another config"), "{e}");
    assert!(!e.contains('\n'), "error is not one line: {e}");
}

#[test]
fn bench_reports_the_steps_phases_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_unet_config(tmp.path()).display().to_string();
    let line = |extra: &[&str]| {
        let args = [&["bench", "--unet-config", cfg.as_str(), "--steps", "2", "--batch-size", "2", "--threads", "1"], extra].concat();
        match parse(&args) {
            ddpm_cli::Cli::Bench(a) => ddpm_cli::bench::measure(a).unwrap().expect("a figures line"),
            _ => unreachable!("a bench command"),
        }
    };
    let names = ["forward", "backward", "optimizer", "issue", "step"].map(|p| format!("phase_{p}_ms"));
    let plain = line(&[]);
    assert!(plain["train_img_per_s"].as_f64().unwrap() > 0.0, "{plain}");
    assert!(names.iter().all(|n| plain.get(n).is_none()), "{plain}");
    let with = line(&["--phases"]);
    for n in &names {
        assert!(with[n].as_f64().is_some_and(|ms| ms > 0.0), "{n}: {with}");
    }
    // on the CPU a step is done when it has been issued; the whole step takes longer than its optimizer
    let ms = |n: &str| with[format!("phase_{n}_ms")].as_f64().unwrap();
    assert!((ms("issue") - ms("step")).abs() <= 0.01 * ms("step") + 0.01, "{with}");
    assert!(ms("step") > ms("optimizer"), "{with}");
}

#[test]
fn bench_profiles_the_step_by_kind_of_op_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_unet_config(tmp.path()).display().to_string();
    let args = ["bench", "--unet-config", cfg.as_str(), "--steps", "2", "--batch-size", "2", "--threads", "1", "--profile"];
    let line = match parse(&args) {
        ddpm_cli::Cli::Bench(a) => ddpm_cli::bench::measure(a).unwrap().expect("a figures line"),
        _ => unreachable!("a bench command"),
    };
    let kinds = line["profile_ms"].as_object().unwrap_or_else(|| panic!("no profile: {line}"));
    let step = line["profile_step_ms"].as_f64().unwrap();
    // every kind of op that the tiny UNet's training step runs (the bench's loss is candle's, as the
    // peer's), each a part of the step
    for k in ["conv forward", "conv backward", "group norm forward", "group norm backward", "attention forward", "attention backward", "optimizer"] {
        let ms = kinds.get(k).and_then(|v| v.as_f64()).unwrap_or_else(|| panic!("{k} missing: {line}"));
        assert!(ms > 0.0 && ms < step, "{k}: {ms} ms of a {step} ms step: {line}");
    }
    // the kinds and `other` add up to the step (on the CPU the spans are wall-clock time, not nested)
    let total: f64 = kinds.values().map(|v| v.as_f64().unwrap()).sum();
    assert!((total - step).abs() <= 0.01 * step + 0.01, "{total} vs {step}: {line}");
    assert!(kinds["other"].as_f64().unwrap() >= 0.0, "{line}");
}

#[test]
fn a_diverging_run_stops_at_its_first_non_finite_step_and_saves_nothing_after_it() {
    // The losses and gradient norms are read from the device in batches of steps; a learning rate of
    // 1e3 overflows within a few steps, and the run must stop there naming that step, with every
    // checkpoint and metrics line from before it.
    let (_tmp, cfg, out) = tiny_run();
    let (cfg, out) = (cfg.as_str(), out.as_str());
    let mut a = tiny_args(cfg, out, "40");
    a.extend(["--lr", "1e3"]);
    let e = ddpm_err(&a);
    let bad: u64 = e.split(" at step ").nth(1).and_then(|r| r.split(';').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no step in: {e}"));
    assert!((e.starts_with("loss is") || e.starts_with("the gradient norm is")) && e.contains("lower --lr (now 1000)"), "{e}");
    assert!((2..40).contains(&bad), "{e}");
    assert_eq!(logged_steps(out), (1..bad).collect::<Vec<_>>());
    // every checkpoint left is of a step before the bad one and holds finite weights
    let ckpts: Vec<_> = match std::fs::read_dir(std::path::Path::new(out).join("checkpoints")) {
        Ok(dir) => dir.map(|d| d.unwrap().path()).collect(),
        Err(_) => vec![],
    };
    // --save-every 3
    let last_good = (bad - 1) / 3 * 3;
    assert_eq!(ckpts.is_empty(), last_good == 0, "checkpoints {ckpts:?} with the bad step {bad}");
    for c in ckpts {
        let step: u64 = c.file_name().unwrap().to_str().unwrap().trim_start_matches("step-").parse().unwrap();
        assert!(step < bad, "checkpoint {} saved at or after the bad step {bad}", c.display());
        // the EMA weights and the raw weights with their moments
        for file in [c.join(checkpoint::MODEL_DIR).join(checkpoint::WEIGHTS_FILE), c.join(checkpoint::STATE_FILE)] {
            for (name, v) in read_tensors(&file) {
                assert!(v.iter().all(|x| x.is_finite()), "{}: {name} is not finite", file.display());
            }
        }
    }
    if last_good > 0 {
        assert!(e.contains(&format!("the last good checkpoint is {out}/checkpoints/step-{last_good:06}")), "{e}");
    } else {
        assert!(e.contains("none (nothing saved yet)"), "{e}");
    }
}

#[test]
fn resume_with_more_steps_keeps_the_warmup_it_started_with() {
    let (_tmp, cfg, out) = tiny_run();
    let (cfg, out) = (cfg.as_str(), out.as_str());
    // No --warmup-steps: the default is steps / 10, so 0 for a 2-step run and 4 for a 40-step run.
    let args = |steps: &'static str| -> Vec<String> {
        let mut a: Vec<String> = tiny_args(cfg, out, steps).iter().map(|s| s.to_string()).collect();
        let i = a.iter().position(|x| x == "--warmup-steps").unwrap();
        a.drain(i..i + 2);
        a.extend(["--lr".into(), "0.001".into()]);
        a
    };
    let strs = |v: &[String]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    ddpm(&strs(&args("2")).iter().map(|s| s.as_str()).collect::<Vec<_>>()).unwrap();
    // Resume with --steps 40 and stop it after step 3 (its checkpoint write fails on purpose).
    let mut resume = args("40");
    resume.extend(["--resume".into(), "auto".into()]);
    let ddpm_cli::Cli::Train(train_args) = parse(&resume.iter().map(|s| s.as_str()).collect::<Vec<_>>()) else { panic!("not a train command") };
    let stop = |_: &str| -> anyhow::Result<()> { anyhow::bail!("stop here") };
    assert!(ddpm_cli::train::run_with_hook(*train_args, &stop).is_err());
    let metrics = std::fs::read_to_string(std::path::Path::new(out).join("metrics.jsonl")).unwrap();
    let lrs: Vec<f64> = metrics.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["lr"].as_f64().unwrap()).collect();
    // Step 3 runs at the full rate of the 2-step run's schedule (warm-up 0), not at 3/4 of it.
    assert_eq!(lrs, vec![0.001, 0.001, 0.001]);
}

#[test]
fn minutes_stops_at_a_step_with_a_checkpoint_that_resumes() {
    // --minutes: a budget of ~0 stops after the first step, checkpointed; --resume continues the
    // same run to --steps.
    let (_tmp, cfg, out) = tiny_run();
    let (cfg, out) = (cfg.as_str(), out.as_str());
    let mut a = tiny_args(cfg, out, "4");
    a.extend(["--minutes", "0.00001", "--loss-weighting", "min-snr", "--lr-schedule", "cosine"]);
    ddpm(&a).unwrap();
    let ckpts = |run: &str| checkpoint::list(&std::path::Path::new(run).join("checkpoints")).iter().map(|c| c.0).collect::<Vec<_>>();
    assert_eq!(ckpts(out), vec![1]);
    let mut resume = tiny_args(cfg, out, "4");
    resume.extend(["--loss-weighting", "min-snr", "--lr-schedule", "cosine", "--resume", "auto"]);
    ddpm(&resume).unwrap();
    assert_eq!(ckpts(out), vec![1, 3, 4]);
    let metrics = std::fs::read_to_string(std::path::Path::new(out).join("metrics.jsonl")).unwrap();
    let lrs: Vec<f64> = metrics.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["lr"].as_f64().unwrap()).collect();
    // the default lr of a custom UNet is 2e-4; warm-up 2, then (1 + cos(pi (s - 2) / 2)) / 2: 1, 1/2, 0
    let want = [1e-4, 2e-4, 1e-4, 0.0];
    assert!(lrs.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-12), "{lrs:?}");
}

/// A run's sample grid is `ddpm sample` of its checkpoint with DDIM at `--sample-steps` and
/// `--sample-eta` (1 unless asked), seeded by `--seed`: the same PNG bytes, and other bytes with the
/// other eta.
#[test]
fn sample_grids_are_the_checkpoints_ddim_samples_at_the_runs_eta() {
    let (tmp, cfg, _) = tiny_run();
    for (name, run_eta) in [("default-eta", None), ("eta-0", Some("0"))] {
        let out = tmp.path().join(name).display().to_string();
        let mut a = tiny_args(&cfg, &out, "2");
        for (flag, v) in [("--sample-every", "2"), ("--num-samples", "4")] {
            let i = a.iter().position(|x| *x == flag).unwrap();
            a[i + 1] = v;
        }
        a.extend(["--sample-steps", "5"]);
        if let Some(e) = run_eta {
            a.extend(["--sample-eta", e]);
        }
        ddpm(&a).unwrap();
        let grid = std::fs::read(std::path::Path::new(&out).join("samples/step-000002.png")).unwrap();
        let model = format!("{out}/checkpoints/step-000002");
        let sampled = |eta: &str| {
            let png = tmp.path().join(format!("{name}-{eta}.png")).display().to_string();
            ddpm(&["sample", "--model", &model, "--num", "4", "--scheduler", "ddim", "--steps", "5", "--eta", eta, "--seed", "11", "--out", &png, "--device", "cpu"]).unwrap();
            std::fs::read(png).unwrap()
        };
        let (same, other) = if run_eta == Some("0") { ("0", "1") } else { ("1", "0") };
        assert!(grid == sampled(same), "{name}: the grid is not DDIM with eta {same}");
        assert!(grid != sampled(other), "{name}: eta {other} gave the same grid");
    }
}
