//! The zone: what a query name means in it, and the records of each kind of answer.
//!
//! Pure functions of the configuration and the question, so every rule of the table in
//! the crate docs is checked here without sockets.

use std::time::{SystemTime, UNIX_EPOCH};

use hickory_server::proto::rr::rdata::{NS, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};

use crate::{ConfigError, DnsConfig};

/// The first label of every name that carries challenge values.
const CHALLENGE_LABEL: &[u8] = b"_acme-challenge";
/// The label of the zone's own name server name, `ns.<zone>`.
const NS_LABEL: &str = "ns";
/// The label of the SOA's responsible mailbox, `hostmaster.<zone>`.
const HOSTMASTER_LABEL: &str = "hostmaster";
/// The longest value one TXT record can carry: its RDATA is at most 65535 bytes, one
/// length byte per 255-byte character-string.
const MAX_VALUE_LEN: usize = 65535 / 256 * 255;

/// What a question asks for, given the zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The TXT values of this cluster.
    Txt { cluster: String },
    /// The apex SOA.
    Soa,
    /// The apex NS.
    Ns,
    /// The apex SOA and NS (an ANY query at the apex).
    SoaAndNs,
    /// The name exists, but has no records of the type asked.
    NoData,
    /// The name does not exist in the zone.
    NxDomain,
    /// Not ours to answer: outside the zone, or a zone transfer.
    Refused,
}

/// The zone and its fixed records.
#[derive(Debug)]
pub(crate) struct Zone {
    apex: LowerName,
    ns_name: LowerName,
    ttl: u32,
    soa: Record,
    ns: Record,
}

impl Zone {
    /// Checks `config.zone` and builds the apex records.
    pub(crate) fn new(config: &DnsConfig) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::InvalidZone {
            zone: config.zone.clone(),
            reason,
        };
        let trimmed = config.zone.trim();
        if trimmed.is_empty() || trimmed == "." {
            return Err(invalid("the zone must not be empty or the root".into()));
        }
        let mut apex = Name::from_ascii(trimmed)
            .map_err(|e| invalid(e.to_string()))?
            .to_lowercase();
        apex.set_fqdn(true);

        let ns_name = apex.prepend_label(NS_LABEL).map_err(|e| invalid(e.to_string()))?;
        let hostmaster = apex
            .prepend_label(HOSTMASTER_LABEL)
            .map_err(|e| invalid(e.to_string()))?;
        // The challenge name of the apex itself must fit too.
        apex.prepend_label(std::str::from_utf8(CHALLENGE_LABEL).expect("invariant: the label is ASCII"))
            .map_err(|e| invalid(e.to_string()))?;

        let ttl = config.ttl;
        let soa = Record::from_rdata(
            apex.clone(),
            ttl,
            RData::SOA(SOA::new(
                ns_name.clone(),
                hostmaster,
                startup_serial(),
                3600,
                600,
                86400,
                // RFC 2308: the negative-caching TTL. No longer than a positive answer.
                ttl,
            )),
        );
        let ns = Record::from_rdata(apex.clone(), ttl, RData::NS(NS(ns_name.clone())));

        Ok(Zone {
            apex: LowerName::from(apex),
            ns_name: LowerName::from(ns_name),
            ttl,
            soa,
            ns,
        })
    }

    /// The zone's name, with its final dot.
    pub(crate) fn apex(&self) -> &LowerName {
        &self.apex
    }

    /// The SOA record of the apex.
    pub(crate) fn soa(&self) -> &Record {
        &self.soa
    }

    /// The NS record of the apex.
    pub(crate) fn ns(&self) -> &Record {
        &self.ns
    }

    /// What a question for `name` (already lowercase) and `qtype` asks for.
    pub(crate) fn lookup(&self, name: &LowerName, qtype: RecordType) -> Lookup {
        if !self.apex.zone_of(name) {
            return Lookup::Refused;
        }
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            return Lookup::Refused;
        }
        if *name == self.apex {
            return match qtype {
                RecordType::SOA => Lookup::Soa,
                RecordType::NS => Lookup::Ns,
                RecordType::ANY => Lookup::SoaAndNs,
                _ => Lookup::NoData,
            };
        }
        if *name == self.ns_name {
            return Lookup::NoData;
        }
        match self.challenge_cluster(name) {
            Some(cluster) => match qtype {
                RecordType::TXT | RecordType::ANY => Lookup::Txt { cluster },
                _ => Lookup::NoData,
            },
            None => Lookup::NxDomain,
        }
    }

    /// The cluster of `_acme-challenge.<cluster>.`, if `name` is one and `<cluster>` is
    /// the apex or a name under it made of hostname-like labels.
    fn challenge_cluster(&self, name: &LowerName) -> Option<String> {
        let mut labels = name.iter();
        if labels.next()? != CHALLENGE_LABEL {
            return None;
        }
        let base = name.base_name();
        if !self.apex.zone_of(&base) {
            return None;
        }
        let mut cluster = String::with_capacity(name.len());
        for label in labels {
            let valid = !label.is_empty()
                && label
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
            if !valid {
                return None;
            }
            if !cluster.is_empty() {
                cluster.push('.');
            }
            // Lowercase ASCII, checked above.
            cluster.push_str(std::str::from_utf8(label).ok()?);
        }
        Some(cluster)
    }

    /// The TXT records of `values` at `owner` (the question's name, its case kept).
    pub(crate) fn txt_records(&self, owner: &Name, values: &[String]) -> Result<Vec<Record>, ValueTooLong> {
        values
            .iter()
            .map(|value| {
                let strings = character_strings(value.as_bytes())?;
                Ok(Record::from_rdata(
                    owner.clone(),
                    self.ttl,
                    RData::TXT(TXT::from_bytes(strings)),
                ))
            })
            .collect()
    }
}

/// A value that no TXT record can hold.
#[derive(Debug, thiserror::Error)]
#[error("a TXT value of {len} bytes does not fit in one record (at most {MAX_VALUE_LEN})")]
pub(crate) struct ValueTooLong {
    len: usize,
}

/// `value` as the character-strings of one TXT record: 255-byte pieces, in order
/// (one empty string for an empty value, since a TXT record holds at least one).
fn character_strings(value: &[u8]) -> Result<Vec<&[u8]>, ValueTooLong> {
    if value.len() > MAX_VALUE_LEN {
        return Err(ValueTooLong { len: value.len() });
    }
    if value.is_empty() {
        return Ok(vec![value]);
    }
    Ok(value.chunks(255).collect())
}

/// The SOA serial: the start time in seconds (it only has to grow between restarts,
/// and there are no zone transfers).
fn startup_serial() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1);
    // Serial arithmetic wraps (RFC 1982).
    secs as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(name: &str) -> Zone {
        Zone::new(&DnsConfig::new(name)).unwrap()
    }

    fn check(zone: &Zone, name: &str, qtype: RecordType, expected: Lookup) {
        // From raw labels, so that labels of any bytes can be written.
        let trimmed = name.trim_end_matches('.');
        let labels = trimmed.split('.').filter(|_| !trimmed.is_empty());
        let mut name_ = Name::from_labels(labels.map(str::as_bytes)).unwrap();
        name_.set_fqdn(true);
        let lower = LowerName::from(name_);
        assert_eq!(zone.lookup(&lower, qtype), expected, "{name} {qtype}");
    }

    fn txt(cluster: &str) -> Lookup {
        Lookup::Txt {
            cluster: cluster.into(),
        }
    }

    #[test]
    fn lookups() {
        let z = zone("Plane.Example.COM");
        use Lookup::*;
        use RecordType as T;
        check(
            &z,
            "_acme-challenge.plane.example.com.",
            T::TXT,
            txt("plane.example.com"),
        );
        check(
            &z,
            "_acme-challenge.c1.plane.example.com.",
            T::TXT,
            txt("c1.plane.example.com"),
        );
        check(
            &z,
            "_ACME-Challenge.C1.PLANE.example.com.",
            T::TXT,
            txt("c1.plane.example.com"),
        );
        check(
            &z,
            "_acme-challenge.a.b-2.plane.example.com",
            T::TXT,
            txt("a.b-2.plane.example.com"),
        );
        check(
            &z,
            "_acme-challenge.c1.plane.example.com.",
            T::ANY,
            txt("c1.plane.example.com"),
        );
        check(&z, "_acme-challenge.c1.plane.example.com.", T::A, NoData);
        check(&z, "_acme-challenge.plane.example.com.", T::AAAA, NoData);
        check(&z, "plane.example.com.", T::SOA, Soa);
        check(&z, "PLANE.example.com.", T::NS, Ns);
        check(&z, "plane.example.com.", T::ANY, SoaAndNs);
        check(&z, "plane.example.com.", T::A, NoData);
        check(&z, "plane.example.com.", T::TXT, NoData);
        check(&z, "ns.plane.example.com.", T::A, NoData);
        check(&z, "www.plane.example.com.", T::A, NxDomain);
        check(&z, "c1.plane.example.com.", T::TXT, NxDomain);
        check(&z, "x._acme-challenge.plane.example.com.", T::TXT, NxDomain);
        check(&z, "_acme-challenge.a*b.plane.example.com.", T::TXT, NxDomain);
        check(&z, "plane.example.com.", T::AXFR, Refused);
        check(&z, "example.com.", T::SOA, Refused);
        check(&z, "_acme-challenge.example.com.", T::TXT, Refused);
        check(&z, "_acme-challenge.c1.plane.example.org.", T::TXT, Refused);
        check(&z, "xplane.example.com.", T::TXT, Refused);
        check(&z, ".", T::NS, Refused);
    }

    #[test]
    fn invalid_zones() {
        for bad in ["", ".", "  ", "a..b", &"x".repeat(64)] {
            let err = Zone::new(&DnsConfig::new(bad)).unwrap_err();
            assert!(matches!(err, ConfigError::InvalidZone { .. }), "{bad:?}: {err}");
        }
        // Fits, but `_acme-challenge.<zone>` would not.
        let long = format!("{}.com", vec!["a".repeat(58); 4].join("."));
        assert!(Zone::new(&DnsConfig::new(long)).is_err());
        assert!(Zone::new(&DnsConfig::new("plane.example.com.")).is_ok());
    }

    #[test]
    fn apex_records() {
        let mut config = DnsConfig::new("plane.example.com");
        config.ttl = 7;
        let z = Zone::new(&config).unwrap();
        let RData::SOA(soa) = &z.soa().data else {
            panic!("{:?}", z.soa())
        };
        assert_eq!(soa.mname.to_ascii(), "ns.plane.example.com.");
        assert_eq!(soa.rname.to_ascii(), "hostmaster.plane.example.com.");
        assert_eq!(soa.minimum, 7);
        assert_eq!(z.soa().ttl, 7);
        assert_eq!(
            z.ns().data,
            RData::NS(NS(Name::from_ascii("ns.plane.example.com.").unwrap()))
        );
    }

    #[test]
    fn splits_values_into_character_strings() {
        assert_eq!(character_strings(b"").unwrap(), vec![b"" as &[u8]]);
        assert_eq!(character_strings(b"abc").unwrap(), vec![b"abc" as &[u8]]);
        let long = vec![b'x'; 600];
        let parts = character_strings(&long).unwrap();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [255, 255, 90]);
        assert_eq!(parts.concat(), long);
        assert_eq!(character_strings(&vec![b'y'; 255]).unwrap().len(), 1);
        assert!(character_strings(&vec![b'z'; MAX_VALUE_LEN]).is_ok());
        assert!(character_strings(&vec![b'z'; MAX_VALUE_LEN + 1]).is_err());
    }
}
