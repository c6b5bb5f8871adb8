//! What a release's matchers mean: the one definition the router and the checker share.
//!
//! A matcher kind is defined here once: how it is read from the configuration (`Test::parse`),
//! whether a header value satisfies it (`Test::holds`, what the router runs), and the same
//! condition as a whole-value pattern (`Test::pattern`, what the checker's automata reason
//! over). The sticky share (`Share`) and the order of releases (`rank_order`) live here too, so
//! the checker's example requests can never disagree with the router.

use std::{cmp::Ordering, fmt, hash::Hash, sync::Arc};

use regex::Regex;

use super::Tags;
use crate::config::{Matcher, Release};

/// One comparison of a present header value.
#[derive(Clone, Debug)]
pub enum Test {
    Exact(String),
    Prefix(String),
    /// Must match the whole value, as in Envoy and Istio.
    Regex(WholeValueRegex),
}

/// A compiled whole-value regex that compares and hashes by its source; cheap to clone (the
/// checker's sets of atoms hold many copies).
#[derive(Clone, Debug)]
pub struct WholeValueRegex {
    source: Arc<str>,
    regex: Arc<Regex>,
    /// Every value the regex accepts starts with one of these; `None` when there is no such
    /// finite set of non-empty literals (`.*x`, `(?i)` of long words).
    prefixes: Option<Arc<[String]>>,
}

/// Why a matcher cannot be used; `code` is the checker's finding code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatcherError {
    pub code: &'static str,
    pub message: String,
}

impl fmt::Display for MatcherError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for MatcherError {}

/// The compiled regex program may not exceed this: a counted repetition must not take the
/// agent's memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl Test {
    /// The one comparison `matcher` names.
    pub fn parse(matcher: &Matcher) -> Result<Test, MatcherError> {
        let header = &matcher.header;
        match (&matcher.exact, &matcher.prefix, &matcher.regex) {
            (Some(v), None, None) => Ok(Test::Exact(v.clone())),
            (None, Some(v), None) => Ok(Test::Prefix(v.clone())),
            (None, None, Some(pattern)) => {
                WholeValueRegex::new(pattern)
                    .map(Test::Regex)
                    .map_err(|err| MatcherError {
                        code: "invalid-regex",
                        message: format!("{err:#}"),
                    })
            }
            (None, None, None) => Err(MatcherError {
                code: "empty-match",
                message: format!(
                    "matcher on header `{header}` needs one of `exact`, `prefix` or `regex`"
                ),
            }),
            _ => Err(MatcherError {
                code: "empty-match",
                message: format!(
                    "matcher on header `{header}` sets more than one of `exact`, `prefix`, `regex`"
                ),
            }),
        }
    }

    /// Does a present header value satisfy the test?
    pub fn holds(&self, value: &str) -> bool {
        match self {
            Test::Exact(want) => value == want,
            Test::Prefix(want) => value.starts_with(want.as_str()),
            Test::Regex(regex) => regex.regex.is_match(value),
        }
    }

    /// Literals every value `holds` for starts with one of (see `WholeValueRegex::prefixes`).
    pub fn prefixes(&self) -> Option<Vec<&str>> {
        match self {
            Test::Exact(v) | Test::Prefix(v) => Some(vec![v.as_str()]),
            Test::Regex(r) => Some(r.prefixes()?.iter().map(String::as_str).collect()),
        }
    }

    /// The set of values `holds` accepts, as an anchored pattern (for automata).
    pub fn pattern(&self) -> String {
        match self {
            Test::Exact(e) => format!("^{}$", regex::escape(e)),
            Test::Prefix(p) => format!("^{}(?s:.)*$", regex::escape(p)),
            Test::Regex(r) => format!("^(?:{})$", r.source),
        }
    }
}

/// `=android`, `^=qa-`, `~1\.[0-9]+`: after a header name, one condition in one line.
impl fmt::Display for Test {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Test::Exact(v) => write!(f, "={v}"),
            Test::Prefix(v) => write!(f, "^={v}"),
            Test::Regex(r) => write!(f, "~{}", r.source),
        }
    }
}

impl PartialEq for Test {
    fn eq(&self, other: &Test) -> bool {
        match (self, other) {
            (Test::Exact(a), Test::Exact(b)) | (Test::Prefix(a), Test::Prefix(b)) => a == b,
            (Test::Regex(a), Test::Regex(b)) => a.source == b.source,
            _ => false,
        }
    }
}

impl Eq for Test {}

impl Hash for Test {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        match self {
            Test::Exact(v) | Test::Prefix(v) => v.hash(state),
            Test::Regex(r) => r.source.hash(state),
        }
    }
}

impl WholeValueRegex {
    /// Compiles `pattern`, or shares the compiled form of an equal pattern still in use: one
    /// configuration is checked, indexed and compiled by separate passes, and a Kubernetes
    /// source rebuilds it on every change, each pass parsing the same matchers again.
    pub fn new(pattern: &str) -> anyhow::Result<WholeValueRegex> {
        use anyhow::Context;
        let mut compiled = COMPILED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = compiled.regexes.get(pattern) {
            return Ok(known.clone());
        }
        let regex = regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .with_context(|| format!("invalid regex `{pattern}`"))?;
        let regex = WholeValueRegex {
            source: pattern.into(),
            regex: Arc::new(regex),
            prefixes: literal_prefixes(pattern),
        };
        compiled.keep(regex.clone());
        Ok(regex)
    }

    pub fn prefixes(&self) -> Option<&[String]> {
        self.prefixes.as_deref()
    }

    /// The pattern as configured (without the whole-value anchors).
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// Compiled regexes by source, while something besides this cache holds them.
struct Compiled {
    regexes: std::collections::HashMap<Arc<str>, WholeValueRegex>,
    /// Entries after the last sweep: the next one comes when there are twice as many.
    swept_at: usize,
}

static COMPILED: std::sync::LazyLock<std::sync::Mutex<Compiled>> = std::sync::LazyLock::new(|| {
    std::sync::Mutex::new(Compiled {
        regexes: std::collections::HashMap::new(),
        swept_at: 0,
    })
});

impl Compiled {
    /// Adds `regex`; drops the regexes no configuration holds any more once the cache has
    /// doubled since the last sweep (so the sweeps cost no more than the inserts).
    fn keep(&mut self, regex: WholeValueRegex) {
        self.regexes.insert(regex.source.clone(), regex);
        if self.regexes.len() > (2 * self.swept_at).max(1024) {
            self.regexes
                .retain(|_, regex| Arc::strong_count(&regex.regex) > 1);
            self.swept_at = self.regexes.len();
        }
    }
}

/// Literals every match of `pattern` starts with (regex-syntax's prefix extraction), cut to
/// whole characters; `None` when some match may start with anything.
fn literal_prefixes(pattern: &str) -> Option<Arc<[String]>> {
    use regex_syntax::hir::literal::{ExtractKind, Extractor};
    let hir = regex_syntax::parse(pattern).ok()?;
    let seq = Extractor::new()
        .kind(ExtractKind::Prefix)
        .limit_total(64)
        .extract(&hir);
    let prefixes: Vec<String> = seq
        .literals()?
        .iter()
        .map(|literal| {
            // A literal cut inside a character is still a prefix once the cut part is dropped.
            let bytes = literal.as_bytes();
            let valid = match std::str::from_utf8(bytes) {
                Ok(text) => text,
                Err(err) => std::str::from_utf8(&bytes[..err.valid_up_to()]).expect("valid"),
            };
            valid.to_string()
        })
        .collect();
    if prefixes.iter().any(String::is_empty) {
        return None;
    }
    Some(prefixes.into())
}

/// One matcher of a release, header name lower-case.
#[derive(Clone, Debug)]
pub struct Condition {
    pub header: String,
    pub test: Test,
}

impl Condition {
    /// An absent header never satisfies it (a repeated one is one value: `Tags`).
    pub fn holds<T: Tags + ?Sized>(&self, tags: &T) -> bool {
        tags.value(&self.header)
            .is_some_and(|value| self.test.holds(&value))
    }
}

/// A sticky share of the matching users: a request takes part when its `hash_by` header names
/// a user inside the share; without that header it does not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    /// Lower-case.
    pub hash_by: String,
    /// `percent` of the u64 range; `None` means 100%, which every user with the header passes.
    threshold: Option<u64>,
}

impl Share {
    /// The share `release` takes, if it takes one, or why its percent is unusable. A
    /// release with a rollout is taken at its last step: what the rollout may come to (the
    /// agent applies each step's percent in its place).
    pub fn parse(release: &Release) -> Result<Option<Share>, String> {
        let last_step = || release.rollout.as_ref()?.steps.last().copied();
        match (release.percent.or_else(last_step), &release.hash_by) {
            (None, None) => Ok(None),
            (Some(percent), Some(hash_by)) if percent > 0.0 && percent <= 100.0 => {
                Ok(Some(Share {
                    hash_by: hash_by.to_ascii_lowercase(),
                    threshold: (percent < 100.0)
                        .then(|| (percent / 100.0 * u64::MAX as f64) as u64),
                }))
            }
            (Some(percent), Some(_)) => Err(format!("percent {percent} must be in (0, 100]")),
            (Some(_), None) => Err(
                "percent needs `hashBy`, the header that keeps a user on one \
                                    side (e.g. x-user-id)"
                    .to_string(),
            ),
            (None, Some(_)) => Err("hashBy is set but percent is not".to_string()),
        }
    }

    /// Is `user` inside the share of `release`?
    pub fn admits(&self, release: &str, user: &str) -> bool {
        self.threshold
            .is_none_or(|t| sticky_hash(release, user) < t)
    }

    /// Does every user pass (100%)?
    pub fn is_everyone(&self) -> bool {
        self.threshold.is_none()
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

/// Everything that decides whether a release takes a request.
#[derive(Clone, Debug)]
pub struct Matchers {
    pub conditions: Vec<Condition>,
    pub share: Option<Share>,
}

impl Matchers {
    /// The matchers of `release`, or the first reason they cannot be used.
    pub fn parse(release: &Release) -> Result<Matchers, MatcherError> {
        let conditions = release
            .matchers
            .iter()
            .map(|m| {
                Ok(Condition {
                    header: m.header.to_ascii_lowercase(),
                    test: Test::parse(m)?,
                })
            })
            .collect::<Result<_, MatcherError>>()?;
        let share = Share::parse(release).map_err(|message| MatcherError {
            code: "invalid-percent",
            message,
        })?;
        Ok(Matchers { conditions, share })
    }

    /// Does the release named `release` take this request? Every condition holds and, for a
    /// share, the hash header names a user inside it.
    pub fn matches<T: Tags + ?Sized>(&self, release: &str, tags: &T) -> bool {
        self.conditions.iter().all(|c| c.holds(tags))
            && self.share.as_ref().is_none_or(|share| {
                tags.value(&share.hash_by)
                    .is_some_and(|user| share.admits(release, &user))
            })
    }
}

/// The order releases are ranked in: smaller priority number first, then by name. Where two
/// releases of equal priority both match, the checker reports an error; the name only keeps
/// the router deterministic until that is fixed.
pub fn rank_order(a: &Release, b: &Release) -> Ordering {
    (a.priority, &a.name).cmp(&(b.priority, &b.name))
}
