//! With the `cuda` feature, compiles the network's CUDA kernels (`src/ops/cuda/kernels.cu`) to PTX in
//! OUT_DIR with nvcc (`NVCC`, else `nvcc` on PATH), for `compute_$CUDA_COMPUTE_CAP` (compute_75 when
//! unset). The kernels include ddpm-core's `common.cuh`, whose folder ddpm-core's build script
//! exports as `DEP_DDPM_CORE_CUDA_INCLUDE`.

#[path = "../ddpm-core/build/ptx.rs"]
mod ptx;

use std::path::{Path, PathBuf};

const SOURCE: &str = "src/ops/cuda/kernels.cu";

fn main() {
    println!("cargo::rerun-if-changed={SOURCE}");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let include = PathBuf::from(std::env::var_os("DEP_DDPM_CORE_CUDA_INCLUDE").expect("ddpm-core's build script exports its CUDA header folder"));
    println!("cargo::rerun-if-changed={}", include.join("common.cuh").display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("ddpm_unet_kernels.ptx");
    ptx::compile(Path::new(SOURCE), &include, &out);
}
