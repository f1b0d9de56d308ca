//! The Plane DNS server: it answers the `_acme-challenge` TXT queries of ACME DNS-01
//! certificate issuance for the clusters under one zone.
//!
//! A proxy that issues its cluster's certificate publishes the challenge values through
//! the controller; a certificate authority then looks up `_acme-challenge.<cluster>.`,
//! and the query ends here. Each query asks a [`TxtSource`] for the current values
//! (the controller's `GET /ctrl/c/{cluster}/acme-txt`, through [`ControllerTxtSource`]).
//!
//! Layout:
//! * this file: the public API ([`TxtSource`], [`DnsConfig`], [`run`]);
//! * `zone.rs`: what a name means in the zone, and the records of each answer (no I/O);
//! * `handler.rs`: hickory's request handler, which turns a request into a response;
//! * `inflight.rs`: the single-flight of source calls, and the rate limit of warnings;
//! * `controller.rs`: [`ControllerTxtSource`], the HTTP source.
//!
//! # Answers
//!
//! The server is authoritative for [`DnsConfig::zone`] (compared case-insensitively):
//!
//! | query | answer |
//! | --- | --- |
//! | `_acme-challenge.<cluster>.` TXT (or ANY), `<cluster>` the zone or a name under it | NOERROR, AA, one TXT record per value, TTL [`DnsConfig::ttl`]; no values: NODATA |
//! | `_acme-challenge.<cluster>.`, another type | NODATA (the source is not asked) |
//! | the apex, SOA / NS / ANY | the SOA, the NS (`ns.<zone>`), or both |
//! | the apex or `ns.<zone>`, another type | NODATA |
//! | any other name in the zone | NXDOMAIN |
//! | a name outside the zone, a class other than IN, AXFR/IXFR | REFUSED |
//! | an opcode other than QUERY | NOTIMP |
//! | not exactly one question | FORMERR (an undecodable message gets FORMERR from hickory) |
//! | EDNS version above 0 | BADVERS |
//! | the source fails or takes longer than [`DnsConfig::source_timeout`] | SERVFAIL, and a rate-limited `warn!` with the cause |
//!
//! NODATA and NXDOMAIN answers carry the zone's SOA in the authority section. Its
//! MINIMUM, and so the negative-caching TTL, is [`DnsConfig::ttl`] too: a resolver must
//! not remember "no value" for longer than it would remember a value.
//!
//! A cluster is the query name without `_acme-challenge.` and without the final dot,
//! lowercased (`C1.Plane.Example.COM.` asks for `c1.plane.example.com`). Labels of a
//! cluster may only hold letters, digits, `-` and `_`; any other name is NXDOMAIN.
//!
//! A value longer than 255 bytes is split into several character-strings of one TXT
//! record (RFC 7208 §3.3 style), which clients join back together.
//!
//! # Coalescing
//!
//! Concurrent queries for one cluster share a single source call (single-flight): the
//! first query makes it, the others wait for its outcome. Nothing is cached once it
//! completes, because the values change while a certificate is being issued; the next
//! query asks the source again. A call is bounded by [`DnsConfig::source_timeout`], so a
//! query that joins a call late waits less than that.
//!
//! # Transports and shutdown
//!
//! [`run`] serves the given UDP socket and TCP listener with hickory's server (UDP
//! answers are truncated with TC set past the client's EDNS size, or 512 bytes without
//! EDNS, so the client retries over TCP). When the shutdown token is cancelled, it
//! stops accepting, drops the queries in progress and returns.
//!
//! **API boundary:** the controller's answer is `plane_types::protocol::AcmeTxt`.

mod controller;
mod handler;
mod inflight;
mod zone;

use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

pub use controller::ControllerTxtSource;

/// Where TXT values come from.
#[async_trait::async_trait]
pub trait TxtSource: Send + Sync + 'static {
    /// The current `_acme-challenge` TXT values of `cluster` (possibly empty).
    async fn txt_values(&self, cluster: &str) -> anyhow::Result<Vec<String>>;
}

/// How the DNS server answers.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// The zone this server is authoritative for, e.g. "plane.example.com" (no trailing dot needed; case-insensitive).
    pub zone: String,
    /// TTL of TXT answers, seconds (default 1: values change during issuance).
    pub ttl: u32,
    /// Longest wait for the source per query before answering SERVFAIL (default 3 s).
    pub source_timeout: Duration,
}

impl DnsConfig {
    /// The default TTL of answers, seconds.
    pub const DEFAULT_TTL: u32 = 1;
    /// The default bound of a source call.
    pub const DEFAULT_SOURCE_TIMEOUT: Duration = Duration::from_secs(3);

    /// A configuration for `zone` with the default TTL and source timeout.
    pub fn new(zone: impl Into<String>) -> Self {
        DnsConfig {
            zone: zone.into(),
            ttl: Self::DEFAULT_TTL,
            source_timeout: Self::DEFAULT_SOURCE_TIMEOUT,
        }
    }
}

/// A configuration that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The zone is not a valid domain name.
    #[error("the DNS zone {zone:?} is not a valid domain name: {reason}")]
    InvalidZone {
        /// The zone as configured.
        zone: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The source timeout is zero, so every TXT query would fail.
    #[error("the DNS source timeout must be greater than zero")]
    ZeroSourceTimeout,
}

/// How long a TCP connection may stay idle between two queries before it is closed.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;

/// Serves DNS on `udp` and `tcp` until `shutdown` is cancelled. Fails only on invalid config (e.g. a zone that is not a valid name).
pub async fn run(
    udp: UdpSocket,
    tcp: TcpListener,
    config: DnsConfig,
    source: Arc<dyn TxtSource>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let handler = handler::Handler::new(&config, source)?;
    serve(udp, tcp, handler, shutdown).await
}

/// [`run`] with its handler already built (tests keep a clone to look inside).
async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    handler: handler::Handler,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(
        zone = %handler.zone_name(),
        udp = ?udp.local_addr().ok(),
        tcp = ?tcp.local_addr().ok(),
        "DNS server listening",
    );
    let mut server = Server::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);

    let server_token = server.shutdown_token().clone();
    let done = server.block_until_done();
    tokio::pin!(done);
    tokio::select! {
        _ = shutdown.cancelled() => {
            server_token.cancel();
            done.await?;
            tracing::info!("DNS server stopped");
            Ok(())
        }
        // The socket tasks end on their own only when the sockets fail for good.
        result = &mut done => {
            result?;
            anyhow::bail!("the DNS server's sockets closed unexpectedly")
        }
    }
}

#[cfg(test)]
mod tests;
