//! `--device` and `--dtype` parsing.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// Picks the device named by `--device`: `auto` (CUDA, then Metal, when the build has them, else the
/// CPU), `cpu`, `cuda`, `cuda:N` or `metal`.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                Ok(ddpm_core::ops::cuda_device(0)?)
            } else if candle_core::utils::metal_is_available() {
                Ok(Device::new_metal(0)?)
            } else {
                Ok(Device::Cpu)
            }
        }
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                bail!("--device metal: this build has no Metal support; rebuild with `--features metal` on macOS");
            }
            Ok(Device::new_metal(0)?)
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map_err(|_| anyhow::anyhow!("--device {s}: expected cuda:N with N a GPU number"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this build has no CUDA support; rebuild with `--features cuda`");
            }
            Ok(ddpm_core::ops::cuda_device(ordinal)?)
        }
        other => bail!("--device {other}: expected auto, cpu, cuda, cuda:N or metal"),
    }
}

/// Parses `--dtype` (f32, f16, bf16) and checks that `device` supports it for convolutions.
pub fn parse_dtype(spec: &str, device: &Device) -> Result<DType> {
    let dtype = match spec {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("--dtype {other}: expected f32, f16 or bf16"),
    };
    if dtype == DType::BF16 && device.is_cpu() {
        bail!("--dtype bf16: candle's CPU convolutions do not support bf16; use f32 or f16 on the CPU, bf16 on CUDA");
    }
    Ok(dtype)
}

/// A short name of the device for logs.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}
