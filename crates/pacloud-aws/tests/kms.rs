//! The KMS binhost key on moto's server, over the real KMS wire protocol:
//! an RSA_4096 SIGN_VERIFY key, its public key and creation date, and the
//! `Sign` request workers make (`MessageType=DIGEST`,
//! `RSASSA_PKCS1_V1_5_SHA_512`).
//!
//! Named gap: moto 5.2.5 ignores `MessageType=DIGEST` in `Sign` (its source
//! says so for `Verify`; `Sign` hashes the message again as if it were RAW),
//! so on moto the signature is over SHA-512(digest), not over the digest.
//! This test checks that exact value, which proves the key, the algorithm
//! and the bytes we send are right, and that pacloud-sign's check refuses
//! it (a remote signer answering with a wrong signature is never used). The
//! OpenPGP path around a correct digest signature is tested in pacloud-sign
//! with a local RSA key standing in for KMS.

use aws_sdk_kms::types::{KeySpec, KeyUsageType};
use pacloud_aws::testkit::Moto;
use rsa::pkcs8::DecodePublicKey;
use rsa::signature::Verifier;
use rsa::signature::hazmat::PrehashVerifier;
use sha2::Digest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_key_public_half_and_digest_sign_request_on_moto() {
    let moto = Moto::start();
    let cfg = moto.base_config();
    let clients = pacloud_aws::clients(&cfg).await;
    let created = clients
        .kms
        .create_key()
        .key_spec(KeySpec::Rsa4096)
        .key_usage(KeyUsageType::SignVerify)
        .description("pacloud binhost signing key")
        .send()
        .await
        .unwrap();
    let key_id = created.key_metadata().unwrap().key_id().to_owned();

    let public = pacloud_aws::kms::public_key(&clients.kms, &key_id).await.unwrap();
    assert!(public.created_secs > 1_600_000_000, "creation date read: {}", public.created_secs);
    let key = rsa::RsaPublicKey::from_public_key_der(&public.spki_der).expect("an RSA SubjectPublicKeyInfo");
    assert_eq!(rsa::traits::PublicKeyParts::size(&key), 512, "RSA 4096");
    // Stable across reads (the fingerprint depends on it).
    let again = pacloud_aws::kms::public_key(&clients.kms, &key_id).await.unwrap();
    assert_eq!((again.spki_der, again.created_secs), (public.spki_der.clone(), public.created_secs));

    let digest = sha2::Sha512::digest(b"pacloud").to_vec();
    let sign = pacloud_aws::kms::digest_signer(clients.kms.clone(), key_id.clone(), tokio::runtime::Handle::current());
    let d = digest.clone();
    let sig = tokio::task::spawn_blocking(move || sign(&d)).await.unwrap().expect("KMS Sign answers");
    let sig = rsa::pkcs1v15::Signature::try_from(sig.as_slice()).unwrap();
    let verifier = rsa::pkcs1v15::VerifyingKey::<sha2::Sha512>::new(key);
    // moto: a PKCS#1 v1.5 SHA-512 signature of the digest taken as a message.
    verifier.verify(&digest, &sig).expect("moto signed our bytes with our key and algorithm");
    // Real KMS (DIGEST) would make this one verify instead; moto does not.
    assert!(verifier.verify_prehash(&digest, &sig).is_err(), "moto now honours MessageType=DIGEST: drop the gap");

    // An unknown key is a clear error naming it.
    let err = pacloud_aws::kms::public_key(&clients.kms, "alias/missing").await.unwrap_err();
    assert!(err.to_string().contains("alias/missing"), "{err}");
}
