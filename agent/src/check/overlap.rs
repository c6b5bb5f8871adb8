//! Set reasoning over releases: which releases no request can ever reach because higher-priority
//! releases take all their traffic (shadowed, as in section 5.4 of the seed), which pairs of
//! equal priority some request matches both (errors), and, as information, how many releases
//! each one overlaps where distinct priorities decide.
//!
//! The model: a request carries at most one value per header (a request repeating a tag header
//! is outside it; the router then lets any of the values satisfy a matcher). A release's
//! requests form a box (`lang`): every header it *requires* (a matcher's header, the hash
//! header of a share) constrained to the values its matchers accept, every other header free,
//! absent included.
//!
//! Nothing here compares every release with every other. Releases are grouped by their set of
//! required headers, and each group is indexed per header by exact value and by prefix. The
//! pruning rules, and why each is sound (never drops a pair that overlaps):
//!
//! - **Disjoint headers.** Two releases that require no header in common always overlap: a
//!   request carrying one value of each release's headers matches both. Such pairs are counted
//!   by rank arithmetic over the group, not visited.
//! - **Values.** Two releases overlap only if, on every header both require, some value
//!   satisfies both conditions. So a release that requires value `v` of header `h` meets, in a
//!   group, only the members whose condition on `h` is exact `v`, a prefix of `v`, or something
//!   that is neither one exact value nor one prefix (a regex, several matchers): those are
//!   compared one by one. A release requiring prefix `p` meets exact values and prefixes that
//!   start with `p`, prefixes of `p`, and again the rest. Every member sits in exactly one of
//!   these buckets, so nothing is dropped and nothing is visited twice.
//! - **Shadowing by subsets.** A release R can only be shadowed by releases whose required
//!   headers are all among R's: R matches requests that carry R's headers and nothing else,
//!   and a release requiring any other header matches none of those. Conversely, whether the
//!   higher releases with headers among R's cover those requests settles it, since they look at
//!   nothing but R's headers. So shadowing candidates come from the groups of subsets of R's
//!   header set, through the value index, and only they enter the box covering.
//! - **Shares.** A release that takes only a share of its users never shadows on its own (some
//!   user of every request of R's falls outside it), so it is no shadowing candidate.
//!
//! What is decided exactly is reported as such; a regex analysis that gives up makes a verdict
//! "possible" and carries no example. Every example request shown is checked against the
//! router's own matching first: one that does not behave as reported is left out. All work is
//! counted against the solver's budget; when it runs out the analysis stops and says so.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{BuildHasherDefault, Hasher},
    ops::Range,
};

use super::{
    Finding, Overlap, OverlapSummary, Report, Shadowed,
    lang::{Atom, Cond, Lang, RequestBox, Solver, Witness, box_witness},
    render_example,
};
use crate::{
    config::{Config, Release},
    rules::{HeaderPairs, Matchers, Ruleset, Test, rank_order},
};

type Rank = u32;
type HeaderId = u32;
type CondId = u32;

/// Splits of one shadowing question before it is answered "possibly shadowed".
const COVER_BUDGET: usize = 2_000;

/// A release as the analysis sees it. Entries are in rank order: index = rank.
struct Entry<'a> {
    release: &'a Release,
    matchers: Matchers,
    request_box: RequestBox,
    /// Required headers, sorted, each with the interned condition on it.
    required: Vec<(HeaderId, CondId)>,
    /// Takes only part of its users: never shadows on its own.
    partial: bool,
}

/// What one header's condition looks like, for the index and for cheap comparisons.
enum Shape {
    /// Only required (a share's hash header): any present value.
    Any,
    Exact(String),
    Prefix(String),
    /// Regexes, or several matchers on one header.
    Other,
}

struct CondInfo {
    shape: Shape,
    cond: Cond,
    /// Every value of the condition starts with one of these (those of its first atom that
    /// has such a set); `None` if no atom has.
    prefixes: Option<Vec<String>>,
}

/// Can some value satisfy two conditions on one header?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compat {
    Yes,
    No,
    Unknown,
}

impl Compat {
    fn and(self, other: Compat) -> Compat {
        match (self, other) {
            (Compat::No, _) | (_, Compat::No) => Compat::No,
            (Compat::Unknown, _) | (_, Compat::Unknown) => Compat::Unknown,
            _ => Compat::Yes,
        }
    }
}

/// One header's members of a group, by the shape of their condition there.
#[derive(Default)]
struct ValueIndex {
    exact: BTreeMap<String, Vec<Rank>>,
    prefix: BTreeMap<String, Vec<Rank>>,
    /// Distinct lengths of the keys of `prefix`, ascending.
    prefix_lens: Vec<usize>,
    /// Members that only require the header (a share's hash header): they meet any value.
    any: Vec<Rank>,
    /// Members whose condition is none of these.
    other: Vec<Rank>,
}

/// The releases that require exactly one set of headers.
struct Group {
    headers: Vec<HeaderId>,
    /// Ranks, ascending.
    members: Vec<Rank>,
    /// Parallel to `headers`.
    values: Vec<ValueIndex>,
}

/// Everything built once per check run, read-only afterwards.
struct Index<'a> {
    entries: Vec<Entry<'a>>,
    conds: Vec<CondInfo>,
    groups: Vec<Group>,
    group_of: foldhash::HashMap<Vec<HeaderId>, usize>,
    /// For each rank, the ranks of equal priority: a contiguous range around it.
    same_priority: Vec<Range<Rank>>,
    /// The releases as the router would decide them, to check examples against.
    router: Ruleset,
}

/// The mutable side of the analysis: the solver's budget and DFAs, and decided condition pairs.
struct Work {
    solver: Solver,
    /// By `pair_key`.
    compat: HashMap<u64, Compat, BuildHasherDefault<PairHasher>>,
}

/// One u64 for an unordered pair of condition ids.
fn pair_key(a: CondId, b: CondId) -> u64 {
    (u64::from(a.min(b)) << 32) | u64::from(a.max(b))
}

/// The compat cache is looked up for most candidate pairs: a multiplicative hash of the pair
/// key, where SipHash cost as much as the regex match it saves.
#[derive(Default)]
struct PairHasher(u64);

impl Hasher for PairHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(26);
    }
}

/// Adds shadowed releases, equal-priority conflicts and overlap summaries to `report`;
/// `each_overlap`, when given, receives every overlapping pair of distinct priorities.
pub(super) fn analyse(
    config: &Config,
    options: &super::Options,
    mut each_overlap: Option<&mut dyn FnMut(Overlap)>,
    report: &mut Report,
) {
    let mut work = Work {
        solver: Solver::new(options.steps),
        compat: HashMap::default(),
    };
    let index = Index::build(config, &mut work, report);
    let mut completed = 0;
    for rank in 0..index.entries.len() as Rank {
        index.errors_of(rank, &mut work, report);
        if work.solver.exhausted() {
            break;
        }
        completed += 1;
    }
    let mut summaries = vec![Summary::default(); index.entries.len()];
    let mut examples_left = options.examples;
    let mut counted = 0;
    if !work.solver.exhausted() {
        for rank in 0..index.entries.len() as Rank {
            index.count_overlaps(
                rank,
                &mut work,
                &mut summaries,
                &mut examples_left,
                &mut each_overlap,
            );
            if work.solver.exhausted() {
                break;
            }
            counted += 1;
        }
    }
    let total = index.entries.len();
    if completed < total || counted < total {
        report.warnings.push(Finding {
            code: "analysis-incomplete",
            message: format!(
                "the overlap analysis reached its work budget: shadowing and equal-priority \
                 overlaps were analysed for {completed} of {total} releases, overlap counts for \
                 {counted} (counts are lower bounds); split the configuration or simplify its \
                 regexes"
            ),
            releases: vec![],
        });
    }
    report.overlaps = index
        .entries
        .iter()
        .zip(summaries)
        .filter(|(_, s)| s.above + s.below > 0)
        .map(|(entry, s)| OverlapSummary {
            release: entry.release.name.clone(),
            above: s.above,
            below: s.below,
            possible: s.possible,
            example: s.example,
        })
        .collect();
}

#[derive(Clone, Default)]
struct Summary {
    above: usize,
    below: usize,
    possible: usize,
    example: Option<Overlap>,
}

impl<'a> Index<'a> {
    /// Interns the releases the structural checks let through; reports releases no request
    /// can match.
    fn build(config: &'a Config, work: &mut Work, report: &mut Report) -> Index<'a> {
        let mut releases: Vec<&Release> = config.releases.iter().collect();
        releases.sort_by(|a, b| rank_order(a, b));
        let mut headers: foldhash::HashMap<String, HeaderId> = foldhash::HashMap::default();
        // Atoms hash by their source text; the regex cache inside never takes part.
        #[allow(clippy::mutable_key_type)]
        let mut cond_ids: foldhash::HashMap<(HeaderId, Vec<Atom>), CondId> =
            foldhash::HashMap::default();
        let mut conds: Vec<CondInfo> = Vec::new();
        let mut entries = Vec::new();
        for release in releases {
            // The structural checks report why a release's matchers are unusable.
            let Ok(matchers) = Matchers::parse(release) else {
                continue;
            };
            if matchers.conditions.is_empty() {
                continue;
            }
            let mut by_header: BTreeMap<&str, Vec<Atom>> = BTreeMap::new();
            for condition in &matchers.conditions {
                by_header
                    .entry(&condition.header)
                    .or_default()
                    .push(condition.test.clone());
            }
            if let Some(share) = &matchers.share {
                by_header.entry(&share.hash_by).or_default();
            }
            let mut request_box = RequestBox::new();
            let mut required = Vec::new();
            let mut contradiction = None;
            for (header, mut atoms) in by_header {
                atoms.sort_by_key(|a| a.to_string());
                atoms.dedup();
                let cond = Cond {
                    pos: atoms.clone(),
                    neg: vec![],
                };
                if cond.witness(&mut work.solver) == Witness::Empty {
                    contradiction = Some(header);
                }
                let next = headers.len() as HeaderId;
                let header_id = *headers.entry(header.to_string()).or_insert(next);
                let next = conds.len() as CondId;
                let cond_id = *cond_ids
                    .entry((header_id, atoms.clone()))
                    .or_insert_with(|| {
                        conds.push(CondInfo {
                            shape: match atoms.as_slice() {
                                [] => Shape::Any,
                                [Test::Exact(v)] => Shape::Exact(v.clone()),
                                [Test::Prefix(v)] => Shape::Prefix(v.clone()),
                                _ => Shape::Other,
                            },
                            prefixes: atoms.iter().find_map(|a| {
                                Some(a.prefixes()?.into_iter().map(str::to_string).collect())
                            }),
                            cond: cond.clone(),
                        });
                        next
                    });
                required.push((header_id, cond_id));
                request_box.insert(
                    header.to_string(),
                    Lang {
                        absent: false,
                        present: Some(cond),
                    },
                );
            }
            if let Some(header) = contradiction {
                let name = &release.name;
                report.errors.push(Finding {
                    code: "never-matches",
                    message: format!(
                        "release `{name}` matches no request: its matchers on `{header}` \
                         contradict each other"
                    ),
                    releases: vec![name.clone()],
                });
                continue;
            }
            required.sort_unstable();
            entries.push(Entry {
                release,
                partial: matchers.share.as_ref().is_some_and(|s| !s.is_everyone()),
                matchers,
                request_box,
                required,
            });
        }

        let mut groups: Vec<Group> = Vec::new();
        let mut group_of: foldhash::HashMap<Vec<HeaderId>, usize> = foldhash::HashMap::default();
        for (rank, entry) in entries.iter().enumerate() {
            let rank = rank as Rank;
            let key: Vec<HeaderId> = entry.required.iter().map(|(h, _)| *h).collect();
            let g = *group_of.entry(key.clone()).or_insert_with(|| {
                groups.push(Group {
                    values: key.iter().map(|_| ValueIndex::default()).collect(),
                    headers: key,
                    members: Vec::new(),
                });
                groups.len() - 1
            });
            let group = &mut groups[g];
            group.members.push(rank);
            for (values, (_, cond)) in group.values.iter_mut().zip(&entry.required) {
                match &conds[*cond as usize].shape {
                    Shape::Exact(v) => values.exact.entry(v.clone()).or_default().push(rank),
                    Shape::Prefix(p) => {
                        values.prefix.entry(p.clone()).or_default().push(rank);
                        values.prefix_lens.push(p.len());
                    }
                    Shape::Any => values.any.push(rank),
                    Shape::Other => values.other.push(rank),
                }
            }
        }
        for values in groups.iter_mut().flat_map(|g| &mut g.values) {
            values.prefix_lens.sort_unstable();
            values.prefix_lens.dedup();
        }

        let mut same_priority = Vec::with_capacity(entries.len());
        let mut start = 0;
        for (i, entry) in entries.iter().enumerate() {
            let end =
                i + 1 == entries.len() || entries[i + 1].release.priority != entry.release.priority;
            if end {
                let range = start as Rank..(i + 1) as Rank;
                same_priority.extend(std::iter::repeat_n(range, i + 1 - start));
                start = i + 1;
            }
        }
        let router = Ruleset::from_parsed(entries.iter().map(|e| (e.release, e.matchers.clone())));
        Index {
            entries,
            conds,
            groups,
            group_of,
            same_priority,
            router,
        }
    }

    /// Can some value satisfy both conditions (on one header)?
    fn compat(&self, work: &mut Work, a: CondId, b: CondId) -> Compat {
        if a == b {
            return Compat::Yes;
        }
        let (ia, ib) = (&self.conds[a as usize], &self.conds[b as usize]);
        let yes = |holds: bool| if holds { Compat::Yes } else { Compat::No };
        match (&ia.shape, &ib.shape) {
            (Shape::Any, _) | (_, Shape::Any) => return Compat::Yes,
            (Shape::Exact(x), Shape::Exact(y)) => return yes(x == y),
            (Shape::Exact(v), Shape::Prefix(p)) | (Shape::Prefix(p), Shape::Exact(v)) => {
                return yes(v.starts_with(p.as_str()));
            }
            (Shape::Prefix(p), Shape::Prefix(q)) => {
                return yes(p.starts_with(q.as_str()) || q.starts_with(p.as_str()));
            }
            _ => {}
        }
        let key = pair_key(a, b);
        if let Some(&known) = work.compat.get(&key) {
            return known;
        }
        if let (Shape::Exact(v), Shape::Other) | (Shape::Other, Shape::Exact(v)) =
            (&ia.shape, &ib.shape)
        {
            let other = if matches!(ia.shape, Shape::Other) {
                ia
            } else {
                ib
            };
            let answer = yes(other.cond.satisfied_by(v));
            work.compat.insert(key, answer);
            return answer;
        }
        // A common value starts with a literal of each side: one literal a prefix of the other.
        if let (Some(pa), Some(pb)) = (&ia.prefixes, &ib.prefixes)
            && !pa.iter().any(|x| {
                pb.iter()
                    .any(|y| x.starts_with(y.as_str()) || y.starts_with(x.as_str()))
            })
        {
            work.compat.insert(key, Compat::No);
            return Compat::No;
        }
        let both = Cond {
            pos: ia.cond.pos.iter().chain(&ib.cond.pos).cloned().collect(),
            neg: vec![],
        };
        let answer = match both.witness(&mut work.solver) {
            Witness::Found(_) => Compat::Yes,
            Witness::Empty => Compat::No,
            Witness::Unknown => Compat::Unknown,
        };
        work.compat.insert(key, answer);
        answer
    }

    /// Do the two releases overlap, as far as their conditions on shared headers tell?
    fn pair(&self, work: &mut Work, a: Rank, b: Rank) -> Compat {
        let (mut x, mut y) = (
            self.entries[a as usize].required.iter().peekable(),
            self.entries[b as usize].required.iter().peekable(),
        );
        let mut answer = Compat::Yes;
        while let (Some(&&(hx, cx)), Some(&&(hy, cy))) = (x.peek(), y.peek()) {
            match hx.cmp(&hy) {
                std::cmp::Ordering::Less => {
                    x.next();
                }
                std::cmp::Ordering::Greater => {
                    y.next();
                }
                std::cmp::Ordering::Equal => {
                    answer = answer.and(self.compat(work, cx, cy));
                    if answer == Compat::No {
                        return answer;
                    }
                    x.next();
                    y.next();
                }
            }
        }
        answer
    }

    /// The members of `group` ranked in `range` that may overlap release `rank`, through the
    /// value index (see the module comment), with how sure that is. `None` when `rank` shares
    /// no header with the group: then every member overlaps it.
    fn overlapping(
        &self,
        work: &mut Work,
        rank: Rank,
        group: &Group,
        range: Range<Rank>,
        out: &mut Vec<(Rank, Compat)>,
    ) -> Option<()> {
        out.clear();
        let entry = &self.entries[rank as usize];
        // The shared header where this release's condition selects the fewest members.
        let shared = group.headers.iter().enumerate().filter_map(|(i, h)| {
            let (_, cond) = entry.required.iter().find(|(mine, _)| mine == h)?;
            Some((i, *cond))
        });
        let selectivity = |cond: CondId| {
            let info = &self.conds[cond as usize];
            match info.shape {
                Shape::Exact(_) => 0,
                Shape::Prefix(_) => 1,
                Shape::Other if info.prefixes.is_some() => 2,
                Shape::Other | Shape::Any => 3,
            }
        };
        let (i, cond) = shared.min_by_key(|(_, c)| selectivity(*c))?;
        let values = &group.values[i];
        let mut buckets = Vec::new();
        if self
            .compatible_buckets(values, cond, &mut buckets)
            .is_some()
        {
            buckets.push(&values.any);
            buckets.push(&values.other);
        } else {
            buckets.push(&group.members);
        }
        for bucket in buckets {
            let from = bucket.partition_point(|&r| r < range.start);
            for &other in bucket[from..].iter().take_while(|&&r| r < range.end) {
                if other == rank || !work.solver.spend(1) {
                    continue;
                }
                match self.pair(work, rank, other) {
                    Compat::No => {}
                    answer => out.push((other, answer)),
                }
            }
        }
        Some(())
    }

    /// The buckets of `values` whose exact values and prefixes may meet condition `cond`:
    /// `Some(true)` when every member of them does (one exact value or prefix against
    /// another), `Some(false)` when they still need comparing one by one (a regex, through its
    /// literal prefixes), `None` (nothing added) when the index cannot narrow them.
    fn compatible_buckets<'v>(
        &self,
        values: &'v ValueIndex,
        cond: CondId,
        out: &mut Vec<&'v [Rank]>,
    ) -> Option<bool> {
        let info = &self.conds[cond as usize];
        let literals: Vec<&str> = match &info.shape {
            Shape::Exact(v) => {
                out.extend(values.exact.get(v.as_str()).map(Vec::as_slice));
                for &len in values.prefix_lens.iter().take_while(|&&l| l <= v.len()) {
                    if let Some(list) = v.get(..len).and_then(|p| values.prefix.get(p)) {
                        out.push(list);
                    }
                }
                return Some(true);
            }
            Shape::Prefix(p) => vec![p.as_str()],
            Shape::Other => info.prefixes.as_ref()?.iter().map(String::as_str).collect(),
            Shape::Any => return None,
        };
        for p in &literals {
            out.extend(starting_with(&values.exact, p));
            // Prefixes extending p (p itself included), then the shorter ones p extends.
            out.extend(starting_with(&values.prefix, p));
            for &len in values.prefix_lens.iter().take_while(|&&l| l < p.len()) {
                if let Some(list) = p.get(..len).and_then(|q| values.prefix.get(q)) {
                    out.push(list);
                }
            }
        }
        if literals.len() > 1 {
            // One literal may extend another: each bucket once.
            out.sort_unstable_by_key(|list| list.as_ptr());
            out.dedup_by_key(|list| list.as_ptr());
        }
        Some(matches!(info.shape, Shape::Prefix(_)))
    }

    /// How many members of `group` ranked in `range` overlap release `rank`, and how many of
    /// those only possibly. Where one header decides, whole index buckets are counted, not
    /// visited.
    fn count_in(
        &self,
        work: &mut Work,
        rank: Rank,
        group: &Group,
        range: &Range<Rank>,
    ) -> (usize, usize) {
        if range.is_empty() {
            return (0, 0);
        }
        let entry = &self.entries[rank as usize];
        // Shared headers where this release's condition is more than "present".
        let deciding: Vec<(usize, CondId)> = group
            .headers
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                let (_, cond) = entry.required.iter().find(|(mine, _)| mine == h)?;
                (!matches!(self.conds[*cond as usize].shape, Shape::Any)).then_some((i, *cond))
            })
            .collect();
        let within = |list: &[Rank]| {
            list.partition_point(|&r| r < range.end) - list.partition_point(|&r| r < range.start)
        };
        match deciding.as_slice() {
            // Every member overlaps: this release accepts any value they may require.
            [] => (Self::in_range(group, range).len(), 0),
            &[(i, cond)] => {
                let values = &group.values[i];
                let mut buckets = Vec::new();
                let Some(decided) = self.compatible_buckets(values, cond, &mut buckets) else {
                    return self.count_visiting(work, rank, group, range);
                };
                let mut count = within(&values.any);
                let mut unsure = vec![&values.other[..]];
                if decided {
                    count += buckets.into_iter().map(within).sum::<usize>();
                } else {
                    unsure.extend(buckets);
                }
                let mut possible = 0;
                let header = group.headers[i];
                for list in unsure {
                    let from = list.partition_point(|&r| r < range.start);
                    for &other in list[from..].iter().take_while(|&&r| r < range.end) {
                        if !work.solver.spend(1) {
                            break;
                        }
                        let theirs = self.entries[other as usize]
                            .required
                            .iter()
                            .find(|(h, _)| *h == header)
                            .map(|(_, c)| *c)
                            .expect("members require the group's headers");
                        match self.compat(work, cond, theirs) {
                            Compat::No => {}
                            Compat::Yes => count += 1,
                            Compat::Unknown => {
                                count += 1;
                                possible += 1;
                            }
                        }
                    }
                }
                (count, possible)
            }
            _ => self.count_visiting(work, rank, group, range),
        }
    }

    fn count_visiting(
        &self,
        work: &mut Work,
        rank: Rank,
        group: &Group,
        range: &Range<Rank>,
    ) -> (usize, usize) {
        let mut found = Vec::new();
        match self.overlapping(work, rank, group, range.clone(), &mut found) {
            None => (Self::in_range(group, range).len(), 0),
            Some(()) => (
                found.len(),
                found.iter().filter(|(_, c)| *c == Compat::Unknown).count(),
            ),
        }
    }

    /// The members of `group` ranked in `range`, when none shares a header with the release.
    fn in_range<'g>(group: &'g Group, range: &Range<Rank>) -> &'g [Rank] {
        let from = group.members.partition_point(|&r| r < range.start);
        let to = group.members.partition_point(|&r| r < range.end);
        &group.members[from..to]
    }

    /// Equal-priority overlaps of `rank` with the releases ranked before it, and whether it is
    /// shadowed.
    fn errors_of(&self, rank: Rank, work: &mut Work, report: &mut Report) {
        let equal = self.same_priority[rank as usize].start..rank;
        let mut found = Vec::new();
        if !equal.is_empty() {
            for group in &self.groups {
                if !work.solver.spend(1) {
                    return;
                }
                match self.overlapping(work, rank, group, equal.clone(), &mut found) {
                    Some(()) => {}
                    None => found.extend(
                        Self::in_range(group, &equal)
                            .iter()
                            .map(|&r| (r, Compat::Yes)),
                    ),
                }
                for &(other, answer) in &found {
                    self.ambiguous(work, other, rank, answer, report);
                }
            }
        }
        self.shadowing(rank, work, report);
    }

    fn ambiguous(&self, work: &mut Work, a: Rank, b: Rank, answer: Compat, report: &mut Report) {
        let (first, second) = (
            &self.entries[a as usize].release,
            &self.entries[b as usize].release,
        );
        let example = match answer {
            Compat::Yes => self.example(work, &[a, b]),
            _ => None,
        };
        let names = vec![first.name.clone(), second.name.clone()];
        let priority = first.priority;
        let (first, second) = (&first.name, &second.name);
        match example {
            Some(example) => report.errors.push(Finding {
                code: "ambiguous-priority",
                message: format!(
                    "releases `{first}` and `{second}` both have priority {priority} and a request \
                     can match both (e.g. {{{}}}): give the narrower one the smaller number",
                    render_example(&example)
                ),
                releases: names,
            }),
            // Without a request that shows it, this is not a proven conflict.
            None => report.warnings.push(Finding {
                code: "possible-ambiguous-priority",
                message: format!(
                    "releases `{first}` and `{second}` both have priority {priority} and a \
                     request may match both (the analysis of their regexes or shares found no \
                     example): give them distinct priorities"
                ),
                releases: names,
            }),
        }
    }

    /// Shadowing candidates of `rank`: higher releases taking all their users, whose required
    /// headers are among its own (module comment), that may overlap it; in rank order.
    fn shadow_candidates(&self, rank: Rank, work: &mut Work) -> Vec<Rank> {
        let headers: Vec<HeaderId> = self.entries[rank as usize]
            .required
            .iter()
            .map(|(h, _)| *h)
            .collect();
        let groups: Vec<&Group> = if headers.len() < usize::BITS as usize
            && 1usize << headers.len() <= self.groups.len()
        {
            (1usize..1 << headers.len())
                .filter_map(|mask| {
                    let subset: Vec<HeaderId> = headers
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| mask & (1 << i) != 0)
                        .map(|(_, h)| *h)
                        .collect();
                    self.group_of.get(&subset).map(|&g| &self.groups[g])
                })
                .collect()
        } else {
            self.groups
                .iter()
                .filter(|g| g.headers.iter().all(|h| headers.contains(h)))
                .collect()
        };
        let mut candidates = Vec::new();
        let mut found = Vec::new();
        for group in groups {
            if !work.solver.spend(1) {
                break;
            }
            if self
                .overlapping(work, rank, group, 0..rank, &mut found)
                .is_some()
            {
                candidates.extend(
                    found
                        .iter()
                        .map(|&(r, _)| r)
                        .filter(|&r| !self.entries[r as usize].partial),
                );
            }
        }
        candidates.sort_unstable();
        candidates
    }

    fn shadowing(&self, rank: Rank, work: &mut Work, report: &mut Report) {
        let candidates = self.shadow_candidates(rank, work);
        if candidates.is_empty() || work.solver.exhausted() {
            return;
        }
        let entry = &self.entries[rank as usize];
        // A request of the release that no candidate takes settles it cheaply.
        let own = self.example(work, &[rank]);
        if let Some(own) = &own {
            let tags = HeaderPairs::new(own.iter());
            if !candidates.iter().any(|&c| self.matches(c, &tags)) {
                return;
            }
        }
        let approximate = match self.one_header_cover(rank, &candidates, work) {
            Some(Cover::Escapes) => return,
            Some(Cover::Covered) => false,
            Some(Cover::Unknown) => true,
            None => {
                let boxes: Vec<&RequestBox> = candidates
                    .iter()
                    .map(|&c| &self.entries[c as usize].request_box)
                    .collect();
                let mut budget = COVER_BUDGET;
                match covered(&entry.request_box, &boxes, &mut work.solver, &mut budget) {
                    Cover::Covered => false,
                    Cover::Escapes => return,
                    Cover::Unknown => true,
                }
            }
        };
        // When one release takes all of it, releases ranked below that one never see its
        // traffic: name only those up to it.
        let first_container = candidates.iter().position(|&c| {
            contains(
                &self.entries[c as usize].request_box,
                &entry.request_box,
                &mut work.solver,
            ) == Some(true)
        });
        let by: Vec<String> = candidates[..first_container.map_or(candidates.len(), |p| p + 1)]
            .iter()
            .map(|&c| self.entries[c as usize].release.name.clone())
            .collect();
        // The example must go to one of `by`, as the router decides.
        let example = own.filter(|own| {
            let tags = HeaderPairs::new(own.iter());
            self.router
                .decide(&tags)
                .is_some_and(|winner| by.iter().any(|b| **b == *winner.name))
        });
        let name = &entry.release.name;
        let releases: Vec<String> = std::iter::once(name.clone()).chain(by.clone()).collect();
        if approximate {
            report.warnings.push(Finding {
                code: "possibly-shadowed",
                message: format!(
                    "release `{name}` may be shadowed by {} (the analysis of its regexes is \
                     approximate)",
                    quoted(&by)
                ),
                releases,
            });
        } else {
            report.errors.push(Finding {
                code: "shadowed",
                message: format!(
                    "release `{name}` (priority {}) never receives traffic: every request it \
                     matches goes to {} first{}; give `{name}` a smaller priority number: \
                     narrower releases go first",
                    entry.release.priority,
                    quoted(&by),
                    example
                        .as_ref()
                        .map(|e| format!(" (e.g. {{{}}})", render_example(e)))
                        .unwrap_or_default()
                ),
                releases,
            });
        }
        report.shadowed.push(Shadowed {
            release: name.clone(),
            by,
            example,
            approximate,
        });
    }

    /// When every candidate requires one and the same header, with one matcher, the release's
    /// box is covered exactly when its values of that header are (the candidates look at
    /// nothing else): one search for a value outside all of them settles it, where splitting
    /// boxes would take one search per piece. `None` when the candidates are not of that kind.
    fn one_header_cover(&self, rank: Rank, candidates: &[Rank], work: &mut Work) -> Option<Cover> {
        let mut header = None;
        let mut neg = Vec::with_capacity(candidates.len());
        for &c in candidates {
            let [(h, cond)] = self.entries[c as usize].required.as_slice() else {
                return None;
            };
            if header.is_some_and(|seen| seen != *h) {
                return None;
            }
            header = Some(*h);
            let [atom] = self.conds[*cond as usize].cond.pos.as_slice() else {
                return None;
            };
            neg.push(atom.clone());
        }
        let header = header?;
        let (_, mine) = self.entries[rank as usize]
            .required
            .iter()
            .find(|(h, _)| *h == header)?;
        let outside = Cond {
            pos: self.conds[*mine as usize].cond.pos.clone(),
            neg,
        };
        Some(match outside.witness(&mut work.solver) {
            Witness::Found(_) => Cover::Escapes,
            Witness::Empty => Cover::Covered,
            Witness::Unknown => Cover::Unknown,
        })
    }

    /// Counts the overlaps of `rank` with the releases above and below it (each release counts
    /// its own); finds it an example while the report has room, and streams each pair with a
    /// higher release to `each` when given.
    fn count_overlaps(
        &self,
        rank: Rank,
        work: &mut Work,
        summaries: &mut [Summary],
        examples_left: &mut usize,
        each: &mut Option<&mut dyn FnMut(Overlap)>,
    ) {
        let equal = &self.same_priority[rank as usize];
        let above = 0..equal.start;
        let below = equal.end..self.entries.len() as Rank;
        let mut found = Vec::new();
        for group in &self.groups {
            if !work.solver.spend(1) {
                return;
            }
            let (higher, possible_higher) = self.count_in(work, rank, group, &above);
            let (lower, possible_lower) = self.count_in(work, rank, group, &below);
            let summary = &mut summaries[rank as usize];
            summary.above += higher;
            summary.below += lower;
            summary.possible += possible_higher + possible_lower;
            let wanted = higher > 0 && *examples_left > 0 && summary.example.is_none();
            if wanted || each.is_some() {
                if self
                    .overlapping(work, rank, group, above.clone(), &mut found)
                    .is_none()
                {
                    found.extend(
                        Self::in_range(group, &above)
                            .iter()
                            .map(|&r| (r, Compat::Yes)),
                    );
                }
                self.examples(work, rank, &found, summaries, examples_left, each);
            }
        }
    }

    /// Gives `rank` an example overlap from `found` while examples are left, and streams every
    /// pair of `found` to `each`.
    fn examples(
        &self,
        work: &mut Work,
        rank: Rank,
        found: &[(Rank, Compat)],
        summaries: &mut [Summary],
        examples_left: &mut usize,
        each: &mut Option<&mut dyn FnMut(Overlap)>,
    ) {
        for &(other, answer) in found {
            let wanted = *examples_left > 0 && summaries[rank as usize].example.is_none();
            if !wanted && each.is_none() {
                return;
            }
            let overlap = self.overlap(work, other, rank, answer);
            if wanted && overlap.example.is_some() {
                *examples_left -= 1;
                summaries[rank as usize].example = Some(overlap.clone());
            }
            if let Some(each) = each {
                each(overlap);
            }
        }
    }

    fn overlap(&self, work: &mut Work, winner: Rank, loser: Rank, answer: Compat) -> Overlap {
        let example = match answer {
            Compat::Yes => self.example(work, &[winner, loser]),
            _ => None,
        };
        let (w, l) = (
            &self.entries[winner as usize].release.name,
            &self.entries[loser as usize].release.name,
        );
        Overlap {
            releases: [w.clone(), l.clone()],
            winner: w.clone(),
            approximate: answer != Compat::Yes,
            example,
        }
    }

    fn matches(&self, rank: Rank, tags: &HeaderPairs) -> bool {
        let entry = &self.entries[rank as usize];
        entry.matchers.matches(&entry.release.name, tags)
    }

    /// A request that every release of `ranks` matches, checked against the router's
    /// matching; `None` when there is none or none was found.
    fn example(&self, work: &mut Work, ranks: &[Rank]) -> Option<BTreeMap<String, String>> {
        let mut both = RequestBox::new();
        for &r in ranks {
            both = intersect(&both, &self.entries[r as usize].request_box);
        }
        let example = with_users(box_witness(&both, &mut work.solver).ok()?, self, ranks);
        let tags = HeaderPairs::new(example.iter());
        ranks
            .iter()
            .all(|&r| self.matches(r, &tags))
            .then_some(example)
    }
}

/// The lists of the keys of `map` that start with `prefix`.
fn starting_with<'m>(
    map: &'m BTreeMap<String, Vec<Rank>>,
    prefix: &str,
) -> impl Iterator<Item = &'m [Rank]> {
    map.range::<str, _>((
        std::ops::Bound::Included(prefix),
        std::ops::Bound::Unbounded,
    ))
    .take_while(move |(k, _)| k.starts_with(prefix))
    .map(|(_, list)| list.as_slice())
}

/// Fills the hash headers of share releases with a user inside every share involved. A header
/// whose value the matchers dictate is left alone; the caller checks the result.
fn with_users(
    mut example: BTreeMap<String, String>,
    index: &Index,
    ranks: &[Rank],
) -> BTreeMap<String, String> {
    let involved: Vec<&Entry> = ranks.iter().map(|&r| &index.entries[r as usize]).collect();
    for share in involved.iter().filter_map(|e| e.matchers.share.as_ref()) {
        let header = &share.hash_by;
        let pinned = involved.iter().any(|e| {
            e.request_box
                .get(header)
                .and_then(|lang| lang.present.as_ref())
                .is_some_and(|cond| !cond.pos.is_empty())
        });
        if pinned {
            continue;
        }
        let inside_all = |user: &String| {
            involved.iter().all(|e| match &e.matchers.share {
                Some(s) if &s.hash_by == header => s.admits(&e.release.name, user),
                _ => true,
            })
        };
        if let Some(user) = (0..10_000).map(|n| format!("user-{n}")).find(inside_all) {
            example.insert(header.clone(), user);
        }
    }
    example
}

/// The requests in both boxes.
fn intersect(a: &RequestBox, b: &RequestBox) -> RequestBox {
    let mut out = a.clone();
    for (header, lang) in b {
        let mine = out.entry(header.clone()).or_insert_with(Lang::any);
        mine.absent &= lang.absent;
        match (&mut mine.present, &lang.present) {
            (Some(cond), Some(theirs)) => {
                cond.pos.extend(theirs.pos.iter().cloned());
                cond.neg.extend(theirs.neg.iter().cloned());
            }
            (present, _) => *present = None,
        }
    }
    out
}

enum Cover {
    Covered,
    /// Some request of the box matches none of the others.
    Escapes,
    Unknown,
}

/// Is every request of `inner` inside `outer`? `outer` is a release box: required headers with
/// positive atoms only.
fn contains(outer: &RequestBox, inner: &RequestBox, solver: &mut Solver) -> Option<bool> {
    for (header, lang) in outer {
        let mine = inner.get(header).cloned().unwrap_or_else(Lang::any);
        if mine.absent {
            return Some(false);
        }
        let Some(present) = &mine.present else {
            continue;
        };
        for atom in lang.present.iter().flat_map(|c| &c.pos) {
            let mut outside = present.clone();
            outside.neg.push(atom.clone());
            match outside.witness(solver) {
                Witness::Empty => {}
                Witness::Found(_) => return Some(false),
                Witness::Unknown => return None,
            }
        }
    }
    Some(true)
}

/// Is every request of `inner` inside the union of `others`? Splits `inner` along the headers
/// of the others until each piece is inside one of them or escapes all.
fn covered(
    inner: &RequestBox,
    others: &[&RequestBox],
    solver: &mut Solver,
    budget: &mut usize,
) -> Cover {
    if *budget == 0 || !solver.spend(1) {
        return Cover::Unknown;
    }
    *budget -= 1;
    match box_witness(inner, solver) {
        Ok(_) => {}
        Err(Witness::Empty) => return Cover::Covered,
        Err(_) => return Cover::Unknown,
    }
    let relevant: Vec<&RequestBox> = others
        .iter()
        .copied()
        .filter(|o| {
            !matches!(
                box_witness(&intersect(inner, o), solver),
                Err(Witness::Empty)
            )
        })
        .collect();
    let Some(&splitter) = relevant.first() else {
        return Cover::Escapes;
    };
    for outer in &relevant {
        match contains(outer, inner, solver) {
            Some(true) => return Cover::Covered,
            Some(false) => {}
            None => return Cover::Unknown,
        }
    }
    // Split `inner` along one header of `splitter`: the part inside it, and the parts outside.
    let Some((header, atoms)) = splitter.iter().find_map(|(header, lang)| {
        let single: RequestBox = [(header.clone(), lang.clone())].into();
        (contains(&single, inner, solver) != Some(true))
            .then(|| (header.clone(), lang.present.clone().unwrap_or_default().pos))
    }) else {
        return Cover::Unknown;
    };
    let base = inner.get(&header).cloned().unwrap_or_else(Lang::any);
    let mut pieces = Vec::new();
    let with = |lang: Lang| {
        let mut piece = inner.clone();
        piece.insert(header.clone(), lang);
        piece
    };
    if base.absent {
        pieces.push(with(Lang {
            absent: true,
            present: None,
        }));
    }
    if let Some(present) = &base.present {
        for (j, atom) in atoms.iter().enumerate() {
            let mut outside = present.clone();
            outside.pos.extend(atoms[..j].iter().cloned());
            outside.neg.push(atom.clone());
            pieces.push(with(Lang {
                absent: false,
                present: Some(outside),
            }));
        }
        let mut inside = present.clone();
        inside.pos.extend(atoms.iter().cloned());
        pieces.push(with(Lang {
            absent: false,
            present: Some(inside),
        }));
    }
    for piece in pieces {
        match covered(&piece, &relevant, solver, budget) {
            Cover::Covered => {}
            other => return other,
        }
    }
    Cover::Covered
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
