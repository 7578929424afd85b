//! TEMPORARY stub, replaced by the real cgroup layer.
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::SandboxError;

#[derive(Debug, Clone)]
pub enum Hierarchy {
    V1 { root: PathBuf },
    V2 { root: PathBuf },
}

pub fn detect(_root: &Path) -> Option<Hierarchy> {
    None
}

#[derive(Debug, Clone, Default)]
pub struct CgroupLimits {
    pub memory_max: Option<u64>,
    pub memory_high: Option<u64>,
    pub cpu_cores: Option<f64>,
    pub cpu_weight: Option<u64>,
    pub pids_max: Option<u64>,
    pub io: Vec<IoLimit>,
}

#[derive(Debug, Clone)]
pub struct IoLimit {
    pub device: (u32, u32),
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
}

pub struct CgroupDriver;

impl CgroupDriver {
    pub fn new(_h: Hierarchy, _base: &str, _run_id: &str) -> Result<Self, SandboxError> {
        Err(SandboxError::Io("stub".into()))
    }
    pub fn create(
        &self,
        _name: &str,
        _limits: &CgroupLimits,
    ) -> Result<InstanceCgroup, SandboxError> {
        Err(SandboxError::Io("stub".into()))
    }
    pub fn cleanup_stale(&self) -> Vec<String> {
        Vec::new()
    }
    pub fn remove(&self) -> Result<(), SandboxError> {
        Ok(())
    }
    pub fn version(&self) -> u8 {
        1
    }
}

pub struct InstanceCgroup;

impl InstanceCgroup {
    pub fn procs_files(&self) -> Vec<PathBuf> {
        Vec::new()
    }
    pub fn pids(&self) -> Vec<i32> {
        Vec::new()
    }
    pub fn kill_all(&self) -> Result<(), SandboxError> {
        Ok(())
    }
    pub fn remove(&self) -> Result<(), SandboxError> {
        Ok(())
    }
    pub fn memory_current(&self) -> Option<u64> {
        None
    }
    pub fn cpu_usage(&self) -> Option<Duration> {
        None
    }
    pub fn oom_kills(&self) -> Option<u64> {
        None
    }
    pub fn pids_current(&self) -> Option<u64> {
        None
    }
    pub fn path(&self) -> PathBuf {
        PathBuf::new()
    }
}
