//! With the `cuda` feature, compiles the fused ops' CUDA kernels (`src/ops/cuda/kernels.cu`) to PTX
//! in OUT_DIR with nvcc (`NVCC`, else `nvcc` on PATH). The PTX targets `compute_$CUDA_COMPUTE_CAP`
//! (e.g. 90 for an H100/H200), or compute_75 when unset, which the driver compiles for any newer GPU.
//!
//! Always exports the folder of `common.cuh` (the block reductions) as `DEP_DDPM_CORE_CUDA_INCLUDE`
//! to the build scripts of crates that depend on this one (ddpm-unet's network kernels include it).

#[path = "build/ptx.rs"]
mod ptx;

use std::path::{Path, PathBuf};

const SOURCE: &str = "src/ops/cuda/kernels.cu";
const HEADER_DIR: &str = "src/ops/cuda";

fn main() {
    println!("cargo::rerun-if-changed={SOURCE}");
    println!("cargo::rerun-if-changed={HEADER_DIR}/common.cuh");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    println!("cargo::metadata=cuda_include={}", manifest.join(HEADER_DIR).display());
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("ddpm_kernels.ptx");
    ptx::compile(Path::new(SOURCE), &manifest.join(HEADER_DIR), &out);
}
