//! The IMDSv2 wire names the client and the stand-in share: request paths
//! and header names, exactly as the instance metadata service spells them.
//!
//! Not responsible for what the payloads mean; see the client for that.

/// Where a session token is requested with `PUT`.
pub(crate) const TOKEN: &str = "/latest/api/token";
/// Header carrying the token's lifetime, on the `PUT` and on its answer.
pub(crate) const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// Header carrying the token on every metadata read.
pub(crate) const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// A token `PUT` that carries this header came through a proxy and is refused.
pub(crate) const FORWARDED_FOR_HEADER: &str = "x-forwarded-for";

pub(crate) const INSTANCE_ID: &str = "/latest/meta-data/instance-id";
pub(crate) const INSTANCE_TYPE: &str = "/latest/meta-data/instance-type";
pub(crate) const AVAILABILITY_ZONE: &str = "/latest/meta-data/placement/availability-zone";
pub(crate) const REGION: &str = "/latest/meta-data/placement/region";
/// `spot` or `on-demand`.
pub(crate) const LIFE_CYCLE: &str = "/latest/meta-data/instance-life-cycle";
/// JSON `{"action": "terminate", "time": "2017-09-18T08:22:00Z"}`; 404 when
/// no interruption is scheduled.
pub(crate) const SPOT_ACTION: &str = "/latest/meta-data/spot/instance-action";
/// JSON `{"noticeTime": "2020-10-27T08:22:00Z"}`; 404 until EC2 recommends
/// a rebalance.
pub(crate) const REBALANCE: &str = "/latest/meta-data/events/recommendations/rebalance";
/// Plain text such as `InService` or `Terminated`; 404 until the Auto
/// Scaling group moves the instance.
pub(crate) const TARGET_LIFECYCLE_STATE: &str =
    "/latest/meta-data/autoscaling/target-lifecycle-state";
/// The instance identity document (JSON).
pub(crate) const IDENTITY_DOCUMENT: &str = "/latest/dynamic/instance-identity/document";
