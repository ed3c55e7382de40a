//! `DdpmPipeline` against diffusers' DDPMPipeline and DDIMPipeline on the tiny pipeline folders of
//! tests/fixtures/diffusers/pipelines (made by `scripts/make_fixtures.py OUT --pipelines-only`):
//! the same images from the same noise, the same 8-bit pixels as `numpy_to_pil`, PNG files that
//! decode to those pixels, and save_pretrained -> from_pretrained giving the same images.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ddpm_core::{Sampler, Scheduler, SchedulerConfig, StepPrecision};
use common::max_abs_diff as max_abs;
use ddpm_unet::{images, DdpmPipeline, Error, GenerateOptions};

fn pipelines() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/diffusers/pipelines"
    ))
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(pipelines().join("reference.safetensors"), &Device::Cpu)
        .expect("pipeline fixture")
}

/// (case, folder, pipeline class, eta) as scripts/make_fixtures.py writes them; 2 images, 10 steps.
const CASES: &[(&str, &str, &str, f64)] = &[
    ("ddpm", "ddpm", "DDPMPipeline", 0.0),
    ("ddim-alpha-false", "ddim-alpha-false", "DDIMPipeline", 0.0),
    ("ddim-alpha-true", "ddim-alpha-true", "DDIMPipeline", 0.0),
    (
        "ddim-alpha-false-eta1",
        "ddim-alpha-false",
        "DDIMPipeline",
        1.0,
    ),
];

fn load(folder: &Path) -> DdpmPipeline {
    DdpmPipeline::from_pretrained(folder.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap()
}

/// The images of `pipe` for a case, from diffusers' recorded noise.
fn generate_case(pipe: &DdpmPipeline, r: &HashMap<String, Tensor>, case: &str, eta: f64) -> Tensor {
    let opts = GenerateOptions::new(2)
        .steps(10)
        .eta(eta)
        .noise(r[&format!("{case}.noise")].clone())
        .step_noise(r[&format!("{case}.step_noise")].clone());
    pipe.generate(opts).unwrap()
}

#[test]
fn images_match_diffusers_pipelines() {
    let r = reference();
    for &(case, folder, class, eta) in CASES {
        let pipe = load(&pipelines().join(folder));
        assert_eq!(pipe.class_name(), class, "{case}");
        // the timesteps diffusers visited
        let mut s = pipe.sampler().clone();
        s.set_timesteps(10).unwrap();
        let ts: Vec<i64> = r[&format!("{case}.timesteps")].to_vec1().unwrap();
        assert_eq!(
            s.timesteps().iter().map(|&t| t as i64).collect::<Vec<_>>(),
            ts,
            "{case}"
        );

        let mut calls = Vec::new();
        let mut progress = |i: usize, n: usize| calls.push((i, n));
        let opts = GenerateOptions::new(2)
            .steps(10)
            .eta(eta)
            .noise(r[&format!("{case}.noise")].clone())
            .step_noise(r[&format!("{case}.step_noise")].clone())
            .progress(&mut progress);
        let ours = pipe.generate(opts).unwrap();
        assert_eq!(calls, (1..=10).map(|i| (i, 10)).collect::<Vec<_>>());
        let theirs = &r[&format!("{case}.images")];
        assert_eq!(ours.dims(), theirs.dims());
        assert_eq!(ours.dtype(), DType::F32);
        // float32 rounding alone moves diffusers' images by `spread` (its float64 run minus its float32
        // run); DDIM with steps_offset 0 starts at t = 900 where x_0 = (x_t - ...) / sqrt(alpha_bar_900)
        // amplifies it. Ours may differ by as much again, plus 1e-5.
        let theirs64 = r[&format!("{case}.images_f64")]
            .to_dtype(DType::F32)
            .unwrap();
        let spread = max_abs(theirs, &theirs64);
        let err = max_abs(&ours, theirs);
        let err64 = max_abs(&ours, &theirs64);
        let f32_steps = pipe
            .clone()
            .with_precision(StepPrecision::DiffusersF32)
            .generate(
                GenerateOptions::new(2)
                    .steps(10)
                    .eta(eta)
                    .noise(r[&format!("{case}.noise")].clone())
                    .step_noise(r[&format!("{case}.step_noise")].clone()),
            )
            .unwrap();
        let err_f32_steps = max_abs(&f32_steps, theirs);
        println!("{case}: max |ours - diffusers| = {err:.2e} (steps in diffusers' f32: {err_f32_steps:.2e}), vs diffusers' f64 run {err64:.2e}, diffusers f32 vs f64 {spread:.2e}");
        assert!(
            err <= 1e-5 + 2.0 * spread,
            "{case}: max abs error {err}, diffusers' own f32 spread {spread}"
        );
        assert!(
            err_f32_steps <= 1e-5 + 2.0 * spread,
            "{case}: max abs error {err_f32_steps} with diffusers' f32 steps"
        );
        // the images are not trivially saturated
        let mean: f32 = theirs.mean_all().unwrap().to_scalar().unwrap();
        assert!((0.05..0.95).contains(&mean), "{case}: mean {mean}");

        // 8-bit pixels: our conversion of diffusers' floats is numpy_to_pil's, bit for bit
        let pil: Vec<u8> = r[&format!("{case}.pil")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let theirs_u8 = images::to_u8(&theirs.permute((0, 2, 3, 1)).unwrap()).unwrap();
        assert_eq!(
            theirs_u8, pil,
            "{case}: u8 conversion differs from numpy_to_pil"
        );
        // and ours of our images is within one level where a value sits on a rounding edge
        let ours_u8 = images::to_u8(&ours.permute((0, 2, 3, 1)).unwrap()).unwrap();
        let off = ours_u8.iter().zip(&pil).filter(|(a, b)| a != b).count();
        assert!(
            ours_u8.iter().zip(&pil).all(|(a, b)| a.abs_diff(*b) <= 1),
            "{case}"
        );
        assert!(
            off * 100 <= pil.len(),
            "{case}: {off} of {} pixels differ",
            pil.len()
        );
    }
}

#[test]
#[cfg(feature = "image")]
fn png_files_hold_the_u8_pixels() {
    let r = reference();
    let pipe = load(&pipelines().join("ddpm"));
    let ours = generate_case(&pipe, &r, "ddpm", 0.0);
    let dir = tempfile::tempdir().unwrap();
    let paths = images::save_pngs(&ours, dir.path(), "img").unwrap();
    assert_eq!(paths.len(), 2);
    assert!(paths[1].ends_with("img_0001.png"));
    for (i, p) in paths.iter().enumerate() {
        let decoded = image::open(p).unwrap();
        assert_eq!(decoded.color(), image::ColorType::Rgb8);
        let (hwc, c, h, w) = images::to_hwc_u8(&ours.get(i).unwrap()).unwrap();
        assert_eq!((c, h, w), (3, 8, 8));
        assert_eq!(decoded.to_rgb8().into_raw(), hwc, "{}", p.display());
    }
    // one channel: a greyscale PNG
    let grey = ours.narrow(1, 0, 1).unwrap().get(0).unwrap();
    let p = dir.path().join("grey.png");
    images::save_png(&grey, &p).unwrap();
    let decoded = image::open(&p).unwrap();
    assert_eq!(decoded.color(), image::ColorType::L8);
    assert_eq!(
        decoded.to_luma8().into_raw(),
        images::to_hwc_u8(&grey).unwrap().0
    );
    assert_eq!(
        images::to_rgb8(&grey).unwrap().get_pixel(3, 2).0,
        [decoded.to_luma8().get_pixel(3, 2).0[0]; 3]
    );
}

#[test]
fn save_pretrained_then_from_pretrained_gives_the_same_images() {
    let r = reference();
    for &(case, folder, class, eta) in &CASES[..2] {
        let pipe = load(&pipelines().join(folder));
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("saved");
        pipe.save_pretrained(&out).unwrap();
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("model_index.json")).unwrap())
                .unwrap();
        assert_eq!(index["_class_name"], class);
        assert_eq!(index["unet"][1], "UNet2DModel");
        assert!(out
            .join("unet/diffusion_pytorch_model.safetensors")
            .is_file());
        let saved =
            SchedulerConfig::from_file(out.join("scheduler/scheduler_config.json")).unwrap();
        let original = SchedulerConfig::from_file(
            pipelines()
                .join(folder)
                .join("scheduler/scheduler_config.json"),
        )
        .unwrap();
        assert_eq!(saved, original, "{case}");
        let reloaded = load(&out);
        assert_eq!(reloaded.class_name(), class);
        let a = generate_case(&pipe, &r, case, eta);
        let b = generate_case(&reloaded, &r, case, eta);
        assert_eq!(max_abs(&a, &b), 0.0, "{case}");
        // seeded generation (no injected noise) is the same too
        let a = pipe
            .generate(GenerateOptions::new(1).steps(3).seed(9))
            .unwrap();
        let b = reloaded
            .generate(GenerateOptions::new(1).steps(3).seed(9))
            .unwrap();
        assert_eq!(max_abs(&a, &b), 0.0, "{case}");
    }
}

/// A model-repo folder (as google/ddpm-cifar10-32): config, weights and scheduler_config.json at
/// the root, no model_index.json.
fn model_repo_copy(dir: &Path, with_scheduler: bool) {
    let src = pipelines().join("ddpm");
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(src.join("unet").join(f), dir.join(f)).unwrap();
    }
    if with_scheduler {
        std::fs::copy(
            src.join("scheduler/scheduler_config.json"),
            dir.join("scheduler_config.json"),
        )
        .unwrap();
    }
}

#[test]
fn model_repo_layout_and_missing_scheduler() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    model_repo_copy(dir.path(), true);
    let pipe = load(dir.path());
    assert_eq!(pipe.class_name(), "DDPMPipeline");
    let ours = generate_case(&pipe, &r, "ddpm", 0.0);
    assert!(max_abs(&ours, &r["ddpm.images"]) < 1e-5);

    let bare = tempfile::tempdir().unwrap();
    model_repo_copy(bare.path(), false);
    let e = DdpmPipeline::from_pretrained(bare.path().to_str().unwrap(), &Device::Cpu, DType::F32)
        .unwrap_err();
    assert!(matches!(e, Error::MissingScheduler { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("scheduler_config.json")
            && msg.contains("scheduler/scheduler_config.json")
            && msg.contains("from_parts"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));

    // the caller supplies the scheduler
    let unet = ddpm_unet::load_dir(bare.path(), &Device::Cpu, DType::F32).unwrap();
    let config =
        SchedulerConfig::from_file(pipelines().join("ddpm/scheduler/scheduler_config.json"))
            .unwrap();
    let pipe = DdpmPipeline::from_parts(unet, Sampler::from_config(&config, &Device::Cpu).unwrap());
    assert_eq!(max_abs(&generate_case(&pipe, &r, "ddpm", 0.0), &ours), 0.0);
}

#[test]
fn model_index_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p");
    load(&pipelines().join("ddpm"))
        .save_pretrained(&out)
        .unwrap();
    let index = out.join("model_index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    for (from, to, field) in [
        ("DDPMPipeline", "StableDiffusionPipeline", "_class_name"),
        (
            "\"DDPMScheduler\"",
            "\"EulerDiscreteScheduler\"",
            "scheduler",
        ),
        ("\"UNet2DModel\"", "\"UNet2DConditionModel\"", "unet"),
    ] {
        std::fs::write(&index, text.replace(from, to)).unwrap();
        let e = DdpmPipeline::from_pretrained(out.to_str().unwrap(), &Device::Cpu, DType::F32)
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("model_index.json") && msg.contains(&format!("`{field}`")),
            "{msg}"
        );
    }
    // DDIMPipeline samples with DDIM whatever the scheduler's class, as diffusers converts it
    std::fs::write(&index, text.replace("DDPMPipeline", "DDIMPipeline")).unwrap();
    assert_eq!(load(&out).class_name(), "DDIMPipeline");
    std::fs::write(&index, &text).unwrap();
    std::fs::remove_file(out.join("scheduler/scheduler_config.json")).unwrap();
    let e =
        DdpmPipeline::from_pretrained(out.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap_err();
    assert!(matches!(e, Error::MissingScheduler { .. }), "{e}");
}

#[test]
fn options_are_checked_and_seeds_repeat() {
    let ddpm = load(&pipelines().join("ddpm"));
    let ddim = load(&pipelines().join("ddim-alpha-true"));
    let a = ddim
        .generate(GenerateOptions::new(3).steps(4).seed(5).eta(0.5))
        .unwrap();
    let b = ddim
        .generate(GenerateOptions::new(3).steps(4).seed(5).eta(0.5))
        .unwrap();
    let c = ddim
        .generate(GenerateOptions::new(3).steps(4).seed(6).eta(0.5))
        .unwrap();
    assert_eq!(a.dims(), [3, 3, 8, 8]);
    assert_eq!(max_abs(&a, &b), 0.0);
    assert!(max_abs(&a, &c) > 0.01);
    let (lo, hi): (f32, f32) = (
        a.min_all().unwrap().to_scalar().unwrap(),
        a.max_all().unwrap().to_scalar().unwrap(),
    );
    assert!(lo >= 0.0 && hi <= 1.0);
    let err = |p: &DdpmPipeline, o: GenerateOptions| p.generate(o).unwrap_err().to_string();
    assert!(err(&ddpm, GenerateOptions::new(1).steps(2).eta(1.0)).contains("eta"));
    assert!(err(&ddpm, GenerateOptions::new(1).steps(0)).contains("steps"));
    assert!(err(&ddpm, GenerateOptions::new(0).steps(2)).contains("num_images"));
    let z = Tensor::zeros((2, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(err(&ddpm, GenerateOptions::new(1).steps(2).noise(z.clone())).contains("noise"));
    assert!(err(
        &ddpm,
        GenerateOptions::new(2)
            .steps(2)
            .noise(z.clone())
            .step_noise(z)
    )
    .contains("step_noise"));
}
