//! The instance metadata service's (IMDSv2) wire names: request paths and
//! header names, exactly as the service spells them. The agent's client and
//! the test kit's stand-in both use these, so they cannot drift apart.
//!
//! Not responsible for what the payloads mean; see the agent's IMDS client.

/// Where a session token is requested with `PUT`.
pub const TOKEN: &str = "/latest/api/token";
/// Header carrying the token's lifetime, on the `PUT` and on its answer.
pub const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// Header carrying the token on every metadata read.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// A token `PUT` that carries this header came through a proxy and is refused.
pub const FORWARDED_FOR_HEADER: &str = "x-forwarded-for";

pub const INSTANCE_ID: &str = "/latest/meta-data/instance-id";
pub const INSTANCE_TYPE: &str = "/latest/meta-data/instance-type";
pub const AVAILABILITY_ZONE: &str = "/latest/meta-data/placement/availability-zone";
pub const REGION: &str = "/latest/meta-data/placement/region";
/// `spot` or `on-demand`.
pub const LIFE_CYCLE: &str = "/latest/meta-data/instance-life-cycle";
/// JSON `{"action": "terminate", "time": "2017-09-18T08:22:00Z"}`; 404 when
/// no interruption is scheduled.
pub const SPOT_ACTION: &str = "/latest/meta-data/spot/instance-action";
/// JSON `{"noticeTime": "2020-10-27T08:22:00Z"}`; 404 until EC2 recommends
/// a rebalance.
pub const REBALANCE: &str = "/latest/meta-data/events/recommendations/rebalance";
/// Plain text such as `InService` or `Terminated`; 404 until the Auto
/// Scaling group moves the instance.
pub const TARGET_LIFECYCLE_STATE: &str = "/latest/meta-data/autoscaling/target-lifecycle-state";
/// The instance identity document (JSON).
pub const IDENTITY_DOCUMENT: &str = "/latest/dynamic/instance-identity/document";
/// The identity document's PKCS#7 signature with AWS's RSA-2048 key for the
/// Region, base64 without PEM armour.
pub const IDENTITY_RSA2048: &str = "/latest/dynamic/instance-identity/rsa2048";
