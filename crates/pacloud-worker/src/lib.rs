//! pacloud's build path: a worker takes a job from the queue, claims the
//! key's lease, builds the package with real `emerge` in a fresh sandbox,
//! publishes the binary packages under a PKGDIR-shaped layout with a
//! portage-readable `Packages` index, records the outcome and only then
//! acknowledges the message.
//!
//! Architecture invariant: every external program (bwrap, docker, emerge)
//! is started from an argv list through [`runner`], never through a shell.

pub mod buildroot;
pub mod closure;
pub mod deproot;
pub mod fetch;
pub mod pkgcache;
pub mod pkgindex;
pub mod plan;
pub mod publish;
pub mod runner;
pub mod sandbox;
pub mod sign;
pub mod spot;
pub mod stats;
pub mod testkit;
pub mod tree_index;
pub mod worker;
