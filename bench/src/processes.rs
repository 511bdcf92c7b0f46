//! What each process of the stack costs: CPU time (utime + stime of `/proc/<pid>/stat`) sampled
//! around every phase, and the peak resident memory (`VmHWM` of `/proc/<pid>/status`) at the end.
//! `scripts/bench` finds the pids and passes them as `BENCH_PROCESSES=api=PID,indexer=PID,...`
//! with `BENCH_CLK_TCK` (`getconf CLK_TCK`); the load generator reads its own `/proc/self`.
//!
//! Also holds the workers still ([`PausedWorkers`]) while the api accepts a backlog.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, ensure};

/// The processes of the table, in its order (the load generator is added last).
const STACK_PROCESSES: [&str; 9] = [
    "api",
    "ingest-worker",
    "indexer",
    "webhook-dispatcher",
    "rabbitmq",
    "mariadb",
    "elasticsearch",
    "redis",
    // The bench's own minimal POST server (raw::post_floor), a process of its own.
    "post-floor",
];
pub const LOAD_GENERATOR: &str = "load generator";

/// Where the figures of one process come from.
enum Source {
    Pid(u32),
    /// The bench itself.
    OwnProcess,
    /// Why there are no figures.
    Missing(String),
}

impl Source {
    fn proc_path(&self, file: &str) -> Option<String> {
        match self {
            Self::Pid(pid) => Some(format!("/proc/{pid}/{file}")),
            Self::OwnProcess => Some(format!("/proc/self/{file}")),
            Self::Missing(_) => None,
        }
    }
}

struct Tracked {
    name: &'static str,
    source: Source,
}

pub struct Processes {
    tracked: Vec<Tracked>,
    ticks_per_second: u64,
}

/// CPU ticks of every tracked process at one moment (None: unreadable).
pub struct CpuSample(Vec<Option<u64>>);

/// CPU time of every tracked process between two samples (None: not measured).
#[derive(Clone)]
pub struct CpuUse(Vec<Option<Duration>>);

impl CpuUse {
    pub fn per_process(&self) -> &[Option<Duration>] {
        &self.0
    }
}

impl Processes {
    /// `listed`: `name=pid,...` (`BENCH_PROCESSES`); a name without a running pid gets no figures.
    /// `embedded`: the stack is one process; `ticks_per_second`: `BENCH_CLK_TCK`.
    pub fn new(listed: &str, embedded: bool, ticks_per_second: u64) -> Self {
        let pids: Vec<(&str, &str)> = listed
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(name, pid)| (name.trim(), pid.trim()))
            .collect();
        let mut tracked: Vec<Tracked> = STACK_PROCESSES
            .iter()
            .map(|&name| {
                let listed_pid = pids
                    .iter()
                    .find(|(listed_name, _)| *listed_name == name)
                    .map(|(_, pid)| *pid);
                Tracked {
                    name,
                    source: source_of(listed_pid, embedded),
                }
            })
            .collect();
        tracked.push(Tracked {
            name: LOAD_GENERATOR,
            source: Source::OwnProcess,
        });
        Self {
            tracked,
            ticks_per_second: ticks_per_second.max(1),
        }
    }

    pub fn pid(&self, name: &str) -> Option<u32> {
        self.tracked
            .iter()
            .find(|tracked| tracked.name == name)
            .and_then(|tracked| match tracked.source {
                Source::Pid(pid) => Some(pid),
                Source::OwnProcess | Source::Missing(_) => None,
            })
    }

    /// The CPU the process `name` spent in `used` (None: not measured).
    pub fn cpu_of(&self, name: &str, used: &CpuUse) -> Option<Duration> {
        let row = self
            .tracked
            .iter()
            .position(|tracked| tracked.name == name)?;
        used.0.get(row).copied().flatten()
    }

    /// The names of the tracked processes, in the order of the rows.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.tracked.iter().map(|tracked| tracked.name)
    }

    /// Row labels: the name, with the pid when there is one.
    pub fn labels(&self) -> Vec<String> {
        self.tracked
            .iter()
            .map(|tracked| match tracked.source {
                Source::Pid(pid) => format!("{} ({pid})", tracked.name),
                Source::OwnProcess => format!("{} ({})", tracked.name, std::process::id()),
                Source::Missing(_) => tracked.name.to_owned(),
            })
            .collect()
    }

    /// Why a process has no figures, by name.
    pub fn missing(&self) -> Vec<(&'static str, &str)> {
        self.tracked
            .iter()
            .filter_map(|tracked| match &tracked.source {
                Source::Missing(reason) => Some((tracked.name, reason.as_str())),
                Source::Pid(_) | Source::OwnProcess => None,
            })
            .collect()
    }

    pub fn sample(&self) -> CpuSample {
        CpuSample(
            self.tracked
                .iter()
                .map(|tracked| cpu_ticks(&tracked.source))
                .collect(),
        )
    }

    /// CPU time of every process from `earlier` until now.
    pub fn cpu_since(&self, earlier: &CpuSample) -> CpuUse {
        self.cpu_between(earlier, &self.sample())
    }

    pub fn cpu_between(&self, earlier: &CpuSample, later: &CpuSample) -> CpuUse {
        CpuUse(
            earlier
                .0
                .iter()
                .zip(&later.0)
                .map(|(before, after)| {
                    // A pid reused by another process would count backwards.
                    let ticks = after.zip(*before)?;
                    let ticks = ticks.0.checked_sub(ticks.1)?;
                    Some(Duration::from_micros(
                        ticks * 1_000_000 / self.ticks_per_second,
                    ))
                })
                .collect(),
        )
    }

    /// Peak resident memory of every process since it started, in KiB.
    pub fn peak_rss_kib(&self) -> Vec<Option<u64>> {
        self.tracked
            .iter()
            .map(|tracked| {
                let status = std::fs::read_to_string(tracked.source.proc_path("status")?).ok()?;
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("VmHWM:"))
                    .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .collect()
    }
}

fn source_of(listed_pid: Option<&str>, embedded: bool) -> Source {
    let Some(listed_pid) = listed_pid.filter(|pid| !pid.is_empty()) else {
        let reason = if embedded {
            "embedded stack: runs inside the api process, or not at all"
        } else {
            "no pid in BENCH_PROCESSES"
        };
        return Source::Missing(reason.to_owned());
    };
    let Ok(pid) = listed_pid.parse::<u32>() else {
        return Source::Missing(format!("BENCH_PROCESSES names pid {listed_pid:?}"));
    };
    if cpu_ticks(&Source::Pid(pid)).is_none() {
        return Source::Missing(format!("pid {pid} is not running"));
    }
    Source::Pid(pid)
}

/// utime + stime of `/proc/<pid>/stat`, in clock ticks.
fn cpu_ticks(source: &Source) -> Option<u64> {
    let stat = std::fs::read_to_string(source.proc_path("stat")?).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count fields after its end.
    let (_, after_name) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); the slice starts at field 3.
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some(user + system)
}

/// Workers held with SIGSTOP. Dropping it sends SIGCONT, so they run again whatever happens in
/// between (`scripts/bench` also sends SIGCONT when the bench exits, should it be killed).
pub struct PausedWorkers {
    pids: Vec<u32>,
}

impl PausedWorkers {
    pub fn stop(pids: &[u32]) -> anyhow::Result<Self> {
        let mut paused = Self { pids: Vec::new() };
        for &pid in pids {
            paused.pids.push(pid);
            signal(pid, "STOP")?;
        }
        Ok(paused)
    }

    /// Resumes one of the stopped processes (the others stay stopped until resumed or dropped).
    pub fn resume(&mut self, pid: u32) -> anyhow::Result<()> {
        self.pids.retain(|&stopped| stopped != pid);
        signal(pid, "CONT")
    }
}

impl Drop for PausedWorkers {
    fn drop(&mut self) {
        for pid in self.pids.drain(..) {
            if let Err(error) = signal(pid, "CONT") {
                eprintln!("bench: could not resume pid {pid}: {error:#}");
            }
        }
    }
}

fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    ensure!(status.success(), "kill -{name} {pid} failed ({status})");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_pids_are_tracked_and_the_others_are_missing_with_a_reason() {
        let own = std::process::id();
        let processes = Processes::new(&format!("api={own}, indexer=abc,redis="), false, 100);
        assert_eq!(processes.pid("api"), Some(own));
        assert_eq!(processes.pid("indexer"), None);
        let missing = processes.missing();
        assert!(missing.contains(&("indexer", "BENCH_PROCESSES names pid \"abc\"")));
        assert!(missing.contains(&("redis", "no pid in BENCH_PROCESSES")));
        assert!(missing.contains(&("mariadb", "no pid in BENCH_PROCESSES")));
        assert_eq!(processes.labels().len(), STACK_PROCESSES.len() + 1);
    }

    #[test]
    fn cpu_and_peak_memory_are_read_for_running_processes() {
        let processes = Processes::new(&format!("api={}", std::process::id()), false, 100);
        let before = processes.sample();
        // Spins until the reading shows 20 ms of this process' CPU (ticks of 10 ms): a bound on
        // wall time alone got no tick at all on a loaded machine.
        let spin = std::time::Instant::now();
        let used = loop {
            std::hint::black_box(spin.elapsed());
            let used = processes.cpu_since(&before);
            let api = used.per_process()[0].expect("the api row is this process");
            if api >= Duration::from_millis(20) || spin.elapsed() > Duration::from_secs(30) {
                break used;
            }
        };
        let api = used.per_process()[0].expect("the api row is this process");
        assert!(
            api >= Duration::from_millis(20),
            "{api:?} after {:?}",
            spin.elapsed()
        );
        assert!(
            used.per_process()[1].is_none(),
            "ingest-worker is not listed"
        );
        let peaks = processes.peak_rss_kib();
        assert!(peaks[0].is_some_and(|kib| kib > 0));
        assert!(
            peaks.last().copied().flatten().is_some(),
            "the load generator"
        );
    }
}
