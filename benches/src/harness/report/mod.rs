//! Summaries of measured runs, the terminal table, loading and merging results files, and the SVG plot.
//!
//! Everything here works from [`RunResult`]s only, so results written by several invocations (or on
//! several days) can be [`load`]ed, [`merge`]d and summarised together.
//!
//! `stats.rs` groups runs into [`Summary`] rows (medians, spread, the latency of the median run);
//! `table.rs` prints them and the [`warnings`]; `files.rs` reads and merges results files;
//! `plot.rs` draws the SVG.
//!
//! [`RunResult`]: super::results::RunResult

mod files;
mod plot;
mod stats;
mod table;
#[cfg(test)]
mod testdata;

pub use files::{load, merge, LoadError};
pub use plot::{write_svg, PlotError};
pub use stats::{summarize, Summary};
pub use table::{print_table, warnings};
