//! Parity with diffusers' UNet2DModel on the reference fixtures, plus loading and saving.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff as max_abs;
use ddpm_unet::{load_dir, UNet2DModel, UNetConfig};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/diffusers"
    ))
    .join(name)
}

fn io(name: &str) -> (Tensor, Tensor, Tensor) {
    let m = candle_core::safetensors::load(fixture(name).join("io.safetensors"), &Device::Cpu)
        .expect("io fixture");
    (m["x"].clone(), m["t"].clone(), m["out"].clone())
}

fn check_case(name: &str) -> f32 {
    let model = load_dir(fixture(name), &Device::Cpu, DType::F32).expect("load fixture model");
    let (x, t, out) = io(name);
    let y = model.forward(&x, &t).expect("forward");
    assert_eq!(y.dims(), out.dims());
    let err = max_abs(&y, &out);
    eprintln!("parity {name}: max abs error {err:e}");
    assert!(err <= 1e-4, "{name}: max abs error {err}");
    err
}

#[test]
fn parity_cifar10_layout() {
    check_case("unet-cifar10-layout");
}

#[test]
fn parity_mnist_small() {
    check_case("unet-mnist-small");
}

#[test]
fn parity_legacy_bin() {
    check_case("unet-cifar10-layout-legacy-bin");
}

#[test]
fn scalar_timestep_broadcasts() {
    let model = load_dir(fixture("unet-mnist-small"), &Device::Cpu, DType::F32).unwrap();
    let (x, _, _) = io("unet-mnist-small");
    let a = model
        .forward(&x, &Tensor::new(250i64, &Device::Cpu).unwrap())
        .unwrap();
    let b = model
        .forward(&x, &Tensor::new(&[250i64, 250, 250], &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(max_abs(&a, &b), 0.0);
}

#[test]
fn save_then_reload_gives_identical_outputs() {
    let model = load_dir(fixture("unet-mnist-small"), &Device::Cpu, DType::F32).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path()).unwrap();
    assert!(dir.path().join("config.json").is_file());
    assert!(dir
        .path()
        .join("diffusion_pytorch_model.safetensors")
        .is_file());
    let cfg_text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    assert!(cfg_text.contains("\"_class_name\": \"UNet2DModel\""));
    let reloaded = load_dir(dir.path(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(reloaded.config(), model.config());
    let (x, t, _) = io("unet-mnist-small");
    let a = model.forward(&x, &t).unwrap();
    let b = reloaded.forward(&x, &t).unwrap();
    assert_eq!(max_abs(&a, &b), 0.0);
}

#[test]
fn pipeline_layout_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let unet = dir.path().join("unet");
    let sched = dir.path().join("scheduler");
    std::fs::create_dir_all(&unet).unwrap();
    std::fs::create_dir_all(&sched).unwrap();
    let src = fixture("unet-cifar10-layout-legacy-bin");
    for f in ["config.json", "diffusion_pytorch_model.bin"] {
        std::fs::copy(src.join(f), unet.join(f)).unwrap();
    }
    std::fs::copy(
        src.join("scheduler_config.json"),
        sched.join("scheduler_config.json"),
    )
    .unwrap();
    std::fs::write(dir.path().join("model_index.json"), "{}").unwrap();
    let files = ddpm_unet::load::find_model_files(dir.path()).unwrap();
    assert_eq!(files.config, unet.join("config.json"));
    assert_eq!(
        files.scheduler_config,
        Some(sched.join("scheduler_config.json"))
    );
    let model = load_dir(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let (x, t, out) = io("unet-cifar10-layout-legacy-bin");
    assert!(max_abs(&model.forward(&x, &t).unwrap(), &out) <= 1e-4);
}

#[test]
fn f16_forward_runs_close_to_f32() {
    let model = load_dir(fixture("unet-mnist-small"), &Device::Cpu, DType::F16).unwrap();
    let (x, t, out) = io("unet-mnist-small");
    let y = model.forward(&x, &t).unwrap();
    assert_eq!(y.dtype(), DType::F32);
    let err = max_abs(&y, &out);
    eprintln!("f16 mnist-small max abs error {err:e}");
    assert!(err < 0.1, "{err}");
}

#[test]
fn model_reports_its_config_and_tensors() {
    let model = load_dir(fixture("unet-cifar10-layout"), &Device::Cpu, DType::F32).unwrap();
    let cfg: &UNetConfig = model.config();
    assert_eq!(cfg.block_out_channels, vec![32, 32, 32, 32]);
    assert_eq!(
        model.num_parameters(),
        ddpm_unet::count_parameters(cfg).unwrap()
    );
    assert!(model
        .named_tensors()
        .iter()
        .any(|(k, _)| k == "down_blocks.1.attentions.0.to_out.0.weight"));
    let _: &dyn ddpm_core::NoisePredictor = &model;
    let _ = UNet2DModel::new_trainable;
}
