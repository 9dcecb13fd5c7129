//! `dream demo`, the README's first command, runs end to end.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use dream_testkit::{Guard, bin, get, run};
use nix::sys::signal::Signal;

#[test]
fn auto_deploy_under_load_has_zero_errors() {
    let (status, out, err) = run(
        Command::new(bin("dream")).args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--auto-deploy",
            "250ms",
            "--duration",
            "3s",
        ]),
        Duration::from_secs(60),
    );
    assert!(status.success(), "{out}\n{err}");
    assert!(out.contains("result: OK"), "{out}");
    assert!(out.contains("0 failed"), "{out}");
    let deploys: u32 = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("dream demo: ")?
                .split(" deploys")
                .next()?
                .parse()
                .ok()
        })
        .expect("deploy count");
    assert!(deploys >= 4, "{out}");
    // The run, as a page, with its deploys marked (the initial one is
    // before the referee starts).
    let page = out
        .lines()
        .find_map(|l| l.strip_prefix("dream demo: the run as a page: "))
        .unwrap_or_else(|| panic!("no page named in: {out}"));
    let html = std::fs::read_to_string(page).unwrap();
    let _ = std::fs::remove_file(page);
    let marks = html
        .matches("<g class=\"mark\" data-kind=\"deploy\"")
        .count();
    assert!(marks >= 3, "{marks} marks for {deploys} deploys");
}

#[test]
fn serves_the_blue_site_and_stops_on_ctrl_c() {
    let mut demo = Guard::spawn(
        Command::new(bin("dream"))
            .args(["demo", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped()),
    );
    let addr = demo.listening_addr();
    let stdout = demo.child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("dream demo: serving http://"), "{first}");
    let page = get(addr, "/", &[]);
    assert!(page.text().contains("Blue site"), "{}", page.text());
    let release = page.header("x-dream-release").unwrap().to_string();
    assert!(
        page.text().contains(&format!("release {release}")),
        "the page names its release"
    );
    assert_eq!(get(addr, "/style.css", &[]).status, 200);
    demo.signal(Signal::SIGINT);
    assert!(demo.wait_exit(Duration::from_secs(30)).success());
}
