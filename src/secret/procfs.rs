//! What the kernel says about this process's memory: `/proc/self/smaps` (per-mapping
//! permissions, `Locked:` and `VmFlags` such as `lo` locked and `dd` excluded from dumps) and
//! `/proc/self/status` (`VmLck`, `VmRSS`, `CapEff`). The self-check trusts only these.

use std::io;
use std::ops::Range;

/// Bit of `CAP_IPC_LOCK` in the capability sets (linux/capability.h).
pub const CAP_IPC_LOCK: u32 = 14;

/// One mapping (VMA) of `/proc/self/smaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: usize,
    pub end: usize,
    /// `rwxp`-style permissions, e.g. `---p` for no access.
    pub perms: String,
    /// Path or pseudo-name (`[heap]`, `[vdso]`); empty for anonymous mappings.
    pub name: String,
    pub rss_kb: u64,
    pub locked_kb: u64,
    /// Two-letter `VmFlags` mnemonics (`lo` locked, `dd` do not dump, `io`, `pf`, …).
    pub flags: Vec<String>,
}

impl Mapping {
    /// Whether `VmFlags` lists `flag`.
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// No read, write or execute permission (`---p`): any access faults.
    pub fn is_no_access(&self) -> bool {
        self.perms.starts_with("---")
    }

    /// Mappings `mlockall` cannot lock (device/PFN maps, vDSO, vsyscall); the kernel skips them.
    pub fn is_special(&self) -> bool {
        ["io", "pf", "de", "mm"].iter().any(|f| self.has_flag(f))
            || matches!(
                self.name.as_str(),
                "[vsyscall]" | "[vdso]" | "[vvar]" | "[vvar_vclock]"
            )
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Reads and parses `/proc/self/smaps` now.
pub fn smaps() -> io::Result<Vec<Mapping>> {
    Ok(parse_smaps(&std::fs::read_to_string("/proc/self/smaps")?))
}

/// The mappings that overlap `range`, in address order.
pub fn overlapping<'a>(maps: &'a [Mapping], range: &Range<usize>) -> Vec<&'a Mapping> {
    maps.iter()
        .filter(|m| m.start < range.end && range.start < m.end)
        .collect()
}

/// Whether the mappings in `found` cover `range` without a gap.
pub fn covers(found: &[&Mapping], range: &Range<usize>) -> bool {
    let mut next = range.start;
    for mapping in found {
        if mapping.start > next {
            return false;
        }
        next = next.max(mapping.end);
    }
    next >= range.end
}

/// Parses the text of an smaps file (header line per mapping, then `Key: value` lines).
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some(mapping) = parse_header(line) {
            maps.push(mapping);
            continue;
        }
        let Some(current) = maps.last_mut() else {
            continue;
        };
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            current.flags = flags.split_whitespace().map(str::to_owned).collect();
        } else if let Some(value) = line.strip_prefix("Rss:") {
            current.rss_kb = parse_kb(value);
        } else if let Some(value) = line.strip_prefix("Locked:") {
            current.locked_kb = parse_kb(value);
        }
    }
    maps
}

fn parse_header(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    if perms.len() != 4 {
        return None;
    }
    let _offset = fields.next()?;
    let _device = fields.next()?;
    let _inode = fields.next()?;
    let name = fields.next().unwrap_or("").trim().to_owned();
    Some(Mapping {
        start,
        end,
        perms: perms.to_owned(),
        name,
        rss_kb: 0,
        locked_kb: 0,
        flags: Vec::new(),
    })
}

fn parse_kb(value: &str) -> u64 {
    value
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The memory and capability lines of `/proc/self/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessStatus {
    /// `VmLck`: locked memory, kB.
    pub vm_locked_kb: u64,
    /// `VmRSS`: resident memory, kB.
    pub vm_rss_kb: u64,
    /// `VmSize`: mapped (virtual) memory, kB.
    pub vm_size_kb: u64,
    /// `CapEff`: effective capability set, one bit per capability.
    pub effective_capabilities: u64,
}

impl ProcessStatus {
    /// Whether `CAP_IPC_LOCK` (lock memory beyond RLIMIT_MEMLOCK) is effective.
    pub fn has_ipc_lock(&self) -> bool {
        self.effective_capabilities & (1 << CAP_IPC_LOCK) != 0
    }
}

/// Reads and parses `/proc/self/status` now.
pub fn status() -> io::Result<ProcessStatus> {
    Ok(parse_status(&std::fs::read_to_string("/proc/self/status")?))
}

/// Parses the text of a status file.
pub fn parse_status(text: &str) -> ProcessStatus {
    let mut status = ProcessStatus::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key {
            "VmLck" => status.vm_locked_kb = parse_kb(value),
            "VmRSS" => status.vm_rss_kb = parse_kb(value),
            "VmSize" => status.vm_size_kb = parse_kb(value),
            "CapEff" => {
                status.effective_capabilities = u64::from_str_radix(value.trim(), 16).unwrap_or(0);
            }
            _ => {}
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 00:00 0 
Size:                  4 kB
Rss:                   4 kB
Locked:                0 kB
VmFlags: rd mr mw me ac 
55d0c0a01000-55d0c0a02000 ---p 00000000 00:00 0 
Rss:                   0 kB
Locked:                0 kB
VmFlags: mr mw me ac 
55d0c0a02000-55d0c0a04000 ---p 00000000 00:00 0 
Rss:                   8 kB
Locked:                8 kB
VmFlags: mr mw me lo ac dd 
7ffd1a7e3000-7ffd1a7e5000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   4 kB
Locked:                0 kB
VmFlags: rd ex mr mw me de sd 
7f00aa000000-7f00aa001000 r--p 00000000 08:01 1234                       /usr/lib/my lib.so
Rss:                   4 kB
VmFlags: rd mr mw me 
";

    #[test]
    fn parses_headers_locked_and_flags() {
        let maps = parse_smaps(SMAPS);
        assert_eq!(maps.len(), 5);
        let data = &maps[2];
        assert_eq!((data.start, data.end), (0x55d0c0a02000, 0x55d0c0a04000));
        assert!(data.is_no_access());
        assert!(data.has_flag("lo") && data.has_flag("dd"));
        assert_eq!(data.locked_kb, 8);
        assert!(!maps[1].has_flag("lo"));
        assert!(maps[3].is_special());
        assert_eq!(maps[4].name, "/usr/lib/my lib.so");
    }

    #[test]
    fn finds_overlapping_mappings_and_coverage() {
        let maps = parse_smaps(SMAPS);
        let range = 0x55d0c0a01000..0x55d0c0a03000;
        let found = overlapping(&maps, &range);
        assert_eq!(found.len(), 2);
        assert!(covers(&found, &range));
        let gap = 0x55d0c0a03000..0x55d0c0a05000;
        assert!(!covers(&overlapping(&maps, &gap), &gap));
    }

    #[test]
    fn parses_status_lines() {
        let status = parse_status(
            "Name:\tsidecar\nVmSize:\t  10240 kB\nVmLck:\t      16 kB\nVmRSS:\t    5120 kB\nCapEff:\t0000000000004000\n",
        );
        assert_eq!(status.vm_locked_kb, 16);
        assert_eq!(status.vm_rss_kb, 5120);
        assert_eq!(status.vm_size_kb, 10240);
        assert!(status.has_ipc_lock());
        assert!(!parse_status("CapEff:\t0000000000000000\n").has_ipc_lock());
    }

    #[test]
    fn reads_this_process() {
        let maps = smaps().unwrap();
        assert!(maps.iter().any(|m| m.name == "[stack]"));
        assert!(status().unwrap().vm_rss_kb > 0);
    }
}
