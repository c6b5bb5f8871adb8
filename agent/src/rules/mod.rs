//! The canary rule engine: which release (at most one) a request belongs to.
//!
//! A release matches when every one of its matchers holds (its tag set is a subset of the
//! request's tags) and, for a percentage release, the user's sticky hash falls in its share.
//! Among the matching releases the smallest priority number wins; none matching means primary.
//!
//! Releases are compiled into an index keyed by one "anchor" matcher each (the rarest exact
//! value, else a prefix, else a regex's literal prefixes), so a decision looks only at the
//! releases that the request's headers can reach and costs in proportion to those headers, not
//! to the number of releases.

mod matcher;
mod tags;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use anyhow::{Context, Result};

pub use matcher::{
    Condition, MatcherError, Matchers, Share, Test, WholeValueRegex, rank_order, sticky_hash,
};
pub use tags::{HeaderPairs, Tags};

use crate::config::{Config, Release};

/// A release ready for matching. Releases are kept in `rank_order`, so the position (the rank)
/// orders them: a smaller rank always wins.
#[derive(Debug)]
pub struct CompiledRelease {
    pub name: Arc<str>,
    pub priority: u32,
    matchers: Matchers,
    /// Service name -> version name in this release.
    pub targets: BTreeMap<String, String>,
}

impl CompiledRelease {
    fn matches<T: Tags + ?Sized>(&self, tags: &T) -> bool {
        self.matchers.matches(&self.name, tags)
    }

    /// The version of `service` in this release, if the release has one.
    pub fn target(&self, service: &str) -> Option<&str> {
        self.targets.get(service).map(String::as_str)
    }
}

/// The releases reachable from one header name, by the anchor value.
#[derive(Debug, Default)]
struct HeaderIndex {
    exact: HashMap<String, Vec<u32>>,
    prefix: HashMap<String, Vec<u32>>,
    /// Distinct prefix lengths in `prefix`, so a lookup tries only lengths that exist.
    prefix_lens: Vec<usize>,
}

/// Header -> exact value -> how many releases require it.
type Frequency = HashMap<String, HashMap<String, usize>>;

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
        let parsed = config
            .releases
            .iter()
            .map(|release| {
                let matchers = Matchers::parse(release)
                    .with_context(|| format!("release `{}`", release.name))?;
                Ok((release, matchers))
            })
            .collect::<Result<Vec<_>>>()?;
        u32::try_from(parsed.len()).context("too many releases")?;
        Ok(Ruleset::from_parsed(parsed))
    }

    /// A rule set of releases whose matchers are parsed already (the checker's), fewer than
    /// 2^32 of them.
    pub(crate) fn from_parsed<'r>(
        releases: impl IntoIterator<Item = (&'r Release, Matchers)>,
    ) -> Ruleset {
        let mut sorted: Vec<(&Release, Matchers)> = releases.into_iter().collect();
        sorted.sort_by(|(a, _), (b, _)| rank_order(a, b));
        let mut frequency: Frequency = HashMap::new();
        for (_, matchers) in &sorted {
            for condition in &matchers.conditions {
                if let Test::Exact(v) = &condition.test {
                    *frequency
                        .entry(condition.header.clone())
                        .or_default()
                        .entry(v.clone())
                        .or_default() += 1;
                }
            }
        }
        let mut ruleset = Ruleset::default();
        for (rank, (release, matchers)) in sorted.into_iter().enumerate() {
            let rank = rank as u32;
            let compiled = CompiledRelease {
                name: release.name.as_str().into(),
                priority: release.priority,
                matchers,
                targets: release.targets.clone(),
            };
            ruleset.add_to_index(rank, &compiled, &frequency);
            ruleset.by_name.insert(compiled.name.clone(), rank);
            ruleset.releases.push(compiled);
        }
        for header in ruleset.index.values_mut() {
            header.prefix_lens.sort_unstable();
            header.prefix_lens.dedup();
        }
        ruleset
    }

    /// Files the release under one anchor: the exact value that the fewest releases require
    /// (`frequency`), else its longest prefix, else the literal prefixes of one of its
    /// regexes; a release with none of these is a candidate for every request.
    fn add_to_index(&mut self, rank: u32, release: &CompiledRelease, frequency: &Frequency) {
        let conditions = &release.matchers.conditions;
        let exact = conditions
            .iter()
            .filter_map(|c| match &c.test {
                Test::Exact(v) => Some((c, v)),
                _ => None,
            })
            .min_by_key(|(c, v)| {
                frequency
                    .get(&c.header)
                    .and_then(|values| values.get(v.as_str()))
            });
        if let Some((condition, value)) = exact {
            self.index
                .entry(condition.header.clone())
                .or_default()
                .exact
                .entry(value.clone())
                .or_default()
                .push(rank);
            return;
        }
        let prefixes = conditions
            .iter()
            .filter_map(|c| match &c.test {
                Test::Prefix(p) => Some((c, vec![p.as_str()])),
                _ => None,
            })
            .max_by_key(|(_, p)| p[0].len())
            .or_else(|| {
                // A regex's literals: every value it accepts starts with one of them.
                conditions
                    .iter()
                    .find_map(|c| Some((c, c.test.prefixes().filter(|l| l.len() <= 16)?)))
            });
        match prefixes {
            Some((condition, literals)) => {
                let index = self.index.entry(condition.header.clone()).or_default();
                for literal in literals {
                    let list = index.prefix.entry(literal.to_string()).or_default();
                    // Two literals of one regex may share a key.
                    if list.last() != Some(&rank) {
                        list.push(rank);
                    }
                    index.prefix_lens.push(literal.len());
                }
            }
            None => self.unanchored.push(rank),
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

#[cfg(test)]
mod tests;
