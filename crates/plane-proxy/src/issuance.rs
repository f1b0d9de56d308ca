//! Certificate issuance steps sent to the controller over the proxy socket: the
//! cluster's issuance lease and its `_acme-challenge` TXT values
//! ([`IssuanceOp`]). Each request carries an id and waits for the `IssuanceReply` with
//! that id; a request fails at once when the socket is down, and fails when the socket
//! drops before the reply comes, so the ACME manager retries instead of hanging.

use crate::routes::Outbox;
use plane_types::protocol::{IssuanceOp, ProxyToController};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;

/// The longest wait for the controller's reply to one step.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

type Reply = Result<bool, String>;

/// Issuance requests in flight, and the socket to send them on.
#[derive(Default)]
pub(crate) struct IssuanceClient {
    state: Mutex<State>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Present while the controller socket is up (after `Welcome`).
    outbox: Option<Outbox>,
    pending: HashMap<u64, oneshot::Sender<Reply>>,
}

impl IssuanceClient {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The socket is up.
    pub(crate) fn connected(&self, outbox: Outbox) {
        self.lock().outbox = Some(outbox);
    }

    /// The socket is down: every request in flight fails (its reply may never come).
    pub(crate) fn disconnected(&self) {
        let mut st = self.lock();
        st.outbox = None;
        for (_, tx) in st.pending.drain() {
            let _ = tx.send(Err("the connection to the controller was lost".into()));
        }
    }

    /// Applies an `IssuanceReply`.
    pub(crate) fn handle_reply(&self, request_id: u64, ok: bool, error: Option<String>) {
        if let Some(tx) = self.lock().pending.remove(&request_id) {
            let _ = tx.send(error.map_or(Ok(ok), Err));
        }
    }

    /// Sends one step and waits for its reply: the controller's `ok` (see [`IssuanceOp`]).
    pub(crate) async fn request(&self, op: IssuanceOp) -> anyhow::Result<bool> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let rx = {
            let mut st = self.lock();
            let Some(outbox) = st.outbox.as_ref() else {
                anyhow::bail!("not connected to the controller");
            };
            if outbox.send(ProxyToController::Issuance { request_id, op }).is_err() {
                st.outbox = None;
                anyhow::bail!("not connected to the controller");
            }
            let (tx, rx) = oneshot::channel();
            st.pending.insert(request_id, tx);
            rx
        };
        let reply = tokio::time::timeout(REPLY_TIMEOUT, rx).await;
        self.lock().pending.remove(&request_id);
        match reply {
            Ok(Ok(Ok(ok))) => Ok(ok),
            Ok(Ok(Err(e))) => anyhow::bail!("the controller could not do it: {e}"),
            Ok(Err(_)) => anyhow::bail!("the connection to the controller was lost"),
            Err(_) => anyhow::bail!("the controller did not answer within {REPLY_TIMEOUT:?}"),
        }
    }
}

/// The cluster's issuance lease, held through the controller connection.
pub(crate) struct ControllerLease(pub(crate) Arc<crate::Shared>);

#[async_trait::async_trait]
impl crate::acme::IssuanceLease for ControllerLease {
    async fn acquire(&self) -> anyhow::Result<bool> {
        self.0.issuance.request(IssuanceOp::Acquire).await
    }

    async fn set_txt(&self, values: Vec<String>) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.0.issuance.request(IssuanceOp::SetTxt { values }).await?,
            "this proxy no longer holds the cluster's issuance lease"
        );
        Ok(())
    }

    async fn release(&self) -> anyhow::Result<()> {
        self.0.issuance.request(IssuanceOp::Release).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    #[tokio::test]
    async fn requests_get_their_own_reply_and_fail_when_the_socket_drops() {
        let client = Arc::new(IssuanceClient::default());
        assert!(client.request(IssuanceOp::Acquire).await.is_err(), "no socket yet");
        let (tx, mut rx) = mpsc::unbounded_channel();
        client.connected(tx);

        let (c1, c2) = (client.clone(), client.clone());
        let first = tokio::spawn(async move { c1.request(IssuanceOp::Acquire).await });
        let second = tokio::spawn(async move { c2.request(IssuanceOp::Release).await });
        let mut ids = HashMap::new();
        for _ in 0..2 {
            match rx.recv().await.unwrap() {
                ProxyToController::Issuance { request_id, op } => ids.insert(op, request_id),
                other => panic!("unexpected {other:?}"),
            };
        }
        // Replies may come in any order; each reaches its own request.
        client.handle_reply(ids[&IssuanceOp::Release], true, None);
        client.handle_reply(ids[&IssuanceOp::Acquire], false, None);
        assert!(!first.await.unwrap().unwrap());
        assert!(second.await.unwrap().unwrap());

        // A store error is an error; so is a drop before the reply.
        let c = client.clone();
        let failing = tokio::spawn(async move { c.request(IssuanceOp::Acquire).await });
        let Some(ProxyToController::Issuance { request_id, .. }) = rx.recv().await else {
            panic!()
        };
        client.handle_reply(request_id, false, Some("disk full".into()));
        let err = failing.await.unwrap().unwrap_err().to_string();
        assert!(err.contains("disk full"), "{err}");
        let c = client.clone();
        let dropped = tokio::spawn(async move { c.request(IssuanceOp::Acquire).await });
        rx.recv().await.unwrap();
        client.disconnected();
        assert!(dropped.await.unwrap().is_err());
        assert!(client.lock().pending.is_empty());
    }
}
