//! Strict loading: a missing, extra or wrongly shaped tensor is an error naming the key and shapes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ddpm_unet::load::{from_tensors, read_weights, rename_legacy_key};
use ddpm_unet::{Error, UNetConfig};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/diffusers"
    ))
    .join(name)
}

fn mnist() -> (UNetConfig, HashMap<String, Tensor>) {
    let dir = fixture("unet-mnist-small");
    let cfg = UNetConfig::from_file(dir.join("config.json")).unwrap();
    let ts = read_weights(
        dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    (cfg, ts)
}

fn load_err(cfg: &UNetConfig, ts: HashMap<String, Tensor>) -> Error {
    match from_tensors(
        cfg,
        ts,
        Path::new("weights.safetensors"),
        &Device::Cpu,
        DType::F32,
    ) {
        Ok(_) => panic!("expected a loading error"),
        Err(e) => e,
    }
}

#[test]
fn unmodified_map_loads() {
    let (cfg, ts) = mnist();
    from_tensors(&cfg, ts, Path::new("w"), &Device::Cpu, DType::F32).unwrap();
}

#[test]
fn missing_tensor_names_key_and_shape() {
    let (cfg, mut ts) = mnist();
    ts.remove("mid_block.attentions.0.to_k.weight").unwrap();
    let e = load_err(&cfg, ts);
    let msg = e.to_string();
    assert!(matches!(e, Error::MissingTensor { .. }), "{msg}");
    assert!(
        msg.contains("mid_block.attentions.0.to_k.weight")
            && msg.contains("[32, 32]")
            && msg.contains("weights.safetensors"),
        "{msg}"
    );
}

#[test]
fn extra_tensor_names_key_and_shape() {
    let (cfg, mut ts) = mnist();
    ts.insert(
        "down_blocks.0.extra.weight".into(),
        Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = load_err(&cfg, ts);
    let msg = e.to_string();
    assert!(matches!(e, Error::UnexpectedTensor { .. }), "{msg}");
    assert!(
        msg.contains("down_blocks.0.extra.weight") && msg.contains("[3, 5]"),
        "{msg}"
    );
}

#[test]
fn shape_mismatch_names_key_and_both_shapes() {
    let (cfg, mut ts) = mnist();
    ts.insert(
        "conv_in.weight".into(),
        Tensor::zeros((16, 3, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = load_err(&cfg, ts);
    let msg = e.to_string();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("conv_in.weight")
            && msg.contains("[16, 3, 3, 3]")
            && msg.contains("[16, 1, 3, 3]"),
        "{msg}"
    );
}

#[test]
fn config_not_matching_weights_is_reported() {
    let (mut cfg, ts) = mnist();
    cfg.layers_per_block = 2;
    let msg = load_err(&cfg, ts).to_string();
    assert!(msg.contains("resnets.1"), "{msg}");
}

#[test]
fn legacy_names_are_renamed() {
    assert_eq!(
        rename_legacy_key("mid_block.attentions.0.query.weight"),
        "mid_block.attentions.0.to_q.weight"
    );
    assert_eq!(
        rename_legacy_key("down_blocks.1.attentions.1.key.bias"),
        "down_blocks.1.attentions.1.to_k.bias"
    );
    assert_eq!(
        rename_legacy_key("up_blocks.2.attentions.0.value.weight"),
        "up_blocks.2.attentions.0.to_v.weight"
    );
    assert_eq!(
        rename_legacy_key("up_blocks.2.attentions.0.proj_attn.weight"),
        "up_blocks.2.attentions.0.to_out.0.weight"
    );
    assert_eq!(rename_legacy_key("conv_in.weight"), "conv_in.weight");
    assert_eq!(
        rename_legacy_key("up_blocks.2.attentions.0.to_q.weight"),
        "up_blocks.2.attentions.0.to_q.weight"
    );
    let ts = read_weights(
        fixture("unet-cifar10-layout-legacy-bin").join("diffusion_pytorch_model.bin"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert!(ts.contains_key("mid_block.attentions.0.to_out.0.weight"));
    assert!(!ts
        .keys()
        .any(|k| k.contains("proj_attn") || k.contains(".query.")));
}

#[test]
fn missing_and_truncated_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("diffusion_pytorch_model.safetensors");
    let msg = read_weights(&p, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
    let bytes =
        std::fs::read(fixture("unet-mnist-small").join("diffusion_pytorch_model.safetensors"))
            .unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let msg = read_weights(&p, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
    let b = dir.path().join("diffusion_pytorch_model.bin");
    std::fs::write(&b, b"not a pickle").unwrap();
    let msg = read_weights(&b, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("diffusion_pytorch_model.bin"), "{msg}");
}

#[test]
fn missing_folder_lists_files_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    let msg = ddpm_unet::load_dir(dir.path(), &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("config.json") && msg.contains("diffusion_pytorch_model.safetensors"),
        "{msg}"
    );
}

#[test]
fn nan_or_infinite_weights_are_refused_naming_the_tensor() {
    // issue 22, item 3: such weights loaded, sampled an all-black image and exited 0
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let (cfg, mut ts) = mnist();
        let key = "conv_in.bias";
        let t = &ts[key];
        let mut v = t.to_vec1::<f32>().unwrap();
        v[1] = bad;
        ts.insert(key.into(), Tensor::new(v, &Device::Cpu).unwrap());
        let msg = load_err(&cfg, ts).to_string();
        assert!(msg.contains("weights.safetensors") && msg.contains("`conv_in.bias`") && msg.contains("1 NaN or infinite"), "{bad}: {msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
}
