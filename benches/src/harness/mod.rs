//! The packet-rate harness behind `vswitch-bench run | latency | ndr | report`.
//!
//! * [`spec`]: what is measured: topologies, frame sizes (including IMIX), offered rates.
//! * [`results`]: the JSON result schema (machine description, one record per run).
//! * [`clock`]: the TSC clock used for timestamps and rate control.
//! * [`gen`]: the generator: drives every port's rings from pinned threads.
//! * [`sink`]: its receive side (counts, order, misdelivery, latency).
//! * [`peer`]: starts, pins, measures and stops the switch under test (ours, DPDK, OVS).
//! * [`sys`]: machine description and CPU accounting from `/proc`.
//! * [`report`]: summaries (statistics), the terminal table, results files and the SVG plot.
//! * [`run`]: the orchestration of peers × sizes × repetitions.

pub mod clock;
pub mod gen;
pub mod peer;
pub mod report;
pub mod results;
pub mod run;
pub mod sink;
pub mod spec;
pub mod sys;
