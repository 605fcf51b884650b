//! A minimal HTTP/1.1 client for the admin API, `/metrics` and Janus'
//! HTTP transport: one request per connection, `Content-Length` or chunked
//! bodies, a deadline on the whole exchange.

use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body (decoded if it was chunked).
    pub body: String,
}

/// Sends one request; `body` is JSON. Fails on a network error or timeout,
/// not on an error status.
pub async fn request(
    method: &str,
    url: &str,
    bearer: Option<&str>,
    body: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Response> {
    tokio::time::timeout(timeout, exchange(method, url, bearer, body))
        .await
        .with_context(|| format!("{method} {url}: no response within {timeout:?}"))?
}

/// `GET` that must answer 200.
pub async fn get_ok(url: &str, bearer: Option<&str>) -> anyhow::Result<String> {
    let response = request("GET", url, bearer, None, Duration::from_secs(10)).await?;
    if response.status != 200 {
        bail!(
            "GET {url}: status {}: {}",
            response.status,
            response.body.trim()
        );
    }
    Ok(response.body)
}

async fn exchange(
    method: &str,
    url: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> anyhow::Result<Response> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// URLs are supported"))?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut stream = TcpStream::connect(host)
        .await
        .with_context(|| format!("connecting to {host}"))?;
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let (content, length) = match body {
        Some(b) => (
            "Content-Type: application/json\r\n",
            format!("Content-Length: {}\r\n", b.len()),
        ),
        None => ("", String::new()),
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}{content}{length}Connection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    if let Some(b) = body {
        stream.write_all(b.as_bytes()).await?;
    }
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .with_context(|| format!("{method} {url}: reading the response"))?;
    parse(&raw).with_context(|| format!("{method} {url}"))
}

fn parse(raw: &[u8]) -> anyhow::Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers in the response")?;
    let head = std::str::from_utf8(&raw[..split]).context("response headers are not UTF-8")?;
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("bad status line")?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        match name.trim().to_ascii_lowercase().as_str() {
            "transfer-encoding" => chunked = value.trim().eq_ignore_ascii_case("chunked"),
            "content-length" => length = value.trim().parse::<usize>().ok(),
            _ => {}
        }
    }
    if chunked {
        body = dechunk(&body)?;
    } else if let Some(n) = length {
        body.truncate(n);
    }
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_text = std::str::from_utf8(&data[..line_end])?
            .split(';')
            .next()
            .unwrap_or("")
            .trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_and_chunked_bodies() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello and more").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "hello"));
        let r = parse(b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n4\r\nwiki\r\n5;x=1\r\npedia\r\n0\r\n\r\n").unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "wikipedia"));
        assert!(parse(b"garbage").is_err());
    }

    #[tokio::test]
    async fn unreachable_and_bad_urls_fail_fast() {
        let err = request(
            "GET",
            "http://127.0.0.1:1/x",
            None,
            None,
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
        assert!(format!("{err:#}").contains("connecting"), "{err:#}");
        assert!(
            request("GET", "https://x/", None, None, Duration::from_secs(1))
                .await
                .is_err()
        );
    }
}
