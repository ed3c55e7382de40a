//! `ddpm sample`, `interpolate` and `export` on the diffusers fixture model (1-channel 28x28 UNet with
//! random weights): determinism, image sizes, export round trip, errors on bad input.

use candle_core::{DType, Device, Tensor};
use ddpm_tests::{ddpm, ddpm_err, fixtures};

fn mnist_fixture() -> String {
    fixtures().join("unet-mnist-small").display().to_string()
}

#[test]
fn same_seed_same_png_and_ddim_10_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let model = mnist_fixture();
    let p = |n: &str| tmp.path().join(n).display().to_string();
    let (a, b, c) = (p("a.png"), p("b.png"), p("c.png"));
    let args = |out: &str, seed: &str| -> Vec<String> {
        ["sample", "--model", &model, "--num", "6", "--batch-size", "4", "--scheduler", "ddim", "--steps", "10", "--seed", seed, "--out", out, "--device", "cpu"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let run = |v: Vec<String>| ddpm(&v.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    run(args(&a, "3")).unwrap();
    run(args(&b, "3")).unwrap();
    run(args(&c, "4")).unwrap();
    let (ba, bb, bc) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), std::fs::read(&c).unwrap());
    assert_eq!(ba, bb, "same seed gave different PNGs");
    assert_ne!(ba, bc, "different seeds gave the same PNG");
    // 6 images in a near-square grid: 3 columns, 2 rows of 28x28 with 2-pixel borders.
    let img = image::open(&a).unwrap();
    assert_eq!((img.width(), img.height()), (3 * 30 + 2, 2 * 30 + 2));
    // --scale 3: the same grid, each pixel a 3x3 block
    let mut scaled = args(&p("s.png"), "3");
    scaled.extend(["--scale".into(), "3".into()]);
    run(scaled).unwrap();
    let (small, big) = (img.to_rgb8(), image::open(p("s.png")).unwrap().to_rgb8());
    assert_eq!(big.dimensions(), (3 * small.width(), 3 * small.height()));
    assert!(big.enumerate_pixels().all(|(x, y, px)| px == small.get_pixel(x / 3, y / 3)));
}

#[test]
fn ddpm_sampler_out_dir_and_animation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs");
    let gif = tmp.path().join("anim.gif");
    ddpm(&[
        "sample", "--model", &mnist_fixture(), "--num", "3", "--scheduler", "ddpm", "--steps", "20", "--out-dir",
        dir.to_str().unwrap(), "--animate", gif.to_str().unwrap(), "--device", "cpu",
    ])
    .unwrap();
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(files.len(), 3);
    let one = image::open(dir.join("00000.png")).unwrap();
    assert_eq!((one.width(), one.height()), (28, 28));
    assert!(std::fs::metadata(&gif).unwrap().len() > 100);
}

#[test]
fn interpolation_strip_dimensions() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("strip.png");
    ddpm(&[
        "interpolate", "--model", &mnist_fixture(), "--data", "mnist", "--indices", "0,1", "--t", "20", "--lambdas",
        "0,0.5,1", "--out", out.to_str().unwrap(), "--device", "cpu",
    ])
    .unwrap();
    // a, three mixes, b: five 28x28 tiles in a row with 2-pixel borders.
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (5 * 30 + 2, 30 + 2));
}

#[test]
fn export_then_reload_gives_identical_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pipeline");
    ddpm(&["export", "--checkpoint", &mnist_fixture(), "--out", out.to_str().unwrap()]).unwrap();
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("model_index.json")).unwrap()).unwrap();
    assert_eq!(index["_class_name"], "DDPMPipeline");
    assert_eq!(index["unet"][1], "UNet2DModel");
    assert!(out.join("scheduler/scheduler_config.json").is_file());
    let dev = Device::Cpu;
    let a = ddpm_unet::load_dir(std::path::Path::new(&mnist_fixture()), &dev, DType::F32).unwrap();
    let b = ddpm_unet::from_pretrained(out.to_str().unwrap(), &dev, DType::F32).unwrap();
    let x = Tensor::randn(0f32, 1., (2, 1, 28, 28), &dev).unwrap();
    let t = Tensor::new(&[3i64, 700], &dev).unwrap();
    let (ya, yb) = (a.forward(&x, &t).unwrap(), b.forward(&x, &t).unwrap());
    let diff = (ya - yb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0);
    // Exporting over an existing folder is refused and leaves it alone.
    let e = ddpm_err(&["export", "--checkpoint", &mnist_fixture(), "--out", out.to_str().unwrap()]);
    assert!(e.contains("already exists"), "{e}");
}

#[test]
fn bad_input_gives_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = mnist_fixture();
    let e = ddpm_err(&["sample", "--model", &model, "--steps", "0", "--out", tmp.path().join("x.png").to_str().unwrap(), "--device", "cpu"]);
    assert!(e.contains("steps"), "{e}");
    let e = ddpm_err(&["sample", "--model", &model, "--out", "/no/such/dir/x.png", "--device", "cpu"]);
    assert!(e.contains("/no/such/dir") && e.contains("does not exist"), "{e}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = ddpm_err(&["sample", "--model", empty.to_str().unwrap(), "--out", tmp.path().join("x.png").to_str().unwrap(), "--device", "cpu"]);
    assert!(e.contains("config.json"), "{e}");
    // A config without weights: the error says which file is missing beside it.
    std::fs::write(empty.join("config.json"), "{}").unwrap();
    let e = ddpm_err(&["sample", "--model", empty.to_str().unwrap(), "--out", tmp.path().join("x.png").to_str().unwrap(), "--device", "cpu"]);
    assert!(e.contains("has no diffusion_pytorch_model.safetensors"), "{e}");
    // A PNG of the wrong size for interpolation.
    let small = tmp.path().join("small.png");
    image::GrayImage::new(10, 10).save(&small).unwrap();
    let e = ddpm_err(&["interpolate", "--model", &model, "--a", small.to_str().unwrap(), "--b", small.to_str().unwrap(), "--out", tmp.path().join("s.png").to_str().unwrap(), "--device", "cpu"]);
    assert!(e.contains("10x10") && e.contains("28x28"), "{e}");
    // a mixing weight that is not a number (issue 22: it wrote a black strip and exited 0)
    let e = ddpm_err(&["interpolate", "--model", &model, "--data", "mnist", "--lambdas", "0.5,nan", "--out", tmp.path().join("s.png").to_str().unwrap(), "--device", "cpu"]);
    assert!(e.contains("--lambdas") && e.contains("NaN"), "{e}");
    assert!(!tmp.path().join("s.png").exists() && !tmp.path().join("x.png").exists());
    // issue 22: an --out that is a folder, or in a place that cannot be written, failed only after
    // sampling and left a .tmp file; now before sampling (a 1000-step DDPM run would take minutes).
    let e = ddpm_err(&["sample", "--model", &model, "--out", tmp.path().to_str().unwrap(), "--device", "cpu"]);
    assert!(e.contains("is a folder"), "{e}");
    if cfg!(target_os = "linux") {
        // /proc takes no new files, even for root
        let e = ddpm_err(&["sample", "--model", &model, "--out", "/proc/ddpm-grid.png", "--device", "cpu"]);
        assert!(e.starts_with("/proc/ddpm-grid.png: cannot write there"), "{e}");
        let e = ddpm_err(&["export", "--checkpoint", &model, "--out", "/proc/ddpm-export"]);
        assert!(e.starts_with("/proc/ddpm-export: cannot write there") && !e.contains(".tmp"), "{e}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().ends_with(".tmp")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A DDIMPipeline-style folder (diffusers' DDIMScheduler config with `set_alpha_to_one: false` and
/// `steps_offset: 1`, issue 19): `sample` without `--scheduler` uses DDIM with every field of that
/// config, and `export` writes a DDIMPipeline with the same scheduler config.
#[test]
fn a_ddim_scheduler_config_picks_ddim_with_its_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fixtures().join("unet-mnist-small").join(f), model.join(f)).unwrap();
    }
    let diffusers_config = fixtures().join("scheduler-configs/ddim-alpha-false-offset1/scheduler_config.json");
    std::fs::copy(&diffusers_config, model.join("scheduler_config.json")).unwrap();

    let config = ddpm_core::SchedulerConfig::from_file(model.join("scheduler_config.json")).unwrap();
    let sampler = ddpm_cli::generate::make_sampler(None, &config, Some(10), 0.0, &Device::Cpu).unwrap();
    let ddpm_core::Sampler::Ddim(ddim) = &sampler else { panic!("expected DDIM, got {sampler:?}") };
    assert_eq!(ddim.timesteps()[..2], [901, 801], "steps_offset 1");
    assert!((ddim.final_alpha_cumprod() - 0.99915).abs() < 1e-9, "set_alpha_to_one false: alpha_bar_0 = 1 - 0.00085");
    // --scheduler still overrides the class
    let forced = ddpm_cli::generate::make_sampler(Some(ddpm_cli::generate::SamplerKind::Ddpm), &config, Some(10), 0.0, &Device::Cpu).unwrap();
    assert!(matches!(forced, ddpm_core::Sampler::Ddpm(_)));
    // --scheduler dpm-solver: DPM-Solver++ (second order) from the same config's schedule fields, 20
    // steps by default, spaced as the config says: DPM-Solver's "leading" takes the step ratio
    // T // (n + 1) = 1000 // 21 = 47 and timesteps 47 k + steps_offset for k = 20, 19, ...
    let dpm = ddpm_cli::generate::make_sampler(Some(ddpm_cli::generate::SamplerKind::DpmSolver), &config, None, 0.0, &Device::Cpu).unwrap();
    let ddpm_core::Sampler::DpmSolver(d) = &dpm else { panic!("expected DPM-Solver, got {dpm:?}") };
    assert_eq!(d.timesteps().len(), 20);
    assert_eq!(d.timesteps()[..2], [941, 894]);

    let m = model.display().to_string();
    let p = |n: &str| tmp.path().join(n).display().to_string();
    let (default, ddim_png, ddpm_png) = (p("default.png"), p("ddim.png"), p("ddpm.png"));
    let base = ["sample", "--model", &m, "--num", "2", "--steps", "10", "--seed", "5", "--device", "cpu", "--out"];
    let run = |out: &str, extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.push(out);
        args.extend_from_slice(extra);
        ddpm(&args).unwrap();
        std::fs::read(out).unwrap()
    };
    let a = run(&default, &[]);
    assert_eq!(a, run(&ddim_png, &["--scheduler", "ddim"]), "without --scheduler the config's DDIMScheduler is used");
    assert_ne!(a, run(&ddpm_png, &["--scheduler", "ddpm"]));

    let out = tmp.path().join("pipeline");
    ddpm(&["export", "--checkpoint", &m, "--out", out.to_str().unwrap()]).unwrap();
    let read = |p: &std::path::Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let index = read(&out.join("model_index.json"));
    assert_eq!(index["_class_name"], "DDIMPipeline");
    assert_eq!(index["scheduler"][1], "DDIMScheduler");
    assert_eq!(read(&out.join("scheduler/scheduler_config.json")), read(&diffusers_config), "the config diffusers saved, field for field");
}
