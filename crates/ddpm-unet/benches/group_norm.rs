//! Throughput of the fused group norm + SiLU (forward, and forward + backward) for the activation
//! shapes of the `mnist-small` UNet at batch 64 and of the paper's CIFAR-10 UNet at batch 8, in
//! millions of elements of x per second.
//!
//!   cargo bench -p ddpm-unet --bench group_norm      # RAYON_NUM_THREADS sets the threads
//!
//! The fastest of 15 timed runs after one warm-up run.

mod common;

use candle_core::{Device, Tensor, Var};
use ddpm_unet::ops::group_norm::group_norm;

use common::best_secs;

fn main() {
    let dev = Device::Cpu;
    println!("{:>26} {:>12} {:>16}", "x (B, C, side), groups", "fwd Melem/s", "fwd+bwd Melem/s");
    // (batch, channels, side, groups)
    let shapes = [(64, 32, 28, 8), (64, 96, 28, 8), (64, 64, 14, 8), (64, 64, 7, 8), (8, 128, 32, 32), (8, 256, 16, 32)];
    for (b, c, side, groups) in shapes {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (b, c, side, side), &dev).unwrap()).unwrap();
        let gamma = Var::from_tensor(&Tensor::randn(1f32, 0.1, c, &dev).unwrap()).unwrap();
        let beta = Var::from_tensor(&Tensor::randn(0f32, 0.1, c, &dev).unwrap()).unwrap();
        let n = (b * c * side * side) as f64;
        let fwd = best_secs(15, || {
            group_norm(&x, groups, &gamma, &beta, 1e-5, true).unwrap();
        });
        // the loss sum(y r) hands the backward a dense output gradient r (sum(y)'s would be a
        // broadcast scalar, whose copy to a dense tensor costs more than the group norm)
        let r = Tensor::randn(0f32, 1., x.shape(), &dev).unwrap();
        let both = best_secs(15, || {
            let y = group_norm(&x, groups, &gamma, &beta, 1e-5, true).unwrap();
            (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        });
        let name = format!("({b}, {c}, {side}x{side}), {groups}");
        println!("{name:>26} {:>12.0} {:>16.0}", n / fwd / 1e6, n / both / 1e6);
    }
}
