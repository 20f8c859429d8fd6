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
