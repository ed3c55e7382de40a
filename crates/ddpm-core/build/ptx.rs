//! Compiling a CUDA source to PTX with nvcc, for the build scripts of ddpm-core and ddpm-unet (which
//! includes this file by path).

use std::path::Path;
use std::process::Command;

/// nvcc `source` -> PTX `out`, with `include` on the header path.
pub fn compile(source: &Path, include: &Path, out: &Path) {
    // "90" or "9.0"
    let cap: String = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".into()).chars().filter(char::is_ascii_digit).collect();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}")])
        .arg("-I")
        .arg(include)
        .arg("-o")
        .arg(out)
        .arg(source)
        .status();
    let source = source.display();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("`{nvcc}` failed to compile {source} ({s})"),
        Err(e) => panic!("could not run `{nvcc}` to compile {source} ({e}); put CUDA's bin/ on PATH or set NVCC"),
    }
}
