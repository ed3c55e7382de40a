//! diffusers' `scheduler_config.json` for `DDPMScheduler`, `DDIMScheduler` and
//! `DPMSolverMultistepScheduler`, read and written as diffusers does.
//!
//! `_class_name` says which scheduler the file is for ([`SchedulerClass`]; a file without it is a
//! `DDPMScheduler` config). Every field that a file omits (or sets to `null`) takes the default of
//! diffusers' `__init__` of that class, not serde's zero (the classes share their defaults, except
//! `timestep_spacing`: `linspace` for DPMSolverMultistepScheduler, `leading` for the others).
//! Python's bare `-Infinity` (DPM-Solver's `lambda_min_clipped`) is read and written as diffusers
//! writes it.
//! Fields that no implemented class reads (`tensor_format`, `timestep_values`, ...) are ignored, as
//! diffusers ignores them, and named by [`SchedulerConfig::from_file_checked`] so that the caller can
//! warn. A value of the wrong type, an unknown enum variant or an unknown `_class_name` is an error
//! that names the field, and [`SchedulerConfig::validate`] rejects values that parse but cannot be
//! used.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The `_class_name` of a [`SchedulerConfig::default`] (diffusers' `DDPMScheduler`).
pub const CLASS_NAME: &str = "DDPMScheduler";
/// The `_diffusers_version` written into saved configs (the version the fixtures were made with).
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// Implements `as_str`, `Display`, `FromStr` and the list of names for a config enum.
macro_rules! config_enum {
    ($(#[$m:meta])* $name:ident, $field:literal { $($(#[$vm:meta])* $variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $variant),+
        }

        impl $name {
            /// Every accepted spelling, as diffusers writes it.
            pub const NAMES: &'static [&'static str] = &[$($s),+];

            /// The name as diffusers spells it in `scheduler_config.json`.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($s => Ok($name::$variant),)+
                    other => Err(Error::config(
                        $field,
                        format!("unknown value `{other}`, expected one of {}", Self::NAMES.join(", ")),
                    )),
                }
            }
        }
    };
}

mod dpm;
mod json;

pub use dpm::{DpmAlgorithmType, DpmSolverOptions, DpmSolverType, FinalSigmasType, TimeShiftType};

config_enum!(
    /// How the betas beta_1..beta_T are laid out (`beta_schedule`).
    BetaSchedule, "beta_schedule" {
        /// beta_t evenly spaced from `beta_start` to `beta_end` (the DDPM paper).
        Linear => "linear",
        /// sqrt(beta_t) evenly spaced from sqrt(beta_start) to sqrt(beta_end) (latent diffusion).
        ScaledLinear => "scaled_linear",
        /// The cosine schedule of Improved DDPM, alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
        /// s = 0.008, betas capped at 0.999.
        SquaredcosCapV2 => "squaredcos_cap_v2",
        /// beta_start + (beta_end - beta_start) sigmoid(x), x evenly spaced in [-6, 6] (GeoDiff).
        Sigmoid => "sigmoid",
    }
);

config_enum!(
    /// The variance of the reverse step p(x_{t-1} | x_t) (`variance_type`).
    VarianceType, "variance_type" {
        /// sigma_t^2 = beta-tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t, the posterior variance.
        FixedSmall => "fixed_small",
        /// beta-tilde_t, computed through its logarithm.
        FixedSmallLog => "fixed_small_log",
        /// sigma_t^2 = beta_t.
        FixedLarge => "fixed_large",
        /// beta_t, computed through its logarithm (exp(0.5 log beta_t) z; not diffusers' NaN, #14569).
        FixedLargeLog => "fixed_large_log",
        /// The network predicts the variance (Improved DDPM); not supported here.
        Learned => "learned",
        /// The network interpolates log beta-tilde and log beta (Improved DDPM); not supported here.
        LearnedRange => "learned_range",
    }
);

config_enum!(
    /// What the network predicts (`prediction_type`).
    PredictionType, "prediction_type" {
        /// The noise epsilon that was added (the DDPM paper).
        Epsilon => "epsilon",
        /// The clean sample x_0 directly.
        Sample => "sample",
        /// v = sqrt(alpha_bar_t) epsilon - sqrt(1 - alpha_bar_t) x_0 (progressive distillation).
        VPrediction => "v_prediction",
    }
);

config_enum!(
    /// How inference timesteps are picked from the training timesteps (`timestep_spacing`).
    TimestepSpacing, "timestep_spacing" {
        /// 0, r, 2r, ... with r = T / n (integer division), plus `steps_offset`, descending.
        Leading => "leading",
        /// round(T - i T / n) - 1 for i = 0..n: always includes T - 1.
        Trailing => "trailing",
        /// round of n evenly spaced values in [0, T - 1], descending.
        Linspace => "linspace",
    }
);

config_enum!(
    /// The diffusers scheduler class a config is for (`_class_name`), which
    /// [`crate::Sampler::from_config`] builds. Another class (UniPCMultistepScheduler, ...) is
    /// added as a variant here, its fields in [`SchedulerClass::fields`] and its sampler in
    /// [`crate::Sampler`]. The default is `DDPMScheduler`, the class of a config without `_class_name`.
    #[derive(Default)]
    SchedulerClass, "_class_name" {
        /// `DDPMScheduler`: ancestral sampling ([`crate::DdpmScheduler`]).
        #[default]
        Ddpm => "DDPMScheduler",
        /// `DDIMScheduler`: DDIM sampling ([`crate::DdimScheduler`]).
        Ddim => "DDIMScheduler",
        /// `DPMSolverMultistepScheduler`: DPM-Solver(++) multistep sampling
        /// ([`crate::DpmSolverMultistepScheduler`]).
        DpmSolverMultistep => "DPMSolverMultistepScheduler",
    }
);

/// The most diffusion steps a schedule may have: a schedule keeps several f64 and f32 vectors of this
/// length (diffusers' models use 1000 to 4000), so a larger value in a config is refused rather than
/// allocated.
pub const MAX_TRAIN_TIMESTEPS: usize = 1 << 20;

/// The fields of `DDPMScheduler.__init__` (diffusers 0.42), sorted.
const DDPM_FIELDS: &[&str] = &[
    "beta_end",
    "beta_schedule",
    "beta_start",
    "clip_sample",
    "clip_sample_range",
    "dynamic_thresholding_ratio",
    "num_train_timesteps",
    "prediction_type",
    "rescale_betas_zero_snr",
    "sample_max_value",
    "steps_offset",
    "thresholding",
    "timestep_spacing",
    "trained_betas",
    "variance_type",
];

/// The fields of `DDIMScheduler.__init__` (diffusers 0.42), sorted.
const DDIM_FIELDS: &[&str] = &[
    "beta_end",
    "beta_schedule",
    "beta_start",
    "clip_sample",
    "clip_sample_range",
    "dynamic_thresholding_ratio",
    "num_train_timesteps",
    "prediction_type",
    "rescale_betas_zero_snr",
    "sample_max_value",
    "set_alpha_to_one",
    "steps_offset",
    "thresholding",
    "timestep_spacing",
    "trained_betas",
];

impl SchedulerClass {
    /// Every implemented class.
    pub const ALL: &'static [SchedulerClass] = &[SchedulerClass::Ddpm, SchedulerClass::Ddim, SchedulerClass::DpmSolverMultistep];

    /// The fields this class's `__init__` takes, sorted: the fields its saved config holds besides
    /// `_class_name` and `_diffusers_version`. Every one of them is honoured.
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            SchedulerClass::Ddpm => DDPM_FIELDS,
            SchedulerClass::Ddim => DDIM_FIELDS,
            SchedulerClass::DpmSolverMultistep => dpm::DPM_SOLVER_FIELDS,
        }
    }

    /// Whether a field is read by some implemented class (a `DDIMScheduler` config that holds
    /// `variance_type` is not wrong: diffusers ignores fields of compatible classes silently).
    pub fn is_known_field(name: &str) -> bool {
        Self::ALL.iter().any(|c| c.fields().contains(&name))
    }
}

/// Fields of a `scheduler_config.json` that no implemented scheduler class reads. diffusers ignores
/// such fields with a warning; so does this crate: [`UnknownFields::warning`] is that warning.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnknownFields {
    /// Where the config came from (the file, or `<json>`).
    pub source: String,
    /// The field names, sorted. Private fields (`_name`) are never listed.
    pub names: Vec<String>,
}

impl UnknownFields {
    /// The non-private keys of the JSON object `value` that no implemented class reads, sorted.
    pub fn of(source: impl Into<String>, value: &Value) -> Self {
        let mut names: Vec<String> = value
            .as_object()
            .map(|m| {
                m.keys().filter(|k| !k.starts_with('_') && !SchedulerClass::is_known_field(k)).cloned().collect()
            })
            .unwrap_or_default();
        names.sort();
        Self { source: source.into(), names }
    }

    /// No unknown field.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// A one-line warning naming the source and the fields, `None` when there are none.
    pub fn warning(&self) -> Option<String> {
        (!self.is_empty()).then(|| self.to_string())
    }
}

impl fmt::Display for UnknownFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "warning: {}: ignoring {} that no supported scheduler ({}) reads: {}",
            self.source,
            if self.names.len() == 1 { "a field" } else { "fields" },
            SchedulerClass::NAMES.join(", "),
            self.names.join(", ")
        )
    }
}

/// diffusers' scheduler configuration (`scheduler_config.json`) for the class in `class_name`.
///
/// One struct holds the fields of every implemented class; each class uses its own
/// ([`SchedulerClass::fields`]): `variance_type` only `DDPMScheduler` (DPM-Solver saves it as
/// `null` and refuses a learned one), `set_alpha_to_one` only `DDIMScheduler`, `clip_sample` not
/// DPM-Solver, and the DPM-Solver fields live in [`SchedulerConfig::dpm_solver`]. [`Default`]
/// gives diffusers' defaults for `DDPMScheduler`: the linear schedule of the DDPM paper with
/// T = 1000, beta from 1e-4 to 0.02, `fixed_small` variance, epsilon prediction and x_0 clipped to
/// [-1, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// The diffusers class the config is for (`_class_name`, default DDPMScheduler).
    pub class_name: SchedulerClass,
    /// Number of diffusion steps T used in training (default 1000).
    pub num_train_timesteps: usize,
    /// beta at the first timestep (default 0.0001).
    pub beta_start: f64,
    /// beta at the last timestep (default 0.02).
    pub beta_end: f64,
    /// The layout of the betas (default linear).
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, one per training timestep; when set they replace `beta_schedule`.
    pub trained_betas: Option<Vec<f64>>,
    /// The variance of the reverse step (default fixed_small).
    pub variance_type: VarianceType,
    /// Clip the predicted x_0 to [-clip_sample_range, clip_sample_range] (default true; DDPM and DDIM).
    pub clip_sample: bool,
    /// The bound used by `clip_sample` (default 1.0).
    pub clip_sample_range: f64,
    /// What the network predicts (default epsilon).
    pub prediction_type: PredictionType,
    /// Dynamic thresholding of the predicted x_0 (Imagen); replaces clipping when on (default false).
    pub thresholding: bool,
    /// The quantile of |x_0| used by dynamic thresholding (default 0.995).
    pub dynamic_thresholding_ratio: f64,
    /// The largest threshold of dynamic thresholding (default 1.0).
    pub sample_max_value: f64,
    /// How inference timesteps are spaced (default leading; linspace for DPMSolverMultistepScheduler).
    pub timestep_spacing: TimestepSpacing,
    /// Added to the `leading` inference timesteps (default 0).
    pub steps_offset: usize,
    /// Rescale the betas to a zero terminal SNR (Lin et al. 2023) (default false).
    pub rescale_betas_zero_snr: bool,
    /// DDIM only: the step past the last inference timestep goes to alpha_bar = 1 when true
    /// (default), to alpha_bar_0 when false.
    pub set_alpha_to_one: bool,
    /// DPMSolverMultistepScheduler only: its solver fields (order, algorithm, final steps, ...).
    pub dpm_solver: DpmSolverOptions,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            class_name: SchedulerClass::Ddpm,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            variance_type: VarianceType::FixedSmall,
            clip_sample: true,
            clip_sample_range: 1.0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            set_alpha_to_one: true,
            dpm_solver: DpmSolverOptions::default(),
        }
    }
}

/// Reads field `name` of `map` into `slot`; a missing field or `null` keeps the default already there.
fn read_field<T: serde::de::DeserializeOwned>(map: &Map<String, Value>, name: &str, slot: &mut T) -> Result<()> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(()),
        Some(v) => {
            *slot = T::deserialize(v).map_err(|e| Error::config(name, e.to_string()))?;
            Ok(())
        }
    }
}

impl SchedulerConfig {
    /// diffusers' defaults for `class`: the classes share their defaults except `class_name` and
    /// `timestep_spacing` (`linspace` for DPMSolverMultistepScheduler, `leading` for the others).
    pub fn for_class(class: SchedulerClass) -> Self {
        let timestep_spacing = match class {
            SchedulerClass::DpmSolverMultistep => TimestepSpacing::Linspace,
            SchedulerClass::Ddpm | SchedulerClass::Ddim => TimestepSpacing::Leading,
        };
        Self { class_name: class, timestep_spacing, ..Self::default() }
    }

    /// Builds a config from a parsed JSON object: `_class_name` picks the class (DDPMScheduler when
    /// absent), missing or `null` fields take diffusers' defaults, unknown fields are ignored
    /// (see [`SchedulerConfig::from_json_value_checked`] to name them), a field of the wrong type or
    /// an unknown class is an [`Error::InvalidConfig`] naming it. The result is validated.
    pub fn from_json_value(value: &Value) -> Result<Self> {
        let map = value
            .as_object()
            .ok_or_else(|| Error::config("<root>", "a scheduler config must be a JSON object"))?;
        let class = match map.get("_class_name") {
            None | Some(Value::Null) => SchedulerClass::default(),
            Some(Value::String(name)) => name.parse().map_err(|_| {
                Error::config(
                    "_class_name",
                    format!(
                        "`{name}` is not a scheduler this crate implements; expected one of {}",
                        SchedulerClass::NAMES.join(", ")
                    ),
                )
            })?,
            Some(other) => {
                return Err(Error::config("_class_name", format!("expected a class name string, got {other}")));
            }
        };
        let mut c = Self::for_class(class);
        read_field(map, "num_train_timesteps", &mut c.num_train_timesteps)?;
        read_field(map, "beta_start", &mut c.beta_start)?;
        read_field(map, "beta_end", &mut c.beta_end)?;
        read_field(map, "beta_schedule", &mut c.beta_schedule)?;
        // trained_betas: null is a real value (None), so it is read as an Option.
        read_field(map, "trained_betas", &mut c.trained_betas)?;
        read_field(map, "variance_type", &mut c.variance_type)?;
        read_field(map, "clip_sample", &mut c.clip_sample)?;
        read_field(map, "clip_sample_range", &mut c.clip_sample_range)?;
        read_field(map, "prediction_type", &mut c.prediction_type)?;
        read_field(map, "thresholding", &mut c.thresholding)?;
        read_field(map, "dynamic_thresholding_ratio", &mut c.dynamic_thresholding_ratio)?;
        read_field(map, "sample_max_value", &mut c.sample_max_value)?;
        read_field(map, "timestep_spacing", &mut c.timestep_spacing)?;
        read_field(map, "steps_offset", &mut c.steps_offset)?;
        read_field(map, "rescale_betas_zero_snr", &mut c.rescale_betas_zero_snr)?;
        read_field(map, "set_alpha_to_one", &mut c.set_alpha_to_one)?;
        c.dpm_solver.read(map)?;
        c.validate()?;
        Ok(c)
    }

    /// [`SchedulerConfig::from_json_value`], also naming the fields that no implemented class reads
    /// (source `<json>`).
    pub fn from_json_value_checked(value: &Value) -> Result<(Self, UnknownFields)> {
        Ok((Self::from_json_value(value)?, UnknownFields::of("<json>", value)))
    }

    /// Parses and validates a config from JSON text (see [`SchedulerConfig::from_json_value`]);
    /// Python's bare `-Infinity`, `Infinity` and `NaN` are accepted.
    pub fn from_json_str(s: &str) -> Result<Self> {
        let v: Value = json::parse(s).map_err(|e| Error::Json { path: "<string>".into(), message: e.to_string() })?;
        Self::from_json_value(&v)
    }

    /// Reads and validates `scheduler_config.json`; every error names the file (and the field).
    /// Unknown fields are ignored silently: [`SchedulerConfig::from_file_checked`] names them.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Ok(Self::from_file_checked(path)?.0)
    }

    /// Reads and validates `scheduler_config.json`, and names the fields that no implemented class
    /// reads, for the caller to print ([`UnknownFields::warning`]); every error names the file
    /// (and the field).
    pub fn from_file_checked(path: impl AsRef<Path>) -> Result<(Self, UnknownFields)> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: name.clone(), source })?;
        let v: Value = json::parse(&text).map_err(|e| Error::Json { path: name.clone(), message: e.to_string() })?;
        let config = Self::from_json_value(&v).map_err(|e| e.in_file(name.clone()))?;
        Ok((config, UnknownFields::of(name, &v)))
    }

    /// The config as diffusers' `save_config` writes it for `class_name`: that class's fields
    /// ([`SchedulerClass::fields`]), keys sorted, plus `_class_name` and `_diffusers_version`.
    /// A non-finite `lambda_min_clipped` is written bare (`-Infinity`), as Python's json writes it,
    /// so that diffusers reads it back as a float.
    pub fn to_json_string(&self) -> Result<String> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Json { path: "<string>".into(), message: e.to_string() })?;
        Ok(json::unquote_non_finite(text, "lambda_min_clipped"))
    }

    /// Writes `scheduler_config.json` (see [`SchedulerConfig::to_json_string`]); errors name the file.
    pub fn to_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let mut text = self.to_json_string().map_err(|e| e.in_file(name.clone()))?;
        text.push('\n');
        std::fs::write(path, text).map_err(|source| Error::Io { path: name, source })
    }

    /// Checks that every value can be used; the error names the offending field.
    pub fn validate(&self) -> Result<()> {
        let t = self.num_train_timesteps;
        if t == 0 {
            return Err(Error::config("num_train_timesteps", "must be at least 1"));
        }
        if t > MAX_TRAIN_TIMESTEPS {
            return Err(Error::config(
                "num_train_timesteps",
                format!("{t} is more than the {MAX_TRAIN_TIMESTEPS} supported (a schedule keeps several vectors of that length)"),
            ));
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() != t {
                return Err(Error::config(
                    "trained_betas",
                    format!("has {} values but num_train_timesteps is {t}", betas.len()),
                ));
            }
            if let Some((i, b)) = betas.iter().enumerate().find(|(_, b)| !(b.is_finite() && **b > 0.0 && **b < 1.0)) {
                return Err(Error::config("trained_betas", format!("value {b} at index {i} is not in (0, 1)")));
            }
        } else if self.beta_schedule != BetaSchedule::SquaredcosCapV2 {
            // beta_start and beta_end only matter for the schedules that use them.
            if !(self.beta_start.is_finite() && self.beta_start > 0.0 && self.beta_start < 1.0) {
                return Err(Error::config("beta_start", format!("{} is not in (0, 1)", self.beta_start)));
            }
            if !(self.beta_end.is_finite() && self.beta_end < 1.0) {
                return Err(Error::config("beta_end", format!("{} is not below 1", self.beta_end)));
            }
            if self.beta_end <= self.beta_start {
                return Err(Error::config(
                    "beta_end",
                    format!("{} must be greater than beta_start {}", self.beta_end, self.beta_start),
                ));
            }
        }
        if !(self.clip_sample_range.is_finite() && self.clip_sample_range > 0.0) {
            return Err(Error::config("clip_sample_range", format!("{} must be positive", self.clip_sample_range)));
        }
        if !(self.dynamic_thresholding_ratio > 0.0 && self.dynamic_thresholding_ratio <= 1.0) {
            return Err(Error::config(
                "dynamic_thresholding_ratio",
                format!("{} is not in (0, 1]", self.dynamic_thresholding_ratio),
            ));
        }
        if !(self.sample_max_value.is_finite() && self.sample_max_value > 0.0) {
            return Err(Error::config("sample_max_value", format!("{} must be positive", self.sample_max_value)));
        }
        if self.steps_offset >= t {
            return Err(Error::config("steps_offset", format!("{} must be below num_train_timesteps {t}", self.steps_offset)));
        }
        if self.class_name == SchedulerClass::DpmSolverMultistep {
            self.validate_dpm_solver()?;
        }
        Ok(())
    }
}

impl Serialize for SchedulerConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        // Keys in sorted order, as diffusers' `save_config` writes them; only the class's own fields.
        let fields = self.class_name.fields();
        let dpm = &self.dpm_solver;
        let mut m = serializer.serialize_map(Some(fields.len() + 2))?;
        m.serialize_entry("_class_name", self.class_name.as_str())?;
        m.serialize_entry("_diffusers_version", DIFFUSERS_VERSION)?;
        for &field in fields {
            match field {
                "beta_end" => m.serialize_entry(field, &self.beta_end)?,
                "beta_schedule" => m.serialize_entry(field, &self.beta_schedule)?,
                "beta_start" => m.serialize_entry(field, &self.beta_start)?,
                "clip_sample" => m.serialize_entry(field, &self.clip_sample)?,
                "clip_sample_range" => m.serialize_entry(field, &self.clip_sample_range)?,
                "dynamic_thresholding_ratio" => m.serialize_entry(field, &self.dynamic_thresholding_ratio)?,
                "num_train_timesteps" => m.serialize_entry(field, &self.num_train_timesteps)?,
                "prediction_type" => m.serialize_entry(field, &self.prediction_type)?,
                "rescale_betas_zero_snr" => m.serialize_entry(field, &self.rescale_betas_zero_snr)?,
                "sample_max_value" => m.serialize_entry(field, &self.sample_max_value)?,
                "set_alpha_to_one" => m.serialize_entry(field, &self.set_alpha_to_one)?,
                "steps_offset" => m.serialize_entry(field, &self.steps_offset)?,
                "thresholding" => m.serialize_entry(field, &self.thresholding)?,
                "timestep_spacing" => m.serialize_entry(field, &self.timestep_spacing)?,
                "trained_betas" => m.serialize_entry(field, &self.trained_betas)?,
                // DPM-Solver's variance_type is None unless learned (which it refuses)
                "variance_type" if self.class_name == SchedulerClass::DpmSolverMultistep => {
                    m.serialize_entry(field, &None::<VarianceType>)?
                }
                "variance_type" => m.serialize_entry(field, &self.variance_type)?,
                "solver_order" => m.serialize_entry(field, &dpm.solver_order)?,
                "algorithm_type" => m.serialize_entry(field, &dpm.algorithm_type)?,
                "solver_type" => m.serialize_entry(field, &dpm.solver_type)?,
                "lower_order_final" => m.serialize_entry(field, &dpm.lower_order_final)?,
                "euler_at_final" => m.serialize_entry(field, &dpm.euler_at_final)?,
                "final_sigmas_type" => m.serialize_entry(field, &dpm.final_sigmas_type)?,
                // a non-finite value as its Python spelling, a string here (to_json_string writes it bare)
                "lambda_min_clipped" => match dpm::non_finite_to_str(dpm.lambda_min_clipped) {
                    Some(s) => m.serialize_entry(field, s)?,
                    None => m.serialize_entry(field, &dpm.lambda_min_clipped)?,
                },
                "use_karras_sigmas" => m.serialize_entry(field, &dpm.use_karras_sigmas)?,
                "use_exponential_sigmas" => m.serialize_entry(field, &dpm.use_exponential_sigmas)?,
                "use_beta_sigmas" => m.serialize_entry(field, &dpm.use_beta_sigmas)?,
                "use_lu_lambdas" => m.serialize_entry(field, &dpm.use_lu_lambdas)?,
                "use_flow_sigmas" => m.serialize_entry(field, &dpm.use_flow_sigmas)?,
                "flow_shift" => m.serialize_entry(field, &dpm.flow_shift)?,
                "use_dynamic_shifting" => m.serialize_entry(field, &dpm.use_dynamic_shifting)?,
                "time_shift_type" => m.serialize_entry(field, &dpm.time_shift_type)?,
                other => return Err(serde::ser::Error::custom(format!("scheduler config field `{other}` has no value"))),
            }
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for SchedulerConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(deserializer)?;
        Self::from_json_value(&v).map_err(serde::de::Error::custom)
    }
}
