//! The release store on disk: releases and their history ([`release`]),
//! staging a source into a new release ([`stage`], beneath a directory
//! descriptor with [`tree`]), content manifests ([`manifest`]), the deploy
//! lock ([`lock`]) and the hooks around a switch ([`hooks`]).

pub mod hooks;
pub mod lock;
pub mod manifest;
pub mod release;
pub mod stage;
pub mod tree;
