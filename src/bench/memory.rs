//! Resident memory of a local process beyond its largest mapping (the memory node's
//! region), from `/proc/<pid>/status` and `/proc/<pid>/smaps`.

use super::error::BenchError;
use std::path::PathBuf;

/// A memory node's resident memory, split into its region and everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeMemory {
    /// Total resident set (`VmRSS`), KiB.
    pub rss_kib: u64,
    /// Resident part of the largest mapping (the region), KiB.
    pub region_rss_kib: u64,
    /// Size of the largest mapping, KiB.
    pub region_size_kib: u64,
}

impl NodeMemory {
    /// Resident memory outside the region, KiB.
    pub fn beyond_region_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.region_rss_kib)
    }
}

/// Measures process `pid` on this host.
pub fn measure(pid: u32) -> Result<NodeMemory, BenchError> {
    let read = |name: &str| {
        let path = PathBuf::from(format!("/proc/{pid}/{name}"));
        std::fs::read_to_string(&path).map_err(|e| {
            BenchError::NodeMemory(format!(
                "cannot read {}: {e}; the memory node must run on this host (Linux) and be alive",
                path.display()
            ))
        })
    };
    let status = read("status")?;
    let smaps = read("smaps")?;
    let rss_kib = parse_vm_rss(&status)
        .ok_or_else(|| BenchError::NodeMemory(format!("/proc/{pid}/status has no VmRSS line")))?;
    let (region_size_kib, region_rss_kib) = largest_mapping(&smaps).ok_or_else(|| {
        BenchError::NodeMemory(format!(
            "/proc/{pid}/smaps lists no mapping with Size and Rss"
        ))
    })?;
    Ok(NodeMemory {
        rss_kib,
        region_rss_kib,
        region_size_kib,
    })
}

/// The `VmRSS` value of a `/proc/<pid>/status` text, KiB.
pub(crate) fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(parse_kib)
}

/// `(size_kib, rss_kib)` of the largest mapping (by `Size`) in a `/proc/<pid>/smaps` text.
pub(crate) fn largest_mapping(smaps: &str) -> Option<(u64, u64)> {
    let mut best: Option<(u64, u64)> = None;
    let mut current: (Option<u64>, Option<u64>) = (None, None);
    let mut flush = |cur: &mut (Option<u64>, Option<u64>)| {
        if let (Some(size), Some(rss)) = *cur {
            if best.map_or(true, |(s, _)| size > s) {
                best = Some((size, rss));
            }
        }
        *cur = (None, None);
    };
    for line in smaps.lines() {
        if is_mapping_header(line) {
            flush(&mut current);
        } else if let Some(v) = line.strip_prefix("Size:") {
            current.0 = parse_kib(v);
        } else if let Some(v) = line.strip_prefix("Rss:") {
            current.1 = parse_kib(v);
        }
    }
    flush(&mut current);
    best
}

/// Header lines look like `7f12a000-7f12b000 rw-s 00000000 00:05 1234  /memfd:region`.
fn is_mapping_header(line: &str) -> bool {
    line.split_whitespace().next().is_some_and(|range| {
        range
            .split_once('-')
            .is_some_and(|(a, b)| is_hex(a) && is_hex(b))
    })
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// `"   1234 kB"` → 1234.
fn parse_kib(v: &str) -> Option<u64> {
    let mut parts = v.split_whitespace();
    let n = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(n),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tfarpool\nVmPeak:\t  300000 kB\nVmRSS:\t  150000 kB\nThreads:\t5\n";

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 42   /usr/bin/farpool
Size:               1024 kB
Rss:                 800 kB
Pss:                 800 kB
7f0000000000-7f0010000000 rw-s 00000000 00:01 7    /memfd:farpool-region (deleted)
Size:             262144 kB
KernelPageSize:        4 kB
Rss:              131072 kB
7fff00000000-7fff00021000 rw-p 00000000 00:00 0    [stack]
Size:                132 kB
Rss:                  16 kB
VmFlags: rd wr mr mw me gd ac
";

    #[test]
    fn reads_vm_rss() {
        assert_eq!(parse_vm_rss(STATUS), Some(150_000));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        assert_eq!(parse_vm_rss("VmRSS: lots\n"), None);
    }

    #[test]
    fn finds_the_largest_mapping() {
        assert_eq!(largest_mapping(SMAPS), Some((262_144, 131_072)));
        assert_eq!(largest_mapping(""), None);
        let m = NodeMemory {
            rss_kib: 150_000,
            region_rss_kib: 131_072,
            region_size_kib: 262_144,
        };
        assert_eq!(m.beyond_region_kib(), 18_928);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn measures_this_process() {
        let m = measure(std::process::id()).unwrap();
        assert!(m.rss_kib > 0);
        assert!(m.region_size_kib > 0);
    }
}
