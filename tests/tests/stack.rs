//! `deploy/servitor.yaml` created for real in moto's CloudFormation through
//! the AWS SDK, and the real coordinator sizing the group the stack made:
//! a job held raises the group's desired capacity, the instance comes up
//! protected from scale-in and runs the job, and goes once idle. The
//! launch template, group and security groups are read back as AWS would
//! hold them.
//!
//! What moto 5.2.5 does not do, and so this test does not check:
//! - `AWS::EC2::SecurityGroupEgress` is not implemented: the rule letting
//!   agents reach the coordinator's port is skipped (the stack still
//!   completes), and a group's own `SecurityGroupEgress` list is ignored
//!   (every group keeps moto's allow-all egress). Only ingress is checked.
//! - Instances do not take the launch template's metadata options (they
//!   show `HttpTokens` optional), so hop limit and tokens are checked on
//!   the launch template, where AWS applies them from.
//! - No machine boots and no user-data runs: as in `aws.rs`, the test plays
//!   EC2 and starts an agent for each instance moto creates (enrolling by
//!   instance identity, as the stack's user-data has it). `deploy.rs` runs
//!   the stack's user-data and loads the configuration it writes.

use std::time::Duration;

use anyhow::Context;
use aws_sdk_cloudformation::types::{Capability, Parameter, StackStatus};
use base64::Engine;
use servitor_testkit::gitlab::{JobSpec, JobState};
use servitor_tests::aws::{AwsHarness, AwsOptions, Group, Moto};

const TIMEOUT: Duration = Duration::from_secs(90);
const STACK: &str = "servitor-ci";
const GROUP: &str = "servitor-ci-agents";
const MAX_SIZE: i32 = 4;
/// Three of the template's eight slots: the rest must drop out.
const TYPES: &[&str] = &["m6i.large", "m6a.large", "m5.large"];
const PIN: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn template_body() -> anyhow::Result<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the tests crate has a parent directory")?
        .join("deploy/servitor.yaml");
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

fn parameter(key: &str, value: impl Into<String>) -> Parameter {
    Parameter::builder()
        .parameter_key(key)
        .parameter_value(value)
        .build()
}

/// Creates the stack in the default VPC and waits for it; returns its
/// outputs.
async fn create_stack(moto: &Moto) -> anyhow::Result<Vec<(String, String)>> {
    let config = moto.sdk_config().await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let cfn = aws_sdk_cloudformation::Client::new(&config);
    let vpcs = ec2.describe_vpcs().send().await.context("DescribeVpcs")?;
    let vpc = vpcs
        .vpcs()
        .iter()
        .find(|v| v.is_default() == Some(true))
        .and_then(|v| v.vpc_id())
        .context("moto has a default VPC")?
        .to_owned();
    let subnets = ec2
        .describe_subnets()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("vpc-id")
                .values(&vpc)
                .build(),
        )
        .send()
        .await
        .context("DescribeSubnets")?;
    let subnets: Vec<&str> = subnets
        .subnets()
        .iter()
        .filter_map(|s| s.subnet_id())
        .take(2)
        .collect();
    let image = servitor_tests::aws::moto_image(&ec2).await?;
    cfn.create_stack()
        .stack_name(STACK)
        .template_body(template_body()?)
        .parameters(parameter("AgentImageId", &image))
        .parameters(parameter("VpcId", &vpc))
        .parameters(parameter("SubnetIds", subnets.join(",")))
        .parameters(parameter("InstanceTypes", TYPES.join(",")))
        .parameters(parameter("MaxSize", MAX_SIZE.to_string()))
        .parameters(parameter("GroupName", GROUP))
        // No machine boots here, so where its agent would dial is not used
        // (the test's agents are told the coordinator's address directly).
        .parameters(parameter("CoordinatorAddress", "coordinator.internal"))
        .parameters(parameter("CoordinatorCaSha256", PIN))
        .parameters(parameter("CacheBucket", "servitor-ci-cache"))
        .capabilities(Capability::CapabilityIam)
        .send()
        .await
        .context("CreateStack")?;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let out = cfn
            .describe_stacks()
            .stack_name(STACK)
            .send()
            .await
            .context("DescribeStacks")?;
        let stack = out.stacks().first().context("the stack is listed")?;
        match stack.stack_status() {
            Some(StackStatus::CreateComplete) => {
                return Ok(stack
                    .outputs()
                    .iter()
                    .map(|o| {
                        (
                            o.output_key().unwrap_or_default().to_owned(),
                            o.output_value().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect());
            }
            Some(StackStatus::CreateInProgress) | None => {}
            Some(other) => anyhow::bail!(
                "the stack ended {other:?}: {}",
                stack.stack_status_reason().unwrap_or_default()
            ),
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the stack did not complete"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn output<'a>(outputs: &'a [(String, String)], key: &str) -> &'a str {
    outputs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("the stack has no output {key}: {outputs:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_makes_a_group_the_coordinator_sizes() {
    servitor_tests::aws::aws_environment();
    let moto = Moto::start().await.unwrap();
    let outputs = create_stack(&moto).await.unwrap();
    assert_eq!(output(&outputs, "GroupName"), GROUP);
    assert!(output(&outputs, "CoordinatorRoleArn").starts_with("arn:aws:iam::"));
    assert!(!output(&outputs, "CoordinatorInstanceProfile").is_empty());
    let group = Group::existing(&moto, GROUP).await;

    // The launch template: IMDSv2 only, out of containers' reach, no role,
    // an encrypted gp3 root, user-data enrolling by identity.
    let versions = group
        .ec2
        .describe_launch_template_versions()
        .launch_template_id(output(&outputs, "LaunchTemplateId"))
        .versions("$Latest")
        .send()
        .await
        .unwrap();
    let data = versions.launch_template_versions()[0]
        .launch_template_data()
        .expect("the version has data");
    let metadata = data.metadata_options().expect("metadata options");
    assert_eq!(
        metadata.http_tokens().map(|t| t.as_str()),
        Some("required"),
        "IMDSv2 only"
    );
    assert_eq!(metadata.http_put_response_hop_limit(), Some(1));
    assert!(
        data.iam_instance_profile().is_none(),
        "instances get no role"
    );
    let root = &data.block_device_mappings()[0];
    let ebs = root.ebs().expect("the root volume is EBS");
    assert_eq!(ebs.encrypted(), Some(true));
    assert_eq!(ebs.volume_type().map(|t| t.as_str()), Some("gp3"));
    let user_data = base64::engine::general_purpose::STANDARD
        .decode(data.user_data().expect("user-data"))
        .unwrap();
    let user_data = String::from_utf8(user_data).unwrap();
    assert!(user_data.contains("export COORDINATOR='coordinator.internal:7443'"));
    assert!(user_data.contains(&format!("export CA_SHA256='{PIN}'")));
    assert!(user_data.contains("export ENROLL=aws-iid"));
    assert!(user_data.ends_with("systemctl enable --now servitor-agent.service\n"));
    assert_eq!(
        data.security_group_ids(),
        [output(&outputs, "AgentSecurityGroupId")]
    );

    // The group: Spot only across the types given, new instances
    // protected, no capacity rebalancing, starting empty.
    let groups = group
        .asg
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(GROUP)
        .send()
        .await
        .unwrap();
    let asg = &groups.auto_scaling_groups()[0];
    assert_eq!(
        (asg.min_size(), asg.max_size(), asg.desired_capacity()),
        (Some(0), Some(MAX_SIZE), Some(0))
    );
    assert_eq!(asg.new_instances_protected_from_scale_in(), Some(true));
    assert_eq!(asg.capacity_rebalance(), Some(false));
    let mixed = asg
        .mixed_instances_policy()
        .expect("a mixed instances policy");
    let distribution = mixed.instances_distribution().expect("a distribution");
    assert_eq!(
        distribution.spot_allocation_strategy(),
        Some("price-capacity-optimized")
    );
    assert_eq!(distribution.on_demand_base_capacity(), Some(0));
    assert_eq!(
        distribution.on_demand_percentage_above_base_capacity(),
        Some(0)
    );
    let template = mixed.launch_template().expect("a launch template");
    let types: Vec<&str> = template
        .overrides()
        .iter()
        .filter_map(|o| o.instance_type())
        .collect();
    assert_eq!(types, TYPES);
    assert_eq!(
        template
            .launch_template_specification()
            .and_then(|s| s.launch_template_id()),
        Some(output(&outputs, "LaunchTemplateId"))
    );

    // Agents take no connections; the coordinator takes the link's UDP
    // port from the agents' group only.
    let agents_sg = output(&outputs, "AgentSecurityGroupId");
    let sgs = group
        .ec2
        .describe_security_groups()
        .group_ids(agents_sg)
        .group_ids(output(&outputs, "CoordinatorSecurityGroupId"))
        .send()
        .await
        .unwrap();
    for sg in sgs.security_groups() {
        let rules: Vec<_> = sg
            .ip_permissions()
            .iter()
            .map(|p| {
                (
                    p.ip_protocol().unwrap_or_default().to_owned(),
                    p.from_port(),
                    p.to_port(),
                    p.user_id_group_pairs()
                        .iter()
                        .filter_map(|g| g.group_id().map(str::to_owned))
                        .collect::<Vec<_>>(),
                    p.ip_ranges().len(),
                )
            })
            .collect();
        if sg.group_id() == Some(agents_sg) {
            assert!(rules.is_empty(), "agents take no connections: {rules:?}");
        } else {
            assert_eq!(
                rules,
                [(
                    "udp".to_owned(),
                    Some(7443),
                    Some(7443),
                    vec![agents_sg.to_owned()],
                    0
                )]
            );
        }
    }

    // The coordinator sizes that group.
    let h = AwsHarness::start_on(
        moto,
        group,
        AwsOptions {
            max_instances: 2,
            idle_time: Duration::from_secs(1),
            aws_iid: true,
            ..AwsOptions::default()
        },
    )
    .await
    .unwrap();
    let id = h
        .standin
        .push_job(JobSpec::new("on-the-stack").script(["echo hello from the stack"]))
        .await
        .unwrap();
    let (desired, instances) = h
        .group
        .wait_for("an instance", TIMEOUT, |d, i| d == 1 && !i.is_empty())
        .await
        .unwrap();
    assert_eq!(desired, 1, "the held job raised the desired capacity");
    assert!(
        instances[0].protected,
        "the instance is protected from scale-in from its launch: {instances:?}"
    );
    let r = h.wait_final(id, TIMEOUT).await.unwrap();
    assert_eq!(r.state, JobState::Success, "{}", r.trace_text());
    assert!(r.trace_text().contains("hello from the stack"));
    // Idle: terminated by the coordinator, the group back to nothing.
    h.group
        .wait_for("scale-in to zero", TIMEOUT, |d, i| d == 0 && i.is_empty())
        .await
        .unwrap();
    assert_eq!(
        h.group.ec2_state(&instances[0].id).await.unwrap(),
        "terminated"
    );
}
