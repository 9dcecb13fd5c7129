//! `dream fleet`: one release onto many hosts, ending on the new release
//! everywhere or on the old one everywhere.
//!
//! `wire` is the protocol between a coordinator and each host's
//! `dream agent` (frames, messages, deadlines); `agent` is a host's side,
//! which treats its coordinator as untrusted; `coordinator` is the fleet's
//! policy (lock, prepare, waves, canary, max-fail, revert, commit) and
//! reaches hosts through a `transport` (OpenSSH, or a pipe to an agent in
//! this process). [`Host`] and [`Rollout`] are what the policy is given.

mod agent;
pub mod coordinator;
pub mod delta;
pub mod transport;
pub mod wire;

pub use agent::{Agent, LEASE_EVERY};
pub use coordinator::{Coordinator, Fleet, Outcome, Verdict};
pub use transport::{Local, Ssh, Transport};
pub use wire::*;

use std::time::Duration;

/// A host of the fleet: `[user@]host[:port]` as given, and its deploy
/// root there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub root: String,
}

impl Host {
    /// `[user@]host[:port]` with the fleet's root.
    pub fn parse(s: &str, root: &str) -> Result<Host, String> {
        let s = s.trim();
        let host = s.rsplit_once('@').map_or(s, |(_, h)| h);
        let bad = host.is_empty()
            || s.starts_with('-')
            || s.chars().any(|c| c.is_whitespace() || c.is_control());
        if bad {
            return Err(format!("invalid host {s:?} (expected [user@]host[:port])"));
        }
        if let Some((_, port)) = host.rsplit_once(':')
            && !host.contains('[')
            && port.parse::<u16>().is_err()
        {
            return Err(format!("invalid port in host {s:?}"));
        }
        Ok(Host {
            name: s.to_string(),
            root: root.to_string(),
        })
    }
}

/// The switch's order: `canary` hosts alone first, then groups of
/// `group` (all the rest when `None`; a number, or a percentage of the
/// hosts), `wait` between groups; up to `max_fail` hosts may fail their
/// switch before the fleet reverts.
#[derive(Debug, Clone, Default)]
pub struct Rollout {
    pub canary: usize,
    pub group: Option<Group>,
    pub wait: Duration,
    pub max_fail: usize,
}

/// A wave's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Hosts(usize),
    Percent(u32),
}

impl std::str::FromStr for Group {
    type Err = String;
    fn from_str(s: &str) -> Result<Group, String> {
        let bad = || format!("{s:?}: a number of hosts (3) or a percentage (25%)");
        match s.strip_suffix('%') {
            Some(p) => match p.parse::<u32>() {
                Ok(p) if (1..=100).contains(&p) => Ok(Group::Percent(p)),
                _ => Err(bad()),
            },
            None => match s.parse::<usize>() {
                Ok(n) if n > 0 => Ok(Group::Hosts(n)),
                _ => Err(bad()),
            },
        }
    }
}

impl Rollout {
    /// The hosts' indexes, wave by wave.
    pub fn waves(&self, hosts: usize) -> Vec<std::ops::Range<usize>> {
        let canary = self.canary.min(hosts);
        let mut waves = Vec::new();
        if canary > 0 {
            waves.push(0..canary);
        }
        let size = match self.group {
            None => hosts.saturating_sub(canary).max(1),
            Some(Group::Hosts(n)) => n,
            Some(Group::Percent(p)) => (hosts * p as usize).div_ceil(100).max(1),
        };
        let mut at = canary;
        while at < hosts {
            waves.push(at..(at + size).min(hosts));
            at += size;
        }
        waves
    }
}
