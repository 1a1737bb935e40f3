//! pacloud's domain: what a build request is, how it becomes a build key,
//! what a build record is and how it may change, and the three ports through
//! which the rest of the system stores records, queues jobs and keeps
//! artifacts.
//!
//! Architecture invariant: this crate performs no I/O of its own and depends
//! on no AWS SDK, database driver or HTTP stack. Everything that touches the
//! outside world does so through the traits in [`ports`], which the
//! deployment crates (embedded SQLite/directory, AWS) implement.

pub mod eta;
pub mod grammar;
pub mod key;
pub mod ports;
pub mod published_key;
pub mod record;
pub mod request;
pub mod service;
pub mod stats;
pub mod target;
pub mod time;
pub mod tree;

pub use grammar::{Atom, Category, PackageName, UseFlag, UseSet, Version};
pub use key::{BuildKey, KeyVersion};
pub use record::{ArtifactInfo, BuildRecord, ComputeInfo, FailureClass, FailureInfo, Lease, Status, TransitionError};
pub use request::{BuildRequest, BuildSpec, ValidationError};
pub use target::{Target, TargetName, TargetSet};
pub use time::{Clock, Millis, SystemClock};
