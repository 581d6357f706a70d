//! What the agent can hand out to jobs, and how much of it is free.
//!
//! Capacity comes from sysinfo (CPUs × 1000 millicores, total memory) minus
//! the configured reserve, unless the configuration overrides it. GPUs are
//! zero until NVML inventory is added: the agent never over-commits.

use drover_proto::v1;

use crate::config::AgentConfig;

/// Capacity the agent advertises at Register and accounts slots against.
pub fn capacity(config: &AgentConfig) -> v1::Resources {
    let cpu_millis = config.cpu_millis.unwrap_or_else(|| {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        (cpus * 1000).saturating_sub(config.reserve_cpu_millis)
    });
    let memory_mib = config.memory_mib.unwrap_or_else(|| {
        let mut sys = sysinfo::System::new();
        sys.refresh_memory();
        (sys.total_memory() / (1024 * 1024)).saturating_sub(config.reserve_memory_mib)
    });
    v1::Resources {
        cpu_millis,
        memory_mib,
        gpus: 0,
        disk_gib: 0,
        gpu_model: String::new(),
    }
}

/// Capacity minus what running jobs asked for, plus the number of free slots.
/// Pure so that it can be tested without a running agent.
pub fn free<'a>(
    capacity: &v1::Resources,
    max_jobs: u32,
    running: impl IntoIterator<Item = &'a v1::Resources>,
) -> (v1::Resources, u32) {
    let mut free = capacity.clone();
    let mut used_slots = 0u32;
    for r in running {
        used_slots += 1;
        free.cpu_millis = free.cpu_millis.saturating_sub(r.cpu_millis);
        free.memory_mib = free.memory_mib.saturating_sub(r.memory_mib);
        free.gpus = free.gpus.saturating_sub(r.gpus);
        free.disk_gib = free.disk_gib.saturating_sub(r.disk_gib);
    }
    (free, max_jobs.saturating_sub(used_slots))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(cpu_millis: u32, memory_mib: u64) -> v1::Resources {
        v1::Resources {
            cpu_millis,
            memory_mib,
            ..Default::default()
        }
    }

    #[test]
    fn free_is_capacity_minus_running_requests() {
        let cap = res(4000, 8192);
        let running = [res(1000, 1024), res(500, 512)];
        let (free, slots) = free(&cap, 4, running.iter());
        assert_eq!(free.cpu_millis, 2500);
        assert_eq!(free.memory_mib, 6656);
        assert_eq!(slots, 2);
    }

    #[test]
    fn free_never_underflows() {
        let (free, slots) = free(&res(100, 100), 1, [res(1000, 1000), res(1, 1)].iter());
        assert_eq!((free.cpu_millis, free.memory_mib, slots), (0, 0, 0));
    }

    #[test]
    fn config_overrides_and_reserve_apply() {
        let cfg = AgentConfig {
            cpu_millis: Some(1234),
            memory_mib: Some(42),
            ..AgentConfig::default()
        };
        let cap = capacity(&cfg);
        assert_eq!((cap.cpu_millis, cap.memory_mib), (1234, 42));
        let cfg = AgentConfig {
            reserve_cpu_millis: 500,
            ..AgentConfig::default()
        };
        let cpus = std::thread::available_parallelism().unwrap().get() as u32;
        assert_eq!(capacity(&cfg).cpu_millis, cpus * 1000 - 500);
        assert!(capacity(&AgentConfig::default()).memory_mib > 0);
    }
}
