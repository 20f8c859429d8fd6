//! Renders one run as text: the seed-style message table, the presence
//! table, the invariant verdicts and a compact timeline. Simulated time
//! only, so the text is a stable insta snapshot.

use std::fmt::Write as _;

use crate::Outcome;
use crate::history::{Event, fmt_time};
use crate::invariants::{Judgement, fates, judge, live_users, lost_with_redis};

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
    let lost = lost_with_redis(&o.run.history);
    let rows: Vec<Row> = fates(&o.run.history)
        .into_iter()
        .map(|((key, _), f)| row(o, &lost, key, &f))
        .collect();
    // A burst's messages share everything but their id and times: shown as
    // one line per run of at least RUN_MIN alike messages.
    let mut i = 0;
    while i < rows.len() {
        let mut j = i + 1;
        while j < rows.len() && rows[j].follows(&rows[j - 1]) {
            j += 1;
        }
        if j - i >= RUN_MIN {
            let (first, last) = (&rows[i], &rows[j - 1]);
            let span = |a: &str, b: &str| {
                if a == b {
                    a.to_owned()
                } else {
                    format!("{a}..{b}")
                }
            };
            let _ = writeln!(
                out,
                "  {}..#{} ({} messages)  sent {}  {} -> {}  {:?}  {}{}",
                first.key,
                last.key.id,
                j - i,
                span(&first.sent_at, &last.sent_at),
                first.key.from,
                first.to,
                first.text,
                first.class,
                match (first.first_at, last.last_at) {
                    (Some(a), Some(b)) => format!(" {}..{}", fmt_time(a), fmt_time(b)),
                    _ => String::new(),
                },
            );
        } else {
            for r in &rows[i..j] {
                let _ = writeln!(
                    out,
                    "  {:<8} {:<9} {:<13} {:<16} {}",
                    r.key.to_string(),
                    r.sent_at,
                    format!("{} -> {}", r.key.from, r.to),
                    truncate(&r.text, 16),
                    r.full
                );
            }
        }
        i = j;
    }

    connections(&mut out, o);

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

    if !o.missed.is_empty() {
        let _ = writeln!(out, "\nexpectations missed");
        for m in &o.missed {
            let _ = writeln!(out, "  ❌ {m}");
        }
    }

    let _ = writeln!(out, "\ntimeline");
    timeline_lines(&mut out, &o.run.history.records);
    out
}

/// The message an event is about, if any.
fn key_of(e: &Event) -> Option<crate::history::MsgKey> {
    match e {
        Event::Sent { key, .. }
        | Event::SendFailed { key, .. }
        | Event::SendResult { key, .. }
        | Event::SendRetry { key, .. }
        | Event::Stored { key, .. }
        | Event::Delivered { key, .. } => Some(*key),
        _ => None,
    }
}

/// The timeline, one event a line, except bursts: within a stretch of
/// message events (sends, answers, deliveries, with no other event
/// between), at least [`RUN_MIN`] events alike but for consecutive message
/// ids are one line, printed where the first of them was; every other
/// line keeps its place.
fn timeline_lines(out: &mut String, records: &[crate::history::Record]) {
    let shown: Vec<&crate::history::Record> = records
        .iter()
        // The faults in effect are told by the faults themselves.
        .filter(|r| {
            !matches!(
                r.event,
                Event::Sent { probe: true, .. } | Event::Disturbed { .. }
            )
        })
        .collect();
    // The event's text with its message key taken out.
    let shape = |r: &crate::history::Record| -> Option<(crate::history::MsgKey, String)> {
        let key = key_of(&r.event)?;
        Some((
            key,
            r.event.to_string().replacen(&key.to_string(), "\u{0}", 1),
        ))
    };
    // Per line: None = print as is; Some(None) = folded into a run printed
    // earlier; Some(Some(text)) = a run's line.
    let mut folded: Vec<Option<Option<String>>> = vec![None; shown.len()];
    let mut start = 0;
    while start < shown.len() {
        let mut end = start;
        while end < shown.len() && key_of(&shown[end].event).is_some() {
            end += 1;
        }
        if end == start {
            start += 1;
            continue;
        }
        // Runs in this stretch, by shape: (last key, members).
        let mut runs: std::collections::BTreeMap<
            String,
            Vec<(crate::history::MsgKey, Vec<usize>)>,
        > = std::collections::BTreeMap::new();
        for (i, record) in shown.iter().enumerate().take(end).skip(start) {
            let (key, text) = shape(record).expect("a message event");
            let list = runs.entry(text).or_default();
            match list.last_mut() {
                Some((last, members)) if last.from == key.from && last.id + 1 == key.id => {
                    *last = key;
                    members.push(i);
                }
                _ => list.push((key, vec![i])),
            }
        }
        for (text, list) in runs {
            for (last, members) in list {
                if members.len() < RUN_MIN {
                    continue;
                }
                let first = members[0];
                let key = key_of(&shown[first].event).expect("a message event");
                let line = format!(
                    "{} ({} times, until {})",
                    text.replacen('\u{0}', &format!("{key}..#{}", last.id), 1),
                    members.len(),
                    fmt_time(shown[*members.last().expect("a run")].at)
                );
                for &m in &members {
                    folded[m] = Some(None);
                }
                folded[first] = Some(Some(line));
            }
        }
        start = end;
    }
    for (r, fold) in shown.iter().zip(folded) {
        match fold {
            None => {
                let _ = writeln!(out, "  {:>9}  {}", fmt_time(r.at), r.event);
            }
            Some(Some(line)) => {
                let _ = writeln!(out, "  {:>9}  {line}", fmt_time(r.at));
            }
            Some(None) => {}
        }
    }
}

/// Runs of at least this many alike messages are shown as one line.
const RUN_MIN: usize = 4;

/// One line of the message table.
struct Row {
    key: crate::history::MsgKey,
    to: u64,
    text: String,
    sent_at: String,
    /// The result without times (what makes two rows alike).
    class: String,
    /// The result as shown for a single row.
    full: String,
    first_at: Option<std::time::Duration>,
    last_at: Option<std::time::Duration>,
}

impl Row {
    /// The next message of the same burst: same sender, consecutive id,
    /// same recipient and text, alike result.
    fn follows(&self, prev: &Row) -> bool {
        self.key.from == prev.key.from
            && self.key.id == prev.key.id + 1
            && self.to == prev.to
            && self.text == prev.text
            && self.class == prev.class
    }
}

/// Judges one message for the table: the mark is the verdict's (❌ only
/// for what an invariant flags; for a probe, liveness flags anything but a
/// delivery).
fn row(
    o: &Outcome,
    lost: &std::collections::BTreeSet<crate::history::MsgKey>,
    key: crate::history::MsgKey,
    f: &crate::invariants::MessageFate,
) -> Row {
    let twice = f.duplicated();
    let judged = judge(&o.run, lost, f);
    let devices = || {
        let mut names: Vec<&str> = f.deliveries.iter().map(|(_, d)| d.as_str()).collect();
        names.dedup();
        names.join(", ")
    };
    let delivered = || match f.deliveries.as_slice() {
        [(at, d)] if d == crate::scenario::DEFAULT_DEVICE => {
            format!("delivered at {}", fmt_time(*at))
        }
        _ => {
            let each: Vec<String> = f
                .deliveries
                .iter()
                .map(|(at, d)| format!("{d} {}", fmt_time(*at)))
                .collect();
            format!("delivered to {}", each.join(", "))
        }
    };
    let plain_delivery =
        matches!(f.deliveries.as_slice(), [(_, d)] if d == crate::scenario::DEFAULT_DEVICE);
    let (class, full) = match judged {
        _ if !twice.is_empty() => {
            let r = format!("❌ delivered more than once to {}", twice.join(", "));
            (r.clone(), r)
        }
        Judgement::Delivered if plain_delivery => {
            ("✅ delivered".to_owned(), format!("✅ {}", delivered()))
        }
        Judgement::Delivered => (
            format!("✅ delivered to {}", devices()),
            format!("✅ {}", delivered()),
        ),
        Judgement::Waiting => {
            let r = "✅ waiting in the recipient's stored inbox".to_owned();
            (r.clone(), r)
        }
        Judgement::LostWithRedis => {
            let r = "⚪ told sent, lost with Redis's data (exempt: empty restart)".to_owned();
            (r.clone(), r)
        }
        Judgement::Missing { devices: missing } if f.deliveries.is_empty() => {
            let whom = missing.join(", ");
            let r = if whom == "any device" {
                "❌ told sent, never delivered".to_owned()
            } else {
                format!("❌ told sent, never delivered to {whom}")
            };
            (r.clone(), r)
        }
        Judgement::Missing { devices: missing } => (
            format!(
                "❌ delivered to {}; never to {}",
                devices(),
                missing.join(", ")
            ),
            format!("❌ {}; never to {}", delivered(), missing.join(", ")),
        ),
        other => {
            let mark = if f.probe { "❌" } else { "⚪" };
            let what = match other {
                Judgement::Refused => format!("refused: {}", f.reason),
                Judgement::NotSent => {
                    format!("not sent: {}", f.send_failed.clone().unwrap_or_default())
                }
                _ => "no answer, never delivered".to_owned(),
            };
            let r = format!("{mark} {what}");
            (r.clone(), r)
        }
    };
    let retried = match f.retries {
        0 => String::new(),
        1 => " (after 1 retry)".to_owned(),
        n => format!(" (after {n} retries)"),
    };
    let probe = if f.probe { " (probe)" } else { "" };
    let some_retried = if f.retries > 0 {
        " (after retries)"
    } else {
        ""
    };
    Row {
        key,
        to: f.to,
        text: f.text.clone(),
        sent_at: f.sent_at.map(fmt_time).unwrap_or_default(),
        class: format!("{class}{some_retried}{probe}"),
        full: format!("{full}{retried}{probe}"),
        first_at: f.deliveries.iter().map(|(at, _)| *at).min(),
        last_at: f.deliveries.iter().map(|(at, _)| *at).max(),
    }
}

/// Every connection a client saw: who, which node, when it opened and
/// how it ended (the server's close code and reason when it sent one), so
/// a reader (and `[expect] closes`) can see how each connection ended.
fn connections(out: &mut String, o: &Outcome) {
    let _ = writeln!(out, "\nconnections");
    let _ = writeln!(
        out,
        "  {:<20} {:<6} {:<6} {:<9} {:<9} ended",
        "device", "conn", "node", "opened", "closed"
    );
    let mut open: Vec<(String, u64, u64, std::time::Duration)> = Vec::new();
    let mut rows: Vec<String> = Vec::new();
    for r in &o.run.history.records {
        match &r.event {
            Event::Connected {
                user,
                device,
                node,
                conn,
            } => open.push((who(*user, device), *conn, *node, r.at)),
            Event::Closed {
                user,
                device,
                node,
                conn,
                cause,
                ..
            } => {
                let name = who(*user, device);
                if let Some(i) = open
                    .iter()
                    .position(|(w, c, n, _)| *w == name && c == conn && n == node)
                {
                    let (w, c, node, at) = open.remove(i);
                    rows.push(format!(
                        "  {:<20} {:<6} {:<6} {:<9} {:<9} {cause}",
                        w,
                        c,
                        format!("node{node}"),
                        fmt_time(at),
                        fmt_time(r.at)
                    ));
                }
            }
            _ => {}
        }
    }
    for (w, c, node, at) in open {
        rows.push(format!(
            "  {:<20} {:<6} {:<6} {:<9} {:<9} open at the end",
            w,
            c,
            format!("node{node}"),
            fmt_time(at),
            "-"
        ));
    }
    for row in rows {
        let _ = writeln!(out, "{row}");
    }
}

fn who(user: u64, device: &str) -> String {
    if device == crate::scenario::DEFAULT_DEVICE {
        format!("user{user}")
    } else {
        format!("user{user}/{device}")
    }
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
                ..
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
            Event::SendRetry { key, reason } => {
                let (who, node) = on
                    .get(&key.from)
                    .cloned()
                    .unwrap_or((format!("U{}", key.from), 1));
                let _ = writeln!(
                    out,
                    "    N{node}-->>{who}: {t} {} retry later {}",
                    key.id,
                    clean(reason)
                );
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
            // The sends and answers around it already tell the story, and
            // the faults what is disturbed.
            Event::Stored { .. } | Event::Disturbed { .. } => {}
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
