//! The hardened inbox in Redis: how a message is stored, and how a stored
//! entry reads back.
//!
//! A user's inbox is the sorted set `im:{u:ID}:inbox`, scored by sequence
//! number; each member is `<seq>:<Envelope(Deliver)>`, the decimal sequence
//! number, a colon, then the encoded envelope whose `Deliver.seq` is left 0
//! (the number is only known inside Redis). [`entry`] puts the two together.
//!
//! [`crate::scripts::STORE`] stores a message in one atomic step: the
//! dedup lookup, the recipient check, the backlog limit, a fresh sequence
//! number, the inbox entry, the trim and the dedup record. Numbering and
//! inserting together is what keeps the inbox in sequence order at every
//! instant: a reader that has seen number `n` can never later find a
//! smaller number appear (two sessions storing for one user used to take
//! numbers in one round trip and insert in the next, and a pump that read
//! between them skipped the late one forever; the `seq_taken_before_store`
//! bug switch brings that back).

use im_proto::pb;
use im_proto::{Body, DecodeError};
use prost::Message as _;

/// The inbox member for `envelope` (a Deliver whose seq is 0) at `seq`:
/// what [`crate::scripts::STORE`] writes.
pub fn member(seq: u64, envelope: &[u8]) -> Vec<u8> {
    let mut out = format!("{seq}:").into_bytes();
    out.extend_from_slice(envelope);
    out
}

/// Why a stored inbox member did not read back.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("inbox entry has no `<seq>:` prefix")]
    NoSeq,
    #[error("inbox entry is not an encoded envelope: {0}")]
    Decode(#[from] DecodeError),
    #[error("inbox entry holds something other than a Deliver")]
    NotDeliver,
}

/// The sequence number of an inbox member, and where its envelope starts.
fn split(member: &[u8]) -> Result<(u64, &[u8]), EntryError> {
    let colon = member
        .iter()
        .position(|&b| b == b':')
        .ok_or(EntryError::NoSeq)?;
    let seq = std::str::from_utf8(&member[..colon])
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or(EntryError::NoSeq)?;
    Ok((seq, &member[colon + 1..]))
}

/// The sequence number of an inbox member, without decoding it.
pub fn entry_seq(member: &[u8]) -> Result<u64, EntryError> {
    split(member).map(|(seq, _)| seq)
}

/// Reads an inbox member back: the Deliver with its sequence number set.
pub fn entry(member: &[u8]) -> Result<pb::Deliver, EntryError> {
    let (seq, envelope) = split(member)?;
    match im_proto::decode(envelope)? {
        Body::Deliver(mut d) => {
            d.seq = seq;
            Ok(d)
        }
        _ => Err(EntryError::NotDeliver),
    }
}

/// The frame a pump pushes for a stored Deliver.
pub fn frame(deliver: pb::Deliver) -> Vec<u8> {
    pb::Envelope {
        body: Some(Body::Deliver(deliver)),
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_reads_back_with_its_sequence_number() {
        let d = pb::Deliver {
            from_user_id: 7,
            text: "hi: there".into(),
            client_msg_id: 3,
            seq: 0,
        };
        let m = member(1_700_000_000_000_042, &frame(d.clone()));
        assert!(m.starts_with(b"1700000000000042:"));
        let back = entry(&m).unwrap();
        assert_eq!(back.seq, 1_700_000_000_000_042);
        assert_eq!(back.text, d.text);
        assert_eq!(back.from_user_id, 7);
    }

    #[test]
    fn a_member_without_a_numeric_prefix_is_refused() {
        assert!(matches!(entry(b"abc:xyz"), Err(EntryError::NoSeq)));
        assert!(matches!(entry(b"12345"), Err(EntryError::NoSeq)));
    }
}
