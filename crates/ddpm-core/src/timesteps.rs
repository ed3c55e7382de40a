//! Inference timesteps: which of the T training timesteps a sampler with fewer steps visits.

use crate::config::TimestepSpacing;
use crate::error::{Error, Result};

/// The `n` inference timesteps, in descending order, that diffusers' `set_timesteps(n)` picks out
/// of `num_train_timesteps` = T training timesteps:
///
/// - `leading`: t_i = i * (T / n) (integer division) + `steps_offset`, i = n-1, ..., 0;
/// - `trailing`: t_i = round(T - i * T / n) - 1, i = 0, ..., n-1 (rounding half to even, as numpy);
/// - `linspace`: t_i = round(i * (T - 1) / (n - 1)), i = n-1, ..., 0.
///
/// diffusers' `trailing` goes through `np.arange(T, 0, -T/n)`, which for some n (61 of T = 1000, for
/// example) yields n + 1 values ending in -1; here it always yields exactly n.
///
/// Errors when `n` is 0, when `n` exceeds T, or when a timestep would fall outside [0, T).
pub fn inference_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    n: usize,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    let t_train = num_train_timesteps;
    if n == 0 {
        return Err(Error::arg("the number of inference steps must be at least 1"));
    }
    if n > t_train {
        return Err(Error::arg(format!(
            "{n} inference steps exceed num_train_timesteps {t_train}: the model cannot sample with more steps than it was trained on"
        )));
    }
    let ts: Vec<i64> = match spacing {
        TimestepSpacing::Leading => {
            // step_ratio = T // n; t_i = i * step_ratio + steps_offset
            let ratio = t_train / n;
            (0..n).rev().map(|i| (i * ratio + steps_offset) as i64).collect()
        }
        TimestepSpacing::Trailing => {
            // np.arange(T, 0, -T/n): x_i = T + i * delta, delta = (T - T/n) - T (as numpy fills it)
            let step = t_train as f64 / n as f64;
            let start = t_train as f64;
            let delta = (start - step) - start;
            // t_i = round(x_i) - 1
            (0..n).map(|i| (start + i as f64 * delta).round_ties_even() as i64 - 1).collect()
        }
        TimestepSpacing::Linspace => {
            // np.linspace(0, T - 1, n): y_i = i * ((T - 1) / (n - 1)), y_{n-1} = T - 1 exactly
            let stop = (t_train - 1) as f64;
            let mut y: Vec<f64> = if n > 1 {
                let step = stop / (n - 1) as f64;
                (0..n).map(|i| i as f64 * step).collect()
            } else {
                vec![0.0]
            };
            if n > 1 {
                y[n - 1] = stop;
            }
            y.iter().rev().map(|v| v.round_ties_even() as i64).collect()
        }
    };
    ts.iter()
        .map(|&t| {
            if t < 0 || t as usize >= t_train {
                Err(Error::arg(format!(
                    "{spacing} spacing with {n} steps and steps_offset {steps_offset} gives timestep {t}, outside [0, {t_train})"
                )))
            } else {
                Ok(t as usize)
            }
        })
        .collect()
}
