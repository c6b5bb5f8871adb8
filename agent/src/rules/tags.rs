//! Where a request's tags come from: anything that can list its headers.

/// A request's headers as the rule engine reads them. Names are compared lower-case.
pub trait Tags {
    /// Calls `f` with every (lower-case name, value) pair, in order.
    fn for_each_pair(&self, f: &mut dyn FnMut(&str, &str));
    /// Calls `f` with each value of header `name` (given lower-case).
    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&str));
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
    fn for_each_pair(&self, f: &mut dyn FnMut(&str, &str)) {
        for (name, value) in &self.0 {
            f(name, value);
        }
    }

    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&str)) {
        for (n, value) in &self.0 {
            if n == name {
                f(value);
            }
        }
    }
}

/// hyper's header map: names are stored lower-case already. Values that are not visible ASCII
/// cannot equal any configured tag value and are skipped.
impl Tags for http::HeaderMap {
    fn for_each_pair(&self, f: &mut dyn FnMut(&str, &str)) {
        for (name, value) in self {
            if let Ok(value) = value.to_str() {
                f(name.as_str(), value);
            }
        }
    }

    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&str)) {
        for value in self.get_all(name) {
            if let Ok(value) = value.to_str() {
                f(value);
            }
        }
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
    fn header_map_lists_every_value() {
        let mut map = http::HeaderMap::new();
        map.append("x-region", "atlantis".parse().unwrap());
        map.append("x-region", "mu".parse().unwrap());
        let mut seen = Vec::new();
        map.for_each_value("x-region", &mut |v| seen.push(v.to_string()));
        assert_eq!(seen, ["atlantis", "mu"]);
    }
}
