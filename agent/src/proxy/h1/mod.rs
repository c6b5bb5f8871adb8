//! The node proxy's own HTTP/1.1 path (client HTTP/1.1 to upstream HTTP/1.1), over
//! `httparse`: heads are forwarded as the sender's own bytes with edits, bodies are copied
//! (Content-Length) or re-framed canonically (chunked), and idle connections hold no buffer.
//! HTTP/2, upgrades and CONNECT stay with hyper.
//!
//! - `head`: request and response heads, RFC 9112's framing rules, the one-pass classification;
//! - `body`: body framing (decode, canonical chunked encoding);
//! - `render`: the heads sent on, as pieces for one vectored write;
//! - `view`: what the routing decision reads of a head.
//!
//! `head`, `body` and `render` are pure functions of bytes, for unit tests and fuzzing.

pub mod body;
pub mod head;
pub mod render;
mod view;
