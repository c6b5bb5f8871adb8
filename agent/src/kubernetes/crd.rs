//! The `CanaryRelease` custom resource. Its matchers are the file format's own type, so the
//! OpenAPI schema the API server enforces and the checker's rules come from the same structs.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    config::Matcher,
    rollout::{Rollout, RolloutStatus},
};

/// A canary release: the requests it takes (all matchers must hold) and, per service, the
/// version that serves them. The release is `metadata.name`; a target names a Service of the
/// release's namespace (`restaurant`) or of another one (`restaurant.other-namespace`), and a
/// version is the value of the pods' version label (`version` unless configured otherwise).
// Clippy takes the repeated `printcolumn(type_ = ...)` arguments for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "steer.dev",
    version = "v1alpha1",
    kind = "CanaryRelease",
    namespaced,
    status = "CanaryReleaseStatus",
    derive = "PartialEq",
    shortname = "canary",
    category = "steer",
    doc = "A canary release across a chain of services: the requests it takes and the version of each service that serves them.",
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(name = "Match", type_ = "string", json_path = ".status.matchSummary"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(
        name = "Rollout",
        type_ = "string",
        json_path = ".status.rollout.phase"
    ),
    printcolumn(name = "Step", type_ = "integer", json_path = ".status.rollout.step"),
    printcolumn(
        name = "Percent",
        type_ = "number",
        json_path = ".status.rollout.percent"
    ),
    printcolumn(
        name = "Analysis",
        type_ = "string",
        json_path = ".status.rollout.lastAnalysis.outcome"
    ),
    printcolumn(
        name = "Next Analysis",
        type_ = "date",
        json_path = ".status.rollout.nextAnalysisAt"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
// The rollout rules mirror `rollout::spec::validate`, so the API server refuses what the
// checker would.
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.rollout) || has(self.percent) == has(self.hashBy)",
    "message": "percent and hashBy go together: hashBy names the header that keeps a user on one side"
}, {
    "rule": "!has(self.rollout) || !has(self.percent)",
    "message": "percent and rollout exclude each other: the rollout sets the percent of each step"
}, {
    "rule": "!has(self.rollout) || has(self.hashBy)",
    "message": "a rollout needs hashBy, the header that keeps each user on one side of every step (e.g. x-user-id)"
}]))]
pub struct CanaryReleaseSpec {
    /// Smaller number = higher priority: priority 1 beats priority 2.
    pub priority: u32,
    /// All must hold for a request to belong to this release.
    #[serde(rename = "match")]
    #[schemars(length(min = 1, max = 32))]
    pub matchers: Vec<Matcher>,
    /// Optional share of the matching users, 0 < percent <= 100; needs `hashBy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minimum" = 0, "exclusiveMinimum" = true, "maximum" = 100))]
    pub percent: Option<f64>,
    /// The header whose value keeps a user on the same side of `percent` (e.g. `x-user-id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_by: Option<String>,
    /// Service -> the version of that service that belongs to this release.
    #[serde(default)]
    pub targets: BTreeMap<String, String>,
    /// Grow the release step by step on its own health (instead of `percent`; needs
    /// `hashBy`). Where it stands is in `status.rollout`; a rolled-back rollout starts over
    /// when the annotation `steer.dev/rollout-resume` gets a new value, a step's analysis
    /// runs at once when `steer.dev/rollout-continue` gets one, and the rollout stops when
    /// `steer.dev/rollout-abort` gets one (the reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

/// What the agents made of a release, written by one agent (the leader).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryReleaseStatus {
    /// The `metadata.generation` these verdicts are about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// One word for `kubectl get`: Accepted, Shadowed, Conflict or Invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The matchers in one line, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_summary: Option<String>,
    /// `Accepted`, `Shadowed` (naming the shadowing release) and `Conflict` (naming the
    /// conflicting release and why).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Where the rollout stands (written by the agent that runs the analyses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// The value of the annotation `steer.dev/rollout-resume` the rollout last took notice
    /// of: a different value resumes a rolled-back rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_resume: Option<String>,
    /// The value of the annotation `steer.dev/rollout-continue` the rollout last took notice
    /// of: a different value ends the wait of a progressing step (its analysis runs then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_continue: Option<String>,
    /// The value of the annotation `steer.dev/rollout-abort` (the reason) the rollout last
    /// took notice of: a different value stops the rollout (its release takes no traffic
    /// until resumed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_abort: Option<String>,
}

impl CanaryReleaseStatus {
    /// The part the verdict writer owns: without what the rollout driver writes.
    pub fn verdicts_only(&self) -> CanaryReleaseStatus {
        CanaryReleaseStatus {
            rollout: None,
            rollout_resume: None,
            rollout_continue: None,
            rollout_abort: None,
            ..self.clone()
        }
    }
}

/// The CRD as YAML: what `steer crd` prints and `deploy/crd.yaml` holds.
pub fn crd_yaml() -> String {
    let crd = serde_yaml_ng::to_string(&CanaryRelease::crd()).expect("the CRD serialises");
    format!("# Generated by `steer crd`: edit the Rust types, not this file.\n{crd}")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::{Value, json};

    use super::*;

    fn deploy(file: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn deploy_crd_yaml_is_the_output_of_steer_crd() {
        assert!(
            deploy("crd.yaml") == crd_yaml(),
            "deploy/crd.yaml is stale: run `cargo run -p steer -- crd > deploy/crd.yaml`"
        );
    }

    /// The schema the API server enforces on `spec`, as JSON Schema (OpenAPI v3.0's schema
    /// object is draft 4 with extensions, which validators ignore).
    fn spec_validator() -> jsonschema::Validator {
        let crd = serde_json::to_value(CanaryRelease::crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .build(schema)
            .expect("the spec schema compiles")
    }

    fn resources(file: &str) -> Vec<Value> {
        serde_yaml_ng::Deserializer::from_str(&deploy(file))
            .map(|doc| Value::deserialize(doc).unwrap())
            .filter(|doc| doc["kind"] == "CanaryRelease")
            .collect()
    }

    #[test]
    fn the_schema_accepts_the_examples() {
        let validator = spec_validator();
        let releases = resources("examples/k8s/food-delivery.yaml");
        assert_eq!(releases.len(), 3, "red, blue and green");
        for release in releases {
            let errors: Vec<String> = validator
                .iter_errors(&release["spec"])
                .map(|e| e.to_string())
                .collect();
            assert!(
                errors.is_empty(),
                "{}: {errors:?}",
                release["metadata"]["name"]
            );
            // And the agent reads them.
            serde_json::from_value::<CanaryRelease>(release).unwrap();
        }
    }

    #[test]
    fn the_kubernetes_example_has_the_seed_examples_releases() {
        let file = crate::config::Config::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/food-delivery.yaml"),
        )
        .unwrap();
        for resource in resources("examples/k8s/food-delivery.yaml") {
            let release: CanaryRelease = serde_json::from_value(resource).unwrap();
            let name = release.metadata.name.as_deref().unwrap();
            let twin = file.releases.iter().find(|r| r.name == name).unwrap();
            assert_eq!(
                (
                    release.spec.priority,
                    &release.spec.matchers,
                    &release.spec.targets
                ),
                (twin.priority, &twin.matchers, &twin.targets),
                "{name}"
            );
        }
    }

    #[test]
    fn the_schema_rejects_bad_specs() {
        let validator = spec_validator();
        let good = json!({
            "priority": 1,
            "match": [{"header": "x-device", "exact": "android"}],
            "targets": {"restaurant": "v2"}
        });
        assert!(validator.is_valid(&good));
        let mut cases = vec![];
        let mut without_priority = good.clone();
        without_priority.as_object_mut().unwrap().remove("priority");
        cases.push(("missing priority", without_priority));
        cases.push((
            "negative priority",
            json!({"priority": -1, "match": good["match"]}),
        ));
        cases.push(("no matchers", json!({"priority": 1, "match": []})));
        cases.push((
            "matcher without header",
            json!({"priority": 1, "match": [{"exact": "android"}]}),
        ));
        cases.push((
            "percent above 100",
            json!({"priority": 1, "match": good["match"], "percent": 150, "hashBy": "x-user-id"}),
        ));
        cases.push((
            "percent zero",
            json!({"priority": 1, "match": good["match"], "percent": 0, "hashBy": "x-user-id"}),
        ));
        cases.push((
            "rollout without steps",
            json!({"priority": 1, "match": good["match"], "hashBy": "x-user-id",
                   "rollout": {"interval": "1m"}}),
        ));
        cases.push((
            "error rate not a percentage",
            json!({"priority": 1, "match": good["match"], "hashBy": "x-user-id",
                   "rollout": {"steps": [5], "interval": "1m", "analysis": {"maxErrorRate": "1"}}}),
        ));
        cases.push((
            "target version not a string",
            json!({"priority": 1, "match": good["match"], "targets": {"restaurant": 2}}),
        ));
        for (what, spec) in cases {
            assert!(!validator.is_valid(&spec), "{what} was accepted: {spec}");
        }
    }

    /// The CEL rules of the CRD, evaluated as the API server does on create and update.
    fn cel_errors(spec: Value) -> Vec<String> {
        let crd = serde_json::to_value(CanaryRelease::crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        match kube_cel::Validator::new().validate(schema, &json!({"spec": spec}), None) {
            Ok(()) => vec![],
            Err(errors) => errors.iter().map(|e| e.message.clone()).collect(),
        }
    }

    #[test]
    fn the_crds_rules_reject_what_the_schema_cannot_say() {
        let matcher = |m: Value| json!({"priority": 1, "match": [m]});
        assert_eq!(
            cel_errors(matcher(json!({"header": "x", "exact": "a"}))),
            Vec::<String>::new()
        );
        assert_eq!(
            cel_errors(matcher(json!({"header": "x", "regex": "android|ios"}))),
            Vec::<String>::new()
        );
        // A rollout with hashBy and without percent: the rollout sets the percent.
        let rolling = json!({"priority": 1, "match": [{"header": "x", "exact": "a"}],
                             "hashBy": "x-user-id",
                             "rollout": {"steps": [1, 5, 10, 25, 50, 100], "interval": "2m",
                                         "analysis": {"minRequests": 100, "maxErrorRate": "1%",
                                                      "maxLatencyP99Ratio": 1.5},
                                         "onSuccess": "hold"}});
        assert_eq!(cel_errors(rolling.clone()), Vec::<String>::new());
        assert!(spec_validator().is_valid(&rolling));
        let spec: CanaryReleaseSpec = serde_json::from_value(rolling).unwrap();
        assert_eq!(spec.rollout.unwrap().steps.len(), 6);
        let cases = [
            (
                matcher(json!({"header": "x", "regex": "(unclosed"})),
                "not a valid regex",
            ),
            (
                matcher(json!({"header": "x", "exact": "a", "prefix": "b"})),
                "exactly one of exact, prefix, regex",
            ),
            (
                matcher(json!({"header": "x"})),
                "exactly one of exact, prefix, regex",
            ),
            (
                json!({"priority": 1, "match": [{"header": "x", "exact": "a"}], "percent": 10}),
                "percent and hashBy go together",
            ),
            (
                json!({"priority": 1, "match": [{"header": "x", "exact": "a"}],
                       "rollout": {"steps": [5, 100], "interval": "1m"}}),
                "a rollout needs hashBy",
            ),
            (
                json!({"priority": 1, "match": [{"header": "x", "exact": "a"}],
                       "percent": 10, "hashBy": "x-user-id",
                       "rollout": {"steps": [5, 100], "interval": "1m"}}),
                "percent and rollout exclude each other",
            ),
        ];
        for (spec, reason) in cases {
            let errors = cel_errors(spec.clone());
            assert!(
                errors.iter().any(|e| e.contains(reason)),
                "{spec}: expected `{reason}`, got {errors:?}"
            );
        }
    }

    #[test]
    fn the_crd_has_a_status_subresource_and_printer_columns() {
        let crd = CanaryRelease::crd();
        let version = &crd.spec.versions[0];
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            [
                "Priority",
                "Match",
                "State",
                "Rollout",
                "Step",
                "Percent",
                "Analysis",
                "Next Analysis",
                "Age"
            ]
        );
    }
}
