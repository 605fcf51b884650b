//! Control-plane plumbing of a simulated device: its credential (a
//! certificate from the server's CA for QUIC, an access token signed with the
//! server's key for WebSocket) and the client SDK's settings. Both paths
//! speak the device protocol through the controller.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use fleetcall_signaling::backoff::Backoff;
use fleetcall_signaling::client::{Client, ClientConfig, ClientEvent};
use fleetcall_signaling::grants::{Grant, RoomName, RoomPattern};
use fleetcall_signaling::pki::{DeviceFiles, Enrollment, Pki};
use fleetcall_signaling::service::unix_now;
use fleetcall_signaling::tokens::{AccessTokens, TokenRequest};
use tokio::sync::mpsc;


/// Issues device identities from the server's CA (same machine), reusing
/// the files of an earlier run.
#[derive(Debug, Clone)]
pub struct Enroller {
    pki: Pki,
    dir: PathBuf,
}

impl Enroller {
    /// Opens the CA in `<data_dir>/pki`; identities go to `<data_dir>/loadtest-devices`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let pki_dir = data_dir.join("pki");
        if !pki_dir.join("ca.pem").exists() {
            anyhow::bail!(
                "{}: no CA here; --data-dir must be the server's data directory (on this machine)",
                pki_dir.display()
            );
        }
        let pki = Pki::open_or_init(&pki_dir, &[]).context("opening the server's CA")?;
        Ok(Enroller {
            pki,
            dir: data_dir.join("loadtest-devices"),
        })
    }

    /// The identity of `id`: issued now, or the one issued before.
    pub fn identity(&self, id: &str) -> anyhow::Result<DeviceFiles> {
        let files = DeviceFiles {
            cert: self.dir.join(format!("{id}.pem")),
            key: self.dir.join(format!("{id}.key")),
            ca: self.dir.join("ca.pem"),
        };
        if files.cert.exists() && files.key.exists() && files.ca.exists() {
            return Ok(files);
        }
        let _ = std::fs::remove_file(&files.cert);
        let _ = std::fs::remove_file(&files.key);
        self.pki
            .enroll(id, &self.dir, &Enrollment::default())
            .with_context(|| format!("enrolling {id}"))
    }
}

/// Lifetime of a minted token: longer than any run, short enough not to
/// leave lasting credentials behind.
const TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// A cached token with less left than this is minted again.
const TOKEN_MIN_LEFT: Duration = Duration::from_secs(24 * 3600);

/// Mints access tokens with the server's signing key (same machine),
/// reusing the token of an earlier run: a new token for the same identity
/// would be a different credential, refused (IDENTITY_IN_USE) while the
/// earlier run's session is still within its resume grace.
#[derive(Debug, Clone)]
pub struct TokenIssuer {
    tokens: AccessTokens,
    dir: PathBuf,
}

impl TokenIssuer {
    /// Opens the signing key in `<data_dir>/pki`; tokens are kept in
    /// `<data_dir>/loadtest-devices`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let pki_dir = data_dir.join("pki");
        // Opening would create a key of our own, which the server does not know.
        if !pki_dir.join("token-signing.key").exists() {
            anyhow::bail!(
                "{}: no token signing key here; --data-dir must be the server's data directory (on this machine)",
                pki_dir.display()
            );
        }
        let tokens =
            AccessTokens::open_or_init(&pki_dir).context("opening the server's signing key")?;
        Ok(TokenIssuer {
            tokens,
            dir: data_dir.join("loadtest-devices"),
        })
    }

    /// A token for identity `id` that opens `room`: the one minted before
    /// if it is still good for it, else a new one.
    pub fn token(&self, id: &str, room: &str) -> anyhow::Result<String> {
        let room_name = RoomName::new(room).map_err(|e| anyhow::anyhow!("room {room:?}: {e}"))?;
        let path = self.dir.join(format!("{id}.jwt"));
        let now = unix_now();
        if let Ok(token) = std::fs::read_to_string(&path) {
            let token = token.trim();
            if let Ok(verified) = self.tokens.verify(token, now)
                && verified.credential.grant.covers(&room_name)
                && verified.credential.expires_at > now + TOKEN_MIN_LEFT.as_secs()
            {
                return Ok(token.to_owned());
            }
        }
        let pattern =
            RoomPattern::parse(room).map_err(|e| anyhow::anyhow!("room {room:?}: {e}"))?;
        let request = TokenRequest {
            identity: id.to_owned(),
            ttl: TOKEN_TTL,
            grant: Grant::device(vec![pattern]),
            guest: false,
        };
        let token = self
            .tokens
            .mint(&request, now)
            .with_context(|| format!("minting a token for {id}"))?;
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        std::fs::write(&path, &token).with_context(|| format!("writing {}", path.display()))?;
        Ok(token)
    }
}

/// Everything a simulated device needs to register, on either path.
#[derive(Debug)]
pub struct Registrar {
    /// The QUIC control plane.
    pub quic: SocketAddr,
    /// The device protocol's WebSocket endpoint (`ws://host:port/ws/device`).
    pub ws_url: String,
    /// Device identities (QUIC).
    pub enroller: Option<Enroller>,
    /// Access tokens (WebSocket).
    pub tokens: Option<TokenIssuer>,
    /// Local IP of the control connections.
    pub bind_ip: IpAddr,
    /// Reconnect with the SDK's fleet backoff (else a quick one).
    pub fleet_backoff: bool,
}

impl Registrar {
    /// Enrolls (or reuses) a device identity and registers it over QUIC.
    pub async fn register(
        &self,
        id: &str,
    ) -> Result<(Client, mpsc::UnboundedReceiver<ClientEvent>), String> {
        let enroller = self.enroller.clone().ok_or("no CA to enroll devices with")?;
        let id_owned = id.to_owned();
        let (server, bind_ip, fleet_backoff) = (self.quic, self.bind_ip, self.fleet_backoff);
        let config = tokio::task::spawn_blocking(move || {
            let files = enroller.identity(&id_owned)?;
            client_config(server, &files, bind_ip, fleet_backoff)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{e:#}"))?;
        Client::connect(config).await.map_err(|e| e.to_string())
    }

    /// Connects a device to `/ws/device` with a token for `room` (minted or
    /// reused) and registers it.
    pub async fn register_ws(
        &self,
        id: &str,
        room: &str,
    ) -> Result<(Client, mpsc::UnboundedReceiver<ClientEvent>), String> {
        let issuer = self
            .tokens
            .clone()
            .ok_or("no signing key to mint tokens with")?;
        let (id_owned, room_owned) = (id.to_owned(), room.to_owned());
        // Reading and writing the cached token touches the disk.
        let token = tokio::task::spawn_blocking(move || issuer.token(&id_owned, &room_owned))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{e:#}"))?;
        let config = tuned(
            ClientConfig::websocket(self.ws_url.clone(), token),
            self.bind_ip,
            self.fleet_backoff,
        );
        Client::connect(config).await.map_err(|e| e.to_string())
    }
}

/// QUIC client settings for a simulated device.
pub fn client_config(
    server: SocketAddr,
    files: &DeviceFiles,
    bind_ip: IpAddr,
    fleet_backoff: bool,
) -> anyhow::Result<ClientConfig> {
    let config = ClientConfig::from_files(server, "localhost", &files.ca, &files.cert, &files.key)
        .context("device identity")?;
    Ok(tuned(config, bind_ip, fleet_backoff))
}

/// The settings both transports share.
fn tuned(mut config: ClientConfig, bind_ip: IpAddr, fleet_backoff: bool) -> ClientConfig {
    config.bind = SocketAddr::new(bind_ip, 0);
    config.core.software_version = concat!("fleetcall-loadtest/", env!("CARGO_PKG_VERSION")).into();
    config.connect_timeout = Duration::from_secs(10);
    if !fleet_backoff {
        // Faster than the fleet default: a load test wants to see the
        // server converge, not the backoff's ceiling.
        config.backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    }
    config
}
