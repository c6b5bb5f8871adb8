//! The canary rule engine: which release (at most one) a request belongs to.
//!
//! A release matches when every one of its matchers holds (its tag set is a subset of the
//! request's tags) and, for a percentage release, the user's sticky hash falls in its share.
//! Among the matching releases the smallest priority number wins; none matching means primary.
//!
//! Releases are compiled into an index keyed by one "anchor" matcher each (the rarest exact
//! value, else the longest prefix, else a regex), so a decision looks only at the releases
//! whose anchor holds for one of the request's headers and costs in proportion to those
//! headers, not to the number of releases. The anchor regexes of a header form one
//! multi-pattern automaton: one pass over the value finds every anchor regex that holds, so a
//! common literal prefix (`team-` shared by hundreds of regexes) costs nothing per release.
//! Compiling that automaton is control-plane work with a size cap; past the cap the header's
//! regex releases fall back to their literal prefixes (candidates tried one by one).

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
pub(crate) use tags::joined;
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
    /// Releases anchored on one of their regexes on this header.
    regexes: Option<RegexIndex>,
}

/// The anchor regexes of one header as one multi-pattern automaton: a single pass over a value
/// finds every anchor regex that holds for it, instead of running them one by one.
#[derive(Debug)]
struct RegexIndex {
    /// Pattern i is the whole-value form of the i-th distinct anchor regex.
    set: regex_automata::meta::Regex,
    /// Pattern -> the releases anchored on it, in rank order.
    ranks: Vec<Vec<u32>>,
}

/// The compiled set of one header's anchor regexes may not exceed this (the program; the lazy
/// DFA's cache per thread is capped by `REGEX_SET_CACHE`). Past it, the header's regex releases
/// are filed under their literal prefixes, or tried for every request, as single regexes.
const REGEX_SET_LIMIT: usize = 16 << 20;
const REGEX_SET_CACHE: usize = 1 << 20;

impl RegexIndex {
    /// `anchors`: (regex, rank) in rank order.
    fn build(anchors: &[(&WholeValueRegex, u32)], limit: usize) -> Option<RegexIndex> {
        use regex_automata::{MatchKind, meta::Regex, nfa::thompson::WhichCaptures};
        let mut patterns: Vec<String> = Vec::new();
        let mut ranks: Vec<Vec<u32>> = Vec::new();
        let mut by_source: HashMap<&str, usize> = HashMap::new();
        for &(regex, rank) in anchors {
            let id = *by_source.entry(regex.source()).or_insert_with(|| {
                patterns.push(format!("^(?:{})$", regex.source()));
                ranks.push(Vec::new());
                patterns.len() - 1
            });
            ranks[id].push(rank);
        }
        let set = Regex::builder()
            .configure(
                Regex::config()
                    .match_kind(MatchKind::All)
                    .which_captures(WhichCaptures::Implicit)
                    .nfa_size_limit(Some(limit))
                    .dfa_size_limit(Some(limit))
                    .hybrid_cache_capacity(REGEX_SET_CACHE),
            )
            .build_many(&patterns)
            .ok()?;
        Some(RegexIndex { set, ranks })
    }

    /// Calls `consider` with the releases of every anchor regex that holds for `value`.
    fn for_each_holding(&self, value: &str, consider: &mut impl FnMut(&[u32])) {
        use regex_automata::{Anchored, Input, PatternSet};
        let mut holding = PatternSet::new(self.ranks.len());
        self.set
            .which_overlapping_matches(&Input::new(value).anchored(Anchored::Yes), &mut holding);
        for pattern in holding.iter() {
            consider(&self.ranks[pattern.as_usize()]);
        }
    }
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
        Ruleset::with_regex_set_limit(releases, REGEX_SET_LIMIT)
    }

    /// `from_parsed`, the regex sets capped at `limit` bytes (the tests' way to the fallback).
    fn with_regex_set_limit<'r>(
        releases: impl IntoIterator<Item = (&'r Release, Matchers)>,
        limit: usize,
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
        // Header -> (anchor regex, rank) of the releases anchored on a regex there.
        let mut regex_anchors: HashMap<String, Vec<(WholeValueRegex, u32)>> = HashMap::new();
        for (rank, (release, matchers)) in sorted.into_iter().enumerate() {
            let rank = rank as u32;
            let compiled = CompiledRelease {
                name: release.name.as_str().into(),
                priority: release.priority,
                matchers,
                targets: release.targets.clone(),
            };
            if let Some((header, regex)) = ruleset.add_to_index(rank, &compiled, &frequency) {
                regex_anchors.entry(header).or_default().push((regex, rank));
            }
            ruleset.by_name.insert(compiled.name.clone(), rank);
            ruleset.releases.push(compiled);
        }
        for (header, anchors) in regex_anchors {
            let borrowed: Vec<(&WholeValueRegex, u32)> =
                anchors.iter().map(|(regex, rank)| (regex, *rank)).collect();
            match RegexIndex::build(&borrowed, limit) {
                Some(set) => ruleset.index.entry(header).or_default().regexes = Some(set),
                None => {
                    for (regex, rank) in &anchors {
                        ruleset.add_by_literals(&header, regex, *rank);
                    }
                }
            }
        }
        for header in ruleset.index.values_mut() {
            header.prefix_lens.sort_unstable();
            header.prefix_lens.dedup();
        }
        // Fallback filing may have added ranks out of order.
        ruleset.unanchored.sort_unstable();
        for header in ruleset.index.values_mut() {
            for list in header.prefix.values_mut() {
                list.sort_unstable();
                list.dedup();
            }
        }
        ruleset
    }

    /// Files the release under one anchor: the exact value that the fewest releases require
    /// (`frequency`), else its longest prefix. A release with neither is returned with its
    /// first regex (header, regex), for the header's regex set; one without any matcher is a
    /// candidate for every request.
    fn add_to_index(
        &mut self,
        rank: u32,
        release: &CompiledRelease,
        frequency: &Frequency,
    ) -> Option<(String, WholeValueRegex)> {
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
            return None;
        }
        let prefix = conditions
            .iter()
            .filter_map(|c| match &c.test {
                Test::Prefix(p) => Some((c, p)),
                _ => None,
            })
            .max_by_key(|(_, p)| p.len());
        if let Some((condition, prefix)) = prefix {
            let index = self.index.entry(condition.header.clone()).or_default();
            index.prefix.entry(prefix.clone()).or_default().push(rank);
            index.prefix_lens.push(prefix.len());
            return None;
        }
        let regex = conditions.iter().find_map(|c| match &c.test {
            Test::Regex(r) => Some((c.header.clone(), r.clone())),
            _ => None,
        });
        if regex.is_none() {
            self.unanchored.push(rank);
        }
        regex
    }

    /// Files a regex release whose header has no regex set under the regex's literal
    /// prefixes (every value it accepts starts with one), else as a candidate for every
    /// request.
    fn add_by_literals(&mut self, header: &str, regex: &WholeValueRegex, rank: u32) {
        match regex.prefixes().filter(|literals| literals.len() <= 16) {
            Some(literals) => {
                let index = self.index.entry(header.to_string()).or_default();
                for literal in literals {
                    index.prefix.entry(literal.clone()).or_default().push(rank);
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
        tags.for_each_tag(&mut |name, value| {
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
            if let Some(regexes) = &index.regexes {
                regexes.for_each_holding(value, &mut consider);
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
