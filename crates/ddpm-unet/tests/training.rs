//! Training a tiny UNet: the loss goes down and every parameter gets a gradient.

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use ddpm_core::NoiseRng;
use ddpm_unet::{DownBlockType, UNet2DModel, UNetConfig, UpBlockType};

fn tiny(dropout: f64) -> UNetConfig {
    UNetConfig {
        sample_size: Some(8),
        in_channels: 1,
        out_channels: 1,
        block_out_channels: vec![8, 8],
        down_block_types: vec![DownBlockType::DownBlock2D, DownBlockType::AttnDownBlock2D],
        up_block_types: vec![UpBlockType::AttnUpBlock2D, UpBlockType::UpBlock2D],
        layers_per_block: 1,
        attention_head_dim: Some(4),
        norm_num_groups: 4,
        dropout,
        ..UNetConfig::default()
    }
}

fn batch(rng: &mut NoiseRng, dev: &Device) -> (Tensor, Tensor, Tensor) {
    let x = rng.randn((4, 1, 8, 8), DType::F32, dev).unwrap();
    let t = Tensor::new(&[3i64, 100, 500, 999], dev).unwrap();
    // target: a fixed function of the input, learnable by the UNet
    let target = (x.clone() * 0.5).unwrap();
    (x, t, target)
}

#[test]
fn every_parameter_gets_a_gradient_and_the_loss_goes_down() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let cfg = tiny(0.1);
    let model = UNet2DModel::new_trainable(&cfg, &varmap, DType::F32, &dev).unwrap();
    let vars = varmap.all_vars();
    assert_eq!(vars.len(), model.named_tensors().len());
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: 3e-3,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = NoiseRng::new(0);
    let (x, t, target) = batch(&mut rng, &dev);

    let loss0 = model
        .forward(&x, &t)
        .unwrap()
        .sub(&target)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let loss0 = loss0.to_scalar::<f32>().unwrap();

    let pred = model.forward_train(&x, &t, &mut rng).unwrap();
    let loss = pred
        .sub(&target)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    for (name, tensor) in model.named_tensors() {
        let g = grads
            .get(tensor)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "zero or non-finite gradient for {name}: {norm}"
        );
    }
    opt.step(&grads).unwrap();
    for _ in 0..30 {
        let pred = model.forward_train(&x, &t, &mut rng).unwrap();
        let loss = pred
            .sub(&target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        opt.backward_step(&loss).unwrap();
    }
    let loss1 = model
        .forward(&x, &t)
        .unwrap()
        .sub(&target)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let loss1 = loss1.to_scalar::<f32>().unwrap();
    eprintln!("tiny training: loss {loss0} -> {loss1}");
    assert!(
        loss1 < 0.5 * loss0,
        "loss did not go down: {loss0} -> {loss1}"
    );

    // the model's named tensors follow the updates: saving and reloading gives the same outputs
    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path()).unwrap();
    let reloaded = ddpm_unet::load_dir(dir.path(), &dev, DType::F32).unwrap();
    let a = model.forward(&x, &t).unwrap();
    let b = reloaded.forward(&x, &t).unwrap();
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
    // and so does save_varmap
    let dir2 = tempfile::tempdir().unwrap();
    ddpm_unet::save_varmap(dir2.path(), &cfg, &varmap).unwrap();
    ddpm_unet::load_dir(dir2.path(), &dev, DType::F32).unwrap();
}

#[test]
fn dropout_is_reproducible_and_only_in_training() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = UNet2DModel::new_trainable(&tiny(0.5), &varmap, DType::F32, &dev).unwrap();
    let mut rng = NoiseRng::new(7);
    let (x, t, _) = batch(&mut rng, &dev);
    let diff = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let e1 = model.forward(&x, &t).unwrap();
    let e2 = model.forward(&x, &t).unwrap();
    assert_eq!(diff(&e1, &e2), 0.0);
    let a = model.forward_train(&x, &t, &mut NoiseRng::new(1)).unwrap();
    let b = model.forward_train(&x, &t, &mut NoiseRng::new(1)).unwrap();
    let c = model.forward_train(&x, &t, &mut NoiseRng::new(2)).unwrap();
    assert_eq!(diff(&a, &b), 0.0);
    assert!(diff(&a, &c) > 0.0);
    assert!(diff(&a, &e1) > 0.0);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = UNet2DModel::new_trainable(&tiny(0.0), &varmap, DType::F32, &dev).unwrap();
    let x = Tensor::zeros((2, 1, 7, 7), DType::F32, &dev).unwrap();
    let t = Tensor::new(&[1i64, 2], &dev).unwrap();
    assert!(model
        .forward(&x, &t)
        .unwrap_err()
        .to_string()
        .contains("multiple of 2"));
    let x = Tensor::zeros((2, 3, 8, 8), DType::F32, &dev).unwrap();
    assert!(model
        .forward(&x, &t)
        .unwrap_err()
        .to_string()
        .contains("channels"));
    let x = Tensor::zeros((2, 1, 8, 8), DType::F32, &dev).unwrap();
    let t3 = Tensor::new(&[1i64, 2, 3], &dev).unwrap();
    assert!(model
        .forward(&x, &t3)
        .unwrap_err()
        .to_string()
        .contains("timesteps"));
}

#[test]
fn presets_build_and_run_on_a_varmap() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<UNet2DModel>();
    let dev = Device::Cpu;
    for name in ["mnist-small", "labml"] {
        let cfg = ddpm_unet::preset(name).unwrap();
        let varmap = VarMap::new();
        let model = UNet2DModel::new_trainable(&cfg, &varmap, DType::F32, &dev).unwrap();
        assert_eq!(
            model.num_parameters(),
            ddpm_unet::count_parameters(&cfg).unwrap()
        );
        let s = cfg.sample_size.unwrap();
        let x = Tensor::zeros((1, cfg.in_channels, s, s), DType::F32, &dev).unwrap();
        let y = model
            .forward_train(
                &x,
                &Tensor::new(&[5u32], &dev).unwrap(),
                &mut NoiseRng::new(3),
            )
            .unwrap();
        assert_eq!(y.dims(), &[1, cfg.out_channels, s, s]);
    }
}

#[test]
fn mixed_precision_keeps_f32_weights_and_matches_f32_training() {
    // f32 master weights computing in f16 (bf16 convolutions need CUDA; the casts are the same): the
    // output within f16's rounding of the f32 model's, and every gradient back in f32, close to the
    // f32 model's gradient. The compute dtype changes the activations only.
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let f32_model = UNet2DModel::new_trainable(&tiny(0.0), &varmap, DType::F32, &dev).unwrap();
    let mixed = f32_model.clone().with_compute_dtype(DType::F16);
    assert_eq!((mixed.dtype(), mixed.compute_dtype()), (DType::F32, DType::F16));
    let mut rng = NoiseRng::new(3);
    let (x, t, target) = batch(&mut rng, &dev);
    let run = |m: &UNet2DModel| {
        let y = m.forward(&x, &t).unwrap();
        assert_eq!(y.dtype(), DType::F32, "the output comes back in the input's dtype");
        let loss = y.sub(&target).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<Tensor> = varmap.all_vars().iter().map(|v| grads.get(v.as_tensor()).expect("every weight gets a gradient").clone()).collect();
        (y, g)
    };
    let ((y32, g32), (y16, g16)) = (run(&f32_model), run(&mixed));
    let max_abs = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let rel = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-3);
    let dy = rel(&y16, &y32);
    assert!(dy < 2e-2 && dy > 0.0, "output differs by {dy} (0 would mean no f16 compute)");
    // each gradient against the largest: small gradients carry f16's absolute rounding
    let scale = g32.iter().map(max_abs).fold(0f32, f32::max);
    for (a, b) in g16.iter().zip(&g32) {
        assert_eq!(a.dtype(), DType::F32, "the gradient of an f32 weight is f32");
        let d = max_abs(&(a - b).unwrap()) / scale;
        assert!(d < 2e-2, "gradient differs by {d} of the largest gradient");
    }
}
