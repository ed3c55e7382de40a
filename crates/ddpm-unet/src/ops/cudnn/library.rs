//! Loading cuDNN at run time: the library names tried, the version check, the switches read from
//! the environment (`DDPM_CUDNN`, `DDPM_CUDNN_BENCHMARK`, `DDPM_CUDNN_DETERMINISTIC`), and the
//! process-wide loaded library.

use super::ffi::*;
use super::CudnnError;
use std::ffi::CStr;
use std::fmt;
use std::sync::OnceLock;

use libloading::Library;

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Library names tried, in order.
pub(super) const LIBRARY_NAMES: [&str; 2] = ["libcudnn.so.9", "libcudnn.so"];

/// A loaded cuDNN 9 with every entry point this module uses resolved.
pub struct CudnnLib {
    pub(super) api: Api,
    version: usize,
    name: &'static str,
    // Kept alive for as long as the function pointers in `api` are used, i.e. forever (the only
    // instance lives in a static).
    _lib: Library,
}

impl CudnnLib {
    /// `cudnnGetVersion()`: major * 10000 + minor * 100 + patch (e.g. 90100 for 9.1.0).
    pub fn version(&self) -> usize {
        self.version
    }

    /// The file name that was loaded (`libcudnn.so.9` or `libcudnn.so`).
    pub fn file_name(&self) -> &'static str {
        self.name
    }

    /// Tries each name in [`LIBRARY_NAMES`]; on failure returns the one-line reason.
    pub(super) fn open() -> Result<CudnnLib, String> {
        let mut reasons = Vec::new();
        let mut found = false;
        for name in LIBRARY_NAMES {
            // SAFETY: loading cuDNN runs its initialisers, which have no preconditions.
            let lib = match unsafe { Library::new(name) } {
                Ok(lib) => lib,
                Err(e) => {
                    // dlerror's text usually starts with the file name already.
                    let e = one_line(&e.to_string());
                    reasons.push(if e.starts_with(name) {
                        e
                    } else {
                        format!("{name}: {e}")
                    });
                    continue;
                }
            };
            found = true;
            // SAFETY: `lib` is a cuDNN; the declared signatures are cuDNN 9's, and the version is
            // checked right below before anything else is called.
            let api = match unsafe { Api::load(&lib) } {
                Ok(api) => api,
                Err(e) => {
                    reasons.push(format!("{name}: {}", one_line(&e)));
                    continue;
                }
            };
            // SAFETY: cudnnGetVersion takes no arguments and needs no GPU.
            let version = unsafe { (api.cudnnGetVersion)() };
            if !version_supported(version) {
                reasons.push(format!(
                    "{name}: version {}, need 9.x",
                    version_string(version)
                ));
                continue;
            }
            return Ok(CudnnLib {
                api,
                version,
                name,
                _lib: lib,
            });
        }
        let what = if found { "unusable" } else { "not found" };
        Err(format!(
            "ddpm: cuDNN {what} ({}); convolutions use the built-in CUDA kernels",
            reasons.join("; ")
        ))
    }

    /// cudnnGetErrorString's text for `status`.
    pub(super) fn error_string(&self, status: Status) -> String {
        // SAFETY: cudnnGetErrorString accepts any value and returns a static C string (or null).
        let text = unsafe { (self.api.cudnnGetErrorString)(status) };
        if text.is_null() {
            return format!("cuDNN status {}", status.0);
        }
        // SAFETY: non-null, NUL-terminated, static.
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    }

    /// Ok for CUDNN_STATUS_SUCCESS, otherwise an error naming `function` and `context`.
    pub(super) fn check(
        &self,
        status: Status,
        function: &str,
        context: &dyn fmt::Display,
    ) -> Result<(), CudnnError> {
        if status == Status::SUCCESS {
            return Ok(());
        }
        Err(CudnnError::new(format!(
            "{function} failed: {} (status {}) for {context}",
            self.error_string(status),
            status.0
        )))
    }
}

/// cuDNN 9.x only: the ABI above is checked against cuDNN 9, and cuDNN 8 encoded its version
/// differently (major * 1000 + ...), so 8.x reads as < 90000 here.
pub(super) fn version_supported(version: usize) -> bool {
    (90000..100000).contains(&version)
}

pub(super) fn version_string(version: usize) -> String {
    if version >= 10000 {
        format!(
            "{}.{}.{}",
            version / 10000,
            version / 100 % 100,
            version % 100
        )
    } else {
        format!(
            "{}.{}.{}",
            version / 1000,
            version / 100 % 10,
            version % 100
        )
    }
}

pub(super) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether a `DDPM_CUDNN` value turns cuDNN off (`0`, `false`, `off`, `no`; case-insensitive).
pub(super) fn disabled_by(value: Option<&str>) -> bool {
    matches!(
        value.map(|v| v.trim().to_ascii_lowercase()).as_deref(),
        Some("0" | "false" | "off" | "no")
    )
}

/// Whether a `DDPM_CUDNN_BENCHMARK` value turns benchmarking on (`1`, `true`, `on`, `yes`).
pub(super) fn enabled_by(value: Option<&str>) -> bool {
    matches!(
        value.map(|v| v.trim().to_ascii_lowercase()).as_deref(),
        Some("1" | "true" | "on" | "yes")
    )
}

/// The process-wide cuDNN, loaded on first use; `None` when it is unavailable or disabled.
///
/// The first call honours `DDPM_CUDNN=0` (returns `None` silently), otherwise tries
/// `libcudnn.so.9` then `libcudnn.so`, resolves every entry point this module uses and checks the
/// version is 9.x. On failure it prints one line to stderr, e.g.
/// `ddpm: cuDNN not found (libcudnn.so.9: ...); convolutions use the built-in CUDA kernels`,
/// and every later call returns `None` without retrying.
pub fn library() -> Option<&'static CudnnLib> {
    static LIB: OnceLock<Option<CudnnLib>> = OnceLock::new();
    LIB.get_or_init(|| {
        let env = std::env::var("DDPM_CUDNN").ok();
        if disabled_by(env.as_deref()) {
            return None;
        }
        match CudnnLib::open() {
            Ok(lib) => Some(lib),
            Err(message) => {
                eprintln!("{message}");
                None
            }
        }
    })
    .as_ref()
}

/// How [`plan`] picks each direction's algorithm.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum AlgoSearch {
    /// cuDNN's heuristics (the `cudnnGet*Algorithm_v7` calls; nothing runs on the GPU): the first
    /// qualifying algorithm in cuDNN's ranking. PyTorch does this with `benchmark=False`.
    Heuristic,
    /// Times every algorithm (the `cudnnFind*Algorithm` calls, which allocate their own buffers
    /// and block the host): the fastest qualifying one.
    Benchmark,
}

/// Whether only deterministic algorithms qualify: yes unless `DDPM_CUDNN_DETERMINISTIC=0` (or
/// `false`/`off`/`no`; read once). The non-deterministic ones (the backward passes' algorithms that
/// add partial sums with atomics, in whatever order the threads finish) are what PyTorch may pick
/// by default (`torch.backends.cudnn.deterministic = False`); with them a run is no longer
/// reproducible bit for bit, a resumed one included.
pub fn deterministic_only() -> bool {
    static ONLY: OnceLock<bool> = OnceLock::new();
    *ONLY.get_or_init(|| !disabled_by(std::env::var("DDPM_CUDNN_DETERMINISTIC").ok().as_deref()))
}

/// The search mode: [`AlgoSearch::Benchmark`] when `DDPM_CUDNN_BENCHMARK=1` (read once),
/// else [`AlgoSearch::Heuristic`].
pub fn algo_search() -> AlgoSearch {
    static MODE: OnceLock<AlgoSearch> = OnceLock::new();
    *MODE.get_or_init(|| {
        if enabled_by(std::env::var("DDPM_CUDNN_BENCHMARK").ok().as_deref()) {
            AlgoSearch::Benchmark
        } else {
            AlgoSearch::Heuristic
        }
    })
}
