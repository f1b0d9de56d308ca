//! Token extraction and path rewriting: the token is the first path segment and is
//! removed from the forwarded path, except for static tokens (`s.…`).

use plane_types::api::STATIC_TOKEN_PREFIX;

/// Longest token the proxy asks the controller about (real tokens are 43 or 45 chars).
const MAX_TOKEN_LEN: usize = 256;

/// Why a request path carries no usable token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PathError {
    /// The first path segment is empty (`/` or `//x`).
    #[error("the request path has no connection token")]
    EmptyToken,
    /// The token is unreasonably long.
    #[error("the connection token is too long")]
    TokenTooLong,
    /// The path is not in origin form (for example `*`).
    #[error("the request path must start with `/`")]
    NotOriginForm,
}

/// A request path split into its token and the path to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenPath<'a> {
    /// The connection token (first path segment), exactly as sent.
    pub token: &'a str,
    /// The path and query to send to the backend.
    pub forward: String,
}

/// Whether a token is a static token (forwarded with the full path).
pub(crate) fn is_static_token(token: &str) -> bool {
    token.starts_with(STATIC_TOKEN_PREFIX)
}

/// Splits `path` (with its optional `query`) into the token and the forwarded path and
/// query. Percent-encoding is left untouched.
pub(crate) fn split_token<'a>(path: &'a str, query: Option<&str>) -> Result<TokenPath<'a>, PathError> {
    let rest = path.strip_prefix('/').ok_or(PathError::NotOriginForm)?;
    let (token, after) = match rest.split_once('/') {
        Some((token, after)) => (token, Some(after)),
        None => (rest, None),
    };
    if token.is_empty() {
        return Err(PathError::EmptyToken);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(PathError::TokenTooLong);
    }
    let mut forward = if is_static_token(token) {
        path.to_owned()
    } else {
        match after {
            Some(after) => format!("/{after}"),
            None => "/".to_owned(),
        }
    };
    if let Some(q) = query {
        forward.push('?');
        forward.push_str(q);
    }
    Ok(TokenPath { token, forward })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(path_and_query: &str, expected: Result<(&str, &str), PathError>) {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let got = split_token(path, query).map(|t| (t.token.to_owned(), t.forward));
        let expected = expected.map(|(t, f)| (t.to_owned(), f.to_owned()));
        assert_eq!(got, expected, "{path_and_query}");
    }

    #[test]
    fn tokens_are_stripped() {
        check("/tok/a/b?q", Ok(("tok", "/a/b?q")));
        check("/tok/a/b?x=1&y=%20", Ok(("tok", "/a/b?x=1&y=%20")));
        check("/tok", Ok(("tok", "/")));
        check("/tok/", Ok(("tok", "/")));
        check("/tok?q=1", Ok(("tok", "/?q=1")));
        check("/tok/a//b/", Ok(("tok", "/a//b/")));
        check("/tok/%2F%41/x%20y", Ok(("tok", "/%2F%41/x%20y")));
        check("/tok%2Fx/a", Ok(("tok%2Fx", "/a")));
    }

    #[test]
    fn static_tokens_keep_the_path() {
        check("/s.abc/a/b?q", Ok(("s.abc", "/s.abc/a/b?q")));
        check("/s.abc", Ok(("s.abc", "/s.abc")));
        check("/s.abc/", Ok(("s.abc", "/s.abc/")));
        assert!(is_static_token("s.x"));
        assert!(!is_static_token("sx"));
    }

    #[test]
    fn bad_paths() {
        check("/", Err(PathError::EmptyToken));
        check("//x", Err(PathError::EmptyToken));
        check("/?q", Err(PathError::EmptyToken));
        check("*", Err(PathError::NotOriginForm));
        assert_eq!(
            split_token(&format!("/{}", "a".repeat(300)), None),
            Err(PathError::TokenTooLong)
        );
    }
}
