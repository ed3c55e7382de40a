//! With the `cuda` feature, compiles the fused ops' CUDA kernels (`src/ops/cuda/kernels.cu`) to PTX
//! in OUT_DIR with nvcc (`NVCC`, else `nvcc` on PATH). The PTX targets `compute_$CUDA_COMPUTE_CAP`
//! (e.g. 90 for an H100/H200), or compute_75 when unset, which the driver compiles for any newer GPU.

use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "src/ops/cuda/kernels.cu";

fn main() {
    println!("cargo::rerun-if-changed={SOURCE}");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("ddpm_kernels.ptx");
    // "90" or "9.0"
    let cap: String = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".into()).chars().filter(char::is_ascii_digit).collect();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "-o"])
        .arg(&out)
        .arg(SOURCE)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("ddpm-core: `{nvcc}` failed to compile {SOURCE} ({s})"),
        Err(e) => panic!("ddpm-core: could not run `{nvcc}` to compile {SOURCE} ({e}); put CUDA's bin/ on PATH or set NVCC"),
    }
}
