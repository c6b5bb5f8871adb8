//! The decision stamp carried on requests: our header, and a member of the W3C `baggage`
//! header so OpenTelemetry-instrumented applications carry it to their downstream calls.
//!
//! A stamp is `NAME;sig=SIG`: SIG is an HMAC-SHA256 of the release name under a key the
//! nodes share (truncated to 128 bits, base64url). Only steer can mint one, so neither a pod
//! nor an outside client whose `baggage` an application passes on can choose a release; a
//! stamp that does not verify is no stamp, and the rules decide from the tags.

use std::cell::RefCell;

use anyhow::{Result, bail, ensure};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{HeaderMap, HeaderName, HeaderValue};
use ring::hmac;

/// Header names as constants: a name given as a string is parsed again at every lookup.
pub static STAMP_HEADER: HeaderName = HeaderName::from_static("x-steer-release");
pub static BAGGAGE_HEADER: HeaderName = HeaderName::from_static("baggage");
pub const BAGGAGE_KEY: &str = "steer-release";

/// A stamp as it arrived: the release it names and its signature, if it has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Incoming<'a> {
    pub release: &'a str,
    pub signature: Option<&'a str>,
}

/// Splits `NAME;sig=SIG` (properties after the name, as W3C baggage writes them).
fn parse(value: &str) -> Incoming<'_> {
    let mut parts = value.split(';');
    let release = parts.next().unwrap_or("").trim();
    let signature = parts
        .find_map(|p| p.trim().strip_prefix("sig="))
        .map(str::trim);
    Incoming { release, signature }
}

/// The stamp a request carries: our header first, else the baggage member.
pub fn read(headers: &HeaderMap) -> Option<Incoming<'_>> {
    let ours = headers.get(&STAMP_HEADER).map(|v| v.to_str().ok());
    let baggage = headers
        .get_all(&BAGGAGE_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok());
    read_values(ours, baggage)
}

/// The stamp in our header's value (`Some(None)`: present but not text), else in the
/// baggage values: what [`read`] does, for any view of a request.
pub fn read_values<'a>(
    ours: Option<Option<&'a str>>,
    baggage: impl Iterator<Item = &'a str>,
) -> Option<Incoming<'a>> {
    if let Some(value) = ours {
        return value.map(parse);
    }
    baggage.flat_map(|v| v.split(',')).find_map(|member| {
        let (key, value) = member.split_once('=')?;
        (key.trim() == BAGGAGE_KEY).then(|| parse(value))
    })
}

/// The keys stamps are signed with: the first signs, every one verifies. Rotation: put the new
/// key first and keep the old one until every node runs with the new file, then drop it.
#[derive(Clone)]
pub struct StampKeys(Vec<hmac::Key>);

/// Bytes of a signature (before base64): 128 bits.
const SIGNATURE_BYTES: usize = 16;
/// The shortest key accepted.
const MIN_KEY_BYTES: usize = 16;

impl StampKeys {
    /// One key per non-empty line.
    pub fn from_text(text: &str) -> Result<StampKeys> {
        let mut keys = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            ensure!(
                line.len() >= MIN_KEY_BYTES,
                "line {}: a key needs at least {MIN_KEY_BYTES} bytes",
                number + 1
            );
            keys.push(hmac::Key::new(hmac::HMAC_SHA256, line.as_bytes()));
        }
        if keys.is_empty() {
            bail!("no key");
        }
        Ok(StampKeys(keys))
    }

    fn signature(key: &hmac::Key, release: &str) -> String {
        let tag = hmac::sign(key, release.as_bytes());
        URL_SAFE_NO_PAD.encode(&tag.as_ref()[..SIGNATURE_BYTES])
    }

    /// The signature this node mints for `release`.
    pub fn sign(&self, release: &str) -> String {
        StampKeys::signature(&self.0[0], release)
    }

    /// Each key's signature of `release`.
    fn signatures(&self, release: &str) -> Vec<String> {
        self.0
            .iter()
            .map(|key| StampKeys::signature(key, release))
            .collect()
    }
}

/// Whether a stamp is steer's own.
pub trait VerifyStamp {
    fn verify(&self, release: &str, signature: Option<&str>) -> bool;
}

/// Whether `signature` is one of `expected`, in constant time: how much of a guess matched
/// must not show in the timing.
fn one_of(expected: &[String], signature: Option<&str>) -> bool {
    let Some(signature) = signature else {
        return false;
    };
    expected.iter().any(|expected| {
        expected.len() == signature.len()
            && expected
                .bytes()
                .zip(signature.bytes())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    })
}

impl VerifyStamp for StampKeys {
    fn verify(&self, release: &str, signature: Option<&str>) -> bool {
        one_of(&self.signatures(release), signature)
    }
}

/// A worker's verifier: the signatures of a release are computed once, not per request
/// (an HMAC per stamped request per key otherwise).
pub struct CachedVerifier<'a> {
    pub keys: &'a StampKeys,
    pub signatures: &'a RefCell<foldhash::HashMap<Box<str>, Vec<String>>>,
}

/// Names remembered at most: forged names must not grow the cache without bound.
const CACHED_NAMES: usize = 4096;

impl VerifyStamp for CachedVerifier<'_> {
    fn verify(&self, release: &str, signature: Option<&str>) -> bool {
        let mut cache = self.signatures.borrow_mut();
        if let Some(expected) = cache.get(release) {
            return one_of(expected, signature);
        }
        let expected = self.keys.signatures(release);
        let verified = one_of(&expected, signature);
        if cache.len() >= CACHED_NAMES {
            cache.clear();
        }
        cache.insert(release.into(), expected);
        verified
    }
}

/// The members of `baggage` values other than ours, joined again.
pub fn other_members<'a>(baggage: impl Iterator<Item = &'a str>) -> String {
    baggage
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .filter(|m| m.split('=').next().map(str::trim) != Some(BAGGAGE_KEY))
        .collect::<Vec<_>>()
        .join(",")
}

fn other_members_of(headers: &HeaderMap) -> String {
    other_members(
        headers
            .get_all(&BAGGAGE_HEADER)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

/// Removes any stamp: what the gateway does to requests from outside the mesh, so no client
/// can pick a release by forging it.
pub fn strip(headers: &mut HeaderMap) {
    headers.remove(&STAMP_HEADER);
    if headers.contains_key(&BAGGAGE_HEADER) {
        let others = other_members_of(headers);
        headers.remove(&BAGGAGE_HEADER);
        if let Ok(value) = HeaderValue::from_str(&others)
            && !others.is_empty()
        {
            headers.insert(BAGGAGE_HEADER.clone(), value);
        }
    }
}

/// The header values that stamp one release, made once per release and worker: stamping a
/// request without other baggage copies nothing.
#[derive(Clone, Debug)]
pub struct Stamp {
    release: HeaderValue,
    /// `steer-release=NAME`, the whole baggage header when the request carries no other member.
    member: HeaderValue,
}

impl Stamp {
    /// `None` for a name that cannot be a header value (the request then goes unstamped).
    pub fn new(release: &str, keys: &StampKeys) -> Option<Stamp> {
        let signed = format!("{release};sig={}", keys.sign(release));
        Some(Stamp {
            release: HeaderValue::from_str(&signed).ok()?,
            member: HeaderValue::from_str(&format!("{BAGGAGE_KEY}={signed}")).ok()?,
        })
    }

    /// The value of our header, `NAME;sig=SIG`.
    pub fn value(&self) -> &[u8] {
        self.release.as_bytes()
    }

    /// The baggage member, `steer-release=NAME;sig=SIG`.
    pub fn member(&self) -> &[u8] {
        self.member.as_bytes()
    }
}

/// Stamps the request, keeping the other baggage members.
pub fn write(headers: &mut HeaderMap, stamp: &Stamp) {
    headers.insert(STAMP_HEADER.clone(), stamp.release.clone());
    let others = if headers.contains_key(&BAGGAGE_HEADER) {
        other_members_of(headers)
    } else {
        String::new()
    };
    if others.is_empty() {
        headers.insert(BAGGAGE_HEADER.clone(), stamp.member.clone());
        return;
    }
    let member = stamp.member.to_str().unwrap_or_default();
    if let Ok(value) = HeaderValue::from_str(&format!("{others},{member}")) {
        headers.insert(BAGGAGE_HEADER.clone(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> StampKeys {
        StampKeys::from_text("a key of the test nodes\n").unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn write_keeps_other_baggage_members_and_replaces_ours() {
        let mut map = headers(&[
            ("baggage", "userId=alice, steer-release=old;p=1"),
            ("baggage", "k=v"),
        ]);
        let keys = keys();
        write(&mut map, &Stamp::new("red", &keys).unwrap());
        let signed = format!("red;sig={}", keys.sign("red"));
        assert_eq!(map["x-steer-release"], signed.as_str());
        assert_eq!(
            map["baggage"],
            format!("userId=alice,k=v,steer-release={signed}").as_str()
        );
        assert_eq!(map.get_all("baggage").iter().count(), 1);
    }

    #[test]
    fn write_without_other_baggage_sets_both_forms() {
        let mut map = headers(&[("x-device", "android")]);
        let keys = keys();
        write(&mut map, &Stamp::new("blue", &keys).unwrap());
        let signed = format!("blue;sig={}", keys.sign("blue"));
        assert_eq!(map["x-steer-release"], signed.as_str());
        assert_eq!(map["baggage"], format!("steer-release={signed}").as_str());
        assert!(Stamp::new("bad\nname", &keys).is_none());
        // What was written reads back, and verifies.
        let stamp = read(&map).unwrap();
        assert_eq!(stamp.release, "blue");
        assert!(keys.verify(stamp.release, stamp.signature));
    }

    #[test]
    fn read_prefers_the_header_then_baggage() {
        let release = |map: &HeaderMap| read(map).map(|s| s.release.to_string());
        assert_eq!(
            release(&headers(&[("x-steer-release", "blue;sig=abc")])),
            Some("blue".into())
        );
        assert_eq!(
            read(&headers(&[(
                "baggage",
                "a=b, steer-release = green ;x;sig=q"
            )]))
            .and_then(|s| s.signature),
            Some("q")
        );
        assert_eq!(release(&headers(&[("baggage", "a=b")])), None);
        assert_eq!(
            read(&headers(&[("x-steer-release", "blue")]))
                .unwrap()
                .signature,
            None
        );
    }

    #[test]
    fn only_a_signature_of_a_known_key_verifies_and_old_keys_verify_during_rotation() {
        let old = StampKeys::from_text("the old key of the nodes").unwrap();
        let rotated =
            StampKeys::from_text("the new key of the nodes\nthe old key of the nodes").unwrap();
        let minted_before = old.sign("red");
        assert!(rotated.verify("red", Some(&minted_before)));
        assert_ne!(rotated.sign("red"), minted_before, "the first key signs");
        assert!(
            !rotated.verify("blue", Some(&minted_before)),
            "bound to the name"
        );
        assert!(!rotated.verify("red", None));
        assert!(!rotated.verify("red", Some("forged")));
        let other = StampKeys::from_text("another cluster's key!").unwrap();
        assert!(!other.verify("red", Some(&minted_before)));
        assert!(StampKeys::from_text("short").is_err());
        assert!(StampKeys::from_text("\n\n").is_err());
    }

    #[test]
    fn the_cached_verifier_answers_as_the_keys_do() {
        let keys = keys();
        let signatures = RefCell::default();
        let cached = CachedVerifier {
            keys: &keys,
            signatures: &signatures,
        };
        let good = keys.sign("red");
        for _ in 0..2 {
            assert!(cached.verify("red", Some(&good)));
            assert!(!cached.verify("red", Some("forged")));
            assert!(!cached.verify("blue", Some(&good)));
        }
        assert_eq!(signatures.borrow().len(), 2);
    }

    #[test]
    fn strip_removes_both_forms() {
        let mut map = headers(&[
            ("x-steer-release", "red"),
            ("baggage", "steer-release=red,a=b"),
        ]);
        strip(&mut map);
        assert!(!map.contains_key("x-steer-release"));
        assert_eq!(map["baggage"], "a=b");
        let mut only_ours = headers(&[("baggage", "steer-release=red")]);
        strip(&mut only_ours);
        assert!(!only_ours.contains_key("baggage"));
    }
}
