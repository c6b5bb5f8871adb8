//! The heads the proxy sends on, as the sender's own bytes with edits: the request (or status)
//! line, runs of the received header lines, the lines the proxy adds, and the empty line. The
//! pieces are written with one vectored write; nothing is parsed into a map or encoded again.

use std::ops::Range;

use super::head::{RequestHead, ResponseHead};

/// A piece of an outgoing head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Bytes of the buffer the head was parsed from.
    Input(Range<usize>),
    /// Bytes of [`Head::added`].
    Added(Range<usize>),
    Static(&'static [u8]),
}

/// An outgoing head. Kept per connection and cleared between messages, so a head allocates
/// nothing once the connection has carried one.
#[derive(Debug, Default)]
pub struct Head {
    pub pieces: Vec<Piece>,
    /// The lines the proxy adds (stamp, rebuilt baggage, framing, debug headers).
    pub added: Vec<u8>,
}

impl Head {
    pub fn clear(&mut self) {
        self.pieces.clear();
        self.added.clear();
    }

    /// The bytes of each piece, given the buffer the head was parsed from.
    pub fn slices<'a>(&'a self, input: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.pieces.iter().map(move |piece| match piece {
            Piece::Input(range) => &input[range.clone()],
            Piece::Added(range) => &self.added[range.clone()],
            Piece::Static(bytes) => bytes,
        })
    }

    #[cfg(test)]
    pub fn to_vec(&self, input: &[u8]) -> Vec<u8> {
        self.slices(input).flatten().copied().collect()
    }

    fn add(&mut self, parts: &[&[u8]]) {
        let start = self.added.len();
        for part in parts {
            self.added.extend_from_slice(part);
        }
        self.pieces.push(Piece::Added(start..self.added.len()));
    }
}

/// Offset of `part` (a slice of `buf`) in `buf`.
fn offset(buf: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - buf.as_ptr() as usize
}

/// Pushes the header lines of `headers` not in `drop` as runs of `buf`. `end` is where the
/// last line ends (before the empty line).
fn kept_lines(buf: &[u8], headers: &[httparse::Header], drop: u128, end: usize, out: &mut Head) {
    let mut run: Option<usize> = None;
    for (i, header) in headers.iter().enumerate() {
        let start = offset(buf, header.name.as_bytes());
        let dropped = drop & (1u128 << i) != 0;
        match (run, dropped) {
            (Some(from), true) => {
                out.pieces.push(Piece::Input(from..start));
                run = None;
            }
            (None, false) => run = Some(start),
            _ => {}
        }
    }
    if let Some(from) = run {
        out.pieces.push(Piece::Input(from..end));
    }
}

/// What the proxy changes in a request on its way upstream.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestEdits<'a> {
    /// Remove the stamp the request came with.
    pub strip_stamp: bool,
    /// Stamp the request: our header's value and our baggage member (`steer-release=...`).
    pub stamp: Option<(&'a [u8], &'a [u8])>,
    /// The Host to add when the request has none (HTTP/1.0).
    pub host: &'a str,
}

/// The request head for the upstream: HTTP/1.1, origin form, hop-by-hop fields removed, the
/// stamp written, `transfer-encoding: chunked` for a chunked body (re-framed canonically).
pub fn request_head(buf: &[u8], head: &RequestHead, edits: &RequestEdits, out: &mut Head) {
    out.clear();
    let method = offset(buf, head.method.as_bytes());
    let target = offset(buf, head.target.as_bytes());
    let rest = head.target_rest();
    let end = target + head.target.len();
    if rest.len() == head.target.len() {
        out.pieces.push(Piece::Input(method..end));
    } else {
        // Absolute form: the path (and query) alone, `/` when there is none.
        out.pieces.push(Piece::Input(method..target));
        if !rest.starts_with('/') {
            out.pieces.push(Piece::Static(b"/"));
        }
        out.pieces.push(Piece::Input(end - rest.len()..end));
    }
    out.pieces.push(Piece::Static(b" HTTP/1.1\r\n"));
    let class = &head.class;
    let restamp = edits.strip_stamp || edits.stamp.is_some();
    let mut drop = class.hop_by_hop;
    if restamp {
        drop |= class.stamp | class.baggage;
    }
    kept_lines(buf, head.headers, drop, head.len - 2, out);
    if class.host.is_none() {
        out.add(&[b"host: ", edits.host.as_bytes(), b"\r\n"]);
    }
    if class.chunked {
        out.pieces
            .push(Piece::Static(b"transfer-encoding: chunked\r\n"));
    }
    if restamp {
        let others = (class.baggage != 0).then(|| {
            let values = head
                .headers
                .iter()
                .enumerate()
                .filter(|(i, _)| class.baggage & (1u128 << i) != 0)
                .filter_map(|(_, h)| std::str::from_utf8(h.value).ok());
            crate::proxy::stamp::other_members(values)
        });
        let others = others.as_deref().unwrap_or("");
        if let Some((release, member)) = edits.stamp {
            out.add(&[b"x-steer-release: ", release, b"\r\n"]);
            let comma: &[u8] = if others.is_empty() { b"" } else { b"," };
            out.add(&[b"baggage: ", others.as_bytes(), comma, member, b"\r\n"]);
        } else if !others.is_empty() {
            out.add(&[b"baggage: ", others.as_bytes(), b"\r\n"]);
        }
    }
    out.pieces.push(Piece::Static(b"\r\n"));
}

/// How the proxy frames a response body for the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientFraming {
    /// As the upstream framed it (a length, or no body).
    AsIs,
    /// Chunked, re-framed canonically.
    Chunked,
    /// The bytes as they come, then the connection closes.
    UntilClose,
}

/// What the proxy changes in a response on its way to the client.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResponseEdits<'a> {
    /// Pre-rendered debug header lines (`x-steer-service: ...\r\n...`), or empty.
    pub debug_lines: &'a [u8],
    /// The connection closes after this response (`Connection: close`, or the client's
    /// HTTP/1.0 default).
    pub close: bool,
    /// The client speaks HTTP/1.0 and keeps the connection: it needs `Connection: keep-alive`.
    pub http10_keep_alive: bool,
}

/// The response head for the client: HTTP/1.1, hop-by-hop fields removed, the body's framing
/// and the debug headers written.
pub fn response_head(
    buf: &[u8],
    head: &ResponseHead,
    framing: ClientFraming,
    edits: &ResponseEdits,
    out: &mut Head,
) {
    out.clear();
    let line_end = buf[..head.len]
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(head.len, |at| at + 2);
    out.pieces.push(Piece::Static(b"HTTP/1.1 "));
    out.pieces.push(Piece::Input(head.status_start..line_end));
    let mut drop = head.class.hop_by_hop;
    if !edits.debug_lines.is_empty() {
        drop |= head.class.debug;
    }
    if framing == ClientFraming::UntilClose {
        // The client reads to the close: a length it might trust instead is not sent.
        drop |= head.class.hop_by_hop;
    }
    kept_lines(buf, head.headers, drop, head.len - 2, out);
    if framing == ClientFraming::Chunked {
        out.pieces
            .push(Piece::Static(b"transfer-encoding: chunked\r\n"));
    }
    if !edits.debug_lines.is_empty() {
        out.add(&[edits.debug_lines]);
    }
    if edits.close {
        out.pieces.push(Piece::Static(b"connection: close\r\n"));
    } else if edits.http10_keep_alive {
        out.pieces
            .push(Piece::Static(b"connection: keep-alive\r\n"));
    }
    out.pieces.push(Piece::Static(b"\r\n"));
}

#[cfg(test)]
mod tests {
    use super::super::head::{header_storage, parse_request, parse_response};
    use super::*;

    fn rendered_request(bytes: &[u8], edits: &RequestEdits) -> String {
        let mut storage = header_storage();
        let head = parse_request(bytes, &mut storage).unwrap().unwrap();
        let mut out = Head::default();
        request_head(bytes, &head, edits, &mut out);
        String::from_utf8(out.to_vec(bytes)).unwrap()
    }

    #[test]
    fn a_request_head_is_the_clients_bytes_without_hop_by_hop_fields() {
        let bytes = b"GET /menu HTTP/1.1\r\nHost: restaurant\r\nX-Device: android\r\n\
                      Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n\
                      Accept:  */* \r\n\r\n";
        assert_eq!(
            rendered_request(bytes, &RequestEdits::default()),
            "GET /menu HTTP/1.1\r\nHost: restaurant\r\nX-Device: android\r\nAccept:  */* \r\n\r\n"
        );
    }

    #[test]
    fn a_stamp_replaces_the_incoming_one_and_joins_the_other_baggage_members() {
        let bytes = b"POST /x HTTP/1.1\r\nhost: a\r\nbaggage: userId=alice, steer-release=old\r\n\
                      x-steer-release: old\r\nbaggage: k=v\r\ntransfer-encoding: chunked\r\n\r\n";
        let stamp = RequestEdits {
            stamp: Some((b"red;sig=S", b"steer-release=red;sig=S")),
            ..RequestEdits::default()
        };
        assert_eq!(
            rendered_request(bytes, &stamp),
            "POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\
             x-steer-release: red;sig=S\r\nbaggage: userId=alice,k=v,steer-release=red;sig=S\r\n\r\n"
        );
        let strip = RequestEdits {
            strip_stamp: true,
            ..RequestEdits::default()
        };
        assert_eq!(
            rendered_request(bytes, &strip),
            "POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nbaggage: userId=alice,k=v\r\n\r\n"
        );
        // Without other baggage: the member alone.
        let plain = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        assert_eq!(
            rendered_request(plain, &stamp),
            "GET / HTTP/1.1\r\nhost: a\r\nx-steer-release: red;sig=S\r\nbaggage: steer-release=red;sig=S\r\n\r\n"
        );
        // Neither: whatever the request carries goes on untouched.
        assert_eq!(
            rendered_request(bytes, &RequestEdits::default()),
            "POST /x HTTP/1.1\r\nhost: a\r\nbaggage: userId=alice, steer-release=old\r\n\
             x-steer-release: old\r\nbaggage: k=v\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn absolute_form_becomes_origin_form_and_http10_gets_a_host() {
        let edits = RequestEdits {
            host: "restaurant",
            ..RequestEdits::default()
        };
        assert_eq!(
            rendered_request(
                b"GET http://shop:80/menu?x HTTP/1.1\r\nhost: shop\r\n\r\n",
                &edits
            ),
            "GET /menu?x HTTP/1.1\r\nhost: shop\r\n\r\n"
        );
        assert_eq!(
            rendered_request(b"GET http://shop HTTP/1.1\r\nhost: shop\r\n\r\n", &edits),
            "GET / HTTP/1.1\r\nhost: shop\r\n\r\n"
        );
        assert_eq!(
            rendered_request(b"\r\nGET / HTTP/1.0\r\n\r\n", &edits),
            "GET / HTTP/1.1\r\nhost: restaurant\r\n\r\n"
        );
    }

    #[test]
    fn a_response_head_gets_its_framing_debug_lines_and_close() {
        let bytes = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nx-steer-version: v9\r\n\
                      Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        let mut storage = header_storage();
        let head = parse_response(bytes, &mut storage).unwrap().unwrap();
        let mut out = Head::default();
        let edits = ResponseEdits {
            debug_lines: b"x-steer-version: v1\r\n",
            close: true,
            http10_keep_alive: false,
        };
        response_head(bytes, &head, ClientFraming::Chunked, &edits, &mut out);
        assert_eq!(
            String::from_utf8(out.to_vec(bytes)).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\ntransfer-encoding: chunked\r\n\
             x-steer-version: v1\r\nconnection: close\r\n\r\n"
        );
        response_head(
            bytes,
            &head,
            ClientFraming::AsIs,
            &ResponseEdits::default(),
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out.to_vec(bytes)).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nx-steer-version: v9\r\n\r\n"
        );
    }
}
