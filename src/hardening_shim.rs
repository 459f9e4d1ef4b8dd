//! Temporary stand-in until the hardening module lands: applies nothing and says so.

use serde::Serialize;

#[derive(Debug, Clone, Copy)]
pub struct HardeningOptions {
    pub require_lock: bool,
    pub lock_all: bool,
    pub disable_core_dumps: bool,
}

#[derive(Debug, Clone)]
pub struct HardeningState;

#[derive(Debug)]
pub struct HardeningError(String);

impl std::fmt::Display for HardeningError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn apply(_o: HardeningOptions) -> Result<HardeningState, HardeningError> {
    Ok(HardeningState)
}

#[derive(Debug, Serialize)]
pub struct MemoryProtectionStatus {
    pub enabled: bool,
}

pub fn status(_s: &HardeningState) -> MemoryProtectionStatus {
    MemoryProtectionStatus { enabled: false }
}

#[derive(Debug, Serialize)]
pub struct SelfCheckReport {
    pub passed: bool,
}

pub fn self_check(_s: &HardeningState) -> SelfCheckReport {
    SelfCheckReport { passed: false }
}
