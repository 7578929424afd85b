//! Memory and CPU of instances without a cgroup, from /proc (one scan per tick for all of them).

use std::collections::HashMap;

/// Memory and CPU of process sessions from /proc, for instances without a cgroup.
pub(super) struct ProcStats {
    /// session id → (rss bytes, cpu seconds)
    sessions: HashMap<u32, (u64, f64)>,
}

impl ProcStats {
    pub(super) fn read_if_needed(needed: bool) -> Option<ProcStats> {
        if !needed {
            return None;
        }
        let page = 4096u64;
        let ticks = 100.0f64;
        let mut sessions: HashMap<u32, (u64, f64)> = HashMap::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return None;
        };
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the command name (which may contain spaces) start after ") ".
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            // rest[0] = state (field 3); session = field 6; utime = 14; stime = 15; rss = 24
            let (Some(sid), Some(ut), Some(stt), Some(rss)) = (
                f.get(3).and_then(|s| s.parse::<u32>().ok()),
                f.get(11).and_then(|s| s.parse::<u64>().ok()),
                f.get(12).and_then(|s| s.parse::<u64>().ok()),
                f.get(21).and_then(|s| s.parse::<u64>().ok()),
            ) else {
                continue;
            };
            let entry = sessions.entry(sid).or_default();
            entry.0 += rss * page;
            entry.1 += (ut + stt) as f64 / ticks;
        }
        Some(ProcStats { sessions })
    }

    pub(super) fn session(&self, pid: u32) -> (Option<u64>, Option<f64>) {
        match self.sessions.get(&pid) {
            Some((m, c)) => (Some(*m), Some(*c)),
            None => (None, None),
        }
    }
}
