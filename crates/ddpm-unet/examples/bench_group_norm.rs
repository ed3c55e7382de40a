//! Times forward + backward of the fused group norm (with and without SiLU) against the composed
//! candle ops it replaces, on x (64, 32, 28, 28) with 8 groups.
//!
//! `cargo run --release -p ddpm-unet --example bench_group_norm`
//!
//! Every fwd+bwd here allocates several fresh 6.4 MB buffers. With glibc's default malloc these are
//! often mmapped and returned to the OS on free, so the page faults of touching them again dominate
//! and swing the timings (by 40 ms and more per step on a small VM). For the cost of the ops
//! themselves, run with the heap kept:
//! `MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 cargo run --release ...`

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use ddpm_unet::ops::{group_norm, group_norm_composed};

type GroupNormFn = fn(&Tensor, usize, &Tensor, &Tensor, f64, bool) -> candle_core::Result<Tensor>;

/// Fastest seconds (the least disturbed by other load) of (forward, forward + backward) over `iters` runs after one warm-up.
fn time(f: GroupNormFn, x: &Var, gamma: &Var, beta: &Var, r: &Tensor, silu: bool, iters: usize) -> candle_core::Result<(f64, f64)> {
    let mut fwd = Vec::new();
    let mut both = Vec::new();
    for i in 0..=iters {
        let t0 = Instant::now();
        let y = f(x, 8, gamma, beta, 1e-5, silu)?;
        let t1 = Instant::now();
        let grads = (y * r)?.sum_all()?.backward()?;
        let t2 = Instant::now();
        std::hint::black_box(grads.get(x));
        if i > 0 {
            fwd.push((t1 - t0).as_secs_f64());
            both.push((t2 - t0).as_secs_f64());
        }
    }
    let best = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[0]
    };
    Ok((best(&mut fwd), best(&mut both)))
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let shape = (64, 32, 28, 28);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev)?)?;
    let gamma = Var::from_tensor(&Tensor::randn(1f32, 0.1, 32, &dev)?)?;
    let beta = Var::from_tensor(&Tensor::randn(0f32, 0.1, 32, &dev)?)?;
    let r = Tensor::randn(0f32, 1., shape, &dev)?;
    let iters = 20;
    println!("x {shape:?}, 8 groups, {} rayon threads, best of {iters}", rayon::current_num_threads());
    println!("(fwd+bwd includes the loss y * r, its sum and their backward, the same for both)");
    // The loss alone (y = x): its cost is in every fwd+bwd figure below and is subtracted for the
    // "op only" speed-up.
    fn identity(x: &Tensor, _: usize, _: &Tensor, _: &Tensor, _: f64, _: bool) -> candle_core::Result<Tensor> {
        Ok(x.clone())
    }
    let (_, base) = time(identity, &x, &gamma, &beta, &r, false, iters)?;
    let (_, base2) = time(identity, &x, &gamma, &beta, &r, false, iters)?;
    let base = base.min(base2);
    println!("loss alone (y = x): fwd+bwd {:7.2} ms", base * 1e3);
    for silu in [false, true] {
        let (cf, cb) = time(group_norm_composed, &x, &gamma, &beta, &r, silu, iters)?;
        let (ff, fb) = time(group_norm, &x, &gamma, &beta, &r, silu, iters)?;
        println!(
            "silu {silu:5}: composed fwd {:7.2} ms, fwd+bwd {:7.2} ms | fused fwd {:7.2} ms, fwd+bwd {:7.2} ms | speed-up fwd {:.1}x, fwd+bwd {:.1}x, op only (minus loss) {}",
            cf * 1e3,
            cb * 1e3,
            ff * 1e3,
            fb * 1e3,
            cf / ff,
            cb / fb,
            // meaningless when page faults make the loss alone slower than the whole (see above)
            if base < fb { format!("{:.1}x", (cb - base) / (fb - base)) } else { "n/a".into() }
        );
    }
    Ok(())
}
