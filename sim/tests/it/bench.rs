use std::process::Command;
use std::time::Duration;

use im_sim::Scenario;
use im_sim::bench::{reconnect_scenario, soak_scenario};
use im_sim::generate::to_toml;

/// `im-sim bench --smoke --no-live` works: its figures are positive and
/// its last line is the JSON object with every key CI reads. No timing is
/// asserted (debug builds, busy machines); nor is the soak's verdict (the
/// bench exits 1 when the soak violates an invariant: that is the server's
/// failure, reported by the bench, not the bench's).
#[test]
fn bench_smoke_prints_positive_figures_and_json_last() {
    let out = Command::new(env!("CARGO_BIN_EXE_im-sim"))
        .args(["bench", "--smoke", "--no-live"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{:?}\n{stdout}\n{stderr}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or_default();
    let json: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: last line {last:?}"));
    for key in [
        "sim_speedup",
        "sim_msgs_per_s",
        "simulated_s",
        "wall_s",
        "delivered",
        "sim_ms",
    ] {
        let v = json[key].as_f64();
        assert!(
            v.is_some_and(|v| v > 0.0),
            "{key} = {:?} in {last}",
            json[key]
        );
    }
    for key in ["sim_vs_live_speedup", "live_ms"] {
        assert!(
            json.get(key).is_some_and(|v| v.is_null()),
            "{key} in {last}"
        );
    }
    let violations = json["soak_violations"].as_array().expect("soak_violations");
    assert_eq!(
        out.status.success(),
        violations.is_empty(),
        "exit status follows the soak's verdict: {stdout}"
    );
    assert_eq!(json["sim_story_ok"], true, "{stdout}");
    assert_eq!(json["smoke"], true);
    assert_eq!(json["users"], 10);
    assert_eq!(json["live_skipped"], true);
    assert!(stdout.contains("sim_speedup"), "{stdout}");
}

/// The bench's scenarios are ordinary stories: they survive the trip
/// through the file format (so every step is valid where it stands), and
/// the soak follows from its seed alone.
#[test]
fn bench_scenarios_are_valid_stories() {
    let tick = Duration::from_millis(1);
    for s in [soak_scenario(12, 2, 7, tick), reconnect_scenario(1)] {
        let text = to_toml(&s, "bench");
        let back = Scenario::parse(&s.name, &text).unwrap_or_else(|(_, e)| panic!("{e}\n{text}"));
        assert_eq!(back, s, "{text}");
    }
    assert_eq!(soak_scenario(12, 2, 7, tick), soak_scenario(12, 2, 7, tick));
    assert_ne!(
        soak_scenario(12, 2, 7, tick).steps,
        soak_scenario(12, 2, 8, tick).steps
    );
}
