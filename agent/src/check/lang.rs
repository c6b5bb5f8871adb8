//! Sets of requests as the checker reasons about them.
//!
//! A release's requests form a *box*: a product over header names of per-header value sets.
//! A per-header set (`Lang`) is "absent" and/or the present values satisfying a conjunction of
//! positive and negative atoms (exact, prefix, whole-value regex). Exact and prefix atoms are
//! decided with string logic; as soon as a regex is involved the atoms are compiled to DFAs and
//! a breadth-first search over their product finds the shortest witness value (over visible
//! ASCII, the values a header can carry). When that search exceeds its budget the answer is
//! marked approximate.

use std::collections::BTreeMap;

use regex_automata::{
    Anchored, MatchKind,
    dfa::{Automaton, dense},
    util::{primitives::StateID, start},
};

/// One condition on a present header value: the router's own definition.
pub use crate::rules::Test as Atom;

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

/// What the set reasoning of one check run may spend, and the DFAs it built on the way.
///
/// Every search step and every candidate the analysis looks at costs one step; once the steps
/// run out every further question is answered `Unknown` and the caller says the analysis is
/// incomplete. DFAs are kept per atom up to a total size, past which an atom is `Unknown` too:
/// however adversarial the configuration, a check run takes bounded time and memory.
pub struct Solver {
    dfas: foldhash::HashMap<Atom, Option<dense::DFA<Vec<u32>>>>,
    dfa_bytes: usize,
    steps_left: u64,
}

/// The largest DFA of one atom (a counted repetition blows up determinisation).
const DFA_SIZE_LIMIT: usize = 1 << 20;
/// The DFAs of one check run together.
const DFA_TOTAL_LIMIT: usize = 64 << 20;

impl Solver {
    pub fn new(steps: u64) -> Solver {
        Solver {
            dfas: foldhash::HashMap::default(),
            dfa_bytes: 0,
            steps_left: steps,
        }
    }

    /// Takes `n` steps from the budget; false (and nothing taken) when they are not there.
    pub fn spend(&mut self, n: u64) -> bool {
        match self.steps_left.checked_sub(n) {
            Some(left) => {
                self.steps_left = left;
                true
            }
            None => {
                self.steps_left = 0;
                false
            }
        }
    }

    pub fn exhausted(&self) -> bool {
        self.steps_left == 0
    }

    fn get(&mut self, atom: &Atom) -> Option<&dense::DFA<Vec<u32>>> {
        if !self.dfas.contains_key(atom) {
            let room = DFA_TOTAL_LIMIT.saturating_sub(self.dfa_bytes);
            let dfa = dense::Builder::new()
                .configure(
                    dense::Config::new()
                        .match_kind(MatchKind::All)
                        .dfa_size_limit(Some(room.min(DFA_SIZE_LIMIT)))
                        .determinize_size_limit(Some(DFA_SIZE_LIMIT)),
                )
                .build(&atom.pattern())
                .ok();
            self.dfa_bytes += dfa.as_ref().map_or(0, |d| d.memory_usage());
            self.dfas.insert(atom.clone(), dfa);
        }
        self.dfas[atom].as_ref()
    }
}

fn anchored_start(dfa: &dense::DFA<Vec<u32>>) -> Option<StateID> {
    dfa.start_state(&start::Config::new().anchored(Anchored::Yes))
        .ok()
}

fn is_accepting(dfa: &dense::DFA<Vec<u32>>, state: StateID) -> bool {
    dfa.is_match_state(dfa.next_eoi_state(state))
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

    pub fn satisfied_by(&self, value: &str) -> bool {
        self.pos.iter().all(|a| a.holds(value)) && !self.neg.iter().any(|a| a.holds(value))
    }

    /// A value satisfying the condition, or proof that there is none.
    pub fn witness(&self, solver: &mut Solver) -> Witness {
        if !self.has_regex()
            && let Some(found) = self.plain_witness()
        {
            return found;
        }
        self.product_witness(solver)
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
        if let Some(e) = exact {
            // Decisive either way.
            return Some(if self.satisfied_by(e) {
                Witness::Found(Some(e.to_string()))
            } else {
                Witness::Empty
            });
        }
        let prefixes = self.pos.iter().filter_map(|a| match a {
            Atom::Prefix(p) => Some(p),
            _ => None,
        });
        for p in prefixes {
            if !longest_prefix.starts_with(p.as_str()) {
                return Some(Witness::Empty);
            }
        }
        // The longest prefix, or it and one more character: a sample that only negative atoms
        // can exhaust.
        let mut candidate = longest_prefix.to_string();
        if self.satisfied_by(&candidate) {
            return Some(Witness::Found(Some(candidate)));
        }
        for byte in alphabet() {
            candidate.push(char::from(byte));
            if self.satisfied_by(&candidate) {
                return Some(Witness::Found(Some(candidate)));
            }
            candidate.pop();
        }
        None
    }

    /// Breadth-first search over the product of the atoms' DFAs for the shortest value that
    /// every positive atom accepts and no negative atom does.
    fn product_witness(&self, solver: &mut Solver) -> Witness {
        let limit = SEARCH_BUDGET.min(usize::try_from(solver.steps_left).unwrap_or(usize::MAX));
        let (witness, steps) = self.product_search(solver, limit);
        solver.spend(steps as u64);
        witness
    }

    /// The search of `product_witness`, visiting at most `limit` product states; returns how
    /// many it visited.
    ///
    /// Negative exact and prefix atoms (hundreds of them are common when a release is compared
    /// with the releases above it) take part as one trie instead of one DFA each: the search
    /// state is the DFA states and the trie node the value has reached, `FREE` once it left
    /// every excluded literal behind.
    fn product_search(&self, solver: &mut Solver, limit: usize) -> (Witness, usize) {
        let mut excluded = Trie::default();
        let mut atoms: Vec<&Atom> = self.pos.iter().collect();
        let positives = atoms.len();
        for atom in &self.neg {
            match atom {
                Atom::Exact(e) => excluded.insert(e, false),
                Atom::Prefix(p) => excluded.insert(p, true),
                Atom::Regex(_) => atoms.push(atom),
            }
        }
        if excluded.nodes[0].prefix_end {
            return (Witness::Empty, 0);
        }
        for atom in &atoms {
            if solver.get(atom).is_none() {
                return (Witness::Unknown, 0);
            }
        }
        let machines: Vec<&dense::DFA<Vec<u32>>> = atoms
            .iter()
            .map(|a| solver.dfas[*a].as_ref().expect("built above"))
            .collect();
        let Some(start) = machines
            .iter()
            .map(|d| anchored_start(d))
            .collect::<Option<Vec<StateID>>>()
        else {
            return (Witness::Unknown, 0);
        };
        // A product state is the machines' state ids and the trie node, as one key; the
        // search reuses one buffer for the successors it looks at and allocates only for the
        // states it has not seen (the per-transition allocations were most of a check's time).
        let mut start: Vec<u32> = start.iter().map(StateID::as_u32).collect();
        start.push(0);
        let mut seen: foldhash::HashSet<Vec<u32>> = foldhash::HashSet::default();
        seen.insert(start.clone());
        // The states in the order they were found (the queue is the part not yet expanded),
        // each with the state it came from and the byte that led here: the witness's spelling.
        let mut found: Vec<(Vec<u32>, u32, u8)> = vec![(start, u32::MAX, 0)];
        let bytes = representatives(&machines, &excluded);
        let mut next: Vec<u32> = Vec::with_capacity(machines.len() + 1);
        let mut current: Vec<u32> = Vec::with_capacity(machines.len() + 1);
        let mut cursor = 0;
        while cursor < found.len() {
            current.clear();
            current.extend_from_slice(&found[cursor].0);
            let (states, node) = current.split_at(machines.len());
            let node = node[0];
            let state = |i: usize| StateID::new_unchecked(states[i] as usize);
            let accepted = (0..machines.len())
                .all(|i| is_accepting(machines[i], state(i)) == (i < positives))
                && !excluded.exact_end(node);
            if accepted {
                return (Witness::Found(Some(spell(&found, cursor))), seen.len());
            }
            for &byte in &bytes {
                next.clear();
                next.extend(
                    (0..machines.len()).map(|i| machines[i].next_state(state(i), byte).as_u32()),
                );
                // A positive atom in its dead state can never accept again, nor can a value
                // that starts with an excluded prefix.
                if (0..positives)
                    .any(|i| machines[i].is_dead_state(StateID::new_unchecked(next[i] as usize)))
                {
                    continue;
                }
                let next_node = excluded.step(node, byte);
                if excluded.prefix_end(next_node) {
                    continue;
                }
                next.push(next_node);
                if !seen.contains(next.as_slice()) {
                    seen.insert(next.clone());
                    if seen.len() > limit {
                        return (Witness::Unknown, seen.len());
                    }
                    found.push((next.clone(), cursor as u32, byte));
                }
            }
            cursor += 1;
        }
        (Witness::Empty, seen.len())
    }
}

/// The bytes of the alphabet a product search has to try: one per set of bytes that every
/// machine treats alike (a DFA's byte classes) and that no excluded literal names, the first
/// of it in alphabet order (so witnesses read as before). `team-[a-z0-9]+` against another
/// regex needs a handful of bytes, not 94.
fn representatives(machines: &[&dense::DFA<Vec<u32>>], excluded: &Trie) -> Vec<u8> {
    let mut literal_bytes = [false; 256];
    for node in &excluded.nodes {
        for &(byte, _) in &node.children {
            literal_bytes[usize::from(byte)] = true;
        }
    }
    // A byte's classes in up to eight machines, packed; with more, every byte is tried.
    let mut signatures: Vec<u64> = Vec::new();
    alphabet()
        .filter(|&byte| {
            if literal_bytes[usize::from(byte)] || machines.len() > 8 {
                return true;
            }
            let signature = (machines.iter()).fold(0u64, |packed, d| {
                packed << 8 | u64::from(d.byte_classes().get(byte))
            });
            let new = !signatures.contains(&signature);
            if new {
                signatures.push(signature);
            }
            new
        })
        .collect()
}

/// The value that leads to state `at` of a product search: the bytes along its trail.
fn spell(found: &[(Vec<u32>, u32, u8)], mut at: usize) -> String {
    let mut bytes = Vec::new();
    while let Some(&(_, from, byte)) = found.get(at).filter(|(_, from, _)| *from != u32::MAX) {
        bytes.push(byte);
        at = from as usize;
    }
    bytes.reverse();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Excluded literals: exact values and prefixes.
struct Trie {
    nodes: Vec<TrieNode>,
}

#[derive(Default)]
struct TrieNode {
    children: Vec<(u8, u32)>,
    /// An excluded prefix ends here: this value and all its extensions are excluded.
    prefix_end: bool,
    /// An excluded exact value ends here.
    exact_end: bool,
}

/// The node of values that left every excluded literal behind.
const FREE: u32 = u32::MAX;

impl Default for Trie {
    fn default() -> Trie {
        Trie {
            nodes: vec![TrieNode::default()],
        }
    }
}

impl Trie {
    fn insert(&mut self, literal: &str, prefix: bool) {
        let mut node = 0;
        for &byte in literal.as_bytes() {
            node = match self.nodes[node].children.iter().find(|(b, _)| *b == byte) {
                Some(&(_, child)) => child as usize,
                None => {
                    self.nodes.push(TrieNode::default());
                    let child = self.nodes.len() - 1;
                    self.nodes[node].children.push((byte, child as u32));
                    child
                }
            };
        }
        if prefix {
            self.nodes[node].prefix_end = true;
        } else {
            self.nodes[node].exact_end = true;
        }
    }

    fn step(&self, node: u32, byte: u8) -> u32 {
        if node == FREE {
            return FREE;
        }
        self.nodes[node as usize]
            .children
            .iter()
            .find(|(b, _)| *b == byte)
            .map_or(FREE, |&(_, child)| child)
    }

    fn prefix_end(&self, node: u32) -> bool {
        node != FREE && self.nodes[node as usize].prefix_end
    }

    fn exact_end(&self, node: u32) -> bool {
        node != FREE && self.nodes[node as usize].exact_end
    }
}

impl Lang {
    /// Prefers "absent": examples then name only the headers that matter.
    pub fn witness(&self, solver: &mut Solver) -> Witness {
        match &self.present {
            _ if self.absent => Witness::Found(None),
            Some(cond) => cond.witness(solver),
            None => Witness::Empty,
        }
    }
}

/// A request in the box, header by header, or why there is none.
pub fn box_witness(
    request_box: &RequestBox,
    solver: &mut Solver,
) -> Result<BTreeMap<String, String>, Witness> {
    let mut request = BTreeMap::new();
    for (header, lang) in request_box {
        match lang.witness(solver) {
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

    fn regex(pattern: &str) -> Atom {
        Atom::Regex(crate::rules::WholeValueRegex::new(pattern).unwrap())
    }

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
        let mut solver = Solver::new(u64::MAX);
        let c = cond(
            vec![Atom::Exact("ab".into()), Atom::Prefix("a".into())],
            vec![],
        );
        assert_eq!(found(c.witness(&mut solver)).as_deref(), Some("ab"));
        let c = cond(
            vec![Atom::Exact("ab".into()), Atom::Exact("b".into())],
            vec![],
        );
        assert_eq!(c.witness(&mut solver), Witness::Empty);
        let c = cond(
            vec![Atom::Prefix("a".into())],
            vec![Atom::Exact("a".into())],
        );
        let value = found(c.witness(&mut solver)).unwrap();
        assert!(value.starts_with('a') && value != "a");
        let c = cond(
            vec![Atom::Prefix("ab".into())],
            vec![Atom::Prefix("a".into())],
        );
        assert_eq!(c.witness(&mut solver), Witness::Empty);
    }

    #[test]
    fn regex_by_product_search() {
        let mut solver = Solver::new(u64::MAX);
        let c = cond(
            vec![regex("[0-9]+"), Atom::Prefix("4".into())],
            vec![regex("4[0-9]")],
        );
        let value = found(c.witness(&mut solver)).unwrap();
        assert!(value.starts_with('4') && value.len() != 2, "{value}");
        let c = cond(vec![regex("a+")], vec![Atom::Prefix("a".into())]);
        assert_eq!(c.witness(&mut solver), Witness::Empty);
        // Whole value: `ab` alone does not match `a`.
        let c = cond(vec![regex("a"), Atom::Exact("ab".into())], vec![]);
        assert_eq!(c.witness(&mut solver), Witness::Empty);
    }

    #[test]
    fn absent_is_a_value_of_an_unconstrained_header() {
        let mut solver = Solver::new(u64::MAX);
        assert_eq!(found(Lang::any().witness(&mut solver)), None);
    }
}
