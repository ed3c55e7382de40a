//! The error type of ddpm-core.

/// Everything that can go wrong in ddpm-core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed in candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A configuration field holds a value that cannot be used; names the field.
    #[error("invalid value for `{field}`: {message}")]
    InvalidConfig {
        /// The field, as spelled in `scheduler_config.json`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A configuration file holds a value that cannot be used; names the file and the field.
    #[error("{path}: invalid value for `{field}`: {message}")]
    InvalidConfigFile {
        /// The file.
        path: String,
        /// The field, as spelled in `scheduler_config.json`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A feature exists in diffusers but is not implemented here.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An argument given to a function is out of range or of the wrong shape.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Reading or writing a file failed; names the file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file could not be parsed; names the file and, where serde says, the field.
    #[error("{path}: {message}")]
    Json {
        /// The file.
        path: String,
        /// serde's message (names the field and position).
        message: String,
    },
    /// A file that cannot be used (a training checkpoint's missing metadata field, a tensor it
    /// lacks); names the file and what is wrong.
    #[error("{path}: {message}")]
    File {
        /// The file or folder.
        path: String,
        /// What is wrong with it, naming the field.
        message: String,
    },
}

/// Result with ddpm-core's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::InvalidConfig`].
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidConfig { field: field.into(), message: message.into() }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn arg(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }

    /// Attaches the file `path` to a configuration or JSON error, so that the message names both the
    /// file and the field; other errors are returned unchanged.
    pub fn in_file(self, path: impl Into<String>) -> Self {
        match self {
            Error::InvalidConfig { field, message } => Error::InvalidConfigFile { path: path.into(), field, message },
            Error::Json { message, .. } => Error::Json { path: path.into(), message },
            other => other,
        }
    }
}
