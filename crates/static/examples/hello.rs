//! A worker in Rust on hyper: takes its listener from LISTEN_FDS or fd 0 with
//! `dream_protocol::take_listeners` (the only dream crate it needs), says READY=1, drains on SIGTERM.
//!
//! Run under dream:  dream serve --listen :8080 --ready notify -- ./hello

use std::convert::Infallible;

use bytes::Bytes;
use dream_protocol::{self as protocol, StdListener};
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Take the sockets before any thread starts, so the protocol variables
    // can be cleared.
    let listeners = protocol::take_listeners()?;
    let Some(StdListener::Tcp(listener)) = listeners
        .into_iter()
        .next()
        .map(|l| l.into_std())
        .transpose()?
    else {
        return Err("expected a TCP listener".into());
    };
    listener.set_nonblocking(true)?;
    let release = std::env::var("DREAM_RELEASE").unwrap_or_else(|_| "dev".into());
    let generation = std::env::var("DREAM_GENERATION").unwrap_or_else(|_| "0".into());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let graceful = hyper_util::server::graceful::GracefulShutdown::new();
            // Set on SIGTERM: every further response says `Connection:
            // close`, so keep-alive clients reconnect (to the next
            // generation) instead of being cut off between two requests.
            let draining = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let _ = protocol::notify("READY=1");
            loop {
                tokio::select! {
                    conn = listener.accept() => {
                        let (stream, _) = conn?;
                        let (release, generation) = (release.clone(), generation.clone());
                        let draining = draining.clone();
                        let service = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                            let body = format!("<p>release {release}</p>\n");
                            let mut resp = Response::builder()
                                .header("x-dream-release", release.as_str())
                                .header("x-dream-generation", generation.as_str())
                                .header("content-type", "text/html");
                            if draining.load(std::sync::atomic::Ordering::SeqCst) {
                                resp = resp.header("connection", "close");
                            }
                            let resp = resp
                                .body(Full::new(Bytes::from(body)))
                                .expect("valid response");
                            async move { Ok::<_, Infallible>(resp) }
                        });
                        // half_close: a client that shuts its side after
                        // its request still gets the answer. (A pipelining
                        // client's queued requests are answered by waiting
                        // to say close until none is left: see
                        // doc/protocol.md and dream static.)
                        let conn = hyper::server::conn::http1::Builder::new()
                            .half_close(true)
                            .serve_connection(TokioIo::new(stream), service);
                        let conn = graceful.watch(conn);
                        tokio::spawn(async move { let _ = conn.await; });
                    }
                    _ = term.recv() => break,
                }
            }
            // Stop accepting; answer further requests with `Connection:
            // close`. A connection accepted a moment ago may not have sent
            // its request yet, and hyper's graceful shutdown closes idle
            // connections at once: give them a short grace first.
            drop(listener);
            draining.store(true, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            graceful.shutdown().await;
            Ok::<_, Box<dyn std::error::Error>>(())
        })
}
