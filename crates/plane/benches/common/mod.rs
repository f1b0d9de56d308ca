//! What every benchmark shares: percentile summaries, their printing, and the report
//! each scenario writes.
//!
//! A scenario builds a [`Report`]: its series (samples, summarized as p50/p90/p99/max),
//! single values (a rate, a count, bytes), comparisons of a Plane series with the
//! baseline measured in the same run, and its targets. [`Report::finish`] prints the
//! targets, writes `<out>/<scenario>.json` and redraws `<out>/summary.svg` from every
//! scenario's JSON in `<out>`, so the plot always shows the latest run of each.
//! `<out>` is `PLANE_BENCH_OUT`, or `bench-results/` at the workspace root.

#![allow(dead_code)] // Each bench uses its own part of this module.

mod plot;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Percentiles of a series.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
    pub n: usize,
}

/// Sorts and summarizes `samples` (which must not be empty).
pub fn summarize(mut samples: Vec<f64>) -> Summary {
    assert!(!samples.is_empty(), "a series needs at least one sample");
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    Summary {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: samples[samples.len() - 1],
        mean: samples.iter().sum::<f64>() / samples.len() as f64,
        n: samples.len(),
    }
}

/// One line per series, with `decimals` digits after the point.
pub fn print(name: &str, s: &Summary, decimals: usize) {
    print_unit(name, s, "ms", decimals);
}

fn print_unit(name: &str, s: &Summary, unit: &str, decimals: usize) {
    println!(
        "{name:<44} n={:<6} p50={:>9.d$} {unit}  p90={:>9.d$} {unit}  p99={:>9.d$} {unit}  max={:>9.d$} {unit}",
        s.n,
        s.p50,
        s.p90,
        s.p99,
        s.max,
        d = decimals
    );
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Clock ticks per second (`USER_HZ`) of `/proc/<pid>/stat`.
pub fn clock_tick() -> f64 {
    static TICK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// `comm` and the numeric fields after it of a `/proc/<pid>/stat` (or a task's):
/// `fields[0]` is the state, `[1]` the ppid, `[11]` utime, `[12]` stime, in clock ticks.
pub fn proc_stat(path: &std::path::Path) -> Option<(String, Vec<u64>)> {
    let text = std::fs::read_to_string(path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let fields = text[close + 1..]
        .split_whitespace()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .collect::<Vec<_>>();
    (fields.len() > 12).then_some((comm, fields))
}

/// CPU seconds (user + system, all threads) of process `pid`.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let (_, f) = proc_stat(std::path::Path::new(&format!("/proc/{pid}/stat")))?;
    Some((f[11] + f[12]) as f64 / clock_tick())
}

/// The processes whose environment holds exactly `entry` (`NAME=value`).
pub fn pids_with_env(entry: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for dir in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = dir.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(environ) = std::fs::read(dir.path().join("environ")) else {
            continue;
        };
        if environ.split(|b| *b == 0).any(|var| var == entry.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// SIGKILLs every process whose environment holds `entry` (a run's marker, so that a
/// failed run leaves no backend behind); returns how many were killed.
pub fn kill_pids_with_env(entry: &str) -> usize {
    let kill = |pid: u32| {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok()
    };
    pids_with_env(entry).into_iter().filter(|pid| kill(*pid)).count()
}

/// The postmaster's pid of the `plane-test-postgres` server whose log is `log_path`.
pub fn postmaster_pid(log_path: &std::path::Path) -> anyhow::Result<Option<u32>> {
    let dir = log_path.parent().context("the server's directory")?;
    let pid_file = std::fs::read_to_string(dir.join("data/postmaster.pid"))?;
    Ok(pid_file.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
}

/// A named series of samples.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Series {
    pub name: String,
    pub unit: String,
    #[serde(flatten)]
    pub summary: Summary,
}

/// A single measured value (a rate, a count, a size).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Value {
    pub name: String,
    pub unit: String,
    pub value: f64,
}

/// A Plane measurement next to the baseline measured in the same run. `plane` and
/// `baseline` name series or values of the same report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub label: String,
    pub plane: String,
    pub baseline: String,
    /// Whether a higher number is better (throughput) or worse (latency).
    pub higher_is_better: bool,
}

/// A target of the project's issues, and whether this run met it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub value: f64,
    pub unit: String,
    /// `"<="` or `">="`.
    pub op: String,
    pub bound: f64,
    pub met: bool,
}

/// The machine a report was measured on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
    pub memory_gib: f64,
    pub load_average: String,
}

impl Machine {
    fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            load_average: std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// Everything one scenario measured; see the module docs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    /// Seconds since the Unix epoch when the report was written.
    pub unix_time: u64,
    pub git_commit: String,
    pub machine: Machine,
    pub series: Vec<Series>,
    pub values: Vec<Value>,
    pub comparisons: Vec<Comparison>,
    pub targets: Vec<Target>,
}

impl Report {
    pub fn new(scenario: &str) -> Report {
        Report {
            scenario: scenario.to_string(),
            unix_time: 0,
            git_commit: git_commit(),
            machine: Machine::read(),
            series: Vec::new(),
            values: Vec::new(),
            comparisons: Vec::new(),
            targets: Vec::new(),
        }
    }

    /// Summarizes, prints and records a series (`samples` must not be empty).
    pub fn series(&mut self, name: &str, unit: &str, samples: Vec<f64>, decimals: usize) -> Summary {
        let summary = summarize(samples);
        print_unit(name, &summary, unit, decimals);
        self.series.push(Series {
            name: name.into(),
            unit: unit.into(),
            summary,
        });
        summary
    }

    /// Prints and records a single value.
    pub fn value(&mut self, name: &str, unit: &str, value: f64) -> f64 {
        println!("{name:<44} {value:.3} {unit}");
        self.values.push(Value {
            name: name.into(),
            unit: unit.into(),
            value,
        });
        value
    }

    /// Records that series or value `plane` is to be read against `baseline`, and prints
    /// the ratio (at p50 and p99 for series).
    pub fn compare(&mut self, label: &str, plane: &str, baseline: &str, higher_is_better: bool) {
        let comparison = Comparison {
            label: label.into(),
            plane: plane.into(),
            baseline: baseline.into(),
            higher_is_better,
        };
        match (self.find_series(plane), self.find_series(baseline)) {
            (Some(p), Some(b)) => println!(
                "{:<44} p50 x{:.2}  p99 x{:.2}",
                format!("ratio: {label}"),
                p.summary.p50 / b.summary.p50,
                p.summary.p99 / b.summary.p99
            ),
            _ => match (self.find_value(plane), self.find_value(baseline)) {
                (Some(p), Some(b)) => {
                    println!("{:<44} x{:.2}", format!("ratio: {label}"), p.value / b.value)
                }
                _ => panic!("compare {label}: no series or value named {plane:?} and {baseline:?}"),
            },
        }
        self.comparisons.push(comparison);
    }

    /// Records a target: `value op bound` with `op` one of `"<="` and `">="`.
    pub fn target(&mut self, name: &str, value: f64, unit: &str, op: &str, bound: f64) -> bool {
        let met = match op {
            "<=" => value <= bound,
            ">=" => value >= bound,
            _ => panic!("target {name}: op must be <= or >=, not {op}"),
        };
        self.targets.push(Target {
            name: name.into(),
            value,
            unit: unit.into(),
            op: op.into(),
            bound,
            met,
        });
        met
    }

    pub fn find_series(&self, name: &str) -> Option<&Series> {
        self.series.iter().find(|s| s.name == name)
    }

    pub fn find_value(&self, name: &str) -> Option<&Value> {
        self.values.iter().find(|v| v.name == name)
    }

    /// Prints the targets, writes the JSON report and redraws the plot.
    pub fn finish(mut self) -> anyhow::Result<PathBuf> {
        for t in &self.targets {
            println!(
                "target {:<37} {:.3} {} {} {:.3}: {}",
                t.name,
                t.value,
                t.unit,
                t.op,
                t.bound,
                if t.met { "met" } else { "MISSED" }
            );
        }
        self.unix_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let dir = out_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join(format!("{}.json", self.scenario));
        std::fs::write(&path, serde_json::to_vec_pretty(&self)?)
            .with_context(|| format!("write {}", path.display()))?;
        let svg = dir.join("summary.svg");
        plot::redraw(&dir, &svg)?;
        println!("wrote {} and {}", path.display(), svg.display());
        Ok(path)
    }
}

/// Where reports go: `PLANE_BENCH_OUT`, or `bench-results/` at the workspace root.
pub fn out_dir() -> PathBuf {
    match std::env::var_os("PLANE_BENCH_OUT") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench-results")),
    }
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
