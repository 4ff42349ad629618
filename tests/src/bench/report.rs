//! Result rows and their rendering: a markdown table per suite on stdout
//! and the same rows as JSON.

use std::fmt::Write as _;

use serde_json::{json, Value};

use super::measure::Samples;

/// One comparison: our command against a peer on the same input.
#[derive(Clone, Debug)]
pub struct Row {
    pub case: String,
    pub ours: Samples,
    pub peer_name: String,
    pub peer: Samples,
    /// Pass when `ours median / peer median <= target`; `None`: informational.
    pub target: Option<f64>,
    /// Extra facts for the notes (bytes per entry, counts...).
    pub note: String,
}

impl Row {
    pub fn ratio(&self) -> f64 {
        self.ours.median() / self.peer.median()
    }

    pub fn pass(&self) -> Option<bool> {
        self.target.map(|t| self.ratio() <= t)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "case": self.case,
            "ours": {"median": self.ours.median(), "min": self.ours.min(), "max": self.ours.max(), "samples": self.ours.0},
            "peer": self.peer_name,
            "peer_secs": {"median": self.peer.median(), "min": self.peer.min(), "max": self.peer.max(), "samples": self.peer.0},
            "ratio": self.ratio(),
            "target": self.target,
            "pass": self.pass(),
            "note": self.note,
        })
    }
}

/// An absolute limit (not a ratio), e.g. peak memory per entry.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub limit: f64,
    pub note: String,
}

impl Check {
    pub fn at_most(name: &str, value: f64, unit: &str, limit: f64, note: String) -> Check {
        Check {
            name: name.into(),
            value,
            unit: unit.into(),
            limit,
            note,
        }
    }

    pub fn pass(&self) -> bool {
        self.value <= self.limit
    }

    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name, "value": self.value, "unit": self.unit,
            "limit": self.limit, "pass": self.pass(), "note": self.note,
        })
    }
}

/// The rows of one suite run, plus what it ran on.
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub suite: String,
    pub context: Vec<(String, String)>,
    pub rows: Vec<Row>,
    pub checks: Vec<Check>,
    /// Work paths to delete once the results are out (deleting a big
    /// tree can take minutes on a filesystem mounted with `discard`).
    pub cleanup: Vec<std::path::PathBuf>,
}

fn secs(s: f64) -> String {
    if s.is_nan() {
        "-".into()
    } else if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

fn spread(s: &Samples) -> String {
    format!("{}–{}", secs(s.min()), secs(s.max()))
}

impl Table {
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "### {}\n", self.suite);
        for (k, v) in &self.context {
            let _ = writeln!(o, "- {k}: {v}");
        }
        let _ = writeln!(
            o,
            "\n| case | ours (median) | peer | peer (median) | ratio | spread ours | spread peer | target | result |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
        for r in &self.rows {
            let target = r
                .target
                .map(|t| format!("≤ {t:.2}x"))
                .unwrap_or_else(|| "info".into());
            let result = match r.pass() {
                Some(true) => "pass",
                Some(false) => "**FAIL**",
                None => "-",
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {:.2}x | {} | {} | {} | {} |",
                r.case,
                secs(r.ours.median()),
                r.peer_name,
                secs(r.peer.median()),
                r.ratio(),
                spread(&r.ours),
                spread(&r.peer),
                target,
                result
            );
        }
        if !self.checks.is_empty() {
            let _ = writeln!(o, "\n| check | value | limit | result |");
            let _ = writeln!(o, "|---|---|---|---|");
            for c in &self.checks {
                let _ = writeln!(
                    o,
                    "| {} | {:.0} {} ({}) | < {:.0} {} | {} |",
                    c.name,
                    c.value,
                    c.unit,
                    c.note,
                    c.limit,
                    c.unit,
                    if c.pass() { "pass" } else { "**FAIL**" }
                );
            }
        }
        let notes: Vec<_> = self.rows.iter().filter(|r| !r.note.is_empty()).collect();
        if !notes.is_empty() {
            let _ = writeln!(o);
            for r in notes {
                let _ = writeln!(o, "- {}: {}", r.case, r.note);
            }
        }
        o
    }

    pub fn to_json(&self) -> Value {
        json!({
            "suite": self.suite,
            "context": self.context.iter().map(|(k, v)| (k.clone(), Value::from(v.clone()))).collect::<serde_json::Map<_, _>>(),
            "rows": self.rows.iter().map(Row::to_json).collect::<Vec<_>>(),
            "checks": self.checks.iter().map(Check::to_json).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_ratio_and_markdown() {
        let r = Row {
            case: "cold scan".into(),
            ours: Samples(vec![1.0, 1.2, 1.1]),
            peer_name: "b3sum".into(),
            peer: Samples(vec![1.0, 1.0, 1.0]),
            target: Some(1.3),
            note: "x".into(),
        };
        assert!((r.ratio() - 1.1).abs() < 1e-9);
        assert_eq!(r.pass(), Some(true));
        let t = Table {
            suite: "scan".into(),
            context: vec![("entries".into(), "10".into())],
            rows: vec![r],
            cleanup: Vec::new(),
            checks: vec![Check::at_most(
                "rss",
                150.0,
                "B/entry",
                200.0,
                String::new(),
            )],
        };
        let md = t.markdown();
        assert!(
            md.contains("| cold scan | 1.10 s | b3sum | 1.00 s | 1.10x |"),
            "{md}"
        );
        assert!(md.contains("pass"));
        assert!(
            md.contains("| rss | 150 B/entry () | < 200 B/entry | pass |"),
            "{md}"
        );
        assert_eq!(t.to_json()["rows"][0]["pass"], Value::Bool(true));
    }
}
