//! The run's trace: every event, as one text line, folded into a running SHA-256. The same seed
//! gives the same lines in the same order, hence the same hash; a different hash for the same
//! seed means something read a clock, a thread RNG or a hash map's order.
//!
//! The last [`TRACE_TAIL_MAX`] lines are kept for violation reports; `--trace` prints them all.

use std::collections::VecDeque;
use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::config::TRACE_TAIL_MAX;

/// The running trace of one run.
pub struct Trace {
    hasher: Sha256,
    tail: VecDeque<String>,
    line: String,
    print: bool,
}

impl Trace {
    /// An empty trace; `print` echoes every line to stderr.
    pub fn new(print: bool) -> Self {
        Trace {
            hasher: Sha256::new(),
            tail: VecDeque::with_capacity(TRACE_TAIL_MAX),
            line: String::with_capacity(256),
            print,
        }
    }

    /// Records one line at virtual time `now_ms`.
    pub fn record(&mut self, now_ms: u64, what: std::fmt::Arguments<'_>) {
        self.line.clear();
        // Writing into a String cannot fail.
        let _ = write!(self.line, "{now_ms:>8} {what}");
        self.hasher.update(self.line.as_bytes());
        self.hasher.update(b"\n");
        if self.print {
            eprintln!("{}", self.line);
        }
        // The line leaving the tail lends its buffer to the new one.
        let mut kept = if self.tail.len() == TRACE_TAIL_MAX {
            self.tail.pop_front().unwrap_or_default()
        } else {
            String::new()
        };
        kept.clear();
        kept.push_str(&self.line);
        self.tail.push_back(kept);
    }

    /// The last lines, oldest first.
    pub fn tail(&self) -> impl Iterator<Item = &str> {
        self.tail.iter().map(String::as_str)
    }

    /// Hex SHA-256 of every line so far.
    pub fn hash(&self) -> String {
        self.hasher
            .clone()
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_lines_same_hash_and_the_tail_is_bounded() {
        let mut a = Trace::new(false);
        let mut b = Trace::new(false);
        for i in 0..(TRACE_TAIL_MAX as u64 + 10) {
            a.record(i, format_args!("event {i}"));
            b.record(i, format_args!("event {i}"));
        }
        assert_eq!(a.hash(), b.hash());
        assert_eq!(a.tail().count(), TRACE_TAIL_MAX);
        b.record(0, format_args!("one more"));
        assert_ne!(a.hash(), b.hash());
    }
}
