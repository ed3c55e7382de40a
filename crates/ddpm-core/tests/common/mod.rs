//! Shared helpers for the ddpm-core tests: the diffusers fixtures, error measurement and closed forms.
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

/// The diffusers scheduler fixtures, copied into the project.
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/diffusers/scheduler.safetensors");

/// All fixture tensors, on the CPU, and the `cases` metadata.
pub struct Fixtures {
    pub tensors: HashMap<String, Tensor>,
    pub cases: serde_json::Map<String, serde_json::Value>,
}

/// The schedulers built from diffusers' saved scheduler_config.json files (one folder per case).
pub const SCHEDULER_CONFIGS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/diffusers/scheduler-configs");

impl Fixtures {
    pub fn load() -> Self {
        Self::load_file(FIXTURES)
    }

    /// The tensors and the `cases` metadata of a fixture safetensors file.
    pub fn load_file(path: &str) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors header");
        let cases = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("cases"))
            .expect("metadata key `cases`")
            .clone();
        let cases: serde_json::Value = serde_json::from_str(&cases).expect("cases JSON");
        let cases = cases.as_object().expect("cases is an object").clone();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).expect("load tensors");
        Self { tensors, cases }
    }

    pub fn get(&self, key: &str) -> &Tensor {
        self.tensors.get(key).unwrap_or_else(|| panic!("fixture {key} missing"))
    }

    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut k: Vec<String> = self.tensors.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
        k.sort();
        k
    }
}

/// Worst errors over a category: absolute, and scaled = abs / max(1, |ref|) (the tolerance metric).
#[derive(Debug, Default, Clone)]
pub struct ErrStats {
    pub max_abs: f64,
    pub max_scaled: f64,
    pub worst_case: String,
    pub count: usize,
}

/// Tolerance: |err| <= 1e-5 * max(1, |ref|).
pub const TOL: f64 = 1e-5;

impl ErrStats {
    /// Compares element by element and records the worst errors; returns the worst scaled error.
    pub fn compare(&mut self, case: &str, got: &[f64], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len(), "{case}: length");
        let mut worst = 0.0f64;
        for (g, w) in got.iter().zip(want) {
            let abs = (g - w).abs();
            let scaled = abs / w.abs().max(1.0);
            assert!(scaled.is_finite() || (g.is_nan() && w.is_nan()), "{case}: got {g}, want {w}");
            worst = worst.max(scaled);
            if abs > self.max_abs {
                self.max_abs = abs;
            }
            if scaled > self.max_scaled {
                self.max_scaled = scaled;
                self.worst_case = case.to_string();
            }
            self.count += 1;
        }
        worst
    }

    pub fn compare_tensors(&mut self, case: &str, got: &Tensor, want: &Tensor) -> f64 {
        assert_eq!(got.dims(), want.dims(), "{case}: shape");
        self.compare(case, &to_f64(got), &to_f64(want))
    }

    pub fn report(&self, category: &str) {
        eprintln!(
            "[{category}] {} values: worst abs err {:.3e}, worst abs/max(1,|ref|) {:.3e} (at {})",
            self.count, self.max_abs, self.max_scaled, self.worst_case
        );
    }

    pub fn assert_within(&self, category: &str) {
        assert!(
            self.max_scaled <= TOL,
            "[{category}] worst error {:.3e} exceeds {TOL:e} (at {})",
            self.max_scaled,
            self.worst_case
        );
    }
}

pub fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Host erf by its Maclaurin series (accurate to ~1e-15 for |x| < 3) or its asymptotic complement.
pub fn erf(x: f64) -> f64 {
    if x.abs() > 3.0 {
        // erfc(x) ~ exp(-x^2)/(x sqrt(pi)) (1 - 1/(2x^2) + 3/(4x^4) - 15/(8x^6))
        let a = x.abs();
        let x2 = a * a;
        let c = (-x2).exp() / (a * std::f64::consts::PI.sqrt())
            * (1.0 - 1.0 / (2.0 * x2) + 3.0 / (4.0 * x2 * x2) - 15.0 / (8.0 * x2 * x2 * x2));
        return x.signum() * (1.0 - c);
    }
    let mut sum = 0.0;
    let mut term = x; // x^(2n+1) (-1)^n / n!
    let mut n = 0usize;
    loop {
        let add = term / (2 * n + 1) as f64;
        sum += add;
        if add.abs() < 1e-17 {
            break;
        }
        n += 1;
        term *= -x * x / n as f64;
    }
    2.0 / std::f64::consts::PI.sqrt() * sum
}

/// Phi(x) = 0.5 (1 + erf(x / sqrt 2)).
pub fn phi(x: f64) -> f64 {
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
}
