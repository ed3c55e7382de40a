//! The fields of diffusers' `DPMSolverMultistepScheduler` config that the other classes lack: the
//! solver's order, algorithm and final steps, and the sigma schedules it could use instead of the
//! training timesteps (Karras, exponential, ...), which are refused here.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{read_field, BetaSchedule, SchedulerConfig, VarianceType};
use crate::error::{Error, Result};

config_enum!(
    /// What DPM-Solver integrates (`algorithm_type`): the data prediction x_0 (DPM-Solver++, Lu et
    /// al. 2022b) or the noise prediction epsilon (DPM-Solver, Lu et al. 2022a), as an ODE or an SDE.
    DpmAlgorithmType, "algorithm_type" {
        /// DPM-Solver: the exponential integrator of the noise prediction.
        DpmSolver => "dpmsolver",
        /// DPM-Solver++: the exponential integrator of the data prediction (diffusers' default).
        DpmSolverPlusPlus => "dpmsolver++",
        /// The SDE variant of DPM-Solver (adds noise at every step).
        SdeDpmSolver => "sde-dpmsolver",
        /// The SDE variant of DPM-Solver++ (adds noise at every step).
        SdeDpmSolverPlusPlus => "sde-dpmsolver++",
    }
);

impl DpmAlgorithmType {
    /// Whether the solver integrates the data prediction x_0 (the `++` variants) rather than epsilon.
    pub fn predicts_data(self) -> bool {
        matches!(self, DpmAlgorithmType::DpmSolverPlusPlus | DpmAlgorithmType::SdeDpmSolverPlusPlus)
    }

    /// Whether the step adds noise (the `sde-` variants).
    pub fn is_sde(self) -> bool {
        matches!(self, DpmAlgorithmType::SdeDpmSolver | DpmAlgorithmType::SdeDpmSolverPlusPlus)
    }
}

config_enum!(
    /// The second-order update of DPM-Solver (`solver_type`).
    DpmSolverType, "solver_type" {
        /// The midpoint form: D1 weighted by half the first-order coefficient (diffusers' default).
        Midpoint => "midpoint",
        /// The Heun form: D1 weighted by the exact integral of the linear term.
        Heun => "heun",
    }
);

config_enum!(
    /// The sigma after the last timestep (`final_sigmas_type`).
    FinalSigmasType, "final_sigmas_type" {
        /// sigma = 0: the last step lands on the predicted x_0 (diffusers' default).
        Zero => "zero",
        /// sigma of training timestep 0, sqrt((1 - alpha_bar_0) / alpha_bar_0).
        SigmaMin => "sigma_min",
    }
);

config_enum!(
    /// The time shift of the dynamic-shifting flow schedules (`time_shift_type`); read and written
    /// back only, since dynamic shifting is refused.
    TimeShiftType, "time_shift_type" {
        /// diffusers' only value.
        Exponential => "exponential",
    }
);

/// The fields of `DPMSolverMultistepScheduler.__init__` (diffusers 0.42), sorted.
pub(super) const DPM_SOLVER_FIELDS: &[&str] = &[
    "algorithm_type",
    "beta_end",
    "beta_schedule",
    "beta_start",
    "dynamic_thresholding_ratio",
    "euler_at_final",
    "final_sigmas_type",
    "flow_shift",
    "lambda_min_clipped",
    "lower_order_final",
    "num_train_timesteps",
    "prediction_type",
    "rescale_betas_zero_snr",
    "sample_max_value",
    "solver_order",
    "solver_type",
    "steps_offset",
    "thresholding",
    "time_shift_type",
    "timestep_spacing",
    "trained_betas",
    "use_beta_sigmas",
    "use_dynamic_shifting",
    "use_exponential_sigmas",
    "use_flow_sigmas",
    "use_karras_sigmas",
    "use_lu_lambdas",
    "variance_type",
];

/// The sigma schedules of diffusers' DPM-Solver that replace the training timesteps; each is
/// refused when true (this crate samples at training timesteps only).
const SIGMA_SCHEDULE_FLAGS: &[&str] = &[
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_flow_sigmas",
    "use_dynamic_shifting",
];

/// The `DPMSolverMultistepScheduler` fields of a [`SchedulerConfig`] (its `dpm_solver`), with
/// diffusers' defaults. Other classes ignore them.
#[derive(Debug, Clone, PartialEq)]
pub struct DpmSolverOptions {
    /// The order of the multistep solver, 1, 2 or 3 (default 2).
    pub solver_order: usize,
    /// DPM-Solver++ or DPM-Solver, ODE or SDE (default dpmsolver++; diffusers' legacy `deis` reads
    /// as dpmsolver++, as diffusers maps it).
    pub algorithm_type: DpmAlgorithmType,
    /// The second-order update (default midpoint; the legacy `logrho`, `bh1`, `bh2` read as
    /// midpoint, as diffusers maps them).
    pub solver_type: DpmSolverType,
    /// With fewer than 15 steps, the last step is first order and the one before at most second
    /// (default true).
    pub lower_order_final: bool,
    /// The last step is first order (Euler) whatever the number of steps (default false).
    pub euler_at_final: bool,
    /// The sigma after the last timestep (default zero; dpmsolver and sde-dpmsolver need sigma_min).
    pub final_sigmas_type: FinalSigmasType,
    /// Timesteps whose lambda = log(alpha_t / sigma_t) falls below this are not sampled (default
    /// -inf, written `-Infinity` as Python's json does).
    pub lambda_min_clipped: f64,
    /// Karras sigmas (default false; true is refused).
    pub use_karras_sigmas: bool,
    /// Exponential sigmas (default false; true is refused).
    pub use_exponential_sigmas: bool,
    /// Beta sigmas (default false; true is refused).
    pub use_beta_sigmas: bool,
    /// Lu's uniform-logSNR lambdas (default false; true is refused).
    pub use_lu_lambdas: bool,
    /// Flow-matching sigmas (default false; true is refused).
    pub use_flow_sigmas: bool,
    /// The shift of the flow sigmas (default 1.0; unused since flow sigmas are refused).
    pub flow_shift: f64,
    /// Dynamic shifting of the flow schedule (default false; true is refused).
    pub use_dynamic_shifting: bool,
    /// The time shift of dynamic shifting (default exponential; unused).
    pub time_shift_type: TimeShiftType,
}

impl Default for DpmSolverOptions {
    fn default() -> Self {
        Self {
            solver_order: 2,
            algorithm_type: DpmAlgorithmType::DpmSolverPlusPlus,
            solver_type: DpmSolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            final_sigmas_type: FinalSigmasType::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            use_dynamic_shifting: false,
            time_shift_type: TimeShiftType::Exponential,
        }
    }
}

/// A non-finite float as Python's json writes it (`-Infinity`, `Infinity`, `NaN`); [`super::json`]
/// turns those bare tokens into these strings before serde sees them.
fn non_finite_from_str(s: &str) -> Option<f64> {
    match s {
        "-Infinity" => Some(f64::NEG_INFINITY),
        "Infinity" => Some(f64::INFINITY),
        "NaN" => Some(f64::NAN),
        _ => None,
    }
}

/// The spelling of a non-finite float in Python's json, `None` for a finite one.
pub(super) fn non_finite_to_str(x: f64) -> Option<&'static str> {
    if x.is_nan() {
        Some("NaN")
    } else if x == f64::INFINITY {
        Some("Infinity")
    } else if x == f64::NEG_INFINITY {
        Some("-Infinity")
    } else {
        None
    }
}

impl DpmSolverOptions {
    /// Reads the DPM-Solver fields of a config object into `self` (missing or `null`: the default).
    pub(super) fn read(&mut self, map: &Map<String, Value>) -> Result<()> {
        read_field(map, "solver_order", &mut self.solver_order)?;
        // diffusers registers the legacy `deis` as dpmsolver++ and logrho / bh1 / bh2 as midpoint
        match map.get("algorithm_type") {
            Some(Value::String(s)) if s == "deis" => self.algorithm_type = DpmAlgorithmType::DpmSolverPlusPlus,
            _ => read_field(map, "algorithm_type", &mut self.algorithm_type)?,
        }
        match map.get("solver_type") {
            Some(Value::String(s)) if ["logrho", "bh1", "bh2"].contains(&s.as_str()) => self.solver_type = DpmSolverType::Midpoint,
            _ => read_field(map, "solver_type", &mut self.solver_type)?,
        }
        read_field(map, "lower_order_final", &mut self.lower_order_final)?;
        read_field(map, "euler_at_final", &mut self.euler_at_final)?;
        read_field(map, "final_sigmas_type", &mut self.final_sigmas_type)?;
        match map.get("lambda_min_clipped") {
            Some(Value::String(s)) => {
                self.lambda_min_clipped = non_finite_from_str(s).ok_or_else(|| {
                    Error::config("lambda_min_clipped", format!("expected a number or -Infinity, got the string `{s}`"))
                })?
            }
            _ => read_field(map, "lambda_min_clipped", &mut self.lambda_min_clipped)?,
        }
        read_field(map, "use_karras_sigmas", &mut self.use_karras_sigmas)?;
        read_field(map, "use_exponential_sigmas", &mut self.use_exponential_sigmas)?;
        read_field(map, "use_beta_sigmas", &mut self.use_beta_sigmas)?;
        read_field(map, "use_lu_lambdas", &mut self.use_lu_lambdas)?;
        read_field(map, "use_flow_sigmas", &mut self.use_flow_sigmas)?;
        read_field(map, "flow_shift", &mut self.flow_shift)?;
        read_field(map, "use_dynamic_shifting", &mut self.use_dynamic_shifting)?;
        read_field(map, "time_shift_type", &mut self.time_shift_type)?;
        Ok(())
    }

    /// The value of a sigma-schedule flag by its field name.
    fn flag(&self, name: &str) -> bool {
        match name {
            "use_karras_sigmas" => self.use_karras_sigmas,
            "use_exponential_sigmas" => self.use_exponential_sigmas,
            "use_beta_sigmas" => self.use_beta_sigmas,
            "use_lu_lambdas" => self.use_lu_lambdas,
            "use_flow_sigmas" => self.use_flow_sigmas,
            "use_dynamic_shifting" => self.use_dynamic_shifting,
            _ => false,
        }
    }
}

impl SchedulerConfig {
    /// Checks that a `DPMSolverMultistepScheduler` can be built from this config: the values diffusers
    /// refuses (a sigmoid schedule, `final_sigmas_type: zero` with the noise-prediction algorithms)
    /// and those this crate does not implement (Karras and the other sigma schedules, a learned
    /// variance, sde-dpmsolver of order 3, which diffusers cannot run either) are errors naming the
    /// field. [`SchedulerConfig::validate`] calls it for that class.
    pub fn validate_dpm_solver(&self) -> Result<()> {
        let o = &self.dpm_solver;
        if !(1..=3).contains(&o.solver_order) {
            return Err(Error::config("solver_order", format!("{} is not supported; DPM-Solver takes 1, 2 or 3", o.solver_order)));
        }
        if self.trained_betas.is_none() && self.beta_schedule == BetaSchedule::Sigmoid {
            return Err(Error::config(
                "beta_schedule",
                "`sigmoid` is not a DPMSolverMultistepScheduler schedule (diffusers refuses it): use linear, scaled_linear or squaredcos_cap_v2",
            ));
        }
        if !o.algorithm_type.predicts_data() && o.final_sigmas_type == FinalSigmasType::Zero {
            return Err(Error::config(
                "final_sigmas_type",
                format!("`zero` is not supported with algorithm_type `{}` (diffusers refuses it too): use sigma_min", o.algorithm_type),
            ));
        }
        if o.algorithm_type == DpmAlgorithmType::SdeDpmSolver && o.solver_order == 3 {
            return Err(Error::config(
                "solver_order",
                "3 is not supported with algorithm_type `sde-dpmsolver` (diffusers has no third-order sde-dpmsolver update): use 1 or 2",
            ));
        }
        if matches!(self.variance_type, VarianceType::Learned | VarianceType::LearnedRange) {
            return Err(Error::config(
                "variance_type",
                format!("`{}` (a network-predicted variance) is not supported", self.variance_type),
            ));
        }
        if let Some(flag) = SIGMA_SCHEDULE_FLAGS.iter().find(|f| o.flag(f)) {
            return Err(Error::config(
                *flag,
                "true is not supported: this crate's DPM-Solver samples at the training timesteps' own sigmas",
            ));
        }
        if o.lambda_min_clipped.is_nan() {
            return Err(Error::config("lambda_min_clipped", "NaN is not a threshold"));
        }
        if !(o.flow_shift.is_finite() && o.flow_shift > 0.0) {
            return Err(Error::config("flow_shift", format!("{} must be positive", o.flow_shift)));
        }
        Ok(())
    }
}
