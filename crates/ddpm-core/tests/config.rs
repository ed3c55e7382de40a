//! scheduler_config.json: diffusers' defaults for missing fields, errors that name the field.

use ddpm_core::{BetaSchedule, Error, PredictionType, SchedulerConfig, TimestepSpacing, VarianceType};

#[test]
fn missing_fields_take_diffusers_defaults_and_unknown_are_ignored() {
    // google/ddpm-cifar10-32's config (diffusers 0.1.1): most fields missing, an unknown one present.
    let c = SchedulerConfig::from_json_str(
        r#"{"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
            "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": true,
            "num_train_timesteps": 1000, "trained_betas": null, "variance_type": "fixed_large",
            "tensor_format": "pt", "timestep_values": null}"#,
    )
    .unwrap();
    assert_eq!(c.variance_type, VarianceType::FixedLarge);
    assert_eq!(c.prediction_type, PredictionType::Epsilon);
    assert_eq!(c.clip_sample_range, 1.0);
    assert_eq!(c.dynamic_thresholding_ratio, 0.995);
    assert_eq!(c.sample_max_value, 1.0);
    assert_eq!(c.timestep_spacing, TimestepSpacing::Leading);
    assert_eq!(c.steps_offset, 0);
    assert!(!c.thresholding && !c.rescale_betas_zero_snr);
    let empty = SchedulerConfig::from_json_str("{}").unwrap();
    assert_eq!(empty, SchedulerConfig::default());
    assert_eq!(empty.num_train_timesteps, 1000);
    assert_eq!(empty.beta_start, 0.0001);
    assert!(empty.clip_sample);
    // null means the default too
    let n = SchedulerConfig::from_json_str(r#"{"variance_type": null, "clip_sample": null}"#).unwrap();
    assert_eq!(n.variance_type, VarianceType::FixedSmall);
    assert!(n.clip_sample);
}

#[test]
fn round_trip_through_a_file_with_class_name() {
    let dir = std::env::temp_dir().join(format!("ddpm-core-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scheduler_config.json");
    let c = SchedulerConfig {
        beta_schedule: BetaSchedule::SquaredcosCapV2,
        prediction_type: PredictionType::VPrediction,
        trained_betas: None,
        ..Default::default()
    };
    c.to_file(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["_class_name"], "DDPMScheduler");
    assert!(v["_diffusers_version"].is_string());
    assert_eq!(v["beta_schedule"], "squaredcos_cap_v2");
    assert_eq!(v["prediction_type"], "v_prediction");
    assert_eq!(v["variance_type"], "fixed_small");
    assert!(v["trained_betas"].is_null());
    assert_eq!(SchedulerConfig::from_file(&path).unwrap(), c);
    // serde round trip as part of another struct
    let back: SchedulerConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    std::fs::remove_dir_all(&dir).ok();
}

fn field_of(json: &str) -> (String, String) {
    match SchedulerConfig::from_json_str(json) {
        Err(e @ Error::InvalidConfig { .. }) => {
            let Error::InvalidConfig { ref field, .. } = e else { unreachable!() };
            (field.clone(), e.to_string())
        }
        other => panic!("{json}: expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn bad_values_are_errors_naming_the_field() {
    for (json, field) in [
        (r#"{"beta_schedule": "cosine"}"#, "beta_schedule"),
        (r#"{"variance_type": "huge"}"#, "variance_type"),
        (r#"{"prediction_type": "noise"}"#, "prediction_type"),
        (r#"{"timestep_spacing": "even"}"#, "timestep_spacing"),
        (r#"{"num_train_timesteps": 0}"#, "num_train_timesteps"),
        (r#"{"num_train_timesteps": -5}"#, "num_train_timesteps"),
        (r#"{"num_train_timesteps": "many"}"#, "num_train_timesteps"),
        (r#"{"beta_start": 0.02, "beta_end": 0.01}"#, "beta_end"),
        (r#"{"beta_end": 1.5}"#, "beta_end"),
        (r#"{"beta_start": -0.1}"#, "beta_start"),
        (r#"{"clip_sample_range": 0}"#, "clip_sample_range"),
        (r#"{"clip_sample_range": -1.0}"#, "clip_sample_range"),
        (r#"{"dynamic_thresholding_ratio": 1.5}"#, "dynamic_thresholding_ratio"),
        (r#"{"sample_max_value": 0}"#, "sample_max_value"),
        (r#"{"steps_offset": 1000}"#, "steps_offset"),
        (r#"{"clip_sample": "yes"}"#, "clip_sample"),
        (r#"{"num_train_timesteps": 3, "trained_betas": [0.1, 0.2]}"#, "trained_betas"),
        (r#"{"num_train_timesteps": 2, "trained_betas": [0.1, 1.2]}"#, "trained_betas"),
        (r#"{"set_alpha_to_one": "false"}"#, "set_alpha_to_one"),
        // size bombs (issue 22): each allocated vectors of this length and aborted the process
        (r#"{"num_train_timesteps": 1000000000000}"#, "num_train_timesteps"),
        (r#"{"num_train_timesteps": 18446744073709551615}"#, "num_train_timesteps"),
        (r#"{"num_train_timesteps": 1e12}"#, "num_train_timesteps"),
    ] {
        let (f, msg) = field_of(json);
        assert_eq!(f, field, "{json}: {msg}");
        assert!(msg.contains(field), "{msg}");
        eprintln!("{json} -> {msg}");
    }
    // the squaredcos schedule ignores beta_start / beta_end
    SchedulerConfig::from_json_str(r#"{"beta_schedule": "squaredcos_cap_v2", "beta_start": 0.5, "beta_end": 0.1}"#).unwrap();
}

#[test]
fn file_errors_name_the_file_and_the_field() {
    let dir = std::env::temp_dir().join(format!("ddpm-core-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("scheduler_config.json");
    std::fs::write(&bad, r#"{"beta_schedule": "cosine"}"#).unwrap();
    let e = SchedulerConfig::from_file(&bad).unwrap_err().to_string();
    assert!(e.contains("scheduler_config.json") && e.contains("beta_schedule"), "{e}");
    std::fs::write(&bad, r#"{"beta_end": 0.00001}"#).unwrap();
    let e = SchedulerConfig::from_file(&bad).unwrap_err().to_string();
    assert!(e.contains("scheduler_config.json") && e.contains("beta_end"), "{e}");
    std::fs::write(&bad, r#"{"beta_end": 0.02"#).unwrap();
    let e = SchedulerConfig::from_file(&bad).unwrap_err().to_string();
    assert!(e.contains("scheduler_config.json"), "{e}");
    let e = SchedulerConfig::from_file(dir.join("missing.json")).unwrap_err().to_string();
    assert!(e.contains("missing.json"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

// ---- the scheduler class (`_class_name`), DDIM's fields, unknown fields

use candle_core::{Device, Tensor};
use ddpm_core::{Sampler, SchedulerClass, Scheduler, UnknownFields};

#[test]
fn class_name_picks_the_scheduler_and_ddim_fields_are_read() {
    let c = SchedulerConfig::from_json_str(
        r#"{"_class_name": "DDIMScheduler", "set_alpha_to_one": false, "steps_offset": 1,
            "timestep_spacing": "trailing", "clip_sample": false, "prediction_type": "v_prediction"}"#,
    )
    .unwrap();
    assert_eq!(c.class_name, SchedulerClass::Ddim);
    assert!(!c.set_alpha_to_one);
    assert_eq!((c.steps_offset, c.timestep_spacing, c.clip_sample), (1, TimestepSpacing::Trailing, false));
    let s = Sampler::from_config(&c, &Device::Cpu).unwrap();
    let Sampler::Ddim(d) = &s else { panic!("DDIMScheduler built {s:?}") };
    // alpha_bar after the last step: alpha_bar_0 = 1 - beta_0 = 0.9999, not 1
    assert!((d.final_alpha_cumprod() - 0.9999).abs() < 1e-12);
    assert_eq!(s.config(), &c);
    // no _class_name: DDPMScheduler, as diffusers' DDPMScheduler.from_config reads it
    let ddpm = SchedulerConfig::from_json_str(r#"{"set_alpha_to_one": false}"#).unwrap();
    assert_eq!(ddpm.class_name, SchedulerClass::Ddpm);
    assert!(matches!(Sampler::from_config(&ddpm, &Device::Cpu).unwrap(), Sampler::Ddpm(_)));
    assert_eq!(SchedulerConfig::for_class(SchedulerClass::Ddim).class_name.as_str(), "DDIMScheduler");
}

#[test]
fn unknown_fields_are_named_in_a_one_line_warning() {
    let v: serde_json::Value = serde_json::from_str(
        r#"{"_class_name": "DDIMScheduler", "_diffusers_version": "0.1.1", "_use_default_values": ["beta_end"],
            "tensor_format": "pt", "foo": 1, "variance_type": "fixed_large", "set_alpha_to_one": false}"#,
    )
    .unwrap();
    let (c, unknown) = SchedulerConfig::from_json_value_checked(&v).unwrap();
    assert_eq!(c.class_name, SchedulerClass::Ddim);
    // private fields and fields of another implemented class (variance_type) are not unknown
    assert_eq!(unknown.names, ["foo", "tensor_format"]);
    let w = unknown.warning().unwrap();
    assert!(!w.contains('\n') && w.contains("foo, tensor_format") && w.starts_with("warning: "), "{w}");
    // a config that diffusers wrote has none
    let clean = SchedulerConfig::for_class(SchedulerClass::Ddim).to_json_string().unwrap();
    let (_, none) = SchedulerConfig::from_json_value_checked(&serde_json::from_str(&clean).unwrap()).unwrap();
    assert!(none.is_empty() && none.warning().is_none());

    let dir = tempdir("unknown");
    let path = dir.join("scheduler_config.json");
    std::fs::write(&path, r#"{"_class_name": "DDPMScheduler", "timestep_values": null}"#).unwrap();
    let (_, unknown) = SchedulerConfig::from_file_checked(&path).unwrap();
    assert_eq!(unknown, UnknownFields { source: path.display().to_string(), names: vec!["timestep_values".into()] });
    let w = unknown.warning().unwrap();
    assert!(w.contains("scheduler_config.json") && w.contains("timestep_values"), "{w}");
    // the unchecked reader still accepts the file
    SchedulerConfig::from_file(&path).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn wrong_typed_or_unknown_class_fields_are_errors_naming_the_field() {
    for (json, field) in [
        (r#"{"_class_name": "DDIMScheduler", "set_alpha_to_one": "no"}"#, "set_alpha_to_one"),
        (r#"{"_class_name": "DDIMScheduler", "set_alpha_to_one": 0}"#, "set_alpha_to_one"),
        (r#"{"_class_name": "DDIMScheduler", "steps_offset": -1}"#, "steps_offset"),
        (r#"{"_class_name": "DDIMScheduler", "steps_offset": 1.5}"#, "steps_offset"),
        (r#"{"_class_name": "DDIMScheduler", "timestep_spacing": "uniform"}"#, "timestep_spacing"),
        (r#"{"_class_name": "DDIMScheduler", "clip_sample_range": "1"}"#, "clip_sample_range"),
        (r#"{"_class_name": 3}"#, "_class_name"),
        (r#"{"_class_name": "PNDMScheduler"}"#, "_class_name"),
        (r#"{"_class_name": "UniPCMultistepScheduler", "solver_order": 2}"#, "_class_name"),
    ] {
        let (f, msg) = field_of(json);
        assert_eq!(f, field, "{json}: {msg}");
        assert!(msg.contains(field) && !msg.contains('\n'), "{msg}");
        eprintln!("{json} -> {msg}");
    }
    // an unknown class names itself and the classes that are supported
    let (_, msg) = field_of(r#"{"_class_name": "PNDMScheduler"}"#);
    assert!(msg.contains("PNDMScheduler") && msg.contains("DDPMScheduler") && msg.contains("DDIMScheduler"), "{msg}");
    // from a file: the file and the field
    let dir = tempdir("badclass");
    let path = dir.join("scheduler_config.json");
    for (json, field) in [
        (r#"{"_class_name": "EulerDiscreteScheduler"}"#, "_class_name"),
        (r#"{"_class_name": "DDIMScheduler", "set_alpha_to_one": null, "steps_offset": "1"}"#, "steps_offset"),
    ] {
        std::fs::write(&path, json).unwrap();
        let e = SchedulerConfig::from_file_checked(&path).unwrap_err().to_string();
        assert!(e.contains("scheduler_config.json") && e.contains(field) && !e.contains('\n'), "{e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn save_load_round_trip_gives_the_same_numbers() {
    let dir = tempdir("ddim-round-trip");
    let path = dir.join("scheduler_config.json");
    let c = SchedulerConfig {
        class_name: SchedulerClass::Ddim,
        beta_schedule: BetaSchedule::ScaledLinear,
        beta_start: 0.00085,
        beta_end: 0.012,
        set_alpha_to_one: false,
        steps_offset: 1,
        clip_sample: false,
        prediction_type: PredictionType::VPrediction,
        timestep_spacing: TimestepSpacing::Trailing,
        rescale_betas_zero_snr: true,
        ..Default::default()
    };
    c.to_file(&path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    let mut want = vec!["_class_name", "_diffusers_version"];
    want.extend(SchedulerClass::Ddim.fields());
    assert_eq!(keys, want, "DDIMScheduler's fields, sorted, as save_config writes them");
    assert_eq!(v["_class_name"], "DDIMScheduler");
    assert_eq!(v["set_alpha_to_one"], false);
    assert!(v.get("variance_type").is_none(), "DDIMScheduler has no variance_type");
    let (back, unknown) = SchedulerConfig::from_file_checked(&path).unwrap();
    assert!(unknown.is_empty());
    assert_eq!(back, c);

    // the same numbers from the saved config as from the original
    let x = Tensor::arange(0f32, 32.0, &Device::Cpu).unwrap().affine(0.05, -0.8).unwrap().reshape((2, 1, 4, 4)).unwrap();
    let run = |config: &SchedulerConfig| -> (Vec<usize>, Vec<f32>) {
        let mut s = Sampler::from_config(config, &Device::Cpu).unwrap();
        s.set_timesteps(10).unwrap();
        let mut y = x.clone();
        for &t in s.timesteps() {
            let eps = y.affine(0.8, 1e-4 * t as f64).unwrap();
            y = s.step(&eps, t, &y, None).unwrap().prev_sample;
        }
        (s.timesteps().to_vec(), y.flatten_all().unwrap().to_vec1().unwrap())
    };
    assert_eq!(run(&back), run(&c));

    // a DDPMScheduler config keeps the keys it always had (no set_alpha_to_one)
    let ddpm = SchedulerConfig::default().to_json_string().unwrap();
    let v: serde_json::Value = serde_json::from_str(&ddpm).unwrap();
    assert_eq!(v["_class_name"], "DDPMScheduler");
    assert!(v.get("set_alpha_to_one").is_none() && v.get("variance_type").is_some());
    assert_eq!(v.as_object().unwrap().len(), 17);
    std::fs::remove_dir_all(&dir).ok();
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ddpm-core-config-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
