//! punch-lab: the demo, benchmarks and the test harness that runs the real
//! punch binaries.

pub mod demo;
pub mod harness;
