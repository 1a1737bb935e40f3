//! Bearer tokens for requests that may start a build. Tokens are kept only
//! as SHA-256 digests and compared in constant time.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The configured tokens; empty means every caller may build.
#[derive(Clone, Default)]
pub struct Tokens(Vec<[u8; 32]>);

/// What a request's credentials amount to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials {
    /// A configured token, or no tokens are configured at all.
    MayBuild,
    /// No `Authorization` header.
    Anonymous,
    /// A header that is malformed or names no configured token.
    Invalid,
}

impl Tokens {
    pub fn new<S: AsRef<str>>(tokens: &[S]) -> Self {
        Tokens(tokens.iter().map(|t| Sha256::digest(t.as_ref().as_bytes()).into()).collect())
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn check(&self, headers: &HeaderMap) -> Credentials {
        let Some(value) = headers.get(AUTHORIZATION) else {
            return if self.0.is_empty() { Credentials::MayBuild } else { Credentials::Anonymous };
        };
        if self.0.is_empty() {
            return Credentials::MayBuild;
        }
        // The scheme name is case-insensitive (RFC 9110 section 11.1).
        let token = value.to_str().ok().and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        });
        let Some(token) = token else {
            return Credentials::Invalid;
        };
        let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        for t in &self.0 {
            found |= t.ct_eq(&digest);
        }
        if bool::from(found) { Credentials::MayBuild } else { Credentials::Invalid }
    }
}
