//! The `train_mnist` example's code path with a tiny UNet (dropout on) for 3 steps: training from the
//! libraries alone moves the weights, and a run resumed from its step-2 checkpoint ends bit for bit
//! where the uninterrupted run does (raw weights and EMA).

#[allow(dead_code)]
#[path = "../examples/train_mnist.rs"]
mod example;

use candle_core::Device;
use ddpm_unet::{DownBlockType, UNetConfig, UpBlockType};

#[test]
fn library_training_resumes_bit_exactly() {
    let config = UNetConfig {
        sample_size: Some(8),
        in_channels: 1,
        out_channels: 1,
        block_out_channels: vec![8, 8],
        down_block_types: vec![DownBlockType::DownBlock2D, DownBlockType::AttnDownBlock2D],
        up_block_types: vec![UpBlockType::AttnUpBlock2D, UpBlockType::UpBlock2D],
        layers_per_block: 1,
        attention_head_dim: Some(4),
        norm_num_groups: 4,
        dropout: 0.1,
        ..UNetConfig::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    let (losses, straight, resumed) = example::train_and_resume(&config, 3, 2, tmp.path(), &Device::Cpu).unwrap();
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");
    assert_eq!(straight.len(), resumed.len());
    assert!(straight.keys().any(|k| k.starts_with("ema.")));
    for (k, v) in &straight {
        assert!(v.iter().zip(&resumed[k]).all(|(a, b)| a.to_bits() == b.to_bits()), "`{k}` differs after resume");
    }
    // The checkpoint's model folder is a model folder the loader reads.
    let ck = tmp.path().join("checkpoints").join("step-000002");
    ddpm_unet::load_dir(ck.join("model"), &Device::Cpu, candle_core::DType::F32).unwrap();
}
