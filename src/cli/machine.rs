//! Where the machine's CPU time went during a benchmark run (the first line of
//! `/proc/stat`): idle (a core with nothing to run: the processes wait on the network or on
//! each other), I/O wait (nothing to run while a task waits on the disk, an fdatasync), or
//! stolen (the hypervisor gave the core to another guest). On a shared machine these tell a
//! slow hour from a slower build. `bench/compare` includes this file by path, so the systems
//! compared side by side report the same figures.

use serde_json::{json, Value};

/// The machine's CPU time so far, in clock ticks.
#[derive(Clone, Copy, Default)]
pub struct MachineCpu {
    total: f64,
    idle: f64,
    iowait: f64,
    steal: f64,
}

/// Now (`None` without `/proc/stat`).
pub fn sample() -> Option<MachineCpu> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<f64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is inside user and nice).
    Some(MachineCpu {
        total: ticks.get(..8)?.iter().sum(),
        idle: ticks[3],
        iowait: ticks[4],
        steal: ticks[7],
    })
}

/// The percentages of the machine's CPU time between two samples that were idle, waiting on
/// I/O and stolen (`null` without both).
pub fn shares(before: Option<MachineCpu>, after: Option<MachineCpu>) -> Value {
    let (Some(b), Some(a)) = (before, after) else {
        return Value::Null;
    };
    let total = (a.total - b.total).max(1.0);
    // The kernel's I/O-wait count may go backwards (proc(5)): never a negative share.
    let share =
        |f: fn(&MachineCpu) -> f64| ((f(&a) - f(&b)).max(0.0) * 10_000.0 / total).round() / 100.0;
    json!({
        "idle": share(|c| c.idle),
        "iowait": share(|c| c.iowait),
        "steal": share(|c| c.steal),
    })
}
