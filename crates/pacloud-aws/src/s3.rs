//! Artifacts in S3 (a private bucket): PutObject with a SHA-256 checksum
//! (verified locally first, then by S3), create-if-absent with
//! `If-None-Match: *`, presigned GET URLs (default 15 minutes, at most one
//! hour), HeadObject, GetObject and ListObjectsV2.

use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;
use base64::Engine;
use pacloud_domain::Millis;
use pacloud_domain::ports::{ArtifactError, ArtifactPath, ArtifactStore, ObjectVersion, SignedUrl, StoredObject};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use crate::boxed;

/// Longest presigned URL lifetime handed out.
pub const MAX_URL_TTL: Duration = Duration::from_secs(3600);

/// The artifact store port on S3.
#[derive(Clone, Debug)]
pub struct S3ArtifactStore {
    client: aws_sdk_s3::Client,
    bucket: String,
    url_ttl: Duration,
}

fn unavailable<E: std::error::Error + Send + Sync + 'static>(e: E) -> ArtifactError {
    ArtifactError::Unavailable(boxed(e))
}

/// Hashes a file, returning (hex, base64) of its SHA-256.
async fn hash_file(file: &Path) -> Result<(String, String, u64), ArtifactError> {
    let p = file.to_owned();
    tokio::task::spawn_blocking(move || -> std::io::Result<(String, String, u64)> {
        use std::io::Read;
        let mut f = std::fs::File::open(&p)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            size += n as u64;
        }
        let digest = h.finalize();
        Ok((hex::encode(digest), base64::engine::general_purpose::STANDARD.encode(digest), size))
    })
    .await
    .map_err(unavailable)?
    .map_err(unavailable)
}

impl S3ArtifactStore {
    pub fn new(client: aws_sdk_s3::Client, bucket: String, url_ttl: Duration) -> Self {
        S3ArtifactStore { client, bucket, url_ttl: url_ttl.min(MAX_URL_TTL) }
    }

    async fn put(
        &self,
        path: &ArtifactPath,
        file: &Path,
        sha256: &str,
        if_absent: bool,
    ) -> Result<Option<StoredObject>, ArtifactError> {
        let (hex_sha, b64_sha, size) = hash_file(file).await?;
        if hex_sha != sha256 {
            return Err(ArtifactError::ChecksumMismatch { path: path.to_string(), expected: sha256.to_owned() });
        }
        let body = ByteStream::from_path(file).await.map_err(unavailable)?;
        let mut req =
            self.client.put_object().bucket(&self.bucket).key(path.as_str()).body(body).checksum_sha256(b64_sha);
        if if_absent {
            req = req.if_none_match("*");
        }
        match req.send().await {
            Ok(_) => Ok(Some(StoredObject { size, sha256: Some(hex_sha) })),
            Err(e) if if_absent && e.raw_response().is_some_and(|r| r.status().as_u16() == 412) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }
}

#[async_trait]
impl ArtifactStore for S3ArtifactStore {
    async fn put_file(&self, path: &ArtifactPath, file: &Path, sha256: &str) -> Result<StoredObject, ArtifactError> {
        self.put(path, file, sha256, false).await?.ok_or_else(|| ArtifactError::NotFound(path.to_string()))
    }

    async fn put_file_if_absent(
        &self,
        path: &ArtifactPath,
        file: &Path,
        sha256: &str,
    ) -> Result<Option<StoredObject>, ArtifactError> {
        self.put(path, file, sha256, true).await
    }

    async fn put_bytes(
        &self,
        path: &ArtifactPath,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<StoredObject, ArtifactError> {
        let digest = Sha256::digest(&bytes);
        let size = bytes.len() as u64;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(path.as_str())
            .content_type(content_type)
            .checksum_sha256(base64::engine::general_purpose::STANDARD.encode(digest))
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(unavailable)?;
        Ok(StoredObject { size, sha256: Some(hex::encode(digest)) })
    }

    async fn get_versioned(&self, path: &ArtifactPath) -> Result<Option<(Vec<u8>, ObjectVersion)>, ArtifactError> {
        let r = self.client.get_object().bucket(&self.bucket).key(path.as_str()).send().await;
        match r {
            Ok(o) => {
                let etag = o.e_tag().map(str::to_owned).ok_or_else(|| {
                    ArtifactError::Unavailable(format!("GetObject of {path} returned no ETag").into())
                })?;
                let bytes = o.body.collect().await.map_err(unavailable)?.into_bytes().to_vec();
                Ok(Some((bytes, ObjectVersion(etag))))
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn put_bytes_if(
        &self,
        path: &ArtifactPath,
        bytes: Vec<u8>,
        content_type: &str,
        expected: Option<&ObjectVersion>,
    ) -> Result<Option<ObjectVersion>, ArtifactError> {
        let digest = Sha256::digest(&bytes);
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(path.as_str())
            .content_type(content_type)
            .checksum_sha256(base64::engine::general_purpose::STANDARD.encode(digest))
            .body(ByteStream::from(bytes));
        req = match expected {
            Some(v) => req.if_match(&v.0),
            None => req.if_none_match("*"),
        };
        match req.send().await {
            Ok(o) => {
                let etag = o.e_tag().map(str::to_owned).ok_or_else(|| {
                    ArtifactError::Unavailable(format!("PutObject of {path} returned no ETag").into())
                })?;
                Ok(Some(ObjectVersion(etag)))
            }
            // 412: the precondition failed; 409: a concurrent conditional
            // write to the same key won (S3 asks the loser to retry).
            Err(e) if e.raw_response().is_some_and(|r| matches!(r.status().as_u16(), 412 | 409)) => Ok(None),
            // If-Match on an object deleted meanwhile.
            Err(e) if expected.is_some() && e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ArtifactPath>, ArtifactError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(unavailable)?;
            for o in page.contents() {
                if let Some(p) = o.key().and_then(|k| ArtifactPath::parse(k).ok()) {
                    out.push(p);
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        out.sort();
        Ok(out)
    }

    async fn head(&self, path: &ArtifactPath) -> Result<Option<StoredObject>, ArtifactError> {
        let r = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(path.as_str())
            .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
            .send()
            .await;
        match r {
            Ok(o) => {
                let sha256 = o
                    .checksum_sha256()
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                    .filter(|raw| raw.len() == 32)
                    .map(hex::encode);
                Ok(Some(StoredObject { size: u64::try_from(o.content_length().unwrap_or(0)).unwrap_or(0), sha256 }))
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn delete(&self, path: &ArtifactPath) -> Result<(), ArtifactError> {
        // S3 answers 204 whether or not the key existed.
        self.client.delete_object().bucket(&self.bucket).key(path.as_str()).send().await.map_err(unavailable)?;
        Ok(())
    }

    async fn get(&self, path: &ArtifactPath) -> Result<Vec<u8>, ArtifactError> {
        let r = self.client.get_object().bucket(&self.bucket).key(path.as_str()).send().await;
        match r {
            Ok(o) => Ok(o.body.collect().await.map_err(unavailable)?.into_bytes().to_vec()),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                Err(ArtifactError::NotFound(path.to_string()))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn signed_url(&self, path: &ArtifactPath, now: Millis, ttl: Duration) -> Result<SignedUrl, ArtifactError> {
        let ttl = ttl.min(self.url_ttl).max(Duration::from_secs(1));
        let start = UNIX_EPOCH + Duration::from_millis(u64::try_from(now.0).unwrap_or(0));
        let config = aws_sdk_s3::presigning::PresigningConfig::builder()
            .start_time(start)
            .expires_in(ttl)
            .build()
            .map_err(unavailable)?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(path.as_str())
            .presigned(config)
            .await
            .map_err(unavailable)?;
        Ok(SignedUrl { url: req.uri().to_owned(), expires_at: now.plus(ttl) })
    }
}
