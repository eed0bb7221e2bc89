//! The `berth` command's library half: the in-process platform wiring, the API client and
//! the demo, shared by the CLI binary and the bench harness.

pub mod client;
pub mod endpoints;
pub mod platform;
