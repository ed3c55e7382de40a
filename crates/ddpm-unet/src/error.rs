//! Errors of the ddpm-unet crate.

use std::path::PathBuf;

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while configuring, loading, saving or fetching a UNet.
///
/// Every variant names what the user has to look at: the file, the config field or the tensor key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file could not be parsed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A config field has a value this crate does not accept.
    #[error("config field `{field}` = {value}: {reason}")]
    Config {
        /// The field's name as in `config.json`.
        field: String,
        /// The offending value, as JSON.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// An error that happened while handling `path`.
    #[error("{path}: {source}")]
    InFile {
        /// The file being read or written.
        path: PathBuf,
        /// The error itself.
        #[source]
        source: Box<Error>,
    },
    /// The weights lack a tensor the config needs.
    #[error("{file}: missing tensor `{key}` (expected shape {expected:?})")]
    MissingTensor {
        /// The weights file.
        file: PathBuf,
        /// The state-dict key.
        key: String,
        /// The shape the config expects.
        expected: Vec<usize>,
    },
    /// The weights hold a tensor the config does not use.
    #[error("{file}: unexpected tensor `{key}` with shape {found:?} (not used by this config)")]
    UnexpectedTensor {
        /// The weights file.
        file: PathBuf,
        /// The state-dict key.
        key: String,
        /// Its shape in the file.
        found: Vec<usize>,
    },
    /// A tensor's shape differs from what the config implies.
    #[error("{file}: tensor `{key}` has shape {found:?} but the config expects {expected:?}")]
    ShapeMismatch {
        /// The weights file.
        file: PathBuf,
        /// The state-dict key.
        key: String,
        /// The shape the config expects.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// Two keys of the weights file map to the same name once legacy attention names are renamed.
    #[error("{file}: tensor `{key}` appears twice (once under a legacy attention name)")]
    DuplicateTensor {
        /// The weights file.
        file: PathBuf,
        /// The key after renaming.
        key: String,
    },
    /// A weights file could not be read or decoded.
    #[error("{path}: cannot read weights: {source}")]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },
    /// No model was found locally, in the Hub cache, or (when allowed) on the Hub.
    #[error("model `{what}` not found: looked for {files} in {places}{reason}")]
    NotFound {
        /// The folder or repo id asked for.
        what: String,
        /// The files looked for, comma separated.
        files: String,
        /// The places looked in, comma separated.
        places: String,
        /// Why the network was not (or could not be) used, starting with "; " when present.
        reason: String,
    },
    /// `repo_id_or_dir` is neither an existing folder nor an `owner/name` repo id.
    #[error("`{0}` is neither an existing folder nor a Hub repo id of the form owner/name")]
    BadRepoId(String),
    /// A preset name that does not exist.
    #[error("unknown preset `{name}`; known presets: {known}")]
    UnknownPreset {
        /// The name asked for.
        name: String,
        /// The known names, comma separated.
        known: String,
    },
    /// A pipeline folder or repo has no scheduler config where one was looked for.
    #[error("`{what}` has no scheduler config: looked for {looked_for}; add one or build the pipeline with DdpmPipeline::from_parts")]
    MissingScheduler {
        /// The folder or repo id asked for.
        what: String,
        /// The paths looked at, comma separated.
        looked_for: String,
    },
    /// A field of a pipeline's `model_index.json` this crate cannot follow.
    #[error("{path}: field `{field}`: {reason}")]
    ModelIndex {
        /// The `model_index.json` file.
        path: PathBuf,
        /// The field (`_class_name`, `unet`, `scheduler`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An argument of a pipeline or image call is out of range or of the wrong shape.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An error of the diffusion process (scheduler config, sampling) from ddpm-core.
    #[error(transparent)]
    Scheduler(#[from] ddpm_core::Error),
    /// An image could not be encoded or written (the `image` feature).
    #[cfg(feature = "image")]
    #[error("{path}: cannot write image: {source}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// The image crate's error.
        #[source]
        source: image::ImageError,
    },
    /// An error from candle (tensor operations, devices).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// A [`Error::Config`] error for `field` holding `value`.
    pub(crate) fn config(
        field: &str,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        Error::Config {
            field: field.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// Wraps `self` with the file it came from.
    pub(crate) fn in_file(self, path: impl Into<PathBuf>) -> Self {
        Error::InFile {
            path: path.into(),
            source: Box::new(self),
        }
    }
}
