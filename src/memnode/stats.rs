//! Process memory figures from `/proc` (Linux), for heartbeats and the bench harness.

/// Resident set size of this process in KiB, from `/proc/self/status`.
pub fn process_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Resident KiB of the largest mapping in `/proc/<pid>/smaps` (the region) and the
/// process total, so callers can compute the memory used beyond the region.
pub fn region_rss_kib(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0u64;
    let mut largest = (0u64, 0u64); // (size, rss)
    let mut cur_size = 0u64;
    for line in s.lines() {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("Size:") => cur_size = it.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            Some("Rss:") => {
                let rss: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                total += rss;
                if cur_size > largest.0 {
                    largest = (cur_size, rss);
                }
            }
            _ => {}
        }
    }
    Some((largest.1, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_figures() {
        let rss = process_rss_kib().unwrap();
        assert!(rss > 0);
        let (region, total) = region_rss_kib(std::process::id()).unwrap();
        assert!(total >= region);
    }
}
