use im_sim::{RunOptions, Scenario, run_scenario};

/// The first line where two traces differ, with both versions.
fn first_divergence(a: &str, b: &str) -> Option<String> {
    let (mut la, mut lb) = (a.lines(), b.lines());
    for n in 1.. {
        match (la.next(), lb.next()) {
            (None, None) => return None,
            (x, y) if x == y => continue,
            (x, y) => {
                return Some(format!(
                    "line {n}:\n  first run:  {x:?}\n  second run: {y:?}"
                ));
            }
        }
    }
    unreachable!()
}

#[test]
fn same_seed_gives_the_same_trace_for_every_scenario() {
    for path in crate::scenario_files() {
        let scenario = Scenario::load(&path).unwrap();
        let first = run_scenario(&scenario, RunOptions::default())
            .unwrap()
            .full_trace();
        let second = run_scenario(&scenario, RunOptions::default())
            .unwrap()
            .full_trace();
        assert!(
            first.lines().count() > 10,
            "{}: the trace is suspiciously short",
            path.display()
        );
        if let Some(d) = first_divergence(&first, &second) {
            panic!(
                "{} is not deterministic; first divergence at {d}",
                path.display()
            );
        }
    }
}

#[test]
fn a_different_seed_gives_a_different_trace() {
    // Proves the seed reaches the network (latencies), so the gate above
    // compares something that could differ.
    let path = crate::scenarios_dir().join("phase3_seed_checklist.toml");
    let scenario = Scenario::load(&path).unwrap();
    let one = run_scenario(
        &scenario,
        RunOptions {
            seed: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    let two = run_scenario(
        &scenario,
        RunOptions {
            seed: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    assert_ne!(one.full_trace(), two.full_trace());
}

#[test]
fn divergence_report_names_the_first_differing_line() {
    let d = first_divergence("a\nb\nc\n", "a\nx\nc\n").unwrap();
    assert!(d.starts_with("line 2:"), "{d}");
    assert!(first_divergence("a\n", "a\n").is_none());
}
