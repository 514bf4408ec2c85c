//! The lab: `session-operator demo` and `session-operator bench`, built only with the Cargo
//! feature `lab` (on by default). They run the operator against an emulated cluster
//! (`kube-emulator`) and measure it, so the image, built without the feature, links neither
//! the emulator nor the benchmarks.

pub(crate) mod bench;
pub(crate) mod demo;
mod shared;
