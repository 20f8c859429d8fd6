//! The imsim wire protocol.
//!
//! - [`pb`]: the types generated from `im.proto` by prost (via protox, so no
//!   system `protoc` is needed). `im.proto` is the source of truth.
//! - [`decode`] / [`encode`]: one [`pb::Envelope`] per Binary WebSocket frame.
//!   Decoding rejects an Envelope without a body, so every layer above can
//!   match on a concrete message.
//! - [`UserId`], [`ConnId`], [`Seq`]: newtypes for the identities that travel
//!   in messages, so they are never swapped by accident.
//! - [`WS_PATH`]: the endpoint path.

use bytes::Bytes;
use prost::Message as _;

/// Generated protobuf types (`package im`).
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/im.rs"));
}

pub mod token;

pub use pb::envelope::Body;

/// WebSocket close codes of the hardened profile (4000-4999 are for
/// applications).
pub mod close_code {
    /// A newer connection of the same device took over; do not reconnect.
    pub const SUPERSEDED: u16 = 4001;
    /// The connection's outbound queue overflowed (a slow consumer).
    pub const SLOW_CONSUMER: u16 = 4002;
    /// Nothing was heard for the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 4003;
}

/// The WebSocket endpoint path.
pub const WS_PATH: &str = "/ws";

/// Why a frame is not a valid [`pb::Envelope`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("undecodable protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("envelope has no body")]
    NoBody,
}

/// Decodes one Binary frame's payload into a body.
pub fn decode(payload: &[u8]) -> Result<Body, DecodeError> {
    pb::Envelope::decode(payload)?
        .body
        .ok_or(DecodeError::NoBody)
}

/// Encodes one body as the payload of a Binary frame.
pub fn encode(body: Body) -> Bytes {
    pb::Envelope { body: Some(body) }.encode_to_vec().into()
}

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = std::num::ParseIntError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map($name)
            }
        }
    };
}

id_newtype!(
    /// A user, as the seed's `userID` (e.g. 1001). 0 is never a valid user.
    UserId
);
id_newtype!(
    /// One WebSocket connection on one server node, unique for the node's run.
    ConnId
);
id_newtype!(
    /// A position in one recipient's inbox (hardened profile).
    Seq
);

/// Convenience constructors, so callers don't spell out prost's nesting.
pub mod msg {
    use super::{Body, pb};

    pub fn login(user_id: u64) -> Body {
        Body::Login(pb::Login {
            user_id,
            ..Default::default()
        })
    }

    pub fn send(to_user_id: u64, text: impl Into<String>, client_msg_id: u64) -> Body {
        Body::Send(pb::Send {
            to_user_id,
            text: text.into(),
            client_msg_id,
        })
    }

    pub fn error(code: pb::ErrorCode, detail: impl Into<String>) -> Body {
        Body::Error(pb::Error {
            code: code as i32,
            detail: detail.into(),
        })
    }

    pub fn accepted(client_msg_id: u64, seq: u64) -> Body {
        Body::SendResult(pb::SendResult {
            client_msg_id,
            status: pb::SendStatus::Accepted as i32,
            seq,
            ..Default::default()
        })
    }

    /// A final refusal: the client must not send this message again.
    pub fn rejected(client_msg_id: u64, code: pb::ErrorCode, reason: impl Into<String>) -> Body {
        Body::SendResult(pb::SendResult {
            client_msg_id,
            status: pb::SendStatus::Rejected as i32,
            reason: reason.into(),
            code: code as i32,
            ..Default::default()
        })
    }

    /// A temporary refusal: send the same message (same id) again after
    /// `retry_after`.
    pub fn retry_later(
        client_msg_id: u64,
        code: pb::ErrorCode,
        reason: impl Into<String>,
        retry_after: std::time::Duration,
    ) -> Body {
        Body::SendResult(pb::SendResult {
            client_msg_id,
            status: pb::SendStatus::Rejected as i32,
            reason: reason.into(),
            code: code as i32,
            retry_after_ms: retry_after.as_millis().clamp(1, u32::MAX as u128) as u32,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_through_bytes() {
        let body = msg::send(1002, "hi", 7);
        assert_eq!(decode(&encode(body.clone())).unwrap(), body);
    }

    #[test]
    fn empty_payload_is_an_envelope_without_body() {
        // A Ping frame's empty payload is valid protobuf for an empty
        // Envelope; the legacy client's failure mode depends on this.
        assert!(matches!(decode(&[]), Err(DecodeError::NoBody)));
    }

    #[test]
    fn garbage_is_undecodable() {
        assert!(matches!(
            decode(&[0xff, 0xff, 0xff]),
            Err(DecodeError::Protobuf(_))
        ));
    }

    #[test]
    fn wire_bytes_are_stable() {
        // Field numbers are the contract with other implementations.
        let bytes = encode(msg::send(1002, "hi", 7));
        assert_eq!(
            bytes.as_ref(),
            [
                0x1a, 0x09, 0x08, 0xea, 0x07, 0x12, 0x02, b'h', b'i', 0x18, 0x07
            ]
        );
    }
}
