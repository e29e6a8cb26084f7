//! Results of one system and the side-by-side table.

use crate::util::{Concurrent, Samples};
use std::fmt::Write as _;
use std::time::Duration;

/// A measurement, or why there is none.
pub type Outcome<T> = Result<T, String>;

/// Daemon restart with many held locks.
#[derive(Debug, Clone)]
pub struct Restart {
    /// How many locks were held.
    pub held: usize,
    /// From restart to the first request answered.
    pub serving: Duration,
    /// From restart until every lock is back under the daemon's control (`None`: never).
    pub all_back: Option<Duration>,
    /// Locks nobody holds any more afterwards (kernel probe or re-acquire by another owner).
    pub lost: usize,
    /// How the restart was done.
    pub how: String,
    /// After SIGKILL and a new daemon instead: time until it serves.
    pub crash_serving: Duration,
    /// After SIGKILL and a new daemon instead: locks nobody holds.
    pub crash_lost: usize,
}

/// Memory with many held locks.
#[derive(Debug, Clone)]
pub struct Memory {
    /// How many locks were held.
    pub held: usize,
    /// RSS before taking them.
    pub idle: u64,
    /// RSS while holding them.
    pub loaded: u64,
}

/// Everything measured for one system.
#[derive(Debug)]
pub struct SysResult {
    /// Column name.
    pub name: &'static str,
    /// W1: acquire + release, one client (one sample = acquire and release).
    pub single: Outcome<Samples>,
    /// W2: 16 owners on different disks.
    pub concurrent: Outcome<Concurrent>,
    /// W3: VM start with 64 disks.
    pub start64: Outcome<Samples>,
    /// W4: owner death to lock free.
    pub death: Outcome<Samples>,
    /// W5: daemon restart with many locks.
    pub restart: Outcome<Restart>,
    /// W6: memory with many locks.
    pub memory: Outcome<Memory>,
}

impl SysResult {
    /// A system skipped entirely.
    pub fn skipped(name: &'static str, why: &str) -> Self {
        let w = why.to_owned();
        SysResult {
            name,
            single: Err(w.clone()),
            concurrent: Err(w.clone()),
            start64: Err(w.clone()),
            death: Err(w.clone()),
            restart: Err(w.clone()),
            memory: Err(w),
        }
    }

    /// A system that only has the first two rows (the floors).
    pub fn floor(name: &'static str, single: Outcome<Samples>, conc: Outcome<Concurrent>) -> Self {
        let w = "not a lock manager".to_owned();
        SysResult {
            name,
            single,
            concurrent: conc,
            start64: Err(w.clone()),
            death: Err(w.clone()),
            restart: Err(w.clone()),
            memory: Err(w),
        }
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn fmt_time(d: Duration) -> String {
    let u = us(d);
    if u < 1000.0 {
        format!("{u:.1} µs")
    } else if u < 1_000_000.0 {
        format!("{:.2} ms", u / 1000.0)
    } else {
        format!("{:.2} s", u / 1e6)
    }
}

/// One number per system for a row: a value for ratios and its text.
struct Cell {
    value: Option<f64>,
    text: String,
}

fn na(reason: &str, reasons: &mut Vec<String>) -> Cell {
    let k = match reasons.iter().position(|r| r == reason) {
        Some(k) => k,
        None => {
            reasons.push(reason.to_owned());
            reasons.len() - 1
        }
    };
    Cell {
        value: None,
        text: format!("n/a [{}]", k + 1),
    }
}

fn time_cell(d: Duration) -> Cell {
    Cell {
        value: Some(us(d)),
        text: fmt_time(d),
    }
}

struct Row {
    workload: &'static str,
    metric: String,
    cells: Vec<Cell>,
}

fn row<T>(
    reasons: &mut Vec<String>,
    results: &[SysResult],
    workload: &'static str,
    metric: &str,
    get: impl Fn(&SysResult) -> &Outcome<T>,
    cell: impl Fn(&T) -> Cell,
) -> Row {
    Row {
        workload,
        metric: metric.to_owned(),
        cells: results
            .iter()
            .map(|r| match get(r) {
                Ok(v) => cell(v),
                Err(why) => na(why, reasons),
            })
            .collect(),
    }
}

fn ratio(a: &Cell, b: &Cell) -> String {
    match (a.value, b.value) {
        (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
        _ => "—".into(),
    }
}

/// The markdown table. `results[0]` is vmlock; ratio columns are vmlock ÷ each other column.
pub fn table(results: &[SysResult]) -> String {
    let mut reasons = Vec::new();
    let mut rows = vec![
        row(
            &mut reasons,
            results,
            "1. acquire+release, 1 client",
            "p50",
            |r| &r.single,
            |s| time_cell(s.pct(50.0)),
        ),
        row(
            &mut reasons,
            results,
            "1. acquire+release, 1 client",
            "p99",
            |r| &r.single,
            |s| time_cell(s.pct(99.0)),
        ),
        row(
            &mut reasons,
            results,
            "1. acquire+release, 1 client",
            "samples",
            |r| &r.single,
            |s| Cell {
                value: None,
                text: s.len().to_string(),
            },
        ),
        row(
            &mut reasons,
            results,
            "2. 16 owners, different disks",
            "acquire+release pairs/s",
            |r| &r.concurrent,
            |c| Cell {
                value: Some(c.per_sec),
                text: format!("{:.0}", c.per_sec),
            },
        ),
        row(
            &mut reasons,
            results,
            "2. 16 owners, different disks",
            "p50",
            |r| &r.concurrent,
            |c| time_cell(c.samples.pct(50.0)),
        ),
        row(
            &mut reasons,
            results,
            "2. 16 owners, different disks",
            "p99",
            |r| &r.concurrent,
            |c| time_cell(c.samples.pct(99.0)),
        ),
        row(
            &mut reasons,
            results,
            "3. VM start, 64 disks",
            "p50",
            |r| &r.start64,
            |s| time_cell(s.pct(50.0)),
        ),
        row(
            &mut reasons,
            results,
            "3. VM start, 64 disks",
            "p99",
            |r| &r.start64,
            |s| time_cell(s.pct(99.0)),
        ),
        row(
            &mut reasons,
            results,
            "3. VM start, 64 disks",
            "runs",
            |r| &r.start64,
            |s| Cell {
                value: None,
                text: s.len().to_string(),
            },
        ),
        row(
            &mut reasons,
            results,
            "4. owner SIGKILL → other owner holds",
            "p50",
            |r| &r.death,
            |s| time_cell(s.pct(50.0)),
        ),
        row(
            &mut reasons,
            results,
            "4. owner SIGKILL → other owner holds",
            "p99",
            |r| &r.death,
            |s| time_cell(s.pct(99.0)),
        ),
        row(
            &mut reasons,
            results,
            "4. owner SIGKILL → other owner holds",
            "runs",
            |r| &r.death,
            |s| Cell {
                value: None,
                text: s.len().to_string(),
            },
        ),
        row(
            &mut reasons,
            results,
            "5. daemon restart with N held locks",
            "N",
            |r| &r.restart,
            |x| Cell {
                value: None,
                text: x.held.to_string(),
            },
        ),
        row(
            &mut reasons,
            results,
            "5. daemon restart with N held locks",
            "how",
            |r| &r.restart,
            |x| Cell {
                value: None,
                text: x.how.clone(),
            },
        ),
        row(
            &mut reasons,
            results,
            "5. daemon restart with N held locks",
            "until it serves",
            |r| &r.restart,
            |x| time_cell(x.serving),
        ),
        row(
            &mut reasons,
            results,
            "5. daemon restart with N held locks",
            "until every lock is back",
            |r| &r.restart,
            |x| match x.all_back {
                Some(d) => time_cell(d),
                None => Cell {
                    value: None,
                    text: "never".into(),
                },
            },
        ),
        row(
            &mut reasons,
            results,
            "5. daemon restart with N held locks",
            "locks lost (must be 0)",
            |r| &r.restart,
            |x| Cell {
                value: Some(x.lost as f64),
                text: x.lost.to_string(),
            },
        ),
        row(
            &mut reasons,
            results,
            "5. daemon restart with N held locks",
            "crash (SIGKILL + start): until it serves",
            |r| &r.restart,
            |x| time_cell(x.crash_serving),
        ),
        row(
            &mut reasons,
            results,
            "5. daemon restart with N held locks",
            "crash (SIGKILL + start): locks lost",
            |r| &r.restart,
            |x| Cell {
                value: None,
                text: x.crash_lost.to_string(),
            },
        ),
        row(
            &mut reasons,
            results,
            "6. daemon RSS with N held locks",
            "N",
            |r| &r.memory,
            |m| Cell {
                value: None,
                text: m.held.to_string(),
            },
        ),
        row(
            &mut reasons,
            results,
            "6. daemon RSS with N held locks",
            "RSS idle",
            |r| &r.memory,
            |m| Cell {
                value: Some(m.idle as f64),
                text: format!("{:.1} MiB", m.idle as f64 / 1048576.0),
            },
        ),
        row(
            &mut reasons,
            results,
            "6. daemon RSS with N held locks",
            "RSS with N locks",
            |r| &r.memory,
            |m| Cell {
                value: Some(m.loaded as f64),
                text: format!("{:.1} MiB", m.loaded as f64 / 1048576.0),
            },
        ),
    ];
    // Ratios only where they mean something (not counts, not "how").
    let no_ratio = ["samples", "runs", "N", "how", "locks lost (must be 0)"];
    let mut out = String::new();
    let _ = write!(out, "| workload | metric |");
    for r in results {
        let _ = write!(out, " {} |", r.name);
    }
    for r in &results[1..] {
        let _ = write!(out, " {} ÷ {} |", results[0].name, r.name);
    }
    out.push('\n');
    let _ = write!(out, "|---|---|");
    for _ in 0..(results.len() * 2 - 1) {
        out.push_str("---|");
    }
    out.push('\n');
    for r in rows.iter_mut() {
        let _ = write!(out, "| {} | {} |", r.workload, r.metric);
        for c in &r.cells {
            let _ = write!(out, " {} |", c.text);
        }
        for c in &r.cells[1..] {
            let text = if no_ratio.contains(&r.metric.as_str()) {
                "—".to_owned()
            } else {
                ratio(&r.cells[0], c)
            };
            let _ = write!(out, " {text} |");
        }
        out.push('\n');
    }
    out.push('\n');
    for (k, r) in reasons.iter().enumerate() {
        let _ = writeln!(out, "[{}] {r}", k + 1);
    }
    out
}
