//! The summary plot: one panel per comparison of every report in a directory, Plane
//! next to its same-run baseline (p50 and p99 for series, the value for single values),
//! each panel on its own scale, and every target with whether it was met. Plain SVG.

use super::Report;
use std::fmt::Write;
use std::path::Path;

const WIDTH: f64 = 960.0;
const LABEL_W: f64 = 330.0;
const BAR_W: f64 = 480.0;
/// Longer bar labels are cut (with an ellipsis) to fit left of the bars.
const LABEL_CHARS: usize = 56;
const BAR_H: f64 = 14.0;
const PLANE: &str = "#3367d6";
const BASELINE: &str = "#9aa0a6";

/// Reads every `*.json` report in `dir` and writes the plot to `svg`.
pub fn redraw(dir: &Path, svg: &Path) -> anyhow::Result<()> {
    let mut reports = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            match serde_json::from_slice::<Report>(&std::fs::read(&path)?) {
                Ok(report) => reports.push(report),
                Err(e) => eprintln!("plot: skipping {}: {e}", path.display()),
            }
        }
    }
    reports.sort_by(|a, b| a.scenario.cmp(&b.scenario));
    std::fs::write(svg, render(&reports))?;
    Ok(())
}

/// A bar: its label, value and colour.
struct Bar {
    label: String,
    value: f64,
    unit: String,
    colour: &'static str,
}

fn bars(report: &Report, plane: &str, baseline: &str) -> Vec<Bar> {
    if let (Some(p), Some(b)) = (report.find_series(plane), report.find_series(baseline)) {
        return vec![
            Bar {
                label: format!("{plane}, p50"),
                value: p.summary.p50,
                unit: p.unit.clone(),
                colour: PLANE,
            },
            Bar {
                label: format!("{baseline}, p50"),
                value: b.summary.p50,
                unit: b.unit.clone(),
                colour: BASELINE,
            },
            Bar {
                label: format!("{plane}, p99"),
                value: p.summary.p99,
                unit: p.unit.clone(),
                colour: PLANE,
            },
            Bar {
                label: format!("{baseline}, p99"),
                value: b.summary.p99,
                unit: b.unit.clone(),
                colour: BASELINE,
            },
        ];
    }
    if let (Some(p), Some(b)) = (report.find_value(plane), report.find_value(baseline)) {
        return vec![
            Bar {
                label: plane.to_string(),
                value: p.value,
                unit: p.unit.clone(),
                colour: PLANE,
            },
            Bar {
                label: baseline.to_string(),
                value: b.value,
                unit: b.unit.clone(),
                colour: BASELINE,
            },
        ];
    }
    Vec::new()
}

fn render(reports: &[Report]) -> String {
    let mut body = String::new();
    let mut y = 40.0;
    for report in reports {
        let _ = writeln!(
            body,
            r##"<text x="10" y="{y}" font-size="15" font-weight="bold">{} <tspan font-size="11" font-weight="normal" fill="#555">(commit {}, {} CPUs, load {})</tspan></text>"##,
            escape(&report.scenario),
            escape(&report.git_commit),
            report.machine.nproc,
            escape(&report.machine.load_average)
        );
        y += 20.0;
        for c in &report.comparisons {
            let bars = bars(report, &c.plane, &c.baseline);
            if bars.is_empty() {
                continue;
            }
            let better = if c.higher_is_better {
                "higher is better"
            } else {
                "lower is better"
            };
            let _ = writeln!(
                body,
                r#"<text x="20" y="{y}" font-size="12" font-style="italic">{} ({better})</text>"#,
                escape(&c.label)
            );
            y += 6.0;
            let max = bars.iter().map(|b| b.value).fold(f64::MIN_POSITIVE, f64::max);
            for bar in &bars {
                let w = (bar.value / max * BAR_W).max(1.0);
                let _ = writeln!(
                    body,
                    r#"<text x="{tx}" y="{ty}" font-size="11" text-anchor="end">{}</text><rect x="{LABEL_W}" y="{y}" width="{w:.1}" height="{BAR_H}" fill="{}"/><text x="{vx:.1}" y="{ty}" font-size="11">{} {}</text>"#,
                    escape(&shorten(&bar.label)),
                    bar.colour,
                    number(bar.value),
                    escape(&bar.unit),
                    tx = LABEL_W - 6.0,
                    ty = y + BAR_H - 3.0,
                    vx = LABEL_W + w + 4.0,
                );
                y += BAR_H + 3.0;
            }
            y += 12.0;
        }
        for t in &report.targets {
            let (mark, colour) = if t.met {
                ("met", "#188038")
            } else {
                ("MISSED", "#c5221f")
            };
            let _ = writeln!(
                body,
                r#"<text x="20" y="{y}" font-size="12">target: {}: {} {} {} {} {} — <tspan fill="{colour}" font-weight="bold">{mark}</tspan></text>"#,
                escape(&t.name),
                number(t.value),
                escape(&t.unit),
                escape(&t.op),
                number(t.bound),
                escape(&t.unit),
            );
            y += 17.0;
        }
        y += 16.0;
    }
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{h}" viewBox="0 0 {WIDTH} {h}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="20" font-size="13">Plane benchmarks: <tspan fill="{PLANE}">■ Plane</tspan> <tspan fill="{BASELINE}">■ baseline, same run</tspan>; each panel on its own scale</text>
{body}</svg>
"#,
        h = y + 10.0
    )
}

fn shorten(label: &str) -> String {
    if label.chars().count() <= LABEL_CHARS {
        return label.to_string();
    }
    let mut cut: String = label.chars().take(LABEL_CHARS - 1).collect();
    cut.push('…');
    cut
}

fn number(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
