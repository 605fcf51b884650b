//! The agent's one error type: why `fleetcall device run` stopped.

use std::net::SocketAddr;
use std::path::PathBuf;

use fleetcall_peer::PeerError;
use fleetcall_signaling::client::ClientError;

/// Why the agent could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// `--duration` is not a positive number of seconds.
    #[error("--duration must be a positive number of seconds")]
    Duration,
    /// The microphone or recording file.
    #[error(transparent)]
    Audio(#[from] PeerError),
    /// No interface routes to the server.
    #[error("finding the interface that reaches the server (set --media-ip)")]
    Route(#[source] std::io::Error),
    /// The certificate file could not be read.
    #[error("reading {}", path.display())]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The certificate belongs to another device.
    #[error("{} is the certificate of {named:?}, not of --id {id:?}", path.display())]
    WrongIdentity {
        /// The certificate file.
        path: PathBuf,
        /// The device it names.
        named: String,
        /// The `--id` given.
        id: String,
    },
    /// The device identity (CA, certificate, key) could not be loaded.
    #[error("loading the device identity")]
    Identity(#[source] ClientError),
    /// Registration failed.
    #[error("registering with {server}")]
    Connect {
        /// The server's QUIC address.
        server: SocketAddr,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// The Opus encoder could not be created.
    #[error("Opus encoder")]
    Opus(#[source] audiopus::Error),
    /// The SIGTERM handler could not be installed.
    #[error("SIGTERM handler")]
    Signal(#[source] std::io::Error),
    /// `--call` was refused.
    #[error("calling {callee}")]
    Call {
        /// The device called.
        callee: String,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// The client SDK stopped.
    #[error("the client stopped")]
    ClientStopped,
    /// The server refused this device for good.
    #[error("the server refused this device for good ({close}): {reason}")]
    Refused {
        /// The close reason's name.
        close: String,
        /// The server's explanation.
        reason: String,
    },
}
