//! The binhost signing key: a [`Signer`] pairs something that can produce
//! raw OpenPGP signatures (a local secret key, or a remote RSA key such as
//! AWS KMS that signs SHA-512 digests) with the certificate clients import.
//!
//! Local keys are Ed25519 (fast to generate, verified by every gpg >= 2.1),
//! stored armored in one file created with mode 0600. Remote keys are RSA,
//! because KMS `Sign` with `RSASSA_PKCS1_V1_5_SHA_512` over a digest returns
//! exactly the PKCS#1 v1.5 value an OpenPGP RSA signature carries.

use pgp::composed::{
    ArmorOptions, CleartextSignedMessage, DetachedSignature, EncryptionCaps, KeyType, SecretKeyParamsBuilder,
    SignedPublicKey, SignedSecretKey,
};
use pgp::crypto::hash::HashAlgorithm;
use pgp::crypto::public_key::PublicKeyAlgorithm;
use pgp::packet::{KeyFlags, PubKeyInner, PublicKey, UserId};
use pgp::types::{
    Fingerprint, KeyDetails, KeyId, KeyVersion, Mpi, PacketHeaderVersion, Password, PublicParams, RsaPublicParams,
    SignatureBytes, SigningKey, Timestamp, VerifyingKey,
};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::{SignError, io_err};

/// Where the key in use came from (said once at startup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Generated now and saved at this path.
    Generated(PathBuf),
    /// Read from this path.
    Loaded(PathBuf),
    /// A remote key (e.g. a KMS key id or ARN).
    Remote(String),
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Generated(p) => write!(f, "generated and saved to {}", p.display()),
            KeySource::Loaded(p) => write!(f, "loaded from {}", p.display()),
            KeySource::Remote(id) => write!(f, "remote key {id}"),
        }
    }
}

/// A key that signs, and the certificate (public key) that verifies.
pub struct Signer {
    key: Box<dyn SigningKey + Send + Sync>,
    public: SignedPublicKey,
    source: KeySource,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("fingerprint", &self.fingerprint()).field("source", &self.source).finish()
    }
}

/// The User ID of keys this crate creates.
pub const DEFAULT_USER_ID: &str = "pacloud binhost signing key";

impl Signer {
    /// Loads the armored secret key at `path`, or generates an Ed25519 key
    /// and saves it there (mode 0600, never overwriting) when the file does
    /// not exist.
    pub fn load_or_generate(path: &Path, user_id: &str) -> Result<Signer, SignError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_armored_secret(&text, KeySource::Loaded(path.to_owned()))
                .map_err(|e| SignError::Key { path: path.to_owned(), reason: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret = generate(user_id)?;
                match save_secret(path, &secret) {
                    Ok(()) => Ok(Self::from_secret(secret, KeySource::Generated(path.to_owned()))),
                    // Another process (`pacloud worker` beside `serve`) saved
                    // one first: use that one.
                    Err(SignError::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::load_or_generate(path, user_id)
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(SignError::Io { path: path.to_owned(), source: e }),
        }
    }

    /// A fresh Ed25519 key kept only in memory (tests, foreign keys).
    pub fn ephemeral(user_id: &str) -> Result<Signer, SignError> {
        Ok(Self::from_secret(generate(user_id)?, KeySource::Remote("ephemeral".into())))
    }

    /// A signer over an armored transferable secret key (unprotected).
    pub fn from_armored_secret(text: &str, source: KeySource) -> Result<Signer, SignError> {
        use pgp::composed::Deserializable;
        let (secret, _) = SignedSecretKey::from_string(text)?;
        secret.verify_bindings()?;
        if secret.primary_key.secret_params().is_encrypted() {
            return Err(SignError::Pgp(
                "the secret key is passphrase-protected; pacloud needs an unprotected key".into(),
            ));
        }
        Ok(Self::from_secret(secret, source))
    }

    fn from_secret(secret: SignedSecretKey, source: KeySource) -> Signer {
        let public = secret.to_public_key();
        Signer { key: Box::new(secret.primary_key), public, source }
    }

    /// A signer over a remote RSA key: builds the certificate (the User ID
    /// self-signature is itself made by the remote signer).
    pub fn remote(key: RemoteRsaKey, user_id: &str, source: KeySource) -> Result<Signer, SignError> {
        let uid = UserId::from_str(PacketHeaderVersion::New, user_id)?;
        let mut flags = KeyFlags::default();
        flags.set_certify(true);
        flags.set_sign(true);
        let details = pgp::composed::KeyDetails::new(
            Some(uid),
            Vec::new(),
            Vec::new(),
            flags,
            Default::default(),
            Default::default(),
            [HashAlgorithm::Sha512].into_iter().collect(),
            Default::default(),
            Default::default(),
        );
        let signed = details.sign(rand::thread_rng(), &key, &key.public_key, &Password::empty())?;
        let public = SignedPublicKey::new(key.public_key.clone(), signed, Vec::new());
        public.verify_bindings()?;
        Ok(Signer { key: Box::new(key), public, source })
    }

    /// The key's OpenPGP fingerprint, upper-case hex (what `gpg` prints).
    pub fn fingerprint(&self) -> String {
        hex::encode_upper(self.public.fingerprint().as_bytes())
    }

    /// Where the key came from.
    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// The armored certificate (`-----BEGIN PGP PUBLIC KEY BLOCK-----`).
    pub fn public_key_armored(&self) -> Result<String, SignError> {
        Ok(self.public.to_armored_string(ArmorOptions::default())?)
    }

    // rpgp implements `SigningKey` for `Box<&dyn SigningKey>` (not for a
    // bare `&dyn`), which is what its `&impl SigningKey` functions take.
    #[allow(clippy::redundant_allocation)]
    fn signing_key(&self) -> Box<&dyn SigningKey> {
        Box::new(self.key.as_ref())
    }

    /// An armored detached binary signature (SHA-512) over `data`, what
    /// `gpg --armor --detach-sig --digest-algo SHA512` produces.
    pub fn detached(&self, data: impl Read) -> Result<String, SignError> {
        let sig = DetachedSignature::sign_binary_data(
            rand::thread_rng(),
            &self.signing_key(),
            &Password::empty(),
            HashAlgorithm::Sha512,
            data,
        )?;
        Ok(sig.to_armored_string(ArmorOptions::default())?)
    }

    /// `text` in the cleartext signature framework (`gpg --clear-sign`).
    pub fn clearsign(&self, text: &str) -> Result<String, SignError> {
        use pgp::packet::{SignatureConfig, SignatureType, Subpacket, SubpacketData};
        let key = self.signing_key();
        let mut config = SignatureConfig::v4(SignatureType::Text, key.algorithm(), HashAlgorithm::Sha512);
        config.hashed_subpackets = vec![
            Subpacket::regular(SubpacketData::SignatureCreationTime(Timestamp::now()))?,
            Subpacket::regular(SubpacketData::IssuerFingerprint(key.fingerprint()))?,
        ];
        config.unhashed_subpackets = vec![Subpacket::regular(SubpacketData::IssuerKeyId(key.legacy_key_id()))?];
        let msg = CleartextSignedMessage::new(text, config, &key, &Password::empty())?;
        Ok(msg.to_armored_string(ArmorOptions::default())?)
    }

    /// Verifies an armored detached signature over `data` with this key
    /// (for tests and self-checks; clients use gpg).
    pub fn verify_detached(&self, armored: &str, data: &[u8]) -> Result<(), SignError> {
        use pgp::composed::Deserializable;
        let (sig, _) = DetachedSignature::from_string(armored)?;
        sig.verify(&self.public, data)?;
        Ok(())
    }
}

fn generate(user_id: &str) -> Result<SignedSecretKey, SignError> {
    let mut params = SecretKeyParamsBuilder::default();
    params
        .key_type(KeyType::Ed25519Legacy)
        .can_certify(true)
        .can_sign(true)
        .can_encrypt(EncryptionCaps::None)
        .preferred_hash_algorithms([HashAlgorithm::Sha512, HashAlgorithm::Sha256].into_iter().collect())
        .primary_user_id(user_id.into());
    let params = params.build().map_err(|e| SignError::Pgp(e.to_string()))?;
    Ok(params.generate(rand::thread_rng())?)
}

/// Writes the armored secret key to `path`: a temporary file created 0600
/// next to it, then a hard link (fails if `path` appeared meanwhile).
fn save_secret(path: &Path, secret: &SignedSecretKey) -> Result<(), SignError> {
    use std::os::unix::fs::OpenOptionsExt;
    let armored = secret.to_armored_string(ArmorOptions::default())?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io_err(&tmp))?;
    f.write_all(armored.as_bytes()).and_then(|_| f.sync_all()).map_err(io_err(&tmp))?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked.map_err(io_err(path))
}

/// The raw signing operation of a remote RSA key: given a SHA-512 digest,
/// return the PKCS#1 v1.5 signature (KMS `Sign`, `MessageType=DIGEST`,
/// `RSASSA_PKCS1_V1_5_SHA_512`).
pub type RemoteSignFn = dyn Fn(&[u8]) -> Result<Vec<u8>, String> + Send + Sync;

/// An RSA key whose private half lives elsewhere (AWS KMS).
pub struct RemoteRsaKey {
    public_key: PublicKey,
    sign: Box<RemoteSignFn>,
}

impl std::fmt::Debug for RemoteRsaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteRsaKey").field("fingerprint", &self.public_key.fingerprint()).finish()
    }
}

impl RemoteRsaKey {
    /// `spki_der` is the DER SubjectPublicKeyInfo (KMS `GetPublicKey`);
    /// `created_secs` fixes the OpenPGP creation time, and so the
    /// fingerprint (use the KMS key's creation date).
    pub fn new(spki_der: &[u8], created_secs: u32, sign: Box<RemoteSignFn>) -> Result<RemoteRsaKey, SignError> {
        use rsa::pkcs8::DecodePublicKey;
        let key = rsa::RsaPublicKey::from_public_key_der(spki_der)
            .map_err(|e| SignError::Pgp(format!("not an RSA SubjectPublicKeyInfo: {e}")))?;
        let inner = PubKeyInner::new(
            KeyVersion::V4,
            PublicKeyAlgorithm::RSA,
            Timestamp::from_secs(created_secs),
            None,
            PublicParams::RSA(RsaPublicParams { key }),
        )?;
        Ok(RemoteRsaKey { public_key: PublicKey::from_inner(inner)?, sign })
    }
}

impl KeyDetails for RemoteRsaKey {
    fn version(&self) -> KeyVersion {
        self.public_key.version()
    }
    fn fingerprint(&self) -> Fingerprint {
        self.public_key.fingerprint()
    }
    fn legacy_key_id(&self) -> KeyId {
        self.public_key.legacy_key_id()
    }
    fn algorithm(&self) -> PublicKeyAlgorithm {
        self.public_key.algorithm()
    }
    fn created_at(&self) -> Timestamp {
        self.public_key.created_at()
    }
    fn legacy_v3_expiration_days(&self) -> Option<u16> {
        self.public_key.legacy_v3_expiration_days()
    }
    fn public_params(&self) -> &PublicParams {
        self.public_key.public_params()
    }
}

impl SigningKey for RemoteRsaKey {
    fn sign(&self, _pw: &Password, hash: HashAlgorithm, digest: &[u8]) -> pgp::errors::Result<SignatureBytes> {
        if hash != HashAlgorithm::Sha512 || digest.len() != 64 {
            return Err(pgp::errors::Error::Message {
                message: format!("the remote RSA key signs SHA-512 digests only, not {hash:?}"),
                backtrace: None,
            });
        }
        let sig = (self.sign)(digest).map_err(|message| pgp::errors::Error::Message {
            message: format!("remote signer: {message}"),
            backtrace: None,
        })?;
        // The signature must verify before it is used (a wrong key or
        // algorithm on the remote side must not produce a bad package).
        let bytes = SignatureBytes::Mpis(vec![Mpi::from_slice(&sig)]);
        self.public_key.verify(hash, digest, &bytes)?;
        Ok(bytes)
    }

    fn hash_alg(&self) -> HashAlgorithm {
        HashAlgorithm::Sha512
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_is_saved_private_and_loaded_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/binhost.asc");
        let a = Signer::load_or_generate(&path, DEFAULT_USER_ID).unwrap();
        assert!(matches!(a.source(), KeySource::Generated(_)));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let b = Signer::load_or_generate(&path, DEFAULT_USER_ID).unwrap();
        assert!(matches!(b.source(), KeySource::Loaded(_)));
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 40);
        let pubkey = a.public_key_armored().unwrap();
        assert!(pubkey.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"), "{pubkey}");
        assert!(!pubkey.contains("PRIVATE"));
        // A signature by one verifies with the other; a changed byte does not.
        let sig = a.detached(&b"payload"[..]).unwrap();
        b.verify_detached(&sig, b"payload").unwrap();
        assert!(b.verify_detached(&sig, b"payloaD").is_err());
        // Another key does not verify it.
        let other = Signer::ephemeral("other").unwrap();
        assert!(other.verify_detached(&sig, b"payload").is_err());
    }

    #[test]
    fn a_corrupt_key_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.asc");
        std::fs::write(&path, "not a key").unwrap();
        let err = Signer::load_or_generate(&path, DEFAULT_USER_ID).unwrap_err();
        assert!(err.to_string().contains("k.asc"), "{err}");
    }

    #[test]
    fn remote_rsa_key_signs_through_the_callback() {
        use rsa::pkcs1v15::SigningKey as Pkcs1Key;
        use rsa::pkcs8::EncodePublicKey;
        use rsa::signature::hazmat::PrehashSigner;
        let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
        let der = private.to_public_key().to_public_key_der().unwrap();
        let signer = Pkcs1Key::<sha2::Sha512>::new(private);
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = calls.clone();
        let remote = RemoteRsaKey::new(
            der.as_bytes(),
            1_700_000_000,
            Box::new(move |digest| {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let sig: rsa::pkcs1v15::Signature = signer.sign_prehash(digest).map_err(|e| e.to_string())?;
                Ok(rsa::signature::SignatureEncoding::to_vec(&sig))
            }),
        )
        .unwrap();
        let s = Signer::remote(remote, DEFAULT_USER_ID, KeySource::Remote("test".into())).unwrap();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1, "the certificate was self-signed remotely");
        let sig = s.detached(&b"abc"[..]).unwrap();
        s.verify_detached(&sig, b"abc").unwrap();
        assert!(s.verify_detached(&sig, b"abd").is_err());
        // A remote signer that answers with garbage is refused.
        let private2 = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
        let der2 = private2.to_public_key().to_public_key_der().unwrap();
        let bad = RemoteRsaKey::new(der2.as_bytes(), 1, Box::new(|_| Ok(vec![1u8; 256]))).unwrap();
        assert!(Signer::remote(bad, "x", KeySource::Remote("bad".into())).is_err());
    }
}
