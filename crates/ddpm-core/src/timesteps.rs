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
    in_range(&ts, spacing, n, steps_offset, t_train)
}

/// The `n` inference timesteps, in descending order, that diffusers' DPMSolverMultistepScheduler
/// picks out of T = `num_train_timesteps` training timesteps, of which the first
/// `last_timestep` = L remain after `lambda_min_clipped` (L = T without clipping). Unlike
/// [`inference_timesteps`], these lay out n + 1 points and drop the one nearest t = 0:
///
/// - `linspace`: t_i = round(i (L - 1) / n), i = n, ..., 1 (t_n = L - 1; rounding half to even);
/// - `leading`: t_i = i (L // (n + 1)) + `steps_offset`, i = n, ..., 1;
/// - `trailing`: t_i = round(L - i T / n) - 1 for i = 0, 1, ... while L - i T / n > 0.
///
/// `trailing` may give fewer than n timesteps when L < T, as diffusers does; where diffusers'
/// `np.arange` runs one value past the end and yields timestep -1 (n = 61 of T = 1000, for
/// example), that value is dropped. Timesteps may repeat (linspace with n close to L); DPM-Solver
/// steps by position, not by value.
///
/// Errors when `n` is 0 or exceeds T, when L is 0 or above T, when `leading` has no room
/// (L // (n + 1) = 0), or when a timestep would fall outside [0, T).
pub fn dpm_solver_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    last_timestep: usize,
    n: usize,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    let (t_train, last) = (num_train_timesteps, last_timestep);
    if n == 0 {
        return Err(Error::arg("the number of inference steps must be at least 1"));
    }
    if n > t_train {
        return Err(Error::arg(format!(
            "{n} inference steps exceed num_train_timesteps {t_train}: the model cannot sample with more steps than it was trained on"
        )));
    }
    if last == 0 || last > t_train {
        return Err(Error::arg(format!(
            "no timestep left to sample: {last} of the {t_train} training timesteps remain after lambda_min_clipped"
        )));
    }
    let ts: Vec<i64> = match spacing {
        TimestepSpacing::Linspace => {
            // np.linspace(0, L - 1, n + 1): y_i = i * ((L - 1) / n), y_n = L - 1 exactly; keep i = n..1
            let stop = (last - 1) as f64;
            let step = stop / n as f64;
            (1..=n).rev().map(|i| if i == n { stop } else { i as f64 * step }.round_ties_even() as i64).collect()
        }
        TimestepSpacing::Leading => {
            // step_ratio = L // (n + 1); t_i = i * step_ratio + steps_offset, i = n..1
            let ratio = last / (n + 1);
            if ratio == 0 {
                return Err(Error::arg(format!(
                    "leading spacing with {n} steps needs more than {n} timesteps; only {last} remain"
                )));
            }
            (1..=n).rev().map(|i| (i * ratio + steps_offset) as i64).collect()
        }
        TimestepSpacing::Trailing => {
            // np.arange(L, 0, -T/n): len = ceil(L / (T/n)), x_i = L + i * delta, delta = (L - T/n) - L
            let step = t_train as f64 / n as f64;
            let start = last as f64;
            let len = (start / step).ceil() as usize;
            let delta = (start - step) - start;
            // t_i = round(x_i) - 1, without diffusers' stray -1
            (0..len).map(|i| (start + i as f64 * delta).round_ties_even() as i64 - 1).filter(|&t| t >= 0).collect()
        }
    };
    in_range(&ts, spacing, n, steps_offset, t_train)
}

/// The timesteps `ts` as indices, each checked to lie in [0, T); one out of range is an error naming
/// the spacing, the step count and `steps_offset` that produced it.
fn in_range(ts: &[i64], spacing: impl std::fmt::Display, n: usize, steps_offset: usize, t_train: usize) -> Result<Vec<usize>> {
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
