//! `fleetcall devices` and `fleetcall calls`: the admin API as tables.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use rustls::pki_types::pem::PemObject;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Where the server is and how to authenticate.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Base URL of the server's HTTP port.
    #[arg(long, env = "FLEETCALL_URL", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Data directory of the server: the admin token (and, for https, the
    /// certificate to trust) are read from it.
    #[arg(long, env = "FLEETCALL_DATA_DIR", default_value = "fleetcall-data")]
    pub data_dir: PathBuf,
}

/// `fleetcall devices` / `fleetcall calls`.
#[derive(Debug, Args)]
pub struct AdminArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Print the raw JSON instead of a table.
    #[arg(long)]
    json: bool,
}


/// Which table to print.
#[derive(Debug, Clone, Copy)]
pub enum Table {
    Devices,
    Calls,
}

pub fn run(args: AdminArgs, table: Table) -> anyhow::Result<()> {
    let path = match table {
        Table::Devices => "/api/devices",
        Table::Calls => "/api/calls",
    };
    let body = request(&args.server, "GET", path)?;
    let rows: Vec<Value> = serde_json::from_str(&body).context("server reply is not JSON")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let (header, cells): (&[&str], RowFn) = match table {
        Table::Devices => (&["DEVICE", "REACHABILITY", "LAST HB", "RTT", "CALL", "PHASE", "SESSIONS", "VERSION", "LAST ERROR"], device_row),
        Table::Calls => (&["CALL", "KIND", "PHASE", "REASON", "INITIATOR", "AGE", "MEMBERS"], call_row),
    };
    print!("{}", render(header, &rows.iter().map(cells).collect::<Vec<_>>()));
    Ok(())
}

/// Turns one JSON row of the admin API into table cells.
type RowFn = fn(&Value) -> Vec<String>;

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Array(items) => {
            if items.is_empty() {
                "-".into()
            } else {
                items.iter().map(text).collect::<Vec<_>>().join(",")
            }
        }
        other => other.to_string(),
    }
}

fn secs(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |s| format!("{s:.1}s"))
}

fn device_row(d: &Value) -> Vec<String> {
    vec![
        text(&d["id"]),
        text(&d["reachability"]),
        secs(&d["last_heartbeat_secs_ago"]),
        d["heartbeat_rtt_ms"].as_f64().map_or("-".into(), |ms| format!("{ms:.1}ms")),
        text(&d["call"]),
        text(&d["call_phase"]).trim_start_matches("CALL_PHASE_").to_lowercase(),
        text(&d["sessions"]),
        text(&d["version"]),
        text(&d["last_error"]),
    ]
}

fn call_row(c: &Value) -> Vec<String> {
    let members = c["members"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| format!("{}:{}", text(&m["device"]), text(&m["status"]).trim_start_matches("PARTICIPANT_STATUS_").to_lowercase()))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    vec![
        text(&c["id"]),
        text(&c["kind"]).trim_start_matches("CALL_KIND_").to_lowercase(),
        text(&c["phase"]).trim_start_matches("CALL_PHASE_").to_lowercase(),
        text(&c["end_reason"]).trim_start_matches("END_REASON_").to_lowercase(),
        text(&c["initiator"]),
        secs(&c["age_secs"]),
        members,
    ]
}

/// Left-aligned columns, two spaces apart.
fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out += &line(row.clone());
    }
    out
}

/// One admin API request with the admin token from the data dir; the body
/// of a 200.
pub fn request(server: &ServerArgs, method: &str, path: &str) -> anyhow::Result<String> {
    let token_path = server.data_dir.join("admin-token");
    let token = std::fs::read_to_string(&token_path).with_context(|| format!("reading {}", token_path.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("runtime")?;
    runtime.block_on(send(server, method, path, token.trim()))
}

/// Over HTTP/1.1 (plain, or TLS trusting the server's own certificate).
async fn send(args: &ServerArgs, method: &str, path: &str, token: &str) -> anyhow::Result<String> {
    let (tls, rest) = if let Some(rest) = args.server.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = args.server.strip_prefix("http://") {
        (false, rest)
    } else {
        bail!("--server must start with http:// or https://");
    };
    let host = rest.trim_end_matches('/');
    let tcp = tokio::net::TcpStream::connect(host).await.with_context(|| format!("connecting to {host}"))?;
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let response = if tls {
        let cert_path = args.data_dir.join("tls/cert.pem");
        let pem = std::fs::read(&cert_path).with_context(|| format!("reading {}", cert_path.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert?)?;
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = host.rsplit_once(':').map_or(host, |(h, _)| h).to_owned();
        let name = rustls::pki_types::ServerName::try_from(name)?;
        let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await?;
        exchange(stream, &request).await?
    } else {
        exchange(tcp, &request).await?
    };
    let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP response")?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("{path}: {status}: {}", body.trim());
    }
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok(dechunk(body));
    }
    Ok(body.to_owned())
}

async fn exchange(mut stream: impl AsyncRead + AsyncWrite + Unpin, request: &str) -> anyhow::Result<String> {
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let out = render(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()], vec!["b".into(), "22".into()]]);
        assert_eq!(out, "A    LONGER\nxyz  1\nb    22\n");
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n"), "Wikipedia");
    }
}
