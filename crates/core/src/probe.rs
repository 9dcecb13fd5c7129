//! One plain HTTP/1.1 request through a listening address, as `deploy
//! --verify` and a canary's judge send it: the status code and the
//! `X-Dream-Release` and `X-Dream-Generation` headers of the answer.

use std::io::{Read, Write};
use std::time::Duration;

/// What an answer said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub code: u16,
    /// `X-Dream-Release`.
    pub release: Option<String>,
    /// `X-Dream-Generation`.
    pub generation: Option<u64>,
}

/// A plain HTTP/1.1 GET, answered within `limit`.
pub fn http_get(address: &str, path: &str, limit: Duration) -> Result<Answer, String> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: dream\r\nConnection: close\r\n\r\n"
    );
    let fail = |e: std::io::Error| format!("GET {path} on {address}: {e}");
    let mut head = Vec::new();
    let started = std::time::Instant::now();
    let mut read_head = |s: &mut dyn Read| -> Result<(), String> {
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
            // A server that drips its answer does not hold the caller
            // past `limit` (each read has its own timeout).
            if started.elapsed() > limit {
                return Err(format!(
                    "GET {path} on {address}: no answer within {limit:?}"
                ));
            }
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
                Err(e) => return Err(fail(e)),
            }
        }
        Ok(())
    };
    if let Some(p) = address.strip_prefix("unix:") {
        let mut s = std::os::unix::net::UnixStream::connect(p).map_err(fail)?;
        s.set_read_timeout(Some(limit)).map_err(fail)?;
        s.write_all(request.as_bytes()).map_err(fail)?;
        read_head(&mut s)?;
    } else {
        let mut addr: std::net::SocketAddr = address
            .parse()
            .map_err(|_| format!("cannot verify through {address}"))?;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let mut s = std::net::TcpStream::connect_timeout(&addr, limit).map_err(fail)?;
        s.set_read_timeout(Some(limit)).map_err(fail)?;
        s.write_all(request.as_bytes()).map_err(fail)?;
        read_head(&mut s)?;
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("GET {path}: no HTTP answer"))?;
    let headers: Vec<(&str, &str)> = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_string())
    };
    Ok(Answer {
        code,
        release: header("x-dream-release"),
        generation: header("x-dream-generation").and_then(|g| g.parse().ok()),
    })
}
