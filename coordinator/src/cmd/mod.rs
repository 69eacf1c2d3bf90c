//! The subcommands that are not the merge job itself: `worker`, `doctor`, `summarize`.

pub mod doctor;
pub mod summarize;
pub mod worker;
