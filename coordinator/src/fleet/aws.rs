//! The `aws-asg` fleet: an existing EC2 Auto Scaling group, driven through
//! aws-sdk-autoscaling and aws-sdk-ec2 with credentials and region from
//! aws-config's usual chain (environment, profile, instance role), the
//! endpoint overridable.
//!
//! The coordinator is the group's only writer of desired capacity: it keeps
//! the capacity it wants (`intent`), adopts what it finds on start, and
//! puts back a desired capacity someone else changed. It grows the group
//! with `SetDesiredCapacity` and shrinks it only by terminating exactly the
//! idle instance it chose, with `ShouldDecrementDesiredCapacity`, so the
//! group never picks a victim itself. Busy instances carry scale-in
//! protection as a second line of defence.
//!
//! Not responsible for deciding anything (the reconcile loop and the
//! policy do), nor for the group's launch template (the operator's).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_sdk_autoscaling::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_autoscaling::types::{AutoScalingGroup, LifecycleState};
use tokio::time::Instant;

use super::{Fleet, FleetError, FleetInstance, LaunchProfile, Observation};

/// How long the group's launch profile (types, zones, market) is trusted.
const PROFILE_TTL: Duration = Duration::from_secs(600);

/// A hung endpoint must not stall the reconcile loop for long.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// At most about two looks at the group a second however fast jobs come
/// and go: each pass makes at least one Describe call, and the Auto Scaling
/// API throttles an account's calls (shared with every other tool in it).
const MIN_PASS_GAP: Duration = Duration::from_millis(500);

/// AWS takes at most 50 instance ids in one `SetInstanceProtection`.
const PROTECTION_BATCH: usize = 50;

/// Error codes that clear up by themselves.
const RETRYABLE_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "ResourceContention",
    "ScalingActivityInProgress",
    "InternalFailure",
    "ServiceUnavailable",
];

/// How to reach the group.
#[derive(Clone, Debug, Default)]
pub struct AwsFleetSettings {
    pub group: String,
    /// Region; `None` takes aws-config's chain (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// Endpoint for both services; `None` is AWS itself.
    pub endpoint_url: Option<String>,
    /// Name of a termination lifecycle hook on the group to complete once
    /// an instance's agent has drained.
    pub lifecycle_hook: Option<String>,
    /// `fleet.max_instances`, to warn when the group's MaxSize is lower.
    pub max_instances: u32,
}

#[derive(Debug)]
struct Seen {
    /// `None` when EC2 would not say.
    launched_at: Option<Instant>,
    market: String,
}

#[derive(Debug, Default)]
struct AwsState {
    /// The desired capacity the coordinator wants; `None` until the group
    /// was first read (then it adopts what it finds).
    intent: Option<u32>,
    max_size: Option<u32>,
    seen: HashMap<String, Seen>,
    released: HashSet<String>,
    profile: Option<(LaunchProfile, Instant)>,
}

/// An EC2 Auto Scaling group as a fleet.
#[derive(Debug)]
pub struct AwsFleet {
    asg: aws_sdk_autoscaling::Client,
    ec2: aws_sdk_ec2::Client,
    settings: AwsFleetSettings,
    state: Mutex<AwsState>,
}

/// What an AWS SDK error says: whether the next try may succeed (a
/// timeout, an unreachable endpoint, or a service error `retryable_code`
/// accepts), the service's error code, and the whole error as text.
pub(crate) fn sdk_error_parts<E, R>(
    e: &SdkError<E, R>,
    retryable_code: impl Fn(&str) -> bool,
) -> (bool, Option<String>, String)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let retryable = match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(s) => s.err().code().is_some_and(&retryable_code),
        _ => false,
    };
    let code = match e {
        SdkError::ServiceError(s) => s.err().code().map(str::to_owned),
        _ => None,
    };
    (retryable, code, DisplayErrorContext(e).to_string())
}

/// Maps an SDK error to a [`FleetError`] naming the call and the group.
fn aws_error<E, R>(operation: &'static str, group: &str, e: SdkError<E, R>) -> FleetError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let (retryable, code, mut detail) = sdk_error_parts(&e, |code| RETRYABLE_CODES.contains(&code));
    if let Some(code) = code {
        if code.contains("AccessDenied") || code.contains("UnauthorizedOperation") {
            detail.push_str("; the coordinator's IAM role needs the policy in deploy/iam/coordinator-policy.json: autoscaling:DescribeAutoScalingGroups, DescribeAutoScalingInstances and ec2:DescribeInstances, DescribeLaunchTemplateVersions, DescribeSpotPriceHistory on any resource; autoscaling:SetDesiredCapacity, SetInstanceProtection, TerminateInstanceInAutoScalingGroup, CompleteLifecycleAction on the group");
        }
    }
    FleetError::Aws {
        operation,
        group: group.to_owned(),
        detail,
        retryable,
    }
}

fn is_live(state: Option<&LifecycleState>) -> bool {
    matches!(
        state,
        Some(
            LifecycleState::Pending
                | LifecycleState::PendingWait
                | LifecycleState::PendingProceed
                | LifecycleState::InService
        )
    )
}

/// `Instant` of a wall-clock moment in the past (now if it lies ahead).
fn instant_of(at: SystemTime) -> Instant {
    let ago = SystemTime::now().duration_since(at).unwrap_or_default();
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

fn to_u32(n: Option<i32>) -> u32 {
    n.and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
}

/// Answers whether an instance is a running member of the group, for
/// enrollment by instance identity (`DescribeAutoScalingInstances`).
#[derive(Debug, Clone)]
pub struct AsgMembership {
    asg: aws_sdk_autoscaling::Client,
    group: String,
}

impl AsgMembership {
    /// A client for `settings`' group, configured as the fleet's.
    pub async fn connect(settings: &AwsFleetSettings) -> Self {
        Self {
            asg: aws_sdk_autoscaling::Client::new(&sdk_config(settings).await),
            group: settings.group.clone(),
        }
    }
}

impl crate::link::GroupMembership for AsgMembership {
    fn is_member<'a>(
        &'a self,
        instance_id: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send + 'a>>
    {
        Box::pin(async move {
            let out = self
                .asg
                .describe_auto_scaling_instances()
                .instance_ids(instance_id)
                .send()
                .await
                .map_err(|e| {
                    aws_error("DescribeAutoScalingInstances", &self.group, e).to_string()
                })?;
            Ok(out.auto_scaling_instances().iter().any(|i| {
                i.instance_id() == Some(instance_id)
                    && i.auto_scaling_group_name() == Some(self.group.as_str())
                    && i.lifecycle_state()
                        .is_some_and(|state| state.starts_with("Pending") || state == "InService")
            }))
        })
    }
}

/// Membership of any of several groups (one per runner with an Auto
/// Scaling group): an instance of any of them may enroll.
#[derive(Debug, Clone)]
pub struct AnyGroup(pub Vec<AsgMembership>);

impl crate::link::GroupMembership for AnyGroup {
    fn is_member<'a>(
        &'a self,
        instance_id: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send + 'a>>
    {
        Box::pin(async move {
            // One group's failure does not hide a membership another group
            // confirms; it is reported only when no group says yes.
            let mut failure = None;
            for group in &self.0 {
                match crate::link::GroupMembership::is_member(group, instance_id).await {
                    Ok(true) => return Ok(true),
                    Ok(false) => {}
                    Err(e) => failure = Some(e),
                }
            }
            failure.map_or(Ok(false), Err)
        })
    }
}

/// The SDK configuration for `settings`: region, endpoint, timeouts.
async fn sdk_config(settings: &AwsFleetSettings) -> aws_config::SdkConfig {
    sdk_config_for(settings.region.as_deref(), settings.endpoint_url.as_deref()).await
}

/// The SDK configuration for a region and endpoint (aws-config's chain for
/// what is not given), with the fleet's timeouts.
pub(crate) async fn sdk_config_for(
    region: Option<&str>,
    endpoint_url: Option<&str>,
) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
        aws_config::timeout::TimeoutConfig::builder()
            .operation_timeout(OPERATION_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build(),
    );
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region.to_owned()));
    }
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

impl AwsFleet {
    /// Connects and checks that the group exists.
    ///
    /// # Errors
    /// The group cannot be read: named with the fix.
    pub async fn connect(settings: AwsFleetSettings) -> Result<Self, FleetError> {
        let config = sdk_config(&settings).await;
        let fleet = Self {
            asg: aws_sdk_autoscaling::Client::new(&config),
            ec2: aws_sdk_ec2::Client::new(&config),
            settings,
            state: Mutex::new(AwsState::default()),
        };
        let group = fleet.describe_group().await?;
        let (min, max) = (to_u32(group.min_size()), to_u32(group.max_size()));
        if min > 0 {
            tracing::warn!(group = %fleet.settings.group, min_size = min, "the auto scaling group's MinSize is above 0: the fleet cannot scale to zero; set MinSize to 0");
        }
        if max < fleet.settings.max_instances {
            tracing::warn!(group = %fleet.settings.group, max_size = max, max_instances = fleet.settings.max_instances, "the auto scaling group's MaxSize is below fleet.max_instances; the fleet stops at MaxSize");
        }
        tracing::info!(
            group = %fleet.settings.group,
            desired = to_u32(group.desired_capacity()),
            instances = group.instances().len(),
            "auto scaling group found"
        );
        Ok(fleet)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AwsState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn describe_group(&self) -> Result<AutoScalingGroup, FleetError> {
        let group = &self.settings.group;
        let out = self
            .asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(group)
            .send()
            .await
            .map_err(|e| aws_error("DescribeAutoScalingGroups", group, e))?;
        out.auto_scaling_groups()
            .iter()
            .find(|g| g.auto_scaling_group_name() == Some(group.as_str()))
            .cloned()
            .ok_or_else(|| FleetError::Aws {
                operation: "DescribeAutoScalingGroups",
                group: group.clone(),
                detail: "no such group in this account and region; create it (packer/README.md shows how) or fix fleet.aws.group and fleet.aws.region".to_owned(),
                retryable: false,
            })
    }

    async fn set_desired(&self, desired: u32) -> Result<(), FleetError> {
        let group = &self.settings.group;
        self.asg
            .set_desired_capacity()
            .auto_scaling_group_name(group)
            .desired_capacity(i32::try_from(desired).unwrap_or(i32::MAX))
            // Cooldowns are for alarm-driven policies; the coordinator
            // already paces its own launches.
            .honor_cooldown(false)
            .send()
            .await
            .map_err(|e| aws_error("SetDesiredCapacity", group, e))?;
        Ok(())
    }

    /// Launch time and market of instances seen for the first time.
    async fn learn(&self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let out = self
            .ec2
            .describe_instances()
            .set_instance_ids(Some(ids.clone()))
            .send()
            .await;
        let mut learned: HashMap<String, Seen> = HashMap::new();
        match out {
            Ok(out) => {
                for i in out.reservations().iter().flat_map(|r| r.instances()) {
                    let Some(id) = i.instance_id() else { continue };
                    let launched_at = i
                        .launch_time()
                        .and_then(|t| SystemTime::try_from(*t).ok())
                        .map(instant_of);
                    let market = match i.instance_lifecycle() {
                        Some(l) if l.as_str() == "spot" => "spot",
                        Some(_) => "",
                        None => "on-demand",
                    };
                    learned.insert(
                        id.to_owned(),
                        Seen {
                            launched_at,
                            market: market.to_owned(),
                        },
                    );
                }
            }
            Err(e) => {
                let e = aws_error("DescribeInstances", &self.settings.group, e);
                tracing::warn!(error = %e, "cannot read new instances' launch times; their boot timeout counts from now");
            }
        }
        let mut state = self.lock();
        for id in ids {
            let seen = learned.remove(&id).unwrap_or_else(|| Seen {
                launched_at: None,
                market: String::new(),
            });
            state.seen.entry(id).or_insert(seen);
        }
    }

    /// Types, zones and market of the group's next instance.
    async fn launch_profile(&self, group: &AutoScalingGroup) -> LaunchProfile {
        if let Some((profile, at)) = &self.lock().profile {
            if at.elapsed() < PROFILE_TTL {
                return profile.clone();
            }
        }
        let mut profile = LaunchProfile {
            zones: group.availability_zones().to_vec(),
            ..LaunchProfile::default()
        };
        let mut template = group.launch_template().cloned();
        if let Some(mixed) = group.mixed_instances_policy() {
            if let Some(lt) = mixed.launch_template() {
                profile.instance_types = lt
                    .overrides()
                    .iter()
                    .filter_map(|o| o.instance_type().map(str::to_owned))
                    .collect();
                template = template.or_else(|| lt.launch_template_specification().cloned());
            }
            // AWS's default for the percentage is 100: all on-demand.
            profile.spot = mixed
                .instances_distribution()
                .and_then(|d| d.on_demand_percentage_above_base_capacity())
                .is_some_and(|p| p < 100);
        }
        if let Some(spec) = template {
            let mut call = self.ec2.describe_launch_template_versions();
            if let Some(id) = spec.launch_template_id() {
                call = call.launch_template_id(id);
            } else if let Some(name) = spec.launch_template_name() {
                call = call.launch_template_name(name);
            }
            call = call.versions(spec.version().unwrap_or("$Default"));
            match call.send().await {
                Ok(out) => {
                    if let Some(data) = out
                        .launch_template_versions()
                        .first()
                        .and_then(|v| v.launch_template_data())
                    {
                        if profile.instance_types.is_empty() {
                            profile
                                .instance_types
                                .extend(data.instance_type().map(|t| t.as_str().to_owned()));
                        }
                        if data
                            .instance_market_options()
                            .and_then(|m| m.market_type())
                            .is_some_and(|m| m.as_str() == "spot")
                        {
                            profile.spot = true;
                        }
                    }
                }
                Err(e) => {
                    let e = aws_error("DescribeLaunchTemplateVersions", &self.settings.group, e);
                    tracing::warn!(error = %e, "cannot read the group's launch template; the budget prices new instances by the ones running");
                }
            }
        }
        if profile.instance_types.is_empty() {
            profile.instance_types = group
                .instances()
                .iter()
                .filter_map(|i| i.instance_type().map(str::to_owned))
                .collect();
            profile.instance_types.sort();
            profile.instance_types.dedup();
        }
        self.lock().profile = Some((profile.clone(), Instant::now()));
        profile
    }

    /// Completes the termination lifecycle action of an instance.
    ///
    /// # Errors
    /// The call fails (moto's server, for one, does not implement it).
    pub async fn complete_lifecycle_action(&self, id: &str) -> Result<(), FleetError> {
        let Some(hook) = &self.settings.lifecycle_hook else {
            return Ok(());
        };
        let group = &self.settings.group;
        self.asg
            .complete_lifecycle_action()
            .auto_scaling_group_name(group)
            .lifecycle_hook_name(hook)
            .instance_id(id)
            .lifecycle_action_result("CONTINUE")
            .send()
            .await
            .map_err(|e| aws_error("CompleteLifecycleAction", group, e))?;
        self.lock().released.insert(id.to_owned());
        Ok(())
    }
}

impl Fleet for AwsFleet {
    fn provider(&self) -> &'static str {
        "aws-asg"
    }

    fn min_pass_gap(&self) -> Duration {
        MIN_PASS_GAP
    }

    async fn observe(&self) -> Result<Observation, FleetError> {
        let group = self.describe_group().await?;
        let desired = to_u32(group.desired_capacity());
        let (min_size, max_size) = (to_u32(group.min_size()), to_u32(group.max_size()));
        let intent = {
            let mut state = self.lock();
            state.max_size = Some(max_size);
            let wanted = match state.intent {
                Some(i) => i,
                None => {
                    tracing::info!(group = %self.settings.group, desired, instances = group.instances().len(), "adopting the auto scaling group as it is");
                    desired
                }
            };
            // Someone may have moved the group's bounds; AWS refuses a
            // desired capacity outside them.
            let bounded = wanted.clamp(min_size, max_size.max(min_size));
            if bounded != wanted {
                tracing::warn!(group = %self.settings.group, wanted, min_size, max_size, "the desired capacity the coordinator wants is outside the group's MinSize..MaxSize; keeping to the bounds");
            }
            state.intent = Some(bounded);
            bounded
        };
        let mut desired_now = desired;
        let mut drift_corrected = false;
        if desired != intent {
            tracing::warn!(group = %self.settings.group, found = desired, wanted = intent, "desired capacity drifted (changed outside the coordinator); setting it back");
            match self.set_desired(intent).await {
                Ok(()) => {
                    desired_now = intent;
                    drift_corrected = true;
                }
                // The rest of the pass (protection above all) still runs.
                Err(e) => {
                    tracing::warn!(error = %e, "failed to set the desired capacity back; trying again next pass")
                }
            }
        }

        let ids: Vec<String> = group
            .instances()
            .iter()
            .filter_map(|i| i.instance_id().map(str::to_owned))
            .collect();
        let new: Vec<String> = {
            let state = self.lock();
            ids.iter()
                .filter(|id| !state.seen.contains_key(*id))
                .cloned()
                .collect()
        };
        self.learn(new).await;
        let profile = self.launch_profile(&group).await;

        let mut state = self.lock();
        state.seen.retain(|id, _| ids.contains(id));
        state.released.retain(|id| ids.contains(id));
        let mut instances = Vec::with_capacity(ids.len());
        let mut live = 0u32;
        for i in group.instances() {
            let Some(id) = i.instance_id() else { continue };
            let lifecycle = i.lifecycle_state();
            let removing = !is_live(lifecycle);
            if !removing {
                live += 1;
            }
            let seen = state.seen.get(id);
            instances.push(FleetInstance {
                id: id.to_owned(),
                launched_at: seen.and_then(|s| s.launched_at),
                removing,
                protected: i.protected_from_scale_in(),
                awaiting_release: self.settings.lifecycle_hook.is_some()
                    && lifecycle == Some(&LifecycleState::TerminatingWait)
                    && !state.released.contains(id),
                instance_type: i.instance_type().unwrap_or_default().to_owned(),
                zone: i.availability_zone().unwrap_or_default().to_owned(),
                market: seen.map(|s| s.market.clone()).unwrap_or_default(),
            });
        }
        instances.sort_by(|a, b| a.launched_at.cmp(&b.launched_at).then(a.id.cmp(&b.id)));
        Ok(Observation {
            instances,
            pending: desired_now.saturating_sub(live),
            desired: Some(desired_now),
            launch_profile: Some(profile),
            drift_corrected,
        })
    }

    async fn launch(&self, count: u32) -> Result<u32, FleetError> {
        let (before, target) = {
            let state = self.lock();
            let before = state.intent.unwrap_or(0);
            let mut target = before.saturating_add(count);
            if let Some(max) = state.max_size {
                target = target.min(max);
            }
            (before, target)
        };
        if target <= before {
            tracing::warn!(group = %self.settings.group, desired = before, "the auto scaling group is at its MaxSize; raise MaxSize to launch more");
            return Ok(0);
        }
        self.set_desired(target).await?;
        self.lock().intent = Some(target);
        Ok(target - before)
    }

    async fn remove(&self, id: &str) -> Result<(), FleetError> {
        let group = &self.settings.group;
        self.asg
            .terminate_instance_in_auto_scaling_group()
            // moto reads only the single-id form; AWS takes both.
            .instance_id(id)
            .should_decrement_desired_capacity(true)
            .send()
            .await
            .map_err(|e| aws_error("TerminateInstanceInAutoScalingGroup", group, e))?;
        let mut state = self.lock();
        state.intent = state.intent.map(|i| i.saturating_sub(1));
        Ok(())
    }

    async fn protect(&self, ids: &[String], protected: bool) -> Result<(), FleetError> {
        let group = &self.settings.group;
        for batch in ids.chunks(PROTECTION_BATCH) {
            self.asg
                .set_instance_protection()
                .auto_scaling_group_name(group)
                .set_instance_ids(Some(batch.to_vec()))
                .protected_from_scale_in(protected)
                .send()
                .await
                .map_err(|e| aws_error("SetInstanceProtection", group, e))?;
        }
        Ok(())
    }

    async fn release(&self, id: &str) -> Result<(), FleetError> {
        self.complete_lifecycle_action(id).await
    }

    async fn spot_price(&self, instance_type: &str, zone: &str) -> Result<Option<f64>, FleetError> {
        let out = self
            .ec2
            .describe_spot_price_history()
            .instance_types(aws_sdk_ec2::types::InstanceType::from(instance_type))
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("availability-zone")
                    .values(zone)
                    .build(),
            )
            // With a start time AWS answers the price in force then; a
            // product-description filter is left out because emulators
            // match nothing with it. Linux rows are preferred below.
            .start_time(aws_sdk_ec2::primitives::DateTime::from(SystemTime::now()))
            .send()
            .await
            .map_err(|e| aws_error("DescribeSpotPriceHistory", &self.settings.group, e))?;
        let rows = out.spot_price_history();
        let linux = |r: &&aws_sdk_ec2::types::SpotPrice| {
            r.product_description()
                .is_some_and(|d| d.as_str().starts_with("Linux/UNIX"))
        };
        let pick = rows
            .iter()
            .filter(linux)
            .max_by_key(|r| r.timestamp().map(aws_sdk_ec2::primitives::DateTime::secs))
            .or_else(|| rows.first());
        Ok(pick
            .and_then(|r| r.spot_price())
            .and_then(|p| p.parse::<f64>().ok()))
    }
}
