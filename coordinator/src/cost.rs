//! Cost estimates (DESIGN §7): each attempt's running time × what its share
//! of its agent costs per hour, from a price table in the config.
//!
//! The hourly rate is decided when an attempt starts — from the agent's
//! labels (`platform`, `instance_type`, `spot`) and the job's resource
//! request — and kept on the attempt's RUNNING event, so an estimate never
//! changes when prices or agents do later.
//!
//! - **EC2**: the instance type's on-demand price (or its spot price: set
//!   per type, else `spot_factor` × on-demand) × the job's share of the
//!   instance: the largest of its CPU, memory and GPU fractions, at most 1.
//! - **Fargate**: the job's vCPU and GB at the Fargate rates
//!   (× `fargate_spot_factor` on Fargate Spot).
//! - **Local** agents (`drover dev`): the job's vCPU and GB at the `local_*`
//!   rates, by default Fargate's: what the work would cost there.
//!
//! An EC2 instance type missing from the table has no price: its attempts'
//! cost is unknown (`None`), never a made-up number.

use std::collections::BTreeMap;

use drover_proto::model::{JobEvent, JobState, Resources};
use serde::{Deserialize, Serialize};

/// `[prices]` in the coordinator config. Built-in defaults are us-east-1
/// Linux list prices; entries under `instance_types` add to or replace the
/// built-in ones by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PriceTable {
    /// Spot price as a share of on-demand, for types without a `spot` price.
    pub spot_factor: f64,
    pub fargate_vcpu_hour: f64,
    pub fargate_gb_hour: f64,
    pub fargate_spot_factor: f64,
    pub local_vcpu_hour: f64,
    pub local_gb_hour: f64,
    pub instance_types: BTreeMap<String, InstancePrice>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstancePrice {
    /// USD per hour, on demand.
    pub on_demand: f64,
    /// USD per hour on spot; default `spot_factor` × `on_demand`.
    #[serde(default)]
    pub spot: Option<f64>,
    pub vcpus: f64,
    pub memory_gib: f64,
    #[serde(default)]
    pub gpus: u32,
}

/// (type, on-demand USD/h, vCPUs, GiB, GPUs): us-east-1 Linux list prices.
const BUILT_IN: &[(&str, f64, f64, f64, u32)] = &[
    ("t3.medium", 0.0416, 2.0, 4.0, 0),
    ("t3.large", 0.0832, 2.0, 8.0, 0),
    ("m5.large", 0.096, 2.0, 8.0, 0),
    ("m5.xlarge", 0.192, 4.0, 16.0, 0),
    ("m5.2xlarge", 0.384, 8.0, 32.0, 0),
    ("m5.4xlarge", 0.768, 16.0, 64.0, 0),
    ("m6i.large", 0.096, 2.0, 8.0, 0),
    ("m6i.xlarge", 0.192, 4.0, 16.0, 0),
    ("m6i.2xlarge", 0.384, 8.0, 32.0, 0),
    ("m7g.large", 0.0816, 2.0, 8.0, 0),
    ("m7g.xlarge", 0.1632, 4.0, 16.0, 0),
    ("c5.large", 0.085, 2.0, 4.0, 0),
    ("c5.xlarge", 0.17, 4.0, 8.0, 0),
    ("c5.2xlarge", 0.34, 8.0, 16.0, 0),
    ("c6i.large", 0.085, 2.0, 4.0, 0),
    ("c6i.xlarge", 0.17, 4.0, 8.0, 0),
    ("c7g.large", 0.0725, 2.0, 4.0, 0),
    ("c7g.xlarge", 0.145, 4.0, 8.0, 0),
    ("r5.large", 0.126, 2.0, 16.0, 0),
    ("r5.xlarge", 0.252, 4.0, 32.0, 0),
    ("g4dn.xlarge", 0.526, 4.0, 16.0, 1),
    ("g4dn.2xlarge", 0.752, 8.0, 32.0, 1),
    ("g4dn.12xlarge", 3.912, 48.0, 192.0, 4),
    ("g5.xlarge", 1.006, 4.0, 16.0, 1),
    ("g5.2xlarge", 1.212, 8.0, 32.0, 1),
    ("g5.12xlarge", 5.672, 48.0, 192.0, 4),
    ("p3.2xlarge", 3.06, 8.0, 61.0, 1),
    ("p4d.24xlarge", 32.7726, 96.0, 1152.0, 8),
];

const FARGATE_VCPU_HOUR: f64 = 0.04048;
const FARGATE_GB_HOUR: f64 = 0.004445;

impl Default for PriceTable {
    fn default() -> Self {
        PriceTable {
            spot_factor: 0.35,
            fargate_vcpu_hour: FARGATE_VCPU_HOUR,
            fargate_gb_hour: FARGATE_GB_HOUR,
            fargate_spot_factor: 0.3,
            local_vcpu_hour: FARGATE_VCPU_HOUR,
            local_gb_hour: FARGATE_GB_HOUR,
            instance_types: BTreeMap::new(),
        }
    }
}

impl PriceTable {
    /// The entry for an instance type: the config's, else the built-in one.
    pub fn instance(&self, instance_type: &str) -> Option<InstancePrice> {
        if let Some(price) = self.instance_types.get(instance_type) {
            return Some(price.clone());
        }
        BUILT_IN
            .iter()
            .find(|(name, ..)| *name == instance_type)
            .map(|&(_, on_demand, vcpus, memory_gib, gpus)| InstancePrice {
                on_demand,
                spot: None,
                vcpus,
                memory_gib,
                gpus,
            })
    }

    /// USD per hour for a job asking `wants` on an agent with `labels`;
    /// `None` when the agent's price is unknown.
    pub fn rate(&self, labels: &BTreeMap<String, String>, wants: &Resources) -> Option<f64> {
        let spot = labels.get("spot").is_some_and(|s| s == "true");
        let vcpus = wants.cpu_millis as f64 / 1000.0;
        let gb = wants.memory_mib as f64 / 1024.0;
        match labels.get("platform").map(String::as_str) {
            Some("ec2") => {
                let price = self.instance(labels.get("instance_type")?)?;
                let hourly = if spot {
                    price.spot.unwrap_or(price.on_demand * self.spot_factor)
                } else {
                    price.on_demand
                };
                let mut share = (vcpus / price.vcpus).max(gb / price.memory_gib);
                if price.gpus > 0 {
                    share = share.max(wants.gpus as f64 / price.gpus as f64);
                }
                Some(hourly * share.clamp(0.0, 1.0))
            }
            Some("fargate") => {
                let hourly = vcpus * self.fargate_vcpu_hour + gb * self.fargate_gb_hour;
                Some(if spot {
                    hourly * self.fargate_spot_factor
                } else {
                    hourly
                })
            }
            _ => Some(vcpus * self.local_vcpu_hour + gb * self.local_gb_hour),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let factors = [
            ("prices.spot_factor", self.spot_factor),
            ("prices.fargate_spot_factor", self.fargate_spot_factor),
        ];
        for (field, f) in factors {
            if !(0.0..=1.0).contains(&f) {
                return Err(format!("{field} is {f}; use a share between 0 and 1"));
            }
        }
        let rates = [
            ("prices.fargate_vcpu_hour", self.fargate_vcpu_hour),
            ("prices.fargate_gb_hour", self.fargate_gb_hour),
            ("prices.local_vcpu_hour", self.local_vcpu_hour),
            ("prices.local_gb_hour", self.local_gb_hour),
        ];
        for (field, rate) in rates {
            if !rate.is_finite() || rate < 0.0 {
                return Err(format!("{field} is {rate}; use a price in USD, 0 or more"));
            }
        }
        for (name, p) in &self.instance_types {
            let field = format!("prices.instance_types.{name:?}");
            if !p.on_demand.is_finite() || p.on_demand < 0.0 || p.spot.is_some_and(|s| s < 0.0) {
                return Err(format!("{field}: prices must be USD per hour, 0 or more"));
            }
            if p.vcpus <= 0.0 || p.memory_gib <= 0.0 {
                return Err(format!(
                    "{field}: vcpus and memory_gib must be above 0 (a job's share of the instance is divided by them)"
                ));
            }
        }
        Ok(())
    }
}

/// One attempt's running time and cost.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptCost {
    pub attempt: u64,
    pub started_at_ms: i64,
    /// `None` while it still runs (its cost is counted up to `now`).
    pub ended_at_ms: Option<i64>,
    pub duration_ms: u64,
    pub usd: Option<f64>,
}

/// The attempts in a job's events that ran: from the attempt's first
/// RUNNING event to the next event of that attempt in another state (or
/// `now_ms` while none).
pub fn attempt_costs(events: &[JobEvent], now_ms: i64) -> Vec<AttemptCost> {
    let mut out: Vec<AttemptCost> = Vec::new();
    for (i, event) in events.iter().enumerate() {
        if event.state != JobState::Running || out.iter().any(|a| a.attempt == event.attempt) {
            continue;
        }
        let ended_at_ms = events[i + 1..]
            .iter()
            .find(|e| {
                e.attempt != event.attempt
                    || !matches!(e.state, JobState::Running | JobState::Leased)
            })
            .map(|e| e.at_ms);
        let duration_ms = (ended_at_ms.unwrap_or(now_ms) - event.at_ms).max(0) as u64;
        out.push(AttemptCost {
            attempt: event.attempt,
            started_at_ms: event.at_ms,
            ended_at_ms,
            duration_ms,
            usd: event
                .usd_per_hour
                .map(|rate| rate * duration_ms as f64 / 3_600_000.0),
        });
    }
    out
}

/// A job's running time over all its attempts, and their cost (`None` when
/// any attempt's price is unknown).
pub fn job_cost(events: &[JobEvent], now_ms: i64) -> (u64, Option<f64>) {
    let attempts = attempt_costs(events, now_ms);
    let duration = attempts.iter().map(|a| a.duration_ms).sum();
    let usd = attempts.iter().map(|a| a.usd).sum::<Option<f64>>();
    (duration, usd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn wants(cpu_millis: u32, memory_mib: u64, gpus: u32) -> Resources {
        Resources {
            cpu_millis,
            memory_mib,
            gpus,
            ..Resources::default()
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn ec2_jobs_pay_their_largest_share_of_the_instance() {
        let prices = PriceTable::default();
        let m5 = labels(&[("platform", "ec2"), ("instance_type", "m5.large")]);
        // 1 of 2 vCPUs, 2 of 8 GiB: half the instance.
        let rate = prices.rate(&m5, &wants(1000, 2048, 0)).unwrap();
        assert!(close(rate, 0.096 / 2.0), "{rate}");
        // Memory-bound: 6 of 8 GiB.
        let rate = prices.rate(&m5, &wants(100, 6144, 0)).unwrap();
        assert!(close(rate, 0.096 * 0.75), "{rate}");
        // Never more than the whole instance.
        let rate = prices.rate(&m5, &wants(8000, 64 << 10, 0)).unwrap();
        assert!(close(rate, 0.096), "{rate}");
        // The GPU of a one-GPU instance is all of it.
        let g4 = labels(&[("platform", "ec2"), ("instance_type", "g4dn.xlarge")]);
        let rate = prices.rate(&g4, &wants(1000, 1024, 1)).unwrap();
        assert!(close(rate, 0.526), "{rate}");
    }

    #[test]
    fn spot_uses_the_types_spot_price_or_the_factor() {
        let mut prices = PriceTable::default();
        let spot = labels(&[
            ("platform", "ec2"),
            ("instance_type", "m5.large"),
            ("spot", "true"),
        ]);
        let whole = wants(2000, 8192, 0);
        assert!(close(prices.rate(&spot, &whole).unwrap(), 0.096 * 0.35));
        prices.instance_types.insert(
            "m5.large".into(),
            InstancePrice {
                on_demand: 0.1,
                spot: Some(0.02),
                vcpus: 2.0,
                memory_gib: 8.0,
                gpus: 0,
            },
        );
        assert!(close(prices.rate(&spot, &whole).unwrap(), 0.02));
    }

    #[test]
    fn unknown_instance_types_have_no_price() {
        let prices = PriceTable::default();
        let odd = labels(&[("platform", "ec2"), ("instance_type", "x9.huge")]);
        assert_eq!(prices.rate(&odd, &wants(1000, 1024, 0)), None);
        let untyped = labels(&[("platform", "ec2")]);
        assert_eq!(prices.rate(&untyped, &wants(1000, 1024, 0)), None);
    }

    #[test]
    fn fargate_and_local_jobs_pay_per_vcpu_and_gb() {
        let prices = PriceTable::default();
        let expected = 2.0 * 0.04048 + 4.0 * 0.004445;
        let fargate = labels(&[("platform", "fargate")]);
        assert!(close(
            prices.rate(&fargate, &wants(2000, 4096, 0)).unwrap(),
            expected
        ));
        let fargate_spot = labels(&[("platform", "fargate"), ("spot", "true")]);
        assert!(close(
            prices.rate(&fargate_spot, &wants(2000, 4096, 0)).unwrap(),
            expected * 0.3
        ));
        let local = labels(&[("platform", "local")]);
        assert!(close(
            prices.rate(&local, &wants(2000, 4096, 0)).unwrap(),
            expected
        ));
    }

    fn ev(seq: u64, at_ms: i64, attempt: u64, state: JobState, rate: Option<f64>) -> JobEvent {
        JobEvent {
            seq,
            at_ms,
            attempt,
            state,
            agent_id: None,
            reason: String::new(),
            usd_per_hour: rate,
        }
    }

    #[test]
    fn attempts_cost_their_running_time_at_their_rate() {
        use JobState::*;
        let events = vec![
            ev(1, 0, 0, Queued, None),
            ev(2, 10, 1, Leased, None),
            ev(3, 1_000, 1, Running, Some(3.6)),
            // A cancel request while running is not a new start.
            ev(4, 2_000, 1, Running, None),
            ev(5, 1_801_000, 1, Queued, None),
            ev(6, 1_900_000, 2, Leased, None),
            ev(7, 2_000_000, 2, Running, Some(7.2)),
            ev(8, 2_360_000, 2, Succeeded, None),
        ];
        let attempts = attempt_costs(&events, 9_999_999);
        assert_eq!(attempts.len(), 2);
        assert_eq!(attempts[0].duration_ms, 1_800_000);
        assert!(
            close(attempts[0].usd.unwrap(), 1.8),
            "half an hour at 3.6/h"
        );
        assert_eq!(attempts[1].duration_ms, 360_000);
        assert!(close(attempts[1].usd.unwrap(), 0.72));
        let (duration, usd) = job_cost(&events, 9_999_999);
        assert_eq!(duration, 2_160_000);
        assert!(close(usd.unwrap(), 2.52));
    }

    #[test]
    fn a_running_attempt_counts_up_to_now_and_unknown_prices_stay_unknown() {
        use JobState::*;
        let events = vec![
            ev(1, 0, 1, Leased, None),
            ev(2, 1_000, 1, Running, Some(36.0)),
        ];
        let (duration, usd) = job_cost(&events, 11_000);
        assert_eq!(duration, 10_000);
        assert!(close(usd.unwrap(), 0.1));
        let events = vec![
            ev(1, 1_000, 1, Running, None),
            ev(2, 5_000, 1, Failed, None),
        ];
        assert_eq!(job_cost(&events, 0), (4_000, None));
        // Never ran: free.
        assert_eq!(job_cost(&[ev(1, 0, 0, Queued, None)], 10), (0, Some(0.0)));
    }

    #[test]
    fn bad_prices_are_rejected_naming_the_field() {
        let mut prices = PriceTable {
            spot_factor: 1.5,
            ..PriceTable::default()
        };
        assert!(prices
            .validate()
            .unwrap_err()
            .contains("prices.spot_factor"));
        prices.spot_factor = 0.3;
        prices.instance_types.insert(
            "z1.odd".into(),
            InstancePrice {
                on_demand: 1.0,
                spot: None,
                vcpus: 0.0,
                memory_gib: 1.0,
                gpus: 0,
            },
        );
        assert!(prices.validate().unwrap_err().contains("z1.odd"));
    }
}
