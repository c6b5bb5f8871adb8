//! Request and response heads: parsed with `httparse`, held to RFC 9112's framing rules, and
//! classified in one pass over the header slices. Pure: bytes in, decisions out, so a fuzz
//! target can call [`parse_request`] and [`parse_response`] directly.

use crate::proxy::MAX_HEADER_BYTES;

/// Header fields a head may have; more is answered 431 like a head too large.
pub const MAX_HEADERS: usize = 128;

/// Header storage for one parse (on the caller's stack).
pub type HeaderStorage<'b> = [httparse::Header<'b>; MAX_HEADERS];

pub fn header_storage<'b>() -> HeaderStorage<'b> {
    [httparse::EMPTY_HEADER; MAX_HEADERS]
}

/// Why a message cannot be forwarded as it was framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// Refused with 400 and the connection closed.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// A head over [`MAX_HEADER_BYTES`] or [`MAX_HEADERS`]: 431.
    #[error("header section too large")]
    TooLarge,
    /// A transfer coding steer does not apply: 501.
    #[error("transfer coding not implemented")]
    UnknownCoding,
}

impl FramingError {
    pub fn status(&self) -> u16 {
        match self {
            FramingError::Malformed(_) => 400,
            FramingError::TooLarge => 431,
            FramingError::UnknownCoding => 501,
        }
    }
}

/// How a message's body is delimited (RFC 9112 section 6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    Length(u64),
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// What the proxy acts on, found in one pass over the header fields. Bit `i` of a mask is
/// header field `i`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Classified {
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// `Connection: close` was sent.
    pub close: bool,
    /// `Connection: keep-alive` was sent (what keeps an HTTP/1.0 connection open).
    pub keep_alive: bool,
    /// An Upgrade header field (WebSocket, h2c): such requests go to hyper.
    pub upgrade: bool,
    pub expect_continue: bool,
    /// The Host field.
    pub host: Option<usize>,
    /// The stamp header fields (`x-steer-release`).
    pub stamp: u128,
    /// The `baggage` fields.
    pub baggage: u128,
    /// The debug header fields of responses (`x-steer-service`, `-version`, `-release`).
    pub debug: u128,
    /// Fields never forwarded: hop-by-hop ones, those Connection names, and the framing
    /// fields the proxy writes itself.
    pub hop_by_hop: u128,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// A parsed request head. The slices point into the buffer it was parsed from.
#[derive(Debug)]
pub struct RequestHead<'h, 'b> {
    pub method: &'b str,
    pub target: &'b str,
    pub version: Version,
    pub headers: &'h [httparse::Header<'b>],
    /// Bytes of the head, the final empty line included.
    pub len: usize,
    pub class: Classified,
}

impl RequestHead<'_, '_> {
    /// The body's framing (RFC 9112 section 6.3: a request without one has none).
    pub fn framing(&self) -> Framing {
        match (self.class.chunked, self.class.content_length) {
            (true, _) => Framing::Chunked,
            (false, Some(0) | None) => Framing::Empty,
            (false, Some(n)) => Framing::Length(n),
        }
    }

    /// Whether the client keeps the connection open after this exchange.
    pub fn keep_alive(&self) -> bool {
        match self.version {
            Version::Http11 => !self.class.close,
            Version::Http10 => self.class.keep_alive && !self.class.close,
        }
    }

    /// The authority of an absolute-form target (`http://host:port/path`), which overrides
    /// Host (RFC 9112 section 3.2.2).
    pub fn target_authority(&self) -> Option<&str> {
        let rest = strip_prefix_ignore_case(self.target, "http://")
            .or_else(|| strip_prefix_ignore_case(self.target, "https://"))?;
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        Some(&rest[..end])
    }

    /// What follows the authority of an absolute-form target (`/path?q`, `?q` or nothing);
    /// the whole target otherwise.
    pub fn target_rest(&self) -> &str {
        match self.target_authority() {
            Some(authority) => {
                let start = self.target.find("//").map_or(0, |at| at + 2) + authority.len();
                &self.target[start..]
            }
            None => self.target,
        }
    }

    /// The path of the target, without the query.
    pub fn path(&self) -> &str {
        let rest = self.target_rest();
        match rest.split_once('?').map_or(rest, |(path, _)| path) {
            "" => "/",
            path => path,
        }
    }

    pub fn host_header(&self) -> Option<&str> {
        let value = self.headers[self.class.host?].value;
        std::str::from_utf8(value).ok()
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead<'h, 'b> {
    pub status: u16,
    pub version: Version,
    pub headers: &'h [httparse::Header<'b>],
    /// Offset of the status code in the buffer (the status line after the version).
    pub status_start: usize,
    pub len: usize,
    pub class: Classified,
}

impl ResponseHead<'_, '_> {
    /// The body's framing, for a response to a `HEAD` request or not.
    pub fn framing(&self, to_head: bool) -> Framing {
        if to_head || self.status < 200 || self.status == 204 || self.status == 304 {
            return Framing::Empty;
        }
        match (self.class.chunked, self.class.content_length) {
            (true, _) => Framing::Chunked,
            (false, Some(n)) => Framing::Length(n),
            (false, None) => Framing::Close,
        }
    }

    /// Whether the upstream keeps the connection open after this response.
    pub fn keep_alive(&self) -> bool {
        match self.version {
            Version::Http11 => !self.class.close,
            Version::Http10 => self.class.keep_alive && !self.class.close,
        }
    }
}

/// Every line of a head ends with CRLF: httparse also accepts a bare LF, which another parser
/// may read differently. (A bare CR httparse refuses itself.)
fn check_line_ends(head: &[u8]) -> Result<(), FramingError> {
    let mut previous = 0u8;
    for &byte in head {
        if byte == b'\n' && previous != b'\r' {
            return Err(FramingError::Malformed("bare LF as a line end"));
        }
        previous = byte;
    }
    Ok(())
}

fn parse_error(err: httparse::Error) -> FramingError {
    match err {
        httparse::Error::TooManyHeaders => FramingError::TooLarge,
        httparse::Error::HeaderName => FramingError::Malformed("invalid header name"),
        httparse::Error::HeaderValue => FramingError::Malformed("invalid header value"),
        httparse::Error::NewLine => FramingError::Malformed("invalid line end"),
        httparse::Error::Version => FramingError::Malformed("unknown HTTP version"),
        httparse::Error::Status => FramingError::Malformed("invalid status"),
        httparse::Error::Token => FramingError::Malformed("invalid method or target"),
    }
}

/// Parses a request head from the start of `buf`: `Ok(None)` while it is incomplete.
pub fn parse_request<'h, 'b>(
    buf: &'b [u8],
    storage: &'h mut HeaderStorage<'b>,
) -> Result<Option<RequestHead<'h, 'b>>, FramingError> {
    let mut request = httparse::Request::new(storage);
    let len = match request.parse(buf).map_err(parse_error)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial if buf.len() >= MAX_HEADER_BYTES => {
            return Err(FramingError::TooLarge);
        }
        httparse::Status::Partial => return Ok(None),
    };
    if len > MAX_HEADER_BYTES {
        return Err(FramingError::TooLarge);
    }
    check_line_ends(&buf[..len])?;
    let version = match request.version {
        Some(0) => Version::Http10,
        _ => Version::Http11,
    };
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Err(FramingError::Malformed("no request line"));
    };
    let headers: &'h [httparse::Header<'b>] = request.headers;
    let class = classify(headers, Side::Request)?;
    if class.chunked && version == Version::Http10 {
        return Err(FramingError::Malformed("transfer-encoding on HTTP/1.0"));
    }
    if class.host.is_none() && version == Version::Http11 {
        return Err(FramingError::Malformed("HTTP/1.1 request without host"));
    }
    Ok(Some(RequestHead {
        method,
        target,
        version,
        headers,
        len,
        class,
    }))
}

/// Parses a response head from the start of `buf`: `Ok(None)` while it is incomplete.
pub fn parse_response<'h, 'b>(
    buf: &'b [u8],
    storage: &'h mut HeaderStorage<'b>,
) -> Result<Option<ResponseHead<'h, 'b>>, FramingError> {
    let mut response = httparse::Response::new(storage);
    let len = match response.parse(buf).map_err(parse_error)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial if buf.len() >= MAX_HEADER_BYTES => {
            return Err(FramingError::TooLarge);
        }
        httparse::Status::Partial => return Ok(None),
    };
    check_line_ends(&buf[..len])?;
    let version = match response.version {
        Some(0) => Version::Http10,
        _ => Version::Http11,
    };
    let status = response.code.unwrap_or(0);
    // "HTTP/1.x " is 9 bytes; httparse skips no leading bytes of a response.
    let status_start = 9;
    let headers: &'h [httparse::Header<'b>] = response.headers;
    let class = classify(headers, Side::Response)?;
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
        status_start,
        len,
        class,
    }))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Request,
    Response,
}

/// The one pass over the header fields.
fn classify(headers: &[httparse::Header], side: Side) -> Result<Classified, FramingError> {
    let mut class = Classified::default();
    let mut names_other = false;
    let mut transfer_encodings = 0;
    for (i, header) in headers.iter().enumerate() {
        let bit = 1u128 << i;
        let name = header.name;
        let value = header.value;
        // Names are dispatched on length first: most fields are none of these.
        match name.len() {
            4 if name.eq_ignore_ascii_case("host") => {
                if class.host.is_some() {
                    return Err(FramingError::Malformed("several host headers"));
                }
                class.host = Some(i);
            }
            14 if name.eq_ignore_ascii_case("content-length") => {
                let length = parse_content_length(value)?;
                match class.content_length {
                    Some(earlier) if earlier != length => {
                        return Err(FramingError::Malformed("content-length values differ"));
                    }
                    // The same value again: one is enough.
                    Some(_) => class.hop_by_hop |= bit,
                    None => class.content_length = Some(length),
                }
            }
            17 if name.eq_ignore_ascii_case("transfer-encoding") => {
                transfer_encodings += 1;
                if transfer_encodings > 1 {
                    return Err(FramingError::Malformed("several transfer-encoding headers"));
                }
                check_transfer_coding(value)?;
                class.chunked = true;
                class.hop_by_hop |= bit;
            }
            10 if name.eq_ignore_ascii_case("connection") => {
                class.hop_by_hop |= bit;
                for token in list(value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        class.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        class.keep_alive = true;
                    } else if !token.eq_ignore_ascii_case(b"upgrade") {
                        names_other = true;
                    }
                }
            }
            7 if name.eq_ignore_ascii_case("upgrade") => {
                class.upgrade = true;
                class.hop_by_hop |= bit;
            }
            // `te: trailers` is kept: gRPC servers require it, and it means the same on every
            // hop.
            2 if name.eq_ignore_ascii_case("te") && !value.eq_ignore_ascii_case(b"trailers") => {
                class.hop_by_hop |= bit;
            }
            6 if name.eq_ignore_ascii_case("expect") => {
                class.expect_continue = value.eq_ignore_ascii_case(b"100-continue");
            }
            7 if name.eq_ignore_ascii_case("baggage") => class.baggage |= bit,
            15 if name.eq_ignore_ascii_case("x-steer-release") => {
                class.stamp |= bit;
                class.debug |= bit;
            }
            15 if name.eq_ignore_ascii_case("x-steer-service") => class.debug |= bit,
            15 if name.eq_ignore_ascii_case("x-steer-version") => class.debug |= bit,
            7 if name.eq_ignore_ascii_case("trailer") => class.hop_by_hop |= bit,
            10 if name.eq_ignore_ascii_case("keep-alive") => class.hop_by_hop |= bit,
            16 if name.eq_ignore_ascii_case("proxy-connection") => class.hop_by_hop |= bit,
            18 if name.eq_ignore_ascii_case("proxy-authenticate") => class.hop_by_hop |= bit,
            19 if name.eq_ignore_ascii_case("proxy-authorization") => class.hop_by_hop |= bit,
            _ => {}
        }
    }
    if class.chunked && class.content_length.is_some() {
        return Err(FramingError::Malformed(
            "content-length with transfer-encoding",
        ));
    }
    if side == Side::Response {
        // Ours are written by the proxy; a request's stamp is handled by the route.
        class.stamp = 0;
    }
    if names_other {
        // Rare: a second pass for the fields Connection names.
        for header in headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        {
            for token in list(header.value) {
                for (i, other) in headers.iter().enumerate() {
                    if other.name.as_bytes().eq_ignore_ascii_case(token) {
                        class.hop_by_hop |= 1u128 << i;
                    }
                }
            }
        }
    }
    Ok(class)
}

/// The elements of a comma-separated list, without optional whitespace; empty ones skipped.
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|item| item.trim_ascii())
        .filter(|item| !item.is_empty())
}

/// One decimal number, nothing else (no sign, no list, no spaces inside).
fn parse_content_length(value: &[u8]) -> Result<u64, FramingError> {
    const BAD: FramingError = FramingError::Malformed("content-length is not one number");
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return Err(BAD);
    }
    Ok(value
        .iter()
        .fold(0u64, |n, &digit| n * 10 + u64::from(digit - b'0')))
}

/// The only transfer coding steer applies is one `chunked`, last: anything else either cannot
/// be delimited (400) or would need a coding steer does not implement (501).
pub(crate) fn check_transfer_coding(value: &[u8]) -> Result<(), FramingError> {
    let mut codings = 0;
    let mut chunked = 0;
    let mut last_chunked = false;
    let mut unknown = false;
    for coding in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        if coding.is_empty() {
            return Err(FramingError::Malformed("empty transfer coding"));
        }
        codings += 1;
        last_chunked = coding.eq_ignore_ascii_case(b"chunked");
        if last_chunked {
            chunked += 1;
        } else {
            unknown = true;
        }
    }
    if chunked > 1 {
        return Err(FramingError::Malformed("chunked applied twice"));
    }
    if codings == 0 || !last_chunked {
        return Err(FramingError::Malformed(
            "transfer coding does not end in chunked",
        ));
    }
    if unknown {
        return Err(FramingError::UnknownCoding);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(bytes: &[u8]) -> Result<Option<Classified>, FramingError> {
        let mut storage = header_storage();
        parse_request(bytes, &mut storage).map(|head| head.map(|h| h.class))
    }

    fn refused(bytes: &[u8]) -> u16 {
        match request(bytes) {
            Err(err) => err.status(),
            Ok(head) => panic!("accepted {:?}: {head:?}", String::from_utf8_lossy(bytes)),
        }
    }

    fn with_headers(headers: &str) -> Vec<u8> {
        format!("POST /x HTTP/1.1\r\nhost: a\r\n{headers}\r\n").into_bytes()
    }

    #[test]
    fn a_plain_request_is_parsed_and_classified() {
        let bytes = b"GET /menu?x=1 HTTP/1.1\r\nHost: restaurant\r\nX-Device: android\r\n\
                      Connection: keep-alive, x-secret\r\nx-secret: 1\r\nbaggage: a=b\r\n\r\nnext";
        let mut storage = header_storage();
        let head = parse_request(bytes, &mut storage).unwrap().unwrap();
        assert_eq!((head.method, head.target), ("GET", "/menu?x=1"));
        assert_eq!(head.len, bytes.len() - 4);
        assert_eq!(head.path(), "/menu");
        assert_eq!(head.host_header(), Some("restaurant"));
        assert_eq!(head.framing(), Framing::Empty);
        assert!(head.keep_alive());
        // Connection and what it names are hop-by-hop.
        assert_eq!(head.class.hop_by_hop, 0b1100);
        assert_eq!(head.class.baggage, 0b10000);
        assert_eq!(
            request(b"GET / HTTP/1.1\r\nhost: a\r\n"),
            Ok(None),
            "incomplete"
        );
    }

    #[test]
    fn an_absolute_form_target_gives_the_authority_and_an_origin_form_path() {
        let bytes = b"GET http://Shop.Example:8080/menu?x=1 HTTP/1.1\r\nhost: other\r\n\r\n";
        let mut storage = header_storage();
        let head = parse_request(bytes, &mut storage).unwrap().unwrap();
        assert_eq!(head.target_authority(), Some("Shop.Example:8080"));
        assert_eq!(head.target_rest(), "/menu?x=1");
        assert_eq!(head.path(), "/menu");
        let bytes = b"GET http://shop HTTP/1.1\r\nhost: shop\r\n\r\n";
        let mut storage = header_storage();
        let head = parse_request(bytes, &mut storage).unwrap().unwrap();
        assert_eq!(
            (head.target_authority(), head.target_rest()),
            (Some("shop"), "")
        );
        assert_eq!(head.path(), "/");
    }

    #[test]
    fn the_eight_forwarded_smuggling_variants_are_refused() {
        for te in [
            "transfer-encoding: cow, chunked\r\n",
            "transfer-encoding: identity, chunked\r\n",
            "transfer-encoding: chunked, chunked\r\n",
            "transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n",
            "transfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n",
            "transfer-encoding: chunked\r\ntransfer-encoding: identity\r\n",
            "Transfer-Encoding: CHUNKED , Chunked\r\n",
            "transfer-encoding: ,chunked\r\n",
        ] {
            let status = refused(&with_headers(te));
            assert!(status == 400 || status == 501, "{te}: {status}");
        }
        // Unknown codings are 501; a list that cannot be delimited is 400.
        assert_eq!(
            refused(&with_headers("transfer-encoding: cow, chunked\r\n")),
            501
        );
        assert_eq!(
            refused(&with_headers("transfer-encoding: gzip, chunked\r\n")),
            501
        );
        assert_eq!(
            refused(&with_headers("transfer-encoding: chunked, gzip\r\n")),
            400
        );
        assert_eq!(refused(&with_headers("transfer-encoding: gzip\r\n")), 400);
        // One `chunked`, in any case, is the one accepted.
        let class = request(&with_headers("Transfer-Encoding:  Chunked \r\n"))
            .unwrap()
            .unwrap();
        assert!(class.chunked);
    }

    #[test]
    fn framing_that_two_parsers_could_read_differently_is_refused() {
        let cases: [(&str, &[u8]); 14] = [
            (
                "content-length with transfer-encoding",
                b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
            ),
            (
                "transfer-encoding on HTTP/1.0",
                b"POST / HTTP/1.0\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n",
            ),
            (
                "content-length with a sign",
                b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: +3\r\n\r\n",
            ),
            (
                "content-length as a list",
                b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3, 3\r\n\r\n",
            ),
            (
                "content-length in hex",
                b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 0x3\r\n\r\n",
            ),
            (
                "content-length overflowing",
                b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 99999999999999999999\r\n\r\n",
            ),
            (
                "content-lengths that differ",
                b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
            ),
            (
                "obs-fold",
                b"GET / HTTP/1.1\r\nhost: a\r\nx-a: b\r\n c\r\n\r\n",
            ),
            (
                "whitespace before a colon",
                b"GET / HTTP/1.1\r\nhost: a\r\ntransfer-encoding : chunked\r\n\r\n",
            ),
            ("bare CR", b"GET / HTTP/1.1\r\nhost: a\rx-a: b\r\n\r\n"),
            ("bare LF", b"GET / HTTP/1.1\nhost: a\r\n\r\n"),
            ("bare LF at the end", b"GET / HTTP/1.1\r\nhost: a\n\n"),
            ("several hosts", b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n"),
            ("HTTP/1.1 without host", b"GET / HTTP/1.1\r\nx-a: b\r\n\r\n"),
        ];
        for (what, bytes) in cases {
            assert_eq!(refused(bytes), 400, "{what}");
        }
        for control in [0u8, 0x01, 0x0b, 0x1f, 0x7f] {
            let mut bytes = b"GET / HTTP/1.1\r\nhost: a\r\nx-a: b".to_vec();
            bytes.push(control);
            bytes.extend_from_slice(b"c\r\n\r\n");
            assert_eq!(refused(&bytes), 400, "value with {control:#x}");
            let mut bytes = b"GET / HTTP/1.1\r\nhost: a\r\nx-".to_vec();
            bytes.push(control);
            bytes.extend_from_slice(b"a: b\r\n\r\n");
            assert_eq!(refused(&bytes), 400, "name with {control:#x}");
        }
        // Repeats of one value are one content-length.
        let class = request(&with_headers("content-length: 5\r\ncontent-length: 5\r\n"))
            .unwrap()
            .unwrap();
        assert_eq!(class.content_length, Some(5));
        assert_eq!(class.hop_by_hop, 0b100, "the repeat is not forwarded");
    }

    #[test]
    fn heads_too_large_are_431() {
        let mut bytes = b"GET / HTTP/1.1\r\nhost: a\r\n".to_vec();
        bytes.extend(std::iter::repeat_n(b'a', MAX_HEADER_BYTES));
        assert_eq!(refused(&bytes), 431);
        let many: String = (0..MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert_eq!(refused(&with_headers(&many)), 431);
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let keep = |bytes: &[u8]| {
            let mut storage = header_storage();
            parse_request(bytes, &mut storage)
                .unwrap()
                .unwrap()
                .keep_alive()
        };
        assert!(keep(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"));
        assert!(!keep(
            b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
        ));
        assert!(!keep(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(keep(b"GET / HTTP/1.0\r\nconnection: Keep-Alive\r\n\r\n"));
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let framing = |bytes: &[u8], to_head: bool| {
            let mut storage = header_storage();
            let head = parse_response(bytes, &mut storage).unwrap().unwrap();
            head.framing(to_head)
        };
        let sized = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
        assert_eq!(framing(sized, false), Framing::Length(5));
        assert_eq!(framing(sized, true), Framing::Empty, "HEAD");
        for status in ["100 Continue", "204 No Content", "304 Not Modified"] {
            let bytes = format!("HTTP/1.1 {status}\r\ncontent-length: 5\r\n\r\n");
            assert_eq!(framing(bytes.as_bytes(), false), Framing::Empty, "{status}");
        }
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(framing(chunked, false), Framing::Chunked);
        assert_eq!(framing(b"HTTP/1.1 200 OK\r\n\r\n", false), Framing::Close);
        let mut storage = header_storage();
        let head = parse_response(b"HTTP/1.0 200 OK\r\n\r\n", &mut storage)
            .unwrap()
            .unwrap();
        assert!(!head.keep_alive());
        let mut storage = header_storage();
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n",
                &mut storage
            )
            .unwrap_err()
            .status(),
            400
        );
        let mut storage = header_storage();
        let head = parse_response(
            b"HTTP/1.1 200 OK\r\nx-steer-version: v9\r\nkeep-alive: timeout=5\r\n\r\n",
            &mut storage,
        )
        .unwrap()
        .unwrap();
        assert_eq!((head.class.debug, head.class.hop_by_hop), (0b1, 0b10));
        assert_eq!(head.status_start, 9);
    }
}
