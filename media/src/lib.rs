//! fleetcall-media: the media plane's driver around the sans-IO SFU core
//! ([`fleetcall_sfu`]).
//!
//! - [`SfuDriver`] starts one worker thread per UDP port, each owning one
//!   [`fleetcall_sfu::Sfu`] core and its socket (batched I/O: `recvmmsg`
//!   with `quinn-udp`, `sendmmsg` with `nix`), and the DSP threads that
//!   denoise audio ([`audio`]).
//! - [`SfuHandle`] is how the rest of the server reaches them: every call is
//!   a message to the worker that owns the room.
//! - [`metrics`] turns the cores' plain stats into Prometheus series and
//!   [`admin`] into the admin API's JSON; the cores know neither.
//!
//! The drivers own sockets, threads and clocks, and decide nothing: every
//! rule of the media plane is in the core, where tests run it in virtual
//! time.
//!
//! The core's types that [`SfuHandle`] speaks are re-exported, so the
//! server needs this crate only.

pub mod admin;
pub mod audio;
mod driver;
pub mod metrics;
mod outbox;

pub use driver::{DriverConfig, Reply, Session, SfuDriver, SfuHandle};
pub use fleetcall_sfu::audio::{PolicyChange, SuppressionPolicy};
pub use fleetcall_sfu::{Joined, LeaveReason, ParticipantId, Rights, RoomId, SdpAnswer, SdpOffer, SfuConfig, SfuError, SfuEvent, SfuStats, TrackKey};
