//! `ddpm train --data NAME` for a named dataset that is not under data/: its parquet files come from the
//! Hub cache, with the network forbidden. This binary sets process-wide environment variables, so it
//! holds a single test.

use ddpm_tests::{ddpm, ddpm_err};

#[test]
fn train_on_hub_datasets_from_the_cache_offline() {
    let cache = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hub_cache");
    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let tmp = tempfile::tempdir().unwrap();
    let rgb = tmp.path().join("rgb32.json");
    let cfg = serde_json::json!({
        "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "layers_per_block": 1, "norm_num_groups": 4
    });
    std::fs::write(&rgb, cfg.to_string()).unwrap();
    let gray = ddpm_tests::tiny_unet_config(tmp.path());
    let out = |n: &str| tmp.path().join(n).display().to_string();
    let train = |data: &str, cfg: &std::path::Path, o: &str| -> Vec<String> {
        let cfg = cfg.display().to_string();
        ["train", "--data", data, "--unet-config", &cfg, "--batch-size", "2", "--steps", "2", "--save-every", "2", "--sample-every", "0", "--num-samples", "0", "--device", "cpu", "--num-train-timesteps", "50", "--out", o]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let run = |v: Vec<String>| ddpm(&v.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    run(train("cifar10", &rgb, &out("c"))).unwrap();
    run(train("fashion-mnist", &gray, &out("f"))).unwrap();
    for run_dir in ["c", "f"] {
        let metrics = std::fs::read_to_string(tmp.path().join(run_dir).join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.lines().count(), 2, "{run_dir}");
    }
    // CIFAR-10 is 32x32 RGB: the 28x28 one-channel model is refused with the reason.
    let v = train("cifar10", &gray, &out("bad"));
    let e = ddpm_err(&v.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(e.contains("holds 32x32 images") && e.contains("sample_size is 28"), "{e}");
    // FID on fashion-mnist: its parquet `label` column trains the classifier (6 rows); the 3 test
    // images written as PNG files are the test split itself, at distance 0.
    let pngs = tmp.path().join("fashion-test");
    std::fs::create_dir(&pngs).unwrap();
    let test = ddpm_cli::data::load("fashion-mnist", ddpm_cli::data::Split::Test, 28, 1).unwrap();
    assert_eq!(test.labels, vec![0, 1, 2]);
    for i in 0..test.len {
        image::GrayImage::from_raw(28, 28, test.image(i).to_vec()).unwrap().save(pngs.join(format!("{i}.png"))).unwrap();
    }
    let args = ["eval", "--metric", "fid", "--data", "fashion-mnist", "--images", pngs.to_str().unwrap(), "--cache-dir", &out("cache"), "--device", "cpu"];
    let ddpm_cli::Cli::Eval(a) = ddpm_tests::parse(&args) else { panic!("not an eval command") };
    let report = ddpm_cli::eval::fid_report(&a).unwrap();
    assert_eq!(report["features"], "classifier");
    assert!(report["fid"].as_f64().unwrap() < 1e-3, "{report}");
}
