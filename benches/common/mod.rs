//! What every benchmark measures and reports the same way: the machine it ran on, process CPU
//! time and machine-wide UDP errors from /proc, free loopback ports, and the commit measured.

#![allow(dead_code)] // each benchmark uses a different part of this module

/// CPU model, logical cores and memory of this machine.
pub struct MachineFacts {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
}

pub fn machine_facts() -> MachineFacts {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    MachineFacts {
        cpu_model,
        cores,
        memory_gib: (memory_kib as f64 / 1_048_576.0 * 10.0).round() / 10.0,
    }
}

/// The 1-, 5- and 15-minute load averages, as /proc/loadavg gives them (empty if unreadable).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A report's date (RFC 3339, ms) and the stamp of its file names
/// (`2026-11-21T13:26:29.924Z` → `2026-11-21T13-26-29Z`) for a run started at `started`.
pub fn report_time(started: std::time::SystemTime) -> (String, String) {
    let ms = started
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let date = mediamesh::clock::rfc3339_ms(ms);
    let stamp = format!("{}Z", date.chars().take(19).collect::<String>().replace(':', "-"));
    (date, stamp)
}

/// The parsed arguments, or their error on stderr and exit code 2.
pub fn args_or_exit<T>(parsed: Result<T, String>) -> T {
    parsed.unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2);
    })
}

/// A TCP port free on loopback now.
pub fn free_tcp_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// User + system CPU seconds used so far by process `pid` (0: this process); 0 when unreadable.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let path = if pid == 0 {
        "/proc/self/stat".to_string()
    } else {
        format!("/proc/{pid}/stat")
    };
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces; utime and
    // stime are the 12th and 13th after it.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 }
}

/// Machine-wide UDP error counters (/proc/net/snmp): receive-buffer overflows and send-buffer
/// failures.
pub fn udp_errors() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return (0, 0);
    };
    let find = |field: &str| {
        names
            .split_whitespace()
            .position(|n| n == field)
            .and_then(|i| values.split_whitespace().nth(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (find("RcvbufErrors"), find("SndbufErrors"))
}

/// The short commit of this checkout, with `-dirty` when tracked files under `paths` (the whole
/// tree when empty) have uncommitted changes; `uncommitted` outside git.
pub fn git_commit(paths: &[&str]) -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(["-C", env!("CARGO_MANIFEST_DIR")])
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(commit) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "uncommitted".into();
    };
    let mut status = vec!["status", "--porcelain", "--untracked-files=no", "--"];
    status.extend_from_slice(paths);
    if git(&status).is_some_and(|s| !s.is_empty()) {
        format!("{commit}-dirty")
    } else {
        commit
    }
}

/// Writes a benchmark's results as `<name>-<stamp>.{md,json}` and `<name>-latest.{md,json}` in
/// `dir` (created if missing); returns the path of the stamped Markdown file.
pub fn write_results(
    dir: &std::path::Path,
    name: &str,
    stamp: &str,
    md: &str,
    json: &serde_json::Value,
) -> std::io::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_string_pretty(json)?;
    for file in [format!("{name}-{stamp}"), format!("{name}-latest")] {
        std::fs::write(dir.join(format!("{file}.md")), md)?;
        std::fs::write(dir.join(format!("{file}.json")), &json)?;
    }
    Ok(dir.join(format!("{name}-{stamp}.md")))
}

/// Exits with status 2 and a hint when the release binary a benchmark runs is missing.
pub fn require_binary(binary: &std::path::Path) {
    if !binary.is_file() {
        eprintln!(
            "{} is missing: build it with `cargo build --release -p mediamesh`",
            binary.display()
        );
        std::process::exit(2);
    }
}
