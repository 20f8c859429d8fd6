//! Renders one run as text: the seed-style message table, the presence
//! table, the invariant verdicts and a compact timeline. Simulated time
//! only, so the text is a stable insta snapshot.

use std::fmt::Write as _;

use crate::Outcome;
use crate::history::{Event, fmt_time};
use crate::invariants::{fates, live_users};

pub fn render(o: &Outcome) -> String {
    let mut out = String::new();
    let s = &o.scenario;
    let _ = writeln!(out, "scenario: {}", s.name);
    let clients = s
        .clients
        .iter()
        .map(|(u, p)| format!("{u}={p}"))
        .collect::<Vec<_>>()
        .join(" ");
    let _ = writeln!(
        out,
        "server: {}  nodes: {}  clients: {clients}  seed: {}",
        o.profile, s.nodes, o.seed
    );
    let list = |v: &std::collections::BTreeSet<crate::Invariant>| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
        }
    };
    let _ = writeln!(out, "expected violations: {}", list(&o.expected));
    let _ = writeln!(out, "observed violations: {}", list(&o.violated()));
    let _ = writeln!(out, "verdict: {}", if o.passed() { "PASS" } else { "FAIL" });
    if !o.bugs.is_empty() {
        let bugs: Vec<&str> = o.bugs.iter().map(|b| b.name()).collect();
        let _ = writeln!(out, "bugs switched back on: {}", bugs.join(", "));
    }
    let _ = writeln!(
        out,
        "dangerous states reached: {}",
        crate::coverage::summary(&o.reached)
    );

    let _ = writeln!(out, "\nmessages");
    let _ = writeln!(
        out,
        "  {:<8} {:<9} {:<13} {:<16} result",
        "msg", "sent at", "from -> to", "text"
    );
    for (key, f) in fates(&o.run.history) {
        let twice = f.duplicated();
        let result = match (&f.send_failed, f.accepted, f.deliveries.as_slice()) {
            (Some(why), _, _) => format!("❌ not sent: {why}"),
            (None, _, [_, ..]) if !twice.is_empty() => {
                format!("❌ delivered more than once to {}", twice.join(", "))
            }
            (None, _, [(at, d)]) if d == crate::scenario::DEFAULT_DEVICE => {
                format!("✅ delivered at {}", fmt_time(*at))
            }
            (None, _, [_, ..]) => {
                let each: Vec<String> = f
                    .deliveries
                    .iter()
                    .map(|(at, d)| format!("{d} {}", fmt_time(*at)))
                    .collect();
                format!("✅ delivered to {}", each.join(", "))
            }
            (None, Some(true), []) => "❌ told sent, never delivered".to_owned(),
            (None, Some(false), []) => format!("❌ refused: {}", f.reason),
            (None, None, []) => "❌ no answer, never delivered".to_owned(),
        };
        let probe = if f.probe { " (probe)" } else { "" };
        let _ = writeln!(
            out,
            "  {:<8} {:<9} {:<13} {:<16} {result}{probe}",
            key.to_string(),
            f.sent_at.map(fmt_time).unwrap_or_default(),
            format!("{} -> {}", key.from, f.to),
            truncate(&f.text, 16),
        );
    }

    let _ = writeln!(out, "\npresence at quiescence");
    let live = live_users(&o.run.history);
    match &o.run.redis_online {
        None => {
            let _ = writeln!(out, "  Redis down: unknown");
        }
        Some(online) => {
            let _ = writeln!(
                out,
                "  {:<6} {:<16} live connection",
                "user", "redis presence"
            );
            for &u in o.scenario.clients.keys() {
                let (r, l) = (online.contains(&u), live.contains(&u));
                let mark = if r == l { "✅" } else { "❌" };
                let _ = writeln!(out, "  {u:<6} {:<16} {} {mark}", yes(r), yes(l));
            }
        }
    }

    let _ = writeln!(out, "\ninvariants");
    for v in &o.verdicts {
        if v.holds() {
            let _ = writeln!(out, "  ✅ {}", v.invariant);
        } else {
            let _ = writeln!(out, "  ❌ {}", v.invariant);
            for p in &v.problems {
                let _ = writeln!(out, "       {p}");
            }
        }
        for n in &v.notes {
            let _ = writeln!(out, "       note: {n}");
        }
    }

    let _ = writeln!(out, "\ntimeline");
    for r in &o.run.history.records {
        if matches!(r.event, Event::Sent { probe: true, .. }) {
            continue;
        }
        let _ = writeln!(out, "  {:>9}  {}", fmt_time(r.at), r.event);
    }
    out
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// One scenario's result for a JUnit report.
pub struct JunitCase<'a> {
    pub file: &'a std::path::Path,
    pub name: &'a str,
    /// The run, or why it could not run.
    pub outcome: Result<&'a Outcome, String>,
    pub wall: std::time::Duration,
}

/// JUnit XML: one testcase per scenario (and seed); a failure names the
/// violated invariants and the replay command.
pub fn junit(cases: &[JunitCase<'_>]) -> String {
    use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};
    let mut suite = TestSuite::new("scenarios");
    for c in cases {
        let (name, status) = match &c.outcome {
            Ok(o) => {
                let name = format!("{} (seed {}, {})", c.name, o.seed, o.profile);
                let status = if o.passed() {
                    TestCaseStatus::success()
                } else {
                    let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
                    let names = |v: &std::collections::BTreeSet<crate::Invariant>| {
                        v.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
                    };
                    s.set_message(format!(
                        "violated: [{}], expected: [{}]; replay: im-sim run {} --seed {} --profile {}",
                        names(&o.violated()),
                        names(&o.expected),
                        c.file.display(),
                        o.seed,
                        o.profile
                    ));
                    s.set_description(o.report());
                    s
                };
                (name, status)
            }
            Err(e) => {
                let mut s = TestCaseStatus::non_success(NonSuccessKind::Error);
                s.set_message(e.clone());
                (c.name.to_owned(), s)
            }
        };
        let mut case = TestCase::new(name, status);
        case.set_classname("im-sim");
        case.set_time(c.wall);
        suite.add_test_case(case);
    }
    let mut report = Report::new("im-sim");
    report.add_test_suite(suite);
    report
        .to_string()
        .unwrap_or_else(|e| format!("<!-- cannot serialize: {e} -->"))
}

/// A Mermaid sequence diagram of one run (in Markdown, which code hosts
/// render): hosts, messages, faults, phases, and the violations at the end.
pub fn timeline(o: &Outcome) -> String {
    use std::collections::BTreeMap;
    let id = |user: u64, device: &str| {
        if device == crate::scenario::DEFAULT_DEVICE {
            format!("U{user}")
        } else {
            format!("U{user}_{device}")
        }
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# {} ({}, seed {})\n",
        o.scenario.name, o.profile, o.seed
    );
    let _ = writeln!(
        out,
        "verdict: {}\n",
        if o.passed() { "PASS" } else { "FAIL" }
    );
    let _ = writeln!(out, "```mermaid\nsequenceDiagram");
    for (user, device) in &o.scenario.devices {
        let label = if device == crate::scenario::DEFAULT_DEVICE {
            format!("user{user}")
        } else {
            format!("user{user}/{device}")
        };
        let _ = writeln!(out, "    participant {} as {label}", id(*user, device));
    }
    for n in 1..=o.scenario.nodes {
        let _ = writeln!(out, "    participant N{n} as node{n}");
    }
    let _ = writeln!(out, "    participant R as redis");
    let first = o
        .scenario
        .devices
        .first()
        .map(|(u, d)| id(*u, d))
        .unwrap_or_else(|| "N1".into());
    let span = format!("{first},R");
    // The node each device is on, and each sender's device, as the history tells.
    let mut on = BTreeMap::<u64, (String, u64)>::new();
    let mut node_of = BTreeMap::<String, u64>::new();
    // Mermaid reads `;`, `#` and `:` as syntax, and arrows in text are
    // safest as arrows of another alphabet.
    let clean = |s: &str| {
        s.replace([';', '#', ':'], " ")
            .replace("<->", "↔")
            .replace("->", "→")
    };
    for r in &o.run.history.records {
        let t = fmt_time(r.at);
        match &r.event {
            Event::Connected {
                user,
                device,
                node,
                conn,
            } => {
                let who = id(*user, device);
                node_of.insert(who.clone(), *node);
                on.insert(*user, (who.clone(), *node));
                let _ = writeln!(out, "    {who}->>N{node}: {t} connect (conn {conn})");
            }
            Event::ConnectFailed {
                user,
                device,
                node,
                error,
            } => {
                let _ = writeln!(
                    out,
                    "    {}-xN{node}: {t} connect failed {}",
                    id(*user, device),
                    clean(error)
                );
            }
            Event::Closed {
                user,
                device,
                conn,
                cause,
            } => {
                let who = id(*user, device);
                let _ = writeln!(
                    out,
                    "    Note over {who}: {t} conn {conn} closed {}",
                    clean(cause)
                );
            }
            Event::Sent { key, to, probe, .. } => {
                let (who, node) = on
                    .get(&key.from)
                    .cloned()
                    .unwrap_or((format!("U{}", key.from), 1));
                let p = if *probe { " (probe)" } else { "" };
                let _ = writeln!(
                    out,
                    "    {who}->>N{node}: {t} send {} {}->{to}{p}",
                    key.id, key.from
                );
            }
            Event::SendFailed { key, reason, .. } => {
                let (who, _) = on
                    .get(&key.from)
                    .cloned()
                    .unwrap_or((format!("U{}", key.from), 1));
                let _ = writeln!(
                    out,
                    "    Note over {who}: {t} cannot send {} ({})",
                    key.id,
                    clean(reason)
                );
            }
            Event::SendResult {
                key,
                accepted,
                reason,
            } => {
                let (who, node) = on
                    .get(&key.from)
                    .cloned()
                    .unwrap_or((format!("U{}", key.from), 1));
                let what = if *accepted {
                    "sent".to_owned()
                } else {
                    format!("refused {}", clean(reason))
                };
                let _ = writeln!(out, "    N{node}-->>{who}: {t} {} {what}", key.id);
            }
            Event::Delivered {
                to, device, key, ..
            } => {
                let who = id(*to, device);
                let node = node_of.get(&who).copied().unwrap_or(1);
                let _ = writeln!(
                    out,
                    "    N{node}->>{who}: {t} deliver {} from {}",
                    key.id, key.from
                );
            }
            Event::ServerError {
                user,
                device,
                code,
                detail,
            } => {
                let _ = writeln!(
                    out,
                    "    Note over {}: {t} server error {code} {}",
                    id(*user, device),
                    clean(detail)
                );
            }
            Event::PresenceWrite { command } => {
                let _ = writeln!(out, "    Note over R: {t} {}", clean(command));
            }
            Event::Fault { what } => {
                let _ = writeln!(out, "    Note over {span}: {t} fault {}", clean(what));
            }
            Event::Phase { name } => {
                let _ = writeln!(out, "    Note over {span}: {t} -- {name} --");
            }
        }
    }
    for v in o.verdicts.iter().filter(|v| !v.holds()) {
        for p in &v.problems {
            let _ = writeln!(
                out,
                "    Note over {span}: violated {} - {}",
                v.invariant,
                clean(p)
            );
        }
    }
    let _ = writeln!(out, "```");
    out
}
