//! Throughput of the fused convolution (forward, and forward + backward) for the layer shapes of the
//! paper's CIFAR-10 UNet at batch 8 and of the `mnist-small` UNet at batch 64, and of their
//! upsamplers (nearest x2 + 3x3, "up"), in GFLOP/s of the direct convolution (2 flops per weight per
//! output position, whatever the algorithm does). The last column times the backward op alone
//! (`conv2d_backward`, outside candle's graph: the kernels without candle's gradient store around
//! them); the upsamplers have no such entry point ("-").
//!
//!   cargo bench -p ddpm-unet --bench conv            # RAYON_NUM_THREADS sets the threads
//!
//! The fastest of 15 timed runs after one warm-up run (on a shared machine the fastest run is the one
//! least disturbed by other work).

mod common;

use candle_core::{Device, Tensor, Var};
use ddpm_unet::ops::conv::{conv2d, conv2d_backward, upsample2x_conv2d};

use common::best_secs;

fn main() {
    println!("{:>30} {:>14} {:>18} {:>14}", "layer (C -> O, side, k)", "fwd GFLOP/s", "fwd+bwd GFLOP/s", "bwd op GFLOP/s");
    // (batch, in channels, out channels, side, kernel): the 3x3 and 1x1 convolutions at each resolution
    let cifar = [(8, 128, 128, 32, 3), (8, 256, 256, 16, 3), (8, 256, 256, 8, 3), (8, 256, 256, 4, 3), (8, 512, 256, 16, 1), (8, 256, 768, 16, 1)];
    let mnist = [(64, 32, 32, 28, 3), (64, 64, 32, 28, 3), (64, 64, 64, 14, 3), (64, 128, 64, 14, 3), (64, 64, 64, 7, 3), (64, 128, 64, 7, 3)];
    for (b, c, o, side, k) in cifar.into_iter().chain(mnist) {
        layer(b, c, o, side, k, false);
    }
    // the upsamplers, by their output side: CIFAR-10's 256 channels to 8, 16, 32; mnist-small's 64 to
    // 14, 28
    for (b, c, side) in [(8, 256, 8), (8, 256, 16), (8, 256, 32), (64, 64, 14), (64, 64, 28)] {
        layer(b, c, c, side, 3, true);
    }
}

/// Times one layer: batch b, c -> o channels, output side `side`, k x k kernel; with `up`, a nearest
/// x2 upsampling of a side / 2 input first.
fn layer(b: usize, c: usize, o: usize, side: usize, k: usize, up: bool) {
    let dev = Device::Cpu;
    let in_side = if up { side / 2 } else { side };
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (b, c, in_side, in_side), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.05, (o, c, k, k), &dev).unwrap()).unwrap();
    let bias = Var::from_tensor(&Tensor::zeros(o, candle_core::DType::F32, &dev).unwrap()).unwrap();
    let flops = 2.0 * (b * o * side * side * c * k * k) as f64;
    let run = || if up { upsample2x_conv2d(&x, &w, Some(&bias)).unwrap() } else { conv2d(&x, &w, Some(&bias), 1, k / 2).unwrap() };
    let fwd = best_secs(15, || {
        run();
    });
    // the backward is two products of the forward's size
    let both = best_secs(15, || {
        run().sum_all().unwrap().backward().unwrap();
    });
    // the backward op alone: dx and dW, two products of the forward's size
    let op = if up {
        "-".to_string()
    } else {
        let dy = run().ones_like().unwrap();
        let secs = best_secs(15, || {
            conv2d_backward(&x, &w, &dy, 1, k / 2).unwrap();
        });
        format!("{:.1}", 2.0 * flops / secs / 1e9)
    };
    let name = format!("b{b} {c} -> {o}, {}{side}x{side}, {k}x{k}", if up { "up " } else { "" });
    println!("{name:>30} {:>14.1} {:>18.1} {op:>14}", flops / fwd / 1e9, 3.0 * flops / both / 1e9);
}
