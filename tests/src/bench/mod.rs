//! Drover's benchmark harness: figures, not assertions. Each scenario states
//! its setup, prints a table and writes JSON beside it. `--smoke` shrinks
//! every scenario to seconds so CI keeps the harness from rotting.

mod docker;
mod fleet;
mod proc;
mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

pub use scenarios::SCENARIOS;

#[derive(Debug, Clone)]
pub struct Options {
    pub smoke: bool,
    /// Where JSON results go.
    pub out_dir: PathBuf,
}

/// One scenario's result: its setup, a table, and the same figures as JSON.
#[derive(Debug, Clone)]
pub struct Report {
    pub scenario: String,
    pub setup: Vec<(String, String)>,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub figures: Value,
}

impl Report {
    pub fn new(scenario: &str, setup: Vec<(&str, String)>, header: &[&str]) -> Report {
        let mut full = vec![
            ("drover".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            (
                "build".to_string(),
                if cfg!(debug_assertions) {
                    "debug"
                } else {
                    "release"
                }
                .to_string(),
            ),
            (
                "cpus".to_string(),
                std::thread::available_parallelism()
                    .map(|n| n.get().to_string())
                    .unwrap_or_default(),
            ),
        ];
        full.extend(setup.into_iter().map(|(k, v)| (k.to_string(), v)));
        Report {
            scenario: scenario.to_string(),
            setup: full,
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            figures: json!({}),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn print(&self) {
        println!("\n## {}", self.scenario);
        let setup: Vec<String> = self.setup.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("setup: {}", setup.join(" "));
        let widths: Vec<usize> = (0..self.header.len())
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r.get(i).map_or(0, String::len))
                    .chain(std::iter::once(self.header[i].len()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        println!("{}", line(&self.header));
        for row in &self.rows {
            println!("{}", line(row));
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "setup": self.setup.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
            "figures": self.figures,
        })
    }
}

/// p50, p90, p99 and max of a sample.
pub fn percentiles(mut sample: Vec<f64>) -> [f64; 4] {
    if sample.is_empty() {
        return [0.0; 4];
    }
    sample.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| sample[((sample.len() as f64 - 1.0) * q).round() as usize];
    [at(0.5), at(0.9), at(0.99), *sample.last().unwrap_or(&0.0)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn fmt_ms(v: f64) -> String {
    format!("{v:.2} ms")
}

/// Runs the named scenarios (or all) and returns their reports.
pub async fn run(names: &[String], opts: &Options) -> anyhow::Result<Vec<Report>> {
    let names: Vec<&str> = if names.is_empty() || names.iter().any(|n| n == "all") {
        SCENARIOS.iter().map(|(n, _)| *n).collect()
    } else {
        names.iter().map(String::as_str).collect()
    };
    let mut reports = Vec::new();
    for name in names {
        let Some((_, _)) = SCENARIOS.iter().find(|(n, _)| *n == name) else {
            anyhow::bail!(
                "unknown scenario {name:?}; use one of: {}",
                SCENARIOS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        let report = scenarios::run_one(name, opts).await?;
        report.print();
        std::fs::create_dir_all(&opts.out_dir)?;
        let path = opts.out_dir.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&report.to_json())?)?;
        println!("(json: {})", path.display());
        reports.push(report);
    }
    Ok(reports)
}
