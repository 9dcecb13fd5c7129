//! Listen specifications: the strings users write after `--listen`.
//!
//! | spec               | meaning                                             |
//! |--------------------|-----------------------------------------------------|
//! | `127.0.0.1:8080`   | one IPv4 address                                    |
//! | `[::1]:8080`       | one IPv6 address                                    |
//! | `:8080`            | every address, IPv6 and IPv4 (dual-stack `[::]`)    |
//! | `localhost:8080`   | a host name, resolved once at start                 |
//! | `unix:/run/x.sock` | a Unix stream socket at that path                   |
//!
//! Parsing is pure; resolution of host names is a separate step so that a
//! malformed spec and an unknown host are reported differently.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;

/// Longest path the kernel accepts in `sockaddr_un.sun_path`, less the NUL.
pub const UNIX_PATH_MAX: usize = 107;

/// A parsed listen specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenSpec {
    /// A numeric address and port.
    Tcp(SocketAddr),
    /// `:PORT`: all addresses.
    AnyAddress(u16),
    /// A host name to resolve, and a port.
    Host(String, u16),
    /// A Unix stream socket path.
    Unix(PathBuf),
}

/// Why a listen spec was rejected, or could not be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "malformed listen spec {spec:?}: {why} (examples: 127.0.0.1:8080, [::1]:8080, :8080, unix:/run/app.sock)"
    )]
    Malformed { spec: String, why: &'static str },
    #[error("cannot resolve host {host:?} in listen spec {spec:?}: {why}")]
    UnknownHost {
        spec: String,
        host: String,
        why: String,
    },
}

impl ListenSpec {
    /// The addresses to bind, resolving a host name if there is one.
    pub fn resolve(&self) -> Result<Resolved, SpecError> {
        Ok(match self {
            ListenSpec::Tcp(addr) => Resolved::Tcp(*addr),
            ListenSpec::AnyAddress(port) => {
                Resolved::Tcp(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), *port))
            }
            ListenSpec::Host(host, port) => {
                let mut addrs = (host.as_str(), *port).to_socket_addrs().map_err(|e| {
                    SpecError::UnknownHost {
                        spec: self.to_string(),
                        host: host.clone(),
                        why: e.to_string(),
                    }
                })?;
                let addr = addrs.next().ok_or_else(|| SpecError::UnknownHost {
                    spec: self.to_string(),
                    host: host.clone(),
                    why: "no addresses".into(),
                })?;
                Resolved::Tcp(addr)
            }
            ListenSpec::Unix(path) => Resolved::Unix(path.clone()),
        })
    }

    /// True for `:PORT`, which binds IPv6 and IPv4 together.
    pub fn is_dual_stack(&self) -> bool {
        matches!(self, ListenSpec::AnyAddress(_))
    }
}

/// A spec with its host name resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let bad = |why| SpecError::Malformed {
            spec: spec.to_string(),
            why,
        };
        if spec.is_empty() {
            return Err(bad("empty"));
        }
        if spec.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(bad("contains white space or control characters"));
        }
        if let Some(path) = spec.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("no path after unix:"));
            }
            if path.len() > UNIX_PATH_MAX {
                return Err(bad("Unix socket path longer than 107 bytes"));
            }
            if path.ends_with('/') {
                return Err(bad("Unix socket path names a directory"));
            }
            return Ok(ListenSpec::Unix(PathBuf::from(path)));
        }
        if spec.starts_with('/') || spec.starts_with("./") {
            return Err(bad("a path needs the unix: prefix"));
        }
        // A URL is what people paste: say what to drop.
        if let Some((scheme, _)) = spec.split_once("://") {
            return Err(bad(match scheme.to_ascii_lowercase().as_str() {
                "http" | "https" => {
                    "a listen spec is an address, not a URL: drop the http:// (127.0.0.1:8080)"
                }
                "tcp" => "a listen spec is an address, not a URL: drop the tcp:// (127.0.0.1:8080)",
                _ => "a listen spec is an address, not a URL (127.0.0.1:8080, or unix:/path)",
            }));
        }
        if let Ok(addr) = spec.parse::<SocketAddr>() {
            return Ok(ListenSpec::Tcp(addr));
        }
        let (host, port) = spec.rsplit_once(':').ok_or(bad("no :PORT"))?;
        let port = parse_port(port).ok_or(bad("the port is not a number from 0 to 65535"))?;
        if host.is_empty() {
            return Ok(ListenSpec::AnyAddress(port));
        }
        if host.starts_with('[') || host.contains(':') {
            return Err(bad("not a valid IPv6 address (write it as [::1]:8080)"));
        }
        if host.parse::<IpAddr>().is_ok() || looks_numeric(host) {
            return Err(bad("not a valid IPv4 address"));
        }
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        {
            return Err(bad("not a valid host name"));
        }
        Ok(ListenSpec::Host(host.to_string(), port))
    }
}

fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn looks_numeric(host: &str) -> bool {
    host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenSpec::Tcp(addr) => write!(f, "{addr}"),
            ListenSpec::AnyAddress(port) => write!(f, ":{port}"),
            ListenSpec::Host(host, port) => write!(f, "{host}:{port}"),
            ListenSpec::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> ListenSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn malformed(s: &str) {
        match s.parse::<ListenSpec>() {
            Err(SpecError::Malformed { .. }) => {}
            other => panic!("{s:?} should be malformed, got {other:?}"),
        }
    }

    #[test]
    fn accepts_the_documented_forms() {
        assert_eq!(
            ok("127.0.0.1:8080"),
            ListenSpec::Tcp("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            ok("[::1]:8080"),
            ListenSpec::Tcp("[::1]:8080".parse().unwrap())
        );
        assert_eq!(ok("[::]:80"), ListenSpec::Tcp("[::]:80".parse().unwrap()));
        assert_eq!(ok(":8080"), ListenSpec::AnyAddress(8080));
        assert_eq!(ok("localhost:0"), ListenSpec::Host("localhost".into(), 0));
        assert_eq!(
            ok("unix:/tmp/a.sock"),
            ListenSpec::Unix("/tmp/a.sock".into())
        );
        assert_eq!(ok("unix:rel.sock"), ListenSpec::Unix("rel.sock".into()));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "127.0.0.1:8080",
            "[::1]:8080",
            ":8080",
            "localhost:80",
            "unix:/x/y.sock",
        ] {
            assert_eq!(ok(s).to_string(), s);
        }
    }

    #[test]
    fn rejects_malformed_specs() {
        for s in [
            "",
            "8080",
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:65536",
            "127.0.0.1:-1",
            "127.0.0.1:80x",
            "300.1.1.1:80",
            "1.2.3:80",
            "::1:8080",
            "[::1:8080",
            "[::g]:80",
            "unix:",
            "unix:/tmp/dir/",
            "/tmp/a.sock",
            "host name:80",
            "exa$mple:80",
            "a\nb:80",
        ] {
            malformed(s);
        }
        let long = format!("unix:/{}", "x".repeat(200));
        malformed(&long);
    }

    #[test]
    fn a_url_is_refused_with_what_to_write_instead() {
        for (s, says) in [
            ("http://127.0.0.1:8080", "drop the http://"),
            ("HTTPS://localhost:443", "drop the http://"),
            ("tcp://0.0.0.0:80", "drop the tcp://"),
            ("ftp://x:21", "not a URL"),
        ] {
            let e = s.parse::<ListenSpec>().unwrap_err().to_string();
            assert!(e.contains(says) && !e.contains("IPv6"), "{s}: {e}");
        }
    }

    #[test]
    fn any_address_resolves_to_ipv6_unspecified() {
        assert_eq!(
            ok(":0").resolve().unwrap(),
            Resolved::Tcp("[::]:0".parse().unwrap())
        );
    }
}
