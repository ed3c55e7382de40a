//! A seeded, saveable source of randomness.
//!
//! candle cannot seed its CPU generator (`Device::set_seed` errors on CPU), so every random draw in
//! this project comes from a [`NoiseRng`] owned by the caller: the same seed gives the same noise on
//! every device, a training run can save and restore the generator's state to resume bit for bit, and
//! a test can replace the noise entirely.

use candle_core::{DType, Device, Shape, Tensor};

/// xoshiro256++ pseudo-random generator (Blackman and Vigna) with Box-Muller normals.
///
/// The whole state is four `u64`s, so it is saved in checkpoints with [`NoiseRng::state`] and
/// restored with [`NoiseRng::from_state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoiseRng {
    s: [u64; 4],
}

/// splitmix64's increment: its state after k outputs is seed + k GAMMA.
pub const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64: advances the state `x` by [`SPLITMIX_GAMMA`] and returns its output. Expands a seed into
/// the generator's 256-bit state; ddpm-unet's dropout masks run it in counter mode (its `ops/dropout.rs`).
pub fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(SPLITMIX_GAMMA);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl NoiseRng {
    /// A generator seeded from `seed`; the same seed always gives the same stream.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let s = [splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x)];
        Self { s }
    }

    /// Restores a generator from [`NoiseRng::state`]. An all-zero state (never produced by
    /// [`NoiseRng::new`]) would be stuck at zero, so it is replaced by the state of seed 0.
    pub fn from_state(s: [u64; 4]) -> Self {
        if s == [0; 4] {
            return Self::new(0);
        }
        Self { s }
    }

    /// The generator's full state, to be saved and given back to [`NoiseRng::from_state`].
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    /// The next 64 random bits (xoshiro256++).
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform draw in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in [0, n), without modulo bias (Lemire's method). `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "NoiseRng::below needs n > 0");
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// `n` standard-normal draws by the Box-Muller transform:
    /// z0 = sqrt(-2 ln u1) cos(2 pi u2), z1 = sqrt(-2 ln u1) sin(2 pi u2).
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            // 1 - u lies in (0, 1], so the logarithm is finite.
            let u1 = 1.0 - self.uniform();
            let u2 = self.uniform();
            let r = (-2.0 * u1.ln()).sqrt();
            let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
            out.push((r * c) as f32);
            out.push((r * s) as f32);
        }
        out.truncate(n);
        out
    }

    /// A tensor of standard-normal draws of the given shape, dtype and device (drawn in f32 on the
    /// host, copied by [`crate::ops::upload`], then cast on the device).
    pub fn randn<S: Into<Shape>>(&mut self, shape: S, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        let v = self.normal_vec(shape.elem_count());
        crate::ops::upload(v, shape, device)?.to_dtype(dtype)
    }

    /// `n` integers drawn uniformly from [0, high), as an i64 tensor on `device` (training timesteps).
    pub fn randint(&mut self, n: usize, high: usize, device: &Device) -> candle_core::Result<Tensor> {
        Ok(self.timesteps(n, high, device)?.1)
    }

    /// [`Self::randint`]'s draws both on the host and as the i64 tensor on `device` (the same draws):
    /// training timesteps whose per-sample coefficients the host looks up without reading the tensor
    /// back from the device (which would wait for the device's queued work).
    pub fn timesteps(&mut self, n: usize, high: usize, device: &Device) -> candle_core::Result<(Vec<usize>, Tensor)> {
        if high == 0 {
            return Err(candle_core::Error::Msg("randint needs high > 0".into()));
        }
        let host: Vec<usize> = (0..n).map(|_| self.below(high as u64) as usize).collect();
        let t = crate::ops::upload(host.iter().map(|&v| v as i64).collect::<Vec<i64>>(), n, device)?;
        Ok((host, t))
    }
}
