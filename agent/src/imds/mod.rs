//! The agent's view of the EC2 instance metadata service (IMDSv2): the facts
//! it reports about its instance, and the notices that say the instance is
//! about to be taken away (a Spot interruption, a rebalance recommendation,
//! an Auto Scaling group moving it out of service).
//!
//! [`InstanceMetadata`] is the seam, in the agent's own words; [`Imds`] is
//! the real implementation over the AWS SDK's IMDSv2 client; [`watch`] polls
//! a seam and reports each interruption once. The wire-faithful stand-in
//! the tests and the demo point the client at lives in the test kit.
//!
//! Not responsible for acting on an interruption (the session hands jobs
//! back) nor for verifying the identity document's signature (the
//! coordinator's business).

mod client;
mod error;
mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

#[cfg(fuzzing)]
pub use client::fuzzing;
pub use client::Imds;
pub use error::ImdsError;
pub use watch::{watch, Interruption, ASG_ASSUMED_NOTICE, POLL_INTERVAL};

/// What the agent reads from its instance's metadata.
///
/// Used generically (`M: InstanceMetadata`), so the futures are spelled out
/// rather than boxed.
pub trait InstanceMetadata: Send + Sync {
    /// The instance's identity and placement.
    ///
    /// # Errors
    /// [`ImdsError`] when the service cannot be read or lacks an item every
    /// EC2 instance has.
    fn instance_facts(&self) -> impl Future<Output = Result<InstanceFacts, ImdsError>> + Send;

    /// The interruption notices standing right now; an absent notice (404)
    /// is `None`.
    ///
    /// # Errors
    /// [`ImdsError`] when any of the notices cannot be read or parsed.
    fn poll_notices(&self) -> impl Future<Output = Result<Notices, ImdsError>> + Send;
}

impl<T: InstanceMetadata> InstanceMetadata for Arc<T> {
    fn instance_facts(&self) -> impl Future<Output = Result<InstanceFacts, ImdsError>> + Send {
        (**self).instance_facts()
    }

    fn poll_notices(&self) -> impl Future<Output = Result<Notices, ImdsError>> + Send {
        (**self).poll_notices()
    }
}

/// The instance's identity and placement, as its metadata gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceFacts {
    pub instance_id: String,
    pub instance_type: String,
    pub availability_zone: String,
    pub region: String,
    pub market: Market,
}

/// How the instance was bought, from `instance-life-cycle`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Market {
    Spot,
    OnDemand,
    /// A value the agent does not know; kept as given.
    Other(String),
}

impl Market {
    /// Reads an `instance-life-cycle` value.
    pub fn from_life_cycle(value: &str) -> Self {
        match value {
            "spot" => Market::Spot,
            "on-demand" => Market::OnDemand,
            other => Market::Other(other.to_owned()),
        }
    }

    /// The name the coordinator expects: "spot", "on-demand", or the value
    /// as given.
    pub fn as_str(&self) -> &str {
        match self {
            Market::Spot => "spot",
            Market::OnDemand => "on-demand",
            Market::Other(other) => other,
        }
    }
}

impl std::fmt::Display for Market {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The notices standing at one poll.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Notices {
    /// A scheduled Spot interruption.
    pub spot_action: Option<SpotAction>,
    /// When EC2 recommended moving work off this instance.
    pub rebalance: Option<SystemTime>,
    /// Where the Auto Scaling group is moving the instance (`InService`,
    /// `Terminated`, `Warmed:Stopped`, ...).
    pub target_lifecycle_state: Option<String>,
}

/// A scheduled Spot interruption.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpotAction {
    /// `terminate`, `stop` or `hibernate`.
    pub action: String,
    /// When EC2 acts. `hibernate` gets no two-minute warning: hibernation
    /// starts at once.
    pub time: SystemTime,
}
