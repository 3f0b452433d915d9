//! What every benchmark reports about the machine it ran on, read from /proc.

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
