//! What a backend runs.
//!
//! The JSON of `spawn_config.executable` is either the Plane 0.5 Docker form
//! (`{"image": …}`) or our process form (`{"command": ["prog", …]}`). The presence of
//! `image` selects Docker. Unknown fields are ignored, as in Plane 0.5; fields of the
//! wrong type are errors.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The kinds of runtime a drone can offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// Backends are child processes of the drone.
    Process,
    /// Backends are Docker containers.
    Docker,
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuntimeKind::Process => "process",
            RuntimeKind::Docker => "docker",
        })
    }
}

/// A validated executable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Executable {
    /// A Docker container (Plane 0.5's executable).
    Docker(DockerExecutable),
    /// A child process.
    Process(ProcessExecutable),
}

impl Executable {
    /// Which runtime can run this executable.
    pub fn runtime_kind(&self) -> RuntimeKind {
        match self {
            Executable::Docker(_) => RuntimeKind::Docker,
            Executable::Process(_) => RuntimeKind::Process,
        }
    }

    /// Parses and validates an executable from JSON.
    pub fn from_json(value: &serde_json::Value) -> Result<Executable, String> {
        let obj = value.as_object().ok_or("executable must be a JSON object")?;
        if obj.contains_key("image") {
            let d: DockerExecutable =
                serde_json::from_value(value.clone()).map_err(|e| format!("invalid Docker executable: {e}"))?;
            d.validate()?;
            Ok(Executable::Docker(d))
        } else if obj.contains_key("command") {
            let p: ProcessExecutable =
                serde_json::from_value(value.clone()).map_err(|e| format!("invalid process executable: {e}"))?;
            p.validate()?;
            Ok(Executable::Process(p))
        } else {
            Err("executable needs either `image` (Docker) or `command` (process)".into())
        }
    }
}

impl<'de> Deserialize<'de> for Executable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Executable::from_json(&v).map_err(serde::de::Error::custom)
    }
}

fn check_env(env: &BTreeMap<String, String>) -> Result<(), String> {
    for k in env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(format!("invalid environment variable name {k:?}"));
        }
    }
    if let Some((k, _)) = env.iter().find(|(_, v)| v.contains('\0')) {
        return Err(format!("environment variable {k:?} contains a NUL byte"));
    }
    Ok(())
}

/// A backend run as a child process of the drone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessExecutable {
    /// The program and its arguments. The program must match one of the drone's
    /// `--allow-command` patterns.
    pub command: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The working directory; the drone's own if absent.
    #[serde(default)]
    pub cwd: Option<String>,
}

impl ProcessExecutable {
    fn validate(&self) -> Result<(), String> {
        match self.command.first() {
            None => return Err("`command` must name a program".into()),
            Some(p) if p.is_empty() => return Err("`command` must name a program".into()),
            _ => {}
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return Err("`command` contains a NUL byte".into());
        }
        check_env(&self.env)
    }
}

/// When to pull a Docker image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PullPolicy {
    /// Pull only when the image is not present locally.
    #[default]
    IfNotPresent,
    /// Pull every time.
    Always,
    /// Never pull.
    Never,
}

/// Registry credentials for a pull.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerCredentials {
    /// Registry user.
    pub username: String,
    /// Registry password.
    pub password: String,
}

impl fmt::Debug for DockerCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerCredentials")
            .field("username", &self.username)
            .field("password", &"…")
            .finish()
    }
}

/// Resource limits of a container, as in Plane 0.5.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ResourceLimits {
    /// CFS period in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_period: Option<u64>,
    /// Share of the period the container may use, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_period_percent: Option<u8>,
    /// Total CPU seconds before the container is killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time_limit: Option<u64>,
    /// Memory limit in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<i64>,
    /// Disk limit in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_limit_bytes: Option<i64>,
}

/// `mount`: `true` mounts `<mount base>/<key name>`, a string mounts `<mount base>/<path>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Mount {
    /// `true` or `false`.
    Bool(bool),
    /// A relative path under the mount base.
    Path(String),
}

/// A backend run as a Docker container (Plane 0.5's executable JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerExecutable {
    /// The image reference.
    pub image: String,
    /// When to pull.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
    /// Registry credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<DockerCredentials>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Resource limits.
    #[serde(default)]
    pub resource_limits: ResourceLimits,
    /// A data mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<Mount>,
    /// The Docker network to attach to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_name: Option<String>,
    /// Replaces the image's `CMD` (an extension of ours).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image's `ENTRYPOINT` (an extension of ours).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
}

impl DockerExecutable {
    fn validate(&self) -> Result<(), String> {
        if self.image.trim().is_empty() {
            return Err("`image` must not be empty".into());
        }
        if let Some(Mount::Path(p)) = &self.mount {
            if p.is_empty() || p.starts_with('/') || p.split('/').any(|c| c == "..") {
                return Err(format!("`mount` path {p:?} must be relative and must not contain `..`"));
            }
        }
        for (field, args) in [("command", &self.command), ("entrypoint", &self.entrypoint)] {
            if let Some(args) = args {
                if args.is_empty() {
                    return Err(format!(
                        "`{field}` must not be an empty list (leave it out to keep the image's)"
                    ));
                }
                if args.iter().any(|a| a.contains('\0')) {
                    return Err(format!("`{field}` contains a NUL byte"));
                }
            }
        }
        if let Some(network) = &self.network_name {
            if network.is_empty() {
                return Err("`network_name` must not be empty".into());
            }
            // Network modes that are not networks: sharing the host's or another
            // container's network namespace would bypass the drone's isolation.
            if matches!(network.as_str(), "host" | "none") || network.starts_with("container:") {
                return Err(format!(
                    "`network_name` {network:?} is a network mode, not a network Plane can use"
                ));
            }
        }
        if let Some(pct) = self.resource_limits.cpu_period_percent {
            if pct == 0 || pct > 100 {
                return Err("`cpu_period_percent` must be in 1..=100".into());
            }
        }
        check_env(&self.env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_both_forms() {
        let e = Executable::from_json(&json!({"image": "x:1", "unknown": 3})).unwrap();
        assert_eq!(e.runtime_kind(), RuntimeKind::Docker);
        let e = Executable::from_json(&json!({"command": ["plane", "demo-backend"], "env": {"A": "b"}})).unwrap();
        assert_eq!(e.runtime_kind(), RuntimeKind::Process);
    }

    #[test]
    fn rejects_bad_executables() {
        for bad in [
            json!(3),
            json!({}),
            json!({"command": []}),
            json!({"command": "plane"}),
            json!({"command": [""]}),
            json!({"command": ["x"], "env": {"A=B": "c"}}),
            json!({"image": ""}),
            json!({"image": "x", "pull_policy": "Sometimes"}),
            json!({"image": "x", "mount": "../etc"}),
            json!({"image": "x", "mount": "/etc"}),
            json!({"image": "x", "resource_limits": {"cpu_period_percent": 200}}),
            json!({"image": "x", "command": []}),
            json!({"image": "x", "entrypoint": "sh"}),
            json!({"image": "x", "network_name": ""}),
            json!({"image": "x", "network_name": "host"}),
            json!({"image": "x", "network_name": "container:plane-other"}),
            json!({"image": "x", "mount": "a/../../etc"}),
            json!({"image": "x", "resource_limits": {"memory_limit_bytes": "lots"}}),
        ] {
            assert!(Executable::from_json(&bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn round_trips() {
        let e = Executable::from_json(&json!({"image": "x:1", "mount": true, "pull_policy": "Never"})).unwrap();
        let back: Executable = serde_json::from_value(serde_json::to_value(&e).unwrap()).unwrap();
        assert_eq!(e, back);
    }
}
