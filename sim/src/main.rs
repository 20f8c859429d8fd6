//! `im-sim`: plays scenario files in the simulation and judges them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use im_server::{Bug, Profile};
use im_sim::{RunOptions, Scenario, run_scenario};

/// imsim's deterministic simulation harness.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs scenario files (or every *.toml under given directories).
    Run {
        /// Files or directories; default: scenarios/.
        paths: Vec<PathBuf>,
        /// Replaces every scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Replaces the server profile; the story must then hold every
        /// invariant (the same profile as the file's keeps its [expect]).
        #[arg(long)]
        profile: Option<Profile>,
        /// Replaces every user's client: compliant, or legacy (the seed's
        /// client, which reads every frame as a business message); the
        /// story must then hold every invariant.
        #[arg(long)]
        client: Option<im_client::ClientProfile>,
        /// Prints each run's server and client logs (simulated time).
        #[arg(long)]
        trace: bool,
        /// Prints each run's full report, not only for failures.
        #[arg(long)]
        report: bool,
        /// Writes a JUnit XML report (one testcase per scenario) to FILE.
        #[arg(long)]
        junit: Option<PathBuf>,
        /// Writes a Mermaid sequence diagram of each run to DIR/<name>.md.
        #[arg(long)]
        timeline: Option<PathBuf>,
        /// Switches a historical bug back on in every node (repeatable); the
        /// story must then hold every invariant, so a guard fails.
        #[arg(long = "bug", value_name = "BUG")]
        bugs: Vec<Bug>,
    },
    /// Generates runs (proptest), shrinks the first failure to a minimal
    /// schedule and writes it as a scenario file that `run` replays.
    Fuzz {
        /// Server profile to attack.
        #[arg(long, default_value = "hardened")]
        profile: Profile,
        /// Generated runs to try.
        #[arg(long, default_value_t = 100)]
        cases: u32,
        /// Seed of the generator (the whole search follows from it).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where to write a minimized failure.
        #[arg(long, default_value = "scenarios/found")]
        out: PathBuf,
        /// Most ops per generated run.
        #[arg(long, default_value_t = 12)]
        ops_max: usize,
    },
    /// Plays one generated run per seed, reports failures with their
    /// replay command and how often each dangerous state was reached.
    Sweep(SweepArgs),
    /// Lists every historical bug switch (`--bug NAME`), what it does, and
    /// what guards it: the scenario files that name it, or its live test.
    Bugs {
        /// Where the scenario files are.
        #[arg(long, default_value = "scenarios")]
        scenarios: PathBuf,
        /// Instead, sweeps each bug's generated runs (hardened, --ops-max
        /// 12) over these seeds and prints the first that finds it, as
        /// the table `sim/first-seeds.toml` (0..500 takes about 16 minutes
        /// in a release build: every bug is found within 122 seeds).
        #[arg(long, value_name = "SEEDS", value_parser = im_sim::sweep::parse_seeds)]
        first_seeds: Option<std::ops::Range<u64>>,
        /// With --first-seeds: compares with this table and fails (exit 1)
        /// on any difference.
        #[arg(long, value_name = "FILE", requires = "first_seeds")]
        check: Option<PathBuf>,
    },
    /// Measures the simulation (use a release build): simulated time and
    /// messages per wall second on a heartbeat soak, and a reconnect story
    /// played live and simulated. The last line of output is one JSON
    /// object; exit 1 if the soak violated an invariant or a part failed.
    Bench {
        /// Users in the soak [default: 100; smoke: 10].
        #[arg(long)]
        users: Option<usize>,
        /// Simulated minutes of the soak [default: 10; smoke: 1].
        #[arg(long)]
        minutes: Option<u64>,
        /// Seed of the soak's schedule and of the simulated runs.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The soak's simulation step (timeouts.tick), e.g. 1ms, 10ms; the
        /// reconnect story always uses 1ms.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1ms")]
        tick: std::time::Duration,
        /// Writes the soak as a scenario file (replay: im-sim run FILE).
        #[arg(long, value_name = "FILE")]
        save_soak: Option<PathBuf>,
        /// Repetitions of the reconnect story (median) [default: 5; smoke: 1].
        #[arg(long)]
        reps: Option<usize>,
        /// Tiny sizes: checks the bench works, not how fast.
        #[arg(long)]
        smoke: bool,
        /// Skips the live run (no Redis around).
        #[arg(long)]
        no_live: bool,
        /// Redis for the live run (a unique key prefix per run; its keys
        /// are deleted afterwards).
        #[arg(long, default_value = "redis://127.0.0.1:6379/")]
        redis: String,
    },
}

/// Exit code for input that could not be read as scenarios.
const EXIT_BAD_INPUT: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            paths,
            seed,
            profile,
            client,
            trace,
            report,
            junit,
            timeline,
            bugs,
        } => run(
            paths,
            RunFlags {
                seed,
                profile,
                client,
                trace,
                report,
                junit,
                timeline,
                bugs,
            },
        ),
        Command::Fuzz {
            profile,
            cases,
            seed,
            out,
            ops_max,
        } => fuzz(profile, cases, seed, &out, ops_max),
        Command::Sweep(args) => sweep(args),
        Command::Bugs {
            first_seeds: Some(seeds),
            check,
            ..
        } => first_seeds(seeds, check.as_deref()),
        Command::Bugs { scenarios, .. } => bugs(&scenarios),
        Command::Bench {
            users,
            minutes,
            seed,
            tick,
            reps,
            smoke,
            no_live,
            redis,
            save_soak,
        } => {
            let mut options = im_sim::bench::BenchOptions::new(smoke);
            options.users = users.unwrap_or(options.users);
            options.minutes = minutes.unwrap_or(options.minutes);
            options.reps = reps.unwrap_or(options.reps);
            options.seed = seed;
            options.tick = tick;
            options.redis = (!no_live).then_some(redis);
            options.save_soak = save_soak;
            bench(&options)
        }
    }
}

fn bench(options: &im_sim::bench::BenchOptions) -> ExitCode {
    eprintln!(
        "bench: soak of {} users x {} simulated min, then the reconnect story x{}{}...",
        options.users,
        options.minutes,
        options.reps,
        if options.redis.is_some() {
            " (simulated and live)"
        } else {
            " (simulated only)"
        }
    );
    let report = match im_sim::bench::run(options) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    print!("{}", report.summary());
    println!("{}", report.json());
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[derive(Debug, clap::Args)]
struct SweepArgs {
    /// Server profile to attack.
    #[arg(long, default_value = "hardened")]
    profile: Profile,
    /// Seeds: A..B (B excluded) or A..=B.
    #[arg(long, value_parser = im_sim::sweep::parse_seeds)]
    seeds: std::ops::Range<u64>,
    /// Only this shard of the seeds: I/N (1-based), for splitting a
    /// sweep across CI machines.
    #[arg(long, default_value = "1/1")]
    shard: im_sim::sweep::Shard,
    /// Most ops per generated run.
    #[arg(long, default_value_t = 12)]
    ops_max: usize,
    /// Writes each failing run as a scenario file into DIR.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Fails (exit 1) if a dangerous state was never reached.
    #[arg(long)]
    require_coverage: bool,
    /// Switches a historical bug back on in every node (repeatable):
    /// does the generator find it?
    #[arg(long = "bug", value_name = "BUG")]
    bugs: Vec<Bug>,
    /// Stops at the first failing seed (with --bug: how soon is it found?).
    #[arg(long)]
    first: bool,
    /// Calm runs only (users who stay connected and talk; no fault): any
    /// violation is a false alarm of a checker. Checks the checkers.
    #[arg(long)]
    calm: bool,
}

/// ` --bug NAME` for each bug, for replay commands.
fn bug_flags<'a>(bugs: impl IntoIterator<Item = &'a Bug>) -> String {
    bugs.into_iter().map(|b| format!(" --bug {b}")).collect()
}

fn sweep(args: SweepArgs) -> ExitCode {
    use im_sim::sweep::{Tally, run_seed, shard_seeds};
    let SweepArgs {
        profile,
        seeds,
        shard,
        ops_max,
        out,
        require_coverage,
        bugs,
        first,
        calm,
    } = args;
    let bugs: std::collections::BTreeSet<Bug> = bugs.into_iter().collect();
    let bug_flags = bug_flags(&bugs);
    let mine: Vec<u64> = shard_seeds(seeds.clone(), shard).collect();
    println!(
        "sweep: {profile}, seeds {}..{} shard {}/{}: {} runs",
        seeds.start,
        seeds.end,
        shard.index,
        shard.count,
        mine.len()
    );
    let bar = indicatif::ProgressBar::new(mine.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} seeds, {msg} ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let wall = std::time::Instant::now();
    let mut tally = Tally::default();
    let mut failures = 0u64;
    for seed in mine {
        bar.set_message(format!("{failures} failed"));
        let run = if calm {
            im_sim::sweep::run_calm_seed
        } else {
            run_seed
        };
        let outcome = match run(profile, seed, ops_max, &bugs) {
            Ok(o) => o,
            Err(e) => {
                failures += 1;
                bar.suspend(|| println!("FAIL seed {seed}: {e}"));
                bar.inc(1);
                continue;
            }
        };
        tally.add(&outcome);
        if !outcome.passed() {
            failures += 1;
            let names: Vec<&str> = outcome.violated().iter().map(|i| i.name()).collect();
            bar.suspend(|| {
                println!("FAIL seed {seed}: violated {}", names.join(", "));
                let calm = if calm { " --calm" } else { "" };
                println!(
                    "  replay: im-sim sweep --profile {profile} --seeds {seed}..={seed} --ops-max {ops_max}{calm}{bug_flags}"
                );
                if let Some(dir) = &out {
                    let file = dir.join(format!("{}.toml", outcome.scenario.name));
                    let comment = format!(
                        "Sweep seed {seed} against {profile}: violates {}.",
                        names.join(", ")
                    );
                    match im_sim::generate::write_scenario(&file, &outcome.scenario, &comment) {
                        Ok(()) => println!("  replay: im-sim run {}{bug_flags}", file.display()),
                        Err(e) => eprintln!("  error: cannot write {}: {e}", file.display()),
                    }
                }
            });
        }
        bar.inc(1);
        if first && failures > 0 {
            break;
        }
    }
    bar.finish_and_clear();
    print!("{}", tally.table());
    println!(
        "{} runs, {failures} failed, {:.1}s",
        tally.runs,
        wall.elapsed().as_secs_f64()
    );
    let never = tally.never();
    if require_coverage && !never.is_empty() {
        let names: Vec<&str> = never.iter().map(|s| s.name()).collect();
        println!("never reached: {}", names.join(", "));
        return ExitCode::FAILURE;
    }
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn fuzz(profile: Profile, cases: u32, seed: u64, out: &Path, ops_max: usize) -> ExitCode {
    println!("seed: {seed}");
    let wall = std::time::Instant::now();
    let found = match im_sim::generate::fuzz(profile, cases, seed, ops_max, 128) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(found) = found else {
        println!(
            "no failure in {cases} generated runs against {profile} ({:.1}s)",
            wall.elapsed().as_secs_f64()
        );
        return ExitCode::SUCCESS;
    };
    let names: Vec<&str> = found.violated.iter().map(|i| i.name()).collect();
    let file = out.join(format!("found_{profile}_seed{seed}.toml"));
    let comment = format!(
        "Found by `im-sim fuzz --profile {profile} --cases {cases} --seed {seed}`, shrunk by proptest.\n\
         Violates: {}. It declares no violations, so `im-sim run` fails on it\n\
         until the bug is fixed; then it guards the fix.",
        names.join(", ")
    );
    if let Err(e) = im_sim::generate::write_scenario(&file, &found.scenario, &comment) {
        eprintln!("error: cannot write {}: {e}", file.display());
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    println!("{}", found.report);
    println!(
        "found a failure against {profile} ({}), shrunk to {} steps, in {:.1}s",
        names.join(", "),
        found.scenario.steps.len(),
        wall.elapsed().as_secs_f64()
    );
    println!("wrote {}", file.display());
    println!("replay: im-sim run {}", file.display());
    ExitCode::FAILURE
}

struct RunFlags {
    seed: Option<u64>,
    profile: Option<Profile>,
    client: Option<im_client::ClientProfile>,
    trace: bool,
    report: bool,
    junit: Option<PathBuf>,
    timeline: Option<PathBuf>,
    bugs: Vec<Bug>,
}

/// `im-sim bugs`: every bug switch, what it does, what guards it.
/// `im-sim bugs --first-seeds`: how soon the generated runs find each bug.
fn first_seeds(seeds: std::ops::Range<u64>, check: Option<&Path>) -> ExitCode {
    use im_sim::sweep::{beyond_simulation, first_finding, parse_first_seeds};
    let recorded = match check.map(std::fs::read_to_string).transpose() {
        Ok(text) => match text.as_deref().map(parse_first_seeds).transpose() {
            Ok(table) => table,
            Err(e) => {
                eprintln!("error: {}: {e}", check.unwrap_or(Path::new("")).display());
                return ExitCode::from(EXIT_BAD_INPUT);
            }
        },
        Err(e) => {
            eprintln!("error: {}: {e}", check.unwrap_or(Path::new("")).display());
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    println!(
        "# First seed of `im-sim sweep --profile hardened --seeds {}..{} --first --bug NAME` that fails.",
        seeds.start, seeds.end
    );
    let mut differences = 0;
    let mut found_lines = Vec::new();
    let mut not_found_lines = Vec::new();
    for bug in Bug::ALL {
        if let Some(why) = beyond_simulation(bug) {
            println!("# {bug}: beyond the simulation ({why})");
            continue;
        }
        let (found, runs) = match first_finding(bug, seeds.clone()) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: {bug}: {e}");
                return ExitCode::FAILURE;
            }
        };
        match found {
            Some(seed) => found_lines.push(format!("{bug} = {seed}")),
            None => not_found_lines.push(format!(
                "{bug} = \"{}..{}\"  # {runs} runs",
                seeds.start, seeds.end
            )),
        }
        if let Some(table) = &recorded {
            let want = table.get(&bug).copied();
            if want != Some(found) {
                differences += 1;
                let says = match want {
                    None => "nothing".to_owned(),
                    Some(None) => "not found".to_owned(),
                    Some(Some(seed)) => format!("seed {seed}"),
                };
                let finds = found.map_or("nothing".to_owned(), |seed| format!("seed {seed}"));
                eprintln!("DIFFERS {bug}: the table says {says}, the sweep finds {finds}");
            }
        }
    }
    println!("[found]\n{}", found_lines.join("\n"));
    println!("\n[not_found]\n{}", not_found_lines.join("\n"));
    if differences > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn bugs(scenarios: &Path) -> ExitCode {
    let files = match collect(&[scenarios.to_owned()]) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let mut guards: std::collections::BTreeMap<Bug, Vec<String>> = Default::default();
    for file in &files {
        match Scenario::load(file) {
            Ok(s) => {
                for bug in &s.guards {
                    guards.entry(*bug).or_default().push(s.name.clone());
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_BAD_INPUT);
            }
        }
    }
    for bug in Bug::ALL {
        let guarded_by = match (guards.get(&bug), bug.live_guard()) {
            (Some(files), _) => files
                .iter()
                .map(|f| format!("scenarios/{f}.toml"))
                .collect::<Vec<_>>()
                .join(", "),
            (None, Some(test)) => format!("live test server/tests/it: {test}"),
            (None, None) => "NOTHING".to_owned(),
        };
        println!(
            "{}\n    {}\n    guarded by: {guarded_by}",
            bug.name(),
            bug.summary()
        );
    }
    ExitCode::SUCCESS
}

fn run(paths: Vec<PathBuf>, flags: RunFlags) -> ExitCode {
    let RunFlags {
        seed,
        profile,
        client,
        trace,
        report,
        junit,
        timeline,
        bugs,
    } = flags;
    match seed {
        Some(s) => println!("seed: {s}"),
        None => println!("seed: from each scenario file (--seed N overrides)"),
    }
    let paths = if paths.is_empty() {
        vec![PathBuf::from("scenarios")]
    } else {
        paths
    };
    let files = match collect(&paths) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    // Read everything first: a malformed file stops the run before any
    // scenario is played.
    let mut scenarios = Vec::new();
    let mut bad = 0;
    for file in &files {
        match Scenario::load(file) {
            Ok(s) => scenarios.push((file.clone(), s)),
            Err(e) => {
                eprintln!("error: {e}");
                bad += 1;
            }
        }
    }
    if bad > 0 {
        eprintln!("{bad} scenario file(s) could not be read; nothing was run");
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    if scenarios.is_empty() {
        eprintln!("error: no scenario files under {paths:?}");
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    let options = RunOptions {
        seed,
        profile,
        client,
        bugs: bugs.iter().copied().collect(),
    };
    let (mut passed, mut failed) = (0, 0);
    let mut results: Vec<(
        PathBuf,
        String,
        Result<im_sim::Outcome, String>,
        std::time::Duration,
    )> = Vec::new();
    if let Some(dir) = &timeline
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        eprintln!("error: cannot create {}: {e}", dir.display());
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    for (file, scenario) in &scenarios {
        let wall = std::time::Instant::now();
        let outcome = match run_scenario(scenario, options.clone()) {
            Ok(o) => o,
            Err(e) => {
                failed += 1;
                println!("FAIL {}  error: {e}", scenario.name);
                results.push((
                    file.clone(),
                    scenario.name.clone(),
                    Err(e.to_string()),
                    wall.elapsed(),
                ));
                continue;
            }
        };
        let wall = wall.elapsed();
        if let Some(dir) = &timeline {
            let path = dir.join(format!("{}.md", scenario.name));
            if let Err(e) = std::fs::write(&path, im_sim::report::timeline(&outcome)) {
                eprintln!("error: cannot write {}: {e}", path.display());
            }
        }
        let violated = outcome.violated();
        let names = |v: &std::collections::BTreeSet<im_sim::Invariant>| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.iter().map(|i| i.name()).collect::<Vec<_>>().join(",")
            }
        };
        let verdict = if outcome.passed() { "PASS" } else { "FAIL" };
        let missed = if outcome.missed.is_empty() {
            String::new()
        } else {
            format!("  expectations missed: {}", outcome.missed.len())
        };
        println!(
            "{verdict} {}  ({}, seed {}, {:.1}s simulated in {:.2}s)  violated: {}  expected: {}{missed}",
            scenario.name,
            outcome.profile,
            outcome.seed,
            outcome.run.elapsed.as_secs_f64(),
            wall.as_secs_f64(),
            names(&violated),
            names(&outcome.expected),
        );
        if trace {
            print!("{}", outcome.trace);
        }
        if outcome.passed() {
            passed += 1;
            if report {
                println!("{}", outcome.report());
            }
        } else {
            failed += 1;
            println!("{}", outcome.report());
            let bug_flags = bug_flags(&bugs);
            println!(
                "replay: im-sim run {} --seed {} --profile {}{bug_flags}",
                file.display(),
                outcome.seed,
                outcome.profile
            );
        }
        results.push((file.clone(), scenario.name.clone(), Ok(outcome), wall));
    }
    if let Some(path) = &junit {
        let cases: Vec<im_sim::report::JunitCase<'_>> = results
            .iter()
            .map(|(file, name, outcome, wall)| im_sim::report::JunitCase {
                file,
                name,
                outcome: outcome.as_ref().map_err(Clone::clone),
                wall: *wall,
            })
            .collect();
        if let Err(e) = std::fs::write(path, im_sim::report::junit(&cases)) {
            eprintln!("error: cannot write {}: {e}", path.display());
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Files as given; directories expanded to their *.toml files, sorted.
fn collect(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found)?;
            found.sort();
            files.extend(found);
        } else if p.exists() {
            files.push(p.clone());
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{}: no such file or directory", p.display()),
            ));
        }
    }
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
    Ok(())
}
