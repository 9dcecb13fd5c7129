//! The sockets: what to listen on ([`spec`]), binding it and taking it
//! from systemd ([`listen`]), and starting a worker with an exact
//! descriptor layout ([`spawn`]).

pub mod listen;
pub mod spawn;
pub mod spec;
