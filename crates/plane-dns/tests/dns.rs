//! The DNS server through its public API: a real server on loopback sockets, queried by
//! hickory's DNS client over UDP and TCP, with an in-memory `TxtSource`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::net::client::{Client, ClientHandle};
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::net::tcp::TcpClientStream;
use hickory_server::net::udp::UdpClientStream;
use hickory_server::proto::op::{DnsResponse, Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::{DNSClass, Name, RData, RecordType};
use plane_dns::{DnsConfig, TxtSource};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Values per cluster, and the clusters asked for, in order.
#[derive(Default)]
struct MapSource {
    values: Mutex<HashMap<String, Vec<String>>>,
    asked: Mutex<Vec<String>>,
}

impl MapSource {
    fn with(entries: &[(&str, &[&str])]) -> Arc<Self> {
        let source = MapSource::default();
        for (cluster, values) in entries {
            source
                .values
                .lock()
                .unwrap()
                .insert(cluster.to_string(), values.iter().map(|v| v.to_string()).collect());
        }
        Arc::new(source)
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl TxtSource for MapSource {
    async fn txt_values(&self, cluster: &str) -> anyhow::Result<Vec<String>> {
        self.asked.lock().unwrap().push(cluster.to_owned());
        Ok(self.values.lock().unwrap().get(cluster).cloned().unwrap_or_default())
    }
}

/// Fails every call, or never answers.
struct BadSource {
    hang: bool,
    calls: AtomicUsize,
}

#[async_trait::async_trait]
impl TxtSource for BadSource {
    async fn txt_values(&self, _cluster: &str) -> anyhow::Result<Vec<String>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.hang {
            std::future::pending::<()>().await;
        }
        anyhow::bail!("the controller is down")
    }
}

struct TestServer {
    udp: SocketAddr,
    tcp: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    async fn start(config: DnsConfig, source: Arc<dyn TxtSource>) -> Self {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(plane_dns::run(udp, tcp, config, source, shutdown.clone()));
        TestServer {
            udp: udp_addr,
            tcp: tcp_addr,
            shutdown,
            task,
        }
    }

    /// Stops the server and checks that it stopped cleanly.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }

    async fn udp(&self) -> Dns {
        Dns::udp(self.udp).await
    }

    async fn tcp(&self) -> Dns {
        Dns::tcp(self.tcp).await
    }
}

/// A DNS client and its background task.
struct Dns {
    client: Client<TokioRuntimeProvider>,
    background: JoinHandle<()>,
}

impl Dns {
    async fn udp(addr: SocketAddr) -> Self {
        let stream = UdpClientStream::builder(addr, TokioRuntimeProvider::new())
            .with_timeout(Some(Duration::from_secs(10)))
            // One datagram per query: the source sees each query once.
            .with_max_retries(1)
            .build();
        let (client, background) = Client::from_sender(stream);
        Dns::spawn(client, background)
    }

    async fn tcp(addr: SocketAddr) -> Self {
        let (connect, handle) =
            TcpClientStream::new(addr, None, Some(Duration::from_secs(10)), TokioRuntimeProvider::new());
        let (client, background) = Client::with_timeout(connect.await.unwrap(), handle, Duration::from_secs(10));
        Dns::spawn(client, background)
    }

    fn spawn<B>(client: Client<TokioRuntimeProvider>, background: B) -> Self
    where
        B: std::future::Future + Send + 'static,
        B::Output: Send,
    {
        let background = tokio::spawn(async move {
            let _ = background.await;
        });
        Dns { client, background }
    }

    async fn query(&mut self, name: &str, qtype: RecordType) -> DnsResponse {
        let name = Name::from_ascii(name).unwrap();
        self.client.query(name, DNSClass::IN, qtype).await.unwrap()
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.background.abort();
    }
}

/// The TXT values of the answers (each record's character-strings joined), sorted.
fn txt_values(response: &DnsResponse) -> Vec<String> {
    let mut values: Vec<_> = response
        .answers
        .iter()
        .map(|record| match &record.data {
            RData::TXT(txt) => String::from_utf8(txt.txt_data.concat()).unwrap(),
            other => panic!("not a TXT record: {other:?}"),
        })
        .collect();
    values.sort();
    values
}

/// Checks an authoritative negative answer with the zone's SOA in authority.
fn assert_negative(response: &DnsResponse, code: ResponseCode, zone: &str) {
    assert_eq!(response.metadata.response_code, code, "{response:?}");
    assert!(response.metadata.authoritative);
    assert!(response.answers.is_empty(), "{:?}", response.answers);
    let [soa] = &response.authorities[..] else {
        panic!("authorities: {:?}", response.authorities)
    };
    assert_eq!(soa.name.to_ascii(), zone);
    assert!(matches!(soa.data, RData::SOA(_)), "{soa:?}");
}

fn config(zone: &str, ttl: u32) -> DnsConfig {
    let mut config = DnsConfig::new(zone);
    config.ttl = ttl;
    config
}

#[tokio::test]
async fn txt_answers_with_every_value_over_udp_and_tcp() {
    let source = MapSource::with(&[("c1.plane.test", &["value-one", "value-two"])]);
    let server = TestServer::start(config("plane.test", 60), source.clone()).await;

    for mut dns in [server.udp().await, server.tcp().await] {
        let response = dns.query("_acme-challenge.c1.plane.test.", RecordType::TXT).await;
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert!(response.metadata.authoritative);
        assert_eq!(txt_values(&response), ["value-one", "value-two"]);
        for record in &response.answers {
            assert_eq!(record.ttl, 60);
            assert_eq!(record.name.to_ascii(), "_acme-challenge.c1.plane.test.");
        }
    }
    assert_eq!(source.asked(), ["c1.plane.test", "c1.plane.test"]);
    server.stop().await;
}

#[tokio::test]
async fn the_apex_is_a_cluster_too_and_the_default_ttl_is_one_second() {
    let source = MapSource::with(&[("plane.test", &["apex-value"])]);
    let server = TestServer::start(DnsConfig::new("plane.test"), source).await;
    let mut dns = server.udp().await;
    let response = dns.query("_acme-challenge.plane.test.", RecordType::TXT).await;
    assert_eq!(txt_values(&response), ["apex-value"]);
    assert_eq!(response.answers[0].ttl, 1);
    server.stop().await;
}

#[tokio::test]
async fn no_values_is_nodata_and_other_types_are_nodata() {
    let source = MapSource::with(&[("c1.plane.test", &["v"])]);
    let server = TestServer::start(config("plane.test", 5), source.clone()).await;
    let mut dns = server.udp().await;

    let empty = dns.query("_acme-challenge.c2.plane.test.", RecordType::TXT).await;
    assert_negative(&empty, ResponseCode::NoError, "plane.test.");
    let RData::SOA(soa) = &empty.authorities[0].data else {
        unreachable!()
    };
    assert_eq!(soa.minimum, 5, "negative answers are cached no longer than the TTL");

    for qtype in [RecordType::A, RecordType::AAAA, RecordType::CNAME] {
        let response = dns.query("_acme-challenge.c1.plane.test.", qtype).await;
        assert_negative(&response, ResponseCode::NoError, "plane.test.");
    }
    assert_eq!(source.asked(), ["c2.plane.test"], "other types do not ask the source");
    server.stop().await;
}

#[tokio::test]
async fn the_apex_answers_soa_and_ns() {
    let server = TestServer::start(config("plane.test", 1), MapSource::with(&[])).await;
    let mut dns = server.tcp().await;

    let response = dns.query("plane.test.", RecordType::SOA).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert!(response.metadata.authoritative);
    let [soa] = &response.answers[..] else {
        panic!("{:?}", response.answers)
    };
    let RData::SOA(soa) = &soa.data else { panic!("{soa:?}") };
    assert_eq!(soa.mname.to_ascii(), "ns.plane.test.");

    let response = dns.query("plane.test.", RecordType::NS).await;
    let [ns] = &response.answers[..] else {
        panic!("{:?}", response.answers)
    };
    assert_eq!(
        ns.data,
        RData::NS(hickory_server::proto::rr::rdata::NS(
            Name::from_ascii("ns.plane.test.").unwrap()
        ))
    );

    let response = dns.query("plane.test.", RecordType::A).await;
    assert_negative(&response, ResponseCode::NoError, "plane.test.");
    server.stop().await;
}

#[tokio::test]
async fn other_names_in_the_zone_are_nxdomain() {
    let source = MapSource::with(&[]);
    let server = TestServer::start(config("plane.test", 1), source.clone()).await;
    let mut dns = server.udp().await;
    for (name, qtype) in [
        ("www.plane.test.", RecordType::A),
        ("c1.plane.test.", RecordType::TXT),
        ("x._acme-challenge.c1.plane.test.", RecordType::TXT),
    ] {
        let response = dns.query(name, qtype).await;
        assert_negative(&response, ResponseCode::NXDomain, "plane.test.");
    }
    assert!(source.asked().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn names_outside_the_zone_are_refused() {
    let source = MapSource::with(&[]);
    let server = TestServer::start(config("plane.test", 1), source.clone()).await;
    let mut dns = server.udp().await;
    for name in [
        "_acme-challenge.c1.other.test.",
        "_acme-challenge.test.",
        "example.com.",
        "xplane.test.",
    ] {
        let response = dns.query(name, RecordType::TXT).await;
        assert_eq!(response.metadata.response_code, ResponseCode::Refused, "{name}");
        assert!(!response.metadata.authoritative);
        assert!(response.answers.is_empty());
    }
    assert!(source.asked().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn a_failing_source_is_servfail() {
    let source = Arc::new(BadSource {
        hang: false,
        calls: AtomicUsize::new(0),
    });
    let server = TestServer::start(config("plane.test", 1), source.clone()).await;
    for mut dns in [server.udp().await, server.tcp().await] {
        let response = dns.query("_acme-challenge.c1.plane.test.", RecordType::TXT).await;
        assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
        assert!(response.answers.is_empty());
    }
    assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    server.stop().await;
}

#[tokio::test]
async fn a_slow_source_is_servfail_after_the_timeout() {
    let source = Arc::new(BadSource {
        hang: true,
        calls: AtomicUsize::new(0),
    });
    let mut config = config("plane.test", 1);
    config.source_timeout = Duration::from_millis(200);
    let server = TestServer::start(config, source.clone()).await;
    let mut dns = server.udp().await;

    let started = std::time::Instant::now();
    let response = dns.query("_acme-challenge.c1.plane.test.", RecordType::TXT).await;
    assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() >= Duration::from_millis(200));
    // Nothing is remembered: the next query asks again (and the server still answers).
    let response = dns.query("_acme-challenge.c1.plane.test.", RecordType::TXT).await;
    assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    let response = dns.query("plane.test.", RecordType::SOA).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    server.stop().await;
}

#[tokio::test]
async fn names_are_case_insensitive() {
    let source = MapSource::with(&[("c1.plane.test", &["v1", "v2"])]);
    let server = TestServer::start(config("Plane.TEST.", 1), source.clone()).await;
    let mut dns = server.udp().await;
    let response = dns.query("_ACME-Challenge.C1.pLaNe.test.", RecordType::TXT).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert_eq!(txt_values(&response), ["v1", "v2"]);
    // The answers keep the question's spelling (resolvers that randomise case check it).
    assert_eq!(response.answers[0].name.to_ascii(), "_ACME-Challenge.C1.pLaNe.test.");
    assert_eq!(source.asked(), ["c1.plane.test"]);

    let response = dns.query("PLANE.test.", RecordType::SOA).await;
    assert_eq!(response.answers.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn long_values_are_split_into_character_strings() {
    let long300: String = "a".repeat(200) + &"b".repeat(100);
    let long600: String = ('0'..='9').cycle().take(600).collect();
    let source = MapSource::with(&[("c1.plane.test", &[&long300, &long600])]);
    let server = TestServer::start(config("plane.test", 1), source).await;

    for mut dns in [server.udp().await, server.tcp().await] {
        let response = dns.query("_acme-challenge.c1.plane.test.", RecordType::TXT).await;
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        let mut expected = vec![long300.clone(), long600.clone()];
        expected.sort();
        assert_eq!(txt_values(&response), expected);
        for record in &response.answers {
            let RData::TXT(txt) = &record.data else { unreachable!() };
            let lengths: Vec<_> = txt.txt_data.iter().map(|s| s.len()).collect();
            assert!(lengths == [255, 45] || lengths == [255, 255, 90], "{lengths:?}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn udp_answers_too_large_are_truncated_and_tcp_has_them_all() {
    let values: Vec<String> = (0..30).map(|i| format!("{i:02}{}", "x".repeat(41))).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    let source = MapSource::with(&[("c1.plane.test", &refs)]);
    let server = TestServer::start(config("plane.test", 1), source).await;

    let mut udp = server.udp().await;
    udp.client.disable_edns();
    let response = udp.query("_acme-challenge.c1.plane.test.", RecordType::TXT).await;
    assert!(
        response.metadata.truncation,
        "a 512-byte datagram cannot hold 30 values"
    );

    let mut tcp = server.tcp().await;
    let response = tcp.query("_acme-challenge.c1.plane.test.", RecordType::TXT).await;
    assert!(!response.metadata.truncation);
    let mut expected = values.clone();
    expected.sort();
    assert_eq!(txt_values(&response), expected);
    server.stop().await;
}

/// Sends `message` in one datagram and decodes the reply.
async fn raw_udp(server: SocketAddr, message: &Message) -> Message {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(&message.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0; 4096];
    let (len, _) = tokio::time::timeout(Duration::from_secs(10), socket.recv_from(&mut buf))
        .await
        .expect("a reply")
        .unwrap();
    Message::from_vec(&buf[..len]).unwrap()
}

#[tokio::test]
async fn other_opcodes_bad_question_counts_and_edns_versions() {
    let server = TestServer::start(config("plane.test", 1), MapSource::with(&[])).await;
    let question = Query::query(
        Name::from_ascii("_acme-challenge.plane.test.").unwrap(),
        RecordType::TXT,
    );

    let mut status = Message::new(1, MessageType::Query, OpCode::Status);
    status.add_query(question.clone());
    let reply = raw_udp(server.udp, &status).await;
    assert_eq!(reply.metadata.id, 1);
    assert_eq!(reply.metadata.response_code, ResponseCode::NotImp);

    let none = Message::new(2, MessageType::Query, OpCode::Query);
    let reply = raw_udp(server.udp, &none).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);

    let mut two = Message::new(3, MessageType::Query, OpCode::Query);
    two.add_query(question.clone()).add_query(question.clone());
    let reply = raw_udp(server.udp, &two).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);

    let mut chaos = Message::new(4, MessageType::Query, OpCode::Query);
    let mut chaos_question = question.clone();
    chaos_question.set_query_class(DNSClass::CH);
    chaos.add_query(chaos_question);
    let reply = raw_udp(server.udp, &chaos).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);

    let mut edns1 = Message::new(5, MessageType::Query, OpCode::Query);
    let mut edns = Edns::new();
    edns.set_version(1);
    edns1.add_query(question.clone()).set_edns(edns);
    let reply = raw_udp(server.udp, &edns1).await;
    // BADVERS and BADSIG share the value 16; hickory decodes it as BADSIG.
    assert_eq!(
        u16::from(reply.metadata.response_code),
        u16::from(ResponseCode::BADVERS)
    );
    assert_eq!(reply.edns.as_ref().map(Edns::version), Some(0));

    server.stop().await;
}

#[tokio::test]
async fn invalid_configs_fail_at_once() {
    for zone in ["", ".", "a..b", "bad label with spaces.test"] {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let result = plane_dns::run(
            udp,
            tcp,
            DnsConfig::new(zone),
            MapSource::with(&[]),
            CancellationToken::new(),
        )
        .await;
        assert!(result.is_err(), "{zone:?}");
    }

    let mut config = DnsConfig::new("plane.test");
    config.source_timeout = Duration::ZERO;
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = plane_dns::run(udp, tcp, config, MapSource::with(&[]), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("timeout"), "{error}");
}

#[tokio::test]
async fn shutdown_stops_both_transports() {
    let server = TestServer::start(config("plane.test", 1), MapSource::with(&[])).await;
    let mut dns = server.tcp().await;
    assert_eq!(
        dns.query("plane.test.", RecordType::SOA).await.metadata.response_code,
        ResponseCode::NoError
    );
    let (udp, tcp) = (server.udp, server.tcp);
    server.stop().await;
    // Both sockets were closed, so their ports can be bound again.
    UdpSocket::bind(udp).await.unwrap();
    TcpListener::bind(tcp).await.unwrap();
}
