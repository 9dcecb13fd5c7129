//! Dropping root after binding: `--user USER[:GROUP]`.

use nix::unistd::{Group, User, setgid, setgroups, setuid};

use crate::exit::{Failure, Result};

/// The uid and gid that `USER[:GROUP]` names.
pub fn lookup(spec: &str) -> Result<(u32, u32)> {
    let (user_name, group_name) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = lookup_user(user_name)?;
    let gid = match group_name {
        Some(g) => lookup_group(g)?.gid,
        None => user.gid,
    };
    Ok((user.uid.as_raw(), gid.as_raw()))
}

/// Switches this process to `spec` (`user` or `user:group`), dropping all
/// supplementary groups. Needs root.
pub fn drop_to(spec: &str) -> Result {
    let (uid, gid) = lookup(spec)?;
    let (uid, gid) = (
        nix::unistd::Uid::from_raw(uid),
        nix::unistd::Gid::from_raw(gid),
    );
    if !nix::unistd::geteuid().is_root() {
        if nix::unistd::geteuid() == uid {
            return Ok(());
        }
        return Err(Failure::usage(format!(
            "--user {spec}: dream must start as root to switch users"
        )));
    }
    let fail = |what: &str, e: nix::Error| Failure::failed(format!("--user {spec}: {what}: {e}"));
    setgroups(&[]).map_err(|e| fail("setgroups", e))?;
    setgid(gid).map_err(|e| fail("setgid", e))?;
    setuid(uid).map_err(|e| fail("setuid", e))?;
    Ok(())
}

fn lookup_user(name: &str) -> Result<User> {
    let found = match name.parse::<u32>() {
        Ok(uid) => User::from_uid(uid.into()),
        Err(_) => User::from_name(name),
    };
    found
        .map_err(|e| Failure::failed(format!("--user: cannot look up {name:?}: {e}")))?
        .ok_or_else(|| Failure::usage(format!("--user: no such user {name:?}")))
}

fn lookup_group(name: &str) -> Result<Group> {
    let found = match name.parse::<u32>() {
        Ok(gid) => Group::from_gid(gid.into()),
        Err(_) => Group::from_name(name),
    };
    found
        .map_err(|e| Failure::failed(format!("--user: cannot look up group {name:?}: {e}")))?
        .ok_or_else(|| Failure::usage(format!("--user: no such group {name:?}")))
}
