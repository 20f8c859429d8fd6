use im_sim::{RunOptions, Scenario, run_scenario};

#[test]
fn every_scenario_shows_what_it_declares_and_matches_its_snapshot() {
    insta::glob!("../../../scenarios", "*.toml", |path| {
        let scenario = Scenario::load(path).unwrap();
        let outcome = run_scenario(&scenario, RunOptions::default()).unwrap();
        assert!(outcome.passed(), "{}", outcome.report());
        insta::assert_snapshot!(outcome.report());
    });
}

#[test]
fn the_late_cleanup_story_breaks_the_seeds_phase3_fix() {
    // Phase 3 kicks the user's *new* connection when the old one's cleanup
    // finally runs: 1001 ends up offline though it did nothing wrong.
    let path = crate::scenarios_dir().join("phase1_reconnect_late_cleanup.toml");
    let scenario = Scenario::load(&path).unwrap();
    let options = RunOptions {
        profile: Some(im_server::Profile::Phase3),
        ..Default::default()
    };
    let outcome = run_scenario(&scenario, options).unwrap();
    assert!(!outcome.passed());
    assert_eq!(
        outcome.violated().into_iter().collect::<Vec<_>>(),
        [im_sim::Invariant::Liveness],
        "{}",
        outcome.report()
    );
}

#[test]
fn phase3_survives_the_seeds_own_tests_with_any_seed() {
    let path = crate::scenarios_dir().join("phase3_seed_checklist.toml");
    let scenario = Scenario::load(&path).unwrap();
    for seed in 1..=5 {
        let outcome = run_scenario(
            &scenario,
            RunOptions {
                seed: Some(seed),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(outcome.passed(), "seed {seed}:\n{}", outcome.report());
    }
}

#[test]
fn the_late_cleanup_and_vanish_stories_break_phase3_but_not_hardened() {
    for name in [
        "hardened_late_cleanup_of_old_connection",
        "hardened_vanish_and_reconnect_at_several_points",
    ] {
        let scenario =
            Scenario::load(&crate::scenarios_dir().join(format!("{name}.toml"))).unwrap();
        let hardened = run_scenario(&scenario, RunOptions::default()).unwrap();
        assert!(
            hardened.violated().is_empty(),
            "{name} under hardened:\n{}",
            hardened.report()
        );
        let phase3 = run_scenario(
            &scenario,
            RunOptions {
                profile: Some(im_server::Profile::Phase3),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(
            phase3.violated().contains(&im_sim::Invariant::Liveness),
            "{name} should break the seed's fix:\n{}",
            phase3.report()
        );
    }
}
