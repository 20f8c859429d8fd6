//! Live tests: the real server on real loopback sockets with a real
//! `redis-server` (started per test binary on a free port, or `REDIS_URL`).
//!
//! Modules:
//! - `support`: start a server node, connect clients, wait for events.
//! - `seed_checklist`: the post-mortem's success criteria against phase 3,
//!   and phase 1's known bug.
//! - `hardened`: tokens, supersede, offline inbox, hostile acks and resumes.
//! - `bad_input`: every kind of malformed input gets its error or close
//!   code, and other connections are not hurt.
//! - `hostile`: made-up recipients, long device ids, non-canonical tokens,
//!   reused message ids (each with its bug switch shown to break it).
//! - `signals`: the real binary drains on SIGTERM and SIGINT.
//! - `memory`: an idle connection stays small after large frames.

mod bad_input;
mod hardened;
mod hostile;
mod memory;
mod seed_checklist;
mod signals;
mod support;
