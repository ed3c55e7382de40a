//! Config parsing, defaults, validation and presets.

use ddpm_unet::{preset, DownBlockType, Error, UNetConfig, UpBlockType};

#[test]
fn missing_fields_take_unet2dmodel_defaults() {
    let cfg = UNetConfig::from_json_str(r#"{"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "some_unknown_field": 3}"#).unwrap();
    assert!(cfg.flip_sin_to_cos);
    assert_eq!(cfg.freq_shift, 0);
    assert_eq!(cfg.attention_head_dim, Some(8));
    assert_eq!(cfg.norm_eps, 1e-5);
    assert_eq!(cfg.downsample_padding, 1);
    assert_eq!(cfg.norm_num_groups, 32);
    assert_eq!(cfg.layers_per_block, 2);
    assert_eq!(cfg.in_channels, 3);
    assert_eq!(cfg.act_fn, "silu");
    assert_eq!(cfg.sample_size, None);
    assert_eq!(cfg.mid_block_scale_factor, 1.0);
    assert!(cfg.add_attention);
    assert_eq!(cfg.time_embed_dim(), 128);
    assert_eq!(cfg.size_divisor(), 2);
}

#[test]
fn explicit_null_head_dim_means_one_head() {
    let cfg = UNetConfig::from_json_str(r#"{"attention_head_dim": null, "block_out_channels": [32], "down_block_types": ["AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D"]}"#).unwrap();
    assert_eq!(cfg.attention_head_dim, None);
    assert_eq!(cfg.head_dim(32), 32);
    // and it round-trips as null
    let v = cfg.to_json_value();
    assert!(v["attention_head_dim"].is_null());
    assert_eq!(v["_class_name"], "UNet2DModel");
    assert_eq!(UNetConfig::from_json_value(&v).unwrap(), cfg);
}

#[test]
fn full_default_config_is_valid() {
    let cfg = UNetConfig::from_json_str("{}").unwrap();
    assert_eq!(cfg, UNetConfig::default());
    assert_eq!(cfg.down_block_types[1], DownBlockType::AttnDownBlock2D);
    assert_eq!(cfg.up_block_types[3], UpBlockType::UpBlock2D);
}

fn err_of(json: &str) -> String {
    match UNetConfig::from_json_str(json) {
        Ok(_) => panic!("expected an error for {json}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_block_type_is_an_error_naming_field_and_value() {
    let msg = err_of(
        r#"{"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}"#,
    );
    assert!(
        msg.contains("down_block_types") && msg.contains("CrossAttnDownBlock2D"),
        "{msg}"
    );
    let msg = err_of(
        r#"{"block_out_channels": [32], "down_block_types": ["DownBlock2D"], "up_block_types": ["SkipUpBlock2D"]}"#,
    );
    assert!(
        msg.contains("up_block_types") && msg.contains("SkipUpBlock2D"),
        "{msg}"
    );
}

#[test]
fn unsupported_values_are_errors_naming_the_field() {
    for (json, field, value) in [
        (r#"{"act_fn": "gelu"}"#, "act_fn", "gelu"),
        (
            r#"{"time_embedding_type": "fourier"}"#,
            "time_embedding_type",
            "fourier",
        ),
        (
            r#"{"resnet_time_scale_shift": "scale_shift"}"#,
            "resnet_time_scale_shift",
            "scale_shift",
        ),
        (
            r#"{"class_embed_type": "timestep"}"#,
            "class_embed_type",
            "timestep",
        ),
        (
            r#"{"downsample_type": "resnet"}"#,
            "downsample_type",
            "resnet",
        ),
        (r#"{"norm_num_groups": 5}"#, "block_out_channels", "224"),
        (r#"{"norm_num_groups": null}"#, "norm_num_groups", "null"),
        (r#"{"layers_per_block": "two"}"#, "layers_per_block", "two"),
        (r#"{"dropout": 1.5}"#, "dropout", "1.5"),
        (
            r#"{"block_out_channels": [32, 64]}"#,
            "down_block_types",
            "DownBlock2D",
        ),
    ] {
        let msg = err_of(json);
        assert!(msg.contains(field) && msg.contains(value), "{json}: {msg}");
    }
}

#[test]
fn from_file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    std::fs::write(&p, r#"{"act_fn": "relu"}"#).unwrap();
    let msg = UNetConfig::from_file(&p).unwrap_err().to_string();
    assert!(
        msg.contains("config.json") && msg.contains("act_fn") && msg.contains("relu"),
        "{msg}"
    );
    std::fs::write(&p, "{not json").unwrap();
    let msg = UNetConfig::from_file(&p).unwrap_err().to_string();
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn to_file_from_file_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    let cfg = preset("ddpm-cifar10").unwrap();
    cfg.to_file(&p).unwrap();
    assert_eq!(UNetConfig::from_file(&p).unwrap(), cfg);
}

#[test]
fn ddpm_cifar10_has_the_papers_parameter_count() {
    let cfg = preset("ddpm-cifar10").unwrap();
    assert_eq!(ddpm_unet::count_parameters(&cfg).unwrap(), 35_746_307);
    assert_eq!(cfg.size_divisor(), 8);
}

#[test]
fn cifar_preset_matches_the_fixture_layout() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/diffusers/unet-cifar10-layout/config.json"
    );
    let fixture = UNetConfig::from_file(path).unwrap();
    let mut p = preset("ddpm-cifar10").unwrap();
    p.block_out_channels = fixture.block_out_channels.clone();
    p.dropout = fixture.dropout;
    assert_eq!(p, fixture);
}

#[test]
fn all_presets_are_valid_and_unknown_names_list_the_known() {
    for name in ddpm_unet::PRESET_NAMES {
        let cfg = preset(name).unwrap();
        cfg.validate().unwrap();
        eprintln!(
            "preset {name}: {} parameters",
            ddpm_unet::count_parameters(&cfg).unwrap()
        );
    }
    assert_eq!(preset("mnist-small").unwrap().size_divisor(), 4);
    // mnist-fast is mnist-small narrowed to 24, 48, 64 channels
    let (fast, small) = (preset("mnist-fast").unwrap(), preset("mnist-small").unwrap());
    assert_eq!(fast.block_out_channels, [24, 48, 64]);
    assert_eq!(ddpm_unet::UNetConfig { block_out_channels: small.block_out_channels.clone(), ..fast }, small);
    let e = preset("nope").unwrap_err();
    assert!(matches!(e, Error::UnknownPreset { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("nope")
            && msg.contains("ddpm-cifar10")
            && msg.contains("labml")
            && msg.contains("mnist-small"),
        "{msg}"
    );
}

/// The error of reading `patch` over the mnist-small preset's config and listing its tensors (which
/// builds nothing), or `None` where both succeed.
fn size_error(patch: serde_json::Value) -> Option<String> {
    let mut v = preset("mnist-small").unwrap().to_json_value();
    for (k, x) in patch.as_object().unwrap() {
        v[k] = x.clone();
    }
    UNetConfig::from_json_value(&v).and_then(|c| ddpm_unet::expected_tensors(&c)).err().map(|e| e.to_string())
}

#[test]
fn size_bombs_are_refused_naming_the_field_before_any_allocation() {
    // issue 22's configs, each of which aborted the process (an allocation failure or a capacity
    // overflow) or ran until killed inside `expected_tensors`, `export` or `train --unet-config`
    let levels = preset("mnist-small").unwrap().block_out_channels.len();
    let mut wide = vec![32u64; levels];
    wide[0] = 16_000_000_000;
    for (patch, field) in [
        (serde_json::json!({ "block_out_channels": wide }), "block_out_channels"),
        (serde_json::json!({ "layers_per_block": 1_000_000_000_000u64 }), "layers_per_block"),
        (serde_json::json!({ "layers_per_block": 1e12 }), "layers_per_block"),
        (serde_json::json!({ "time_embedding_dim": 10_000_000_000_000u64 }), "time_embedding_dim"),
        (serde_json::json!({ "sample_size": 100_000 }), "sample_size"),
        (serde_json::json!({ "in_channels": 100_000_000 }), "in_channels"),
        // each entry allowed, the whole too large: 16 levels of 65536 channels and 64 blocks each
        (serde_json::json!({ "layers_per_block": 64, "block_out_channels": vec![65536; levels] }), "block_out_channels"),
    ] {
        let msg = size_error(patch.clone()).unwrap_or_else(|| panic!("{patch} was accepted"));
        assert!(msg.contains(field), "{patch}: {msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
    // the largest published DDPM layout (the 256x256 models, 114M parameters) is still accepted
    let church = size_error(serde_json::json!({
        "block_out_channels": [128, 128, 256, 256, 512, 512],
        "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
        "layers_per_block": 2, "sample_size": 256, "attention_head_dim": null
    }));
    assert_eq!(church, None);
}

