//! Timing and the allocator shared by the benchmarks.

use std::time::Instant;

/// mimalloc, as in the `ddpm` binary: with glibc's allocator every large buffer is handed back to the
/// kernel on free and faulted back in (zeroed) on the next call, which would dominate the timings.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The fewest seconds of `runs` calls of `f` after one warm-up call (on a shared machine the fastest
/// run is the one least disturbed by other work).
pub fn best_secs(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
