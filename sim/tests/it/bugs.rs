//! Bug switches: every regression scenario names the historical bugs it
//! guards; switched back on, each must make its scenario fail.

use std::collections::BTreeSet;

use im_server::Bug;
use im_sim::{RunOptions, Scenario, run_scenario};

fn guarding_scenarios() -> Vec<Scenario> {
    crate::scenario_files()
        .iter()
        .map(|f| Scenario::load(f).unwrap())
        .filter(|s| !s.guards.is_empty())
        .collect()
}

#[test]
fn every_guard_makes_its_scenario_fail_when_its_bug_is_switched_back_on() {
    let scenarios = guarding_scenarios();
    assert!(!scenarios.is_empty(), "no scenario declares guards");
    for s in &scenarios {
        assert!(
            s.expect.violated.is_empty(),
            "{}: a guard must hold every invariant with the bug off",
            s.name
        );
        let fixed = run_scenario(s, RunOptions::default()).unwrap();
        assert!(
            fixed.passed(),
            "{} fails as it is:\n{}",
            s.name,
            fixed.report()
        );
        for &bug in &s.guards {
            let broken = run_scenario(
                s,
                RunOptions {
                    bugs: BTreeSet::from([bug]),
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(
                !broken.passed(),
                "{} names {bug} as a guard but holds with it switched back on:\n{}",
                s.name,
                broken.report()
            );
        }
    }
}

#[test]
fn every_historical_bug_is_guarded_by_some_scenario_or_live_test() {
    let guarded: BTreeSet<Bug> = guarding_scenarios()
        .iter()
        .flat_map(|s| s.guards.iter().copied())
        .collect();
    let unguarded: Vec<&str> = Bug::ALL
        .into_iter()
        .filter(|b| !guarded.contains(b) && b.live_guard().is_none())
        .map(Bug::name)
        .collect();
    assert!(
        unguarded.is_empty(),
        "neither a scenario nor a live test guards: {}",
        unguarded.join(", ")
    );
    // A live guard is a test in server/tests/it/ that switches its bug on
    // and requires the failure; the name must lead to one.
    let live = std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/tests/it"),
    )
    .unwrap()
    .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
    .collect::<Vec<_>>()
    .join("\n");
    for bug in Bug::ALL {
        if let Some(test) = bug.live_guard() {
            let function = test.rsplit("::").next().unwrap();
            assert!(
                live.contains(&format!("fn {function}()"))
                    && live.contains(&format!("Bug::{bug:?}")),
                "{bug} names the live guard {test}, which does not exist or does not switch {bug:?} on"
            );
        }
    }
}

#[test]
fn an_unknown_guard_is_refused_with_its_position() {
    let text = "server = \"hardened\"\nguards = [\"no_such_bug\"]\nstep = [{ do = \"connect\", user = 1 }]\n[expect]\nviolated = []\n";
    let (span, message) = Scenario::parse("bad", text).unwrap_err();
    assert!(message.contains("unknown bug \"no_such_bug\""), "{message}");
    assert_eq!(&text[span], "\"no_such_bug\"");
}
