//! Rollouts on Kubernetes. Every agent routes a rolling release at the step its CanaryRelease's
//! status holds (`in_force`); the agent holding the status writer's Lease drives them
//! (`drive`): it runs each due analysis over Prometheus, writes the next step into the status,
//! resumes a rolled-back rollout when its annotation changes, and promotes one that succeeded
//! by switching its Services' primary version. The state is the status alone, so a new writer
//! continues where the last one stopped.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Service;
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    STATUS_WRITES_PER_SECOND,
    cache::Cache,
    crd::CanaryRelease,
    prometheus::Prometheus,
    translate::{PRIMARY_ANNOTATION, key_of},
};
use crate::{
    check::Report,
    config::{Config, Release},
    rollout::{
        self, Book, OnSuccess, Phase, Rollout, RolloutStatus, analysis::judge, driver::Rollouts,
        local::Subject,
    },
};

/// A new value resumes a rolled-back rollout from its first step (the value last acted on is
/// `status.rolloutResume`).
pub const RESUME_ANNOTATION: &str = "steer.dev/rollout-resume";
/// A new value ends the wait of a progressing step: its analysis runs at once, over the step
/// so far (the value last acted on is `status.rolloutContinue`).
pub const CONTINUE_ANNOTATION: &str = "steer.dev/rollout-continue";
/// A new value (the reason) stops the rollout: its release takes no traffic until resumed
/// (the value last acted on is `status.rolloutAbort`).
pub const ABORT_ANNOTATION: &str = "steer.dev/rollout-abort";
/// How often the writer looks for due analyses: well within the shortest sensible interval.
const TICK: Duration = Duration::from_millis(500);

/// The rollout statuses the CanaryReleases hold, by release.
pub fn stored<'a>(releases: impl IntoIterator<Item = &'a CanaryRelease>) -> Book {
    releases
        .into_iter()
        .filter_map(|release| {
            let status = release.status.as_ref()?.rollout.clone()?;
            Some((key_of(release), status))
        })
        .collect()
}

/// The part of each status routing depends on (which rollout, its phase and share): a status
/// write that changes only the message, the figures or the times rebuilds nothing.
pub fn routing(stored: &Book) -> Book {
    stored
        .iter()
        .map(|(name, status)| {
            let status = RolloutStatus {
                step_started_at: jiff::Timestamp::UNIX_EPOCH,
                next_analysis_at: None,
                last_analysis: None,
                message: String::new(),
                ..status.clone()
            };
            (name.clone(), status)
        })
        .collect()
}

/// What the rules see of a translated configuration (checked): each rolling release at the
/// step its status holds (`stored`, or its `routing` part), a new or changed one at its first
/// step, a rolled-back or promoted one left out. Hands the configuration to the driver.
pub fn in_force(
    config: Config,
    report: Report,
    stored: &Book,
    source: &watch::Sender<Option<Arc<Config>>>,
) -> (Config, Report) {
    if !config.releases.iter().any(|r| r.rollout.is_some()) {
        source.send_replace(None);
        return (config, report);
    }
    let book = rollout::reconcile(&config, stored, jiff::Timestamp::now());
    let effective = rollout::effective(&config, &book);
    source.send_replace(Some(Arc::new(config)));
    // The source's report is every step's (`Rollouts::apply_source` says why).
    (effective, report)
}

/// What the admin page was last shown: the configuration `in_force` handed on and the stored
/// statuses.
#[derive(Default)]
pub struct Page {
    shown: Option<(Option<Arc<Config>>, Book)>,
}

impl Page {
    /// Shows the rollouts of `source` where the `stored` statuses have them, unless that is
    /// what the page shows already (most events change neither).
    pub fn show(&mut self, rollouts: &Rollouts, source: Option<Arc<Config>>, stored: Book) {
        if let Some((shown_source, shown_stored)) = &self.shown {
            let same_source = match (shown_source, &source) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if same_source && *shown_stored == stored {
                return;
            }
        }
        match &source {
            Some(config) => {
                let book = rollout::reconcile(config, &stored, jiff::Timestamp::now());
                rollouts.show(Config::clone(config), book);
            }
            None => rollouts.show(Config::default(), Book::new()),
        }
        self.shown = Some((source, stored));
    }
}

/// What the driver needs.
pub struct Driver {
    pub client: Client,
    pub releases: Cache<CanaryRelease>,
    pub leading: Arc<AtomicBool>,
    /// `None`: no analysis can run, and the statuses say so.
    pub prometheus: Option<Prometheus>,
}

/// The values of a person's annotations: as asked on the CanaryRelease, or as last acted on
/// (in its status).
#[derive(Clone, Debug, Default, PartialEq)]
struct Asks {
    resume: Option<String>,
    proceed: Option<String>,
    abort: Option<String>,
}

impl Asks {
    fn asked(object: &CanaryRelease) -> Asks {
        let value = |name: &str| object.annotations().get(name).cloned();
        Asks {
            resume: value(RESUME_ANNOTATION),
            proceed: value(CONTINUE_ANNOTATION),
            abort: value(ABORT_ANNOTATION),
        }
    }

    fn noted(object: &CanaryRelease) -> Asks {
        let status = object.status.as_ref();
        Asks {
            resume: status.and_then(|s| s.rollout_resume.clone()),
            proceed: status.and_then(|s| s.rollout_continue.clone()),
            abort: status.and_then(|s| s.rollout_abort.clone()),
        }
    }
}

/// A status to write: the rollout's, and the annotations' values acted on.
type Update = (RolloutStatus, Asks);

/// Drives the rollouts while this agent is the status writer, for as long as the agent runs.
pub async fn drive(driver: Driver, source: watch::Receiver<Option<Arc<Config>>>) {
    let mut pace = tokio::time::interval(Duration::from_secs(1) / STATUS_WRITES_PER_SECOND);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::time::sleep(TICK).await;
        let config = source.borrow().clone();
        let Some(config) = config.filter(|_| driver.leading.load(Ordering::Relaxed)) else {
            continue;
        };
        let objects: HashMap<String, Arc<CanaryRelease>> = driver
            .releases
            .state()
            .into_iter()
            .filter(|r| r.spec.rollout.is_some())
            .map(|r| (key_of(&r), r))
            .collect();
        let now = jiff::Timestamp::now();
        for release in &config.releases {
            let (Some(rollout), Some(object)) = (&release.rollout, objects.get(&release.name))
            else {
                continue;
            };
            let Some(update) = driver.next(&config, release, rollout, object, now).await else {
                continue;
            };
            pace.tick().await;
            if !driver.leading.load(Ordering::Relaxed) {
                break;
            }
            driver.write(object, update, true).await;
        }
        // Promotions, from the releases themselves: a release whose versions were made
        // primary may be out of the configuration (it claims primaries) before its status
        // says it was promoted.
        for object in objects.values() {
            let Some(update) = driver.promotion(&config, object, now).await else {
                continue;
            };
            pace.tick().await;
            if !driver.leading.load(Ordering::Relaxed) {
                break;
            }
            // Unconditional: switching the primaries twice, or writing Promoted twice, is
            // harmless, and a conflict would leave the release out of the rules and out of
            // the configuration with its promotion unwritten.
            driver.write(object, update, false).await;
        }
    }
}

impl Driver {
    /// Where `release`'s rollout goes now, if anywhere.
    async fn next(
        &self,
        config: &Arc<Config>,
        release: &Release,
        rollout: &Rollout,
        object: &CanaryRelease,
        now: jiff::Timestamp,
    ) -> Option<Update> {
        let asked = Asks::asked(object);
        let mut noted = Asks::noted(object);
        let current = (object.status.as_ref())
            .and_then(|s| s.rollout.as_ref())
            .filter(|s| s.fingerprint == rollout::fingerprint(release));
        let Some(current) = current else {
            // New, or its rollout or targets changed: the first step. What was asked before
            // is noted, not acted on.
            info!(release = %release.name, "rollout begins");
            return Some((rollout::begin(release, rollout, now), asked));
        };
        // Anyone who may write the status could write any figure in it: the share comes from
        // the steps, and a step the rollout lacks holds the release (written, so it shows).
        let fitted = rollout::fitted(current, release, rollout, now);
        if fitted.phase != current.phase {
            return Some((fitted, noted));
        }
        let current = &fitted;
        if asked.resume != noted.resume {
            // A continue asked with it was about the run that is over: noted too.
            let resumed = match (asked.resume.as_ref())
                .map(|_| rollout::resume(release, current, now))
            {
                Some(Ok(resumed)) => {
                    info!(release = %release.name, "rollout resumed by its annotation");
                    resumed
                }
                Some(Err(reason)) => {
                    info!(release = %release.name, reason, "resume annotation: nothing to resume");
                    current.clone()
                }
                None => current.clone(),
            };
            return Some((resumed, asked));
        }
        if asked.abort != noted.abort {
            let aborted = match (asked.abort.as_ref())
                .map(|reason| current.aborted(&release.name, reason, now))
            {
                Some(Ok(aborted)) => {
                    info!(release = %release.name, "rollout aborted by its annotation");
                    aborted
                }
                Some(Err(reason)) => {
                    info!(release = %release.name, reason, "abort annotation: nothing to abort");
                    current.clone()
                }
                None => current.clone(),
            };
            noted.abort = asked.abort;
            return Some((aborted, noted));
        }
        let mut current = current.clone();
        if asked.proceed != noted.proceed {
            match (asked.proceed.as_ref()).map(|_| current.continued(&release.name, now)) {
                Some(Ok(continued)) => {
                    info!(release = %release.name, "rollout continued by its annotation: analysis now");
                    current = continued;
                }
                Some(Err(reason)) => {
                    info!(release = %release.name, reason, "continue annotation: nothing to continue");
                }
                None => {}
            }
            noted.proceed = asked.proceed;
            if !current.due(now) {
                return Some((current, noted));
            }
        }
        if !current.due(now) {
            return None;
        }
        let next = self.analyse(config, release, rollout, &current, now).await;
        Some((next, noted))
    }

    /// A succeeded rollout to be promoted (`onSuccess: promote`), promoted; a promotion that
    /// failed is tried again at its next time.
    async fn promotion(
        &self,
        config: &Config,
        object: &CanaryRelease,
        now: jiff::Timestamp,
    ) -> Option<Update> {
        let status = object.status.as_ref()?;
        let current = status.rollout.as_ref()?;
        let rollout = object.spec.rollout.as_ref()?;
        let waiting = current.next_analysis_at.is_some_and(|at| at > now);
        if current.phase != Phase::Succeeded || rollout.on_success != OnSuccess::Promote || waiting
        {
            return None;
        }
        let key = key_of(object);
        // Changed since it succeeded: it begins again instead.
        if let Some(release) = config.releases.iter().find(|r| r.name == key)
            && rollout::fingerprint(release) != current.fingerprint
        {
            return None;
        }
        let next = self.promote(object, rollout, current, now).await;
        Some((next, Asks::noted(object)))
    }

    /// Runs the analysis of the step `current` is at and takes the rollout where it leads;
    /// nowhere without figures.
    async fn analyse(
        &self,
        config: &Arc<Config>,
        release: &Release,
        rollout: &Rollout,
        current: &RolloutStatus,
        now: jiff::Timestamp,
    ) -> RolloutStatus {
        let Some(prometheus) = &self.prometheus else {
            return current.blocked(
                rollout,
                "no Prometheus to analyse with: start the agents with --prometheus-url",
                now,
            );
        };
        let subject = Subject::of(release, config);
        let over = current.analysis_window(rollout, now);
        let window = match prometheus.window(&subject, over, now).await {
            Ok(window) => window,
            Err(err) => {
                let reason = format!("{err:#}");
                warn!(release = %release.name, reason, "rollout analysis: no figures; the step holds");
                return current.blocked(rollout, &format!("{reason}; the step holds"), now);
            }
        };
        let record = judge(&rollout.analysis, &window, now);
        let next = current.after_analysis(rollout, record, now);
        info!(release = %release.name, phase = ?next.phase, "{}", next.message);
        if next.phase == Phase::Succeeded && rollout.on_success == OnSuccess::Promote {
            // Written first, then promoted (`promotion`): the status holds the intent.
            return RolloutStatus {
                message: format!("succeeded at {}%; promoting", next.percent),
                ..next
            };
        }
        next
    }

    /// Makes the release's versions the primaries of their Services; on failure the rollout
    /// stays succeeded (at its last step) and tries again an interval later.
    async fn promote(
        &self,
        object: &CanaryRelease,
        rollout: &Rollout,
        succeeded: &RolloutStatus,
        now: jiff::Timestamp,
    ) -> RolloutStatus {
        match self.switch_primaries(object).await {
            Ok(()) => {
                info!(release = %key_of(object), "rollout promoted: its versions are primary");
                succeeded.promoted()
            }
            Err(err) => {
                let reason = format!("{err:#}");
                warn!(release = %key_of(object), reason, "promotion failed; tried again later");
                // Still succeeded, at its last step; `nextAnalysisAt` is the next attempt.
                succeeded.blocked(rollout, &format!("promotion pending: {reason}"), now)
            }
        }
    }

    /// Points each target Service's primary-version annotation at the release's version.
    async fn switch_primaries(&self, object: &CanaryRelease) -> Result<()> {
        let own = object.namespace().unwrap_or_else(|| "default".into());
        for (service, version) in &object.spec.targets {
            let (name, namespace) = service
                .split_once('.')
                .unwrap_or((service.as_str(), own.as_str()));
            let api: Api<Service> = Api::namespaced(self.client.clone(), namespace);
            let patch = json!({"metadata": {"annotations": {PRIMARY_ANNOTATION: version}}});
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .with_context(|| {
                    format!(
                        "cannot make {version} the primary version of Service {namespace}/{name}"
                    )
                })?;
        }
        Ok(())
    }

    /// Writes a rollout's status; when `guarded`, on the condition that the release is as it
    /// was read: a stale read (the watch behind our last write) or another writer makes it a
    /// conflict, and the next round reads again.
    async fn write(&self, object: &CanaryRelease, (status, asks): Update, guarded: bool) {
        let key = key_of(object);
        let api: Api<CanaryRelease> = Api::namespaced(
            self.client.clone(),
            &object.namespace().unwrap_or_else(|| "default".into()),
        );
        let old = serde_json::to_value(object.status.as_ref().and_then(|s| s.rollout.as_ref()))
            .unwrap_or(Value::Null);
        let new = serde_json::to_value(&status).expect("a status serialises");
        let mut patch = json!({
            "status": {
                "rollout": merge_patch(&old, new),
                "rolloutResume": asks.resume,
                "rolloutContinue": asks.proceed,
                "rolloutAbort": asks.abort,
            },
        });
        if guarded {
            patch["metadata"] = json!({"resourceVersion": object.resource_version()});
        }
        match api
            .patch_status(
                &object.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                info!(release = %key, phase = ?status.phase, step = status.step, percent = status.percent, "rollout status written")
            }
            Err(kube::Error::Api(answer)) if answer.code == 409 => {
                debug!(release = %key, "the release changed meanwhile; read again next round")
            }
            Err(err) => warn!(release = %key, error = %err, "cannot write the rollout status"),
        }
    }
}

/// `new` as a JSON merge patch over `old`: the fields `old` has and `new` lacks become null
/// (removed), where a plain patch would leave them as they were.
fn merge_patch(old: &Value, new: Value) -> Value {
    match (old, new) {
        (Value::Object(old), Value::Object(mut new)) => {
            for (key, value) in new.iter_mut() {
                if let Some(before) = old.get(key) {
                    *value = merge_patch(before, value.take());
                }
            }
            for key in old.keys() {
                new.entry(key.clone()).or_insert(Value::Null);
            }
            Value::Object(new)
        }
        (_, new) => new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        kubernetes::crd::CanaryReleaseStatus,
        rollout::{AnalysisRecord, Outcome},
    };

    const CONFIG: &str = "services:\n  - name: a\n    versions: [{name: v1, primary: true}, \
                          {name: v2}]\nreleases:\n  - {name: ns/r, priority: 1, \
                          hashBy: x-user-id, match: [{header: x, exact: y}], targets: {a: v2}, \
                          rollout: {steps: [10, 50, 100], interval: 1m}}\n";

    fn t(seconds: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn passed(at: jiff::Timestamp) -> AnalysisRecord {
        AnalysisRecord {
            at,
            outcome: Outcome::Passed,
            message: "fine".into(),
            requests: 500,
            errors: 1,
            error_rate: 0.002,
            p99: Some(0.05),
            primary_p99: Some(0.04),
            p99_ratio: Some(1.25),
            primary_requests: 5000,
        }
    }

    #[test]
    fn every_agent_routes_at_the_step_the_status_holds() {
        let config = Config::from_yaml(CONFIG, "t.yaml").unwrap();
        let release = &config.releases[0];
        let rollout = release.rollout.as_ref().unwrap();
        let rollouts = Rollouts::kept_in_cluster();
        let (source, driven) = watch::channel(None);
        let percent_in_force = |stored: &Book| {
            let report = crate::check::check(&config);
            let (config, report) = in_force(config.clone(), report, &routing(stored), &source);
            assert!(report.valid, "{:?}", report.errors);
            Page::default().show(&rollouts, source.borrow().clone(), stored.clone());
            config
                .releases
                .first()
                .map(|r| (r.percent, r.rollout.is_some()))
        };
        // No status yet: the first step.
        assert_eq!(percent_in_force(&Book::new()), Some((Some(10.0), false)));
        assert_eq!(rollouts.views()[0].status.step, 0);
        let driving = driven.borrow().clone().unwrap();
        assert!(
            driving.releases[0].rollout.is_some(),
            "the driver sees the rollout"
        );
        // At the second step.
        let second =
            rollout::begin(release, rollout, t(0)).after_analysis(rollout, passed(t(60)), t(60));
        let stored = Book::from([("ns/r".to_string(), second.clone())]);
        assert_eq!(percent_in_force(&stored), Some((Some(50.0), false)));
        assert_eq!(rollouts.views()[0].status, second);
        // A status about another rollout: the first step again.
        let other = RolloutStatus {
            fingerprint: "another".into(),
            ..second.clone()
        };
        let stored = Book::from([("ns/r".to_string(), other)]);
        assert_eq!(percent_in_force(&stored), Some((Some(10.0), false)));
        // Rolled back: out of the rules.
        let failed = AnalysisRecord {
            outcome: Outcome::Failed,
            ..passed(t(120))
        };
        let rolled_back = second.after_analysis(rollout, failed, t(120));
        let stored = Book::from([("ns/r".to_string(), rolled_back)]);
        assert_eq!(percent_in_force(&stored), None);
        // Without rollouts the translation is in force as it is, and the driver idles.
        let plain = Config::from_yaml("services: []\n", "t.yaml").unwrap();
        let report = crate::check::check(&plain);
        in_force(plain, report, &Book::new(), &source);
        Page::default().show(&rollouts, source.borrow().clone(), Book::new());
        assert!(driven.borrow().is_none());
        assert!(rollouts.views().is_empty());
    }

    /// RFC 7386, as the API server applies a merge patch.
    fn apply(target: &mut Value, patch: &Value) {
        let Value::Object(patch) = patch else {
            *target = patch.clone();
            return;
        };
        if !target.is_object() {
            *target = json!({});
        }
        let object = target.as_object_mut().unwrap();
        for (key, value) in patch {
            if value.is_null() {
                object.remove(key);
            } else {
                apply(object.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }

    /// Each status of a rollout's life, written over the one before as the driver writes it
    /// (a merge patch), is what the API server then holds, and the CRD's schema takes it.
    #[test]
    fn statuses_written_as_the_api_server_applies_them() {
        let config = Config::from_yaml(CONFIG, "t.yaml").unwrap();
        let release = &config.releases[0];
        let rollout = release.rollout.as_ref().unwrap();
        let crd = serde_json::to_value(<CanaryRelease as kube::CustomResourceExt>::crd()).unwrap();
        let schema =
            &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"];
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .build(schema)
            .unwrap();
        let begun = rollout::begin(release, rollout, t(0));
        let second = begun.after_analysis(rollout, passed(t(60)), t(60));
        let failed = AnalysisRecord {
            outcome: Outcome::Failed,
            p99: None,
            primary_p99: None,
            p99_ratio: None,
            ..passed(t(120))
        };
        let rolled_back = second.after_analysis(rollout, failed, t(120));
        let resumed = rollout::resume(release, &rolled_back, t(180)).unwrap();
        let promoted = resumed.promoted();
        let mut held = json!({"state": "Accepted", "conditions": []});
        let mut before: Option<RolloutStatus> = None;
        for (status, resume) in [
            (begun, None),
            (second, None),
            (rolled_back, None),
            (resumed, Some("1")),
            (promoted, Some("1")),
        ] {
            let old = serde_json::to_value(before.as_ref()).unwrap();
            let new = serde_json::to_value(&status).unwrap();
            let patch = json!({"rollout": merge_patch(&old, new), "rolloutResume": resume});
            apply(&mut held, &patch);
            let read: CanaryReleaseStatus = serde_json::from_value(held.clone()).unwrap();
            assert_eq!(read.rollout.as_ref(), Some(&status), "{held}");
            assert_eq!(read.rollout_resume.as_deref(), resume);
            assert_eq!(
                read.state.as_deref(),
                Some("Accepted"),
                "the verdict's part stays"
            );
            let errors: Vec<String> = validator
                .iter_errors(&held)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{errors:?}: {held}");
            before = Some(status);
        }
        // Rolled back, the next analysis time and the figures' p99 went: removed, not left.
        assert!(held["rollout"].get("nextAnalysisAt").is_none(), "{held}");
    }

    #[test]
    fn a_merge_patch_removes_what_the_new_status_lacks() {
        let old = json!({"phase": "Progressing", "nextAnalysisAt": "t",
                         "lastAnalysis": {"p99": 0.1, "requests": 5}});
        let new = json!({"phase": "RolledBack", "lastAnalysis": {"requests": 9}});
        assert_eq!(
            merge_patch(&old, new),
            json!({"phase": "RolledBack", "nextAnalysisAt": null,
                   "lastAnalysis": {"p99": null, "requests": 9}})
        );
        assert_eq!(merge_patch(&Value::Null, json!({"a": 1})), json!({"a": 1}));
    }
}
