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

/// Takes `n` ids from tokio's process-wide task id counter.
fn use_up_task_ids(n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        for _ in 0..n {
            tokio::spawn(async {}).await.unwrap();
        }
    });
}

#[test]
fn crashes_replay_the_same_whatever_task_ids_the_process_has_used() {
    // tokio drops a crashed host's tasks in an order that depends on their
    // (process-wide) ids; the crash must not let that order reach the
    // trace. Every shift of the id counter modulo tokio's 4 task-list
    // shards, for every scenario that crashes a host.
    for name in [
        "hardened_node_crash.toml",
        "phase3_node_crash_and_restart.toml",
        "hardened_device_powers_off_while_offline.toml",
        "hardened_redis_restart_loses_data.toml",
    ] {
        let scenario = Scenario::load(&crate::scenarios_dir().join(name)).unwrap();
        let reference = run_scenario(&scenario, RunOptions::default())
            .unwrap()
            .full_trace();
        for shift in 1..=3 {
            use_up_task_ids(shift);
            let again = run_scenario(&scenario, RunOptions::default())
                .unwrap()
                .full_trace();
            if let Some(d) = first_divergence(&reference, &again) {
                panic!("{name} depends on task ids (shift {shift}); first divergence at {d}");
            }
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
