//! The test cargo-mutants runs against each mutant of the server
//! (`.cargo/mutants.toml`, MUTANTS.md): every scenario as it declares,
//! every guard, and a short hardened sweep. Verdicts only, no snapshots: a
//! mutant that merely shifts a report's timings does not count as caught.
//! The default test run covers the same ground (scenarios, bugs and
//! generated runs in `tests/it`), so this one runs only when asked for; it
//! is a test target of its own so that each mutant rebuilds little, and
//! it spreads its runs over the machine's cores, stopping at the first
//! failure.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use im_server::Profile;
use im_sim::{RunOptions, Scenario, run_scenario};

/// One check: a scenario as declared, a scenario with one of its guarded
/// bugs (it must fail), or a generated run.
enum Check {
    Declared(PathBuf),
    Guard(PathBuf, im_server::Bug),
    Seed(u64),
}

fn run(check: &Check) -> Result<(), String> {
    match check {
        Check::Declared(file) => {
            let s = Scenario::load(file).map_err(|e| e.to_string())?;
            let outcome = run_scenario(&s, RunOptions::default()).map_err(|e| e.to_string())?;
            if outcome.passed() {
                Ok(())
            } else {
                Err(format!("{}:\n{}", s.name, outcome.report()))
            }
        }
        Check::Guard(file, bug) => {
            let s = Scenario::load(file).map_err(|e| e.to_string())?;
            let broken = run_scenario(
                &s,
                RunOptions {
                    bugs: BTreeSet::from([*bug]),
                    ..Default::default()
                },
            )
            .map_err(|e| e.to_string())?;
            if broken.passed() {
                Err(format!("{} no longer catches {bug}", s.name))
            } else {
                Ok(())
            }
        }
        Check::Seed(seed) => {
            let outcome = im_sim::sweep::run_seed(Profile::Hardened, *seed, 12, &BTreeSet::new())
                .map_err(|e| e.to_string())?;
            if outcome.passed() {
                Ok(())
            } else {
                Err(format!("seed {seed}:\n{}", outcome.report()))
            }
        }
    }
}

#[test]
#[ignore = "the cargo-mutants gate: cargo test -p im-sim --test mutation_gate -- --ignored"]
fn mutation_gate_every_scenario_every_guard_and_a_short_sweep_hold() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scenario files in {}", dir.display());
    let mut checks = Vec::new();
    for file in &files {
        let s = Scenario::load(file).unwrap();
        checks.push(Check::Declared(file.clone()));
        checks.extend(s.guards.iter().map(|&bug| Check::Guard(file.clone(), bug)));
    }
    checks.extend((0..24).map(Check::Seed));
    let next = Mutex::new(checks.iter());
    let failed = AtomicBool::new(false);
    let failures = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let Some(check) = next.lock().unwrap().next() else {
                        return;
                    };
                    if let Err(why) = run(check) {
                        failed.store(true, Ordering::Relaxed);
                        failures.lock().unwrap().push(why);
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
