//! What the agent can hand out to jobs, and how much of it is free.
//!
//! Capacity comes from sysinfo (CPUs × 1000 millicores, total memory) minus
//! the configured reserve, unless the configuration overrides it. GPUs come
//! from the [`GpuPool`] (whole devices; the pool never over-commits).

use std::collections::BTreeMap;

use drover_proto::v1;

use crate::config::AgentConfig;
use crate::gpu::GpuPool;

/// Capacity the agent advertises at Register and accounts slots against.
/// `gpu_model` is set only when every GPU is of one model.
pub fn capacity(config: &AgentConfig, gpus: &GpuPool) -> v1::Resources {
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
        gpus: gpus.devices().len() as u32,
        disk_gib: 0,
        gpu_model: gpus.common_model().unwrap_or_default().to_string(),
    }
}

/// Labels that let jobs constrain on GPUs: `gpu_count`, and `gpu_model` when
/// every GPU is of one model. None on a host without GPUs.
pub fn gpu_labels(gpus: &GpuPool) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    if !gpus.devices().is_empty() {
        labels.insert("gpu_count".into(), gpus.devices().len().to_string());
        if let Some(model) = gpus.common_model() {
            labels.insert("gpu_model".into(), model.to_string());
        }
    }
    labels
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
    use crate::gpu::{FakeGpus, GpuInventory};

    fn no_gpus() -> std::sync::Arc<GpuPool> {
        GpuPool::new(Vec::new())
    }

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
        let cap = capacity(&cfg, &no_gpus());
        assert_eq!((cap.cpu_millis, cap.memory_mib), (1234, 42));
        let cfg = AgentConfig {
            reserve_cpu_millis: 500,
            ..AgentConfig::default()
        };
        let cpus = std::thread::available_parallelism().unwrap().get() as u32;
        assert_eq!(capacity(&cfg, &no_gpus()).cpu_millis, cpus * 1000 - 500);
        assert!(capacity(&AgentConfig::default(), &no_gpus()).memory_mib > 0);
    }

    #[test]
    fn gpus_are_advertised_in_capacity_and_labels() {
        let cfg = AgentConfig::default();
        let cap = capacity(&cfg, &no_gpus());
        assert_eq!((cap.gpus, cap.gpu_model.as_str()), (0, ""));
        assert!(gpu_labels(&no_gpus()).is_empty());

        let pool = GpuPool::new(FakeGpus::new(4, "NVIDIA A10G").devices());
        let cap = capacity(&cfg, &pool);
        assert_eq!((cap.gpus, cap.gpu_model.as_str()), (4, "NVIDIA A10G"));
        let labels = gpu_labels(&pool);
        assert_eq!(labels["gpu_count"], "4");
        assert_eq!(labels["gpu_model"], "NVIDIA A10G");

        let mut mixed = FakeGpus::new(1, "T4").devices();
        mixed.push(FakeGpus::new(1, "A10G").devices().remove(0));
        let mixed = GpuPool::new(mixed);
        assert_eq!(capacity(&cfg, &mixed).gpu_model, "");
        assert!(!gpu_labels(&mixed).contains_key("gpu_model"));
    }
}
