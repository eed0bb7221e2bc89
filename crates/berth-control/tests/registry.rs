//! The control plane serves its imported images over the OCI distribution protocol, to
//! join-token holders only.

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use berth_control::{ControlConfig, ControlPlane};
use berth_image::build::{busybox_layer, Compression, ImageBuilder};
use berth_image::{ImageStore, UnpackLimits};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tower::ServiceExt;

async fn get(
    router: &axum::Router,
    path: &str,
    auth: Option<String>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let mut request = Request::get(path);
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    let response = router
        .clone()
        .oneshot(request.body(Body::empty()).expect("request"))
        .await
        .expect("response");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    (status, headers, bytes)
}

#[tokio::test]
async fn imported_images_are_served_read_only_to_join_token_holders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let images = Arc::new(
        ImageStore::open(&dir.path().join("images"), UnpackLimits::default()).expect("store"),
    );
    let layout = dir.path().join("layout");
    ImageBuilder::new()
        .layer(
            busybox_layer(Path::new("/bin/busybox")).expect("busybox"),
            Compression::Gzip,
        )
        .write_layout(&layout)
        .expect("layout");
    let imported = images.import(&layout, "demo/busybox:1").expect("import");
    let control = ControlPlane::open(
        ControlConfig::new(dir.path().to_owned(), "admin".into(), "join-secret".into()),
        images,
    )
    .await
    .expect("control");
    let router = control.router();
    let basic = |password: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("agent:{password}"))
        )
    };

    let (status, headers, _) = get(&router, "/v2/", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(headers.get("www-authenticate").is_some());
    assert_eq!(
        get(&router, "/v2/", Some(basic("wrong"))).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(&router, "/v2/", Some("Bearer admin".into())).await.0,
        StatusCode::UNAUTHORIZED,
        "the admin token is not a join token"
    );
    assert_eq!(
        get(&router, "/v2/", Some(basic("join-secret"))).await.0,
        StatusCode::OK
    );

    let (status, headers, manifest) = get(
        &router,
        "/v2/demo/busybox/manifests/1",
        Some(basic("join-secret")),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&manifest)));
    assert_eq!(digest, imported.manifest_digest);
    assert_eq!(
        headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok()),
        Some(digest.as_str())
    );
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest json");
    for layer in manifest["layers"].as_array().expect("layers") {
        let layer_digest = layer["digest"].as_str().expect("digest");
        let (status, _, blob) = get(
            &router,
            &format!("/v2/demo/busybox/blobs/{layer_digest}"),
            Some("Bearer join-secret".into()),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            format!("sha256:{}", hex::encode(Sha256::digest(&blob))),
            layer_digest
        );
    }
    assert_eq!(
        get(
            &router,
            "/v2/demo/busybox/manifests/2",
            Some(basic("join-secret"))
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(
            &router,
            "/v2/demo/busybox/blobs/sha256:..%2F..%2Fetc",
            Some(basic("join-secret"))
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    control.close().await;
}
