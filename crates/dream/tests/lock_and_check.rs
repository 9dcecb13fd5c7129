//! `dream lock` contention and `dream check` as a referee that fails when
//! it should.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dream_testkit::{Guard, Tree, bin, probe, read_report, run};
use nix::sys::signal::Signal;
use serde_json::Value;

#[test]
fn lock_contention_names_the_holder() {
    let tree = Tree::new();
    let lock = tree.path().join("deploy.lock");
    let report = tree.path().join("holder.json");
    let holder = Guard::spawn(
        Command::new(bin("dream"))
            .args(["lock", "-n"])
            .arg(&lock)
            .arg(probe())
            .arg("--report")
            .arg(&report),
    );
    // The lock is held by the program dream exec'd: same pid.
    let r = read_report(&report);
    assert_eq!(r["pid"], holder.pid());
    let try_lock = || {
        run(
            Command::new(bin("dream"))
                .args(["lock", "-n"])
                .arg(&lock)
                .arg("true"),
            Duration::from_secs(10),
        )
    };
    let (status, _, err) = try_lock();
    assert_eq!(status.code(), Some(111), "{err}");
    assert!(
        err.starts_with("dream lock: cannot lock"),
        "one prefix: {err}"
    );
    assert!(
        err.contains(&format!("held by pid {}", holder.pid())),
        "{err}"
    );
    assert!(
        err.contains("dream-probe"),
        "the holder's command is named: {err}"
    );

    // Without -n, a second taker waits until the holder is gone.
    let mut waiter = Guard::spawn(
        Command::new(bin("dream"))
            .arg("lock")
            .arg(&lock)
            .arg("true"),
    );
    dream_testkit::wait_open(waiter.pid(), &lock);
    assert!(
        waiter.child.try_wait().unwrap().is_none(),
        "the waiter must block"
    );
    // SIGKILL: the kernel releases a flock with its last descriptor, so no
    // stale lock survives a killed holder.
    holder.signal(Signal::SIGKILL);
    assert!(waiter.wait_exit(Duration::from_secs(10)).success());
    let (status, _, err) = try_lock();
    assert!(status.success(), "{err}");
}

#[test]
fn a_lock_file_that_cannot_be_opened_is_a_failure_not_a_retry() {
    let tree = dream_testkit::Tree::new();
    let missing = tree.path().join("no such dir").join("lock");
    let (status, _, err) = run(
        Command::new(bin("dream"))
            .arg("lock")
            .arg(&missing)
            .arg("true"),
        Duration::from_secs(10),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("dream lock: cannot lock"), "{err}");
    assert!(!missing.parent().unwrap().exists(), "nothing created");
}

fn check_json(url: &str, extra: &[&str]) -> (Option<i32>, Value, String) {
    let (status, out, err) = run(
        Command::new(bin("dream"))
            .args([
                "check",
                url,
                "--json",
                "--duration",
                "1s",
                "--connections",
                "4",
            ])
            .args(extra),
        Duration::from_secs(30),
    );
    let v = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
    (status.code(), v, err)
}

#[test]
fn check_fails_against_a_closed_port() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (code, v, err) = check_json(&format!("http://127.0.0.1:{port}/"), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(v["errors"]["connect_refused"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["ok"], false);
}

/// Reads one request's head, up to its empty line; false at the end of the
/// stream.
fn read_head(r: &mut impl BufRead) -> bool {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return false;
        }
        if line == "\r\n" {
            return true;
        }
    }
}

/// A server on a thread: one response per request, keep-alive, with the
/// header and body releases chosen by `pick(n)` for the n-th response.
fn fake_server(pick: fn(u64) -> (&'static str, &'static str)) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                loop {
                    if !read_head(&mut r) {
                        return;
                    }
                    let (h, b) = pick(COUNT.fetch_add(1, Ordering::SeqCst));
                    let body = format!("release {b}\n");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nX-Dream-Release: {h}\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}/")
}

#[test]
fn check_counts_header_body_mismatch_as_mixed() {
    let url = fake_server(|_| ("a", "b"));
    // Bodies are judged only when asked: "release b" in a page is just text.
    let (code, v, err) = check_json(&url, &["--keep-alive"]);
    assert_eq!(code, Some(0), "{err} {v}");
    assert_eq!(v["mixed"], 0, "{v}");
    let (code, v, err) = check_json(
        &url,
        &["--keep-alive", "--body-pattern", "release ([a-z]+)"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(v["mixed"].as_u64().unwrap() > 0, "{v}");
}

/// One keep-alive connection moving on to a newer release can be a proxy's
/// doing; going back to one it left is mixed. The same error is one example
/// with a count, not five copies.
#[test]
fn check_judges_a_connection_going_back_and_counts_repeated_examples() {
    let forward = fake_server(|n| if n < 10 { ("a", "a") } else { ("b", "b") });
    let (code, v, err) = check_json(&forward, &["--keep-alive"]);
    assert_eq!(code, Some(0), "{err} {v}");
    let url = fake_server(|n| if n % 2 == 0 { ("a", "a") } else { ("b", "b") });
    let (code, v, _) = check_json(&url, &["--keep-alive"]);
    assert_eq!(code, Some(1));
    let examples = v["examples"].as_array().unwrap();
    assert!(
        examples
            .iter()
            .any(|e| e.as_str().unwrap().contains("went back")
                && e.as_str().unwrap().contains("times")),
        "{v}"
    );
    let texts: std::collections::HashSet<_> = examples
        .iter()
        .map(|e| e.as_str().unwrap().split(" (").next().unwrap())
        .collect();
    assert_eq!(texts.len(), examples.len(), "no repeated example: {v}");
}

#[test]
fn check_counts_two_releases_on_one_connection_as_mixed() {
    let url = fake_server(|n| if n % 2 == 0 { ("a", "a") } else { ("b", "b") });
    let (code, v, _) = check_json(&url, &["--keep-alive"]);
    assert_eq!(code, Some(1));
    assert!(v["mixed"].as_u64().unwrap() > 0, "{v}");
    // The same server is consistent per response: with a new connection per
    // request nothing is mixed.
    let (code, v, err) = check_json(&url, &[]);
    assert_eq!(code, Some(0), "{err} {v}");
    assert_eq!(v["mixed"], 0);
    assert!(v["releases"]["a"].as_u64().unwrap() > 0 && v["releases"]["b"].as_u64().unwrap() > 0);
}

#[test]
fn check_rejects_bad_input_with_usage_errors() {
    for args in [
        vec!["check", "ftp://x/"],
        vec!["check", "http://127.0.0.1:1/", "--duration", "soon"],
        vec!["check", "http://127.0.0.1:1/", "--body-pattern", "no group"],
        vec!["check", "http://127.0.0.1:1/", "--connections", "0"],
        vec!["check"],
        vec!["no-such-command"],
    ] {
        let (status, _, err) = run(
            Command::new(bin("dream")).args(&args),
            Duration::from_secs(10),
        );
        assert_eq!(status.code(), Some(100), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// A server that answers every request with `head` and then `body(write)`,
/// then closes the connection.
fn raw_server(
    head: &'static str,
    body: fn(&mut std::net::TcpStream) -> std::io::Result<()>,
) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                    line.clear();
                }
                if w.write_all(head.as_bytes()).is_ok() {
                    let _ = body(&mut w);
                }
            });
        }
    });
    format!("http://{addr}/")
}

/// A body cut short (10 MiB promised, 2 MiB sent, connection closed) and a
/// chunked body that never ends were counted as 200 OK.
#[test]
fn check_counts_truncated_and_endless_bodies_as_errors() {
    let truncated = raw_server("HTTP/1.1 200 OK\r\nContent-Length: 10485760\r\n\r\n", |w| {
        w.write_all(&vec![b'x'; 2 << 20])
    });
    let (code, v, err) = check_json(&truncated, &[]);
    assert_eq!(code, Some(1), "{err} {v}");
    assert_eq!(v["responses"], 0, "{v}");
    assert!(v["error_total"].as_u64().unwrap() > 0, "{v}");

    let endless = raw_server(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        |w| {
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_secs(20) {
                w.write_all(b"400\r\n")?;
                w.write_all(&[b'y'; 0x400])?;
                w.write_all(b"\r\n")?;
            }
            Ok(())
        },
    );
    let (code, v, err) = check_json(&endless, &["--timeout", "500ms"]);
    assert_eq!(code, Some(1), "{err} {v}");
    assert!(v["errors"]["read_timeout"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["responses"], 0, "{v}");
}

/// Keep-alive: the requests that had to open their connection are counted
/// apart from those sent on one already open, and the reconnects apart
/// from each client's first connection. This server answers each
/// connection's first request 300 ms late and closes every connection
/// after its third answer, so a third of the requests reconnect and only
/// they are slow.
#[test]
fn check_counts_reconnects_apart_from_requests_on_open_connections() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                for n in 0..3 {
                    if !read_head(&mut r) {
                        return;
                    }
                    if n == 0 {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    let close = if n == 2 { "Connection: close\r\n" } else { "" };
                    let resp = format!("HTTP/1.1 200 OK\r\n{close}Content-Length: 2\r\n\r\nok");
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let (code, v, err) = check_json(&url, &["--keep-alive"]);
    assert_eq!(code, Some(0), "{err} {v}");
    let responses = v["responses"].as_u64().unwrap();
    let connects = v["connects"].as_u64().unwrap();
    assert!(connects >= 4 && connects * 3 >= responses, "{v}");
    assert!(
        v["connect_latency"]["p50_us"].as_u64().unwrap() >= 300_000,
        "{v}"
    );
    // Each of the 4 clients' first connection is not a reconnect.
    assert_eq!(v["reconnects"].as_u64().unwrap() + 4, connects, "{v}");
    assert!(
        v["reconnect_latency"]["p50_us"].as_u64().unwrap() >= 300_000,
        "{v}"
    );
    let kept = &v["kept_latency"];
    assert!(kept["max_us"].as_u64().unwrap() > 0, "{v}");
    assert!(kept["p50_us"].as_u64().unwrap() < 300_000, "{v}");
    // A connection per request: every request opens one, none is a reconnect.
    let (code, v, err) = check_json(&url, &[]);
    assert_eq!(code, Some(0), "{err} {v}");
    assert_eq!(v["connects"], v["responses"], "{v}");
    assert_eq!(v["reconnects"], 0, "{v}");
}

/// `--rate`: an open loop sends on schedule, whatever the answers: about
/// rate x duration requests, and a server that stalls shows in the
/// latency (counted from when each request was due), not in a slower
/// client.
#[test]
fn check_rate_sends_on_a_schedule() {
    let url = fake_server(|_| ("a", "a"));
    let (code, v, err) = check_json(&url, &["--keep-alive", "--rate", "200"]);
    assert_eq!(code, Some(0), "{err}");
    let n = v["requests"].as_u64().unwrap();
    // 200 due in the second; a loaded machine may start late, never early.
    assert!((120..=204).contains(&n), "{n} requests: {v}");
}

/// A browser to render pages with: headless Chromium, if installed.
fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser"].into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// `dream check --report FILE.html --root ROOT`: one self-contained page
/// (no script, nothing fetched), rendered by a real browser (headless
/// Chromium): one mark per deploy the root's history has inside the run,
/// and the summary's totals are the JSON's.
#[test]
fn check_writes_a_page_a_browser_renders_with_one_mark_per_deploy() {
    let Some(browser) = chromium() else {
        dream_testkit::prerequisite(false, "chromium, for the report page test");
        return;
    };
    let root = dream_testkit::Root::new();
    let r = root.path().to_str().unwrap();
    let sources = Tree::new();
    let site = dream_testkit::stamped_site(&sources, "site", "");
    let s = site.to_str().unwrap();
    let deploy = |id: &str| {
        let (code, _, err) = dream_testkit::dream(&[
            "deploy",
            s,
            "--root",
            r,
            "--id",
            id,
            "--build",
            dream_testkit::STAMP,
        ]);
        assert_eq!(code, Some(0), "{err}");
    };
    deploy("one");
    let (_sup, addr) = root.serve(&["--workers", "2", "--ready", "notify"], &[]);
    let page = sources.path().join("run.html");
    let mut check = Command::new(bin("dream"));
    check
        .args([
            "check",
            &format!("http://{addr}/"),
            "--duration",
            "5s",
            "--json",
        ])
        .arg("--report")
        .arg(&page)
        .args(["--root", r])
        .stdout(std::process::Stdio::piped());
    let child = check.spawn().unwrap();
    // Two deploys while it runs (each waits for its generation to settle).
    deploy("two");
    deploy("three");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{:?}", out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&v["ok"], &v["errors"]["connect_refused"]),
        (&true.into(), &0.into()),
        "{v}"
    );
    // The deploys the history has inside the run: what the page must mark.
    let start = v["started_unix_s"].as_f64().unwrap();
    let end = start + v["duration_s"].as_f64().unwrap();
    let history = std::fs::read_to_string(root.path().join(".dream/history")).unwrap();
    let inside = history
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "switched" && e.get("reason").is_none())
        .filter(|e| {
            let t = humantime::parse_rfc3339(e["time"].as_str().unwrap())
                .unwrap()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
            (start..=end).contains(&t)
        })
        .count();
    assert!(
        inside >= 1,
        "the last deploy happened inside the run: {history}"
    );

    let html = std::fs::read_to_string(&page).unwrap();
    assert!(
        !html.contains("<script") && !html.contains(" src=") && !html.contains(" href="),
        "self-contained: nothing to run or fetch"
    );
    let profile = Tree::new();
    let (status, dom, err) = run(
        Command::new(browser)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("file://{}", page.display())),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{browser}: {err}");
    // Each chart carries the marks: three charts, one mark each per deploy.
    let marks = dom.matches("class=\"mark\"").count();
    assert_eq!(marks, 3 * inside, "{inside} deploys inside the run:\n{dom}");
    assert!(
        dom.contains("data-kind=\"deploy\" data-release=\"three\""),
        "{dom}"
    );
    let cell = |id: &str| -> String {
        let open = format!("<td id=\"{id}\">");
        let at = dom
            .find(&open)
            .unwrap_or_else(|| panic!("no {id} cell in:\n{dom}"))
            + open.len();
        dom[at..].split('<').next().unwrap().to_string()
    };
    assert_eq!(cell("responses"), v["responses"].to_string());
    assert_eq!(cell("errors"), v["error_total"].to_string());
    assert_eq!(cell("mixed"), v["mixed"].to_string());
    assert_eq!(cell("marks"), inside.to_string());
}
