//! Seeded weight initialisation.
//!
//! candle's initialisers draw from its own generator, which cannot be seeded on the CPU. The training
//! command therefore overwrites every freshly built parameter with values drawn from a [`NoiseRng`], as
//! PyTorch initialises diffusers' layers: a weight of fan-in f (input channels x kernel area) is drawn from
//! U(-1/sqrt(f), 1/sqrt(f)) (kaiming_uniform with a = sqrt(5)), its bias likewise with the weight's
//! fan-in, and a normalisation layer (a 1-D weight) starts at scale 1 and shift 0.

use anyhow::Result;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use ddpm_core::NoiseRng;

/// Draws `n` values from U(-bound, bound).
fn uniform(rng: &mut NoiseRng, n: usize, bound: f64) -> Vec<f32> {
    (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect()
}

/// The fan-in of a weight of shape (out, in, k...): in x prod(k).
fn fan_in(dims: &[usize]) -> usize {
    dims.iter().skip(1).product::<usize>().max(1)
}

/// Re-initialises every variable of `varmap` from `rng`, in sorted name order so the result depends only
/// on the seed and the model's layout.
pub fn seeded_init(varmap: &VarMap, rng: &mut NoiseRng) -> Result<()> {
    let data = varmap.data().lock().map_err(|_| anyhow::anyhow!("variable map lock poisoned"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let values = if let Some(stem) = name.strip_suffix(".bias") {
            match data.get(&format!("{stem}.weight")).map(|w| w.dims().to_vec()) {
                Some(wd) if wd.len() >= 2 => uniform(rng, n, 1.0 / (fan_in(&wd) as f64).sqrt()),
                _ => vec![0.0; n],
            }
        } else if dims.len() >= 2 {
            uniform(rng, n, 1.0 / (fan_in(&dims) as f64).sqrt())
        } else {
            vec![1.0; n]
        };
        let t = Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?.to_device(var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::{Init, VarBuilder};

    #[test]
    fn init_follows_layer_kinds_and_seed() {
        let build = |seed| {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            vb.get_with_hints((4, 3, 3, 3), "conv.weight", Init::Const(9.)).unwrap();
            vb.get_with_hints(4, "conv.bias", Init::Const(9.)).unwrap();
            vb.get_with_hints(4, "norm.weight", Init::Const(9.)).unwrap();
            vb.get_with_hints(4, "norm.bias", Init::Const(9.)).unwrap();
            seeded_init(&vm, &mut NoiseRng::new(seed)).unwrap();
            let d = vm.data().lock().unwrap();
            let get = |k: &str| d[k].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (get("conv.weight"), get("conv.bias"), get("norm.weight"), get("norm.bias"))
        };
        let (w, b, nw, nb) = build(1);
        let bound = 1.0 / 27f32.sqrt();
        assert!(w.iter().chain(b.iter()).all(|v| v.abs() <= bound));
        assert!(w.iter().any(|v| v.abs() > bound / 2.0));
        assert_eq!(nw, vec![1.0; 4]);
        assert_eq!(nb, vec![0.0; 4]);
        assert_eq!(build(1).0, w);
        assert_ne!(build(2).0, w);
    }
}
