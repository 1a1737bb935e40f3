//! One integration-test binary for the `pacloud` command and its local
//! server: the API over a real socket (server on port 0), the embedded
//! SQLite store and queue, signed artifact URLs, and the CLI binary.

mod api;
mod aws;
mod binhost;
mod builds;
mod cli;
mod docker;
mod helpers;
mod key_vectors;
mod real_docker;
mod realtree;
mod sources;
mod usekey;
