//! The hickory request handler: checks a request, asks the zone what it means, fetches
//! the TXT values if needed, and sends the response.

use std::sync::Arc;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::{DNSClass, LowerName, Record};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

use crate::inflight::Inflight;
use crate::zone::{Lookup, Zone};
use crate::{DnsConfig, TxtSource};

/// The largest UDP response this server sends, whatever the client advertises
/// (the client's own size below it still applies).
const MAX_UDP_PAYLOAD: u16 = 4096;

/// Answers requests for one zone. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Handler {
    inner: Arc<Inner>,
}

struct Inner {
    zone: Zone,
    inflight: Inflight,
}

/// A response before encoding.
struct Answer {
    code: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    /// Put the zone's SOA in the authority section (NODATA, NXDOMAIN).
    soa_in_authority: bool,
}

impl Answer {
    fn error(code: ResponseCode) -> Self {
        Answer {
            code,
            authoritative: false,
            answers: Vec::new(),
            soa_in_authority: false,
        }
    }

    fn authoritative(code: ResponseCode, answers: Vec<Record>) -> Self {
        Answer {
            code,
            authoritative: true,
            soa_in_authority: answers.is_empty(),
            answers,
        }
    }
}

impl Handler {
    pub(crate) fn new(config: &DnsConfig, source: Arc<dyn TxtSource>) -> anyhow::Result<Self> {
        let zone = Zone::new(config)?;
        if config.source_timeout.is_zero() {
            return Err(crate::ConfigError::ZeroSourceTimeout.into());
        }
        Ok(Handler {
            inner: Arc::new(Inner {
                zone,
                inflight: Inflight::new(source, config.source_timeout),
            }),
        })
    }

    pub(crate) fn zone_name(&self) -> &LowerName {
        self.inner.zone.apex()
    }

    #[cfg(test)]
    pub(crate) fn inflight(&self) -> &Inflight {
        &self.inner.inflight
    }

    /// The response to a request whose EDNS (if any) was accepted.
    async fn answer(&self, request: &Request) -> Answer {
        let metadata = &request.metadata;
        if metadata.message_type != MessageType::Query {
            return Answer::error(ResponseCode::FormErr);
        }
        if metadata.op_code != OpCode::Query {
            return Answer::error(ResponseCode::NotImp);
        }
        let [query] = request.queries.queries() else {
            return Answer::error(ResponseCode::FormErr);
        };
        if query.query_class() != DNSClass::IN {
            return Answer::error(ResponseCode::Refused);
        }

        let zone = &self.inner.zone;
        match zone.lookup(query.name(), query.query_type()) {
            Lookup::Refused => Answer::error(ResponseCode::Refused),
            Lookup::NxDomain => Answer::authoritative(ResponseCode::NXDomain, Vec::new()),
            Lookup::NoData => Answer::authoritative(ResponseCode::NoError, Vec::new()),
            Lookup::Soa => Answer::authoritative(ResponseCode::NoError, vec![zone.soa().clone()]),
            Lookup::Ns => Answer::authoritative(ResponseCode::NoError, vec![zone.ns().clone()]),
            Lookup::SoaAndNs => {
                Answer::authoritative(ResponseCode::NoError, vec![zone.soa().clone(), zone.ns().clone()])
            }
            Lookup::Txt { cluster } => {
                let Ok(values) = self.inner.inflight.values(&cluster).await else {
                    return Answer::error(ResponseCode::ServFail);
                };
                match zone.txt_records(query.original().name(), &values) {
                    Ok(records) => Answer::authoritative(ResponseCode::NoError, records),
                    Err(error) => {
                        tracing::warn!(%cluster, %error, "unservable TXT value; answering SERVFAIL");
                        Answer::error(ResponseCode::ServFail)
                    }
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut response_edns = Edns::new();
        let edns = match &request.edns {
            Some(request_edns) => {
                response_edns
                    .set_max_payload(request_edns.max_payload().clamp(512, MAX_UDP_PAYLOAD))
                    .set_version(0);
                Some(&response_edns)
            }
            None => None,
        };
        let answer = match &request.edns {
            Some(request_edns) if request_edns.version() > 0 => Answer::error(ResponseCode::BADVERS),
            _ => self.answer(request).await,
        };

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = answer.code;
        metadata.authoritative = answer.authoritative;
        let soa = answer.soa_in_authority.then(|| self.inner.zone.soa()).into_iter();
        let response = MessageResponseBuilder::new(&request.queries, edns).build(
            metadata,
            answer.answers.iter(),
            soa,
            std::iter::empty(),
            std::iter::empty(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(%error, src = %request.src(), "failed to send a DNS response");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}
