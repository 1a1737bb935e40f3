//! GLEP 78 signing of GPKG binary packages, the way portage's `gpkg`
//! verifier accepts them (`portage/gpkg.py`, checked against portage
//! 3.0.83): each of `metadata.tar.<comp>` and `image.tar.<comp>` gets an
//! armored detached OpenPGP signature `<archive>.sig` placed right after it,
//! and the `Manifest` (one `DATA <name> <size> BLAKE2B <hex> SHA512 <hex>`
//! line per member, signatures included) is clear-signed.
//!
//! Signing runs in the worker on the finished package, outside the build
//! sandbox: the build never sees a private key. The OpenPGP work is done by
//! rpgp (the `pgp` crate) rather than by running `gpg`, because the key can
//! live behind a remote signer (AWS KMS) that only signs digests: rpgp lets
//! us supply the raw signature ([`RemoteRsaKey`]) while it builds the packets,
//! the armor and the cleartext framework. See docs/binhost.md.
//!
//! - [`key`]: the [`Signer`] (a signing key plus its certificate), local key
//!   generation and loading, and the remote RSA key.
//! - [`gpkg`]: rewriting an unsigned (or previously signed) GPKG into a
//!   signed one, and the digests portage's `Packages` index records.

pub mod gpkg;
pub mod key;

pub use gpkg::{PackageDigests, sign_gpkg, sign_gpkg_in_place};
pub use key::{KeySource, RemoteRsaKey, Signer};

/// Everything that can go wrong while signing. A signing failure is an
/// infrastructure failure for the worker: the package is not published.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// OpenPGP packet, armor or key handling failed.
    #[error("OpenPGP: {0}")]
    Pgp(String),
    /// The remote signer (KMS) refused or failed.
    #[error("remote signer: {0}")]
    Remote(String),
    /// A key file is unusable.
    #[error("signing key {path}: {reason}")]
    Key {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The package is not a GPKG container portage would accept.
    #[error("not a GPKG package: {0}")]
    Format(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl From<pgp::errors::Error> for SignError {
    fn from(e: pgp::errors::Error) -> Self {
        SignError::Pgp(e.to_string())
    }
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> SignError + '_ {
    move |source| SignError::Io { path: path.to_owned(), source }
}
