//! End to end, as a user would: the built `plane` binary runs `plane dev` in the
//! background; `plane connect`, `plane status` and `plane terminate` talk to it; the
//! URL is fetched through the proxy.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PLANE: &str = env!("CARGO_BIN_EXE_plane");

/// Stops `plane dev` (SIGTERM) when the test ends, even on failure.
struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
    }
}

fn plane(controller: &str, args: &[&str]) -> std::process::Output {
    Command::new(PLANE)
        .arg("--controller")
        .arg(controller)
        .args(args)
        .output()
        .expect("run plane")
}

#[tokio::test]
async fn plane_dev_connect_fetch_terminate() {
    let dir = tempfile::tempdir().unwrap();
    let (cport, pport) = (plane_tests::free_port(), plane_tests::free_port());
    let mut child = Command::new(PLANE)
        .args([
            "dev",
            "--controller-port",
            &cport.to_string(),
            "--proxy-port",
            &pport.to_string(),
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start plane dev");
    let stdout = child.stdout.take().unwrap();
    let dev = Dev(child);
    // `plane dev` prints what to do next once everything is connected.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut banner = String::new();
    while !banner.contains("plane connect") {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("plane dev printed its banner");
        banner.push_str(&line);
        banner.push('\n');
    }
    assert!(banner.contains(&format!("localhost:{pport}")), "{banner}");

    let controller = format!("http://127.0.0.1:{cport}");
    let out = plane(
        &controller,
        &["connect", "--key", "room1", "--command", "plane demo-backend", "--json"],
    );
    assert!(
        out.status.success(),
        "connect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let res: serde_json::Value = serde_json::from_slice(&out.stdout).expect("connect --json prints the response");
    let url = res["url"].as_str().unwrap().to_owned();
    let backend = res["backend_id"].as_str().unwrap().to_owned();
    assert!(url.starts_with(&format!("http://localhost:{pport}/")), "{url}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ready"),
        "progress shows the states"
    );

    let http = reqwest::Client::builder()
        .resolve("localhost", ([127, 0, 0, 1], pport).into())
        .build()
        .unwrap();
    let page = http.get(&url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.text().await.unwrap().contains(&backend),
        "the demo page shows its backend id"
    );

    let out = plane(&controller, &["status", &backend]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("ready"));

    let out = plane(&controller, &["terminate", &backend]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = plane(&controller, &["status", &backend, "--follow"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("terminated"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(http.get(&url).send().await.unwrap().status(), 410);

    // A bad request is a clean error with a non-zero exit.
    let out = plane(&controller, &["status", "NOT-VALID"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error:") && !err.contains("panicked"), "{err}");
    drop(dev);
}
