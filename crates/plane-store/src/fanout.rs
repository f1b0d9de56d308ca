//! Fan-out between controllers that share one database: a controller's notices
//! (a status changed, a drone has work, a token was revoked…) reach every controller,
//! each of which acts on them for the drones, proxies and streams connected to it.
//!
//! This module is the transport only (PostgreSQL `NOTIFY`/`LISTEN` on one channel);
//! the controller decides what a payload means. Notices are hints: the store holds the
//! truth, so a listener that lost its connection reconnects and then re-reads what its
//! connections depend on (the controller's *resync*), instead of replaying a log.
//!
//! SQLite has no fan-out: one controller owns a SQLite file.

use crate::postgres::PostgresStore;
use crate::StoreResult;
use async_trait::async_trait;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use std::sync::Arc;
use std::time::Duration;

/// The channel every controller listens on.
pub const CHANNEL: &str = "plane_events";

/// The largest payload PostgreSQL accepts is 8000 bytes; longer ones are refused by
/// [`Fanout::notify`] before they reach the server (the caller drops or shortens them).
pub const MAX_PAYLOAD: usize = 7900;

/// A shared fan-out handle.
pub type SharedFanout = Arc<dyn Fanout>;

/// Sends notices to every controller sharing the store, this one included.
#[async_trait]
pub trait Fanout: Send + Sync + 'static {
    /// Sends `payloads`, in order, in one round trip. A listener connected throughout
    /// receives them in that order, after everything this sender sent before.
    async fn notify(&self, payloads: &[String]) -> StoreResult<()>;

    /// Opens a listener on [`CHANNEL`]. Notices sent before it returns may be missed.
    async fn listen(&self) -> StoreResult<Box<dyn FanoutListener>>;
}

/// Receives notices.
#[async_trait]
pub trait FanoutListener: Send {
    /// The next payload. An error means the connection failed and notices may have
    /// been missed: open a new listener, then resync.
    async fn recv(&mut self) -> StoreResult<String>;
}

/// Fan-out through the PostgreSQL store's database.
pub struct PgFanout {
    /// Sends go through the store's pool, each bounded like any store call.
    store: PostgresStore,
    /// Listeners get a connection of their own, outside the store's pool.
    listen: PgPool,
}

impl PgFanout {
    /// Fan-out on `store`'s database.
    pub fn new(store: &PostgresStore) -> PgFanout {
        let listen = PgPoolOptions::new()
            .max_connections(2)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(store.connect.clone().application_name("plane-controller-listener"));
        PgFanout {
            store: store.clone(),
            listen,
        }
    }
}

#[async_trait]
impl Fanout for PgFanout {
    async fn notify(&self, payloads: &[String]) -> StoreResult<()> {
        if let Some(p) = payloads.iter().find(|p| p.len() > MAX_PAYLOAD) {
            return Err(crate::StoreError::Database(format!(
                "a notice of {} bytes is over the {MAX_PAYLOAD}-byte limit",
                p.len()
            )));
        }
        if payloads.is_empty() {
            return Ok(());
        }
        self.store
            .bounded("notify", async {
                // WITH ORDINALITY keeps the array's order.
                sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, i) ORDER BY i")
                    .bind(CHANNEL)
                    .bind(payloads)
                    .execute(&self.store.pool)
                    .await?;
                Ok(())
            })
            .await
    }

    async fn listen(&self) -> StoreResult<Box<dyn FanoutListener>> {
        self.store
            .bounded("listen", async {
                let mut listener = PgListener::connect_with(&self.listen).await?;
                // Reconnection is the caller's job (it must resync after), so a lost
                // connection must surface as an error rather than be mended silently.
                listener.eager_reconnect(false);
                listener.listen(CHANNEL).await?;
                Ok(Box::new(PgFanoutListener { listener }) as Box<dyn FanoutListener>)
            })
            .await
    }
}

struct PgFanoutListener {
    listener: PgListener,
}

#[async_trait]
impl FanoutListener for PgFanoutListener {
    async fn recv(&mut self) -> StoreResult<String> {
        match self.listener.try_recv().await? {
            Some(n) => Ok(n.payload().to_owned()),
            None => Err(crate::StoreError::Database(
                "the listener's connection to PostgreSQL was lost".into(),
            )),
        }
    }
}
