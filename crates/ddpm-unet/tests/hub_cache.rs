//! Loading by repo id from a Hub cache folder. The cache dir and offline flag are passed
//! explicitly (no process-global environment changes, except in the one test that checks the
//! env-reading wrapper; it is the only test in this binary that touches the environment).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ddpm_unet::hub::{from_pretrained_with, resolve_model_with, HubOptions};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/diffusers"
    ))
    .join(name)
}

const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

/// Builds `cache/models--owner--name/{refs/main, snapshots/HASH/<prefix>files}` from a fixture,
/// with the files in `blobs/` and symlinks from the snapshot where the platform allows.
fn make_cache(cache: &Path, owner: &str, name: &str, fixture_name: &str, prefix: &str) {
    let repo = cache.join(format!("models--{owner}--{name}"));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), HASH).unwrap();
    let snap = repo.join("snapshots").join(HASH);
    let blobs = repo.join("blobs");
    std::fs::create_dir_all(snap.join(prefix)).unwrap();
    std::fs::create_dir_all(&blobs).unwrap();
    let src = fixture(fixture_name);
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        let fname = entry.file_name().into_string().unwrap();
        if fname == "io.safetensors" {
            continue;
        }
        let dest_name = if fname == "scheduler_config.json" && !prefix.is_empty() {
            std::fs::create_dir_all(snap.join("scheduler")).unwrap();
            snap.join("scheduler").join(&fname)
        } else {
            snap.join(prefix).join(&fname)
        };
        let blob = blobs.join(format!("blob-{fname}"));
        std::fs::copy(entry.path(), &blob).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&blob, &dest_name).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&blob, &dest_name).unwrap();
    }
}

fn check_outputs(model: &ddpm_unet::UNet2DModel, fixture_name: &str) {
    let io =
        candle_core::safetensors::load(fixture(fixture_name).join("io.safetensors"), &Device::Cpu)
            .unwrap();
    let y = model.forward(&io["x"], &io["t"]).unwrap();
    let err: f32 = (y - &io["out"])
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(err <= 1e-4, "{err}");
}

#[test]
fn loads_root_layout_repo_from_cache_offline() {
    let cache = tempfile::tempdir().unwrap();
    make_cache(cache.path(), "google", "ddpm-test", "unet-mnist-small", "");
    let opts = HubOptions {
        cache_dir: cache.path().to_path_buf(),
        offline: true,
    };
    let files = resolve_model_with("google/ddpm-test", &opts).unwrap();
    assert!(files
        .config
        .ends_with(format!("snapshots/{HASH}/config.json")));
    assert!(files
        .weights
        .ends_with("diffusion_pytorch_model.safetensors"));
    assert!(files
        .scheduler_config
        .as_ref()
        .unwrap()
        .ends_with("scheduler_config.json"));
    let model = from_pretrained_with("google/ddpm-test", &Device::Cpu, DType::F32, &opts).unwrap();
    check_outputs(&model, "unet-mnist-small");
}

#[test]
fn loads_pipeline_layout_bin_from_cache_offline() {
    let cache = tempfile::tempdir().unwrap();
    make_cache(
        cache.path(),
        "someone",
        "ddpm-pipe",
        "unet-cifar10-layout-legacy-bin",
        "unet/",
    );
    let opts = HubOptions {
        cache_dir: cache.path().to_path_buf(),
        offline: true,
    };
    let files = resolve_model_with("someone/ddpm-pipe", &opts).unwrap();
    assert!(files.config.ends_with("unet/config.json"));
    assert!(files.weights.ends_with("unet/diffusion_pytorch_model.bin"));
    assert!(files
        .scheduler_config
        .as_ref()
        .unwrap()
        .ends_with("scheduler/scheduler_config.json"));
    let model = from_pretrained_with("someone/ddpm-pipe", &Device::Cpu, DType::F32, &opts).unwrap();
    check_outputs(&model, "unet-cifar10-layout-legacy-bin");
}

#[test]
fn uncached_repo_offline_lists_files_and_places() {
    let cache = tempfile::tempdir().unwrap();
    let opts = HubOptions {
        cache_dir: cache.path().to_path_buf(),
        offline: true,
    };
    let msg = from_pretrained_with("nobody/not-cached", &Device::Cpu, DType::F32, &opts)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("nobody/not-cached"), "{msg}");
    assert!(
        msg.contains("config.json")
            && msg.contains("diffusion_pytorch_model.safetensors")
            && msg.contains("diffusion_pytorch_model.bin"),
        "{msg}"
    );
    assert!(msg.contains("models--nobody--not-cached"), "{msg}");
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");
}

#[test]
fn local_dir_and_bad_ids() {
    let opts = HubOptions {
        cache_dir: PathBuf::from("/nonexistent-cache"),
        offline: true,
    };
    let dir = fixture("unet-mnist-small");
    let files = resolve_model_with(dir.to_str().unwrap(), &opts).unwrap();
    assert_eq!(files.config, dir.join("config.json"));
    assert_eq!(
        files.scheduler_config,
        Some(dir.join("scheduler_config.json"))
    );
    for bad in ["no-slash", "a/b/c", "/definitely/not/here", "../x"] {
        let e = resolve_model_with(bad, &opts).unwrap_err();
        assert!(e.to_string().contains(bad), "{e}");
    }
}

#[test]
fn env_wrapper_reads_hf_hub_cache_and_offline() {
    // The only test of this binary that changes the environment.
    let cache = tempfile::tempdir().unwrap();
    make_cache(cache.path(), "envowner", "envrepo", "unet-mnist-small", "");
    std::env::set_var("HF_HUB_CACHE", cache.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let opts = HubOptions::from_env();
    assert_eq!(opts.cache_dir, cache.path());
    assert!(opts.offline);
    let model = ddpm_unet::from_pretrained("envowner/envrepo", &Device::Cpu, DType::F32).unwrap();
    check_outputs(&model, "unet-mnist-small");
    let files = ddpm_unet::resolve_model("envowner/envrepo").unwrap();
    assert!(files.scheduler_config.is_some());
    let msg = ddpm_unet::from_pretrained("envowner/missing", &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("HF_HUB_OFFLINE") && msg.contains("models--envowner--missing"),
        "{msg}"
    );
    let _ = Tensor::zeros(1, DType::F32, &Device::Cpu);
}
