//! `mediamesh-sim`: runs seeds of the deterministic cluster simulation.
//!
//! ```text
//! cargo run -p mediamesh-sim -- --seeds 1000            # seeds 0..1000, a line per failing seed
//! cargo run -p mediamesh-sim -- --seed 42               # replay one seed, print its trace hash
//! cargo run -p mediamesh-sim -- --seed 42 --trace       # ... and every trace line (stderr)
//! cargo run -p mediamesh-sim -- --seeds 100 --fault skip-epoch-check
//! cargo run -p mediamesh-sim -- --seeds 100 --fault ack-before-commit
//! ```
//!
//! Exit code 1 when any seed broke an invariant, 2 on bad arguments.

use std::panic::AssertUnwindSafe;
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::{Parser, ValueEnum};
use mediamesh_sim::config::{DEFAULT_NODES, DEFAULT_STEPS};
use mediamesh_sim::{Faults, RunReport, SimConfig};

/// A fault in the real code the checkers must catch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FaultName {
    /// Migrations flip the directory without the epoch compare.
    SkipEpochCheck,
    /// The store's replica core acknowledges viewer upserts before they commit.
    AckBeforeCommit,
}

#[derive(Parser, Debug)]
#[command(
    name = "mediamesh-sim",
    about = "Deterministic simulation of mediamesh's control plane"
)]
struct Args {
    /// Run seeds 0..N.
    #[arg(long, conflicts_with = "seed")]
    seeds: Option<u64>,
    /// Replay one seed and print its trace hash.
    #[arg(long)]
    seed: Option<u64>,
    /// Steps of 10 ms virtual time per seed.
    #[arg(long, default_value_t = DEFAULT_STEPS)]
    steps: u64,
    /// Nodes (3..=9; the first 3/5 in Seoul, the rest in Busan).
    #[arg(long, default_value_t = DEFAULT_NODES)]
    nodes: usize,
    /// Switch on a test-only fault in the real code.
    #[arg(long, value_enum)]
    fault: Vec<FaultName>,
    /// With --seed: print every trace line to stderr.
    #[arg(long)]
    trace: bool,
    /// Worker threads for --seeds (default: the machine's parallelism).
    #[arg(long)]
    threads: Option<usize>,
}

fn config(args: &Args, seed: u64) -> SimConfig {
    SimConfig {
        seed,
        steps: args.steps,
        nodes: args.nodes,
        faults: Faults {
            skip_epoch_check: args.fault.contains(&FaultName::SkipEpochCheck),
            ack_before_commit: args.fault.contains(&FaultName::AckBeforeCommit),
        },
        print_trace: args.trace && args.seed.is_some(),
    }
}

fn print_failure(report: &RunReport, tail: bool) {
    for v in &report.violations {
        println!("seed {}: {} {}", report.seed, v.checker(), v);
    }
    if tail {
        println!(
            "--- last {} trace lines of seed {} ---",
            report.trace_tail.len(),
            report.seed
        );
        for line in &report.trace_tail {
            println!("{line}");
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = config(&args, 0).validate() {
        eprintln!("mediamesh-sim: {e}");
        return ExitCode::from(2);
    }
    if let Some(seed) = args.seed {
        let started = Instant::now();
        let report = match mediamesh_sim::run(config(&args, seed)) {
            Ok(report) => report,
            Err(e) => {
                eprintln!("mediamesh-sim: {e}");
                return ExitCode::from(2);
            }
        };
        println!(
            "seed {seed}: steps {} events {} faults {} migrations {} crashes {} entries {} violations {} ({:.1} s)",
            report.stats.steps,
            report.stats.events,
            report.stats.faults,
            report.stats.migrations,
            report.stats.crashes,
            report.checks.entries,
            report.violations.len(),
            started.elapsed().as_secs_f64()
        );
        println!("checks: {:?}", report.checks);
        println!("network: {:?}", report.net);
        println!("trace hash {}", report.trace_hash);
        if report.violations.is_empty() {
            return ExitCode::SUCCESS;
        }
        print_failure(&report, true);
        return ExitCode::from(1);
    }
    let seeds = args.seeds.unwrap_or(1);
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let panicked = Mutex::new(Vec::new());
    let mut reports: Vec<RunReport> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let seed = next.fetch_add(1, Ordering::Relaxed);
                        if seed >= seeds {
                            return done;
                        }
                        // A panic is a bug (in the real code's assertions or the simulator):
                        // report the seed instead of losing it.
                        let run =
                            std::panic::catch_unwind(AssertUnwindSafe(|| mediamesh_sim::run(config(&args, seed))));
                        match run {
                            Ok(Ok(report)) => {
                                if !report.violations.is_empty() {
                                    print_failure(&report, false);
                                }
                                done.push(report);
                            }
                            // The arguments were validated above.
                            Ok(Err(e)) => eprintln!("seed {seed}: {e}"),
                            Err(panic) => {
                                let message = panic
                                    .downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                                    .unwrap_or_default();
                                println!("seed {seed}: panicked: {message}");
                                panicked.lock().unwrap_or_else(|e| e.into_inner()).push(seed);
                            }
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
    });
    let panicked = panicked.into_inner().unwrap_or_else(|e| e.into_inner());
    reports.sort_by_key(|r| r.seed);
    let failing: Vec<&RunReport> = reports.iter().filter(|r| !r.violations.is_empty()).collect();
    let total = |f: fn(&RunReport) -> u64| reports.iter().map(f).sum::<u64>();
    let mut by_checker = std::collections::BTreeMap::new();
    for r in &failing {
        for v in &r.violations {
            *by_checker.entry(v.checker()).or_insert(0u64) += 1;
        }
    }
    let host_gap_max_ms = reports.iter().map(|r| r.checks.host_gap_max_ms).max().unwrap_or(0);
    println!(
        "{} seeds in {:.1} s: steps {} events {} faults {} migrations {} violations {} (failing seeds {}) {:?}; longest host gap after the heal {} ms",
        reports.len(),
        started.elapsed().as_secs_f64(),
        total(|r| r.stats.steps),
        total(|r| r.stats.events),
        total(|r| r.stats.faults),
        total(|r| r.stats.migrations),
        total(|r| r.violations.len() as u64),
        failing.len(),
        by_checker,
        host_gap_max_ms
    );
    if !panicked.is_empty() {
        println!(
            "panicked seeds: {}",
            panicked.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
        );
    }
    if failing.is_empty() && panicked.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!(
            "failing seeds: {}",
            failing.iter().map(|r| r.seed.to_string()).collect::<Vec<_>>().join(" ")
        );
        ExitCode::from(1)
    }
}
