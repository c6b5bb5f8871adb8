//! Where a request's tags come from: anything that can list its headers.

use std::borrow::Cow;

/// A request's headers as the rule engine reads them: one value per (lower-case) name. A
/// header sent more than once is read as its values joined by `,`, in order (how Envoy and
/// Istio match headers, and what RFC 9110 says a repeated field means): the checker reasons
/// about one value per header, and the router must not let a request repeat a tag header to
/// match two releases the checker calls disjoint.
pub trait Tags {
    /// Calls `f` with every (lower-case name, value), each name once.
    fn for_each_tag(&self, f: &mut dyn FnMut(&str, &str));
    /// The value of header `name` (given lower-case), if the request has it.
    fn value(&self, name: &str) -> Option<Cow<'_, str>>;
}

/// Values joined by `,`; borrowed when there is one.
pub(crate) fn joined<'a>(mut values: impl Iterator<Item = &'a str>) -> Option<Cow<'a, str>> {
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(Cow::Borrowed(first));
    };
    let mut all = format!("{first},{second}");
    for value in values {
        all.push(',');
        all.push_str(value);
    }
    Some(Cow::Owned(all))
}

/// Owned header pairs, for the CLI, the admin explain endpoint and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderPairs(Vec<(String, String)>);

impl HeaderPairs {
    pub fn new<N: AsRef<str>, V: Into<String>>(pairs: impl IntoIterator<Item = (N, V)>) -> Self {
        HeaderPairs(
            pairs
                .into_iter()
                .map(|(n, v)| (n.as_ref().to_ascii_lowercase(), v.into()))
                .collect(),
        )
    }

    /// Parses `Name: value` as given on a command line.
    pub fn parse_line(line: &str) -> Result<(String, String), String> {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("header `{line}` is not of the form `Name: value`"))?;
        let name = name.trim();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("header `{line}` has an invalid name"));
        }
        Ok((name.to_ascii_lowercase(), value.trim().to_string()))
    }
}

impl Tags for HeaderPairs {
    fn for_each_tag(&self, f: &mut dyn FnMut(&str, &str)) {
        for (i, (name, _)) in self.0.iter().enumerate() {
            // Each name once, where it first appears.
            if self.0[..i].iter().all(|(earlier, _)| earlier != name)
                && let Some(value) = self.value(name)
            {
                f(name, &value);
            }
        }
    }

    fn value(&self, name: &str) -> Option<Cow<'_, str>> {
        joined(
            self.0
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str()),
        )
    }
}

/// hyper's header map: names are stored lower-case already, and the values of a name are
/// listed together. Values that are not visible ASCII cannot equal any configured tag value
/// and are left out.
impl Tags for http::HeaderMap {
    fn for_each_tag(&self, f: &mut dyn FnMut(&str, &str)) {
        let mut pairs = self.iter().peekable();
        while let Some((name, first)) = pairs.next() {
            let more =
                std::iter::from_fn(|| pairs.next_if(|(next, _)| *next == name).map(|(_, v)| v));
            let values = std::iter::once(first).chain(more);
            if let Some(value) = joined(values.filter_map(|v| v.to_str().ok())) {
                f(name.as_str(), &value);
            }
        }
    }

    fn value(&self, name: &str) -> Option<Cow<'_, str>> {
        joined(self.get_all(name).iter().filter_map(|v| v.to_str().ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_line_lowercases_and_trims() {
        assert_eq!(
            HeaderPairs::parse_line("X-Device:  android "),
            Ok(("x-device".into(), "android".into()))
        );
        assert!(HeaderPairs::parse_line("no colon").is_err());
        assert!(HeaderPairs::parse_line(": v").is_err());
    }

    #[test]
    fn a_repeated_header_is_one_value_joined_in_order() {
        let mut map = http::HeaderMap::new();
        map.append("x-region", "atlantis".parse().unwrap());
        map.append("x-device", "android".parse().unwrap());
        map.append("x-region", "mu".parse().unwrap());
        assert_eq!(map.value("x-region").as_deref(), Some("atlantis,mu"));
        assert_eq!(map.value("x-device").as_deref(), Some("android"));
        assert_eq!(map.value("x-user-id"), None);
        let mut tags = Vec::new();
        map.for_each_tag(&mut |n, v| tags.push(format!("{n}={v}")));
        tags.sort();
        assert_eq!(tags, ["x-device=android", "x-region=atlantis,mu"]);

        let pairs = HeaderPairs::new([
            ("X-Region", "atlantis"),
            ("x-device", "android"),
            ("x-region", "mu"),
        ]);
        assert_eq!(pairs.value("x-region").as_deref(), Some("atlantis,mu"));
        let mut tags = Vec::new();
        pairs.for_each_tag(&mut |n, v| tags.push(format!("{n}={v}")));
        assert_eq!(tags, ["x-region=atlantis,mu", "x-device=android"]);
    }
}
