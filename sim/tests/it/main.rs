//! The simulation's integration tests.
//!
//! Modules:
//! - `scenarios`: every file in `scenarios/` passes (what happened equals
//!   what it declares), and its report is an insta snapshot.
//! - `determinism`: the same seed gives the same trace, byte for byte.
//! - `generated`: generated scenarios round-trip through the file format;
//!   fuzzing finds phase 1's bug and exports a file that replays it;
//!   generated runs hold on hardened, break each seed phase, and reach
//!   every named dangerous state.
//! - `reports`: `--junit` and `--timeline` write their files.
//! - `cli`: `im-sim bugs` and `run --client`.
//! - `checkers`: the checkers on hand-made histories: what they must flag,
//!   and the false alarms they must not raise.
//! - `bugs`: every guard a scenario names fails it when switched back on,
//!   and every historical bug is guarded.
//! - `malformed`: bad scenario files are reported with path and line, and
//!   the runner exits 2 without running anything.
//! - `bench`: `im-sim bench --smoke --no-live` prints positive figures and
//!   its JSON line; the bench's generated stories are valid scenarios.

mod bench;
mod bugs;
mod checkers;
mod cli;
mod determinism;
mod generated;
mod malformed;
mod reports;
mod scenarios;

use std::path::PathBuf;

/// The repository's `scenarios/` directory.
pub fn scenarios_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

/// Every scenario file, sorted.
pub fn scenario_files() -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(scenarios_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scenario files found");
    files
}
