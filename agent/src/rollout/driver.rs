//! The rollouts of a file-mode agent: their statuses (kept in a file next to the
//! configuration, so a restart continues where the agent stopped) and the loop that analyses
//! each due step from the node's own figures and puts the next step's rules in force.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use serde::Serialize;
use tracing::{info, warn};

use super::{
    Book, Phase, RolloutStatus, analysis,
    local::{LocalFigures, Subject, parse_totals},
};
use crate::{
    check::{self, Report},
    config::{Config, Release},
};

/// What the driver needs of the agent: put a configuration in force, and read the figures.
pub trait Applies: Send + Sync {
    /// Puts an effective configuration in force; `report` is its source's (see
    /// `Rollouts::apply_source`).
    fn apply_effective(&self, config: Config, report: Report) -> Result<()>;
    /// The agent's metrics exposition.
    fn metrics_text(&self) -> String;
}

/// One release's rollout as `steer rollout status` and the admin API show it.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutView {
    pub release: String,
    pub steps: Vec<f64>,
    pub interval: String,
    #[serde(flatten)]
    pub status: RolloutStatus,
}

#[derive(Default)]
struct Inner {
    /// The configuration as its source wrote it (with rollouts, without their percents).
    source: Config,
    /// The checker's report of `source`: the report of every step's configuration too.
    report: Report,
    book: Book,
    /// A person resumed or aborted a rollout: its new share is to be put in force.
    pending: bool,
    /// Statuses the state file had and that could not be read, until the first apply holds
    /// their releases.
    unreadable: Unreadable,
}

/// What of the state file could not be read.
#[derive(Debug, Default, PartialEq)]
enum Unreadable {
    #[default]
    Nothing,
    /// The whole file: every rolling release.
    All(String),
    /// These releases' statuses: name -> why.
    Some(BTreeMap<String, String>),
}

impl Unreadable {
    fn reason(&self, release: &str) -> Option<&str> {
        match self {
            Unreadable::Nothing => None,
            Unreadable::All(reason) => Some(reason),
            Unreadable::Some(reasons) => reasons.get(release).map(String::as_str),
        }
    }
}

/// Far more than the statuses of any configuration the agent accepts.
const STATE_FILE_LIMIT: u64 = 32 << 20;

/// The statuses in the state file at `path`, and what of it could not be read (the file is
/// then moved aside to `<path>.corrupt-<time>`, and the log says where).
fn read_state(path: &Path) -> (Book, Unreadable) {
    let parsed = crate::files::read_bounded(path, STATE_FILE_LIMIT)
        .map_err(|err| err.to_string())
        .and_then(|bytes| match bytes {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(&bytes)
                .map(Some)
                .map_err(|err| err.to_string()),
        });
    let (book, unreadable) = match parsed {
        Ok(None) => return (Book::new(), Unreadable::Nothing),
        Ok(Some(entries)) => {
            let mut book = Book::new();
            let mut reasons = BTreeMap::new();
            for (name, value) in entries {
                match serde_json::from_value::<RolloutStatus>(value) {
                    Ok(status) => {
                        book.insert(name, status);
                    }
                    Err(err) => {
                        reasons.insert(name, format!("its kept status is unreadable ({err})"));
                    }
                }
            }
            let unreadable = if reasons.is_empty() {
                Unreadable::Nothing
            } else {
                Unreadable::Some(reasons)
            };
            (book, unreadable)
        }
        Err(err) => (
            Book::new(),
            Unreadable::All(format!("the rollout state file is unreadable ({err})")),
        ),
    };
    if unreadable != Unreadable::Nothing {
        let aside = PathBuf::from(format!(
            "{}.corrupt-{}",
            path.display(),
            jiff::Timestamp::now().as_second()
        ));
        match std::fs::rename(path, &aside) {
            Ok(()) => {
                warn!(file = %path.display(), kept = %aside.display(), ?unreadable, "rollout statuses unreadable: their releases are held at 0% until resumed")
            }
            Err(err) => {
                warn!(file = %path.display(), error = %err, ?unreadable, "rollout statuses unreadable (and the file could not be moved aside): their releases are held at 0% until resumed")
            }
        }
    }
    (book, unreadable)
}

/// The rollouts of the agent and the configuration they are part of.
pub struct Rollouts {
    inner: Mutex<Inner>,
    /// Where the statuses are kept; `None`: in memory (Kubernetes keeps them in the
    /// CanaryReleases' statuses).
    state_file: Option<PathBuf>,
    /// Whether this agent drives the rollouts (a file) or only shows them (Kubernetes: the
    /// leader drives, from the cluster's figures).
    drives: bool,
    /// A person resumed or continued a rollout: the driver acts at once.
    asked: tokio::sync::Notify,
    /// What `views` shows, replaced whole after each change.
    published: Mutex<Vec<RolloutView>>,
}

/// The figures the progressing rollouts need.
struct Sampling {
    /// (service, version) of their canaries and primaries.
    versions: HashSet<(String, String)>,
    /// How long samples are kept: the longest interval and a little.
    keep: Duration,
    /// How often to sample and look for due analyses.
    tick: Duration,
}

/// How often the figures are sampled and due analyses run: a tenth of the shortest interval,
/// between these bounds.
const FASTEST_TICK: Duration = Duration::from_millis(50);
const SLOWEST_TICK: Duration = Duration::from_secs(1);

impl Rollouts {
    /// The statuses kept in `state_file`. What cannot be read is not guessed: each release
    /// whose status is unreadable (all of them, when the file is) is held at 0% at the first
    /// apply, until a person resumes it, and the damaged file is kept aside, never
    /// overwritten.
    pub fn load(state_file: Option<PathBuf>) -> Rollouts {
        let (book, unreadable) = state_file.as_deref().map(read_state).unwrap_or_default();
        Rollouts {
            inner: Mutex::new(Inner {
                book,
                unreadable,
                ..Inner::default()
            }),
            state_file,
            drives: true,
            asked: tokio::sync::Notify::new(),
            published: Mutex::default(),
        }
    }

    /// Rollouts kept and driven in the cluster; this agent shows them (`show`).
    pub fn kept_in_cluster() -> Rollouts {
        Rollouts {
            drives: false,
            ..Rollouts::load(None)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a configuration from its source: each rollout keeps its place (or begins),
    /// and `apply` gets the configuration the rules see with the checker's report of the
    /// source. The source is checked as `steer check` checks it, each rolling release at its
    /// last step; every step before is then valid too, since a step only lowers a release's
    /// share or leaves it out, which can neither make two releases tie nor shadow one. On
    /// success the source and the statuses are recorded; on failure nothing changes.
    pub fn apply_source(
        &self,
        source: Config,
        apply: impl FnOnce(Config, Report) -> Result<()>,
    ) -> Result<()> {
        let mut inner = self.lock();
        let report = check::check(&source);
        let now = jiff::Timestamp::now();
        let mut book = super::reconcile(&source, &inner.book, now);
        for release in &source.releases {
            if let (Some(rollout), Some(reason)) =
                (&release.rollout, inner.unreadable.reason(&release.name))
                && !inner.book.contains_key(&release.name)
            {
                book.insert(
                    release.name.clone(),
                    super::held(release, rollout, reason, now),
                );
            }
        }
        apply(super::effective(&source, &book), report.clone())?;
        inner.source = source;
        inner.report = report;
        inner.book = book;
        inner.unreadable = Unreadable::Nothing;
        self.publish(&inner.source, &inner.book);
        Ok(())
    }

    /// Shows rollouts whose statuses a source keeps itself (Kubernetes: the CanaryReleases'
    /// statuses): `views` reads them, nothing is driven or saved here.
    pub fn show(&self, source: Config, book: Book) {
        let mut inner = self.lock();
        inner.source = source;
        inner.book = book;
        self.publish(&inner.source, &inner.book);
    }

    /// Every rollout and where it stands (as last published: never waits for an apply).
    pub fn views(&self) -> Vec<RolloutView> {
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts a rolled-back or aborted release over from its first step (put in force by the
    /// driver at once).
    pub fn resume(&self, name: &str) -> Result<RolloutStatus, String> {
        self.ask(name, "resume", true, |release, status, now| {
            super::resume(release, status, now)
        })
    }

    /// Stops a release's rollout now: it takes no traffic (put in force by the driver at once)
    /// until resumed.
    pub fn abort(&self, name: &str) -> Result<RolloutStatus, String> {
        self.ask(name, "abort", true, |release, status, now| {
            status.aborted(&release.name, "a person asked (steer rollout abort)", now)
        })
    }

    /// Ends the wait of a progressing release's step: the driver samples the figures and runs
    /// its analysis at once (over the step so far; see `RolloutStatus::continued`).
    pub fn continue_now(&self, name: &str) -> Result<RolloutStatus, String> {
        self.ask(name, "continue", false, |release, status, now| {
            status.continued(&release.name, now)
        })
    }

    /// A person's word (`word`) on release `name`'s rollout: `change` gives its new status,
    /// which the driver acts on at once (and puts in force, when `reroutes`).
    fn ask(
        &self,
        name: &str,
        word: &str,
        reroutes: bool,
        change: impl FnOnce(&Release, &RolloutStatus, jiff::Timestamp) -> Result<RolloutStatus, String>,
    ) -> Result<RolloutStatus, String> {
        if !self.drives {
            return Err(format!(
                "rollouts are kept in the cluster: {word} `{name}` on its CanaryRelease \
                 (README: progressive rollout)"
            ));
        }
        let mut inner = self.lock();
        let release = (inner.source.releases.iter())
            .find(|r| r.name == name)
            .ok_or_else(|| format!("no release `{name}`"))?;
        let status =
            (inner.book.get(name)).ok_or_else(|| format!("release `{name}` has no rollout"))?;
        let changed = change(release, status, jiff::Timestamp::now())?;
        info!(release = name, word, "rollout: a person's word");
        inner.book.insert(name.to_string(), changed.clone());
        self.publish(&inner.source, &inner.book);
        inner.pending |= reroutes;
        self.asked.notify_one();
        Ok(changed)
    }

    /// What to sample while some rollout is progressing.
    fn sampling(&self) -> Option<Sampling> {
        let inner = self.lock();
        let mut versions = HashSet::new();
        let mut shortest = Duration::MAX;
        let mut longest = Duration::ZERO;
        for release in &inner.source.releases {
            let (Some(rollout), Some(status)) = (&release.rollout, inner.book.get(&release.name))
            else {
                continue;
            };
            if status.phase != Phase::Progressing {
                continue;
            }
            let subject = Subject::of(release, &inner.source);
            versions.extend(subject.canary.into_iter().chain(subject.primaries));
            shortest = shortest.min(rollout.interval);
            longest = longest.max(rollout.interval);
        }
        if versions.is_empty() {
            return None;
        }
        let tick = (shortest / 10).clamp(FASTEST_TICK, SLOWEST_TICK);
        Some(Sampling {
            versions,
            keep: longest + 2 * tick,
            tick,
        })
    }

    /// Runs the analyses that are due at `now` (the time of the newest sample in `figures`)
    /// and puts each resulting step in force; a step that cannot be put in force (the
    /// datapath refuses it) is not taken: the rollout stays and tries again an interval later.
    fn step(&self, figures: &LocalFigures, applies: &dyn Applies, now: jiff::Timestamp) {
        let mut inner = self.lock();
        let Inner {
            source,
            report,
            book,
            pending,
            ..
        } = &mut *inner;
        let mut changed = std::mem::take(pending);
        if changed {
            let config = super::effective(source, book);
            if let Err(err) = applies.apply_effective(config, report.clone()) {
                warn!(error = %format!("{err:#}"), "resumed or aborted rollout not applied");
            }
        }
        let due: Vec<String> = book
            .iter()
            .filter(|(_, status)| status.due(now))
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            let Some(release) = source.releases.iter().find(|r| r.name == name) else {
                continue;
            };
            let (Some(rollout), Some(status)) = (&release.rollout, book.get(&name).cloned()) else {
                continue;
            };
            let over = status.analysis_window(rollout, now);
            let window = figures.window(&Subject::of(release, source), over);
            let record = analysis::judge(&rollout.analysis, &window, now);
            let next = status.after_analysis(rollout, record, now);
            info!(release = %name, outcome = ?next.phase, "{}", next.message);
            changed = true;
            if next.share() == status.share() {
                book.insert(name, next);
                continue;
            }
            let mut candidate = book.clone();
            candidate.insert(name.clone(), next.clone());
            let config = super::effective(source, &candidate);
            match applies.apply_effective(config, report.clone()) {
                Ok(()) => *book = candidate,
                Err(err) => {
                    let reason = format!("{err:#}");
                    warn!(release = %name, reason, "rollout step not taken");
                    let blocked = RolloutStatus {
                        last_analysis: next.last_analysis,
                        ..status.blocked(rollout, &reason, now)
                    };
                    book.insert(name, blocked);
                }
            }
        }
        if changed {
            self.publish(source, book);
        }
    }

    /// Publishes the statuses for `views` and saves them.
    fn publish(&self, source: &Config, book: &Book) {
        let views = source
            .releases
            .iter()
            .filter_map(|release| {
                let rollout = release.rollout.as_ref()?;
                Some(RolloutView {
                    release: release.name.clone(),
                    steps: rollout.steps.clone(),
                    interval: format!(
                        "{:#}",
                        jiff::SignedDuration::try_from(rollout.interval).unwrap_or_default()
                    ),
                    status: book.get(&release.name)?.clone(),
                })
            })
            .collect();
        *self.published.lock().unwrap_or_else(|e| e.into_inner()) = views;
        self.save(book);
    }

    /// Writes the statuses (whole, then renamed into place: never half a file).
    fn save(&self, book: &Book) {
        let Some(path) = &self.state_file else {
            return;
        };
        let bytes = serde_json::to_vec_pretty(book).expect("statuses serialise");
        let written = crate::files::write_atomically(path, &bytes)
            .with_context(|| format!("cannot write {}", path.display()));
        if let Err(err) = written {
            warn!(error = %format!("{err:#}"), "rollout statuses not saved");
        }
    }
}

/// Samples the figures and runs due analyses for as long as the agent runs.
pub async fn drive(rollouts: Arc<Rollouts>, applies: Arc<dyn Applies>) {
    let figures = Arc::new(Mutex::new(LocalFigures::new(jiff::Timestamp::now())));
    loop {
        let sampling = rollouts.sampling();
        let tick = sampling.as_ref().map_or(SLOWEST_TICK, |s| s.tick);
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = rollouts.asked.notified() => {}
        }
        let (rollouts, applies, figures) = (rollouts.clone(), applies.clone(), figures.clone());
        // Parsing the metrics and checking a step are CPU work: on the blocking pool.
        let _ = tokio::task::spawn_blocking(move || {
            let mut figures = figures.lock().unwrap_or_else(|e| e.into_inner());
            // One instant for the sample and the step: a step begun now has this sample as
            // its baseline.
            let now = jiff::Timestamp::now();
            if let Some(sampling) = sampling {
                let totals = parse_totals(&applies.metrics_text(), &sampling.versions);
                figures.record(now, totals, sampling.keep);
            }
            rollouts.step(&figures, applies.as_ref(), now);
        })
        .await;
    }
}
