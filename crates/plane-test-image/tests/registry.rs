//! The fake registry against the real engine and over HTTP: `docker pull` gets the demo
//! image from it (held in the middle of the random layer, then released), and the
//! protocol details a client sees (the Basic challenge, digests, ranges) are right.
//! Needs a Docker engine; without one these tests fail, with the reason, rather than skip.

use plane_test_image::registry::{RegistryOptions, TestRegistry, MANIFEST_MEDIA_TYPE};
use std::time::Duration;

/// The longest any step may take.
const LIMIT: Duration = Duration::from_secs(60);

/// Removes an image reference when dropped.
struct RemoveImage(String);

impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rmi", "-f", &self.0])
            .output();
    }
}

#[tokio::test]
async fn docker_pull_waits_at_the_hold_then_completes() {
    let image = plane_test_image::test_image().await;
    let options = RegistryOptions {
        hold_extra_layer_at: Some(512 << 10),
        ..RegistryOptions::default()
    };
    let registry = TestRegistry::start_with(&image, "plane-test/pulled", options)
        .await
        .unwrap();
    let reference = registry.image_ref().to_owned();
    assert!(
        reference.starts_with(&format!("127.0.0.1:{}/plane-test/pulled:t", registry.address().port())),
        "{reference}"
    );
    let _guard = RemoveImage(reference.clone());
    let pull = tokio::process::Command::new("docker")
        .args(["pull", &reference])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let pull = tokio::spawn(pull);
    registry.wait_held(LIMIT).await.unwrap();
    assert!(!pull.is_finished(), "the pull waits while the layer is held");
    assert!(registry.pulls() >= 1, "{:?}", registry.requests());
    registry.release();
    let out = tokio::time::timeout(LIMIT, pull).await.unwrap().unwrap().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Pull complete"), "{stdout}");

    // The engine has it, with the saved image's layers plus the random one.
    let inspect = tokio::process::Command::new("docker")
        .args([
            "image",
            "inspect",
            "--format",
            "{{len .RootFS.Layers}} {{json .Config.Entrypoint}}",
        ])
        .args([&reference, &image])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&inspect.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let layers = |line: &str| line.split(' ').next().unwrap().parse::<usize>().unwrap();
    assert_eq!(layers(lines[0]), layers(lines[1]) + 1, "{text}");
    assert_eq!(lines[0].split_once(' ').unwrap().1, r#"["/plane-demo-backend"]"#);
    let requests = registry.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /v2/plane-test/pulled/blobs/sha256:")),
        "{requests:?}"
    );
}

#[tokio::test]
async fn basic_auth_digests_and_ranges_over_http() {
    let image = plane_test_image::test_image().await;
    let registry = TestRegistry::start(&image, "plane-test/http", Some(("user", "secret")))
        .await
        .unwrap();
    let base = format!("http://{}", registry.address());
    let http = reqwest::Client::builder().timeout(LIMIT).build().unwrap();
    let tag = registry.image_ref().rsplit(':').next().unwrap().to_owned();
    let manifest_url = format!("{base}/v2/plane-test/http/manifests/{tag}");

    let denied = http.get(format!("{base}/v2/")).send().await.unwrap();
    assert_eq!(denied.status(), 401);
    assert_eq!(denied.headers()["www-authenticate"], "Basic realm=\"plane-test-image\"");
    assert_eq!(denied.headers()["docker-distribution-api-version"], "registry/2.0");
    let body: serde_json::Value = denied.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
    let wrong = http
        .get(&manifest_url)
        .basic_auth("user", Some("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(registry.pulls(), 0);

    let manifest = http
        .get(&manifest_url)
        .basic_auth("user", Some("secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(manifest.status(), 200);
    assert_eq!(manifest.headers()["content-type"], MANIFEST_MEDIA_TYPE);
    let digest = manifest.headers()["docker-content-digest"].to_str().unwrap().to_owned();
    let bytes = manifest.bytes().await.unwrap();
    assert_eq!(plane_test_image::registry::sha256_digest(&bytes), digest);
    assert_eq!(registry.pulls(), 1);
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    let sizes: Vec<u64> = layers.iter().map(|l| l["size"].as_u64().unwrap()).collect();
    assert_eq!(sizes, registry.layer_sizes());

    // The extra layer, whole and from an offset.
    let layer = layers.last().unwrap();
    let blob_url = format!("{base}/v2/plane-test/http/blobs/{}", layer["digest"].as_str().unwrap());
    let whole = http
        .get(&blob_url)
        .basic_auth("user", Some("secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(whole.status(), 200);
    let whole = whole.bytes().await.unwrap();
    assert_eq!(plane_test_image::registry::sha256_digest(&whole), layer["digest"]);
    assert!(whole.starts_with(&[0x1f, 0x8b]), "gzip");
    let tail = http
        .get(&blob_url)
        .basic_auth("user", Some("secret"))
        .header("range", "bytes=1000-")
        .send()
        .await
        .unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(
        tail.headers()["content-range"],
        format!("bytes 1000-{}/{}", whole.len() - 1, whole.len()).as_str()
    );
    assert_eq!(tail.bytes().await.unwrap(), whole.slice(1000..));

    let unknown = http
        .get(format!("{base}/v2/plane-test/other/manifests/{tag}"))
        .basic_auth("user", Some("secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(registry.pulls(), 1);

    // Dropped: it stops answering.
    let address = registry.address();
    drop(registry);
    assert!(tokio::net::TcpStream::connect(address).await.is_err());
}
