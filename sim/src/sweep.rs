//! Seed sweeps: one generated run per seed, judged, with the dangerous
//! states each reached added up. Shards split a range across machines.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use im_server::{Bug, Profile};

use crate::coverage::Sometimes;
use crate::generate::{compile, plan_for_seed};
use crate::{Outcome, RunOptions, SimError};

/// Shard `index` (1-based) of `count`: seeds whose position in the range
/// is `index - 1` modulo `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 1, count: 1 }
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad shard {s:?} (expected I/N with 1 <= I <= N, e.g. 2/4)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// `A..B` (B excluded) or `A..=B`.
pub fn parse_seeds(s: &str) -> Result<Range<u64>, String> {
    let bad = || format!("bad seed range {s:?} (expected A..B or A..=B, e.g. 0..1000)");
    let (a, b) = s.split_once("..").ok_or_else(bad)?;
    let start: u64 = a.trim().parse().map_err(|_| bad())?;
    let end = match b.strip_prefix('=') {
        Some(b) => b
            .trim()
            .parse::<u64>()
            .map_err(|_| bad())?
            .checked_add(1)
            .ok_or_else(bad)?,
        None => b.trim().parse().map_err(|_| bad())?,
    };
    if end <= start {
        return Err(format!("empty seed range {s:?}"));
    }
    Ok(start..end)
}

/// The seeds of `range` that belong to `shard`, in order.
pub fn shard_seeds(range: Range<u64>, shard: Shard) -> impl Iterator<Item = u64> {
    let start = range.start;
    range.filter(move |s| (s - start) % shard.count == shard.index - 1)
}

/// Plays the generated run of `seed` against `profile`, with `bugs`
/// switched back on (empty: the profile as it is).
pub fn run_seed(
    profile: Profile,
    seed: u64,
    ops_max: usize,
    bugs: &BTreeSet<Bug>,
) -> Result<Outcome, SimError> {
    run_plan(
        profile,
        &format!("sweep_{profile}_seed{seed}"),
        &plan_for_seed(seed, ops_max),
        bugs,
    )
}

/// Plays the calm run of `seed` (`generate::calm_plans`): any violation
/// is a false alarm of a checker, or a bug in calm weather.
pub fn run_calm_seed(
    profile: Profile,
    seed: u64,
    ops_max: usize,
    bugs: &BTreeSet<Bug>,
) -> Result<Outcome, SimError> {
    let mut scenario = compile(
        &format!("calm_{profile}_seed{seed}"),
        profile,
        &crate::generate::calm_plan_for_seed(seed, ops_max, profile),
    );
    // The seed's deployment closes connections silent for the read idle
    // timeout, and its clients never come back: calm means longer than
    // the whole run.
    scenario.timeouts.idle = crate::scenario::Dur(std::time::Duration::from_secs(3600));
    play(&scenario, bugs)
}

fn run_plan(
    profile: Profile,
    name: &str,
    plan: &crate::generate::Plan,
    bugs: &BTreeSet<Bug>,
) -> Result<Outcome, SimError> {
    play(&compile(name, profile, plan), bugs)
}

fn play(scenario: &crate::Scenario, bugs: &BTreeSet<Bug>) -> Result<Outcome, SimError> {
    crate::run_scenario(
        scenario,
        RunOptions {
            bugs: bugs.clone(),
            ..RunOptions::default()
        },
    )
}

/// Where the table of first-finding seeds lives, from the workspace root.
pub const FIRST_SEEDS_FILE: &str = "sim/first-seeds.toml";

/// The profile and run size the table of first-finding seeds is for.
pub const FIRST_SEEDS_PROFILE: Profile = Profile::Hardened;
pub const FIRST_SEEDS_OPS_MAX: usize = 12;

/// The table: per bug switch, the first seed of the generated runs
/// ([`FIRST_SEEDS_PROFILE`], [`FIRST_SEEDS_OPS_MAX`]) that fails with it
/// switched on (`[found]`), or `None` for a bug no seed of the searched
/// range finds (`[not_found]`, with the range). Bugs the simulation cannot
/// express are in neither.
pub fn parse_first_seeds(text: &str) -> Result<BTreeMap<Bug, Option<u64>>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Table {
        #[serde(default)]
        found: BTreeMap<String, u64>,
        #[serde(default)]
        not_found: BTreeMap<String, String>,
    }
    let table: Table = toml::from_str(text).map_err(|e| e.to_string())?;
    let bug = |name: &str| name.parse::<Bug>().map_err(|e| e.to_string());
    let mut out = BTreeMap::new();
    for (name, seed) in table.found {
        out.insert(bug(&name)?, Some(seed));
    }
    for (name, range) in table.not_found {
        parse_seeds(&range)?;
        if out.insert(bug(&name)?, None).is_some() {
            return Err(format!("{name} is both found and not found"));
        }
    }
    Ok(out)
}

/// Why the simulation cannot find `bug`, if it cannot: it lives where no
/// simulated run reaches (the process's signal handling, the allocator's
/// memory). Their live tests guard them (`Bug::live_guard`).
pub fn beyond_simulation(bug: Bug) -> Option<&'static str> {
    match bug {
        Bug::SigtermKills => Some("a process signal: the simulation runs no process"),
        Bug::BuffersKeepLargeFrames => {
            Some("memory held by idle connections: no checker sees the allocator")
        }
        _ => None,
    }
}

/// The first seed in `seeds` whose generated run fails with `bug`
/// switched on, or `None`; also how many runs that took.
pub fn first_finding(bug: Bug, seeds: Range<u64>) -> Result<(Option<u64>, u64), SimError> {
    let bugs = BTreeSet::from([bug]);
    let mut runs = 0;
    for seed in seeds {
        runs += 1;
        let outcome = run_seed(FIRST_SEEDS_PROFILE, seed, FIRST_SEEDS_OPS_MAX, &bugs)?;
        if !outcome.passed() {
            return Ok((Some(seed), runs));
        }
    }
    Ok((None, runs))
}

/// How often each dangerous state was reached across runs.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub runs: u64,
    /// state -> (runs that reached it, times reached in all)
    pub reached: BTreeMap<Sometimes, (u64, u64)>,
}

impl Tally {
    pub fn add(&mut self, outcome: &Outcome) {
        self.runs += 1;
        for (state, n) in &outcome.reached {
            let e = self.reached.entry(*state).or_default();
            e.0 += 1;
            e.1 += u64::from(*n);
        }
    }

    /// The states no run reached.
    pub fn never(&self) -> Vec<Sometimes> {
        Sometimes::ALL
            .into_iter()
            .filter(|s| !self.reached.contains_key(s))
            .collect()
    }

    /// A table: every state, runs reaching it, total hits.
    pub fn table(&self) -> String {
        let mut out = format!("dangerous states reached in {} runs:\n", self.runs);
        for s in Sometimes::ALL {
            let (runs, hits) = self.reached.get(&s).copied().unwrap_or_default();
            let mark = if runs == 0 { "  NEVER" } else { "" };
            out.push_str(&format!(
                "  {:<42} {runs:>6} runs {hits:>7} times{mark}\n",
                s.name()
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_ranges_and_shards_parse_and_partition_the_range() {
        assert_eq!(parse_seeds("0..10"), Ok(0..10));
        assert_eq!(parse_seeds("5..=7"), Ok(5..8));
        assert!(parse_seeds("7..7").is_err());
        assert!(parse_seeds("a..b").is_err());
        assert!("0/3".parse::<Shard>().is_err());
        assert!("4/3".parse::<Shard>().is_err());
        let all: Vec<u64> = (1..=3)
            .flat_map(|i| shard_seeds(10..20, Shard { index: i, count: 3 }))
            .collect();
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            (10..20).collect::<Vec<_>>(),
            "shards cover the range once"
        );
        assert_eq!(
            shard_seeds(10..20, "2/3".parse().unwrap()).collect::<Vec<_>>(),
            vec![11, 14, 17]
        );
    }

    #[test]
    fn the_same_seed_always_gives_the_same_plan() {
        assert_eq!(plan_for_seed(42, 12), plan_for_seed(42, 12));
        assert_ne!(plan_for_seed(42, 12), plan_for_seed(43, 12));
    }
}
