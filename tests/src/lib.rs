//! The test bed shared by the end-to-end tests, the benchmarks and the demo: a node made of
//! network namespaces ([`node`]).

pub mod node;

pub use node::{Node, Pod, Process, sh};
