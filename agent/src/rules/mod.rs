//! The canary rule engine: which release (at most one) a request belongs to.
//!
//! A release matches when every one of its matchers holds (its tag set is a subset of the
//! request's tags) and, for a percentage release, the user's sticky hash falls in its share.
//! Among the matching releases the smallest priority number wins; none matching means primary.
//!
//! Releases are compiled into an index keyed by one "anchor" matcher each (an exact value, else a
//! prefix), so a decision looks only at the releases that the request's headers can reach and
//! costs in proportion to those headers, not to the number of releases.

mod tags;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use anyhow::{Context, Result};
use regex::Regex;

pub use tags::{HeaderPairs, Tags};

use crate::config::{Config, MatchKind, Release};

/// One compiled matcher; header names are lower-case.
#[derive(Debug)]
enum Condition {
    Exact { header: String, value: String },
    Prefix { header: String, value: String },
    Regex { header: String, regex: Regex },
}

impl Condition {
    fn header(&self) -> &str {
        match self {
            Condition::Exact { header, .. }
            | Condition::Prefix { header, .. }
            | Condition::Regex { header, .. } => header,
        }
    }

    fn holds_for(&self, value: &str) -> bool {
        match self {
            Condition::Exact { value: want, .. } => value == want,
            Condition::Prefix { value: want, .. } => value.starts_with(want.as_str()),
            Condition::Regex { regex, .. } => regex.is_match(value),
        }
    }

    fn holds<T: Tags + ?Sized>(&self, tags: &T) -> bool {
        let mut held = false;
        tags.for_each_value(self.header(), &mut |value| {
            held = held || self.holds_for(value);
        });
        held
    }
}

/// A sticky share of the matching users: the user's hash must fall below `threshold`.
#[derive(Debug)]
struct Share {
    hash_by: String,
    /// `percent` of the u64 range; `None` means 100%, which every user with the header passes.
    threshold: Option<u64>,
}

/// A release ready for matching. Releases are kept sorted by (priority, name), so the position
/// (the rank) orders them: a smaller rank always wins.
#[derive(Debug)]
pub struct CompiledRelease {
    pub name: Arc<str>,
    pub priority: u32,
    conditions: Vec<Condition>,
    share: Option<Share>,
    /// Service name -> version name in this release.
    pub targets: BTreeMap<String, String>,
}

impl CompiledRelease {
    fn matches<T: Tags + ?Sized>(&self, tags: &T) -> bool {
        self.conditions.iter().all(|c| c.holds(tags))
            && self.share.as_ref().is_none_or(|share| {
                let mut inside = false;
                tags.for_each_value(&share.hash_by, &mut |user| {
                    inside = inside
                        || share
                            .threshold
                            .is_none_or(|t| sticky_hash(&self.name, user) < t)
                });
                inside
            })
    }

    /// The version of `service` in this release, if the release has one.
    pub fn target(&self, service: &str) -> Option<&str> {
        self.targets.get(service).map(String::as_str)
    }
}

/// A stable hash of (release, user): the same user always lands on the same side of a share,
/// on every node and across agent versions. Salting with the release name keeps the shares of
/// different releases independent of each other. FNV-1a, then a splitmix64 finaliser so the
/// high bits (compared against the threshold) are well mixed.
pub fn sticky_hash(release: &str, user: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in release.bytes().chain([0u8]).chain(user.bytes()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The releases reachable from one header name, by the anchor value.
#[derive(Debug, Default)]
struct HeaderIndex {
    exact: HashMap<String, Vec<u32>>,
    prefix: HashMap<String, Vec<u32>>,
    /// Distinct prefix lengths in `prefix`, so a lookup tries only lengths that exist.
    prefix_lens: Vec<usize>,
}

/// The compiled, immutable rule set.
#[derive(Debug, Default)]
pub struct Ruleset {
    releases: Vec<CompiledRelease>,
    by_name: HashMap<Arc<str>, u32>,
    index: HashMap<String, HeaderIndex>,
    /// Releases with only regex matchers: no value to index them by, so always candidates.
    unanchored: Vec<u32>,
}

impl Ruleset {
    /// Compiles the releases of `config`. Only what makes matching impossible (a matcher with
    /// no comparison, a regex that does not compile) fails here; the checker reports the rest.
    pub fn compile(config: &Config) -> Result<Ruleset> {
        let mut sorted: Vec<&Release> = config.releases.iter().collect();
        sorted.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));

        let mut ruleset = Ruleset::default();
        for (rank, release) in sorted.into_iter().enumerate() {
            let rank = u32::try_from(rank).context("too many releases")?;
            let compiled =
                compile_release(release).with_context(|| format!("release `{}`", release.name))?;
            ruleset.add_to_index(rank, &compiled);
            ruleset.by_name.insert(compiled.name.clone(), rank);
            ruleset.releases.push(compiled);
        }
        for header in ruleset.index.values_mut() {
            header.prefix_lens.sort_unstable();
            header.prefix_lens.dedup();
        }
        Ok(ruleset)
    }

    fn add_to_index(&mut self, rank: u32, release: &CompiledRelease) {
        // Anchor on an exact value where there is one: it selects the fewest requests.
        let anchor = release
            .conditions
            .iter()
            .find(|c| matches!(c, Condition::Exact { .. }))
            .or_else(|| {
                release
                    .conditions
                    .iter()
                    .find(|c| matches!(c, Condition::Prefix { .. }))
            });
        match anchor {
            Some(Condition::Exact { header, value }) => self
                .index
                .entry(header.clone())
                .or_default()
                .exact
                .entry(value.clone())
                .or_default()
                .push(rank),
            Some(Condition::Prefix { header, value }) => {
                let index = self.index.entry(header.clone()).or_default();
                index.prefix.entry(value.clone()).or_default().push(rank);
                index.prefix_lens.push(value.len());
            }
            _ => self.unanchored.push(rank),
        }
    }

    /// The winning release for a request: the rank of the highest-priority release that
    /// matches, or `None` (primary everywhere).
    pub fn decide<T: Tags + ?Sized>(&self, tags: &T) -> Option<&CompiledRelease> {
        let mut best = u32::MAX;
        let mut consider = |candidates: &[u32]| {
            // Candidate lists are in rank order: the first match is the best of the list.
            for &rank in candidates {
                if rank >= best {
                    break;
                }
                if self.releases[rank as usize].matches(tags) {
                    best = rank;
                    break;
                }
            }
        };
        tags.for_each_pair(&mut |name, value| {
            let Some(index) = self.index.get(name) else {
                return;
            };
            if let Some(candidates) = index.exact.get(value) {
                consider(candidates);
            }
            for &len in &index.prefix_lens {
                if len > value.len() {
                    break;
                }
                if let Some(candidates) =
                    value.get(..len).and_then(|prefix| index.prefix.get(prefix))
                {
                    consider(candidates);
                }
            }
        });
        consider(&self.unanchored);
        self.releases.get(best as usize)
    }

    /// Every release that matches, best first: what `explain` shows besides the winner.
    pub fn all_matching<'a, T: Tags + ?Sized>(&'a self, tags: &T) -> Vec<&'a CompiledRelease> {
        self.releases.iter().filter(|r| r.matches(tags)).collect()
    }

    pub fn get(&self, name: &str) -> Option<&CompiledRelease> {
        self.by_name
            .get(name)
            .map(|&rank| &self.releases[rank as usize])
    }

    pub fn releases(&self) -> &[CompiledRelease] {
        &self.releases
    }
}

fn compile_release(release: &Release) -> Result<CompiledRelease> {
    let mut conditions = Vec::with_capacity(release.matchers.len());
    for matcher in &release.matchers {
        let header = matcher.header.to_ascii_lowercase();
        let condition = match matcher.kind().map_err(anyhow::Error::msg)? {
            MatchKind::Exact(v) => Condition::Exact {
                header,
                value: v.to_string(),
            },
            MatchKind::Prefix(v) => Condition::Prefix {
                header,
                value: v.to_string(),
            },
            MatchKind::Regex(pattern) => Condition::Regex {
                header,
                regex: compile_whole_value_regex(pattern)?,
            },
        };
        conditions.push(condition);
    }
    let share = match (release.percent, &release.hash_by) {
        (None, None) => None,
        (Some(percent), Some(hash_by)) if percent > 0.0 && percent <= 100.0 => Some(Share {
            hash_by: hash_by.to_ascii_lowercase(),
            threshold: (percent < 100.0).then(|| (percent / 100.0 * u64::MAX as f64) as u64),
        }),
        (Some(percent), Some(_)) => anyhow::bail!("percent {percent} is not in (0, 100]"),
        (Some(_), None) => anyhow::bail!("percent needs hashBy"),
        (None, Some(_)) => anyhow::bail!("hashBy needs percent"),
    };
    Ok(CompiledRelease {
        name: release.name.as_str().into(),
        priority: release.priority,
        conditions,
        share,
        targets: release.targets.clone(),
    })
}

/// Regex matchers match the whole header value, as in Envoy and Istio.
pub fn compile_whole_value_regex(pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).with_context(|| format!("invalid regex `{pattern}`"))
}

#[cfg(test)]
mod tests;
