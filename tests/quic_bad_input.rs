//! Bad input on the device transport, against the real server process: a
//! wrong or missing client certificate, oversize and garbage frames, and
//! messages out of order. Each gets a clear error, the connection is closed
//! where the protocol says so (QUIC application code = `CloseReason`), and
//! devices that behave are not affected.

mod common;
mod quic_support;

use std::sync::Arc;
use std::time::Duration;

use common::Server;
use fleetcall_signaling::client::{Client, ClientConfig, ClientError, ClientEvent};
use fleetcall_signaling::ids::CallId;
use fleetcall_signaling::pb::{self, client_frame::Kind as C, CloseReason, ErrorCode};
use fleetcall_signaling::pki::{self, Pki};
use rustls::pki_types::pem::PemObject;
use quic_support::{call_row, devices, scratch, Device, Raw, PROMPT};

/// Healthy devices heard nothing but what concerns them, and still call.
async fn unaffected(server: &Server, alice: &mut Device, bob: &mut Device) -> anyhow::Result<()> {
    for device in [&mut *alice, &mut *bob] {
        device.drain();
        assert!(!device.seen.iter().any(|e| matches!(e, ClientEvent::Disconnected { .. } | ClientEvent::ServerError(_))), "{}: {:#?}", device.id, device.seen);
    }
    let call = alice.client.invite(&bob.id).await?;
    assert_eq!(bob.incoming(PROMPT).await?.call_id, call.0);
    alice.client.cancel(call).await?;
    bob.ended(call, PROMPT).await?;
    let table = devices(server).await?;
    for id in [&alice.id, &bob.id] {
        assert_eq!(table[id.as_str()]["reachability"], "online", "{}", table[id.as_str()]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_client_certificate_is_refused() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let mut alice = Device::connect(&server, "alice").await?;
    let mut bob = Device::connect(&server, "bob").await?;
    let real_ca = server.data_dir.join("pki").join("ca.pem");

    // A certificate from another installation's CA.
    let foreign_dir = scratch("foreign-pki");
    let _ = std::fs::remove_dir_all(&foreign_dir);
    let foreign = Pki::open_or_init(foreign_dir.join("pki"), &[])?.enroll("mallory", &foreign_dir.join("devices"), &fleetcall_signaling::pki::Enrollment::default())?;
    let config = ClientConfig::from_files(server.quic_addr, "localhost", &real_ca, &foreign.cert, &foreign.key)?;
    let error = Client::connect(config).await.expect_err("a foreign certificate is refused");
    println!("foreign certificate: {error}");
    assert!(matches!(error, ClientError::Connect { .. } | ClientError::Closed { .. }), "{error:?}");

    // No client certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(&real_ca)? {
        roots.add(cert?)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![pki::ALPN.to_vec()];
    let error = Client::connect(ClientConfig::new(server.quic_addr, "localhost", tls)).await.expect_err("no certificate is refused");
    println!("no certificate: {error}");
    assert!(matches!(error, ClientError::Connect { .. } | ClientError::Closed { .. }), "{error:?}");

    // The server trusts neither; nobody by those names ever registered.
    let table = devices(&server).await?;
    assert_eq!(table.keys().map(String::as_str).collect::<Vec<_>>(), vec!["alice", "bob"], "{table:?}");
    unaffected(&server, &mut alice, &mut bob).await?;
    let _ = std::fs::remove_dir_all(&foreign_dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frames_and_bad_prefixes_close_the_connection() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let mut alice = Device::connect(&server, "alice").await?;
    let mut bob = Device::connect(&server, "bob").await?;

    // A length prefix over the 64 KiB limit is refused before the body.
    let mut big = Raw::enrolled(&server, "big").await?;
    big.hello().await?;
    // 70,000 as a varint.
    big.send_bytes(&[0xf0, 0xa2, 0x04]).await?;
    // The server may have closed already; that is the point.
    let _ = big.send_bytes(&[0u8; 1000]).await;
    assert_eq!(big.error().await?.0, ErrorCode::FrameTooLarge);
    assert_eq!(big.close_code().await?, Some(CloseReason::FrameTooLarge as u64));

    // A length prefix that never ends cannot be resynchronised either.
    let mut endless = Raw::enrolled(&server, "endless").await?;
    endless.hello().await?;
    endless.send_bytes(&[0x80; 11]).await?;
    assert_eq!(endless.error().await?.0, ErrorCode::MalformedFrame);
    assert_eq!(endless.close_code().await?, Some(CloseReason::ProtocolError as u64));

    // Each is recorded with its reason.
    let table = devices(&server).await?;
    for id in ["big", "endless"] {
        assert_eq!(table[id]["reachability"], "unreachable", "{}", table[id]);
        assert!(table[id]["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{}", table[id]);
    }
    unaffected(&server, &mut alice, &mut bob).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_get_errors_until_the_budget_is_spent() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let mut alice = Device::connect(&server, "alice").await?;
    let mut bob = Device::connect(&server, "bob").await?;
    let mut junk = Raw::enrolled(&server, "junk").await?;
    junk.hello().await?;

    // Not a protobuf message: an error, and the stream goes on.
    junk.send_bytes(&[3, 0xff, 0xff, 0xff]).await?;
    assert_eq!(junk.error().await?.0, ErrorCode::MalformedFrame);
    junk.alive(1).await?;
    // A kind this server does not know (field 99), with op id 5.
    junk.send_bytes(&[5, 0x08, 0x05, 0x9a, 0x06, 0x00]).await?;
    assert_eq!(junk.error().await?, (ErrorCode::UnknownMessage, 5));
    junk.alive(2).await?;
    // A request without an op id is not executed.
    junk.send_frame(0, C::Invite(pb::Invite { callee: "bob".into() })).await?;
    assert_eq!(junk.error().await?.0, ErrorCode::MissingOpId);
    junk.alive(3).await?;

    // 16 bad frames are tolerated; more close the connection.
    for _ in 0..20 {
        // Writes fail once the server has closed: that is the point.
        if junk.send_bytes(&[2, 0xff, 0xff]).await.is_err() {
            break;
        }
    }
    junk.next(PROMPT, |f| {
        matches!(&f.kind, Some(pb::server_frame::Kind::Error(e)) if e.code == ErrorCode::TooManyErrors as i32).then_some(())
    })
    .await?;
    assert_eq!(junk.close_code().await?, Some(CloseReason::TooManyErrors as u64));
    // Bob was never invited by the bad request.
    unaffected(&server, &mut alice, &mut bob).await?;
    assert!(!bob.seen.iter().any(|e| matches!(e, ClientEvent::IncomingCall(m) if m.from == "junk")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_out_of_order_get_clear_errors() -> anyhow::Result<()> {
    let server = Server::start(&[])?;
    let mut alice = Device::connect(&server, "alice").await?;
    let mut bob = Device::connect(&server, "bob").await?;

    // A request before Hello: refused and closed.
    let mut early = Raw::enrolled(&server, "early").await?;
    early.send_frame(1, C::Invite(pb::Invite { callee: "bob".into() })).await?;
    assert_eq!(early.error().await?, (ErrorCode::NotRegistered, 1));
    assert_eq!(early.close_code().await?, Some(CloseReason::ProtocolError as u64));

    // A live call between alice and bob for the others to poke at.
    let call = alice.client.invite("bob").await?;
    bob.incoming(PROMPT).await?;

    let mut eve = Raw::enrolled(&server, "eve").await?;
    let welcome = eve.hello().await?;
    assert_eq!(welcome.device_id, "eve");
    // A second Hello leaves the session alone.
    eve.send_frame(0, C::Hello(pb::Hello { min_version: 1, max_version: 1, ..Default::default() })).await?;
    assert_eq!(eve.error().await?.0, ErrorCode::UnexpectedHello);
    eve.alive(1).await?;
    // Requests about calls that do not exist, or are not hers.
    eve.send_frame(2, C::Accept(pb::Accept { call_id: 999 })).await?;
    assert_eq!(eve.error().await?, (ErrorCode::UnknownCall, 2));
    eve.send_frame(3, C::SdpAnswer(pb::SdpAnswer { call_id: 999, revision: 1, sdp: "v=0".into(), ..Default::default() })).await?;
    assert_eq!(eve.error().await?, (ErrorCode::UnknownCall, 3));
    eve.send_frame(4, C::Hangup(pb::Hangup { call_id: call.0 })).await?;
    assert_eq!(eve.error().await?, (ErrorCode::NotInCall, 4));
    // A repeated op id is answered from the cache, not executed again.
    eve.send_frame(2, C::Accept(pb::Accept { call_id: 999 })).await?;
    assert_eq!(eve.error().await?, (ErrorCode::UnknownCall, 2));
    eve.alive(2).await?;

    // Members out of turn: the caller cannot accept, there is no offer to answer.
    let refused = |r: Result<(), ClientError>| match r {
        Err(ClientError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(refused(alice.client.accept(call).await), ErrorCode::InvalidState);
    assert_eq!(refused(alice.client.sdp_answer(call, 7, "v=0".into()).await), ErrorCode::NoPendingOffer);
    assert_eq!(refused(bob.client.ringing(CallId(999)).await), ErrorCode::UnknownCall);

    // None of it touched the call: it still rings and can be answered.
    assert_eq!(call_row(&server, call).await?["phase"], "CALL_PHASE_INVITING");
    bob.client.accept(call).await?;
    bob.phase(call, pb::CallPhase::Connecting, PROMPT).await?;
    bob.client.hangup(call).await?;
    alice.ended(call, PROMPT).await?;
    bob.ended(call, PROMPT).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    unaffected(&server, &mut alice, &mut bob).await
}
