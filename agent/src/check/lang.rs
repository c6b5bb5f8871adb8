//! Sets of requests as the checker reasons about them.
//!
//! A release's requests form a *box*: a product over header names of per-header value sets.
//! A per-header set (`Lang`) is "absent" and/or the present values satisfying a conjunction of
//! positive and negative atoms (exact, prefix, whole-value regex). Exact and prefix atoms are
//! decided with string logic; as soon as a regex is involved the atoms are compiled to DFAs and
//! a breadth-first search over their product finds the shortest witness value (over visible
//! ASCII, the values a header can carry). When that search exceeds its budget the answer is
//! marked approximate.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use regex_automata::{
    Anchored, MatchKind,
    dfa::{Automaton, dense},
    util::{primitives::StateID, start},
};

/// One condition on a present header value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Atom {
    Exact(String),
    Prefix(String),
    /// A whole-value regex, as configured (without anchors).
    Regex(String),
}

impl Atom {
    fn holds(&self, value: &str, dfas: &mut DfaCache) -> Option<bool> {
        Some(match self {
            Atom::Exact(e) => value == e,
            Atom::Prefix(p) => value.starts_with(p.as_str()),
            Atom::Regex(_) => {
                let dfa = dfas.get(self)?;
                accepts(dfa, value.as_bytes())
            }
        })
    }

    /// The atom as a pattern for the whole value.
    fn pattern(&self) -> String {
        match self {
            Atom::Exact(e) => format!("^{}$", regex::escape(e)),
            Atom::Prefix(p) => format!("^{}(?s:.)*$", regex::escape(p)),
            Atom::Regex(r) => format!("^(?:{r})$"),
        }
    }
}

/// Present values that satisfy every `pos` atom and no `neg` atom.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cond {
    pub pos: Vec<Atom>,
    pub neg: Vec<Atom>,
}

/// The values one header may have: absent, and/or present under `present`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lang {
    pub absent: bool,
    pub present: Option<Cond>,
}

impl Lang {
    /// A header nobody constrains: absent or any value.
    pub fn any() -> Lang {
        Lang {
            absent: true,
            present: Some(Cond::default()),
        }
    }
}

/// A set of requests: header name (lower-case) -> its values; unnamed headers are `Lang::any`.
pub type RequestBox = BTreeMap<String, Lang>;

/// The outcome of a witness search.
#[derive(Debug, PartialEq, Eq)]
pub enum Witness {
    /// A value in the set (`None`: the header absent).
    Found(Option<String>),
    Empty,
    /// The search gave up: treat the set as possibly non-empty and say so.
    Unknown,
}

/// DFAs per atom, built once per check run.
#[derive(Default)]
pub struct DfaCache {
    dfas: HashMap<Atom, Option<dense::DFA<Vec<u32>>>>,
}

impl DfaCache {
    fn get(&mut self, atom: &Atom) -> Option<&dense::DFA<Vec<u32>>> {
        self.dfas
            .entry(atom.clone())
            .or_insert_with(|| {
                dense::Builder::new()
                    .configure(
                        dense::Config::new()
                            .match_kind(MatchKind::All)
                            .dfa_size_limit(Some(1 << 22)),
                    )
                    .build(&atom.pattern())
                    .ok()
            })
            .as_ref()
    }
}

fn anchored_start(dfa: &dense::DFA<Vec<u32>>) -> Option<StateID> {
    dfa.start_state(&start::Config::new().anchored(Anchored::Yes))
        .ok()
}

fn is_accepting(dfa: &dense::DFA<Vec<u32>>, state: StateID) -> bool {
    dfa.is_match_state(dfa.next_eoi_state(state))
}

fn accepts(dfa: &dense::DFA<Vec<u32>>, value: &[u8]) -> bool {
    let Some(mut state) = anchored_start(dfa) else {
        return false;
    };
    for &byte in value {
        state = dfa.next_state(state, byte);
    }
    is_accepting(dfa, state)
}

/// Visible ASCII, readable characters first: the alphabet witness values are drawn from.
fn alphabet() -> impl Iterator<Item = u8> {
    (b'a'..=b'z')
        .chain(b'0'..=b'9')
        .chain(b'A'..=b'Z')
        .chain((b'!'..=b'~').filter(|b| !b.is_ascii_alphanumeric()))
}

/// States the product search may visit before it gives up.
const SEARCH_BUDGET: usize = 20_000;

impl Cond {
    fn has_regex(&self) -> bool {
        self.pos
            .iter()
            .chain(&self.neg)
            .any(|a| matches!(a, Atom::Regex(_)))
    }

    fn satisfied_by(&self, value: &str, dfas: &mut DfaCache) -> Option<bool> {
        for atom in &self.pos {
            if !atom.holds(value, dfas)? {
                return Some(false);
            }
        }
        for atom in &self.neg {
            if atom.holds(value, dfas)? {
                return Some(false);
            }
        }
        Some(true)
    }

    /// A value satisfying the condition, or proof that there is none.
    pub fn witness(&self, dfas: &mut DfaCache) -> Witness {
        if !self.has_regex()
            && let Some(found) = self.plain_witness()
        {
            return found;
        }
        self.product_witness(dfas)
    }

    /// String logic for exact and prefix atoms. `None` when too many negative atoms block the
    /// simple candidates and the product search has to decide.
    fn plain_witness(&self) -> Option<Witness> {
        let mut exact: Option<&str> = None;
        let mut longest_prefix = "";
        for atom in &self.pos {
            match atom {
                Atom::Exact(e) if exact.is_some_and(|x| x != e) => return Some(Witness::Empty),
                Atom::Exact(e) => exact = Some(e),
                Atom::Prefix(p) if p.len() > longest_prefix.len() => longest_prefix = p,
                _ => {}
            }
        }
        let mut none = DfaCache::default();
        let candidates: Vec<String> = match exact {
            Some(e) => vec![e.to_string()],
            None => std::iter::once(String::new())
                .chain(alphabet().map(|b| char::from(b).to_string()))
                .map(|suffix| format!("{longest_prefix}{suffix}"))
                .collect(),
        };
        for candidate in &candidates {
            if self.satisfied_by(candidate, &mut none) == Some(true) {
                return Some(Witness::Found(Some(candidate.clone())));
            }
        }
        // An exact candidate that fails is decisive; prefix candidates are only a sample.
        exact.map(|_| Witness::Empty)
    }

    /// Breadth-first search over the product of the atoms' DFAs for the shortest value that
    /// every positive atom accepts and no negative atom does.
    fn product_witness(&self, dfas: &mut DfaCache) -> Witness {
        let atoms: Vec<&Atom> = self.pos.iter().chain(&self.neg).collect();
        let positives = self.pos.len();
        for atom in &atoms {
            if dfas.get(atom).is_none() {
                return Witness::Unknown;
            }
        }
        let machines: Vec<&dense::DFA<Vec<u32>>> = atoms
            .iter()
            .map(|a| dfas.dfas[*a].as_ref().expect("built above"))
            .collect();
        let Some(start) = machines
            .iter()
            .map(|d| anchored_start(d))
            .collect::<Option<Vec<StateID>>>()
        else {
            return Witness::Unknown;
        };
        let mut seen: HashSet<Vec<StateID>> = HashSet::from([start.clone()]);
        let mut queue = VecDeque::from([(start, Vec::<u8>::new())]);
        while let Some((states, value)) = queue.pop_front() {
            let accepted = states
                .iter()
                .zip(&machines)
                .enumerate()
                .all(|(i, (&s, d))| is_accepting(d, s) == (i < positives));
            if accepted {
                return Witness::Found(Some(String::from_utf8_lossy(&value).into_owned()));
            }
            for byte in alphabet() {
                let next: Vec<StateID> = states
                    .iter()
                    .zip(&machines)
                    .map(|(&s, d)| d.next_state(s, byte))
                    .collect();
                // A positive atom in its dead state can never accept again.
                if next[..positives]
                    .iter()
                    .zip(&machines)
                    .any(|(&s, d)| d.is_dead_state(s))
                {
                    continue;
                }
                if seen.insert(next.clone()) {
                    if seen.len() > SEARCH_BUDGET {
                        return Witness::Unknown;
                    }
                    let mut longer = value.clone();
                    longer.push(byte);
                    queue.push_back((next, longer));
                }
            }
        }
        Witness::Empty
    }
}

impl Lang {
    /// Prefers "absent": examples then name only the headers that matter.
    pub fn witness(&self, dfas: &mut DfaCache) -> Witness {
        match &self.present {
            _ if self.absent => Witness::Found(None),
            Some(cond) => cond.witness(dfas),
            None => Witness::Empty,
        }
    }
}

/// A request in the box, header by header, or why there is none.
pub fn box_witness(
    request_box: &RequestBox,
    dfas: &mut DfaCache,
) -> Result<BTreeMap<String, String>, Witness> {
    let mut request = BTreeMap::new();
    for (header, lang) in request_box {
        match lang.witness(dfas) {
            Witness::Found(Some(value)) => {
                request.insert(header.clone(), value);
            }
            Witness::Found(None) => {}
            other => return Err(other),
        }
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(pos: Vec<Atom>, neg: Vec<Atom>) -> Cond {
        Cond { pos, neg }
    }

    fn found(w: Witness) -> Option<String> {
        match w {
            Witness::Found(v) => v,
            other => panic!("expected a witness, got {other:?}"),
        }
    }

    #[test]
    fn exact_and_prefix_by_string_logic() {
        let mut dfas = DfaCache::default();
        let c = cond(
            vec![Atom::Exact("ab".into()), Atom::Prefix("a".into())],
            vec![],
        );
        assert_eq!(found(c.witness(&mut dfas)).as_deref(), Some("ab"));
        let c = cond(
            vec![Atom::Exact("ab".into()), Atom::Exact("b".into())],
            vec![],
        );
        assert_eq!(c.witness(&mut dfas), Witness::Empty);
        let c = cond(
            vec![Atom::Prefix("a".into())],
            vec![Atom::Exact("a".into())],
        );
        let value = found(c.witness(&mut dfas)).unwrap();
        assert!(value.starts_with('a') && value != "a");
        let c = cond(
            vec![Atom::Prefix("ab".into())],
            vec![Atom::Prefix("a".into())],
        );
        assert_eq!(c.witness(&mut dfas), Witness::Empty);
    }

    #[test]
    fn regex_by_product_search() {
        let mut dfas = DfaCache::default();
        let c = cond(
            vec![Atom::Regex("[0-9]+".into()), Atom::Prefix("4".into())],
            vec![Atom::Regex("4[0-9]".into())],
        );
        let value = found(c.witness(&mut dfas)).unwrap();
        assert!(value.starts_with('4') && value.len() != 2, "{value}");
        let c = cond(
            vec![Atom::Regex("a+".into())],
            vec![Atom::Prefix("a".into())],
        );
        assert_eq!(c.witness(&mut dfas), Witness::Empty);
        // Whole value: `ab` alone does not match `a`.
        let c = cond(
            vec![Atom::Regex("a".into()), Atom::Exact("ab".into())],
            vec![],
        );
        assert_eq!(c.witness(&mut dfas), Witness::Empty);
    }

    #[test]
    fn absent_is_a_value_of_an_unconstrained_header() {
        let mut dfas = DfaCache::default();
        assert_eq!(found(Lang::any().witness(&mut dfas)), None);
    }
}
