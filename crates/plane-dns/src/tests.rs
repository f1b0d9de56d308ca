//! Coalescing through real sockets: 20 concurrent queries for one cluster make one
//! source call. (The other socket tests use only the public API, in `tests/dns.rs`.)

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_server::net::client::{Client, ClientHandle};
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::net::udp::UdpClientStream;
use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::{DNSClass, Name, RData, RecordType};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::{handler::Handler, DnsConfig, TxtSource};

/// Counts calls; each waits for a permit of `release`.
struct Gate {
    calls: AtomicUsize,
    release: Semaphore,
}

#[async_trait::async_trait]
impl TxtSource for Gate {
    async fn txt_values(&self, cluster: &str) -> anyhow::Result<Vec<String>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.release.acquire().await?.forget();
        Ok(vec![format!("{cluster}-1"), format!("{cluster}-2")])
    }
}

#[tokio::test]
async fn concurrent_queries_share_one_source_call() {
    let source = Arc::new(Gate {
        calls: AtomicUsize::new(0),
        release: Semaphore::new(0),
    });
    let mut config = DnsConfig::new("plane.test");
    config.source_timeout = Duration::from_secs(30);
    let handler = Handler::new(&config, source.clone()).unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = udp.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(crate::serve(udp, tcp, handler.clone(), shutdown.clone()));

    let stream = UdpClientStream::builder(addr, TokioRuntimeProvider::new())
        .with_timeout(Some(Duration::from_secs(30)))
        // One datagram per query (no retransmission), so exactly 20 queries join.
        .with_max_retries(1)
        .build();
    let (client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
    let background = tokio::spawn(background);

    let name = Name::from_ascii("_acme-challenge.c1.plane.test.").unwrap();
    let queries: Vec<_> = (0..20)
        .map(|_| {
            let mut client = client.clone();
            let name = name.clone();
            tokio::spawn(async move { client.query(name, DNSClass::IN, RecordType::TXT).await })
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(20);
    while handler.inflight().joined("c1.plane.test") != Some(20) {
        assert!(
            Instant::now() < deadline,
            "joined: {:?}",
            handler.inflight().joined("c1.plane.test")
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    source.release.add_permits(1);

    for query in queries {
        let response = query.await.unwrap().unwrap();
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        let mut values: Vec<_> = response
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::TXT(txt) => txt.txt_data.concat(),
                other => panic!("{other:?}"),
            })
            .collect();
        values.sort();
        assert_eq!(values, [b"c1.plane.test-1".to_vec(), b"c1.plane.test-2".to_vec()]);
    }
    assert_eq!(source.calls.load(Ordering::SeqCst), 1);

    shutdown.cancel();
    server.await.unwrap().unwrap();
    drop(client);
    background.abort();
}
