//! The `pacloud` command's library: layered settings, the local server
//! (`serve`: API + embedded store, queue and artifacts), and the client
//! (`get`, `status`, `key`, `emerge`). `main.rs` only parses arguments and calls in.

pub mod aws_worker;
pub mod build;
pub mod client;
pub mod emerge;
pub mod serve;
pub mod settings;
pub mod setup;
