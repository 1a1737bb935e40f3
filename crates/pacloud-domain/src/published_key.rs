//! The binhost signing key's certificate as published in the artifact store
//! (one JSON object at [`PUBLISHED_KEY_PATH`]): on AWS the private key stays
//! in KMS and only a worker can build the certificate (its self-signature is
//! a KMS `Sign`), so the first worker stores it there (create-if-absent) and
//! the API (the Lambda) reads it to answer `GET /v1/signing-key.asc` and the
//! fingerprint in `GET /v1/targets`.

use serde::{Deserialize, Serialize};

use crate::ports::ArtifactPath;

/// Where the certificate is stored (beside `logs/` and `workers/`; no
/// target's binhost layout has a file of that name).
pub const PUBLISHED_KEY_PATH: &str = "keys/binhost-signing-key.json";

/// The stored certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedKey {
    /// The OpenPGP fingerprint, 40 upper-case hex digits.
    pub fingerprint: String,
    /// The armored certificate (`-----BEGIN PGP PUBLIC KEY BLOCK-----`).
    pub armored: String,
}

/// A stored object that is not a usable [`PublishedKey`].
#[derive(Debug, thiserror::Error)]
#[error("the published signing key at {PUBLISHED_KEY_PATH} is unusable: {0}")]
pub struct BadPublishedKey(pub String);

impl PublishedKey {
    /// [`PUBLISHED_KEY_PATH`] as an artifact path.
    pub fn path() -> ArtifactPath {
        ArtifactPath::parse(PUBLISHED_KEY_PATH).expect("a valid constant path")
    }

    /// The JSON bytes stored.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("two strings serialize")
    }

    /// Parses and checks stored bytes.
    pub fn decode(bytes: &[u8]) -> Result<PublishedKey, BadPublishedKey> {
        let key: PublishedKey = serde_json::from_slice(bytes).map_err(|e| BadPublishedKey(e.to_string()))?;
        if key.fingerprint.len() != 40 || !key.fingerprint.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')) {
            return Err(BadPublishedKey(format!("fingerprint {:?} is not 40 upper-case hex digits", key.fingerprint)));
        }
        if !key.armored.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----") {
            return Err(BadPublishedKey("not an armored public key".into()));
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let k = PublishedKey {
            fingerprint: "0123456789ABCDEF0123456789ABCDEF01234567".into(),
            armored: "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nxx\n-----END PGP PUBLIC KEY BLOCK-----\n".into(),
        };
        assert_eq!(PublishedKey::decode(&k.encode()).unwrap(), k);
        assert_eq!(PublishedKey::path().as_str(), PUBLISHED_KEY_PATH);
        let lower = PublishedKey { fingerprint: k.fingerprint.to_lowercase(), ..k.clone() };
        assert!(PublishedKey::decode(&lower.encode()).unwrap_err().to_string().contains("fingerprint"));
        let private = PublishedKey { armored: "-----BEGIN PGP PRIVATE KEY BLOCK-----".into(), ..k.clone() };
        assert!(PublishedKey::decode(&private.encode()).is_err());
        assert!(PublishedKey::decode(b"{").is_err());
    }
}
