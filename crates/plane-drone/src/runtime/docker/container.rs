//! What the Docker runtime asks the engine for, computed without I/O: the container's
//! name, labels, environment, limits and ports ([`create_body`]); where the backend is
//! reached once it runs ([`backend_address`]); how exits are described ([`exit_info`]);
//! and where a `mount` lives on the host ([`resolve_mount`], the only function here that
//! touches the file system).

use super::{CONTAINER_PORT, LABEL_BACKEND, LABEL_DRONE, LABEL_MANAGED};
use crate::config::{DockerAddressMode, DockerRuntimeConfig};
use crate::runtime::{BackendSpec, ExitInfo, RuntimeError};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, HostConfig, HostConfigLogConfig,
    Mount as EngineMount, MountType, PortBinding, ResourcesUlimits,
};
use plane_types::executable::{DockerExecutable, Mount};
use plane_types::names::{check_key_part, BackendName, DroneName};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};

/// Where a backend's mount appears inside its container.
pub const MOUNT_TARGET: &str = "/plane-data";

/// The CFS period used when only `cpu_period_percent` is given (Docker's default).
const DEFAULT_CPU_PERIOD: u64 = 100_000;

/// The container of a backend is named after it, so a retried start finds it.
pub fn container_name(backend_id: &BackendName) -> String {
    format!("plane-{backend_id}")
}

/// `8080/tcp`.
pub fn port_key() -> String {
    format!("{CONTAINER_PORT}/tcp")
}

/// The labels that mark a container as this drone's, for this backend.
pub fn labels(drone: &DroneName, backend_id: &BackendName) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_BACKEND.to_owned(), backend_id.to_string()),
        (LABEL_DRONE.to_owned(), drone.to_string()),
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
    ])
}

/// Whether `labels` say the container runs `backend_id` for `drone`.
pub fn is_ours(labels: Option<&HashMap<String, String>>, drone: &DroneName, backend_id: &BackendName) -> bool {
    labels.is_some_and(|l| {
        l.get(LABEL_DRONE).map(String::as_str) == Some(drone.as_str())
            && l.get(LABEL_BACKEND).map(String::as_str) == Some(backend_id.as_str())
    })
}

/// The network a backend's container joins, if not the engine's default bridge.
pub fn network<'a>(config: &'a DockerRuntimeConfig, exe: &'a DockerExecutable) -> Option<&'a str> {
    exe.network_name.as_deref().or(config.network.as_deref())
}

/// The executable's `env`, with Plane's variables (`PORT=8080`, …) on top.
pub fn environment(spec: &BackendSpec, exe: &DockerExecutable) -> Vec<String> {
    let mut env: BTreeMap<&str, &str> = exe.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let plane = spec.plane_env(CONTAINER_PORT);
    env.extend(plane.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The body of `POST /containers/create` for a backend. `mount` is the resolved host
/// directory of the executable's mount, if it has one.
pub fn create_body(
    config: &DockerRuntimeConfig,
    drone: &DroneName,
    spec: &BackendSpec,
    exe: &DockerExecutable,
    mount: Option<&Path>,
) -> ContainerCreateBody {
    let limits = &exe.resource_limits;
    let cpu_period = match (limits.cpu_period, limits.cpu_period_percent) {
        (Some(period), _) => Some(period),
        (None, Some(_)) => Some(DEFAULT_CPU_PERIOD),
        (None, None) => None,
    };
    let cpu_quota = limits
        .cpu_period_percent
        .zip(cpu_period)
        .map(|(pct, period)| period * u64::from(pct) / 100);
    let ulimits = limits.cpu_time_limit.map(|secs| {
        let secs = i64::try_from(secs).unwrap_or(i64::MAX);
        vec![ResourcesUlimits {
            name: Some("cpu".to_owned()),
            soft: Some(secs),
            hard: Some(secs),
        }]
    });
    let storage_opt = limits
        .disk_limit_bytes
        .map(|bytes| HashMap::from([("size".to_owned(), bytes.to_string())]));
    let log_config = (config.log_driver.is_some() || !config.log_options.is_empty()).then(|| HostConfigLogConfig {
        // An empty type means the engine's default driver, with these options.
        typ: Some(config.log_driver.clone().unwrap_or_default()),
        config: Some(config.log_options.clone()),
    });
    let port_bindings = (config.address_mode == DockerAddressMode::HostPort).then(|| {
        HashMap::from([(
            port_key(),
            Some(vec![PortBinding {
                host_ip: Some(config.host_ip.to_string()),
                // Empty: the engine picks a free port.
                host_port: Some(String::new()),
            }]),
        )])
    });
    let mounts = mount.map(|source| {
        vec![EngineMount {
            target: Some(MOUNT_TARGET.to_owned()),
            source: Some(source.display().to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(false),
            ..Default::default()
        }]
    });
    let tmpfs = config
        .read_only_rootfs
        .then(|| HashMap::from([("/tmp".to_owned(), "rw,nosuid,nodev".to_owned())]));
    let host_config = HostConfig {
        cpu_period: cpu_period.map(|p| i64::try_from(p).unwrap_or(i64::MAX)),
        cpu_quota: cpu_quota.map(|q| i64::try_from(q).unwrap_or(i64::MAX)),
        memory: limits.memory_limit_bytes,
        ulimits,
        storage_opt,
        pids_limit: Some(config.pids_limit),
        security_opt: Some(vec!["no-new-privileges".to_owned()]),
        readonly_rootfs: Some(config.read_only_rootfs),
        tmpfs,
        runtime: config.oci_runtime.clone(),
        log_config,
        network_mode: network(config, exe).map(str::to_owned),
        port_bindings,
        mounts,
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(exe.image.clone()),
        env: Some(environment(spec, exe)),
        cmd: exe.command.clone(),
        entrypoint: exe.entrypoint.clone(),
        labels: Some(labels(drone, &spec.backend_id)),
        exposed_ports: Some(vec![port_key()]),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// The address clients use to reach something bound to `host`.
fn reachable(host: IpAddr) -> IpAddr {
    match host {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// Where a running container's backend is reached, from its inspection: the published
/// port on `host_ip` (host-port mode) or its IP on its network (container-IP mode).
pub fn backend_address(
    config: &DockerRuntimeConfig,
    network: Option<&str>,
    inspect: &ContainerInspectResponse,
) -> Result<SocketAddr, String> {
    let settings = inspect
        .network_settings
        .as_ref()
        .ok_or("the engine reported no network settings")?;
    match config.address_mode {
        DockerAddressMode::HostPort => {
            let port = settings
                .ports
                .as_ref()
                .and_then(|ports| ports.get(&port_key()))
                .and_then(|bindings| bindings.as_ref())
                .and_then(|bindings| {
                    bindings
                        .iter()
                        .find_map(|b| b.host_port.as_deref().and_then(|p| p.parse::<u16>().ok()))
                })
                .ok_or_else(|| format!("port {} was not published", port_key()))?;
            Ok(SocketAddr::new(reachable(config.host_ip), port))
        }
        DockerAddressMode::ContainerIp => {
            let networks = settings.networks.as_ref().ok_or("the container has no network")?;
            let ip_of = |name: &str| {
                networks
                    .get(name)
                    .and_then(|n| n.ip_address.as_deref())
                    .filter(|ip| !ip.is_empty())
                    .and_then(|ip| ip.parse::<IpAddr>().ok())
            };
            let ip = match network {
                Some(name) => ip_of(name),
                None => ip_of("bridge").or_else(|| {
                    let mut names: Vec<&String> = networks.keys().collect();
                    names.sort();
                    names.into_iter().find_map(|n| ip_of(n))
                }),
            };
            let ip = ip.ok_or_else(|| {
                format!(
                    "the container has no IP address on network {}",
                    network.unwrap_or("bridge")
                )
            })?;
            Ok(SocketAddr::new(ip, CONTAINER_PORT))
        }
    }
}

/// The name of a Linux signal, for the usual ones.
fn signal_name(signal: i64) -> Option<&'static str> {
    Some(match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        _ => return None,
    })
}

/// How a container ended, from its exit code as the engine reports it (`128 + n` after
/// signal `n`) and whether the kernel's OOM killer stopped it. The engine's code is kept
/// as the exit code either way: it cannot tell `exit(137)` from SIGKILL.
pub fn exit_info(code: i64, oom_killed: bool) -> ExitInfo {
    let exit_code = i32::try_from(code).ok();
    let detail = if oom_killed {
        format!("OOM-killed ({code})")
    } else if let Some(name) = (code > 128).then(|| signal_name(code - 128)).flatten() {
        format!("killed by {name} ({code})")
    } else {
        format!("exited with code {code}")
    };
    ExitInfo {
        exit_code,
        detail: Some(detail),
    }
}

/// How a container ended, from its inspection; `None` while it has not (created,
/// running, paused, restarting or being removed).
pub fn exit_from_inspect(container: &ContainerInspectResponse) -> Option<ExitInfo> {
    let state = container.state.as_ref()?;
    match state.status {
        Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD) => Some(match state.exit_code {
            Some(code) => exit_info(code, state.oom_killed.unwrap_or(false)),
            None => ExitInfo {
                exit_code: None,
                detail: Some("stopped; the engine did not say with which exit code".into()),
            },
        }),
        _ => None,
    }
}

/// The host directory a backend's `mount` binds, created if missing. `None` if the
/// executable has no mount. The directory must resolve (symlinks followed) to a place
/// inside `mount_base`; `mount: true` uses the key name, which must be a valid key name
/// (no `/`, no leading `.`).
pub fn resolve_mount(
    mount_base: Option<&Path>,
    spec: &BackendSpec,
    exe: &DockerExecutable,
) -> Result<Option<PathBuf>, RuntimeError> {
    let relative = match &exe.mount {
        None | Some(Mount::Bool(false)) => return Ok(None),
        Some(Mount::Bool(true)) => {
            check_key_part("key name", &spec.key_name, false).map_err(|e| {
                RuntimeError::InvalidExecutable(format!("`mount: true` needs a key name usable as a directory: {e}"))
            })?;
            PathBuf::from(&spec.key_name)
        }
        Some(Mount::Path(p)) => PathBuf::from(p),
    };
    let Some(base) = mount_base else {
        return Err(RuntimeError::InvalidExecutable(
            "the executable asks for a `mount`, but this drone has no mount base configured".into(),
        ));
    };
    let invalid = || {
        RuntimeError::InvalidExecutable(format!(
            "`mount` path {:?} must be relative and must not contain `..`",
            relative.display()
        ))
    };
    if relative.as_os_str().is_empty() {
        return Err(invalid());
    }
    let mut parts = Vec::new();
    for component in relative.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_owned()),
            Component::CurDir => {}
            _ => return Err(invalid()),
        }
    }
    if parts.is_empty() {
        return Err(invalid());
    }
    std::fs::create_dir_all(base)
        .map_err(|e| RuntimeError::io(format!("creating the mount base {}", base.display()), e))?;
    let base = std::fs::canonicalize(base)
        .map_err(|e| RuntimeError::io(format!("resolving the mount base {}", base.display()), e))?;
    // One component at a time, so nothing is ever created outside the base: each
    // existing component is resolved and checked before the next is created in it.
    let mut current = base.clone();
    for part in parts {
        let next = current.join(&part);
        match std::fs::create_dir(&next) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(RuntimeError::io(
                    format!("creating the mount directory {}", next.display()),
                    e,
                ))
            }
        }
        let resolved = std::fs::canonicalize(&next)
            .map_err(|e| RuntimeError::io(format!("resolving the mount directory {}", next.display()), e))?;
        if !resolved.starts_with(&base) {
            return Err(RuntimeError::NotAllowed(format!(
                "`mount` path {:?} resolves to {}, outside the mount base {}",
                relative.display(),
                resolved.display(),
                base.display()
            )));
        }
        if !resolved.is_dir() {
            return Err(RuntimeError::InvalidExecutable(format!(
                "`mount` path {:?} is not a directory",
                relative.display()
            )));
        }
        current = resolved;
    }
    Ok(Some(current))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TempDir;
    use bollard::models::{EndpointSettings, NetworkSettings};
    use plane_types::executable::{Executable, ResourceLimits};

    fn exe(json: serde_json::Value) -> DockerExecutable {
        match Executable::from_json(&json).unwrap() {
            Executable::Docker(d) => d,
            other => panic!("not a Docker executable: {other:?}"),
        }
    }

    fn spec(exe: &DockerExecutable, key: &str) -> BackendSpec {
        BackendSpec {
            backend_id: "b1".parse().unwrap(),
            executable: Executable::Docker(exe.clone()),
            key_name: key.into(),
            fencing_token: 5,
            static_token: None,
        }
    }

    #[test]
    fn create_body_has_labels_env_limits_and_hardening() {
        let config = DockerRuntimeConfig {
            oci_runtime: Some("runsc".into()),
            log_driver: Some("json-file".into()),
            log_options: HashMap::from([("max-size".into(), "1m".into())]),
            read_only_rootfs: true,
            pids_limit: 77,
            ..Default::default()
        };
        let exe = exe(serde_json::json!({
            "image": "img:1",
            "env": {"PORT": "1", "A": "b"},
            "command": ["serve"],
            "entrypoint": ["/bin/app"],
            "network_name": "net1",
            "resource_limits": {"cpu_period_percent": 50, "cpu_time_limit": 9,
                                "memory_limit_bytes": 1000000, "disk_limit_bytes": 2000000},
        }));
        let drone: DroneName = "dr-one".parse().unwrap();
        let body = create_body(&config, &drone, &spec(&exe, "k"), &exe, Some(Path::new("/base/k")));
        assert_eq!(body.image.as_deref(), Some("img:1"));
        let env = body.env.unwrap();
        assert!(env.contains(&"PORT=8080".to_owned()), "{env:?}");
        assert!(env.contains(&"A=b".to_owned()));
        assert!(env.contains(&"SESSION_BACKEND_ID=b1".to_owned()));
        assert_eq!(body.cmd, Some(vec!["serve".to_owned()]));
        assert_eq!(body.entrypoint, Some(vec!["/bin/app".to_owned()]));
        let labels = body.labels.unwrap();
        assert_eq!(labels[LABEL_BACKEND], "b1");
        assert_eq!(labels[LABEL_DRONE], "dr-one");
        assert_eq!(labels[LABEL_MANAGED], "true");
        let hc = body.host_config.unwrap();
        assert_eq!(hc.cpu_period, Some(100_000));
        assert_eq!(hc.cpu_quota, Some(50_000));
        assert_eq!(hc.memory, Some(1_000_000));
        let ulimit = &hc.ulimits.unwrap()[0];
        assert_eq!(
            (ulimit.name.as_deref(), ulimit.soft, ulimit.hard),
            (Some("cpu"), Some(9), Some(9))
        );
        assert_eq!(hc.storage_opt.unwrap()["size"], "2000000");
        assert_eq!(hc.pids_limit, Some(77));
        assert_eq!(hc.security_opt, Some(vec!["no-new-privileges".to_owned()]));
        assert_eq!(hc.readonly_rootfs, Some(true));
        assert!(hc.tmpfs.unwrap().contains_key("/tmp"));
        assert_eq!(hc.runtime.as_deref(), Some("runsc"));
        let log = hc.log_config.unwrap();
        assert_eq!(log.typ.as_deref(), Some("json-file"));
        assert_eq!(log.config.unwrap()["max-size"], "1m");
        assert_eq!(hc.network_mode.as_deref(), Some("net1"));
        let binding = &hc.port_bindings.unwrap()["8080/tcp"].clone().unwrap()[0];
        assert_eq!(binding.host_ip.as_deref(), Some("127.0.0.1"));
        let mount = &hc.mounts.unwrap()[0];
        assert_eq!(mount.source.as_deref(), Some("/base/k"));
        assert_eq!(mount.target.as_deref(), Some(MOUNT_TARGET));
    }

    #[test]
    fn cpu_period_alone_and_no_limits() {
        let config = DockerRuntimeConfig {
            address_mode: DockerAddressMode::ContainerIp,
            ..Default::default()
        };
        let mut e = exe(serde_json::json!({"image": "img"}));
        e.resource_limits = ResourceLimits {
            cpu_period: Some(50_000),
            cpu_period_percent: Some(20),
            ..Default::default()
        };
        let drone: DroneName = "dr-one".parse().unwrap();
        let hc = create_body(&config, &drone, &spec(&e, "k"), &e, None)
            .host_config
            .unwrap();
        assert_eq!((hc.cpu_period, hc.cpu_quota), (Some(50_000), Some(10_000)));
        assert!(hc.port_bindings.is_none(), "no published port in container-IP mode");
        assert!(hc.mounts.is_none() && hc.tmpfs.is_none() && hc.log_config.is_none());
        let e = exe(serde_json::json!({"image": "img"}));
        let hc = create_body(&config, &drone, &spec(&e, "k"), &e, None)
            .host_config
            .unwrap();
        assert_eq!((hc.cpu_period, hc.cpu_quota, hc.memory), (None, None, None));
        assert!(hc.ulimits.is_none() && hc.storage_opt.is_none() && hc.network_mode.is_none());
    }

    #[test]
    fn exit_details() {
        let check = |code, oom, detail: &str| {
            assert_eq!(
                exit_info(code, oom),
                ExitInfo {
                    exit_code: Some(code as i32),
                    detail: Some(detail.to_owned())
                }
            )
        };
        check(0, false, "exited with code 0");
        check(3, false, "exited with code 3");
        check(137, false, "killed by SIGKILL (137)");
        check(143, false, "killed by SIGTERM (143)");
        check(137, true, "OOM-killed (137)");
        check(255, false, "exited with code 255");
    }

    #[test]
    fn addresses_from_inspect() {
        let mut inspect = ContainerInspectResponse::default();
        let ports = HashMap::from([(
            "8080/tcp".to_owned(),
            Some(vec![PortBinding {
                host_ip: Some("0.0.0.0".into()),
                host_port: Some("49153".into()),
            }]),
        )]);
        let networks = HashMap::from([
            (
                "bridge".to_owned(),
                EndpointSettings {
                    ip_address: Some("172.17.0.2".into()),
                    ..Default::default()
                },
            ),
            (
                "net1".to_owned(),
                EndpointSettings {
                    ip_address: Some("10.0.0.5".into()),
                    ..Default::default()
                },
            ),
        ]);
        inspect.network_settings = Some(NetworkSettings {
            ports: Some(ports),
            networks: Some(networks),
            ..Default::default()
        });
        let mut config = DockerRuntimeConfig {
            host_ip: "0.0.0.0".parse().unwrap(),
            ..Default::default()
        };
        assert_eq!(
            backend_address(&config, None, &inspect).unwrap(),
            "127.0.0.1:49153".parse().unwrap()
        );
        config.address_mode = DockerAddressMode::ContainerIp;
        assert_eq!(
            backend_address(&config, None, &inspect).unwrap(),
            "172.17.0.2:8080".parse().unwrap()
        );
        assert_eq!(
            backend_address(&config, Some("net1"), &inspect).unwrap(),
            "10.0.0.5:8080".parse().unwrap()
        );
        assert!(backend_address(&config, Some("other"), &inspect).is_err());
        assert!(backend_address(&config, None, &ContainerInspectResponse::default()).is_err());
    }

    #[test]
    fn mounts_stay_inside_the_base() {
        let dir = TempDir::new("docker-mount");
        let base = dir.path().join("base");
        let e = exe(serde_json::json!({"image": "img", "mount": true}));
        // No base: refused.
        let err = resolve_mount(None, &spec(&e, "room"), &e).unwrap_err();
        assert!(err.to_string().contains("no mount base"), "{err}");
        // `true`: the key name.
        let path = resolve_mount(Some(&base), &spec(&e, "room.1"), &e).unwrap().unwrap();
        assert_eq!(path, std::fs::canonicalize(&base).unwrap().join("room.1"));
        assert!(path.is_dir());
        for bad_key in ["../x", "a/b", ".hidden", ""] {
            assert!(
                resolve_mount(Some(&base), &spec(&e, bad_key), &e).is_err(),
                "key {bad_key:?} must be refused"
            );
        }
        // A relative path, created with its parents.
        let e = exe(serde_json::json!({"image": "img", "mount": "a/b/c"}));
        let path = resolve_mount(Some(&base), &spec(&e, "k"), &e).unwrap().unwrap();
        assert!(path.ends_with("a/b/c") && path.is_dir());
        // A symlink out of the base is refused, and nothing is created outside.
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, base.join("escape")).unwrap();
        let e = exe(serde_json::json!({"image": "img", "mount": "escape/sub"}));
        let err = resolve_mount(Some(&base), &spec(&e, "k"), &e).unwrap_err();
        assert!(matches!(err, RuntimeError::NotAllowed(_)), "{err}");
        assert!(!outside.join("sub").exists(), "nothing may be created outside the base");
        // A symlink inside the base is fine.
        std::os::unix::fs::symlink(base.join("a"), base.join("alias")).unwrap();
        let e = exe(serde_json::json!({"image": "img", "mount": "alias/b"}));
        let path = resolve_mount(Some(&base), &spec(&e, "k"), &e).unwrap().unwrap();
        assert!(path.ends_with("a/b"));
        // A file is not a directory; no mount is no path.
        std::fs::write(base.join("file"), "x").unwrap();
        let e = exe(serde_json::json!({"image": "img", "mount": "file"}));
        assert!(resolve_mount(Some(&base), &spec(&e, "k"), &e).is_err());
        let e = exe(serde_json::json!({"image": "img", "mount": false}));
        assert_eq!(resolve_mount(None, &spec(&e, "k"), &e).unwrap(), None);
    }
}
