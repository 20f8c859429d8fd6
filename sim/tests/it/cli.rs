//! `im-sim`'s other commands, as a user runs them.

use std::process::Command;

use im_server::Bug;

fn im_sim(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_im-sim"))
        .args(args)
        .output()
        .expect("run im-sim");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn bugs_lists_every_switch_with_what_guards_it() {
    let dir = crate::scenarios_dir();
    let (ok, out) = im_sim(&["bugs", "--scenarios", dir.to_str().unwrap()]);
    assert!(ok, "{out}");
    for bug in Bug::ALL {
        assert!(
            out.contains(&format!("{}\n", bug.name())),
            "{bug} missing:\n{out}"
        );
        assert!(out.contains(bug.summary()), "{bug}'s summary missing");
    }
    assert!(!out.contains("NOTHING"), "an unguarded bug:\n{out}");
    assert!(out.contains("guarded by: live test server/tests/it: signals::"));
}

#[test]
fn a_client_override_expects_every_invariant_to_hold() {
    let file = crate::scenarios_dir().join("phase2_ping_probe_kills_legacy_clients.toml");
    let file = file.to_str().unwrap();
    // The story's own legacy clients: it shows phase 2's bug, as declared.
    let (ok, out) = im_sim(&["run", file]);
    assert!(ok, "{out}");
    assert!(
        out.contains("expected: no_false_success,presence,liveness"),
        "{out}"
    );
    // Compliant clients (they answer the probe's Ping): nothing breaks, and
    // with the clients replaced nothing is expected to.
    let (ok, out) = im_sim(&["run", file, "--client", "compliant"]);
    assert!(ok, "{out}");
    assert!(out.contains("violated: none  expected: none"), "{out}");
}
