use std::process::Command;

#[test]
fn run_writes_junit_with_a_failure_per_broken_story_and_a_timeline_per_run() {
    let dir = std::env::temp_dir().join(format!("imsim-reports-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let junit = dir.join("report.xml");
    let timelines = dir.join("timelines");
    let out = Command::new(env!("CARGO_BIN_EXE_im-sim"))
        .args(["run", "--profile", "phase3"])
        .arg(crate::scenarios_dir().join("phase1_reconnect_late_cleanup.toml"))
        .arg(crate::scenarios_dir().join("phase3_seed_checklist.toml"))
        .arg("--junit")
        .arg(&junit)
        .arg("--timeline")
        .arg(&timelines)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains(r#"tests="2""#) && xml.contains(r#"failures="1""#),
        "{xml}"
    );
    assert!(
        xml.contains("phase1_reconnect_late_cleanup (seed 1, phase3)"),
        "{xml}"
    );
    assert!(xml.contains("violated: [liveness]"), "{xml}");
    assert!(xml.contains("replay: im-sim run"), "{xml}");
    for name in ["phase1_reconnect_late_cleanup", "phase3_seed_checklist"] {
        let md = std::fs::read_to_string(timelines.join(format!("{name}.md"))).unwrap();
        assert!(md.contains("```mermaid\nsequenceDiagram"), "{md}");
        assert!(md.contains("participant N1 as node1"), "{md}");
    }
    let broken =
        std::fs::read_to_string(timelines.join("phase1_reconnect_late_cleanup.md")).unwrap();
    assert!(broken.contains("violated liveness"), "{broken}");
}
