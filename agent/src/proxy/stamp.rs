//! The decision stamp carried on requests: our header, and a member of the W3C `baggage`
//! header so OpenTelemetry-instrumented applications carry it to their downstream calls.

use http::{HeaderMap, HeaderValue};

pub const STAMP_HEADER: &str = "x-steer-release";
pub const BAGGAGE_HEADER: &str = "baggage";
pub const BAGGAGE_KEY: &str = "steer-release";

/// The release name a request was stamped with: our header first, else the baggage member.
pub fn read(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(STAMP_HEADER) {
        return value.to_str().ok().map(str::trim);
    }
    headers
        .get_all(BAGGAGE_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|member| {
            let (key, value) = member.split_once('=')?;
            (key.trim() == BAGGAGE_KEY).then(|| value.split(';').next().unwrap_or("").trim())
        })
}

/// The baggage members other than ours, joined again.
fn other_members(headers: &HeaderMap) -> String {
    headers
        .get_all(BAGGAGE_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .filter(|m| m.split('=').next().map(str::trim) != Some(BAGGAGE_KEY))
        .collect::<Vec<_>>()
        .join(",")
}

/// Removes any stamp: what the gateway does to requests from outside the mesh, so no client
/// can pick a release by forging it.
pub fn strip(headers: &mut HeaderMap) {
    headers.remove(STAMP_HEADER);
    if headers.contains_key(BAGGAGE_HEADER) {
        let others = other_members(headers);
        headers.remove(BAGGAGE_HEADER);
        if let Ok(value) = HeaderValue::from_str(&others)
            && !others.is_empty()
        {
            headers.insert(BAGGAGE_HEADER, value);
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
    pub fn new(release: &str) -> Option<Stamp> {
        Some(Stamp {
            release: HeaderValue::from_str(release).ok()?,
            member: HeaderValue::from_str(&format!("{BAGGAGE_KEY}={release}")).ok()?,
        })
    }

    /// The release name as a header value (for the debug response header too).
    pub fn value(&self) -> &HeaderValue {
        &self.release
    }
}

/// Stamps the request, keeping the other baggage members.
pub fn write(headers: &mut HeaderMap, stamp: &Stamp) {
    headers.insert(STAMP_HEADER, stamp.release.clone());
    let others = if headers.contains_key(BAGGAGE_HEADER) {
        other_members(headers)
    } else {
        String::new()
    };
    if others.is_empty() {
        headers.insert(BAGGAGE_HEADER, stamp.member.clone());
        return;
    }
    let member = stamp.member.to_str().unwrap_or_default();
    if let Ok(value) = HeaderValue::from_str(&format!("{others},{member}")) {
        headers.insert(BAGGAGE_HEADER, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        write(&mut map, &Stamp::new("red").unwrap());
        assert_eq!(map["x-steer-release"], "red");
        assert_eq!(map["baggage"], "userId=alice,k=v,steer-release=red");
        assert_eq!(map.get_all("baggage").iter().count(), 1);
    }

    #[test]
    fn write_without_other_baggage_sets_both_forms() {
        let mut map = headers(&[("x-device", "android")]);
        write(&mut map, &Stamp::new("blue").unwrap());
        assert_eq!(map["x-steer-release"], "blue");
        assert_eq!(map["baggage"], "steer-release=blue");
        assert!(Stamp::new("bad\nname").is_none());
    }

    #[test]
    fn read_prefers_the_header_then_baggage() {
        assert_eq!(read(&headers(&[("x-steer-release", "blue")])), Some("blue"));
        assert_eq!(
            read(&headers(&[("baggage", "a=b, steer-release = green ;x")])),
            Some("green")
        );
        assert_eq!(read(&headers(&[("baggage", "a=b")])), None);
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
