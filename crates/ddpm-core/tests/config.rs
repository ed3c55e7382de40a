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
