//! HTTP/1.1: sans-I/O codecs ([`head`], [`chunked`], [`response`]) and the I/O around them
//! ([`conn`], [`body`], [`server`]).

pub mod body;
pub mod conn;
pub mod server;

pub use gitplane_wire::http::{chunked, forwarded, head, response};

/// The raw value of `key` in a query string (`a=1&b=2`), undecoded.
pub fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find_map(|(k, v)| (k == key).then_some(v))
}

#[cfg(test)]
mod tests {
    use super::query_param;

    #[test]
    fn query_params() {
        assert_eq!(
            query_param(Some("service=git-upload-pack"), "service"),
            Some("git-upload-pack")
        );
        assert_eq!(query_param(Some("a=1&service=x"), "service"), Some("x"));
        assert_eq!(query_param(Some("services=x"), "service"), None);
        assert_eq!(query_param(None, "service"), None);
    }
}
