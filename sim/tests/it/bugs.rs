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

/// How far back the default test run checks that no earlier seed finds a
/// bug; the whole table is checked by `im-sim bugs --first-seeds 0..500
/// --check sim/first-seeds.toml` (a long run, documented in the README).
const EARLIER_SEEDS_CHECKED: u64 = 2;

// Two halves of `Bug::ALL`, so the test harness's threads share the runs.
#[test]
fn the_first_seed_table_holds_for_the_first_half_of_the_bugs() {
    first_seed_table_holds(|i| i % 2 == 0);
}

#[test]
fn the_first_seed_table_holds_for_the_second_half_of_the_bugs() {
    first_seed_table_holds(|i| i % 2 == 1);
}

/// The table covers every bug (found, not found in the searched range, or
/// beyond the simulation with a live test); each recorded seed finds its
/// bug and passes without it; the seeds before it (up to
/// [`EARLIER_SEEDS_CHECKED`]) do not find it.
fn first_seed_table_holds(mine: impl Fn(usize) -> bool) {
    use im_sim::sweep::{
        FIRST_SEEDS_FILE, FIRST_SEEDS_OPS_MAX, FIRST_SEEDS_PROFILE, beyond_simulation,
        first_finding, parse_first_seeds, run_seed,
    };
    let path = crate::scenarios_dir().join("..").join(FIRST_SEEDS_FILE);
    let table = parse_first_seeds(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut not_found = Vec::new();
    for (_, bug) in Bug::ALL.into_iter().enumerate().filter(|(i, _)| mine(*i)) {
        let seed = match (beyond_simulation(bug), table.get(&bug)) {
            (Some(why), Some(_)) => panic!("{bug} is in the table, yet {why}"),
            (Some(why), None) => {
                assert!(
                    bug.live_guard().is_some(),
                    "{bug} is beyond the simulation ({why}) and has no live test"
                );
                continue;
            }
            (None, None) => panic!(
                "{bug} is not in {FIRST_SEEDS_FILE}; search for it with \
                 `im-sim bugs --first-seeds 0..500`"
            ),
            (None, Some(None)) => {
                // Searched and not found (the table's [not_found], checked
                // by the documented long command): the seeds this run
                // affords must not find it either, or the table is stale.
                let (found, _) = first_finding(bug, 0..EARLIER_SEEDS_CHECKED).unwrap();
                assert_eq!(
                    found, None,
                    "{bug}: seed {found:?} finds it; move it to [found] in {FIRST_SEEDS_FILE}"
                );
                not_found.push(bug.name());
                continue;
            }
            (None, Some(Some(seed))) => *seed,
        };
        assert!(
            seed < 500,
            "{bug}: first found at seed {seed}, not within 500"
        );
        let with_bug = run_seed(
            FIRST_SEEDS_PROFILE,
            seed,
            FIRST_SEEDS_OPS_MAX,
            &BTreeSet::from([bug]),
        )
        .unwrap();
        assert!(
            !with_bug.passed(),
            "{bug}: seed {seed} no longer finds it:\n{}",
            with_bug.report()
        );
        let without = run_seed(
            FIRST_SEEDS_PROFILE,
            seed,
            FIRST_SEEDS_OPS_MAX,
            &BTreeSet::new(),
        )
        .unwrap();
        assert!(
            without.passed(),
            "{bug}: seed {seed} fails without the bug, so it proves nothing:\n{}",
            without.report()
        );
        let earlier = 0..seed.min(EARLIER_SEEDS_CHECKED);
        let (found, _) = first_finding(bug, earlier.clone()).unwrap();
        assert_eq!(
            found, None,
            "{bug}: seed {found:?} finds it before the recorded {seed}: update {FIRST_SEEDS_FILE}"
        );
    }
    if !not_found.is_empty() {
        eprintln!(
            "not found by generated runs within the searched seeds: {}",
            not_found.join(", ")
        );
    }
}
