//! Fargate task sizes and what they cost: the CPU and memory pairs Fargate
//! accepts, checked before RunTask so a bad size is a clear error in the
//! job's log rather than an API failure, and the per-vCPU and per-GB
//! hourly prices a task is billed at.
//!
//! Sources: the valid pairs are those of the ECS developer guide's "Task
//! CPU and memory" table (TaskDefinition.memory); the default prices are
//! AWS's published Fargate on-demand prices for Linux/x86 in us-east-1
//! ($0.04048 per vCPU-hour, $0.004445 per GB-hour). Fargate Spot is billed
//! at a discount that varies ("up to 70%"); without a configured Spot
//! price the on-demand price is used, so a budget never under-counts.

use std::fmt;

/// A task's size: CPU units (1024 = one vCPU) and memory in MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskSize {
    pub cpu: u32,
    pub memory_mib: u32,
}

impl fmt::Display for TaskSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} vCPU and {} GB",
            trim(f64::from(self.cpu) / 1024.0),
            trim(f64::from(self.memory_mib) / 1024.0)
        )
    }
}

fn trim(v: f64) -> String {
    let text = format!("{v:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The memory Fargate allows with each CPU value, in MiB: `(cpu, first,
/// last, step)`.
const VALID: [(u32, u32, u32, u32); 7] = [
    (256, 512, 2048, 0),
    (512, 1024, 4096, 1024),
    (1024, 2048, 8192, 1024),
    (2048, 4096, 16384, 1024),
    (4096, 8192, 30720, 1024),
    (8192, 16384, 61440, 4096),
    (16384, 32768, 122_880, 8192),
];

impl TaskSize {
    /// Checks the pair against Fargate's table.
    ///
    /// # Errors
    /// A message naming the size, why Fargate refuses it, and the sizes it
    /// takes with that CPU (or the CPU values there are).
    pub fn validate(self) -> Result<Self, String> {
        let Some(&(cpu, first, last, step)) = VALID.iter().find(|(cpu, ..)| *cpu == self.cpu)
        else {
            let cpus: Vec<String> = VALID.iter().map(|(c, ..)| c.to_string()).collect();
            return Err(format!(
                "cpu = {} is not a Fargate task size; use one of {} (1024 is one vCPU)",
                self.cpu,
                cpus.join(", ")
            ));
        };
        let fits = if cpu == 256 {
            // Not a regular series: 0.5, 1 or 2 GB.
            [512, 1024, 2048].contains(&self.memory_mib)
        } else {
            (first..=last).contains(&self.memory_mib)
                && (self.memory_mib - first).is_multiple_of(step)
        };
        if fits {
            return Ok(self);
        }
        let allowed = if cpu == 256 {
            "512, 1024 or 2048".to_owned()
        } else {
            format!("{first} to {last} in steps of {step}")
        };
        Err(format!(
            "memory = {} MiB does not go with cpu = {cpu} on Fargate; with that CPU use {allowed} MiB",
            self.memory_mib
        ))
    }

    /// How the agent of a task of this size names its instance type:
    /// `fargate-<cpu units>-<memory MiB>`.
    pub fn instance_type(self) -> String {
        format!("fargate-{}-{}", self.cpu, self.memory_mib)
    }

    /// The size an instance type made by [`TaskSize::instance_type`] names.
    pub fn from_instance_type(instance_type: &str) -> Option<Self> {
        let (cpu, memory) = instance_type.strip_prefix("fargate-")?.split_once('-')?;
        Some(Self {
            cpu: cpu.parse().ok()?,
            memory_mib: memory.parse().ok()?,
        })
    }

    /// vCPUs, as billed.
    pub fn vcpus(self) -> f64 {
        f64::from(self.cpu) / 1024.0
    }

    /// GB of memory, as billed.
    pub fn gigabytes(self) -> f64 {
        f64::from(self.memory_mib) / 1024.0
    }
}

/// Fargate's hourly prices, on-demand and Spot.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FargatePrices {
    pub vcpu_hour: f64,
    pub gb_hour: f64,
    pub spot_vcpu_hour: f64,
    pub spot_gb_hour: f64,
}

/// us-east-1, Linux/x86, on-demand.
pub const DEFAULT_VCPU_HOUR: f64 = 0.040_48;
/// us-east-1, Linux/x86, on-demand.
pub const DEFAULT_GB_HOUR: f64 = 0.004_445;

impl Default for FargatePrices {
    fn default() -> Self {
        Self {
            vcpu_hour: DEFAULT_VCPU_HOUR,
            gb_hour: DEFAULT_GB_HOUR,
            spot_vcpu_hour: DEFAULT_VCPU_HOUR,
            spot_gb_hour: DEFAULT_GB_HOUR,
        }
    }
}

impl FargatePrices {
    /// What a task of `size` costs an hour.
    pub fn hourly(&self, size: TaskSize, spot: bool) -> f64 {
        let (vcpu, gb) = if spot {
            (self.spot_vcpu_hour, self.spot_gb_hour)
        } else {
            (self.vcpu_hour, self.gb_hour)
        };
        size.vcpus() * vcpu + size.gigabytes() * gb
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(cpu: u32, memory_mib: u32) -> TaskSize {
        TaskSize { cpu, memory_mib }
    }

    #[test]
    fn the_table_s_pairs_are_taken_and_others_named_with_the_fix() {
        for ok in [
            (256, 512),
            (256, 1024),
            (256, 2048),
            (512, 4096),
            (1024, 2048),
            (1024, 8192),
            (2048, 16384),
            (4096, 30720),
            (8192, 16384),
            (8192, 20480),
            (16384, 122_880),
        ] {
            assert!(size(ok.0, ok.1).validate().is_ok(), "{ok:?}");
        }
        let e = size(256, 1536).validate().unwrap_err();
        assert!(e.contains("512, 1024 or 2048 MiB"), "{e}");
        let e = size(1024, 9216).validate().unwrap_err();
        assert!(
            e.contains("memory = 9216 MiB does not go with cpu = 1024")
                && e.contains("2048 to 8192 in steps of 1024"),
            "{e}"
        );
        let e = size(8192, 18432).validate().unwrap_err();
        assert!(e.contains("steps of 4096"), "{e}");
        let e = size(1000, 2048).validate().unwrap_err();
        assert!(
            e.contains("cpu = 1000 is not a Fargate task size") && e.contains("1024"),
            "{e}"
        );
    }

    #[test]
    fn a_task_costs_its_vcpus_and_gigabytes() {
        let prices = FargatePrices::default();
        let hourly = prices.hourly(size(1024, 2048), false);
        assert!(
            (hourly - (0.04048 + 2.0 * 0.004445)).abs() < 1e-12,
            "{hourly}"
        );
        let spot = FargatePrices {
            spot_vcpu_hour: 0.0121,
            spot_gb_hour: 0.0013,
            ..FargatePrices::default()
        };
        let hourly = spot.hourly(size(2048, 4096), true);
        assert!(
            (hourly - (2.0 * 0.0121 + 4.0 * 0.0013)).abs() < 1e-12,
            "{hourly}"
        );
        assert_eq!(size(512, 1024).to_string(), "0.5 vCPU and 1 GB");
        assert_eq!(size(512, 1024).instance_type(), "fargate-512-1024");
        assert_eq!(
            TaskSize::from_instance_type("fargate-512-1024"),
            Some(size(512, 1024))
        );
        for other in ["m5.large", "fargate", "fargate-x-1", "fargate-512"] {
            assert_eq!(TaskSize::from_instance_type(other), None, "{other}");
        }
    }
}
