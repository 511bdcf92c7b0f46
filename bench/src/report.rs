//! The printed result: one markdown table of figures and their ratios to the raw limits, then
//! the CPU each process spent per message in each phase and its peak memory.

use std::time::Duration;

use crate::processes::{CpuUse, LOAD_GENERATOR, Processes};

/// The CPU columns the efficiency is computed from.
pub const END_TO_END: &str = "end-to-end";
pub const RAW_POST_FLOOR: &str = "raw POST floor";
pub const RAW_INGEST: &str = "raw ingest";
pub const RAW_BULK: &str = "raw bulk";

/// A timed phase: how many messages (or requests) in how long, and what each process spent.
pub struct Measured {
    pub count: u64,
    pub elapsed: Duration,
    pub cpu: CpuUse,
}

impl Measured {
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }

    /// How the report shows it: a row `label` with its rate in `unit`, and a CPU column `column`.
    pub fn figure(&self, label: String, unit: &'static str, column: &'static str) -> Figure<'_> {
        Figure {
            label,
            unit,
            column,
            measured: self,
        }
    }
}

/// A measured figure as the report shows it: a row (its label, and the unit of its rate) and a
/// column of the CPU table.
pub struct Figure<'a> {
    label: String,
    unit: &'static str,
    column: &'static str,
    measured: &'a Measured,
}

impl Figure<'_> {
    /// Its column of the CPU table.
    pub fn column(&self) -> &'static str {
        self.column
    }

    /// "1234 req/s".
    fn rate(&self) -> String {
        format!("{:.0} {}", self.measured.rate(), self.unit)
    }
}

struct CpuColumn {
    phase: String,
    count: u64,
    cpu: CpuUse,
}

#[derive(Default)]
pub struct Report {
    rows: Vec<[String; 3]>,
    cpu_columns: Vec<CpuColumn>,
    notes: Vec<String>,
    /// The goals the bench enforces, and whether this run reached each.
    goals: Vec<(String, bool)>,
}

impl Report {
    pub fn row(
        &mut self,
        measure: impl Into<String>,
        figure: impl Into<String>,
        ratio: impl Into<String>,
    ) {
        self.rows
            .push([measure.into(), figure.into(), ratio.into()]);
    }

    /// A column of the CPU table: the CPU of each process per message of `measured`.
    pub fn cpu(&mut self, phase: &str, measured: &Measured) {
        self.cpu_columns.push(CpuColumn {
            phase: phase.to_owned(),
            count: measured.count,
            cpu: measured.cpu.clone(),
        });
    }

    /// The row of `figure` with `ratio`, and its CPU column.
    pub fn figure(&mut self, figure: Figure<'_>, ratio: impl Into<String>) {
        let rate = figure.rate();
        self.row(figure.label, rate, ratio);
        self.cpu(figure.column, figure.measured);
    }

    /// A figure of the stack beside the raw limit it is read against (`raw_name` in the ratio):
    /// the raw limit's row, then the figure's; the figure's CPU column, then the raw limit's.
    pub fn against_raw(&mut self, figure: Figure<'_>, raw: Figure<'_>, raw_name: &str) {
        let ratio = ratio(figure.measured.rate(), raw.measured.rate(), raw_name);
        let raw_rate = raw.rate();
        self.row(raw.label, raw_rate, "1");
        self.figure(figure, ratio);
        self.cpu(raw.column, raw.measured);
    }

    /// Records an enforced goal (`BENCH_ENFORCE`) and how its row says whether it was reached.
    pub fn goal(&mut self, goal: impl Into<String>, reached: bool) -> &'static str {
        self.goals.push((goal.into(), reached));
        met(reached)
    }

    /// The enforced goals this run missed.
    pub fn missed_goals(&self) -> Vec<&str> {
        self.goals
            .iter()
            .filter(|(_, reached)| !reached)
            .map(|(goal, _)| goal.as_str())
            .collect()
    }

    /// The CPU every process but the load generator spent per message in the phase `column`
    /// (None when the phase did not run or a process could not be read).
    fn cpu_per_message(&self, column: &str, processes: &Processes) -> Option<Duration> {
        let phase = self
            .cpu_columns
            .iter()
            .find(|phase| phase.phase == column && phase.count > 0)?;
        let mut total = Duration::ZERO;
        for name in processes.names() {
            if name == LOAD_GENERATOR {
                continue;
            }
            total += processes.cpu_of(name, &phase.cpu)?;
        }
        Some(total / u32::try_from(phase.count).ok()?)
    }

    /// The row of the CPU efficiency: the end-to-end CPU per message of every process (the load
    /// generator's left out) against the sum of the floors of the three legs measured in the same
    /// run, each with the CPU of every process it used: the minimal POST server, the raw ingest
    /// consumer and the raw `_bulk` (goal: at most 1.25, printed, not enforced).
    pub fn cpu_efficiency(&mut self, processes: &Processes) {
        let legs = [RAW_POST_FLOOR, RAW_INGEST, RAW_BULK]
            .map(|column| self.cpu_per_message(column, processes));
        let (Some(end_to_end), [Some(post), Some(ingest), Some(bulk)]) =
            (self.cpu_per_message(END_TO_END, processes), legs)
        else {
            self.note("the CPU efficiency needs the end-to-end phase and the three raw legs");
            return;
        };
        let floors = post + ingest + bulk;
        let efficiency = end_to_end.as_secs_f64() / floors.as_secs_f64();
        let reached = met(efficiency <= 1.25);
        self.row(
            "CPU efficiency: CPU per message end to end, every process but the load generator, against the sum of the legs' floors (raw POST floor + raw ingest + raw bulk, each with every process it used)",
            format!(
                "{:.0} µs against {:.0} + {:.0} + {:.0} = {:.0} µs",
                end_to_end.as_secs_f64() * 1e6,
                post.as_secs_f64() * 1e6,
                ingest.as_secs_f64() * 1e6,
                bulk.as_secs_f64() * 1e6,
                floors.as_secs_f64() * 1e6,
            ),
            format!("{efficiency:.2}; goal ≤ 1.25: {reached}"),
        );
    }

    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        eprintln!("bench: {note}");
        self.notes.push(note);
    }

    pub fn print(&self, processes: &Processes) {
        println!();
        println!("| measure | figure | ratio to raw limit |");
        println!("| --- | --- | --- |");
        for [measure, figure, ratio] in &self.rows {
            println!("| {measure} | {figure} | {ratio} |");
        }
        println!();
        println!(
            "CPU µs per message of each phase (per request for reads, per operation for raw limits), \
             and peak RSS (VmHWM, since the process started):"
        );
        println!();
        let phases: Vec<&str> = self
            .cpu_columns
            .iter()
            .map(|column| column.phase.as_str())
            .collect();
        println!("| process | {} | peak RSS |", phases.join(" | "));
        println!("|{}", " --- |".repeat(phases.len() + 2));
        let peaks = processes.peak_rss_kib();
        for (row, (label, peak)) in processes.labels().into_iter().zip(peaks).enumerate() {
            let cells: Vec<String> = self
                .cpu_columns
                .iter()
                .map(|column| micros_per(column.cpu.per_process()[row], column.count))
                .collect();
            let peak = peak.map_or_else(
                || "n/a".to_owned(),
                |kib| format!("{:.1} MiB", kib as f64 / 1024.0),
            );
            println!("| {label} | {} | {peak} |", cells.join(" | "));
        }
        let missing = processes.missing();
        if !missing.is_empty() || !self.notes.is_empty() {
            println!();
        }
        for (name, reason) in missing {
            println!("- {name}: n/a, {reason}");
        }
        for note in &self.notes {
            println!("- {note}");
        }
        if !self.goals.is_empty() {
            let missed = self.missed_goals();
            println!();
            println!(
                "Enforced goals: {} of {} met{}",
                self.goals.len() - missed.len(),
                self.goals.len(),
                if missed.is_empty() { "." } else { "; missed:" }
            );
            for goal in missed {
                println!("- {goal}");
            }
        }
    }
}

fn micros_per(cpu: Option<Duration>, count: u64) -> String {
    let Some(cpu) = cpu.filter(|_| count > 0) else {
        return "n/a".to_owned();
    };
    let micros = cpu.as_secs_f64() * 1_000_000.0 / count as f64;
    if micros >= 100.0 {
        format!("{micros:.0}")
    } else {
        format!("{micros:.1}")
    }
}

/// "0.85 of raw ingest".
pub fn ratio(rate: f64, raw_rate: f64, raw_name: &str) -> String {
    format!("{:.2} of {raw_name}", rate / raw_rate)
}

/// How a goal's row says whether the run reached it.
pub fn met(reached: bool) -> &'static str {
    if reached { "met" } else { "**not met**" }
}
