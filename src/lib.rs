//! # farpool
//!
//! An elastic far-memory pool for stateful serverless analytics, after Jiffy (EuroSys'22)
//! and Wukong (SoCC'20). Memory nodes expose fixed-size blocks of large regions through
//! one-sided READ/WRITE/CAS/FAA ([`farpool_rdma`]); a lightweight [`controller`] hands
//! blocks out *per task* at hierarchical paths (`/job/stage/task`) under leases; the
//! [`client`] library gives tasks block handles.
//!
//! Start with [`client::Client::connect`], or [`embedded::EmbeddedPool`] for an
//! in-process pool.

#![warn(missing_docs)]

pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod controller;
pub mod dag;
pub mod demo;
pub mod ds;
pub mod embedded;
pub mod experiment;
pub mod keys;
pub mod memnode;
pub mod metrics;
pub mod proto;
pub mod size;
pub mod soak;
pub mod tier;

pub use client::{BlockHandle, Client, ClientConfig, ClientError, LeaseGuard, Task};
pub use embedded::{EmbeddedConfig, EmbeddedPool};
pub use proto::{Placement, PoolPath};
