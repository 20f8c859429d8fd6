use std::process::Command;

use im_sim::Scenario;

fn error_of(text: &str) -> String {
    let dir = std::env::temp_dir().join(format!("imsim-malformed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("case{}.toml", text.len()));
    std::fs::write(&path, text).unwrap();
    let err = Scenario::load(&path).expect_err("malformed input must not load");
    let shown = err.to_string();
    assert!(shown.starts_with(&path.display().to_string()), "{shown}");
    shown
}

const HEAD: &str = "server = \"phase3\"\n[expect]\nviolated = []\n";

#[test]
fn unknown_step_is_reported_with_its_line() {
    let e = error_of(&format!("{HEAD}[[step]]\ndo = \"explode\"\nuser = 1\n"));
    assert!(
        e.contains(":5:6:") && e.contains("unknown variant `explode`"),
        "{e}"
    );
}

#[test]
fn bad_duration_is_reported_with_its_line() {
    let e = error_of(&format!("{HEAD}[[step]]\ndo = \"wait\"\nfor = \"5 sex\"\n"));
    assert!(e.contains("bad duration \"5 sex\""), "{e}");
    assert!(e.contains(":4:") || e.contains(":6:"), "{e}");
}

#[test]
fn user_never_connected_is_reported_with_its_line() {
    let e = error_of(&format!(
        "{HEAD}[[step]]\ndo = \"send\"\nfrom = 1001\nto = 1002\n"
    ));
    assert!(
        e.contains(":4:") && e.contains("user 1001 (device \"phone\") never connected"),
        "{e}"
    );
}

#[test]
fn unknown_profile_is_reported_with_its_line() {
    let e = error_of("seed = 3\nserver = \"phase9\"\n[expect]\nviolated = []\n");
    assert!(
        e.contains(":2:") && e.contains("unknown server profile \"phase9\""),
        "{e}"
    );
    let e = error_of("server = \"phase1\"\nclient = \"modern\"\n[expect]\nviolated = []\n");
    assert!(
        e.contains(":2:") && e.contains("unknown client profile"),
        "{e}"
    );
}

#[test]
fn unknown_invariant_is_reported() {
    let e = error_of("server = \"phase1\"\n[expect]\nviolated = [\"happiness\"]\n");
    assert!(
        e.contains(":3:") && e.contains("unknown variant `happiness`"),
        "{e}"
    );
}

#[test]
fn runner_exits_2_and_runs_nothing_when_any_file_is_malformed() {
    let dir = std::env::temp_dir().join(format!("imsim-runner-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        crate::scenarios_dir().join("phase3_seed_checklist.toml"),
        dir.join("a_good.toml"),
    )
    .unwrap();
    std::fs::write(
        dir.join("b_bad.toml"),
        format!("{HEAD}[[step]]\ndo = \"explode\"\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_im-sim"))
        .arg("run")
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stderr.contains("b_bad.toml:5:"), "{stderr}");
    assert!(!stdout.contains("PASS"), "a scenario ran: {stdout}");
}

#[test]
fn runner_prints_the_seed_first_and_a_closing_count() {
    let out = Command::new(env!("CARGO_BIN_EXE_im-sim"))
        .args(["run", "--seed", "7"])
        .arg(crate::scenarios_dir().join("phase3_seed_checklist.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().next(), Some("seed: 7"));
    assert_eq!(stdout.lines().last(), Some("1 passed, 0 failed"));
    assert!(out.status.success());
}

#[test]
fn runner_exits_nonzero_when_a_story_breaks_the_overridden_profile() {
    let out = Command::new(env!("CARGO_BIN_EXE_im-sim"))
        .args(["run", "--profile", "phase3"])
        .arg(crate::scenarios_dir().join("phase1_reconnect_late_cleanup.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("replay: im-sim run"), "{stdout}");
    assert_eq!(stdout.lines().last(), Some("0 passed, 1 failed"));
}
