//! The deployable stack, `deploy/servitor.yaml`, against what it serves:
//! its IAM policies are the plain documents in `deploy/iam/` and allow
//! every AWS call the coordinator makes, its user-data is
//! `packer/user-data.sh` and writes a configuration the agent loads, and
//! cfn-lint and checkov find nothing in it. `stack.rs` creates it in moto.
//!
//! The template is read with its CloudFormation tags kept, and the few
//! intrinsic functions it uses are evaluated here for given parameters, as
//! CloudFormation would.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;
use servitor_agent::config::{AgentConfig, EnrollMethod, ExecutorKind};

const REGION: &str = "eu-west-1";
const ACCOUNT_ID: &str = "123456789012";
const PIN: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn root() -> PathBuf {
    servitor_tests::workspace_root()
}

fn read(path: &str) -> String {
    let path = root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn template() -> Yaml {
    serde_yaml::from_str(&read("deploy/servitor.yaml")).expect("deploy/servitor.yaml is YAML")
}

/// The template with parameter values: evaluates `Ref`, `Fn::Sub`,
/// `Fn::If` and the other functions the template uses. A resource's `Ref`
/// or attribute evaluates to `"<Ref Name>"` or `"<Name.Attribute>"`.
struct Evaluated {
    template: Yaml,
    params: HashMap<String, Json>,
}

impl Evaluated {
    /// `given` over the parameters' defaults, and over values for the
    /// parameters with none.
    fn new(template: Yaml, given: &[(&str, &str)]) -> Self {
        let required = [
            ("AgentImageId", "ami-0123456789abcdef0"),
            ("VpcId", "vpc-0123456789abcdef0"),
            (
                "SubnetIds",
                "subnet-0123456789abcdef0,subnet-0123456789abcdef1",
            ),
            ("CoordinatorAddress", "10.0.0.10"),
            ("CoordinatorCaSha256", PIN),
        ];
        let given: Vec<(&str, &str)> = given.iter().chain(&required).copied().collect();
        let mut params = HashMap::new();
        let declared = template["Parameters"]
            .as_mapping()
            .expect("the template has parameters");
        for (name, spec) in declared {
            let name = name.as_str().expect("parameter names are strings");
            let value = given
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
                .or_else(|| match &spec["Default"] {
                    Yaml::String(s) => Some(s.clone()),
                    Yaml::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("no value for parameter {name}"));
            let kind = spec["Type"].as_str().unwrap_or_default();
            let value = if kind == "CommaDelimitedList" || kind.starts_with("List<") {
                Json::Array(value.split(',').map(|s| Json::from(s.trim())).collect())
            } else {
                Json::from(value)
            };
            params.insert(name.to_owned(), value);
        }
        for (name, _) in &given {
            assert!(params.contains_key(*name), "no parameter {name}");
        }
        Self { template, params }
    }

    /// A resource's properties, evaluated.
    fn properties(&self, resource: &str) -> Json {
        let yaml = self.template["Resources"][resource]["Properties"].clone();
        assert!(!yaml.is_null(), "no resource {resource}");
        self.eval(&yaml).unwrap_or(Json::Null)
    }

    fn condition(&self, name: &str) -> bool {
        let yaml = &self.template["Conditions"][name];
        assert!(!yaml.is_null(), "no condition {name}");
        self.eval(yaml)
            .and_then(|v| v.as_bool())
            .unwrap_or_else(|| panic!("condition {name} is not a boolean"))
    }

    fn reference(&self, name: &str) -> Option<Json> {
        match name {
            "AWS::NoValue" => None,
            "AWS::Partition" => Some(Json::from("aws")),
            "AWS::Region" => Some(Json::from(REGION)),
            "AWS::AccountId" => Some(Json::from(ACCOUNT_ID)),
            "AWS::StackName" => Some(Json::from("servitor")),
            _ => Some(
                self.params
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| Json::from(format!("<Ref {name}>"))),
            ),
        }
    }

    fn sub(&self, text: &str, vars: &HashMap<String, Json>) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let end = rest[start..]
                .find('}')
                .map(|e| start + e)
                .expect("every ${ in a Sub is closed");
            let name = &rest[start + 2..end];
            if let Some(literal) = name.strip_prefix('!') {
                out.push_str(&format!("${{{literal}}}"));
            } else {
                let value = vars
                    .get(name)
                    .cloned()
                    .or_else(|| {
                        if name.contains('.') && !name.starts_with("AWS::") {
                            Some(Json::from(format!("<{name}>")))
                        } else {
                            self.reference(name)
                        }
                    })
                    .unwrap_or_else(|| panic!("Sub of ${{{name}}}"));
                match value {
                    Json::String(s) => out.push_str(&s),
                    other => out.push_str(&other.to_string()),
                }
            }
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        out
    }

    fn function(&self, name: &str, arg: &Yaml) -> Option<Json> {
        let list = || {
            arg.as_sequence()
                .unwrap_or_else(|| panic!("{name} takes a list"))
        };
        let string = |v: &Yaml| -> String {
            match self.eval(v) {
                Some(Json::String(s)) => s,
                other => panic!("{name} wants a string, got {other:?}"),
            }
        };
        match name {
            "Ref" => self.reference(arg.as_str().expect("Ref takes a name")),
            "GetAtt" => {
                let target = match arg {
                    Yaml::String(s) => s.clone(),
                    _ => list()
                        .iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join("."),
                };
                Some(Json::from(format!("<{target}>")))
            }
            "Sub" => match arg {
                Yaml::String(s) => Some(Json::from(self.sub(s, &HashMap::new()))),
                _ => {
                    let [text, vars] = list().as_slice() else {
                        panic!("Sub takes a string or [string, variables]")
                    };
                    let vars = vars
                        .as_mapping()
                        .expect("Sub's variables are a mapping")
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().expect("variable names").to_owned(),
                                self.eval(v).expect("a variable has a value"),
                            )
                        })
                        .collect();
                    Some(Json::from(
                        self.sub(text.as_str().expect("Sub's text is a string"), &vars),
                    ))
                }
            },
            "If" => {
                let [condition, yes, no] = list().as_slice() else {
                    panic!("If takes three arguments")
                };
                if self.condition(condition.as_str().expect("a condition name")) {
                    self.eval(yes)
                } else {
                    self.eval(no)
                }
            }
            "Equals" => {
                let [a, b] = list().as_slice() else {
                    panic!("Equals takes two arguments")
                };
                Some(Json::Bool(self.eval(a) == self.eval(b)))
            }
            "Not" => {
                let value = self.eval(&list()[0]).and_then(|v| v.as_bool());
                Some(Json::Bool(!value.expect("Not takes a condition")))
            }
            "Join" => {
                let [separator, items] = list().as_slice() else {
                    panic!("Join takes two arguments")
                };
                let items = match self.eval(items) {
                    Some(Json::Array(items)) => items,
                    other => panic!("Join of {other:?}"),
                };
                let items: Vec<String> = items
                    .into_iter()
                    .map(|v| v.as_str().expect("Join of strings").to_owned())
                    .collect();
                Some(Json::from(
                    items.join(separator.as_str().unwrap_or_default()),
                ))
            }
            "Split" => {
                let [separator, text] = list().as_slice() else {
                    panic!("Split takes two arguments")
                };
                let separator = string(separator);
                Some(Json::Array(
                    string(text).split(&separator).map(Json::from).collect(),
                ))
            }
            "Select" => {
                let [index, items] = list().as_slice() else {
                    panic!("Select takes two arguments")
                };
                let index: usize = match self.eval(index) {
                    Some(Json::Number(n)) => n.as_u64().map(|n| n as usize),
                    Some(Json::String(s)) => s.parse().ok(),
                    _ => None,
                }
                .expect("Select's index is a number");
                match self.eval(items) {
                    Some(Json::Array(items)) => items.get(index).cloned(),
                    other => panic!("Select from {other:?}"),
                }
            }
            // The text itself, which is what the tests look at.
            "Base64" => self.eval(arg),
            other => panic!("the template uses Fn::{other}, which this test does not evaluate"),
        }
    }

    /// `None` is `AWS::NoValue`: dropped from lists and mappings.
    fn eval(&self, yaml: &Yaml) -> Option<Json> {
        match yaml {
            Yaml::Null => Some(Json::Null),
            Yaml::Bool(b) => Some(Json::Bool(*b)),
            Yaml::Number(n) => Some(serde_json::to_value(n).expect("a YAML number is JSON")),
            Yaml::String(s) => Some(Json::from(s.as_str())),
            Yaml::Sequence(items) => Some(Json::Array(
                items.iter().filter_map(|v| self.eval(v)).collect(),
            )),
            Yaml::Tagged(tagged) => {
                let tag = tagged.tag.to_string();
                self.function(tag.trim_start_matches('!'), &tagged.value)
            }
            Yaml::Mapping(map) => {
                if map.len() == 1 {
                    if let Some((Yaml::String(key), arg)) = map.iter().next() {
                        if key == "Ref" {
                            return self.function("Ref", arg);
                        }
                        if let Some(name) = key.strip_prefix("Fn::") {
                            return self.function(name, arg);
                        }
                    }
                }
                let mut out = serde_json::Map::new();
                for (k, v) in map {
                    let key = k.as_str().expect("mapping keys are strings").to_owned();
                    if let Some(v) = self.eval(v) {
                        out.insert(key, v);
                    }
                }
                Some(Json::Object(out))
            }
        }
    }
}

/// A plain policy document with its placeholders filled in.
fn plain_policy(name: &str, fill: &[(&str, &str)]) -> Json {
    let mut text = read(&format!("deploy/iam/{name}"));
    for (placeholder, value) in fill {
        text = text.replace(placeholder, value);
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("deploy/iam/{name}: {e}"))
}

#[test]
fn the_plain_policy_documents_are_the_stacks() {
    let stack = Evaluated::new(
        template(),
        &[
            ("GroupName", "ci-agents"),
            ("CacheBucket", "example-ci-cache"),
            ("CachePath", "gitlab-runner"),
        ],
    );
    let fill = [
        ("REGION", REGION),
        ("ACCOUNT_ID", ACCOUNT_ID),
        ("GROUP_NAME", "ci-agents"),
        ("CACHE_BUCKET", "example-ci-cache"),
        ("CACHE_PATH", "gitlab-runner"),
    ];
    assert_eq!(
        stack.properties("CoordinatorFleetPolicy")["PolicyDocument"],
        plain_policy("coordinator-policy.json", &fill),
        "deploy/iam/coordinator-policy.json and the template's CoordinatorFleetPolicy differ"
    );
    assert!(stack.condition("HasCache"));
    assert_eq!(
        stack.properties("CoordinatorCachePolicy")["PolicyDocument"],
        plain_policy("coordinator-cache-policy.json", &fill),
        "deploy/iam/coordinator-cache-policy.json and the template's CoordinatorCachePolicy differ"
    );
    assert_eq!(
        stack.properties("CoordinatorRole")["AssumeRolePolicyDocument"],
        plain_policy("coordinator-trust-policy.json", &[]),
        "deploy/iam/coordinator-trust-policy.json and the template's CoordinatorRole differ"
    );
    for policy in ["CoordinatorFleetPolicy", "CoordinatorCachePolicy"] {
        assert_eq!(
            stack.properties(policy)["Roles"],
            serde_json::json!(["<Ref CoordinatorRole>"]),
            "{policy} belongs to the coordinator's role"
        );
    }

    // With no cache.path the objects sit at the bucket's top level, and the
    // README says to leave "CACHE_PATH/" out.
    let stack = Evaluated::new(template(), &[("CacheBucket", "example-ci-cache")]);
    let mut fill = fill.to_vec();
    fill.insert(0, ("CACHE_PATH/", ""));
    assert_eq!(
        stack.properties("CoordinatorCachePolicy")["PolicyDocument"],
        plain_policy("coordinator-cache-policy.json", &fill)
    );
    // No bucket, no cache policy.
    let stack = Evaluated::new(template(), &[]);
    assert!(!stack.condition("HasCache"));
    assert_eq!(
        template()["Resources"]["CoordinatorCachePolicy"]["Condition"],
        Yaml::from("HasCache")
    );
}

/// Every coordinator call names its operation for its error
/// (`aws_error("SetDesiredCapacity", ...)`); each must be in the policy,
/// and the policy must allow nothing else of Auto Scaling or EC2.
#[test]
fn the_policy_allows_exactly_the_calls_the_coordinator_makes() {
    let called = calls_named_by("aws_error(");
    assert!(
        called.contains("SetDesiredCapacity") && called.len() >= 5,
        "the scan found the coordinator's calls: {called:?}"
    );
    let policy = plain_policy("coordinator-policy.json", &[]);
    let allowed: BTreeSet<String> = policy["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .flat_map(|s| s["Action"].as_array().cloned().unwrap_or_default())
        .map(|a| a.as_str().expect("actions are strings").to_owned())
        .collect();
    let allowed_names: BTreeSet<String> = allowed
        .iter()
        .map(|a| {
            let (service, name) = a.split_once(':').expect("service:Action");
            assert!(
                service == "autoscaling" || service == "ec2",
                "unexpected service in {a}"
            );
            name.to_owned()
        })
        .collect();
    assert_eq!(
        called, allowed_names,
        "coordinator calls (left) and deploy/iam/coordinator-policy.json (right) differ"
    );
}

/// The Fargate runner's policy allows exactly the ECS calls it makes (and
/// the tagging and role passing those calls need), on its cluster only.
#[test]
fn the_fargate_policy_allows_exactly_the_calls_the_fargate_runner_makes() {
    let mut called: BTreeSet<String> = calls_named_by("ecs_error(")
        .into_iter()
        .map(|name| format!("ecs:{name}"))
        .collect();
    assert!(
        called.contains("ecs:RunTask") && called.len() >= 5,
        "the scan found the Fargate runner's calls: {called:?}"
    );
    // Tags go on at RunTask and RegisterTaskDefinition; roles are passed
    // to the task definitions.
    called.insert("ecs:TagResource".to_owned());
    called.insert("iam:PassRole".to_owned());
    let policy = plain_policy(
        "coordinator-fargate-policy.json",
        &[("REGION", REGION), ("ACCOUNT_ID", ACCOUNT_ID)],
    );
    let statements = policy["Statement"].as_array().expect("statements");
    let allowed: BTreeSet<String> = statements
        .iter()
        .flat_map(|s| s["Action"].as_array().cloned().unwrap_or_default())
        .map(|a| a.as_str().expect("actions are strings").to_owned())
        .collect();
    assert_eq!(
        called, allowed,
        "Fargate runner calls (left) and deploy/iam/coordinator-fargate-policy.json (right) differ"
    );
    for statement in statements {
        let actions = statement["Action"].to_string();
        let scoped = statement["Condition"].is_object()
            || statement["Resource"].as_str().is_some_and(|r| r != "*");
        assert!(
            scoped || actions.contains("RegisterTaskDefinition"),
            "{actions} is allowed on any resource without a condition"
        );
    }
}

/// The AWS calls the coordinator's source names to `mapper` (its error
/// mapping, called with the operation's name first).
fn calls_named_by(mapper: &str) -> BTreeSet<String> {
    let mut called = BTreeSet::new();
    for entry in walk(&root().join("coordinator/src")) {
        let text = std::fs::read_to_string(&entry).expect("reading coordinator source");
        for (at, _) in text.match_indices(mapper) {
            let rest = text[at + mapper.len()..].trim_start();
            if let Some(rest) = rest.strip_prefix('"') {
                let name = &rest[..rest.find('"').expect("a closed string")];
                called.insert(name.to_owned());
            }
        }
    }
    called
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("reading a source directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

#[test]
fn the_stack_user_data_is_packer_user_data_and_writes_a_config_the_agent_loads() {
    let stack = Evaluated::new(
        template(),
        &[
            ("CoordinatorAddress", "coordinator.internal"),
            ("CoordinatorPort", "7443"),
            ("CoordinatorCaSha256", PIN),
            ("CapacityPerInstance", "2"),
        ],
    );
    let data = stack.properties("AgentLaunchTemplate")["LaunchTemplateData"].clone();
    let user_data = data["UserData"]
        .as_str()
        .expect("the launch template has user-data")
        .to_owned();
    let script = read("packer/user-data.sh");
    let header = user_data
        .strip_suffix(&script)
        .expect("the template's user-data ends with packer/user-data.sh as it is");
    assert!(header.starts_with("#!/bin/bash\n"), "{header}");
    assert!(!header.contains("JOIN_TOKEN"), "no token in user-data");
    assert!(header.contains("export ENROLL=aws-iid\n"), "{header}");
    assert!(
        data.get("IamInstanceProfile").is_none(),
        "instances need no role"
    );

    let etc = tempfile::tempdir().expect("creating a temporary directory");
    let file = etc.path().join("user-data");
    std::fs::write(&file, &user_data).expect("writing user-data");
    let output = servitor_tests::run_user_data(&file, etc.path(), &[]);
    assert!(
        output.status.success(),
        "user-data failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let config = AgentConfig::load(&etc.path().join("agent.toml"))
        .unwrap_or_else(|e| panic!("the stack's user-data wrote a config the agent rejects: {e}"));
    assert_eq!(config.coordinator, "coordinator.internal:7443");
    assert_eq!(config.ca_sha256.as_deref(), Some(PIN));
    assert_eq!(config.enroll, EnrollMethod::AwsIid);
    assert_eq!(config.capacity, 2);
    assert_eq!(config.runner, "", "RunnerName is empty by default");
    assert_eq!(config.executor.kind, ExecutorKind::Docker);
    assert_eq!(
        config.executor.default_image.as_deref(),
        Some("debian:bookworm-slim")
    );
    assert!(!etc.path().join("join-token").exists());

    // A stack for one runner's group of a coordinator with several.
    let stack = Evaluated::new(
        template(),
        &[
            ("CoordinatorAddress", "coordinator.internal"),
            ("CoordinatorCaSha256", PIN),
            ("RunnerName", "build"),
            ("Privileged", "true"),
        ],
    );
    let user_data = stack.properties("AgentLaunchTemplate")["LaunchTemplateData"]["UserData"]
        .as_str()
        .expect("the launch template has user-data")
        .to_owned();
    let etc = tempfile::tempdir().expect("creating a temporary directory");
    let file = etc.path().join("user-data");
    std::fs::write(&file, &user_data).expect("writing user-data");
    let output = servitor_tests::run_user_data(&file, etc.path(), &[]);
    assert!(output.status.success(), "user-data failed: {output:?}");
    let config = AgentConfig::load(&etc.path().join("agent.toml")).expect("the agent's config");
    assert_eq!(config.runner, "build");
    assert!(config.executor.privileged);
}

#[test]
fn the_instance_types_list_becomes_the_groups_overrides() {
    for types in ["m5.large", "m6i.large,m6a.large,m5.large"] {
        let stack = Evaluated::new(template(), &[("InstanceTypes", types)]);
        let group = stack.properties("AgentGroup");
        let overrides: Vec<&str> = group["MixedInstancesPolicy"]["LaunchTemplate"]["Overrides"]
            .as_array()
            .expect("overrides")
            .iter()
            .map(|o| o["InstanceType"].as_str().expect("an instance type"))
            .collect();
        assert_eq!(overrides.join(","), types);
    }
}

/// A linter from `tests/run.sh`'s virtual environment (named by `var`), or
/// on the PATH.
fn linter(var: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(var) {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is missing: this test needs it; tests/run.sh installs it in a virtual environment and sets {var}")
        })
}

fn run_linter(mut command: Command, what: &str) -> String {
    let output = command
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{what} found problems in deploy/servitor.yaml (exit {:?}):\n{text}",
        output.status.code()
    );
    text
}

#[test]
fn cfn_lint_finds_nothing_in_the_stack() {
    let mut command = Command::new(linter("SERVITOR_CFN_LINT", "cfn-lint"));
    command.arg("deploy/servitor.yaml");
    run_linter(command, "cfn-lint");
}

/// Checks that do not apply are skipped in the resource's
/// `Metadata: checkov: skip:` list, each with its reason.
#[test]
fn checkov_finds_nothing_in_the_stack() {
    let mut command = Command::new(linter("SERVITOR_CHECKOV", "checkov"));
    command.args([
        "--framework",
        "cloudformation",
        "--file",
        "deploy/servitor.yaml",
        "--compact",
        // Only the failed checks, and the counts.
        "--quiet",
        // Offline: no guideline links or severities from the vendor's API.
        "--skip-download",
    ]);
    let text = run_linter(command, "checkov");
    assert!(
        text.contains("Failed checks: 0") && !text.contains("Passed checks: 0,"),
        "checkov ran its checks and none failed:\n{text}"
    );
}
