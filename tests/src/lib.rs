//! punch-lab: the demo, benchmarks, the network-namespace NAT lab and the
//! test harness that runs the real punch binaries.

pub mod browser;
pub mod chaos;
pub mod dashboards;
pub mod demo;
pub mod flood;
pub mod harness;
pub mod lab;
pub mod load;
pub mod openapi;
pub mod slow_clients;
pub mod stunbench;
