//! Builds the demo image and runs containers from it: the backend answers on the mapped
//! port, sees `PORT=8080`, and reports the limits Docker applied. Needs a Docker engine;
//! without one these tests fail, with the reason, rather than skip.

use plane_demo::{CgroupVersion, Limits};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;
use tokio::time::Instant;

/// How long a container may take to answer HTTP.
const WAIT: Duration = Duration::from_secs(30);

/// A container started with `docker run -d`, removed (`docker rm -f`) when dropped,
/// including when a test fails.
struct Container {
    id: String,
}

impl Container {
    /// `docker run -d -p 127.0.0.1::8080 <options…> <image>`.
    fn run(image: &str, options: &[&str]) -> Container {
        let output = Command::new("docker")
            .args(["run", "-d", "-p", "127.0.0.1::8080"])
            .args(options)
            .arg(image)
            .output()
            .expect("run docker");
        assert!(
            output.status.success(),
            "docker run failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Container {
            id: String::from_utf8(output.stdout).unwrap().trim().to_owned(),
        }
    }

    /// The host address that port 8080 of the container is published on.
    fn address(&self) -> String {
        let output = Command::new("docker")
            .args(["port", &self.id, "8080/tcp"])
            .output()
            .expect("run docker port");
        let out = String::from_utf8(output.stdout).unwrap();
        let addr = out.lines().find(|line| line.starts_with("127.0.0.1:"));
        addr.unwrap_or_else(|| panic!("no published port in {out:?}"))
            .to_owned()
    }

    fn logs(&self) -> String {
        let output = Command::new("docker").args(["logs", &self.id]).output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// Polls `GET /env` until the backend answers, and returns its base URL.
    async fn wait_ready(&self) -> String {
        let base = format!("http://{}", self.address());
        let deadline = Instant::now() + WAIT;
        let http = reqwest::Client::new();
        loop {
            match http.get(format!("{base}/env")).send().await {
                Ok(res) if res.status().is_success() => return base,
                result => assert!(
                    Instant::now() < deadline,
                    "the container did not answer within {WAIT:?} (last: {result:?}); logs:\n{}",
                    self.logs()
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.id]).output();
    }
}

async fn get_json(url: &str) -> Value {
    let res = reqwest::get(url).await.unwrap();
    assert_eq!(res.status(), 200, "GET {url}");
    res.json().await.unwrap()
}

#[tokio::test]
async fn image_runs_the_demo_backend() {
    plane_test_image::require_docker().unwrap();
    let image = plane_test_image::demo_image_async().await.unwrap();
    let hash = image.strip_prefix("plane-demo-backend:").expect("the image name");
    assert_eq!(hash.len(), 12, "{image}");
    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()), "{image}");
    assert_eq!(
        plane_test_image::demo_image().unwrap(),
        image,
        "the same reference again"
    );

    let container = Container::run(&image, &["-e", "SESSION_BACKEND_ID=bk-docker"]);
    let base = container.wait_ready().await;
    let env = get_json(&format!("{base}/env")).await;
    assert_eq!(env["PORT"], "8080", "{env}");
    assert_eq!(env["SESSION_BACKEND_ID"], "bk-docker", "{env}");
    let limits = get_json(&format!("{base}/debug/limits")).await;
    let limits: Limits = serde_json::from_value(limits.clone()).unwrap_or_else(|e| panic!("{limits}: {e}"));
    assert!(limits.cgroup.is_some(), "{limits:?}");
    assert_eq!(limits.memory_limit_bytes, None, "no --memory: {limits:?}");
}

#[tokio::test]
async fn limits_and_filesystem_as_docker_sets_them() {
    plane_test_image::require_docker().unwrap();
    let image = plane_test_image::demo_image_async().await.unwrap();
    let container = Container::run(
        &image,
        &[
            "--memory",
            "64m",
            "--cpus",
            "0.5",
            "--pids-limit",
            "50",
            "--ulimit",
            "cpu=30:40",
            "--security-opt",
            "no-new-privileges",
            "--user",
            "65534:65534",
        ],
    );
    let base = container.wait_ready().await;
    let limits: Limits = reqwest::get(format!("{base}/debug/limits"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cgroup = limits.cgroup;
    assert!(
        matches!(cgroup, Some(CgroupVersion::V1 | CgroupVersion::V2)),
        "{limits:?}"
    );
    assert_eq!(
        limits,
        Limits {
            cgroup,
            memory_limit_bytes: Some(64 * 1024 * 1024),
            cpu_quota_micros: Some(50_000),
            cpu_period_micros: Some(100_000),
            pids_limit: Some(50),
            rlimit_cpu_soft: Some(30),
            rlimit_cpu_hard: Some(40),
            no_new_privs: Some(true),
        }
    );

    // /tmp is writable by anyone (mode 1777); the root of the image is not.
    let http = reqwest::Client::new();
    let write = |path: &str| {
        http.post(format!("{base}/debug/file"))
            .query(&[("path", path)])
            .body("data")
            .send()
    };
    let res = write("/tmp/dir/file").await.unwrap();
    assert_eq!(res.status(), 200);
    let read = http
        .get(format!("{base}/debug/file"))
        .query(&[("path", "/tmp/dir/file")])
        .send()
        .await
        .unwrap();
    assert_eq!(read.text().await.unwrap(), "data");
    let res = write("/plane-data/file").await.unwrap();
    assert_eq!(res.status(), 500, "/plane-data is root's");
    let error: Value = res.json().await.unwrap();
    assert!(
        error["error"].as_str().unwrap().contains("Permission denied"),
        "{error}"
    );
}

#[tokio::test]
async fn read_only_root_filesystem_is_reported() {
    plane_test_image::require_docker().unwrap();
    let image = plane_test_image::demo_image_async().await.unwrap();
    let container = Container::run(&image, &["--read-only"]);
    let base = container.wait_ready().await;
    let res = reqwest::Client::new()
        .post(format!("{base}/debug/file"))
        .query(&[("path", "/plane-data/x")])
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 500);
    let error: Value = res.json().await.unwrap();
    assert!(
        error["error"].as_str().unwrap().contains("Read-only file system"),
        "{error}"
    );
}
