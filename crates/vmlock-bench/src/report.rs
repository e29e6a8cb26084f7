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

fn row<R, T>(
    reasons: &mut Vec<String>,
    results: &[R],
    workload: &'static str,
    metric: &str,
    get: impl Fn(&R) -> &Outcome<T>,
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

/// Rows 1 and 2 (one client's acquire+release latency, 16 owners' throughput and latency), for
/// every table whose results carry them.
fn latency_rows<R>(
    reasons: &mut Vec<String>,
    results: &[R],
    single: impl Fn(&R) -> &Outcome<Samples> + Copy,
    concurrent: impl Fn(&R) -> &Outcome<Concurrent> + Copy,
) -> Vec<Row> {
    vec![
        row(
            reasons,
            results,
            "1. acquire+release, 1 client",
            "p50",
            single,
            |s| time_cell(s.pct(50.0)),
        ),
        row(
            reasons,
            results,
            "1. acquire+release, 1 client",
            "p99",
            single,
            |s| time_cell(s.pct(99.0)),
        ),
        row(
            reasons,
            results,
            "1. acquire+release, 1 client",
            "samples",
            single,
            |s| Cell {
                value: None,
                text: s.len().to_string(),
            },
        ),
        row(
            reasons,
            results,
            "2. 16 owners, different disks",
            "acquire+release pairs/s",
            concurrent,
            |c| Cell {
                value: Some(c.per_sec),
                text: format!("{:.0}", c.per_sec),
            },
        ),
        row(
            reasons,
            results,
            "2. 16 owners, different disks",
            "p50",
            concurrent,
            |c| time_cell(c.samples.pct(50.0)),
        ),
        row(
            reasons,
            results,
            "2. 16 owners, different disks",
            "p99",
            concurrent,
            |c| time_cell(c.samples.pct(99.0)),
        ),
    ]
}

/// The markdown table. `results[0]` is vmlock; ratio columns are vmlock ÷ each other column.
pub fn table(results: &[SysResult]) -> String {
    let mut reasons = Vec::new();
    let mut rows = latency_rows(&mut reasons, results, |r| &r.single, |r| &r.concurrent);
    rows.extend(vec![
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
    ]);
    let names: Vec<&str> = results.iter().map(|r| r.name).collect();
    render(&names, &mut rows, &reasons)
}

/// Ratios only where they mean something (not counts, not settings, not "how").
const NO_RATIO: &[&str] = &[
    "samples",
    "runs",
    "N",
    "how",
    "locks lost (must be 0)",
    "lease timeout",
    "loss",
    "fenced before the other host held (must be all)",
];

/// The markdown table: one column per system, then `names[0]` ÷ each other column.
fn render(names: &[&str], rows: &mut [Row], reasons: &[String]) -> String {
    let mut out = String::new();
    let _ = write!(out, "| workload | metric |");
    for n in names {
        let _ = write!(out, " {n} |");
    }
    for n in &names[1..] {
        let _ = write!(out, " {} ÷ {n} |", names[0]);
    }
    out.push('\n');
    let _ = write!(out, "|---|---|");
    for _ in 0..(names.len() * 2 - 1) {
        out.push_str("---|");
    }
    out.push('\n');
    for r in rows.iter_mut() {
        let _ = write!(out, "| {} | {} |", r.workload, r.metric);
        for c in &r.cells {
            let _ = write!(out, " {} |", c.text);
        }
        for c in &r.cells[1..] {
            let text = if NO_RATIO.contains(&r.metric.as_str()) {
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

/// Takeover after a host is lost: another host retries its acquire until it holds the disk.
#[derive(Debug, Clone)]
pub struct Takeover {
    /// The lease timeout in force ("TTL 3 s", "io_timeout 1 s").
    pub timeout: String,
    /// How the host was lost.
    pub loss: String,
    /// From the loss to the other host's successful acquire.
    pub took: Samples,
    /// From the lost host's last successful renewal (as it recorded it) to the other host's
    /// successful acquire: the cluster's side of the wait. `None` where not known.
    pub since_renewal: Option<Samples>,
    /// From the loss until the lost host's guest was stopped; `Err` where nothing fences.
    pub fenced: Outcome<Samples>,
    /// Runs in which the guest was stopped before the other host held the disk.
    pub fenced_first: Option<usize>,
}

/// The cluster-wide rows of one system.
#[derive(Debug)]
pub struct ClusterResult {
    /// Column name.
    pub name: &'static str,
    /// Row 1: acquire + release, one client.
    pub single: Outcome<Samples>,
    /// Row 2: 16 owners on different disks.
    pub concurrent: Outcome<Concurrent>,
    /// Row 7: takeover with short timeouts.
    pub takeover_short: Outcome<Takeover>,
    /// Row 8: takeover with the default timeouts.
    pub takeover_default: Outcome<Takeover>,
}

impl ClusterResult {
    /// A system skipped entirely.
    pub fn skipped(name: &'static str, why: &str) -> Self {
        ClusterResult {
            name,
            single: Err(why.to_owned()),
            concurrent: Err(why.to_owned()),
            takeover_short: Err(why.to_owned()),
            takeover_default: Err(why.to_owned()),
        }
    }
}

fn takeover_rows(
    reasons: &mut Vec<String>,
    results: &[ClusterResult],
    workload: &'static str,
    get: impl Fn(&ClusterResult) -> &Outcome<Takeover> + Copy,
) -> Vec<Row> {
    let text = |t: String| Cell {
        value: None,
        text: t,
    };
    vec![
        row(reasons, results, workload, "lease timeout", get, |t| {
            text(t.timeout.clone())
        }),
        row(reasons, results, workload, "loss", get, |t| {
            text(t.loss.clone())
        }),
        row(
            reasons,
            results,
            workload,
            "loss → other host holds, p50",
            get,
            |t| time_cell(t.took.pct(50.0)),
        ),
        row(
            reasons,
            results,
            workload,
            "loss → other host holds, max",
            get,
            |t| time_cell(t.took.pct(100.0)),
        ),
        row(reasons, results, workload, "runs", get, |t| {
            text(t.took.len().to_string())
        }),
        row(
            reasons,
            results,
            workload,
            "last renewal sent → other host holds, p50",
            get,
            |t| match &t.since_renewal {
                Some(s) => time_cell(s.pct(50.0)),
                None => text("—".into()),
            },
        ),
        row(
            reasons,
            results,
            workload,
            "loss → lost host's guest stopped, p50",
            get,
            |t| match &t.fenced {
                Ok(s) => time_cell(s.pct(50.0)),
                Err(why) => text(why.clone()),
            },
        ),
        row(
            reasons,
            results,
            workload,
            "fenced before the other host held (must be all)",
            get,
            |t| match t.fenced_first {
                Some(n) => text(format!("{n}/{}", t.took.len())),
                None => text("—".into()),
            },
        ),
    ]
}

/// The cluster table: `results[0]` is vmlock with etcd; ratios are it ÷ each other column.
pub fn cluster_table(results: &[ClusterResult]) -> String {
    let mut reasons = Vec::new();
    let mut rows = latency_rows(&mut reasons, results, |r| &r.single, |r| &r.concurrent);
    rows.extend(takeover_rows(
        &mut reasons,
        results,
        "7. host lost → other host holds, short timeouts",
        |r| &r.takeover_short,
    ));
    rows.extend(takeover_rows(
        &mut reasons,
        results,
        "8. host lost → other host holds, default timeouts",
        |r| &r.takeover_default,
    ));
    let names: Vec<&str> = results.iter().map(|r| r.name).collect();
    render(&names, &mut rows, &reasons)
}
