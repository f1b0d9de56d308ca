//! What both benchmarks share: percentile summaries and their printing.

/// Percentiles of a series of milliseconds.
pub struct Summary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
    pub n: usize,
}

/// Sorts and summarizes `ms` (which must not be empty).
pub fn summarize(mut ms: Vec<f64>) -> Summary {
    ms.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    Summary {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        mean: ms.iter().sum::<f64>() / ms.len() as f64,
        n: ms.len(),
    }
}

/// One line per series, with `decimals` digits after the point.
pub fn print(name: &str, s: &Summary, decimals: usize) {
    println!(
        "{name:<40} n={:<5} p50={:>8.d$} ms  p90={:>8.d$} ms  p99={:>8.d$} ms  mean={:>8.d$} ms",
        s.n,
        s.p50,
        s.p90,
        s.p99,
        s.mean,
        d = decimals
    );
}
