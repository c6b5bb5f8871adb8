//! Message bodies: a decoder that finds the data in a body as it arrives (Content-Length,
//! chunked, close-delimited) and the canonical chunked encoding the proxy sends on. Chunk
//! sizes are emitted again, extensions dropped, trailers checked. Pure: a fuzz target can feed
//! bytes to [`Decoder::step`] directly.

use std::ops::Range;

use super::head::{Framing, FramingError};

/// The longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// The longest trailer section accepted.
const MAX_TRAILERS: usize = 8192;

/// Where a body stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Bytes of a Content-Length body still to come.
    Length(u64),
    /// A chunk-size line is next.
    ChunkSize,
    /// Bytes of the current chunk still to come.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// The trailer section after the last chunk.
    Trailers,
    /// Everything until the connection closes.
    Close,
    Done,
}

/// What one step found in the input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the input used up (framing and data).
    pub consumed: usize,
    /// Body data, as a range of the input.
    pub data: Range<usize>,
    /// The trailer fields (without the final empty line), when the last chunk was read.
    pub trailers: Option<Range<usize>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoder {
    state: State,
}

impl Decoder {
    pub fn new(framing: Framing) -> Decoder {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        Decoder { state }
    }

    /// The whole body has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether data may still come between framing: for a read timeout between body bytes.
    pub fn is_close_delimited(&self) -> bool {
        self.state == State::Close
    }

    /// Reads framing from `input` up to the next data (returned as a range of `input`) or the
    /// end of the body. `consumed == 0` with no data means more input is needed.
    pub fn step(&mut self, input: &[u8]) -> Result<Step, FramingError> {
        let mut consumed = 0;
        loop {
            let rest = &input[consumed..];
            match self.state {
                State::Done => return Ok(Step::at(consumed)),
                State::Close => {
                    return Ok(Step::data(input.len(), consumed..input.len()));
                }
                State::Length(remaining) | State::ChunkData(remaining) => {
                    if rest.is_empty() {
                        return Ok(Step::at(consumed));
                    }
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(rest.len());
                    let left = remaining - take as u64;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), n) => State::Length(n),
                        (_, 0) => State::ChunkEnd,
                        (_, n) => State::ChunkData(n),
                    };
                    return Ok(Step::data(consumed + take, consumed..consumed + take));
                }
                State::ChunkSize => match chunk_size_line(rest)? {
                    None => return Ok(Step::at(consumed)),
                    Some((0, len)) => {
                        consumed += len;
                        self.state = State::Trailers;
                    }
                    Some((size, len)) => {
                        consumed += len;
                        self.state = State::ChunkData(size);
                    }
                },
                State::ChunkEnd => {
                    if rest.len() < 2 {
                        return Ok(Step::at(consumed));
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(FramingError::Malformed("chunk data not followed by CRLF"));
                    }
                    consumed += 2;
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    let Some(len) = trailer_section(rest)? else {
                        return Ok(Step::at(consumed));
                    };
                    self.state = State::Done;
                    let trailers = consumed..consumed + len - 2;
                    return Ok(Step {
                        consumed: consumed + len,
                        data: 0..0,
                        trailers: Some(trailers),
                    });
                }
            }
        }
    }

    /// The connection closed: the end of a close-delimited body, an error for any other.
    pub fn end_of_input(&mut self) -> Result<(), FramingError> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(FramingError::Malformed(
                "connection closed before the body ended",
            )),
        }
    }
}

impl Step {
    fn at(consumed: usize) -> Step {
        Step {
            consumed,
            data: 0..0,
            trailers: None,
        }
    }

    fn data(consumed: usize, data: Range<usize>) -> Step {
        Step {
            consumed,
            data,
            trailers: None,
        }
    }
}

/// A chunk-size line: `1*HEXDIG [ BWS ";" chunk-ext ] CRLF`. Returns the size and the line's
/// length, or `None` while the line is incomplete.
fn chunk_size_line(input: &[u8]) -> Result<Option<(u64, usize)>, FramingError> {
    let digits = input.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == input.len() {
        if digits > 16 {
            return Err(FramingError::Malformed("chunk size overflows"));
        }
        return Ok(None);
    }
    if digits == 0 {
        return Err(FramingError::Malformed("chunk size is not hexadecimal"));
    }
    if digits > 16 {
        return Err(FramingError::Malformed("chunk size overflows"));
    }
    let size = input[..digits].iter().fold(0u64, |n, &b| {
        let digit = (b as char).to_digit(16).unwrap_or(0);
        (n << 4) | u64::from(digit)
    });
    let mut i = digits;
    // Extensions: optional whitespace, then `;` and anything visible up to the CRLF.
    let ws = input[i..]
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    i += ws;
    match input.get(i) {
        None => return Ok(None),
        Some(b';') => {
            while let Some(&b) = input.get(i) {
                if b == b'\r' || b == b'\n' {
                    break;
                }
                if b != b'\t' && (b < 0x20 || b == 0x7f) {
                    return Err(FramingError::Malformed(
                        "control character in chunk extension",
                    ));
                }
                i += 1;
            }
        }
        Some(b'\r') if ws == 0 => {}
        Some(_) => return Err(FramingError::Malformed("invalid chunk-size line")),
    }
    if i > MAX_CHUNK_LINE {
        return Err(FramingError::Malformed("chunk-size line too long"));
    }
    match (input.get(i), input.get(i + 1)) {
        (None, _) | (Some(b'\r'), None) => Ok(None),
        (Some(b'\r'), Some(b'\n')) => Ok(Some((size, i + 2))),
        _ => Err(FramingError::Malformed("chunk-size line not ended by CRLF")),
    }
}

/// The trailer section: field lines, each ended by CRLF, and an empty line. Returns its
/// length (the empty line included), or `None` while it is incomplete.
fn trailer_section(input: &[u8]) -> Result<Option<usize>, FramingError> {
    let end = if input.starts_with(b"\r\n") {
        2
    } else {
        match input.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(at) => at + 4,
            None if input.len() > MAX_TRAILERS => {
                return Err(FramingError::Malformed("trailer section too long"));
            }
            None => return Ok(None),
        }
    };
    if end > MAX_TRAILERS {
        return Err(FramingError::Malformed("trailer section too long"));
    }
    let section = &input[..end];
    if section
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || section[i - 1] != b'\r'))
    {
        return Err(FramingError::Malformed("bare LF in trailers"));
    }
    let mut fields = [httparse::EMPTY_HEADER; 32];
    match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((len, _))) if len == end => Ok(Some(end)),
        _ => Err(FramingError::Malformed("invalid trailer field")),
    }
}

/// The size line of a chunk of `len` bytes in canonical form (`HEX CRLF`), in `out`; returns
/// the bytes used.
pub fn chunk_prefix(len: usize, out: &mut [u8; 18]) -> usize {
    let digits = if len == 0 {
        1
    } else {
        (usize::BITS - len.leading_zeros()).div_ceil(4) as usize
    };
    for (i, digit) in out[..digits].iter_mut().enumerate() {
        let nibble = (len >> (4 * (digits - 1 - i))) & 0xf;
        *digit = b"0123456789abcdef"[nibble];
    }
    out[digits] = b'\r';
    out[digits + 1] = b'\n';
    digits + 2
}

/// What ends a chunked body: the last chunk, then the trailers, then an empty line.
pub const LAST_CHUNK: &[u8] = b"0\r\n";
pub const CRLF: &[u8] = b"\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed `split` bytes at a time, re-encoding chunked bodies canonically.
    fn run(
        framing: Framing,
        input: &[u8],
        split: usize,
    ) -> Result<(Vec<u8>, Vec<u8>, usize), FramingError> {
        let mut decoder = Decoder::new(framing);
        let mut data = Vec::new();
        let mut canonical = Vec::new();
        let mut buffered: Vec<u8> = Vec::new();
        let mut fed = 0;
        while !decoder.is_done() {
            let step = decoder.step(&buffered)?;
            if step.consumed == 0 && step.data.is_empty() && step.trailers.is_none() {
                if fed == input.len() {
                    decoder.end_of_input()?;
                    break;
                }
                let more = split.min(input.len() - fed);
                buffered.extend_from_slice(&input[fed..fed + more]);
                fed += more;
                continue;
            }
            let chunk = &buffered[step.data.clone()];
            if !chunk.is_empty() {
                let mut prefix = [0u8; 18];
                let n = chunk_prefix(chunk.len(), &mut prefix);
                canonical.extend_from_slice(&prefix[..n]);
                canonical.extend_from_slice(chunk);
                canonical.extend_from_slice(CRLF);
                data.extend_from_slice(chunk);
            }
            if let Some(trailers) = step.trailers {
                canonical.extend_from_slice(LAST_CHUNK);
                canonical.extend_from_slice(&buffered[trailers]);
                canonical.extend_from_slice(CRLF);
            }
            buffered.drain(..step.consumed);
        }
        Ok((data, canonical, fed - buffered.len()))
    }

    #[test]
    fn chunked_bodies_are_decoded_whatever_the_reads_and_reencoded_canonically() {
        let body = b"5;name=\"v\"\r\nhello\r\n06\r\n world\r\n0\r\nx-checksum: 1\r\n\r\nNEXT";
        for split in [1, 2, 3, 7, 1000] {
            let (data, canonical, used) = run(Framing::Chunked, body, split).unwrap();
            assert_eq!(data, b"hello world", "split {split}");
            assert_eq!(
                used,
                body.len() - 4,
                "the next message is left: split {split}"
            );
            // Data split across reads goes on as smaller chunks: the same body.
            let (again, _, _) = run(Framing::Chunked, &canonical, 1000).unwrap();
            assert_eq!(again, b"hello world", "split {split}");
            assert!(canonical.ends_with(b"\r\n0\r\nx-checksum: 1\r\n\r\n"));
        }
        let (_, canonical, _) = run(Framing::Chunked, body, 1000).unwrap();
        assert_eq!(
            canonical,
            b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 1\r\n\r\n"
        );
        let (_, canonical, _) = run(Framing::Chunked, b"0\r\n\r\n", 1).unwrap();
        assert_eq!(canonical, b"0\r\n\r\n");
    }

    #[test]
    fn broken_chunked_bodies_are_refused() {
        for bad in [
            &b"5\r\nhelloZZ"[..],
            b"ZZZ\r\n",
            b"5\r\nhello\r\nZZZ",
            b"10000000000000000\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
            b"5;a\x00\r\nhello\r\n0\r\n\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nbad header\r\n\r\n",
            b"5\r\nhello\r\n0\r\nx: a\nb: c\r\n\r\n",
        ] {
            let result = (1..4).map(|split| run(Framing::Chunked, bad, split));
            for result in result {
                assert!(
                    matches!(result, Err(FramingError::Malformed(_))),
                    "{:?}: {result:?}",
                    String::from_utf8_lossy(bad)
                );
            }
        }
        // Ended early: the connection closed inside the body.
        assert!(run(Framing::Chunked, b"5\r\nhel", 100).is_err());
        assert!(run(Framing::Length(10), b"hello", 100).is_err());
    }

    #[test]
    fn length_and_close_delimited_bodies_are_copied() {
        let (data, _, used) = run(Framing::Length(5), b"helloGET /", 3).unwrap();
        assert_eq!((data.as_slice(), used), (&b"hello"[..], 5));
        let (data, _, _) = run(Framing::Close, b"until the end", 4).unwrap();
        assert_eq!(data, b"until the end");
        assert!(Decoder::new(Framing::Empty).is_done());
        assert!(Decoder::new(Framing::Length(0)).is_done());
    }

    #[test]
    fn chunk_prefixes_are_lowercase_hex_without_padding() {
        let prefix = |len| {
            let mut out = [0u8; 18];
            let n = chunk_prefix(len, &mut out);
            String::from_utf8(out[..n].to_vec()).unwrap()
        };
        assert_eq!(prefix(0), "0\r\n");
        assert_eq!(prefix(5), "5\r\n");
        assert_eq!(prefix(16), "10\r\n");
        assert_eq!(prefix(0xabcdef), "abcdef\r\n");
        assert_eq!(prefix(usize::MAX), "ffffffffffffffff\r\n");
    }
}
