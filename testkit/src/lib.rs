//! Servitor's test doubles, wire-faithful and local: a [`gitlab`] stand-in
//! that speaks the runner API (and git's smart HTTP) over HTTP, an [`imds`]
//! stand-in that speaks IMDSv2, and the job [`image`] built from the host's
//! busybox because no registry is reachable.
//!
//! Used by the unit tests of the production crates (as a dev-dependency),
//! the end-to-end tests and the demo. Never a dependency of a production
//! crate: the installed coordinator and agent carry no stand-in.

#![forbid(unsafe_code)]

pub mod gitlab;
pub mod image;
pub mod imds;
