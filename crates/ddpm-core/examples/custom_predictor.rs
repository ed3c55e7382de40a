//! Plugging your own candle network into ddpm-core as a noise predictor, then sampling with DDIM.
//!
//! Run with `cargo run -p ddpm-core --example custom_predictor`. The network here is a tiny,
//! untrained conv net, so the "samples" are noise; the point is the wiring: implement
//! [`NoisePredictor`] (or pass a closure) and hand it to a sampler.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, VarBuilder, VarMap};
use ddpm_core::{sample_from_shape, training_loss, DdimScheduler, LossWeighting, NoisePredictor, NoiseRng, SchedulerConfig};

/// A two-layer conv net that gets the timestep as an extra input channel (t / T).
struct TinyNet {
    conv1: Conv2d,
    conv2: Conv2d,
    num_train_timesteps: f64,
}

impl TinyNet {
    fn new(vb: VarBuilder, channels: usize, num_train_timesteps: usize) -> candle_core::Result<Self> {
        let cfg = Conv2dConfig { padding: 1, ..Default::default() };
        Ok(Self {
            conv1: conv2d(channels + 1, 16, 3, cfg, vb.pp("conv1"))?,
            conv2: conv2d(16, channels, 3, cfg, vb.pp("conv2"))?,
            num_train_timesteps: num_train_timesteps as f64,
        })
    }
}

impl NoisePredictor for TinyNet {
    fn predict(&self, x_t: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        let (n, _c, h, w) = x_t.dims4()?;
        // t (N, i64) -> a constant channel t / T of shape (N, 1, H, W)
        let t = (t.to_dtype(x_t.dtype())? / self.num_train_timesteps)?
            .reshape((n, 1, 1, 1))?
            .broadcast_as((n, 1, h, w))?
            .contiguous()?;
        let x = Tensor::cat(&[x_t, &t], 1)?;
        self.conv2.forward(&self.conv1.forward(&x)?.silu()?)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::Cpu;
    let config = SchedulerConfig::default();

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let net = TinyNet::new(vb, 3, config.num_train_timesteps)?;

    // One training loss evaluation (algorithm 1 of the paper); `loss.backward()` feeds any optimizer.
    let schedule = ddpm_core::NoiseSchedule::new(&config, &device)?;
    let mut rng = NoiseRng::new(0);
    let x0 = (rng.randn((4, 3, 16, 16), DType::F32, &device)?.tanh())?;
    let out = training_loss(&net, &schedule, LossWeighting::None, &x0, &mut rng)?;
    let grads = out.loss.backward()?;
    println!("training loss {:.4}, {} gradients", out.loss.to_scalar::<f32>()?, varmap.all_vars().iter().filter(|v| grads.get(v).is_some()).count());

    // DDIM sampling in 25 deterministic steps.
    let mut ddim = DdimScheduler::new(&config, &device)?.with_eta(0.0)?;
    ddim.set_timesteps(25)?;
    let samples = sample_from_shape(&net, &ddim, (2, 3, 16, 16), DType::F32, &device, &mut rng, |i, t, x| {
        if i % 5 == 0 {
            let std = x.flatten_all().and_then(|v| v.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()).unwrap_or(f32::NAN);
            println!("step {i:2} (t = {t:3}): rms {std:.3}");
        }
    })?;
    println!("samples {:?}, range [{:.3}, {:.3}]", samples.dims(), samples.min_all()?.to_scalar::<f32>()?, samples.max_all()?.to_scalar::<f32>()?);

    // A closure works as a predictor too.
    let zero_noise = |x: &Tensor, _t: &Tensor| x.zeros_like();
    let s = sample_from_shape(&zero_noise, &ddim, (1, 1, 4, 4), DType::F32, &device, &mut rng, |_, _, _| {})?;
    println!("closure predictor: {:?}", s.dims());
    Ok(())
}
