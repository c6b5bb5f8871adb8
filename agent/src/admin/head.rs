//! The strict look at a request head the admin servers take before hyper parses it: hyper
//! accepts a bare LF as a line end and a request with both Content-Length and
//! Transfer-Encoding (it reads the body as chunked), the framing disagreements request
//! smuggling is made of. The proxy refuses them (RFC 9112); so does the admin.

use http::StatusCode;

use super::policy::Refusal;

/// The largest head the admin reads: an explain query with many headers fits many times.
pub const MAX_HEAD: usize = 32 * 1024;
/// The largest request body the admin takes (it needs none; a client may send `{}`).
pub const MAX_BODY: u64 = 64 * 1024;

/// Where the head at the start of `buf` ends (just past its empty line), if it is all there.
/// Lines are split at LF alone, so a head with bare LFs is found too and refused by
/// [`check_head`] instead of waited for until the header timeout.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (i, &byte) in buf.iter().enumerate() {
        if byte == b'\n' {
            let line = &buf[line_start..i];
            if line.is_empty() || line == b"\r" {
                return Some(i + 1);
            }
            line_start = i + 1;
        }
    }
    None
}

/// Checks a whole head (through its empty line): every line ends with CRLF, no header line is
/// folded, and the body is framed by at most one Content-Length (of at most [`MAX_BODY`]) and
/// no Transfer-Encoding. The body's length on success.
pub fn check_head(head: &[u8]) -> Result<u64, Refusal> {
    let bad = |reason: &'static str| Refusal::new(StatusCode::BAD_REQUEST, reason);
    for (i, &byte) in head.iter().enumerate() {
        match byte {
            b'\n' if i == 0 || head[i - 1] != b'\r' => {
                return Err(bad(
                    "a line ends with a bare LF: HTTP/1.1 lines end with CRLF",
                ));
            }
            b'\r' if head.get(i + 1) != Some(&b'\n') => {
                return Err(bad("a bare CR in the request head"));
            }
            _ => {}
        }
    }
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    // The request line first; hyper checks it.
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(bad("a folded header line (obsolete line folding)"));
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(bad("a header line without a colon"));
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let length = std::str::from_utf8(value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| bad("an invalid Content-Length"))?;
            if content_length.is_some_and(|seen| seen != length) {
                return Err(bad("two different Content-Lengths"));
            }
            content_length = Some(length);
        }
    }
    match (content_length, chunked) {
        (Some(_), true) => Err(bad(
            "both Content-Length and Transfer-Encoding: the body's length would be ambiguous",
        )),
        (None, true) => Err(Refusal::new(
            StatusCode::LENGTH_REQUIRED,
            "the admin API takes a request body only with a Content-Length",
        )),
        (Some(length), false) if length > MAX_BODY => Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the admin API takes request bodies of at most 64 KiB",
        )),
        (length, false) => Ok(length.unwrap_or(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(head: &str) -> (u16, &'static str) {
        let refusal = check_head(head.as_bytes()).expect_err(head);
        (refusal.status.as_u16(), refusal.reason)
    }

    #[test]
    fn a_plain_head_passes_with_its_body_length() {
        let get = "GET /config HTTP/1.1\r\nHost: localhost\r\n\r\n";
        assert_eq!(check_head(get.as_bytes()), Ok(0));
        let post = "POST /x HTTP/1.1\r\ncontent-length: 2\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(check_head(post.as_bytes()), Ok(2));
    }

    #[test]
    fn bare_line_ends_are_refused() {
        assert_eq!(refusal("GET / HTTP/1.1\nHost: a\r\n\r\n").0, 400);
        assert!(
            refusal("GET / HTTP/1.1\r\nHost: a\n\n")
                .1
                .contains("bare LF")
        );
        assert!(
            refusal("GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n")
                .1
                .contains("bare CR")
        );
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let both = "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(refusal(both).0, 400);
        assert!(
            refusal(both)
                .1
                .contains("both Content-Length and Transfer-Encoding")
        );
        let two = "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
        assert_eq!(refusal(two).0, 400);
        for value in ["-1", "5, 5", "0x10", ""] {
            let head = format!("POST / HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
            assert_eq!(
                refusal(&head),
                (400, "an invalid Content-Length"),
                "{value}"
            );
        }
        assert_eq!(
            refusal("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").0,
            411
        );
        assert_eq!(
            refusal("POST / HTTP/1.1\r\nContent-Length: 100000\r\n\r\n").0,
            413
        );
        assert_eq!(
            refusal("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n").0,
            400
        );
        assert_eq!(refusal("GET / HTTP/1.1\r\nno colon\r\n\r\n").0, 400);
    }

    #[test]
    fn the_end_of_a_head_is_found_with_either_line_end() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\nBODY"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b""), None);
    }
}
