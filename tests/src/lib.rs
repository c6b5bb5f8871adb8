//! The test bed shared by the end-to-end tests and benchmarks.
