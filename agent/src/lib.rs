//! steer: full-stack multiple canary releases on Kubernetes without sidecars.
//!
//! One agent per node: eBPF programs redirect pod egress to mesh services into a node-local
//! proxy, which picks at most one canary release per request and routes every hop to the
//! version of the next service that belongs to it.

pub mod admin;
pub mod check;
pub mod cli;
pub mod client;
pub mod config;
pub mod datapath;
pub mod drain;
pub mod files;
pub mod kubernetes;
pub mod metrics;
pub mod proxy;
pub mod rollout;
pub mod rules;
pub mod run;
pub mod stamp_key;
pub mod state;
