//! imsim's deterministic simulation harness.
//!
//! A [`scenario::Scenario`] (a TOML file in `scenarios/`) is played by
//! [`world::run`] in a turmoil network: the real server nodes, a RESP
//! [`redis_model`], and one agent per user driving the real client. The run
//! leaves a [`history::History`]; [`invariants`] judge it from outside;
//! [`report`] renders it for snapshots. [`run_scenario`] ties it together.
//!
//! Determinism: turmoil's RNG seed and epoch are pinned, the build uses
//! `--cfg tokio_unstable` (so tokio's own RNG is seeded by turmoil), maps
//! are BTreeMaps, and all time is simulated. The same seed gives the same
//! trace, byte for byte (`tests/it/determinism.rs`).

#[cfg(not(tokio_unstable))]
compile_error!(
    "im-sim needs `--cfg tokio_unstable` (set in .cargo/config.toml) for deterministic runs; \
     a RUSTFLAGS environment variable replaces that setting"
);

pub mod bench;
pub mod coverage;
pub mod crash;
pub mod generate;
pub mod history;
pub mod invariants;
pub mod redis_model;
pub mod redis_scripts;
pub mod report;
pub mod scenario;
pub mod sweep;
pub mod trace;
pub mod wire;
pub mod world;

use std::collections::BTreeSet;

use im_server::{Bug, Profile};

pub use invariants::{Invariant, Verdict};
pub use scenario::{Scenario, ScenarioError};
pub use world::{RunResult, SimError};

/// How to play a scenario.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Replaces the scenario's seed.
    pub seed: Option<u64>,
    /// Replaces the scenario's server profile ("does this story break P?").
    pub profile: Option<Profile>,
    /// Replaces every user's client profile.
    pub client: Option<im_client::ClientProfile>,
    /// Historical bugs switched back on in every node.
    pub bugs: BTreeSet<Bug>,
}

/// One played scenario, judged.
#[derive(Debug)]
pub struct Outcome {
    pub scenario: Scenario,
    pub seed: u64,
    pub profile: Profile,
    pub run: RunResult,
    pub verdicts: Vec<Verdict>,
    /// What the scenario must show under `profile`: its declared violations
    /// under its own profile; under another profile, or with a bug switched
    /// back on, none (so any violation shows the change was caught).
    pub expected: BTreeSet<Invariant>,
    /// Server and client logs with simulated timestamps.
    pub trace: String,
    /// Historical bugs that were switched back on.
    pub bugs: BTreeSet<Bug>,
    /// The dangerous states the run reached ("sometimes" assertions).
    pub reached: coverage::Reached,
    /// The scenario's `[expect]` beyond the invariants (close codes,
    /// promptness) that the run missed.
    pub missed: Vec<String>,
}

impl Outcome {
    pub fn violated(&self) -> BTreeSet<Invariant> {
        self.verdicts
            .iter()
            .filter(|v| !v.holds())
            .map(|v| v.invariant)
            .collect()
    }

    /// What happened equals what the scenario declares: exactly the
    /// expected violations, and every other expectation met.
    pub fn passed(&self) -> bool {
        self.violated() == self.expected && self.missed.is_empty()
    }

    pub fn report(&self) -> String {
        report::render(self)
    }

    /// Everything observable about the run, for the determinism gate.
    pub fn full_trace(&self) -> String {
        let mut s = String::new();
        for r in &self.run.history.records {
            s.push_str(&format!("{} {:?}\n", history::fmt_time(r.at), r.event));
        }
        for w in &self.run.wire {
            s.push_str(&format!("{} {w:?}\n", history::fmt_time(w.at)));
        }
        s.push_str(&self.trace);
        s
    }
}

/// Plays and judges one scenario.
pub fn run_scenario(scenario: &Scenario, options: RunOptions) -> Result<Outcome, SimError> {
    let seed = options.seed.unwrap_or(scenario.seed);
    let profile = options.profile.unwrap_or(scenario.server);
    let mut scenario = scenario.clone();
    let client_changed = options
        .client
        .is_some_and(|c| scenario.clients.values().any(|p| *p != c));
    if let Some(client) = options.client {
        for p in scenario.clients.values_mut() {
            *p = client;
        }
    }
    let scenario = &scenario;
    let (run, trace) = trace::capture(|| world::run(scenario, seed, profile, &options.bugs));
    let run = run?;
    let verdicts = invariants::check(&run);
    let missed = invariants::expectations(&scenario.expect, &run);
    let expected = if profile == scenario.server && options.bugs.is_empty() && !client_changed {
        scenario.expect.violated.iter().copied().collect()
    } else {
        BTreeSet::new()
    };
    Ok(Outcome {
        scenario: scenario.clone(),
        seed,
        profile,
        reached: coverage::reached(&run),
        missed,
        verdicts,
        expected,
        trace,
        bugs: options.bugs,
        run,
    })
}
