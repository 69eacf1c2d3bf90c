//! The subcommands that are not the merge job itself: `check`, `worker`, `doctor`,
//! `summarize`.

pub mod check;
pub mod doctor;
pub mod summarize;
pub mod worker;
