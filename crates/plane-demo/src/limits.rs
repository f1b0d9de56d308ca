//! The limits the backend runs under, as the backend itself sees them: what `GET
//! /debug/limits` answers, so tests can check that a runtime applied the limits it was
//! asked for (memory, CPU, pids, `ulimit -t`, `no-new-privileges`).
//!
//! Cgroup files are read under `/sys/fs/cgroup`, trying the cgroup v2 file first and the
//! v1 file of the same limit next, so both hierarchies (and hybrid hosts) work. Inside a
//! container the runtime mounts the container's own cgroup there.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Values at or above this (2^62) are "no limit": cgroup v1 reports an unlimited memory
/// limit as the largest multiple of the page size below 2^63 (9223372036854771712 with
/// 4 KiB pages) instead of a word.
const UNLIMITED_FROM: u64 = 1 << 62;

/// Which cgroup hierarchy `/sys/fs/cgroup` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// One controller per directory (`/sys/fs/cgroup/memory/…`); also hybrid hosts.
    V1,
    /// The unified hierarchy (`/sys/fs/cgroup/cgroup.controllers` exists).
    V2,
}

/// The limits of this process, as JSON:
///
/// ```json
/// {"cgroup":"v1","memory_limit_bytes":268435456,"cpu_quota_micros":50000,
///  "cpu_period_micros":100000,"pids_limit":64,"rlimit_cpu_soft":30,"rlimit_cpu_hard":30,
///  "no_new_privs":true}
/// ```
///
/// Every field is `null` when there is no limit (`max`, `-1`, `RLIM_INFINITY`, the v1
/// "unlimited" number) or when it cannot be read (no such file, not a number).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// `"v1"` or `"v2"`; `null` if `/sys/fs/cgroup` holds neither.
    pub cgroup: Option<CgroupVersion>,
    /// v2 `memory.max`, else v1 `memory/memory.limit_in_bytes`.
    pub memory_limit_bytes: Option<u64>,
    /// CPU time allowed per period, in microseconds: the first field of v2 `cpu.max`,
    /// else v1 `cpu.cfs_quota_us` (under `cpu/`, `cpu,cpuacct/` or `cpuacct,cpu/`).
    /// `docker run --cpus 0.5` gives 50000 with a period of 100000.
    pub cpu_quota_micros: Option<u64>,
    /// The period of that quota, in microseconds: the second field of v2 `cpu.max`, else
    /// v1 `cpu.cfs_period_us`. Reported even when the quota is `null`.
    pub cpu_period_micros: Option<u64>,
    /// v2 `pids.max`, else v1 `pids/pids.max`.
    pub pids_limit: Option<u64>,
    /// The soft `RLIMIT_CPU`, in seconds of CPU time (what `ulimit -t` shows).
    pub rlimit_cpu_soft: Option<u64>,
    /// The hard `RLIMIT_CPU`, in seconds.
    pub rlimit_cpu_hard: Option<u64>,
    /// `NoNewPrivs` of `/proc/self/status`.
    pub no_new_privs: Option<bool>,
}

impl Limits {
    /// Reads the limits of this process.
    pub fn read() -> Limits {
        let (rlimit_cpu_soft, rlimit_cpu_hard) = rlimit_cpu();
        Limits {
            rlimit_cpu_soft,
            rlimit_cpu_hard,
            ..Limits::read_files(Path::new("/"))
        }
    }

    /// Reads everything that comes from files, with `root` in place of `/`.
    fn read_files(root: &Path) -> Limits {
        let cgroup = root.join("sys/fs/cgroup");
        let read = |path: &str| std::fs::read_to_string(cgroup.join(path)).ok();
        let cgroup_version = if cgroup.join("cgroup.controllers").is_file() {
            Some(CgroupVersion::V2)
        } else if ["memory", "cpu", "cpu,cpuacct", "cpuacct,cpu", "pids"]
            .iter()
            .any(|dir| cgroup.join(dir).is_dir())
        {
            Some(CgroupVersion::V1)
        } else {
            None
        };

        let memory_limit_bytes = read("memory.max")
            .or_else(|| read("memory/memory.limit_in_bytes"))
            .and_then(|s| parse_limit(&s));
        let (cpu_quota_micros, cpu_period_micros) = match read("cpu.max") {
            Some(cpu_max) => parse_cpu_max(&cpu_max),
            None => ["cpu", "cpu,cpuacct", "cpuacct,cpu"]
                .iter()
                .find_map(|dir| {
                    let quota = read(&format!("{dir}/cpu.cfs_quota_us"));
                    let period = read(&format!("{dir}/cpu.cfs_period_us"));
                    (quota.is_some() || period.is_some()).then(|| {
                        (
                            quota.and_then(|s| parse_limit(&s)),
                            period.and_then(|s| parse_limit(&s)),
                        )
                    })
                })
                .unwrap_or((None, None)),
        };
        let pids_limit = read("pids.max")
            .or_else(|| read("pids/pids.max"))
            .and_then(|s| parse_limit(&s));
        let no_new_privs = std::fs::read_to_string(root.join("proc/self/status"))
            .ok()
            .and_then(|status| parse_no_new_privs(&status));
        Limits {
            cgroup: cgroup_version,
            memory_limit_bytes,
            cpu_quota_micros,
            cpu_period_micros,
            pids_limit,
            rlimit_cpu_soft: None,
            rlimit_cpu_hard: None,
            no_new_privs,
        }
    }
}

/// One limit value: a number, or `None` for `max`, a negative number (v1's `-1`), a
/// number of at least [`UNLIMITED_FROM`], or anything unreadable.
fn parse_limit(s: &str) -> Option<u64> {
    s.trim().parse::<u64>().ok().filter(|&n| n < UNLIMITED_FROM)
}

/// v2 `cpu.max`: `"<quota|max> <period>"`.
fn parse_cpu_max(s: &str) -> (Option<u64>, Option<u64>) {
    let mut fields = s.split_whitespace();
    let quota = fields.next().and_then(parse_limit);
    let period = fields.next().and_then(parse_limit);
    (quota, period)
}

/// The `NoNewPrivs:` line of `/proc/<pid>/status`.
fn parse_no_new_privs(status: &str) -> Option<bool> {
    let value = status.lines().find_map(|line| line.strip_prefix("NoNewPrivs:"))?;
    match value.trim() {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

/// The soft and hard `RLIMIT_CPU`, `None` where unlimited.
fn rlimit_cpu() -> (Option<u64>, Option<u64>) {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    match getrlimit(Resource::RLIMIT_CPU) {
        Ok((soft, hard)) => {
            let limit = |n: u64| (n != RLIM_INFINITY).then_some(n);
            (limit(soft), limit(hard))
        }
        Err(err) => {
            tracing::warn!(%err, "getrlimit(RLIMIT_CPU) failed");
            (None, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Builds a fake root with `files` (path, content) and checks what is read from it.
    fn check(files: &[(&str, &str)], expected: serde_json::Value) {
        let root = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let path = root.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        let limits = Limits::read_files(root.path());
        assert_eq!(serde_json::to_value(&limits).unwrap(), expected, "{files:?}");
    }

    #[test]
    fn cgroup_v2() {
        check(
            &[
                ("sys/fs/cgroup/cgroup.controllers", "cpu memory pids\n"),
                ("sys/fs/cgroup/memory.max", "268435456\n"),
                ("sys/fs/cgroup/cpu.max", "50000 100000\n"),
                ("sys/fs/cgroup/pids.max", "64\n"),
                ("proc/self/status", "Name:\tx\nNoNewPrivs:\t1\nSeccomp:\t2\n"),
            ],
            json!({"cgroup": "v2", "memory_limit_bytes": 268435456, "cpu_quota_micros": 50000,
                   "cpu_period_micros": 100000, "pids_limit": 64, "rlimit_cpu_soft": null,
                   "rlimit_cpu_hard": null, "no_new_privs": true}),
        );
        check(
            &[
                ("sys/fs/cgroup/cgroup.controllers", ""),
                ("sys/fs/cgroup/memory.max", "max\n"),
                ("sys/fs/cgroup/cpu.max", "max 100000\n"),
                ("sys/fs/cgroup/pids.max", "max\n"),
                ("proc/self/status", "NoNewPrivs:\t0\n"),
            ],
            json!({"cgroup": "v2", "memory_limit_bytes": null, "cpu_quota_micros": null,
                   "cpu_period_micros": 100000, "pids_limit": null, "rlimit_cpu_soft": null,
                   "rlimit_cpu_hard": null, "no_new_privs": false}),
        );
    }

    #[test]
    fn cgroup_v1() {
        check(
            &[
                ("sys/fs/cgroup/memory/memory.limit_in_bytes", "134217728\n"),
                ("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "150000\n"),
                ("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n"),
                ("sys/fs/cgroup/pids/pids.max", "100\n"),
            ],
            json!({"cgroup": "v1", "memory_limit_bytes": 134217728, "cpu_quota_micros": 150000,
                   "cpu_period_micros": 100000, "pids_limit": 100, "rlimit_cpu_soft": null,
                   "rlimit_cpu_hard": null, "no_new_privs": null}),
        );
        // What an unlimited Docker container shows on a cgroup v1 host.
        check(
            &[
                ("sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n"),
                ("sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n"),
                ("sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n"),
                ("sys/fs/cgroup/pids/pids.max", "max\n"),
            ],
            json!({"cgroup": "v1", "memory_limit_bytes": null, "cpu_quota_micros": null,
                   "cpu_period_micros": 100000, "pids_limit": null, "rlimit_cpu_soft": null,
                   "rlimit_cpu_hard": null, "no_new_privs": null}),
        );
    }

    #[test]
    fn nothing_readable() {
        check(
            &[("proc/self/status", "NoNewPrivs: maybe\n")],
            json!({"cgroup": null, "memory_limit_bytes": null, "cpu_quota_micros": null,
                   "cpu_period_micros": null, "pids_limit": null, "rlimit_cpu_soft": null,
                   "rlimit_cpu_hard": null, "no_new_privs": null}),
        );
    }

    #[test]
    fn values() {
        assert_eq!(parse_limit(" 42\n"), Some(42));
        assert_eq!(parse_limit("max"), None);
        assert_eq!(parse_limit("-1"), None);
        assert_eq!(parse_limit(""), None);
        assert_eq!(parse_limit("9223372036854771712"), None);
        assert_eq!(parse_cpu_max("max"), (None, None));
        assert_eq!(parse_cpu_max("200000 100000\n"), (Some(200000), Some(100000)));
    }

    #[test]
    fn this_process() {
        // Whatever the machine, reading never fails, and the rlimits agree with each other.
        let limits = Limits::read();
        if let (Some(soft), Some(hard)) = (limits.rlimit_cpu_soft, limits.rlimit_cpu_hard) {
            assert!(soft <= hard, "{limits:?}");
        }
        assert!(
            limits.no_new_privs.is_some(),
            "Linux has NoNewPrivs in /proc/self/status"
        );
    }
}
