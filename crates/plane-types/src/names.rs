//! Validated identifiers.
//!
//! Every id that arrives from JSON or a URL path is parsed into one of these newtypes, so
//! the rest of the code never sees an unvalidated string. Names follow Plane 0.5:
//! lowercase ASCII letters, digits and `-`, at most 45 characters, with a per-kind prefix.

use rand::Rng;
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::str::FromStr;

/// Maximum length of a name, prefix included.
pub const MAX_NAME_LEN: usize = 45;
/// Maximum length of a key name, namespace or tag.
pub const MAX_KEY_LEN: usize = 128;

/// Why a string was rejected as a name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    /// The name is longer than allowed.
    #[error("{kind} is {len} characters long; the limit is {max}")]
    TooLong { kind: &'static str, len: usize, max: usize },
    /// The name has the wrong prefix.
    #[error("{kind} must start with `{prefix}`")]
    MissingPrefix { kind: &'static str, prefix: &'static str },
    /// The name contains a character outside its alphabet.
    #[error("{kind} contains {ch:?}; allowed are {allowed}")]
    InvalidChar {
        kind: &'static str,
        ch: char,
        allowed: &'static str,
    },
    /// A cluster name has a port that is not a number in 1..=65535.
    #[error("cluster name has an invalid port `{port}`")]
    InvalidPort { port: String },
}

fn check_name(kind: &'static str, prefix: &'static str, s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if s.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            kind,
            len: s.len(),
            max: MAX_NAME_LEN,
        });
    }
    if !s.starts_with(prefix) || s.len() == prefix.len() {
        return Err(NameError::MissingPrefix { kind, prefix });
    }
    if let Some(ch) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::InvalidChar {
            kind,
            ch,
            allowed: "lowercase ASCII letters, digits and `-`",
        });
    }
    Ok(())
}

fn random_suffix(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

macro_rules! name_type {
    ($(#[$doc:meta])* $t:ident, $kind:literal, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $t(String);

        impl $t {
            /// The prefix every name of this kind starts with.
            pub const PREFIX: &'static str = $prefix;

            /// A new random name of this kind.
            pub fn new_random() -> Self {
                $t(format!("{}{}", $prefix, random_suffix(14)))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $t {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                check_name($kind, $prefix, s)?;
                Ok($t(s.to_owned()))
            }
        }

        impl TryFrom<String> for $t {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                check_name($kind, $prefix, &s)?;
                Ok($t(s))
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $t::try_from(s).map_err(serde::de::Error::custom)
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }

        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// The id of a backend. No prefix.
    BackendName, "backend id", ""
);
name_type!(
    /// The name of a controller (`co-…`).
    ControllerName, "controller name", "co-"
);
name_type!(
    /// The name of a drone (`dr-…`).
    DroneName, "drone name", "dr-"
);
name_type!(
    /// The name of a proxy (`px-…`).
    ProxyName, "proxy name", "px-"
);
name_type!(
    /// The name of a DNS server (`ns-…`).
    DnsName, "DNS server name", "ns-"
);

/// The name of a cluster: `host[:port]`, where host is a DNS name of lowercase letters,
/// digits, `-` and `.`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ClusterName(String);

impl ClusterName {
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The port, if the name carries one.
    pub fn port(&self) -> Option<u16> {
        self.0.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
    }

    /// The host part, without the port.
    pub fn host(&self) -> &str {
        self.0.rsplit_once(':').map(|(h, _)| h).unwrap_or(&self.0)
    }

    /// Whether URLs of this cluster use HTTPS: unless the name has a port other than 443.
    pub fn is_https(&self) -> bool {
        matches!(self.port(), None | Some(443))
    }
}

impl FromStr for ClusterName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        const KIND: &str = "cluster name";
        if s.is_empty() {
            return Err(NameError::Empty { kind: KIND });
        }
        if s.len() > 253 {
            return Err(NameError::TooLong {
                kind: KIND,
                len: s.len(),
                max: 253,
            });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        if host.is_empty() {
            return Err(NameError::Empty { kind: KIND });
        }
        if let Some(ch) = host
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.'))
        {
            return Err(NameError::InvalidChar {
                kind: KIND,
                ch,
                allowed: "lowercase ASCII letters, digits, `-` and `.`, then an optional `:port`",
            });
        }
        if let Some(p) = port {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => {}
                _ => return Err(NameError::InvalidPort { port: p.to_owned() }),
            }
        }
        Ok(ClusterName(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for ClusterName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Checks a key name, namespace, tag, pool or subdomain: ASCII letters, digits, `-`, `_`
/// and `.`, not starting with `.`, at most [`MAX_KEY_LEN`] characters. `allow_empty`
/// admits the empty string (namespaces, tags and pools default to it).
pub fn check_key_part(kind: &'static str, s: &str, allow_empty: bool) -> Result<(), NameError> {
    if s.is_empty() {
        return if allow_empty {
            Ok(())
        } else {
            Err(NameError::Empty { kind })
        };
    }
    if s.len() > MAX_KEY_LEN {
        return Err(NameError::TooLong {
            kind,
            len: s.len(),
            max: MAX_KEY_LEN,
        });
    }
    const ALLOWED: &str = "ASCII letters, digits, `-`, `_` and `.` (not first)";
    if s.starts_with('.') {
        return Err(NameError::InvalidChar {
            kind,
            ch: '.',
            allowed: ALLOWED,
        });
    }
    if let Some(ch) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(NameError::InvalidChar {
            kind,
            ch,
            allowed: ALLOWED,
        });
    }
    Ok(())
}

/// Checks a subdomain label: lowercase letters, digits and `-`, 1..=63 characters.
pub fn check_subdomain(s: &str) -> Result<(), NameError> {
    const KIND: &str = "subdomain";
    if s.is_empty() {
        return Err(NameError::Empty { kind: KIND });
    }
    if s.len() > 63 {
        return Err(NameError::TooLong {
            kind: KIND,
            len: s.len(),
            max: 63,
        });
    }
    if let Some(ch) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::InvalidChar {
            kind: KIND,
            ch,
            allowed: "lowercase ASCII letters, digits and `-`",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: FromStr>(input: &str, ok: bool)
    where
        T::Err: fmt::Debug,
    {
        assert_eq!(
            input.parse::<T>().is_ok(),
            ok,
            "parsing {input:?}: {:?}",
            input.parse::<T>().err()
        );
    }

    #[test]
    fn backend_names() {
        check::<BackendName>("abc123", true);
        check::<BackendName>("a-b-c", true);
        check::<BackendName>("", false);
        check::<BackendName>("ABC", false);
        check::<BackendName>("a_b", false);
        check::<BackendName>("a/b", false);
        check::<BackendName>("..", false);
        check::<BackendName>(&"a".repeat(45), true);
        check::<BackendName>(&"a".repeat(46), false);
    }

    #[test]
    fn prefixed_names() {
        check::<DroneName>("dr-abc", true);
        check::<DroneName>("dr-", false);
        check::<DroneName>("px-abc", false);
        check::<DroneName>("dr-ABC", false);
        check::<ProxyName>("px-1", true);
        check::<ControllerName>("co-x", true);
        let d = DroneName::new_random();
        assert!(d.as_str().parse::<DroneName>().is_ok());
    }

    #[test]
    fn cluster_names() {
        check::<ClusterName>("localhost:9090", true);
        check::<ClusterName>("c1.example.com", true);
        check::<ClusterName>("127.0.0.1:1", true);
        check::<ClusterName>("Example.com", false);
        check::<ClusterName>("a.com:0", false);
        check::<ClusterName>("a.com:99999", false);
        check::<ClusterName>("a.com:", false);
        check::<ClusterName>(":80", false);
        check::<ClusterName>("a/b", false);
        let c: ClusterName = "localhost:9090".parse().unwrap();
        assert!(!c.is_https());
        assert_eq!(c.host(), "localhost");
        let c: ClusterName = "x.com:443".parse().unwrap();
        assert!(c.is_https());
        let c: ClusterName = "x.com".parse().unwrap();
        assert!(c.is_https());
    }

    #[test]
    fn key_parts() {
        assert!(check_key_part("key", "room-1", false).is_ok());
        assert!(check_key_part("key", "Doc_42.v2", false).is_ok());
        assert!(check_key_part("key", "", false).is_err());
        assert!(check_key_part("namespace", "", true).is_ok());
        assert!(check_key_part("key", "../etc", false).is_err());
        assert!(check_key_part("key", ".hidden", false).is_err());
        assert!(check_key_part("key", "a b", false).is_err());
        assert!(check_key_part("key", &"k".repeat(129), false).is_err());
        assert!(check_subdomain("my-app").is_ok());
        assert!(check_subdomain("My").is_err());
    }

    #[test]
    fn deserialize_rejects_invalid() {
        assert!(serde_json::from_str::<BackendName>("\"ok-1\"").is_ok());
        assert!(serde_json::from_str::<BackendName>("\"Not OK\"").is_err());
        assert!(serde_json::from_str::<DroneName>("\"dr-1\"").is_ok());
        assert!(serde_json::from_str::<ClusterName>("\"bad host\"").is_err());
    }
}
