//! One module per subcommand, or per family of subcommands that share
//! their setup; `main` dispatches to them.

pub mod bench;
pub mod connect;
pub mod doctor;
pub mod files;
pub mod forward;
pub mod nat_check;
pub mod ping;
pub mod pipe;
pub mod registry;
pub mod serve;
