//! Loading a UNet from a model folder (diffusers layout) and saving one, with strict key checking.
//!
//! A model folder holds `config.json` and `diffusion_pytorch_model.safetensors` (preferred,
//! memory-mapped) or the pickled `diffusion_pytorch_model.bin` (read by [`crate::torch_pickle`],
//! a bounded reader that executes no code). A pipeline folder keeps them in `unet/` beside `model_index.json`, and
//! the scheduler in `scheduler/`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::config::UNetConfig;
use crate::error::{Error, Result};
use crate::unet::{expected_tensors, UNet2DModel};

/// File name of the UNet config.
pub const CONFIG_NAME: &str = "config.json";
/// File name of the safetensors weights.
pub const SAFETENSORS_NAME: &str = "diffusion_pytorch_model.safetensors";
/// File name of the pickled PyTorch weights of older repos.
pub const BIN_NAME: &str = "diffusion_pytorch_model.bin";
/// File name of the scheduler config.
pub const SCHEDULER_CONFIG_NAME: &str = "scheduler_config.json";

/// How a weights file is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    /// `.safetensors`, memory-mapped.
    SafeTensors,
    /// A pickled PyTorch state dict (`.bin`, `.pt`, `.pth`).
    PyTorch,
}

impl WeightsFormat {
    /// The format implied by a file name: `.safetensors`, else pickled PyTorch.
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => WeightsFormat::SafeTensors,
            _ => WeightsFormat::PyTorch,
        }
    }
}

/// The files of one model, as found in a folder or in the Hub cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The UNet's `config.json`.
    pub config: PathBuf,
    /// Its weights (`.safetensors` preferred, else `.bin`).
    pub weights: PathBuf,
    /// The DDPM scheduler's `scheduler_config.json` of the same model, when present.
    pub scheduler_config: Option<PathBuf>,
}

impl ModelFiles {
    /// The folder holding `config.json` and the weights.
    pub fn unet_dir(&self) -> &Path {
        self.config.parent().unwrap_or_else(|| Path::new("."))
    }
}

/// The weights file in `dir`: safetensors if present, else the `.bin`.
fn weights_in(dir: &Path) -> Option<PathBuf> {
    [SAFETENSORS_NAME, BIN_NAME]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

/// Finds the model files in a local folder, either laid out as a model repo (`config.json` and the
/// weights at the root, `scheduler_config.json` beside them or in `scheduler/`) or as a pipeline
/// (`unet/` and `scheduler/` subfolders). The root layout wins when both are complete.
pub fn find_model_files(dir: impl AsRef<Path>) -> Result<ModelFiles> {
    let dir = dir.as_ref();
    // a config without weights beside it, named in the error
    let mut lone_config = None;
    for unet_dir in [dir.to_path_buf(), dir.join("unet")] {
        let config = unet_dir.join(CONFIG_NAME);
        if !config.is_file() {
            continue;
        }
        lone_config.get_or_insert_with(|| config.clone());
        if let Some(weights) = weights_in(&unet_dir) {
            let scheduler_config = [
                dir.join(SCHEDULER_CONFIG_NAME),
                dir.join("scheduler").join(SCHEDULER_CONFIG_NAME),
            ]
            .into_iter()
            .find(|p| p.is_file());
            return Ok(ModelFiles {
                config,
                weights,
                scheduler_config,
            });
        }
    }
    let files = [CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME]
        .iter()
        .flat_map(|f| [f.to_string(), format!("unet/{f}")])
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::NotFound {
        what: dir.display().to_string(),
        files,
        places: dir.display().to_string(),
        reason: match lone_config {
            Some(c) => format!("; {} has no {SAFETENSORS_NAME} or {BIN_NAME} beside it", c.display()),
            None => String::new(),
        },
    })
}

/// Renames a legacy attention key to its current diffusers name:
/// `query` -> `to_q`, `key` -> `to_k`, `value` -> `to_v`, `proj_attn` -> `to_out.0`.
pub fn rename_legacy_key(key: &str) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    if !parts.contains(&"attentions") || parts.len() < 2 {
        return key.to_string();
    }
    // the module name is the second-to-last component (the last is weight/bias)
    let i = parts.len() - 2;
    let new = match parts[i] {
        "query" => "to_q",
        "key" => "to_k",
        "value" => "to_v",
        "proj_attn" => "to_out.0",
        _ => return key.to_string(),
    };
    let mut out: Vec<&str> = parts[..i].to_vec();
    out.push(new);
    out.extend_from_slice(&parts[i + 1..]);
    out.join(".")
}

/// Reads every tensor of a weights file onto `device` as `dtype`, renaming legacy attention keys.
/// Safetensors are memory-mapped; `.bin` files go through [`crate::torch_pickle`] (no code runs, and
/// what it allocates is bounded by the file's size).
pub fn read_weights(
    path: impl AsRef<Path>,
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    let werr = |e: candle_core::Error| Error::Weights {
        path: path.to_path_buf(),
        source: one_line(e),
    };
    if !path.is_file() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "weights file not found"),
        });
    }
    let raw: Vec<(String, Tensor)> = match WeightsFormat::from_path(path) {
        WeightsFormat::SafeTensors => {
            // SAFETY: the file is memory-mapped read-only; like every mmap reader we rely on it not
            // being truncated or rewritten by another process while we read it.
            let st =
                unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(werr)?;
            st.tensors()
                .into_iter()
                .map(|(name, view)| {
                    check_sizes(view.shape()).map_err(|e| {
                        werr(candle_core::Error::Msg(format!("tensor `{name}`: {e}")))
                    })?;
                    let t = candle_core::safetensors::Load::load(&view, device).map_err(werr)?;
                    Ok((name, t))
                })
                .collect::<Result<_>>()?
        }
        WeightsFormat::PyTorch => crate::torch_pickle::read_state_dict(path)?,
    };
    let mut out = HashMap::with_capacity(raw.len());
    for (name, t) in raw {
        let key = rename_legacy_key(&name);
        let t = t
            .to_device(device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(werr)?;
        if out.insert(key.clone(), t).is_some() {
            return Err(Error::DuplicateTensor {
                file: path.to_path_buf(),
                key,
            });
        }
    }
    Ok(out)
}

/// An error unless the product of the non-zero `sizes` fits in `usize`. safetensors checks the
/// product of all sizes, which an empty tensor (a size 0) keeps at 0 whatever the others; candle
/// then multiplies the sizes in other orders (element count, contiguous strides) and would overflow.
fn check_sizes(sizes: &[usize]) -> std::result::Result<(), String> {
    sizes
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .map(drop)
        .ok_or_else(|| format!("shape {sizes:?} overflows"))
}

/// `e` as a one-line message: without the backtrace candle attaches when `RUST_BACKTRACE` is set,
/// and with the line breaks of its context chains replaced by "; ".
fn one_line(e: candle_core::Error) -> candle_core::Error {
    fn message(e: &candle_core::Error) -> String {
        match e {
            candle_core::Error::WithBacktrace { inner, .. } => message(inner),
            candle_core::Error::WithPath { inner, path } => {
                format!("path: {path:?} {}", message(inner))
            }
            candle_core::Error::Context { inner, context } => {
                format!("{context}: {}", message(inner))
            }
            other => other.to_string().replace('\n', "; "),
        }
    }
    let msg = message(&e);
    if msg == e.to_string() {
        e
    } else {
        candle_core::Error::Msg(msg)
    }
}

/// Checks `tensors` against what `config` needs: every expected key present with the expected
/// shape and finite values (no NaN or infinity), and no extra key. `file` names the source in errors.
pub fn check_tensors(
    config: &UNetConfig,
    tensors: &HashMap<String, Tensor>,
    file: &Path,
) -> Result<()> {
    let expected = expected_tensors(config)?;
    for (key, shape) in &expected {
        match tensors.get(key) {
            None => {
                return Err(Error::MissingTensor {
                    file: file.into(),
                    key: key.clone(),
                    expected: shape.clone(),
                })
            }
            Some(t) if t.dims() != shape.as_slice() => {
                return Err(Error::ShapeMismatch {
                    file: file.into(),
                    key: key.clone(),
                    expected: shape.clone(),
                    found: t.dims().to_vec(),
                })
            }
            Some(t) => check_finite(t, key, file)?,
        }
    }
    let known: HashSet<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
    let mut extra: Vec<&String> = tensors
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .collect();
    extra.sort();
    if let Some(key) = extra.first() {
        let found = tensors
            .get(*key)
            .map(|t| t.dims().to_vec())
            .unwrap_or_default();
        return Err(Error::UnexpectedTensor {
            file: file.into(),
            key: (*key).clone(),
            found,
        });
    }
    Ok(())
}

/// An error naming `key` and `file` if tensor `t` holds a NaN or an infinity: such weights would load
/// and sample black images without a word. x - x is 0 for every finite x and NaN otherwise, so the
/// count of non-finite values is the count of x - x != 0 (one pass on the tensor's device).
fn check_finite(t: &Tensor, key: &str, file: &Path) -> Result<()> {
    let werr = |e: candle_core::Error| Error::Weights { path: file.into(), source: one_line(e) };
    // t.sub(t) rather than `t - t`, which reads as a mistake (clippy's eq_op)
    let bad = t
        .sub(t)
        .and_then(|d| d.ne(0f64))
        .and_then(|m| m.to_dtype(DType::F32))
        .and_then(|m| m.sum_all())
        .and_then(|n| n.to_scalar::<f32>())
        .map_err(werr)?;
    if bad > 0.0 {
        return Err(werr(candle_core::Error::Msg(format!(
            "tensor `{key}` holds {bad} NaN or infinite value(s); refusing to load it"
        ))));
    }
    Ok(())
}

/// Builds a model from a map of tensors after [`check_tensors`] (legacy names must already be
/// renamed, see [`rename_legacy_key`]). `file` names the source in errors.
pub fn from_tensors(
    config: &UNetConfig,
    tensors: HashMap<String, Tensor>,
    file: &Path,
    device: &Device,
    dtype: DType,
) -> Result<UNet2DModel> {
    check_tensors(config, &tensors, file)?;
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(device)?.to_dtype(dtype)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    UNet2DModel::new(config, VarBuilder::from_tensors(tensors, dtype, device))
}

/// Loads a model from an explicit `config.json` and weights file.
pub fn load_from_files(
    config_path: impl AsRef<Path>,
    weights_path: impl AsRef<Path>,
    device: &Device,
    dtype: DType,
) -> Result<UNet2DModel> {
    let config = UNetConfig::from_file(config_path)?;
    let weights_path = weights_path.as_ref();
    let tensors = read_weights(weights_path, device, dtype)?;
    from_tensors(&config, tensors, weights_path, device, dtype)
}

/// Loads a model from a local folder (model-repo or pipeline layout, see [`find_model_files`]).
pub fn load_dir(dir: impl AsRef<Path>, device: &Device, dtype: DType) -> Result<UNet2DModel> {
    let files = find_model_files(dir)?;
    load_from_files(&files.config, &files.weights, device, dtype)
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so that a
/// crash never leaves a half-written file under the final name.
fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::Io {
        path: path.into(),
        source: e,
    })
}

/// Writes a diffusers-loadable model folder: `dir/config.json` and
/// `dir/diffusion_pytorch_model.safetensors` (metadata `format: pt`, as diffusers writes), each
/// through a temporary name and a rename. The tensors are checked against `config` first.
pub fn save_pretrained(
    dir: impl AsRef<Path>,
    config: &UNetConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    let dir = dir.as_ref();
    let weights = dir.join(SAFETENSORS_NAME);
    check_tensors(config, tensors, &weights)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        path: dir.into(),
        source: e,
    })?;
    // contiguous CPU copies, so that serialisation cannot fail half way
    let mut cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    cpu.sort_by(|a, b| a.0.cmp(&b.0));
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    write_atomic(&weights, |tmp| {
        safetensors::serialize_to_file(cpu.iter().map(|(k, t)| (k.as_str(), t)), Some(meta), tmp)
            .map_err(|e| Error::Weights {
                path: tmp.into(),
                source: candle_core::Error::wrap(e),
            })
    })?;
    let config_path = dir.join(CONFIG_NAME);
    write_atomic(&config_path, |tmp| config.to_file(tmp))
}

/// [`save_pretrained`] for the variables of a [`VarMap`] (a model built with
/// `VarBuilder::from_varmap`).
pub fn save_varmap(dir: impl AsRef<Path>, config: &UNetConfig, varmap: &VarMap) -> Result<()> {
    let tensors: HashMap<String, Tensor> = {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    };
    save_pretrained(dir, config, &tensors)
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn candle_errors_become_one_line() {
        let bt = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("bad header".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        assert_eq!(one_line(bt).to_string(), "bad header");
        let ctx = candle_core::Error::Msg("inner".into()).context("while reading");
        assert!(ctx.to_string().contains('\n'));
        assert_eq!(one_line(ctx).to_string(), "while reading: inner");
        let plain = candle_core::Error::Msg("plain".into());
        assert!(matches!(one_line(plain), candle_core::Error::Msg(m) if m == "plain"));
    }
}
