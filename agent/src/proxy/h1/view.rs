//! The routing decision's view of an HTTP/1 request head: tags, stamp, host and path read
//! straight from the parsed header slices.

use std::borrow::Cow;

use super::head::RequestHead;
use crate::{
    proxy::{route::RequestView, stamp},
    rules::{Tags, joined},
};

/// A value the rules can compare: visible ASCII, spaces and tabs (as hyper's `to_str`).
fn text(value: &[u8]) -> Option<&str> {
    value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        .then(|| std::str::from_utf8(value).ok())
        .flatten()
}

impl RequestHead<'_, '_> {
    /// The values of the fields named `name` (any case), that are text.
    fn values<'s>(&'s self, name: &str) -> impl Iterator<Item = &'s str> {
        self.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| text(h.value))
    }

    fn masked(&self, mask: u128) -> impl Iterator<Item = &[u8]> {
        self.headers
            .iter()
            .enumerate()
            .filter(move |(i, _)| mask & (1u128 << i) != 0)
            .map(|(_, h)| h.value)
    }
}

impl Tags for RequestHead<'_, '_> {
    fn for_each_tag(&self, f: &mut dyn FnMut(&str, &str)) {
        let mut lower = String::new();
        for (i, header) in self.headers.iter().enumerate() {
            // Each name once, where it first appears, with the values of all its fields.
            if self.headers[..i]
                .iter()
                .any(|earlier| earlier.name.eq_ignore_ascii_case(header.name))
            {
                continue;
            }
            let Some(value) = joined(self.values(header.name)) else {
                continue;
            };
            let name = if header.name.bytes().any(|b| b.is_ascii_uppercase()) {
                lower.clear();
                lower.extend(header.name.chars().map(|c| c.to_ascii_lowercase()));
                lower.as_str()
            } else {
                header.name
            };
            f(name, &value);
        }
    }

    fn value(&self, name: &str) -> Option<Cow<'_, str>> {
        joined(self.values(name))
    }
}

impl RequestView for RequestHead<'_, '_> {
    fn authority(&self) -> Option<&str> {
        self.target_authority()
    }

    fn host(&self) -> Option<&str> {
        self.host_header()
    }

    fn path(&self) -> &str {
        RequestHead::path(self)
    }

    fn stamp(&self) -> Option<stamp::Incoming<'_>> {
        let ours = self.masked(self.class.stamp).next().map(text);
        stamp::read_values(ours, self.masked(self.class.baggage).filter_map(text))
    }

    fn tags(&self) -> &dyn Tags {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::super::head::{header_storage, parse_request};
    use super::*;

    #[test]
    fn tags_are_lower_case_names_once_with_their_values_joined() {
        let bytes = b"GET / HTTP/1.1\r\nHost: a\r\nX-Region: atlantis\r\nx-device: android\r\n\
                      x-region: mu\r\nx-bin: \xff\r\n\r\n";
        let mut storage = header_storage();
        let head = parse_request(bytes, &mut storage).unwrap().unwrap();
        let mut tags = Vec::new();
        head.for_each_tag(&mut |n, v| tags.push(format!("{n}={v}")));
        assert_eq!(tags, ["host=a", "x-region=atlantis,mu", "x-device=android"]);
        assert_eq!(head.value("x-region").as_deref(), Some("atlantis,mu"));
        assert_eq!(head.value("x-bin"), None, "not text");
    }

    #[test]
    fn the_stamp_is_read_from_our_header_then_from_baggage() {
        let read = |bytes: &[u8]| {
            let mut storage = header_storage();
            let head = parse_request(bytes, &mut storage).unwrap().unwrap();
            head.stamp()
                .map(|s| (s.release.to_string(), s.signature.map(str::to_string)))
        };
        assert_eq!(
            read(b"GET / HTTP/1.1\r\nhost: a\r\nX-Steer-Release: red;sig=S\r\n\r\n"),
            Some(("red".into(), Some("S".into())))
        );
        assert_eq!(
            read(
                b"GET / HTTP/1.1\r\nhost: a\r\nbaggage: a=b\r\nbaggage: steer-release=blue\r\n\r\n"
            ),
            Some(("blue".into(), None))
        );
        assert_eq!(
            read(b"GET / HTTP/1.1\r\nhost: a\r\nbaggage: a=b\r\n\r\n"),
            None
        );
    }
}
