//! A tiny in-memory Redis for the fuzz harness: just the commands the
//! server sends, over RESP2/RESP3, with pub/sub pushes, served on
//! `tokio::io::duplex` streams handed out by a [`Connector`].
//!
//! It is not the simulation's model (`sim/src/redis_model.rs`, checked
//! against a real `redis-server`): that one needs turmoil and a build with
//! `--cfg tokio_unstable`. This one is small, deterministic (BTreeMaps, no
//! expiry, no clock) and fast, so each fuzz input gets a fresh one. Every
//! collection it keeps grows at most by what the fuzz input makes the
//! server write, so it is bounded by the input's size.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use im_server::Connector;
use im_server::listener::BoxStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

/// Largest request the fake accepts; the server's are a few hundred bytes
/// (a stored message is at most one 64 KiB frame).
const REQUEST_BYTES_MAX: usize = 1 << 20;
/// Pub/sub messages queued for one connection before it is cut off (as
/// Redis's `client-output-buffer-limit pubsub`).
const PUSH_QUEUE_MAX: usize = 256;

#[derive(Default)]
struct Store {
    strings: BTreeMap<Vec<u8>, Vec<u8>>,
    sets: BTreeMap<Vec<u8>, BTreeSet<Vec<u8>>>,
    /// member -> score, per key.
    zsets: BTreeMap<Vec<u8>, BTreeMap<Vec<u8>, f64>>,
    /// channel -> subscribed connections.
    channels: BTreeMap<Vec<u8>, BTreeSet<u64>>,
    subscribers: BTreeMap<u64, mpsc::Sender<Vec<u8>>>,
    next_client: u64,
}

/// A fake Redis shared by every connection a [`Connector`] opens.
#[derive(Clone, Default)]
pub struct FakeRedis {
    store: Arc<Mutex<Store>>,
}

impl FakeRedis {
    /// A connector whose every dial opens a fresh in-memory connection to
    /// this fake (served by a spawned task on the current runtime).
    pub fn connector(&self) -> Connector {
        let fake = self.clone();
        Arc::new(move || {
            let fake = fake.clone();
            Box::pin(async move {
                let (client, server) = tokio::io::duplex(64 * 1024);
                tokio::spawn(fake.serve(server));
                Ok(Box::new(client) as BoxStream)
            })
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn serve(self, stream: DuplexStream) {
        let (id, mut pushes) = {
            let mut store = self.lock();
            store.next_client += 1;
            let id = store.next_client;
            let (tx, rx) = mpsc::channel(PUSH_QUEUE_MAX);
            store.subscribers.insert(id, tx);
            (id, rx)
        };
        let mut conn = Conn {
            id,
            resp3: false,
            multi: None,
        };
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        'conn: loop {
            tokio::select! {
                biased;
                push = pushes.recv() => match push {
                    Some(bytes) => if wr.write_all(&bytes).await.is_err() { break },
                    None => break,
                },
                n = rd.read(&mut chunk) => {
                    let n = match n { Ok(0) | Err(_) => break, Ok(n) => n };
                    buf.extend_from_slice(&chunk[..n]);
                    loop {
                        match parse_request(&buf) {
                            Parsed::Incomplete if buf.len() > REQUEST_BYTES_MAX => break 'conn,
                            Parsed::Incomplete => break,
                            Parsed::Invalid => {
                                let _ = wr.write_all(b"-ERR Protocol error\r\n").await;
                                break 'conn;
                            }
                            Parsed::Request(args, used) => {
                                buf.drain(..used);
                                let reply = self.execute(&mut conn, args);
                                if wr.write_all(&reply).await.is_err() {
                                    break 'conn;
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut store = self.lock();
        store.subscribers.remove(&id);
        for subs in store.channels.values_mut() {
            subs.remove(&id);
        }
        store.channels.retain(|_, subs| !subs.is_empty());
    }

    fn execute(&self, conn: &mut Conn, args: Vec<Vec<u8>>) -> Vec<u8> {
        let Some(name) = args.first() else {
            return err("ERR empty command");
        };
        let name = name.to_ascii_uppercase();
        if let Some(queued) = &mut conn.multi
            && !matches!(name.as_slice(), b"EXEC" | b"DISCARD" | b"MULTI")
        {
            queued.push(args);
            return b"+QUEUED\r\n".to_vec();
        }
        let r = Reply { resp3: conn.resp3 };
        match name.as_slice() {
            b"MULTI" => {
                if conn.multi.is_some() {
                    return err("ERR MULTI calls can not be nested");
                }
                conn.multi = Some(Vec::new());
                ok()
            }
            b"DISCARD" => match conn.multi.take() {
                Some(_) => ok(),
                None => err("ERR DISCARD without MULTI"),
            },
            b"EXEC" => match conn.multi.take() {
                Some(queued) => {
                    let mut out = format!("*{}\r\n", queued.len()).into_bytes();
                    for args in queued {
                        out.extend(self.execute(conn, args));
                    }
                    out
                }
                None => err("ERR EXEC without MULTI"),
            },
            b"SUBSCRIBE" | b"UNSUBSCRIBE" => self.subscribe(conn, &name, &args[1..]),
            _ => self.command(conn, &r, &name, &args[1..]),
        }
    }

    fn subscribe(&self, conn: &Conn, name: &[u8], channels: &[Vec<u8>]) -> Vec<u8> {
        if channels.is_empty() {
            return err("ERR wrong number of arguments");
        }
        let mut store = self.lock();
        let mut out = Vec::new();
        for ch in channels {
            if name == b"SUBSCRIBE" {
                store
                    .channels
                    .entry(ch.clone())
                    .or_default()
                    .insert(conn.id);
            } else if let Some(subs) = store.channels.get_mut(ch) {
                subs.remove(&conn.id);
            }
            let count = store
                .channels
                .values()
                .filter(|s| s.contains(&conn.id))
                .count();
            out.extend(if conn.resp3 { b">3\r\n" } else { b"*3\r\n" });
            out.extend(bulk(&name.to_ascii_lowercase()));
            out.extend(bulk(ch));
            out.extend(int(count as i64));
        }
        store.channels.retain(|_, subs| !subs.is_empty());
        out
    }

    fn command(&self, conn: &mut Conn, r: &Reply, name: &[u8], a: &[Vec<u8>]) -> Vec<u8> {
        let arity = |n: usize| a.len() >= n;
        let mut store = self.lock();
        match name {
            b"HELLO" => {
                if a.first().map(|v| v.as_slice()) == Some(b"3") {
                    conn.resp3 = true;
                }
                let mut out = if conn.resp3 {
                    b"%3\r\n".to_vec()
                } else {
                    b"*6\r\n".to_vec()
                };
                for (k, v) in [("server", "redis"), ("version", "7.0.15")] {
                    out.extend(bulk(k.as_bytes()));
                    out.extend(bulk(v.as_bytes()));
                }
                out.extend(bulk(b"proto"));
                out.extend(int(if conn.resp3 { 3 } else { 2 }));
                out
            }
            b"PING" => b"+PONG\r\n".to_vec(),
            b"CLIENT" | b"SELECT" | b"AUTH" => ok(),
            b"GET" if arity(1) => match store.strings.get(&a[0]) {
                Some(v) => bulk(v),
                None => r.null(),
            },
            b"SET" if arity(2) => {
                let nx = a[2..].iter().any(|o| o.eq_ignore_ascii_case(b"NX"));
                if nx && store.strings.contains_key(&a[0]) {
                    return r.null();
                }
                store.strings.insert(a[0].clone(), a[1].clone());
                ok()
            }
            b"INCR" if arity(1) => {
                let v = store.strings.entry(a[0].clone()).or_insert(b"0".to_vec());
                match parse_i64(v).and_then(|n| n.checked_add(1)) {
                    Some(n) => {
                        *v = n.to_string().into_bytes();
                        int(n)
                    }
                    None => err("ERR value is not an integer or out of range"),
                }
            }
            b"SADD" | b"SREM" if arity(2) => {
                let set = store.sets.entry(a[0].clone()).or_default();
                let changed = a[1..]
                    .iter()
                    .filter(|m| {
                        if name == b"SADD" {
                            set.insert(m.to_vec())
                        } else {
                            set.remove(*m)
                        }
                    })
                    .count();
                store.sets.retain(|_, s| !s.is_empty());
                int(changed as i64)
            }
            b"SISMEMBER" if arity(2) => {
                int(store.sets.get(&a[0]).is_some_and(|s| s.contains(&a[1])) as i64)
            }
            b"ZADD" if arity(3) => {
                let mut added = 0;
                for pair in a[1..].chunks(2) {
                    let [score, member] = pair else {
                        return err("ERR syntax error");
                    };
                    let Some(score) = parse_f64(score) else {
                        return err("ERR value is not a valid float");
                    };
                    let z = store.zsets.entry(a[0].clone()).or_default();
                    if z.insert(member.clone(), score).is_none() {
                        added += 1;
                    }
                }
                int(added)
            }
            b"ZREM" if arity(2) => {
                let removed = store.zsets.get_mut(&a[0]).map_or(0, |z| {
                    a[1..].iter().filter(|m| z.remove(*m).is_some()).count()
                });
                store.zsets.retain(|_, z| !z.is_empty());
                int(removed as i64)
            }
            b"ZREMRANGEBYSCORE" if arity(3) => {
                let (Some(min), Some(max)) = (Bound::parse(&a[1]), Bound::parse(&a[2])) else {
                    return err("ERR min or max is not a float");
                };
                let removed = store.zsets.get_mut(&a[0]).map_or(0, |z| {
                    let before = z.len();
                    z.retain(|_, s| !(min.below(*s) && max.above(*s)));
                    before - z.len()
                });
                store.zsets.retain(|_, z| !z.is_empty());
                int(removed as i64)
            }
            b"ZRANGEBYSCORE" if arity(3) => {
                let (Some(min), Some(max)) = (Bound::parse(&a[1]), Bound::parse(&a[2])) else {
                    return err("ERR min or max is not a float");
                };
                let (mut offset, mut count) = (0usize, usize::MAX);
                if let Some(i) = a.iter().position(|o| o.eq_ignore_ascii_case(b"LIMIT")) {
                    let (Some(o), Some(c)) = (
                        a.get(i + 1).and_then(|v| parse_i64(v)),
                        a.get(i + 2).and_then(|v| parse_i64(v)),
                    ) else {
                        return err("ERR syntax error");
                    };
                    offset = usize::try_from(o).unwrap_or(usize::MAX);
                    count = usize::try_from(c).unwrap_or(usize::MAX);
                }
                let mut members: Vec<(f64, &Vec<u8>)> = store
                    .zsets
                    .get(&a[0])
                    .into_iter()
                    .flatten()
                    .filter(|(_, s)| min.below(**s) && max.above(**s))
                    .map(|(m, s)| (*s, m))
                    .collect();
                members.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(y.1)));
                let page: Vec<&Vec<u8>> = members
                    .into_iter()
                    .skip(offset)
                    .take(count)
                    .map(|(_, m)| m)
                    .collect();
                let mut out = format!("*{}\r\n", page.len()).into_bytes();
                for m in page {
                    out.extend(bulk(m));
                }
                out
            }
            b"PEXPIRE" | b"EXPIRE" if arity(2) => int(1),
            b"DEL" if arity(1) => {
                let mut n = 0;
                for k in a {
                    n += store.strings.remove(k).is_some() as i64
                        + store.sets.remove(k).is_some() as i64
                        + store.zsets.remove(k).is_some() as i64;
                }
                int(n)
            }
            b"PUBLISH" if arity(2) => {
                let subs: Vec<u64> = store
                    .channels
                    .get(&a[0])
                    .into_iter()
                    .flatten()
                    .copied()
                    .collect();
                let mut delivered = 0;
                for id in subs {
                    let Some(tx) = store.subscribers.get(&id) else {
                        continue;
                    };
                    // Only RESP3 connections subscribe (pushes on a multiplexed link).
                    let mut msg = b">3\r\n".to_vec();
                    msg.extend(bulk(b"message"));
                    msg.extend(bulk(&a[0]));
                    msg.extend(bulk(&a[1]));
                    if tx.try_send(msg).is_ok() {
                        delivered += 1;
                    }
                }
                int(delivered)
            }
            _ => err(&format!(
                "ERR unknown command or wrong arity '{}'",
                String::from_utf8_lossy(name)
            )),
        }
    }
}

struct Conn {
    id: u64,
    resp3: bool,
    /// Commands queued after MULTI.
    multi: Option<Vec<Vec<Vec<u8>>>>,
}

struct Reply {
    resp3: bool,
}

impl Reply {
    fn null(&self) -> Vec<u8> {
        if self.resp3 {
            b"_\r\n".to_vec()
        } else {
            b"$-1\r\n".to_vec()
        }
    }
}

fn ok() -> Vec<u8> {
    b"+OK\r\n".to_vec()
}

fn err(msg: &str) -> Vec<u8> {
    format!("-{msg}\r\n").into_bytes()
}

fn int(n: i64) -> Vec<u8> {
    format!(":{n}\r\n").into_bytes()
}

fn bulk(b: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", b.len()).into_bytes();
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
    out
}

fn parse_i64(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn parse_f64(b: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(b).ok()?;
    match s {
        "-inf" => Some(f64::NEG_INFINITY),
        "+inf" | "inf" => Some(f64::INFINITY),
        _ => s.parse::<f64>().ok().filter(|f| !f.is_nan()),
    }
}

/// One end of a score range: `x`, `(x` (exclusive), `-inf`, `+inf`.
#[derive(Clone, Copy)]
struct Bound {
    value: f64,
    exclusive: bool,
}

impl Bound {
    fn parse(b: &[u8]) -> Option<Bound> {
        match b.strip_prefix(b"(") {
            Some(rest) => Some(Bound {
                value: parse_f64(rest)?,
                exclusive: true,
            }),
            None => Some(Bound {
                value: parse_f64(b)?,
                exclusive: false,
            }),
        }
    }

    /// `self` as a minimum admits `s`.
    fn below(self, s: f64) -> bool {
        if self.exclusive {
            s > self.value
        } else {
            s >= self.value
        }
    }

    /// `self` as a maximum admits `s`.
    fn above(self, s: f64) -> bool {
        if self.exclusive {
            s < self.value
        } else {
            s <= self.value
        }
    }
}

enum Parsed {
    Incomplete,
    Invalid,
    /// The arguments and how many bytes they took.
    Request(Vec<Vec<u8>>, usize),
}

/// Parses one RESP array of bulk strings (all the redis crate sends).
fn parse_request(buf: &[u8]) -> Parsed {
    fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let rest = buf.get(at..)?;
        let end = rest.windows(2).position(|w| w == b"\r\n")?;
        Some((&rest[..end], at + end + 2))
    }
    let Some((head, mut at)) = line(buf, 0) else {
        return Parsed::Incomplete;
    };
    let Some(n) = head.strip_prefix(b"*").and_then(parse_i64) else {
        return Parsed::Invalid;
    };
    if !(0..=1024 * 1024).contains(&n) {
        return Parsed::Invalid;
    }
    let mut args = Vec::new();
    for _ in 0..n {
        let Some((head, next)) = line(buf, at) else {
            return Parsed::Incomplete;
        };
        let Some(len) = head
            .strip_prefix(b"$")
            .and_then(parse_i64)
            .and_then(|l| usize::try_from(l).ok())
        else {
            return Parsed::Invalid;
        };
        if len > REQUEST_BYTES_MAX {
            return Parsed::Invalid;
        }
        let Some(arg) = buf.get(next..next + len) else {
            return Parsed::Incomplete;
        };
        if buf.get(next + len..next + len + 2) != Some(b"\r\n") {
            return if buf.len() < next + len + 2 {
                Parsed::Incomplete
            } else {
                Parsed::Invalid
            };
        }
        args.push(arg.to_vec());
        at = next + len + 2;
    }
    Parsed::Request(args, at)
}
