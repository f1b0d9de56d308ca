//! A TCP relay the harness puts between a drone and a controller, to cut them apart.
//!
//! A cut behaves like a network partition, not like a closed port: open connections
//! stop carrying bytes but stay open (nobody gets a FIN or a reset), and new
//! connections are accepted and then hear nothing. When the cut heals, those silent
//! connections are closed, so each side notices and reconnects, and new connections
//! are forwarded again.

use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A relay listening on loopback.
pub struct Relay {
    /// Where it listens.
    pub addr: SocketAddr,
    up: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Starts a relay to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a relay");
        let addr = listener.local_addr().expect("relay address");
        let (up, _) = watch::channel(true);
        let task = tokio::spawn(accept(listener, target, up.clone()));
        Relay { addr, up, task }
    }

    /// Partitions the two sides.
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    /// Ends the partition.
    pub fn heal(&self) {
        self.up.send_replace(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, up: watch::Sender<bool>) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        let _ = inbound.set_nodelay(true);
        tokio::spawn(relay(inbound, target, up.subscribe()));
    }
}

async fn relay(mut inbound: TcpStream, target: SocketAddr, mut up: watch::Receiver<bool>) {
    if *up.borrow_and_update() {
        let Ok(mut outbound) = TcpStream::connect(target).await else {
            return;
        };
        let _ = outbound.set_nodelay(true);
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
            _ = up.wait_for(|up| !*up) => {}
        }
        // Cut: both sockets stay open and silent until the heal.
        let _ = up.wait_for(|up| *up).await;
        drop(outbound);
    } else {
        let _ = up.wait_for(|up| *up).await;
    }
    drop(inbound);
}
