//! The `plane` binary with Docker, end to end, as a user would run it:
//! * `plane connect` against an in-process cluster pulls an image from a fake registry
//!   (`plane_test_image::registry`, with Basic authentication) and shows the pull's
//!   progress before `ready`; wrong credentials end in a terminated backend whose
//!   message carries the engine's error;
//! * `plane dev` offers the Docker runtime next to the process runtime when an engine
//!   answers (and only the process runtime with `--no-docker`).
//!
//! These tests need a running Docker engine and fail without one (except the
//! `--no-docker` one, which needs none). Waits have deadlines; nothing sleeps for a
//! result. The in-process cluster runs on the test's runtime, so child processes are
//! run with `tokio::process` and never block it.

use plane_drone::config::DockerRuntimeConfig;
use plane_test_image::registry::{RegistryOptions, TestRegistry};
use plane_test_image::{inspect, RemoveContainers, RemoveImage};
use plane_tests::{Options, TestCluster};
use plane_types::api::{ClusterState, NodeName};
use plane_types::executable::RuntimeKind;
use serde_json::{json, Value};
use std::io::BufRead as _;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

const PLANE: &str = env!("CARGO_BIN_EXE_plane");

/// The longest any single step may take.
const LIMIT: Duration = Duration::from_secs(30);

/// Runs `plane --controller <controller> <args>` to the end.
async fn plane(controller: &str, args: &[&str]) -> Output {
    let run = tokio::process::Command::new(PLANE)
        .arg("--controller")
        .arg(controller)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(LIMIT, run)
        .await
        .unwrap_or_else(|_| panic!("plane {args:?} did not finish within {LIMIT:?}"))
        .expect("running plane")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that `out` succeeded and returns its stdout.
fn success(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Sends each line read from `reader` (until its end) to the returned channel, from a
/// thread of its own.
fn lines_of(reader: impl std::io::Read + Send + 'static) -> UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(reader).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Receives lines into `seen` until one satisfies `pred`; an error (saying what came
/// instead) at the end of the output or after `limit`.
async fn wait_line(
    rx: &mut UnboundedReceiver<String>,
    seen: &mut Vec<String>,
    limit: Duration,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(line)) => {
                seen.push(line.clone());
                if pred(&line) {
                    return Ok(line);
                }
            }
            Ok(None) => return Err(format!("the output ended before {what}:\n{}", seen.join("\n"))),
            Err(_) => return Err(format!("no {what} within {limit:?}:\n{}", seen.join("\n"))),
        }
    }
}

/// The value in a `<name>   <value>` line of what `plane connect` prints.
fn field<'a>(lines: &'a [String], name: &str) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(name).filter(|rest| rest.starts_with(' ')))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no `{name}` line in:\n{}", lines.join("\n")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plane_connect_shows_pull_progress_and_registry_errors() {
    let image = plane_test_image::test_image().await;
    let registry = TestRegistry::start_with(
        &image,
        "plane-test/demo",
        RegistryOptions {
            credentials: Some(("plane".into(), "s3cret".into())),
            // A download of about a second, held halfway until the CLI showed
            // progress. The drone forwards at most one report per 250 ms and drops the
            // others, so a report with bytes needs the download to go on for longer.
            chunk_bytes: 64 << 10,
            chunk_delay: Duration::from_millis(25),
            hold_extra_layer_at: Some(3 << 19),
            ..RegistryOptions::default()
        },
    )
    .await
    .expect("starting the test registry");
    let pulled = registry.image_ref().to_owned();
    let _image = RemoveImage(pulled.clone());
    let mounts = tempfile::tempdir().unwrap();
    let mut options = Options::new(PLANE);
    options.docker = Some(DockerRuntimeConfig {
        mount_base: Some(mounts.path().to_owned()),
        ..DockerRuntimeConfig::default()
    });
    let tc = TestCluster::start(options).await.unwrap();
    let state = tc.wait_for(|s| s.drones.iter().any(|d| d.ready)).await.unwrap();
    let NodeName::Drone(drone) = &state.drones[0].node.name else {
        panic!("not a drone: {state:?}")
    };
    let _containers = RemoveContainers(drone.to_string());
    let executable = |password: &str| {
        json!({
            "image": pulled,
            "pull_policy": "Always",
            "credentials": {"username": "plane", "password": password},
        })
        .to_string()
    };

    // Wrong credentials: the backend is terminated, with the engine's refusal.
    let out = plane(&tc.controller_url, &["connect", "--executable", &executable("wrong")]).await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{}{stderr}", text(&out.stdout));
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in {stderr}"));
    assert!(
        error.contains("terminated (reason internalerror")
            && error.contains(&format!("pulling image {pulled} failed"))
            && error.contains("unauthorized"),
        "{error}"
    );
    assert_eq!(registry.pulls(), 0, "{:?}", registry.requests());
    println!("plane connect with wrong credentials:\n{stderr}");

    // The right ones: stdout and stderr through one pipe, to see their order.
    let (reader, writer) = std::io::pipe().unwrap();
    let mut command = tokio::process::Command::new(PLANE);
    command
        .args([
            "--controller",
            &tc.controller_url,
            "connect",
            "--executable",
            &executable("s3cret"),
        ])
        .stdin(Stdio::null())
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .kill_on_drop(true);
    let mut child = command.spawn().expect("starting plane connect");
    drop(command); // Closes this process's copies of the pipe's write end.
    let mut rx = lines_of(reader);
    let mut seen = Vec::new();
    registry
        .wait_held(LIMIT)
        .await
        .expect("the pull reaches the random layer");
    // Progress shows before the download can end, so it is live, not a summary.
    let during = wait_line(&mut rx, &mut seen, LIMIT, "progress line with bytes", |l| {
        l.starts_with("loading [") && l.contains(" MB")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(during.contains(&format!("pulling {pulled}")), "{during}");
    registry.release();
    wait_line(&mut rx, &mut seen, LIMIT, "URL", |l| l.starts_with("http://"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    while let Some(line) = tokio::time::timeout(LIMIT, rx.recv()).await.expect("the output ends") {
        seen.push(line);
    }
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .expect("plane connect exits")
        .unwrap();
    let all = seen.join("\n");
    assert!(status.success(), "{status}:\n{all}");
    let position = |pred: &dyn Fn(&str) -> bool| seen.iter().position(|l| pred(l));
    let progress = position(&|l| l.starts_with("loading [") && l.contains(" MB")).unwrap();
    let ready = position(&|l| l.ends_with(" ms  ready")).unwrap_or_else(|| panic!("no ready line:\n{all}"));
    assert!(progress < ready, "progress comes before ready:\n{all}");
    let url = seen.last().unwrap().clone();
    assert!(
        url.starts_with(&format!("http://{}/", tc.cluster)) && url.ends_with('/'),
        "the URL comes last:\n{all}"
    );
    let backend = field(&seen, "backend").to_owned();
    assert_eq!(field(&seen, "drone"), drone.as_str(), "{all}");
    assert!(registry.pulls() >= 1, "{:?}", registry.requests());
    println!("plane connect printed:\n{all}");

    // The pulled image runs behind the proxy.
    let env: Value = tc
        .http
        .get(format!("{url}env"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(env["SESSION_BACKEND_ID"], backend.as_str(), "{env}");
    let container = inspect(&format!("plane-{backend}")).expect("the container exists");
    assert_eq!(container["Config"]["Image"], pulled.as_str());

    let id = backend.parse().unwrap();
    tc.client.hard_terminate(&id).await.unwrap();
    tc.wait_status(&id, plane_types::status::BackendStatus::Terminated)
        .await
        .unwrap();
    tc.shutdown().await.unwrap();
}

/// A `plane dev` process: SIGTERMed when dropped, after its remaining backends are
/// hard-terminated (stopping a drone does not stop its backends).
struct Dev {
    child: std::process::Child,
    controller: String,
    cluster: String,
    proxy_port: u16,
    log: std::path::PathBuf,
    /// Backends to terminate at the end, if the test did not.
    backends: Vec<String>,
    /// Lines of its stdout.
    stdout: UnboundedReceiver<String>,
    _dir: tempfile::TempDir,
}

impl Dev {
    /// Starts `plane dev` with `extra` flags, and waits for its banner.
    async fn start(extra: &[&str]) -> Dev {
        let dir = tempfile::tempdir().unwrap();
        let (controller_port, proxy_port) = (plane_tests::free_port(), plane_tests::free_port());
        let log = dir.path().join("dev.log");
        let mut child = std::process::Command::new(PLANE)
            .args(["dev", "--controller-port", &controller_port.to_string()])
            .args(["--proxy-port", &proxy_port.to_string()])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting plane dev");
        let stdout = lines_of(child.stdout.take().unwrap());
        let mut dev = Dev {
            child,
            controller: format!("http://127.0.0.1:{controller_port}"),
            cluster: format!("localhost:{proxy_port}"),
            proxy_port,
            log,
            backends: Vec::new(),
            stdout,
            _dir: dir,
        };
        // `plane dev` prints what to do next once the drone and proxy are connected.
        let mut seen = Vec::new();
        let banner = wait_line(&mut dev.stdout, &mut seen, Duration::from_secs(60), "banner", |l| {
            l.contains("plane connect")
        })
        .await;
        if let Err(err) = banner {
            panic!("plane dev did not start: {err}\nits log:\n{}", dev.log());
        }
        dev
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn plane(&self, args: &[&str]) -> Output {
        plane(&self.controller, args).await
    }

    /// The cluster state, from `plane cluster-state --json`.
    async fn cluster_state(&self) -> ClusterState {
        let out = self
            .plane(&["cluster-state", "--cluster", &self.cluster, "--json"])
            .await;
        serde_json::from_str(&success("plane cluster-state", &out)).expect("cluster-state --json prints the state")
    }

    /// The one drone, once it is ready: its name and the runtimes it offers.
    async fn drone(&self) -> (String, Vec<RuntimeKind>) {
        let deadline = Instant::now() + LIMIT;
        loop {
            let state = self.cluster_state().await;
            if let [drone] = state.drones.as_slice() {
                if drone.ready {
                    let NodeName::Drone(name) = &drone.node.name else {
                        panic!("not a drone: {drone:?}");
                    };
                    return (name.to_string(), drone.runtimes.clone());
                }
            }
            assert!(Instant::now() < deadline, "no ready drone: {state:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `plane connect --json <args>`, until ready: the backend id and URL.
    async fn connect(&mut self, args: &[&str]) -> (String, String) {
        let out = self.plane(&[&["connect", "--json"], args].concat()).await;
        let stdout = success("plane connect", &out);
        let response: Value = serde_json::from_str(&stdout).expect("connect --json prints the response");
        let backend = response["backend_id"].as_str().unwrap().to_owned();
        self.backends.push(backend.clone());
        let stderr = text(&out.stderr);
        assert!(stderr.contains(" ms  ready"), "{stderr}");
        (backend, response["url"].as_str().unwrap().to_owned())
    }

    /// `plane terminate <backend>`, then `plane status --follow` until it is terminated.
    async fn terminate(&mut self, backend: &str) {
        let out = self.plane(&["terminate", backend]).await;
        let said = success("plane terminate", &out);
        assert!(
            said.contains(&format!("termination of backend {backend} requested")),
            "{said}"
        );
        let out = self.plane(&["status", backend, "--follow"]).await;
        let said = success("plane status --follow", &out);
        assert!(said.lines().last().is_some_and(|l| l.contains("terminated")), "{said}");
        self.backends.retain(|b| b != backend);
    }

    /// An HTTP client that reaches the proxy for `localhost`.
    fn http(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .resolve("localhost", ([127, 0, 0, 1], self.proxy_port).into())
            .timeout(LIMIT)
            .build()
            .unwrap()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        for backend in &self.backends {
            let _ = std::process::Command::new(PLANE)
                .args(["--controller", &self.controller, "terminate", "--hard", backend])
                .output();
        }
        if !self.backends.is_empty() {
            // Give the hard terminations a moment to reach the backends (best effort).
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                let gone = self.backends.iter().all(|b| {
                    std::process::Command::new(PLANE)
                        .args(["--controller", &self.controller, "status", b])
                        .output()
                        .map_or(true, |o| text(&o.stdout).contains("terminated"))
                });
                if gone {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GETs `url` and returns its status and body.
async fn fetch(http: &reqwest::Client, url: &str) -> (u16, String) {
    let res = http.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (res.status().as_u16(), res.text().await.unwrap_or_default())
}

#[tokio::test]
async fn plane_dev_runs_docker_and_process_backends_side_by_side() {
    let image = plane_test_image::test_image().await;
    let mut dev = Dev::start(&[]).await;
    let (drone, runtimes) = dev.drone().await;
    let _containers = RemoveContainers(drone.clone());
    assert!(
        runtimes.contains(&RuntimeKind::Docker) && runtimes.contains(&RuntimeKind::Process),
        "{runtimes:?}; log:\n{}",
        dev.log()
    );
    let http = dev.http();

    // A container, from the local image.
    let (docker_id, docker_url) = dev
        .connect(&["--key", "in-docker", "--image", &image, "--pull-policy", "Never"])
        .await;
    assert!(
        docker_url.starts_with(&format!("http://{}/", dev.cluster)),
        "{docker_url}"
    );
    let (status, body) = fetch(&http, &format!("{docker_url}env")).await;
    assert_eq!(status, 200, "{body}");
    let env: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(env["SESSION_BACKEND_ID"], docker_id.as_str(), "{env}");
    assert_eq!(env["PORT"], "8080", "the container's port: {env}");
    let container = format!("plane-{docker_id}");
    let info = inspect(&container).expect("the backend's container exists");
    assert_eq!(info["State"]["Running"], true);
    assert_eq!(info["Config"]["Labels"]["dev.plane.drone"], drone.as_str());
    assert_eq!(info["Config"]["Image"], image.as_str());

    // A process, in the same dev, at the same time.
    let (process_id, process_url) = dev
        .connect(&["--key", "in-process", "--command", "plane demo-backend"])
        .await;
    let (status, page) = fetch(&http, &process_url).await;
    assert_eq!(status, 200);
    assert!(page.contains(&process_id), "the demo page shows its backend id");
    assert!(inspect(&format!("plane-{process_id}")).is_none(), "not a container");
    let (status, body) = fetch(&http, &format!("{docker_url}env")).await;
    assert_eq!(status, 200, "the container still answers: {body}");
    let state = dev.cluster_state().await;
    assert_eq!(state.drones[0].backend_count, 2, "{state:?}");

    dev.terminate(&docker_id).await;
    let info = inspect(&container).expect("a stopped container is kept for a while");
    assert_eq!(info["State"]["Running"], false);
    assert_eq!(
        info["State"]["ExitCode"], 0,
        "the demo backend exits cleanly on SIGTERM"
    );
    assert_eq!(fetch(&http, &docker_url).await.0, 410);
    let (status, _) = fetch(&http, &process_url).await;
    assert_eq!(status, 200, "the process backend is unaffected");
    dev.terminate(&process_id).await;
    assert_eq!(fetch(&http, &process_url).await.0, 410);
}

#[tokio::test]
async fn plane_dev_without_docker_offers_only_processes() {
    let dev = Dev::start(&["--no-docker"]).await;
    let (_, runtimes) = dev.drone().await;
    assert_eq!(runtimes, [RuntimeKind::Process], "log:\n{}", dev.log());
    let out = dev
        .plane(&["connect", "--image", "plane-demo-backend:any", "--pull-policy", "Never"])
        .await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{}{stderr}", text(&out.stdout));
    assert!(
        stderr.starts_with("error: ") && stderr.contains("NoDroneAvailable") && stderr.contains("docker runtime"),
        "{stderr}"
    );
}
