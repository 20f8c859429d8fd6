//! Presence in Redis, as the seed kept it: one set `online_users` of user
//! ids, "who is online across services".

use im_proto::UserId;

use crate::metrics;
use crate::redis_link::{RedisError, RedisLink};

/// The seed's `online_users` set.
pub struct SeedPresence<'a> {
    pub redis: &'a RedisLink,
    pub key: &'a str,
}

impl SeedPresence<'_> {
    /// `SADD online_users user`.
    pub async fn add(&self, user: UserId) -> Result<(), RedisError> {
        let r = self
            .redis
            .query::<i64>(redis::cmd("SADD").arg(self.key).arg(user.0))
            .await;
        metrics::presence_write("sadd", r.is_ok());
        r.map(drop)
    }

    /// `SREM online_users user`.
    pub async fn remove(&self, user: UserId) -> Result<(), RedisError> {
        let r = self
            .redis
            .query::<i64>(redis::cmd("SREM").arg(self.key).arg(user.0))
            .await;
        metrics::presence_write("srem", r.is_ok());
        r.map(drop)
    }

    /// `SISMEMBER online_users user`.
    pub async fn is_online(&self, user: UserId) -> Result<bool, RedisError> {
        self.redis
            .query(redis::cmd("SISMEMBER").arg(self.key).arg(user.0))
            .await
    }
}
