//! Loading by Hub repo id: the local Hugging Face cache first, the network only when the files are
//! not cached and `HF_HUB_OFFLINE` is not set.
//!
//! Downloading needs the `hub` feature (on by default); without it a repo id resolves from the cache
//! only, and hf-hub is not compiled.
//!
//! hf-hub 1.0 asks the network first for a branch revision and reads no offline variable, so the
//! cache lookup (`models--owner--name/refs/main` -> `snapshots/<commit>/<file>`) is done here.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::error::{Error, Result};
#[cfg(feature = "hub")]
use crate::load::SCHEDULER_CONFIG_NAME;
use crate::load::{find_model_files, load_from_files, ModelFiles, BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME};
use crate::unet::UNet2DModel;

/// Where to look for cached files and whether the network may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The Hub cache folder (holding `models--owner--name/`).
    pub cache_dir: PathBuf,
    /// When true, never touch the network.
    pub offline: bool,
}

impl HubOptions {
    /// Options from the environment: [`hub_cache_dir`] and [`hub_offline`].
    pub fn from_env() -> Self {
        Self {
            cache_dir: hub_cache_dir(),
            offline: hub_offline(),
        }
    }
}

/// A non-empty environment variable.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The Hub cache folder, as huggingface_hub resolves it: `HF_HUB_CACHE`, else
/// `HUGGINGFACE_HUB_CACHE`, else `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(p) = env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")) {
        return PathBuf::from(p);
    }
    if let Some(home) = env("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    if let Some(xdg) = env("XDG_CACHE_HOME") {
        return PathBuf::from(xdg).join("huggingface").join("hub");
    }
    let home = env("HOME")
        .or_else(|| env("USERPROFILE"))
        .unwrap_or_else(|| ".".into());
    PathBuf::from(home)
        .join(".cache")
        .join("huggingface")
        .join("hub")
}

/// Whether `HF_HUB_OFFLINE` forbids the network (`1`, `true`, `yes` or `on`, any case).
pub fn hub_offline() -> bool {
    env("HF_HUB_OFFLINE")
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Splits `owner/name`, checking that it looks like a Hub repo id.
pub fn parse_repo_id(repo_id: &str) -> Result<(&str, &str)> {
    let ok_part = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match repo_id.split_once('/') {
        Some((owner, name)) if ok_part(owner) && ok_part(name) => Ok((owner, name)),
        _ => Err(Error::BadRepoId(repo_id.to_string())),
    }
}

/// The cache folder of a repo of kind `kind_plural` (`models`, `datasets`):
/// `cache_dir/KIND--owner--name`, as the Hub cache lays repos out.
pub fn cache_folder(cache_dir: &Path, kind_plural: &str, owner: &str, name: &str) -> PathBuf {
    cache_dir.join(format!("{kind_plural}--{owner}--{name}"))
}

/// The cache folder of a model repo: `cache_dir/models--owner--name`.
pub fn repo_cache_folder(cache_dir: &Path, owner: &str, name: &str) -> PathBuf {
    cache_folder(cache_dir, "models", owner, name)
}

/// A blocking hf-hub client that keeps its files in `cache_dir` (with the `hub` feature).
#[cfg(feature = "hub")]
pub fn client(cache_dir: &Path) -> std::result::Result<hf_hub::HFClientSync, String> {
    hf_hub::HFClient::builder()
        .cache_dir(cache_dir)
        .build_sync()
        .map_err(|e| e.to_string())
}

/// The files every lookup tries, relative to the repo root, for error messages.
fn looked_for() -> String {
    [CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME]
        .iter()
        .flat_map(|f| [f.to_string(), format!("unet/{f}")])
        .collect::<Vec<_>>()
        .join(", ")
}

/// Looks for a complete model (config and weights, root or `unet/` layout) of `owner/name` in the
/// Hub cache: first the snapshot that `refs/main` points to, then any other snapshot.
pub fn find_in_cache(cache_dir: &Path, owner: &str, name: &str) -> Option<ModelFiles> {
    let repo = repo_cache_folder(cache_dir, owner, name);
    let snapshots = repo.join("snapshots");
    let main = std::fs::read_to_string(repo.join("refs").join("main"))
        .ok()
        .map(|s| s.trim().to_string());
    if let Some(hash) = main.filter(|h| !h.is_empty() && !h.contains(['/', '\\'])) {
        if let Ok(files) = find_model_files(snapshots.join(hash)) {
            return Some(files);
        }
    }
    let mut others: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    others.sort();
    others.into_iter().find_map(|p| find_model_files(p).ok())
}

/// Downloads the model files of `owner/name` into `cache_dir` with hf-hub (root layout first, then
/// `unet/`; safetensors first, then `.bin`; the scheduler config when there is one).
#[cfg(feature = "hub")]
fn download(cache_dir: &Path, owner: &str, name: &str) -> std::result::Result<ModelFiles, String> {
    let repo = client(cache_dir)?.model(owner, name);
    let get = |f: &str| repo.download_file().filename(f).send();
    let mut errors = Vec::new();
    for prefix in ["", "unet/"] {
        let config = match get(&format!("{prefix}{CONFIG_NAME}")) {
            Ok(p) => p,
            Err(e) => {
                errors.push(format!("{prefix}{CONFIG_NAME}: {e}"));
                continue;
            }
        };
        let mut weights = None;
        for w in [SAFETENSORS_NAME, BIN_NAME] {
            match get(&format!("{prefix}{w}")) {
                Ok(p) => {
                    weights = Some(p);
                    break;
                }
                Err(e) => errors.push(format!("{prefix}{w}: {e}")),
            }
        }
        let Some(weights) = weights else { continue };
        // the scheduler sits beside a root-layout UNet or in `scheduler/`
        let mut candidates = vec![format!("scheduler/{SCHEDULER_CONFIG_NAME}")];
        if prefix.is_empty() {
            candidates.insert(0, SCHEDULER_CONFIG_NAME.to_string());
        }
        let scheduler_config = candidates.iter().find_map(|f| get(f).ok());
        return Ok(ModelFiles {
            config,
            weights,
            scheduler_config,
        });
    }
    Err(errors.join("; "))
}

/// Resolves `repo_id_or_dir` to model files: an existing local folder (model-repo or pipeline
/// layout), else a Hub repo id looked up in `opts.cache_dir`, else downloaded (unless
/// `opts.offline`). The result also names the model's `scheduler_config.json` when there is one.
pub fn resolve_model_with(repo_id_or_dir: &str, opts: &HubOptions) -> Result<ModelFiles> {
    let as_path = Path::new(repo_id_or_dir);
    if as_path.is_dir() {
        return find_model_files(as_path);
    }
    let (owner, name) = parse_repo_id(repo_id_or_dir)?;
    if let Some(files) = find_in_cache(&opts.cache_dir, owner, name) {
        return Ok(files);
    }
    let repo_dir = repo_cache_folder(&opts.cache_dir, owner, name);
    let places = format!("{} (Hub cache)", repo_dir.display());
    if opts.offline {
        return Err(Error::NotFound {
            what: repo_id_or_dir.to_string(),
            files: looked_for(),
            places,
            reason: "; not downloaded because HF_HUB_OFFLINE is set".into(),
        });
    }
    #[cfg(feature = "hub")]
    let downloaded = download(&opts.cache_dir, owner, name);
    #[cfg(not(feature = "hub"))]
    let downloaded: std::result::Result<ModelFiles, String> = Err("ddpm-unet was built without its `hub` feature".into());
    downloaded.map_err(|e| Error::NotFound {
        what: repo_id_or_dir.to_string(),
        files: looked_for(),
        places: format!("{places}, https://huggingface.co/{owner}/{name}"),
        reason: format!("; download failed: {e}"),
    })
}

/// [`resolve_model_with`] with [`HubOptions::from_env`].
pub fn resolve_model(repo_id_or_dir: &str) -> Result<ModelFiles> {
    resolve_model_with(repo_id_or_dir, &HubOptions::from_env())
}

/// Loads a UNet from a local folder or a Hub repo id (`owner/name`, e.g. `google/ddpm-cifar10-32`),
/// using the cache first (see [`resolve_model_with`]).
pub fn from_pretrained_with(
    repo_id_or_dir: &str,
    device: &Device,
    dtype: DType,
    opts: &HubOptions,
) -> Result<UNet2DModel> {
    let files = resolve_model_with(repo_id_or_dir, opts)?;
    load_from_files(&files.config, &files.weights, device, dtype)
}

/// [`from_pretrained_with`] with [`HubOptions::from_env`] (`HF_HUB_CACHE`, `HF_HOME`,
/// `HF_HUB_OFFLINE`, ...).
pub fn from_pretrained(repo_id_or_dir: &str, device: &Device, dtype: DType) -> Result<UNet2DModel> {
    from_pretrained_with(repo_id_or_dir, device, dtype, &HubOptions::from_env())
}
