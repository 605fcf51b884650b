//! `fleetcall token create`, `fleetcall device enroll|token|revoke`: the
//! credentials of the installation, minted from the data dir.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use fleetcall_signaling::grants::{Grant, RoomPattern};
use fleetcall_signaling::pki::{Enrollment, Pki};
use fleetcall_signaling::revocations::Revocations;
use fleetcall_signaling::service::unix_now;
use fleetcall_signaling::tokens::{AccessTokens, TokenRequest};

use crate::admin_cli::{self, ServerArgs};

/// `fleetcall token create`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Room it opens: a name (`ward-3`) or a prefix (`ward-*`); repeatable.
    #[arg(long = "room", required = true)]
    rooms: Vec<String>,
    /// Identity shown to the others in the room.
    #[arg(long)]
    identity: String,
    /// Lifetime (`8h`, `30m`, `7d`).
    #[arg(long, default_value = "8h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Receive only: the server refuses every track it would send.
    #[arg(long)]
    subscribe_only: bool,
    /// Data directory of the server (holds the signing key).
    #[arg(long, env = "FLEETCALL_DATA_DIR", default_value = "fleetcall-data")]
    data_dir: PathBuf,
}

/// `fleetcall device enroll`.
#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// The device id (1-64 of A-Z a-z 0-9 _ . -), its identity on the control plane.
    id: String,
    /// Data directory of the server (holds the CA).
    #[arg(long, env = "FLEETCALL_DATA_DIR", default_value = "fleetcall-data")]
    data_dir: PathBuf,
    /// Where to write `<id>.pem`, `<id>.key` and `ca.pem`.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Named room the device may join (`ward-3`, `ward-*`); repeatable.
    /// Calls it is invited to need none.
    #[arg(long = "room")]
    rooms: Vec<String>,
    /// How long the certificate is valid (`365d`, `90d`).
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    validity: Duration,
}

/// `fleetcall device token`.
#[derive(Debug, Args)]
pub struct DeviceTokenArgs {
    /// The device id.
    id: String,
    /// Named room the device may join; repeatable.
    #[arg(long = "room")]
    rooms: Vec<String>,
    /// Lifetime (`30d`, `8h`).
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Data directory of the server (holds the signing key).
    #[arg(long, env = "FLEETCALL_DATA_DIR", default_value = "fleetcall-data")]
    data_dir: PathBuf,
}

/// `fleetcall device revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The device id (or a token's identity) whose credentials end now.
    id: String,
    #[command(flatten)]
    server: ServerArgs,
}

pub fn create_token(args: TokenArgs) -> anyhow::Result<()> {
    let grant = Grant { rooms: patterns(&args.rooms)?, publish: !args.subscribe_only, subscribe: true };
    let request = TokenRequest { identity: args.identity, ttl: args.ttl, grant, guest: false };
    println!("{}", mint(&args.data_dir, &request)?);
    Ok(())
}

pub fn device_token(args: DeviceTokenArgs) -> anyhow::Result<()> {
    let request = TokenRequest { identity: args.id, ttl: args.ttl, grant: Grant::device(patterns(&args.rooms)?), guest: false };
    println!("{}", mint(&args.data_dir, &request)?);
    Ok(())
}

pub fn enroll(args: EnrollArgs) -> anyhow::Result<()> {
    let pki = Pki::open_or_init(args.data_dir.join("pki"), &[])?;
    // A certificate issued in the second of an earlier revocation would be
    // revoked by it: issue from the second after.
    let not_before = Revocations::open(pki.dir())?.revoked_at(&args.id).map_or(0, |at| at + 1);
    let enrollment = Enrollment { validity: args.validity, rooms: patterns(&args.rooms)?, not_before };
    let files = pki.enroll(&args.id, &args.out, &enrollment)?;
    println!("enrolled {}: {} {} (trust {})", args.id, files.cert.display(), files.key.display(), files.ca.display());
    Ok(())
}

/// Through the running server (which closes live connections at once), or,
/// when none answers, straight into the list it reads at start.
pub fn revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let path = format!("/api/devices/{}/revoke", percent_encode(&args.id));
    match admin_cli::request(&args.server, "POST", &path) {
        Ok(body) => {
            println!("{body}");
            Ok(())
        }
        Err(e) if refused(&e) => {
            let mut list = Revocations::open(&args.server.data_dir.join("pki"))?;
            list.revoke(&args.id, unix_now())?;
            println!("no server at {}: revoked {} in the data dir; a server reads it when it starts", args.server.server, args.id);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn mint(data_dir: &Path, request: &TokenRequest) -> anyhow::Result<String> {
    let pki = Pki::open_or_init(data_dir.join("pki"), &[])?;
    let tokens = AccessTokens::open_or_init(pki.dir())?;
    // A token issued in the second of its identity's revocation would be
    // revoked by it: a second later is within the verifier's skew.
    let now = unix_now();
    let issued = Revocations::open(pki.dir())?.revoked_at(&request.identity).map_or(now, |at| now.max(at + 1));
    Ok(tokens.mint(request, issued)?)
}

fn patterns(rooms: &[String]) -> anyhow::Result<Vec<RoomPattern>> {
    rooms.iter().map(|r| RoomPattern::parse(r).with_context(|| format!("--room {r}"))).collect()
}

/// Whether the error is "nothing listens there".
fn refused(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// An identity as one URL path segment.
fn percent_encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_become_one_path_segment() {
        assert_eq!(percent_encode("bed12"), "bed12");
        assert_eq!(percent_encode("Nurse A/../x"), "Nurse%20A%2F%2E%2E%2Fx");
    }
}
