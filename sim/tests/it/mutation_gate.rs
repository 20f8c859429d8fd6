//! The test cargo-mutants runs against each mutant of the server
//! (`.cargo/mutants.toml`, MUTANTS.md): every scenario as it declares,
//! every guard, and a short hardened sweep. Verdicts only, no snapshots: a
//! mutant that merely shifts a report's timings does not count as caught.
//! The default test run covers the same ground (scenarios.rs, bugs.rs,
//! generated.rs), so this one runs only when asked for.

use std::collections::BTreeSet;

use im_server::Profile;
use im_sim::{RunOptions, Scenario, run_scenario};

#[test]
#[ignore = "the cargo-mutants gate: cargo test -p im-sim --test it -- --ignored mutation_gate"]
fn mutation_gate_every_scenario_every_guard_and_a_short_sweep_hold() {
    for file in crate::scenario_files() {
        let s = Scenario::load(&file).unwrap();
        let outcome = run_scenario(&s, RunOptions::default()).unwrap();
        assert!(outcome.passed(), "{}:\n{}", s.name, outcome.report());
        for &bug in &s.guards {
            let broken = run_scenario(
                &s,
                RunOptions {
                    bugs: BTreeSet::from([bug]),
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(!broken.passed(), "{} no longer catches {bug}", s.name);
        }
    }
    for seed in 0..24 {
        let outcome =
            im_sim::sweep::run_seed(Profile::Hardened, seed, 12, &BTreeSet::new()).unwrap();
        assert!(outcome.passed(), "seed {seed}:\n{}", outcome.report());
    }
}
