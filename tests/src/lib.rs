//! The test bed shared by the end-to-end tests, the benchmarks and the demo: a node made of
//! network namespaces ([`node`]), the seed's case studies deployed on it ([`scenario`]), and a
//! small HTTP client ([`http`]) and a small Kubernetes API server ([`apiserver`]).

pub mod apiserver;
pub mod browser;
pub mod http;
pub mod node;
pub mod scenario;

pub use node::{Node, Pod, Process, sh};
