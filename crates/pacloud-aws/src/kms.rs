//! The binhost signing key in AWS KMS: an asymmetric `RSA_4096` key with
//! `KeyUsage=SIGN_VERIFY`. The private key never leaves KMS (so never sits
//! on a worker's disk); workers ask KMS to sign SHA-512 digests
//! (`MessageType=DIGEST`, `RSASSA_PKCS1_V1_5_SHA_512`), which yields exactly
//! the PKCS#1 v1.5 value of an OpenPGP RSA signature. The OpenPGP packets are
//! built around it by `pacloud-sign` (this crate stays free of OpenPGP).

use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{MessageType, SigningAlgorithmSpec};

/// Failure to use the KMS key.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("KMS {op} on {key_id} failed")]
    Call {
        op: &'static str,
        key_id: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("KMS key {key_id} is not usable for binhost signing: {reason}")]
    Unsuitable { key_id: String, reason: String },
}

/// What an OpenPGP certificate needs from the KMS key.
#[derive(Debug, Clone)]
pub struct KmsPublicKey {
    /// DER SubjectPublicKeyInfo (`GetPublicKey`).
    pub spki_der: Vec<u8>,
    /// The key's creation time (Unix seconds): fixes the OpenPGP creation
    /// time and so the fingerprint, the same on every worker.
    pub created_secs: u32,
}

const ALGORITHM: SigningAlgorithmSpec = SigningAlgorithmSpec::RsassaPkcs1V15Sha512;

/// Reads the public half of `key_id` and checks it can sign as needed.
pub async fn public_key(client: &aws_sdk_kms::Client, key_id: &str) -> Result<KmsPublicKey, KmsError> {
    let described = client.describe_key().key_id(key_id).send().await.map_err(|e| call("DescribeKey", key_id, e))?;
    let meta = described.key_metadata().ok_or_else(|| KmsError::Unsuitable {
        key_id: key_id.to_owned(),
        reason: "DescribeKey returned no metadata".into(),
    })?;
    let created_secs = meta.creation_date().map(|d| d.secs()).unwrap_or(0);
    let pk = client.get_public_key().key_id(key_id).send().await.map_err(|e| call("GetPublicKey", key_id, e))?;
    if !pk.signing_algorithms().contains(&ALGORITHM) {
        return Err(KmsError::Unsuitable {
            key_id: key_id.to_owned(),
            reason: format!("it cannot sign with {ALGORITHM:?} (use KeySpec RSA_4096, KeyUsage SIGN_VERIFY)"),
        });
    }
    let spki_der = pk.public_key().map(|b| b.as_ref().to_vec()).ok_or_else(|| KmsError::Unsuitable {
        key_id: key_id.to_owned(),
        reason: "GetPublicKey returned no key".into(),
    })?;
    Ok(KmsPublicKey { spki_der, created_secs: u32::try_from(created_secs).unwrap_or(0) })
}

fn call<E, R>(op: &'static str, key_id: &str, e: aws_sdk_kms::error::SdkError<E, R>) -> KmsError
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    KmsError::Call { op, key_id: key_id.to_owned(), source: crate::boxed_sdk(e) }
}

/// Signs a SHA-512 digest, returning the raw signature or an error text
/// (the shape of `pacloud_sign::key::RemoteSignFn`).
pub type DigestSignFn = dyn Fn(&[u8]) -> Result<Vec<u8>, String> + Send + Sync;

/// A blocking "sign this SHA-512 digest" function over KMS `Sign`, for
/// `pacloud_sign::RemoteRsaKey`. Call it only from a blocking thread
/// (signing runs on tokio's blocking pool): it waits on `handle`.
pub fn digest_signer(client: aws_sdk_kms::Client, key_id: String, handle: tokio::runtime::Handle) -> Box<DigestSignFn> {
    Box::new(move |digest: &[u8]| {
        let req = client
            .sign()
            .key_id(&key_id)
            .message(Blob::new(digest.to_vec()))
            .message_type(MessageType::Digest)
            .signing_algorithm(ALGORITHM);
        let out = handle.block_on(req.send()).map_err(|e| {
            let e = call("Sign", &key_id, e);
            format!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default())
        })?;
        out.signature().map(|b| b.as_ref().to_vec()).ok_or_else(|| "KMS Sign returned no signature".to_owned())
    })
}
