//! The crate's one error type.

/// Errors from building or reconfiguring a [`Pipeline`](crate::Pipeline).
///
/// Bad input from the network is never an error here: a corrupt, oversized or
/// mismatched packet is concealed, counted in the meters and reported in
/// [`Processed`](crate::Processed), and the stream goes on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DspError {
    /// A configuration value is outside what Opus or the pipeline supports.
    #[error("invalid pipeline config: {0}")]
    InvalidConfig(&'static str),
    /// libopus refused to create or configure a codec.
    #[error("opus: {0}")]
    Opus(#[from] audiopus::Error),
}
