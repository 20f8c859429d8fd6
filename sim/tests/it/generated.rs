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
