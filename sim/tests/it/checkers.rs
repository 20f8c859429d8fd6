//! The checkers on hand-made histories: what each must flag, and the false
//! alarms each must not raise. A checker reads only a `RunResult`, so a
//! history written by hand is a complete test of its judgement.

use std::collections::BTreeSet;
use std::time::Duration;

use im_sim::history::{Event, History, MsgKey};
use im_sim::{Invariant, RunResult, invariants};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn key(from: u64, id: u64) -> MsgKey {
    MsgKey { from, id }
}

fn sent(h: &mut History, at: u64, from: u64, device: &str, id: u64, to: u64, text: &str) {
    answered(h, at, from, device, id, to, text, true);
}

/// A send handed over at `at` and answered (accepted or refused) 1 ms later.
#[allow(clippy::too_many_arguments)]
fn answered(
    h: &mut History,
    at: u64,
    from: u64,
    device: &str,
    id: u64,
    to: u64,
    text: &str,
    accepted: bool,
) {
    h.push(
        ms(at),
        Event::Sent {
            key: key(from, id),
            device: device.into(),
            to,
            text: text.into(),
            probe: false,
        },
    );
    h.push(
        ms(at + 1),
        Event::SendResult {
            key: key(from, id),
            accepted,
            reason: if accepted {
                String::new()
            } else {
                "refused".into()
            },
        },
    );
}

fn delivered(h: &mut History, at: u64, to: u64, device: &str, from: u64, id: u64, text: &str) {
    h.push(
        ms(at),
        Event::Delivered {
            to,
            device: device.into(),
            node: 1,
            conn: 1,
            key: key(from, id),
            text: text.into(),
        },
    );
}

fn connected(h: &mut History, at: u64, user: u64, device: &str) {
    h.push(
        ms(at),
        Event::Connected {
            user,
            device: device.into(),
            node: 1,
            conn: 1,
        },
    );
}

fn run(history: History, online: &[(u64, &str)]) -> RunResult {
    RunResult {
        history,
        redis_online: Some(online.iter().map(|(u, _)| *u).collect()),
        intended_online: online.iter().map(|(u, d)| (*u, d.to_string())).collect(),
        stored: BTreeSet::new(),
        stored_twice: BTreeSet::new(),
        elapsed: ms(10_000),
        wire: Vec::new(),
        inbox: true,
        users: online.iter().map(|(u, _)| *u).collect(),
        odd_tokens: BTreeSet::new(),
        bells_heard: None,
    }
}

fn verdict(r: &RunResult, which: Invariant) -> im_sim::Verdict {
    invariants::check(r)
        .into_iter()
        .find(|v| v.invariant == which)
        .unwrap()
}

#[test]
fn two_devices_of_one_user_sending_at_once_are_not_reordering() {
    let mut h = History::default();
    for (u, d) in [(1001, "phone"), (1001, "laptop"), (1002, "phone")] {
        connected(&mut h, 0, u, d);
    }
    // The phone sends #1, #3; the laptop #2, #4 (ids are per user); the
    // recipient gets the laptop's first, then the phone's: each device's
    // own order holds.
    sent(&mut h, 10, 1001, "phone", 1, 1002, "p1");
    sent(&mut h, 10, 1001, "laptop", 2, 1002, "l1");
    sent(&mut h, 10, 1001, "phone", 3, 1002, "p2");
    sent(&mut h, 10, 1001, "laptop", 4, 1002, "l2");
    delivered(&mut h, 20, 1002, "phone", 1001, 2, "l1");
    delivered(&mut h, 21, 1002, "phone", 1001, 4, "l2");
    delivered(&mut h, 22, 1002, "phone", 1001, 1, "p1");
    delivered(&mut h, 23, 1002, "phone", 1001, 3, "p2");
    let online = [(1001, "phone"), (1001, "laptop"), (1002, "phone")];
    let v = verdict(&run(h.clone(), &online), Invariant::Delivery);
    assert!(v.holds(), "{:?}", v.problems);

    // One device's own order broken is still flagged.
    let mut h2 = History::default();
    for (u, d) in online {
        connected(&mut h2, 0, u, d);
    }
    sent(&mut h2, 10, 1001, "phone", 1, 1002, "p1");
    sent(&mut h2, 10, 1001, "phone", 3, 1002, "p2");
    delivered(&mut h2, 20, 1002, "phone", 1001, 3, "p2");
    delivered(&mut h2, 21, 1002, "phone", 1001, 1, "p1");
    let v = verdict(&run(h2, &online), Invariant::Delivery);
    assert!(!v.holds(), "a device's own order broken must be flagged");
}

#[test]
fn a_message_delivered_again_after_an_empty_redis_restart_is_exempt_and_noted() {
    let mut h = History::default();
    connected(&mut h, 0, 1001, "phone");
    connected(&mut h, 0, 1002, "phone");
    sent(&mut h, 10, 1001, "phone", 1, 1002, "m");
    delivered(&mut h, 20, 1002, "phone", 1001, 1, "m");
    h.push(
        ms(30),
        Event::Fault {
            what: "redis restarts empty".into(),
        },
    );
    delivered(&mut h, 40, 1002, "phone", 1001, 1, "m");
    let online = [(1001, "phone"), (1002, "phone")];
    let v = verdict(&run(h.clone(), &online), Invariant::Delivery);
    assert!(v.holds(), "{:?}", v.problems);
    assert_eq!(v.notes.len(), 1, "the exemption is shown: {:?}", v.notes);

    // Without the restart, twice is a duplicate.
    let dup: History = History {
        records: h
            .records
            .into_iter()
            .filter(|r| !matches!(r.event, Event::Fault { .. }))
            .collect(),
    };
    let v = verdict(&run(dup, &online), Invariant::Delivery);
    assert!(!v.holds(), "a duplicate must be flagged");
}

#[test]
fn a_reused_id_for_another_text_is_another_message() {
    let mut h = History::default();
    connected(&mut h, 0, 1001, "phone");
    connected(&mut h, 0, 1002, "phone");
    sent(&mut h, 10, 1001, "phone", 7, 1002, "first");
    delivered(&mut h, 20, 1002, "phone", 1001, 7, "first");
    // The same id, another text, told "sent" and never delivered: a lie.
    sent(&mut h, 30, 1001, "phone", 7, 1002, "second");
    let online = [(1001, "phone"), (1002, "phone")];
    let v = verdict(&run(h, &online), Invariant::NoFalseSuccess);
    assert!(!v.holds(), "the second message was told sent and lost");
}

#[test]
fn without_an_inbox_a_device_that_logs_in_later_is_not_owed_earlier_messages() {
    let mut h = History::default();
    connected(&mut h, 0, 1001, "phone");
    connected(&mut h, 0, 1002, "phone");
    sent(&mut h, 10, 1002, "phone", 1, 1001, "before the laptop");
    delivered(&mut h, 20, 1001, "phone", 1002, 1, "before the laptop");
    connected(&mut h, 30, 1001, "laptop");
    let online = [(1001, "phone"), (1001, "laptop"), (1002, "phone")];
    let mut seed_phase = run(h.clone(), &online);
    seed_phase.inbox = false;
    let v = verdict(&seed_phase, Invariant::NoFalseSuccess);
    assert!(
        v.holds(),
        "a phase server cannot push to a device that did not exist: {:?}",
        v.problems
    );
    // With an inbox the laptop resumes from the start: it is owed the message.
    let v = verdict(&run(h, &online), Invariant::NoFalseSuccess);
    assert!(
        !v.holds(),
        "hardened promises every device online at the end"
    );
}

#[test]
fn a_message_stored_before_an_empty_restart_is_exempt_even_if_sent_was_heard_after() {
    let mut h = History::default();
    connected(&mut h, 0, 1001, "phone");
    connected(&mut h, 0, 1002, "phone");
    h.push(
        ms(10),
        Event::Sent {
            key: key(1001, 1),
            device: "phone".into(),
            to: 1002,
            text: "m".into(),
            probe: false,
        },
    );
    // Redis inserted it at 11 ms, restarted empty at 12 ms; the sender
    // heard "sent" at 13 ms. The message went with Redis's data.
    h.push(
        ms(11),
        Event::Stored {
            to: 1002,
            key: key(1001, 1),
        },
    );
    h.push(
        ms(12),
        Event::Fault {
            what: "redis restarts empty".into(),
        },
    );
    h.push(
        ms(13),
        Event::SendResult {
            key: key(1001, 1),
            accepted: true,
            reason: String::new(),
        },
    );
    let online = [(1001, "phone"), (1002, "phone")];
    let v = verdict(&run(h.clone(), &online), Invariant::NoFalseSuccess);
    assert!(v.holds(), "{:?}", v.problems);
    assert_eq!(v.notes.len(), 1, "{:?}", v.notes);

    // Stored again after the restart (a retry), then told sent: owed.
    h.push(
        ms(14),
        Event::Stored {
            to: 1002,
            key: key(1001, 1),
        },
    );
    let mut h2 = History::default();
    for r in h.records {
        if matches!(r.event, Event::SendResult { .. }) {
            continue;
        }
        h2.records.push(r);
    }
    h2.push(
        ms(15),
        Event::SendResult {
            key: key(1001, 1),
            accepted: true,
            reason: String::new(),
        },
    );
    let v = verdict(&run(h2, &online), Invariant::NoFalseSuccess);
    assert!(
        !v.holds(),
        "stored after the restart and never delivered: a lie"
    );
}

fn refused(h: &mut History, at: u64, from: u64, id: u64, to: u64, text: &str) {
    answered(h, at, from, "phone", id, to, text, false);
}

#[test]
fn a_send_to_a_user_who_never_logged_in_told_sent_breaks_the_refusals_promise() {
    let mut h = History::default();
    connected(&mut h, 0, 1001, "phone");
    sent(&mut h, 10, 1001, "phone", 1, 4242, "to nobody");
    let mut r = run(h, &[(1001, "phone")]);
    r.stored.insert((4242, key(1001, 1)));
    let v = verdict(&r, Invariant::Refusals);
    assert_eq!(
        v.problems.len(),
        2,
        "told sent and stored: {:?}",
        v.problems
    );
}

#[test]
fn a_text_over_the_limit_told_sent_breaks_the_refusals_promise_and_one_at_it_does_not() {
    let max = im_server::config::Hardened::default().text_bytes_max;
    let mut h = History::default();
    connected(&mut h, 0, 1001, "phone");
    connected(&mut h, 0, 1002, "phone");
    sent(&mut h, 10, 1001, "phone", 1, 1002, &"a".repeat(max));
    delivered(&mut h, 20, 1002, "phone", 1001, 1, &"a".repeat(max));
    sent(&mut h, 30, 1001, "phone", 2, 1002, &"b".repeat(max + 1));
    delivered(&mut h, 40, 1002, "phone", 1001, 2, &"b".repeat(max + 1));
    let online = [(1001, "phone"), (1002, "phone")];
    let v = verdict(&run(h, &online), Invariant::Refusals);
    assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
    assert!(v.problems[0].contains("1001#2"), "{:?}", v.problems);
}

#[test]
fn refused_sends_to_strangers_and_over_long_texts_keep_every_promise() {
    let max = im_server::config::Hardened::default().text_bytes_max;
    let mut h = History::default();
    connected(&mut h, 0, 1001, "phone");
    refused(&mut h, 10, 1001, 1, 4242, "to nobody");
    refused(&mut h, 20, 1001, 2, 1001, &"b".repeat(max + 1));
    let r = run(h, &[(1001, "phone")]);
    for v in invariants::check(&r) {
        assert!(v.holds(), "{}: {:?}", v.invariant, v.problems);
    }
}

#[test]
fn the_seed_phases_promise_no_refusals() {
    let mut h = History::default();
    connected(&mut h, 0, 1001, "phone");
    sent(&mut h, 10, 1001, "phone", 1, 4242, "to nobody");
    let mut r = run(h, &[(1001, "phone")]);
    r.inbox = false;
    assert!(verdict(&r, Invariant::Refusals).holds());
}

#[test]
fn a_late_close_on_one_node_does_not_end_the_same_numbered_connection_on_another() {
    // Connection ids are per node: the phone's old conn 2 on node 1 closes
    // (its node was cut from Redis, so the close is slow) after the phone
    // logged in again on node 2, where it also got conn 2.
    let mut h = History::default();
    let on = |h: &mut History, at: u64, node: u64| {
        h.push(
            ms(at),
            Event::Connected {
                user: 1001,
                device: "phone".into(),
                node,
                conn: 2,
            },
        )
    };
    on(&mut h, 0, 1);
    on(&mut h, 240, 2);
    h.push(
        ms(733),
        Event::Closed {
            user: 1001,
            device: "phone".into(),
            node: 1,
            conn: 2,
            cause: "ByUser".into(),
            code: None,
        },
    );
    assert!(invariants::live_devices(&h).contains(&(1001, "phone".to_owned())));
    let r = run(h, &[(1001, "phone")]);
    assert!(verdict(&r, Invariant::Liveness).holds());
    assert!(verdict(&r, Invariant::Presence).holds());
}

#[test]
fn a_login_with_a_token_not_in_canonical_form_breaks_the_refusals_promise() {
    let mut h = History::default();
    connected(&mut h, 0, 1001, "phone");
    connected(&mut h, 5, 1001, "tablet");
    let mut r = run(h, &[(1001, "phone")]);
    assert!(verdict(&r, Invariant::Refusals).holds());
    r.odd_tokens.insert((1001, "tablet".to_owned()));
    let v = verdict(&r, Invariant::Refusals);
    assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
    assert!(v.problems[0].contains("tablet"), "{:?}", v.problems);
}

// ---- promptness: in calm weather nothing waits ----

/// `user`'s `device` connected on node 1 as connection `conn` at `at`.
fn connected_as(h: &mut History, at: u64, user: u64, device: &str, conn: u64) {
    h.push(
        ms(at),
        Event::Connected {
            user,
            device: device.into(),
            node: 1,
            conn,
        },
    );
}

/// 1001 and 1002 connected (conns 1 and 2) at 0; a run of 20 s.
fn two_users() -> History {
    let mut h = History::default();
    connected_as(&mut h, 0, 1001, "phone", 1);
    connected_as(&mut h, 0, 1002, "phone", 2);
    h
}

fn judged(h: History) -> RunResult {
    let mut r = run(h, &[(1001, "phone"), (1002, "phone")]);
    r.elapsed = ms(20_000);
    r
}

fn sent_only(h: &mut History, at: u64, from: u64, id: u64, to: u64) {
    h.push(
        ms(at),
        Event::Sent {
            key: key(from, id),
            device: "phone".into(),
            to,
            text: format!("m{id}"),
            probe: false,
        },
    );
}

#[test]
fn a_calm_send_left_unanswered_past_the_bound_breaks_promptness() {
    let mut h = two_users();
    sent_only(&mut h, 1_000, 1001, 1, 1002);
    let v = verdict(&judged(h), Invariant::Promptness);
    assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
    assert!(v.problems[0].contains("no answer"), "{:?}", v.problems);
}

#[test]
fn a_calm_message_that_waits_for_the_next_poll_breaks_promptness_and_a_quick_one_does_not() {
    let mut h = two_users();
    sent(&mut h, 1_000, 1001, "phone", 1, 1002, "m1");
    delivered(&mut h, 1_010, 1002, "phone", 1001, 1, "m1");
    sent(&mut h, 2_000, 1001, "phone", 2, 1002, "m2");
    delivered(&mut h, 11_000, 1002, "phone", 1001, 2, "m2");
    let v = verdict(&judged(h), Invariant::Promptness);
    assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
    assert!(
        v.problems[0].starts_with("1001#2 to 1002"),
        "{:?}",
        v.problems
    );
}

#[test]
fn deliveries_that_keep_arriving_behind_a_backlog_are_prompt() {
    let mut h = two_users();
    for id in 1..=10 {
        sent(&mut h, 1_000, 1001, "phone", id, 1002, &format!("m{id}"));
    }
    // Each within the bound of the one before, the last 9 s after its send.
    for id in 1..=10 {
        delivered(
            &mut h,
            1_000 + id * 900,
            1002,
            "phone",
            1001,
            id,
            &format!("m{id}"),
        );
    }
    assert!(verdict(&judged(h), Invariant::Promptness).holds());
}

#[test]
fn a_fault_on_the_path_exempts_a_wait_and_one_elsewhere_does_not() {
    let slow = |disturbed: (&str, &str)| {
        let mut h = two_users();
        h.push(
            ms(500),
            Event::Disturbed {
                links: vec![(disturbed.0.into(), disturbed.1.into())],
                hosts: Vec::new(),
            },
        );
        sent(&mut h, 2_000, 1001, "phone", 1, 1002, "m1");
        delivered(&mut h, 11_000, 1002, "phone", 1001, 1, "m1");
        verdict(&judged(h), Invariant::Promptness)
    };
    // node1 cut from Redis: both users' path.
    assert!(slow(("node1", "redis")).holds());
    // Another user's vanished path: not theirs.
    assert!(!slow(("user1003", "node1")).holds());
}

#[test]
fn a_fault_just_before_a_send_exempts_its_wait() {
    let mut h = two_users();
    // Redis restarts: a state that lasts no time, then calm.
    for hosts in [vec!["redis".to_owned()], Vec::new()] {
        h.push(
            ms(1_500),
            Event::Disturbed {
                links: Vec::new(),
                hosts,
            },
        );
    }
    sent(&mut h, 2_000, 1001, "phone", 1, 1002, "m1");
    delivered(&mut h, 11_000, 1002, "phone", 1001, 1, "m1");
    assert!(verdict(&judged(h), Invariant::Promptness).holds());
}

#[test]
fn a_sender_told_to_retry_later_is_not_held_to_promptness() {
    let mut h = two_users();
    sent_only(&mut h, 1_000, 1001, 1, 1002);
    h.push(
        ms(1_005),
        Event::SendRetry {
            key: key(1001, 1),
            reason: "inbox full".into(),
        },
    );
    sent_only(&mut h, 3_000, 1001, 2, 1002);
    assert!(verdict(&judged(h), Invariant::Promptness).holds());
}

#[test]
fn a_device_that_was_not_connected_all_along_is_not_owed_a_prompt_delivery() {
    let mut h = two_users();
    sent(&mut h, 1_000, 1001, "phone", 1, 1002, "m1");
    h.push(
        ms(1_500),
        Event::Closed {
            user: 1002,
            device: "phone".into(),
            node: 1,
            conn: 2,
            cause: "network".into(),
            code: None,
        },
    );
    assert!(verdict(&judged(h), Invariant::Promptness).holds());
}

#[test]
fn the_seed_phases_promise_no_delivery_time() {
    let mut h = two_users();
    sent_only(&mut h, 1_000, 1001, 1, 1002);
    let mut r = judged(h);
    r.inbox = false;
    assert!(verdict(&r, Invariant::Promptness).holds());
}

// ---- presence: leases stay released, replaced connections go ----

#[test]
fn a_lease_written_again_after_its_release_breaks_presence() {
    let lease = "node1/1700000000000/1/phone";
    let mut h = two_users();
    for (at, command) in [
        (
            10,
            format!("ZADD im:{{u:1001}}:conns 1700000030010 {lease}"),
        ),
        (5_000, format!("ZREM im:{{u:1001}}:conns {lease}")),
    ] {
        h.push(ms(at), Event::PresenceWrite { command });
    }
    let released = judged(h.clone());
    h.push(
        ms(5_100),
        Event::PresenceWrite {
            command: format!("ZADD im:{{u:1001}}:conns 1700000035100 {lease}"),
        },
    );
    let v = verdict(&released, Invariant::Presence);
    assert!(v.holds(), "{:?}", v.problems);
    let v = verdict(&judged(h), Invariant::Presence);
    assert!(
        v.problems.iter().any(|p| p.contains("written again")),
        "{:?}",
        v.problems
    );
}

fn wire(
    at: u64,
    node: u64,
    stream: u64,
    peer: &str,
    frame: im_sim::wire::Frame,
) -> im_sim::wire::WireRecord {
    im_sim::wire::WireRecord {
        at: ms(at),
        node,
        stream,
        peer: peer.into(),
        frame,
        peer_cut: false,
        redis_cut: false,
    }
}

/// 1001's phone logs in on node1 (stream 1), then again from its cellular
/// address on node2 (stream 2) at 2 s, with node1 cut from Redis from 1 s
/// to 3 s if `cut`; node1 closes stream 1 at `closed`.
fn replaced(cut: bool, closed: Option<u64>) -> RunResult {
    use im_sim::wire::Frame;
    let mut h = two_users();
    if cut {
        for (at, links) in [
            (1_000, vec![("node1".to_owned(), "redis".to_owned())]),
            (3_000, Vec::new()),
        ] {
            h.push(
                ms(at),
                Event::Disturbed {
                    links,
                    hosts: Vec::new(),
                },
            );
        }
    }
    let mut r = judged(h);
    r.elapsed = ms(30_000);
    r.wire = vec![
        wire(
            10,
            1,
            1,
            "user1001",
            Frame::LoginOk {
                user: 1001,
                conn: 1,
            },
        ),
        wire(
            2_000,
            2,
            2,
            "user1001@cell",
            Frame::LoginOk {
                user: 1001,
                conn: 1,
            },
        ),
    ];
    if let Some(at) = closed {
        r.wire
            .push(wire(at, 1, 1, "user1001", Frame::Close { code: 4001 }));
    }
    r
}

#[test]
fn a_replaced_connection_goes_at_once_in_calm_weather() {
    let v = verdict(&replaced(false, None), Invariant::Presence);
    assert!(
        v.problems.iter().any(|p| p.contains("still open")),
        "{:?}",
        v.problems
    );
    // The doorbell closes it at once; waiting for a lease refresh is late.
    assert!(verdict(&replaced(false, Some(2_005)), Invariant::Presence).holds());
    assert!(!verdict(&replaced(false, Some(11_000)), Invariant::Presence).holds());
}

#[test]
fn a_replaced_connection_whose_news_was_lost_goes_at_its_next_lease_refresh() {
    // Node1 could not hear the doorbell: its lease refresh after the cut
    // heals (within a heartbeat interval) is in time, its heartbeat
    // timeout (25 s after a vanish at 1 s) is not.
    assert!(verdict(&replaced(true, Some(11_000)), Invariant::Presence).holds());
    assert!(!verdict(&replaced(true, Some(26_000)), Invariant::Presence).holds());
    assert!(!verdict(&replaced(true, None), Invariant::Presence).holds());
}

#[test]
fn a_node_still_listening_to_the_doorbell_of_a_user_who_left_breaks_presence() {
    let mut r = judged(two_users());
    r.bells_heard = Some(BTreeSet::from([1001, 1002]));
    assert!(verdict(&r, Invariant::Presence).holds());
    r.bells_heard = Some(BTreeSet::from([1001, 1002, 1003]));
    let v = verdict(&r, Invariant::Presence);
    assert!(
        v.problems.iter().any(|p| p.contains("doorbell of 1003")),
        "{:?}",
        v.problems
    );
    // After a node was cut from Redis, its old pub/sub connection may live
    // on in Redis, half-open: not judged.
    let mut h = two_users();
    for links in [vec![("node1".to_owned(), "redis".to_owned())], Vec::new()] {
        h.push(
            ms(1_000),
            Event::Disturbed {
                links,
                hosts: Vec::new(),
            },
        );
    }
    let mut r = judged(h);
    r.bells_heard = Some(BTreeSet::from([1001, 1002, 1003]));
    assert!(verdict(&r, Invariant::Presence).holds());
}

#[test]
fn a_send_with_client_message_id_zero_told_sent_breaks_the_refusals_promise() {
    let mut h = two_users();
    sent(&mut h, 1_000, 1001, "phone", 0, 1002, "id zero");
    delivered(&mut h, 1_010, 1002, "phone", 1001, 0, "id zero");
    let v = verdict(&judged(h), Invariant::Refusals);
    assert!(
        v.problems.iter().any(|p| p.contains("id 0")),
        "{:?}",
        v.problems
    );
    let mut h = two_users();
    refused(&mut h, 1_000, 1001, 0, 1002, "id zero");
    assert!(verdict(&judged(h), Invariant::Refusals).holds());
}
