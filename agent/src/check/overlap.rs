//! Set reasoning over releases: which pairs some request matches both (overlaps, and the
//! equal-priority ones that are errors), and which releases no request can ever reach because
//! higher-priority releases take all their traffic (shadowed, as in section 5.4 of the seed).
//!
//! Candidate pairs come from an index on exact matchers (two releases that require different
//! exact values of one header never overlap), so checking thousands of disjoint releases stays
//! fast. Shadowing is decided by box covering: the release's box is split along the headers of
//! the higher releases until each piece is inside one of them (shadowed) or a piece outside all
//! of them yields a request that still reaches the release (not shadowed).

use std::collections::{BTreeMap, HashMap};

use super::{
    Finding, Overlap, Report, Shadowed,
    lang::{Atom, Cond, DfaCache, Lang, RequestBox, Witness, box_witness},
    render_example,
};
use crate::{
    config::{Config, MatchKind, Release},
    rules::{compile_whole_value_regex, sticky_hash},
};

/// A release as the analysis sees it.
struct Candidate<'a> {
    release: &'a Release,
    request_box: RequestBox,
    /// (hashBy header, threshold) when the release takes only a share of its users.
    share: Option<(String, u64)>,
    /// Header -> the exact value this release requires there (the index key).
    exact: HashMap<String, &'a str>,
}

/// Splits of one shadowing question before it is answered "approximately".
const COVER_BUDGET: usize = 2_000;

fn candidate(release: &Release) -> Option<Candidate<'_>> {
    let mut request_box = RequestBox::new();
    let mut exact = HashMap::new();
    if release.matchers.is_empty() {
        return None;
    }
    for matcher in &release.matchers {
        let header = matcher.header.to_ascii_lowercase();
        let atom = match matcher.kind().ok()? {
            MatchKind::Exact(v) => {
                exact.entry(header.clone()).or_insert(v);
                Atom::Exact(v.to_string())
            }
            MatchKind::Prefix(v) => Atom::Prefix(v.to_string()),
            MatchKind::Regex(r) => {
                compile_whole_value_regex(r).ok()?;
                Atom::Regex(r.to_string())
            }
        };
        require(&mut request_box, &header).pos.push(atom);
    }
    let share = match (release.percent, &release.hash_by) {
        (None, None) => None,
        (Some(p), Some(header)) if p > 0.0 && p <= 100.0 => {
            let header = header.to_ascii_lowercase();
            require(&mut request_box, &header);
            (p < 100.0).then(|| (header, (p / 100.0 * u64::MAX as f64) as u64))
        }
        _ => return None,
    };
    Some(Candidate {
        release,
        request_box,
        share,
        exact,
    })
}

/// Makes `header` required (present) in the box and returns its present-value condition.
fn require<'b>(request_box: &'b mut RequestBox, header: &str) -> &'b mut Cond {
    let lang = request_box
        .entry(header.to_string())
        .or_insert_with(Lang::any);
    lang.absent = false;
    lang.present.get_or_insert_with(Cond::default)
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
fn contains(outer: &RequestBox, inner: &RequestBox, dfas: &mut DfaCache) -> Option<bool> {
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
            match outside.witness(dfas) {
                Witness::Empty => {}
                Witness::Found(_) => return Some(false),
                Witness::Unknown => return None,
            }
        }
    }
    Some(true)
}

fn covered(
    inner: &RequestBox,
    others: &[&RequestBox],
    dfas: &mut DfaCache,
    budget: &mut usize,
) -> Cover {
    if *budget == 0 {
        return Cover::Unknown;
    }
    *budget -= 1;
    match box_witness(inner, dfas) {
        Ok(_) => {}
        Err(Witness::Empty) => return Cover::Covered,
        Err(_) => return Cover::Unknown,
    }
    let relevant: Vec<&RequestBox> = others
        .iter()
        .copied()
        .filter(|o| !matches!(box_witness(&intersect(inner, o), dfas), Err(Witness::Empty)))
        .collect();
    let Some(&splitter) = relevant.first() else {
        return Cover::Escapes;
    };
    for outer in &relevant {
        match contains(outer, inner, dfas) {
            Some(true) => return Cover::Covered,
            Some(false) => {}
            None => return Cover::Unknown,
        }
    }
    // Split `inner` along one header of `splitter`: the part inside it, and the parts outside.
    let Some((header, atoms)) = splitter.iter().find_map(|(header, lang)| {
        let single: RequestBox = [(header.clone(), lang.clone())].into();
        (contains(&single, inner, dfas) != Some(true))
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
        match covered(&piece, &relevant, dfas, budget) {
            Cover::Covered => {}
            other => return other,
        }
    }
    Cover::Covered
}

/// Fills the hash headers of share releases with a user inside every share involved, so the
/// example really behaves as reported. A header whose value the matchers dictate is left alone.
fn with_users(
    mut example: BTreeMap<String, String>,
    involved: &[&Candidate],
) -> BTreeMap<String, String> {
    for (header, _) in involved.iter().filter_map(|c| c.share.as_ref()) {
        let pinned = involved.iter().any(|c| {
            c.request_box
                .get(header)
                .and_then(|lang| lang.present.as_ref())
                .is_some_and(|cond| !cond.pos.is_empty())
        });
        if pinned {
            continue;
        }
        let inside_all = |user: &String| {
            involved.iter().all(|c| match &c.share {
                Some((h, threshold)) if h == header => {
                    sticky_hash(&c.release.name, user) < *threshold
                }
                _ => true,
            })
        };
        if let Some(user) = (0..10_000).map(|n| format!("user-{n}")).find(inside_all) {
            example.insert(header.clone(), user);
        }
    }
    example
}

/// Adds overlaps, equal-priority conflicts and shadowed releases to `report`.
pub(super) fn analyse(config: &Config, report: &mut Report) {
    let mut candidates: Vec<Candidate> = config.releases.iter().filter_map(candidate).collect();
    candidates.sort_by(|a, b| {
        (a.release.priority, &a.release.name).cmp(&(b.release.priority, &b.release.name))
    });
    let mut dfas = DfaCache::default();

    // Index: (header, exact value) -> releases; and, per header, the releases that do not pin
    // that header to one value (they may overlap anything pinned there).
    let mut by_exact: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
    for (i, c) in candidates.iter().enumerate() {
        for (header, value) in &c.exact {
            by_exact.entry((header, value)).or_default().push(i);
        }
    }
    let mut unpinned: HashMap<&str, Vec<usize>> = HashMap::new();
    for c in &candidates {
        for header in c.exact.keys() {
            unpinned.entry(header).or_insert_with(|| {
                (0..candidates.len())
                    .filter(|&j| !candidates[j].exact.contains_key(header))
                    .collect()
            });
        }
    }
    // Two releases that pin one header to different values never overlap.
    let pins_agree = |a: &Candidate, b: &Candidate| {
        a.exact
            .iter()
            .all(|(h, v)| b.exact.get(h).is_none_or(|w| w == v))
    };

    // overlapping[j] = the higher-ranked releases i < j that some request matches with j.
    let mut overlapping: Vec<Vec<usize>> = vec![Vec::new(); candidates.len()];
    for (i, a) in candidates.iter().enumerate() {
        // Partners come from the most selective of the release's pinned headers.
        let lists = a.exact.iter().map(|(header, value)| {
            let pinned = by_exact
                .get(&(header.as_str(), *value))
                .map_or(&[][..], Vec::as_slice);
            let open = unpinned.get(header.as_str()).map_or(&[][..], Vec::as_slice);
            (pinned.len() + open.len(), pinned, open)
        });
        let mut partners: Vec<usize> = match lists.min_by_key(|(len, _, _)| *len) {
            Some((_, pinned, open)) => pinned
                .iter()
                .chain(open)
                .copied()
                .filter(|&j| j > i && pins_agree(a, &candidates[j]))
                .collect(),
            None => (i + 1..candidates.len()).collect(),
        };
        partners.sort_unstable();
        partners.dedup();
        for j in partners {
            let b = &candidates[j];
            let both = intersect(&a.request_box, &b.request_box);
            let (example, approximate) = match box_witness(&both, &mut dfas) {
                Ok(example) => (with_users(example, &[a, b]), false),
                Err(Witness::Empty) => continue,
                Err(_) => (BTreeMap::new(), true),
            };
            overlapping[j].push(i);
            let (first, second) = (&a.release.name, &b.release.name);
            if a.release.priority == b.release.priority {
                let finding = Finding {
                    code: if approximate {
                        "possible-ambiguous-priority"
                    } else {
                        "ambiguous-priority"
                    },
                    message: format!(
                        "releases `{first}` and `{second}` both have priority {} and a request \
                         can match both (e.g. {{{}}}): give the narrower one the smaller number",
                        a.release.priority,
                        render_example(&example)
                    ),
                    releases: vec![first.clone(), second.clone()],
                };
                if approximate {
                    report.warnings.push(finding);
                } else {
                    report.errors.push(finding);
                }
            } else {
                report.overlaps.push(Overlap {
                    releases: [first.clone(), second.clone()],
                    winner: first.clone(),
                    example,
                    approximate,
                });
            }
        }
    }

    for (j, release) in candidates.iter().enumerate() {
        // Only releases that take every user they match can take all of another's traffic.
        let higher: Vec<usize> = overlapping[j]
            .iter()
            .copied()
            .filter(|&i| candidates[i].share.is_none())
            .collect();
        if higher.is_empty() {
            continue;
        }
        let boxes: Vec<&RequestBox> = higher.iter().map(|&i| &candidates[i].request_box).collect();
        let mut budget = COVER_BUDGET;
        let approximate = match covered(&release.request_box, &boxes, &mut dfas, &mut budget) {
            Cover::Covered => false,
            Cover::Escapes => continue,
            Cover::Unknown => true,
        };
        // When one release takes all of it, releases ranked below that one never see its
        // traffic: name only those up to it. `higher` is in rank order.
        let first_container = higher.iter().position(|&i| {
            contains(&candidates[i].request_box, &release.request_box, &mut dfas) == Some(true)
        });
        let by: Vec<String> = higher[..first_container.map_or(higher.len(), |p| p + 1)]
            .iter()
            .map(|&i| candidates[i].release.name.clone())
            .collect();
        let example = box_witness(&release.request_box, &mut dfas)
            .map(|e| with_users(e, &[release]))
            .unwrap_or_default();
        let name = &release.release.name;
        if approximate {
            report.warnings.push(Finding {
                code: "possibly-shadowed",
                message: format!(
                    "release `{name}` may be shadowed by {} (the analysis of its regexes is \
                     approximate)",
                    quoted(&by)
                ),
                releases: std::iter::once(name.clone()).chain(by.clone()).collect(),
            });
        } else {
            report.errors.push(Finding {
                code: "shadowed",
                message: format!(
                    "release `{name}` (priority {}) never receives traffic: every request it \
                     matches goes to {} first (e.g. {{{}}}); give `{name}` a smaller priority \
                     number: narrower releases go first",
                    release.release.priority,
                    quoted(&by),
                    render_example(&example)
                ),
                releases: std::iter::once(name.clone()).chain(by.clone()).collect(),
            });
        }
        report.shadowed.push(Shadowed {
            release: name.clone(),
            by,
            example,
            approximate,
        });
    }
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
