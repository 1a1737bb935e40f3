//! pacloud's embedded adapters: the deployment a new user starts with, in
//! one process and one data directory.
//!
//! - [`SqliteStore`] and [`SqliteQueue`] share one SQLite file (WAL mode):
//!   build records with revision-conditional writes (the semantics of
//!   DynamoDB conditional puts) and a jobs table with visibility deadlines,
//!   receive counts and a dead-letter table (the semantics of SQS with a
//!   redrive policy).
//! - [`DirArtifactStore`] keeps artifacts in a directory laid out like a
//!   portage PKGDIR and hands out URLs signed with HMAC-SHA256 and an
//!   expiry, which [`artifact_router`] serves and refuses (403) when expired
//!   or tampered.

mod artifacts;
mod db;
mod queue;
mod store;

pub use artifacts::{DirArtifactStore, SigningKey, UrlCheck, artifact_router, binhost_router};
pub use db::{Db, DbError};
pub use queue::{DeadLetter, SqliteQueue};
pub use store::SqliteStore;
