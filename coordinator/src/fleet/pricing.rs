//! What instances cost: Spot prices as the fleet last reported them (cached,
//! refreshed by the reconcile loop) and the operator's on-demand price
//! table. Read without awaiting by the reconcile loop (for the budget) and
//! by jobs (for the cost line at the end of each log).
//!
//! Not responsible for fetching prices (the fleet's `spot_price`) or for
//! deciding anything with them (`budget`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long a Spot price is trusted before it is fetched again. Spot
/// prices move slowly (hours to days), and the call is rate-limited.
pub const SPOT_PRICE_TTL: Duration = Duration::from_secs(3600);

/// The type, zone and market of one instance, as far as known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PricedInstance {
    pub instance_type: String,
    pub zone: String,
    /// `spot`, `on-demand`, or `local` (no cost).
    pub market: String,
}

/// Hourly prices in US dollars.
#[derive(Debug, Default)]
pub struct PriceBook {
    spot: Mutex<HashMap<(String, String), (f64, Instant)>>,
    on_demand: BTreeMap<String, f64>,
    /// Fargate's per-vCPU and per-GB prices, for tasks (instance types
    /// `fargate-<cpu>-<memory MiB>`, as their agents report them).
    fargate: Option<super::fargate::size::FargatePrices>,
    /// Instance types already warned about, so the log says it once.
    warned: Mutex<HashSet<String>>,
}

impl PriceBook {
    /// A book with the operator's on-demand prices by instance type.
    pub fn new(on_demand: BTreeMap<String, f64>) -> Self {
        Self {
            on_demand,
            ..Self::default()
        }
    }

    /// The book, pricing Fargate tasks at `prices`.
    #[must_use]
    pub fn with_fargate(mut self, prices: super::fargate::size::FargatePrices) -> Self {
        self.fargate = Some(prices);
        self
    }

    /// Whether the Spot price of this type and zone must be fetched.
    pub fn spot_stale(&self, instance_type: &str, zone: &str) -> bool {
        self.lock_spot()
            .get(&(instance_type.to_owned(), zone.to_owned()))
            .is_none_or(|(_, at)| at.elapsed() >= SPOT_PRICE_TTL)
    }

    /// Records a Spot price just fetched.
    pub fn set_spot(&self, instance_type: &str, zone: &str, usd_per_hour: f64) {
        self.lock_spot().insert(
            (instance_type.to_owned(), zone.to_owned()),
            (usd_per_hour, Instant::now()),
        );
    }

    fn lock_spot(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), (f64, Instant)>> {
        self.spot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The hourly price of an instance, if known. Local instances cost
    /// nothing; a Spot instance whose zone price is unknown takes the
    /// dearest known price of its type.
    pub fn hourly(&self, i: &PricedInstance) -> Option<f64> {
        if let (Some(prices), Some(size)) = (
            &self.fargate,
            super::fargate::size::TaskSize::from_instance_type(&i.instance_type),
        ) {
            return Some(prices.hourly(size, i.market == "spot"));
        }
        match i.market.as_str() {
            "local" => Some(0.0),
            "spot" => {
                let spot = self.lock_spot();
                spot.get(&(i.instance_type.clone(), i.zone.clone()))
                    .map(|(p, _)| *p)
                    .or_else(|| {
                        spot.iter()
                            .filter(|((t, _), _)| *t == i.instance_type)
                            .map(|(_, (p, _))| *p)
                            .reduce(f64::max)
                    })
            }
            _ => self.on_demand.get(&i.instance_type).copied(),
        }
    }

    /// [`PriceBook::hourly`], falling back to the dearest price in the
    /// on-demand table (so an unknown price errs towards spending less),
    /// and saying once per type that the price is unknown.
    pub fn hourly_or_warn(&self, i: &PricedInstance) -> f64 {
        if let Some(p) = self.hourly(i) {
            return p;
        }
        let fallback = self.on_demand.values().copied().reduce(f64::max);
        let first = self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(format!("{}/{}", i.instance_type, i.market));
        if first {
            tracing::warn!(
                instance_type = %i.instance_type,
                market = %i.market,
                assumed_usd_per_hour = fallback.unwrap_or(0.0),
                "no price known for this instance type; add it to budget.on_demand_hourly_usd"
            );
        }
        fallback.unwrap_or(0.0)
    }

    /// What one more instance of this profile costs an hour: the dearest of
    /// the types and zones it may land in.
    pub fn launch_hourly(&self, profile: &super::LaunchProfile) -> f64 {
        let market = if profile.spot { "spot" } else { "on-demand" };
        let zones: Vec<&str> = if profile.zones.is_empty() {
            vec![""]
        } else {
            profile.zones.iter().map(String::as_str).collect()
        };
        profile
            .instance_types
            .iter()
            .flat_map(|t| {
                zones.iter().map(move |z| PricedInstance {
                    instance_type: t.clone(),
                    zone: (*z).to_owned(),
                    market: market.to_owned(),
                })
            })
            .map(|i| self.hourly_or_warn(&i))
            .fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(t: &str, z: &str, m: &str) -> PricedInstance {
        PricedInstance {
            instance_type: t.into(),
            zone: z.into(),
            market: m.into(),
        }
    }

    #[test]
    fn spot_on_demand_and_local_prices() {
        let book = PriceBook::new(BTreeMap::from([("m5.large".to_owned(), 0.096)]));
        assert!(book.spot_stale("m5.large", "us-east-1a"));
        book.set_spot("m5.large", "us-east-1a", 0.03);
        book.set_spot("m5.large", "us-east-1b", 0.04);
        assert!(!book.spot_stale("m5.large", "us-east-1a"));
        assert_eq!(
            book.hourly(&inst("m5.large", "us-east-1a", "spot")),
            Some(0.03)
        );
        // Unknown zone: the dearest known zone of the type.
        assert_eq!(
            book.hourly(&inst("m5.large", "us-east-1f", "spot")),
            Some(0.04)
        );
        assert_eq!(
            book.hourly(&inst("m5.large", "us-east-1a", "on-demand")),
            Some(0.096)
        );
        assert_eq!(book.hourly(&inst("", "", "local")), Some(0.0));
        assert_eq!(
            book.hourly(&inst("c5.xlarge", "us-east-1a", "on-demand")),
            None
        );
        // Unknown: err towards the dearest price in the table.
        assert!((book.hourly_or_warn(&inst("c5.xlarge", "", "on-demand")) - 0.096).abs() < 1e-12);
    }

    #[test]
    fn a_launch_costs_the_dearest_type_and_zone() {
        let book = PriceBook::new(BTreeMap::from([
            ("m5.large".to_owned(), 0.096),
            ("c5.large".to_owned(), 0.085),
        ]));
        book.set_spot("m5.large", "a", 0.02);
        book.set_spot("m5.large", "b", 0.05);
        book.set_spot("c5.large", "a", 0.03);
        let spot = super::super::LaunchProfile {
            instance_types: vec!["m5.large".into(), "c5.large".into()],
            zones: vec!["a".into(), "b".into()],
            spot: true,
        };
        assert!((book.launch_hourly(&spot) - 0.05).abs() < 1e-12);
        let on_demand = super::super::LaunchProfile {
            spot: false,
            ..spot
        };
        assert!((book.launch_hourly(&on_demand) - 0.096).abs() < 1e-12);
    }
}
