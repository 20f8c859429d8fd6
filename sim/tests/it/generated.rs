use im_server::Profile;
use im_sim::Scenario;
use im_sim::generate::{compile, fuzz, plans, to_toml};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_generated_scenario_written_as_a_file_reads_back_the_same(plan in plans(12)) {
        let scenario = compile("roundtrip", Profile::Hardened, &plan);
        let text = to_toml(&scenario, "generated");
        let back = Scenario::parse("roundtrip", &text).map_err(|(span, e)| {
            TestCaseError::fail(format!("{e} at {span:?} in:\n{text}"))
        })?;
        prop_assert_eq!(back, scenario);
    }
}

#[test]
fn fuzzing_phase1_finds_a_violation_within_ten_cases_and_its_export_replays_it() {
    let found = fuzz(Profile::Phase1, 10, 1, 6, 16)
        .unwrap()
        .expect("phase 1 leaves departed users in online_users; generated runs must find it");
    assert!(!found.violated.is_empty());
    // The exported file replays the failure exactly.
    let text = to_toml(&found.scenario, "found");
    let replayed = Scenario::parse("found", &text).unwrap();
    let outcome = im_sim::run_scenario(&replayed, Default::default()).unwrap();
    assert_eq!(
        outcome.violated().into_iter().collect::<Vec<_>>(),
        found.violated
    );
}

/// The whole invariant set holds for `hardened` on generated runs, and
/// those runs visit every named dangerous state at least once: fuzzing
/// that never reaches the race would prove nothing. (`im-sim sweep`
/// covers many more seeds; this is the default test run's share.)
#[test]
fn generated_runs_hold_every_invariant_on_hardened_and_reach_every_dangerous_state() {
    use im_sim::sweep::{Tally, run_seed};
    // At least 40 runs, and on until every state was reached (at most
    // 150): the states' rates differ, and a fixed count would make the
    // rarest a coin toss.
    let mut tally = Tally::default();
    for seed in 0..150 {
        let outcome = run_seed(Profile::Hardened, seed, 12, &Default::default()).unwrap();
        assert!(
            outcome.passed(),
            "seed {seed}: replay with `im-sim sweep --profile hardened --seeds {seed}..={seed}`\n{}",
            outcome.report()
        );
        tally.add(&outcome);
        if seed >= 39 && tally.never().is_empty() {
            break;
        }
    }
    assert!(
        tally.never().is_empty(),
        "generated runs never reached some dangerous states:\n{}",
        tally.table()
    );
}

/// The same generator, pointed at each of the seed's phases, finds its
/// failures within a few cases.
#[test]
fn generated_runs_find_a_failure_in_each_seed_phase_within_five_cases() {
    use im_sim::sweep::run_seed;
    for profile in [Profile::Phase1, Profile::Phase2, Profile::Phase3] {
        let found = (0..5).find_map(|seed| {
            let outcome = run_seed(profile, seed, 12, &Default::default()).unwrap();
            (!outcome.violated().is_empty()).then_some(outcome.violated())
        });
        assert!(found.is_some(), "{profile}: no failure in 5 generated runs");
    }
}

/// Checking the checkers: calm runs (users who stay connected and talk, no
/// fault) cannot break any profile's promise, so every checker must hold
/// on them, under every profile. (`im-sim sweep --calm` runs more.)
#[test]
fn calm_runs_are_never_flagged_under_any_profile() {
    use im_sim::sweep::run_calm_seed;
    for profile in Profile::ALL {
        for seed in 0..6 {
            let outcome = run_calm_seed(profile, seed, 12, &Default::default()).unwrap();
            assert!(
                outcome.passed(),
                "{profile} seed {seed}: a false alarm? replay with `im-sim sweep --calm --profile {profile} --seeds {seed}..={seed}`\n{}",
                outcome.report()
            );
        }
    }
}
