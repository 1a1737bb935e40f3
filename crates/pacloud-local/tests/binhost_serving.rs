//! The binhost and signed-URL routes over a directory store, called through
//! the Router (no socket): Range, `ETag` / `If-None-Match` and
//! `Last-Modified` / `If-Modified-Since` with 304, precompressed
//! `Packages.gz`, and 404 for everything outside the binhost layout,
//! including files that exist in the data directory.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use pacloud_domain::SystemClock;
use pacloud_domain::ports::{ArtifactPath, ArtifactStore};
use pacloud_local::{DirArtifactStore, SigningKey, binhost_router};
use std::sync::Arc;
use tower::ServiceExt;

async fn setup() -> (tempfile::TempDir, axum::Router, Arc<DirArtifactStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        DirArtifactStore::new(
            dir.path().join("a"),
            "http://127.0.0.1:1",
            SigningKey::new(&[7; 32]),
            Arc::new(SystemClock),
        )
        .unwrap(),
    );
    let put = |p: &str, b: &[u8]| {
        let (store, p, b) = (store.clone(), p.to_owned(), b.to_vec());
        async move { store.put_bytes(&ArtifactPath::parse(&p).unwrap(), b, "application/octet-stream").await.unwrap() }
    };
    put("t/Packages", b"TIMESTAMP: 1\nVERSION: 0\n\n").await;
    put("t/Packages.gz", b"\x1f\x8bgzipped").await;
    put("t/app-misc/hello/hello-1-1.gpkg.tar", &(0..10_240u32).map(|i| i as u8).collect::<Vec<_>>()).await;
    put("t/.pkgindex/app-misc/hello/hello-1-1.gpkg.tar.entry", b"secret-ish").await;
    put("logs/k/w.log", b"log").await;
    put("t/app-misc/hello/notes.txt", b"not a package").await;
    std::fs::write(dir.path().join("outside.gpkg.tar"), b"outside").unwrap();
    std::os::unix::fs::symlink(
        dir.path().join("outside.gpkg.tar"),
        dir.path().join("a/t/app-misc/hello/link-1-1.gpkg.tar"),
    )
    .unwrap();
    (dir, binhost_router(store.clone()), store)
}

async fn get(
    router: &axum::Router,
    path: &str,
    headers: &[(header::HeaderName, &str)],
) -> (StatusCode, http::HeaderMap, Vec<u8>) {
    let mut req = Request::get(path);
    for (k, v) in headers {
        req = req.header(k, *v);
    }
    let resp = router.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes().to_vec())
}

#[tokio::test]
async fn packages_are_served_with_range_and_conditional_requests() {
    let (_dir, r, _) = setup().await;
    let url = "/binhost/t/app-misc/hello/hello-1-1.gpkg.tar";
    let (status, h, body) = get(&r, url, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), 10_240);
    assert_eq!(h[header::CONTENT_TYPE], "application/x-tar");
    assert_eq!(h[header::ACCEPT_RANGES], "bytes");
    let etag = h[header::ETAG].to_str().unwrap().to_owned();
    let last_modified = h[header::LAST_MODIFIED].to_str().unwrap().to_owned();

    // portage fetches the head of a package with Range.
    let (status, h, body) = get(&r, url, &[(header::RANGE, "bytes=0-99")]).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body, (0..100u32).map(|i| i as u8).collect::<Vec<_>>());
    assert_eq!(h[header::CONTENT_RANGE], "bytes 0-99/10240");

    let (status, h, body) = get(&r, url, &[(header::IF_NONE_MATCH, &etag)]).await;
    assert_eq!((status, body.len()), (StatusCode::NOT_MODIFIED, 0));
    assert_eq!(h[header::ETAG], etag.as_str());
    let (status, _, _) = get(&r, url, &[(header::IF_MODIFIED_SINCE, &last_modified)]).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    let (status, _, _) = get(&r, url, &[(header::IF_NONE_MATCH, "\"other\"")]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn the_index_is_text_gzip_on_request_and_revalidates() {
    let (_dir, r, store) = setup().await;
    let (status, h, body) = get(&r, "/binhost/t/Packages", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, b"TIMESTAMP: 1\nVERSION: 0\n\n");
    assert_eq!(h[header::CONTENT_TYPE], "text/plain; charset=utf-8");
    assert!(h[header::CACHE_CONTROL].to_str().unwrap().contains("max-age=60"));
    let etag = h[header::ETAG].to_str().unwrap().to_owned();
    let (_, h, body) = get(&r, "/binhost/t/Packages", &[(header::ACCEPT_ENCODING, "gzip")]).await;
    assert_eq!(h[header::CONTENT_ENCODING], "gzip");
    assert_eq!(body, b"\x1f\x8bgzipped");
    assert_ne!(h[header::ETAG].to_str().unwrap(), etag, "each representation has its own ETag");
    let (status, h, body) = get(&r, "/binhost/t/Packages.gz", &[]).await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"\x1f\x8bgzipped"[..]));
    assert_eq!(h[header::CONTENT_TYPE], "application/gzip");
    assert!(h.get(header::CONTENT_ENCODING).is_none(), "Packages.gz itself is not content-encoded");
    // A publish replaces the index: the old ETag no longer matches.
    let (status, _, _) = get(&r, "/binhost/t/Packages", &[(header::IF_NONE_MATCH, &etag)]).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    std::thread::sleep(std::time::Duration::from_millis(5));
    store
        .put_bytes(&ArtifactPath::parse("t/Packages").unwrap(), b"TIMESTAMP: 2\n\n".to_vec(), "text/plain")
        .await
        .unwrap();
    let (status, _, body) = get(&r, "/binhost/t/Packages", &[(header::IF_NONE_MATCH, &etag)]).await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"TIMESTAMP: 2\n\n"[..]));
}

#[tokio::test]
async fn nothing_outside_the_binhost_layout_is_served() {
    let (_dir, r, _) = setup().await;
    for path in [
        "/binhost/t/.pkgindex/app-misc/hello/hello-1-1.gpkg.tar.entry",
        "/binhost/logs/k/w.log",
        "/binhost/t/app-misc/hello/notes.txt",
        "/binhost/t/app-misc/hello/link-1-1.gpkg.tar",
        "/binhost/t/../outside.gpkg.tar",
        "/binhost/t/%2e%2e/%2e%2e/outside.gpkg.tar",
        "/binhost/t/app-misc/%2e%2e/%2e%2e/outside.gpkg.tar",
        "/binhost/t/app-misc/hello/missing-1-1.gpkg.tar",
        "/binhost/t/Packages/x",
    ] {
        let (status, h, body) = get(&r, path, &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(h[header::CONTENT_TYPE], "application/json", "{path}");
        assert!(!body.windows(7).any(|w| w == b"outside"), "{path}");
    }
}
