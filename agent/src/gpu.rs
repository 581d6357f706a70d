//! GPUs: what the host has ([`GpuInventory`]) and which job holds which
//! ([`GpuPool`]).
//!
//! Guarantees: jobs get whole GPUs, never a GPU another job holds; a job's
//! GPUs return to the pool when its [`GpuLease`] is dropped, whatever ended
//! the job (exit, kill, panic). A host without the NVML library has zero GPUs.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// One GPU of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuDevice {
    /// NVML's index; not stable across reboots, so jobs get the UUID.
    pub index: u32,
    /// `GPU-…`: what Docker's device requests and `CUDA_VISIBLE_DEVICES` take.
    pub uuid: String,
    /// The product name (`NVIDIA A10G`): what `gpu_model` constraints match.
    pub model: String,
    pub memory_mib: u64,
}

/// Lists the host's GPUs. Called once at agent start; the list is fixed for
/// the agent's life. Never fails: a host where GPUs cannot be listed has none
/// (the implementation says why in the log).
pub trait GpuInventory: Send + Sync {
    fn devices(&self) -> Vec<GpuDevice>;
}

/// The GPUs NVML reports (nvml-wrapper loads `libnvidia-ml` at run time).
#[derive(Debug, Clone, Default)]
pub struct NvmlInventory {
    devices: Vec<GpuDevice>,
}

impl NvmlInventory {
    /// Asks NVML once. No library or no driver: zero GPUs and one info line;
    /// a device NVML cannot describe is left out with a warning, so no job is
    /// handed a GPU the agent knows nothing about.
    pub fn probe() -> NvmlInventory {
        let nvml = match nvml_wrapper::Nvml::init() {
            Ok(nvml) => nvml,
            Err(e) => {
                tracing::info!("no GPUs: NVML is not available ({e})");
                return NvmlInventory::default();
            }
        };
        let count = match nvml.device_count() {
            Ok(count) => count,
            Err(e) => {
                tracing::warn!("no GPUs: NVML cannot count devices ({e})");
                return NvmlInventory::default();
            }
        };
        let mut devices = Vec::new();
        for index in 0..count {
            let described = nvml.device_by_index(index).and_then(|d| {
                Ok(GpuDevice {
                    index,
                    uuid: d.uuid()?,
                    model: d.name()?,
                    memory_mib: d.memory_info()?.total / (1024 * 1024),
                })
            });
            match described {
                Ok(device) => devices.push(device),
                Err(e) => tracing::warn!("leaving out GPU {index}: NVML cannot describe it ({e})"),
            }
        }
        tracing::info!(gpus = devices.len(), "GPU inventory from NVML");
        NvmlInventory { devices }
    }
}

impl GpuInventory for NvmlInventory {
    fn devices(&self) -> Vec<GpuDevice> {
        self.devices.clone()
    }
}

/// A made-up inventory, for tests and for trying GPU scheduling on a host
/// without GPUs.
#[derive(Debug, Clone, Default)]
pub struct FakeGpus(pub Vec<GpuDevice>);

impl FakeGpus {
    /// `count` GPUs of one `model`, 16 GiB each, with UUIDs `GPU-fake-<i>`.
    pub fn new(count: u32, model: &str) -> FakeGpus {
        FakeGpus(
            (0..count)
                .map(|index| GpuDevice {
                    index,
                    uuid: format!("GPU-fake-{index}"),
                    model: model.to_string(),
                    memory_mib: 16_384,
                })
                .collect(),
        )
    }
}

impl GpuInventory for FakeGpus {
    fn devices(&self) -> Vec<GpuDevice> {
        self.0.clone()
    }
}

/// Why a job cannot have the GPUs it asked for now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    #[error("the job needs {wanted} GPU(s){}, but only {free} of this agent's {total} are free", model_suffix(.model))]
    NotEnough {
        wanted: u32,
        model: Option<String>,
        free: usize,
        total: usize,
    },
}

fn model_suffix(model: &Option<String>) -> String {
    model
        .as_ref()
        .map(|m| format!(" of model {m:?}"))
        .unwrap_or_default()
}

/// The host's GPUs and which are free.
#[derive(Debug)]
pub struct GpuPool {
    devices: Vec<GpuDevice>,
    /// Positions in `devices` of the free GPUs.
    free: Mutex<BTreeSet<usize>>,
}

impl GpuPool {
    pub fn new(devices: Vec<GpuDevice>) -> Arc<GpuPool> {
        let free = (0..devices.len()).collect();
        Arc::new(GpuPool {
            devices,
            free: Mutex::new(free),
        })
    }

    pub fn devices(&self) -> &[GpuDevice] {
        &self.devices
    }

    /// The model every GPU shares; `None` without GPUs or with mixed models
    /// (then jobs naming a model do not fit this agent).
    pub fn common_model(&self) -> Option<&str> {
        let first = &self.devices.first()?.model;
        self.devices
            .iter()
            .all(|d| &d.model == first)
            .then_some(first.as_str())
    }

    pub fn free_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<usize>> {
        // The set is plain data; a panic elsewhere cannot leave it half-changed.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `count` whole free GPUs (of `model` when given), lowest index
    /// first, or none at all. Zero GPUs always succeeds.
    pub fn acquire(
        self: &Arc<Self>,
        count: u32,
        model: Option<&str>,
    ) -> Result<GpuLease, GpuError> {
        let mut free = self.lock();
        let matching: Vec<usize> = free
            .iter()
            .copied()
            .filter(|&i| model.is_none_or(|m| self.devices[i].model == m))
            .collect();
        if matching.len() < count as usize {
            return Err(GpuError::NotEnough {
                wanted: count,
                model: model.map(str::to_string),
                free: matching.len(),
                total: self.devices.len(),
            });
        }
        let taken: Vec<usize> = matching.into_iter().take(count as usize).collect();
        for i in &taken {
            free.remove(i);
        }
        Ok(GpuLease {
            pool: self.clone(),
            taken,
        })
    }

    /// Takes exactly the GPUs with these UUIDs (a job adopted after an agent
    /// restart keeps the devices it runs on), or none at all.
    pub fn acquire_exact(self: &Arc<Self>, uuids: &[String]) -> Result<GpuLease, GpuError> {
        let mut free = self.lock();
        let taken: Vec<usize> = uuids
            .iter()
            .filter_map(|u| self.devices.iter().position(|d| &d.uuid == u))
            .filter(|i| free.contains(i))
            .collect();
        if taken.len() != uuids.len() {
            return Err(GpuError::NotEnough {
                wanted: uuids.len() as u32,
                model: None,
                free: taken.len(),
                total: self.devices.len(),
            });
        }
        for i in &taken {
            free.remove(i);
        }
        Ok(GpuLease {
            pool: self.clone(),
            taken,
        })
    }
}

/// GPUs held by one job; dropping it returns them to the pool.
#[derive(Debug)]
pub struct GpuLease {
    pool: Arc<GpuPool>,
    taken: Vec<usize>,
}

impl GpuLease {
    pub fn devices(&self) -> Vec<GpuDevice> {
        self.taken
            .iter()
            .map(|&i| self.pool.devices[i].clone())
            .collect()
    }
}

impl Drop for GpuLease {
    fn drop(&mut self) {
        if !self.taken.is_empty() {
            self.pool.lock().extend(self.taken.drain(..));
        }
    }
}

/// The UUIDs as `CUDA_VISIBLE_DEVICES` and `NVIDIA_VISIBLE_DEVICES` take them.
pub fn visible_devices(gpus: &[GpuDevice]) -> String {
    gpus.iter()
        .map(|g| g.uuid.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uuids(lease: &GpuLease) -> Vec<String> {
        lease.devices().into_iter().map(|d| d.uuid).collect()
    }

    #[test]
    fn concurrent_jobs_get_disjoint_whole_gpus_and_never_more_than_exist() {
        let pool = GpuPool::new(FakeGpus::new(4, "A10G").devices());
        let a = pool.acquire(1, None).unwrap();
        let b = pool.acquire(2, None).unwrap();
        let c = pool.acquire(1, None).unwrap();
        let mut all: Vec<String> = [&a, &b, &c].iter().flat_map(|l| uuids(l)).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 4, "disjoint: {all:?}");
        assert_eq!(pool.free_count(), 0);
        let err = pool.acquire(1, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the job needs 1 GPU(s), but only 0 of this agent's 4 are free"
        );
        assert!(pool.acquire(0, None).unwrap().devices().is_empty());
    }

    #[test]
    fn many_threads_never_share_a_gpu() {
        let pool = GpuPool::new(FakeGpus::new(4, "A10G").devices());
        let held = Arc::new(Mutex::new(BTreeSet::new()));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (pool, held) = (pool.clone(), held.clone());
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        let Ok(lease) = pool.acquire(1, None) else {
                            continue;
                        };
                        let uuid = uuids(&lease).remove(0);
                        assert!(held.lock().unwrap().insert(uuid.clone()), "{uuid} twice");
                        std::thread::yield_now();
                        held.lock().unwrap().remove(&uuid);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(pool.free_count(), 4);
    }

    #[test]
    fn gpus_return_to_the_pool_when_the_lease_drops_even_on_panic() {
        let pool = GpuPool::new(FakeGpus::new(4, "A10G").devices());
        let lease = pool.acquire(4, None).unwrap();
        assert!(pool.acquire(1, None).is_err());
        drop(lease);
        assert_eq!(pool.free_count(), 4);
        let p = pool.clone();
        let panicked = std::thread::spawn(move || {
            let _lease = p.acquire(3, None).unwrap();
            panic!("the job's task panics while holding its GPUs");
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(pool.free_count(), 4);
    }

    #[test]
    fn a_gpu_model_picks_only_devices_of_that_model() {
        let mut devices = FakeGpus::new(2, "T4").devices();
        devices.extend(FakeGpus::new(2, "A10G").devices().into_iter().map(|mut d| {
            d.index += 2;
            d.uuid = format!("GPU-fake-{}", d.index);
            d
        }));
        let pool = GpuPool::new(devices);
        assert_eq!(pool.common_model(), None);
        let a10g = pool.acquire(2, Some("A10G")).unwrap();
        assert_eq!(uuids(&a10g), ["GPU-fake-2", "GPU-fake-3"]);
        let err = pool.acquire(1, Some("A10G")).unwrap_err();
        assert!(err.to_string().contains("of model \"A10G\""), "{err}");
        assert!(pool.acquire(1, Some("H100")).is_err());
        let t4 = pool.acquire(1, Some("T4")).unwrap();
        assert_eq!(t4.devices()[0].model, "T4");
        let same = GpuPool::new(FakeGpus::new(2, "A10G").devices());
        assert_eq!(same.common_model(), Some("A10G"));
    }

    #[test]
    fn without_the_nvml_library_the_host_has_zero_gpus() {
        // Meant for hosts without the NVIDIA driver (like CI's); on a GPU host
        // the probe rightly finds devices.
        if std::path::Path::new("/proc/driver/nvidia").exists() {
            return;
        }
        assert!(NvmlInventory::probe().devices().is_empty());
    }

    #[test]
    fn visible_devices_lists_uuids_in_order() {
        assert_eq!(
            visible_devices(&FakeGpus::new(2, "T4").devices()),
            "GPU-fake-0,GPU-fake-1"
        );
        assert_eq!(visible_devices(&[]), "");
    }
}
