//! Hostile or careless identities cannot grow Redis without bound, and
//! "sent" means what it says for careless clients too. Each guard test
//! runs its check with the fix and with the historical bug switched back
//! on, and requires the first to hold and the second to fail.

use im_client::{Client, ClientError, Event};
use im_proto::UserId;
use im_proto::pb::ErrorCode;
use im_server::{Bug, Profile};
use redis::AsyncCommands;

use crate::hardened::{SECRET, login, now_s, options};
use crate::support::{Node, next, redis_conn};

async fn node_with(test: &str, bugs: &[Bug]) -> Node {
    let bugs: std::collections::BTreeSet<Bug> = bugs.iter().copied().collect();
    Node::start_with(Profile::Hardened, test, |c| {
        c.auth_secret = Some(SECRET.to_vec());
        c.bugs = bugs;
    })
    .await
}

/// The answer to a send: (accepted, code, reason).
async fn answer(client: &mut Client, to: u64, text: &str, id: u64) -> (bool, i32, String) {
    client.send(UserId(to), text, id).await.unwrap();
    loop {
        match next(client).await {
            Event::SendResult {
                client_msg_id,
                accepted,
                reason,
                code,
                ..
            } if client_msg_id == id => return (accepted, code, reason),
            Event::Closed(cause) => panic!("closed while waiting for an answer: {cause:?}"),
            _ => {}
        }
    }
}

/// Keys in Redis under `prefix` whose name contains `part`.
async fn keys(prefix: &str, part: &str) -> Vec<String> {
    let mut con = redis_conn().await;
    let all: Vec<String> = con.keys(format!("{prefix}*")).await.unwrap();
    all.into_iter().filter(|k| k.contains(part)).collect()
}

/// A send to an id nobody ever logged in as is refused (UNKNOWN_RECIPIENT)
/// and leaves no key; a send to a real user leaves keys that expire.
async fn made_up_recipients(test: &str, bugs: &[Bug]) -> Result<(), String> {
    let node = node_with(test, bugs).await;
    let prefix = node.key_prefix.clone();
    let mut a = login(&node, 1001).await;
    let nobody = 987_654_321_001u64;
    let (accepted, code, reason) = answer(&mut a, nobody, "hello?", 1).await;
    let left = keys(&prefix, &format!("{{u:{nobody}}}")).await;
    let mut problems = Vec::new();
    if accepted || code != ErrorCode::UnknownRecipient as i32 {
        problems.push(format!(
            "a send to a made-up id was answered accepted={accepted} code={code} ({reason})"
        ));
    }
    if !left.is_empty() {
        problems.push(format!("a made-up recipient left keys: {left:?}"));
    }
    let b = login(&node, 1002).await;
    let (accepted, _, reason) = answer(&mut a, 1002, "real", 2).await;
    assert!(accepted, "a send to a real user: {reason}");
    let mut con = redis_conn().await;
    for k in ["inbox", "seq", "user"] {
        let key = format!("{prefix}im:{{u:1002}}:{k}");
        let ttl: i64 = con.pttl(&key).await.unwrap();
        if ttl <= 0 {
            problems.push(format!("{key} never expires (PTTL {ttl})"));
        }
    }
    drop(b);
    node.stop().await;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[tokio::test]
async fn sends_to_made_up_recipients_store_nothing() {
    made_up_recipients("hostile_made_up", &[])
        .await
        .expect("the fix");
    let with_bug = made_up_recipients("hostile_made_up_bug", &[Bug::UnknownRecipientsStored]).await;
    assert!(
        with_bug.is_err(),
        "with unknown_recipients_stored the check must fail"
    );
}

/// A device id over 64 bytes is refused with LIMIT and 1008.
async fn long_device_id(test: &str, bugs: &[Bug]) -> Result<(), String> {
    let node = node_with(test, bugs).await;
    let device = "d".repeat(60_000);
    let outcome = Client::connect(options(&node, 1001, SECRET, &device)).await;
    let result = match outcome {
        Err(ClientError::LoginRefused(why)) if why.contains("device id") => Ok(()),
        Err(other) => Err(format!("refused, but not for the device id: {other}")),
        Ok(_) => Err("a 60 KB device id logged in".to_owned()),
    };
    // A device id at the limit is fine.
    let ok = Client::connect(options(&node, 1001, SECRET, &"d".repeat(64))).await;
    assert!(ok.is_ok(), "a 64-byte device id must log in");
    node.stop().await;
    result
}

#[tokio::test]
async fn a_long_device_id_is_refused() {
    long_device_id("hostile_device", &[])
        .await
        .expect("the fix");
    assert!(
        long_device_id("hostile_device_bug", &[Bug::UnlimitedStrings])
            .await
            .is_err(),
        "with unlimited_strings the check must fail"
    );
}

#[tokio::test]
async fn a_text_over_the_limit_is_refused_and_one_at_it_is_sent() {
    let node = node_with("hostile_text", &[]).await;
    let mut a = login(&node, 1001).await;
    let _b = login(&node, 1002).await;
    let (accepted, code, reason) = answer(&mut a, 1002, &"x".repeat(4097), 1).await;
    assert!(!accepted, "4097 bytes accepted");
    assert_eq!(code, ErrorCode::Limit as i32, "{reason}");
    let (accepted, _, reason) = answer(&mut a, 1002, &"x".repeat(4096), 2).await;
    assert!(accepted, "4096 bytes refused: {reason}");
    node.stop().await;
}

/// Tokens in a non-canonical form (`+ID`, `000ID`, an uppercase
/// signature) are refused.
async fn canonical_tokens(test: &str, bugs: &[Bug]) -> Result<(), String> {
    let node = node_with(test, bugs).await;
    let canonical = im_proto::token::mint(SECRET, UserId(1001), now_s() + 3600);
    let (payload, sig) = canonical.rsplit_once('.').unwrap();
    let resign = |payload: &str| {
        // What a lax signer might have signed: the same user, another form.
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET).unwrap();
        mac.update(payload.as_bytes());
        format!("{payload}.{}", hex::encode(mac.finalize().into_bytes()))
    };
    let expires = payload.rsplit('.').next().unwrap();
    let variants = [
        resign(&format!("v1.+1001.{expires}")),
        resign(&format!("v1.0001001.{expires}")),
        format!("{payload}.{}", sig.to_uppercase()),
    ];
    let mut logged_in = Vec::new();
    for token in variants {
        let mut o = options(&node, 1001, SECRET, "d1");
        o.token = token.clone();
        if Client::connect(o).await.is_ok() {
            logged_in.push(token);
        }
    }
    node.stop().await;
    if logged_in.is_empty() {
        Ok(())
    } else {
        Err(format!("non-canonical tokens logged in: {logged_in:?}"))
    }
}

#[tokio::test]
async fn only_the_canonical_token_logs_in() {
    canonical_tokens("hostile_token", &[])
        .await
        .expect("the fix");
    assert!(
        canonical_tokens("hostile_token_bug", &[Bug::LenientTokens])
            .await
            .is_err(),
        "with lenient_tokens the check must fail"
    );
}

/// A reused client message id: the same text again is a retry (accepted,
/// stored once, the first sequence); another text is refused
/// (DUPLICATE_ID); id 0 is refused (PROTOCOL).
#[tokio::test]
async fn a_reused_message_id_is_a_retry_only_with_the_same_text() {
    let node = node_with("hostile_reused_id", &[]).await;
    let mut a = login(&node, 1001).await;
    let mut b = login(&node, 1002).await;
    let (accepted, _, reason) = answer(&mut a, 1002, "first", 5).await;
    assert!(accepted, "{reason}");
    let (accepted, _, reason) = answer(&mut a, 1002, "first", 5).await;
    assert!(
        accepted,
        "a true retry is answered as the original: {reason}"
    );
    let (accepted, code, reason) = answer(&mut a, 1002, "another text", 5).await;
    assert!(!accepted, "a reused id for another text was accepted");
    assert_eq!(code, ErrorCode::DuplicateId as i32, "{reason}");
    let (accepted, code, reason) = answer(&mut a, 1002, "no id", 0).await;
    assert!(!accepted, "id 0 was accepted");
    assert_eq!(code, ErrorCode::Protocol as i32, "{reason}");
    // 1002 got "first" exactly once.
    let (accepted, _, _) = answer(&mut a, 1002, "marker", 6).await;
    assert!(accepted);
    let mut got = Vec::new();
    while got.last().map(String::as_str) != Some("marker") {
        if let Event::Delivered { text, .. } = next(&mut b).await {
            got.push(text);
        }
    }
    assert_eq!(got, ["first", "marker"]);
    node.stop().await;
}
