//! The target of a run: `http://[USER[:PASSWORD]@]HOST[:PORT]/OWNER/NAME[.git]`, parsed once at
//! start-up into an address, a `Host` header, the repository path and Basic credentials.

use std::net::{SocketAddr, ToSocketAddrs};

use base64::Engine;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum UrlError {
    #[error("`{url}` is not an http:// URL (gitplane-load speaks cleartext HTTP/1.1 only)")]
    NotHttp { url: String },
    #[error("`{url}` has no host")]
    NoHost { url: String },
    #[error("`{url}` has an invalid port")]
    BadPort { url: String },
    #[error("`{url}` names no repository: expected http://HOST:PORT/OWNER/NAME.git")]
    NoRepository { url: String },
    #[error("cannot resolve `{host}`: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{host}` resolves to no address")]
    NoAddress { host: String },
}

/// Where the load goes, with credentials already encoded.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `HOST[:PORT]` exactly as given, for the `Host` header.
    pub authority: String,
    /// `/OWNER/NAME.git` (or without `.git`, as given), no trailing slash.
    pub repo_path: String,
    /// The value of an `Authorization` header, when credentials were given.
    pub authorization: Option<String>,
}

impl Target {
    /// Parses `url`; `user`/`password` override the URL's own userinfo.
    ///
    /// # Errors
    /// On anything but `http://` with a host and a repository path, or an unresolvable host.
    pub fn parse(url: &str, user: Option<&str>, password: Option<&str>) -> Result<Self, UrlError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| UrlError::NotHttp { url: url.into() })?;
        let (authority_full, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (userinfo, authority) = match authority_full.rsplit_once('@') {
            Some((u, a)) => (Some(u), a),
            None => (None, authority_full),
        };
        if authority.is_empty() {
            return Err(UrlError::NoHost { url: url.into() });
        }
        let (host, port) =
            split_host_port(authority).ok_or(UrlError::BadPort { url: url.into() })?;
        let repo_path = path.trim_end_matches('/').to_owned();
        if repo_path
            .trim_start_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .count()
            < 2
        {
            return Err(UrlError::NoRepository { url: url.into() });
        }
        let (url_user, url_password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((n, p)) => (Some(percent_decode(n)), Some(percent_decode(p))),
                None => (Some(percent_decode(u)), None),
            },
            None => (None, None),
        };
        let user = user.map(str::to_owned).or(url_user);
        let password = password.map(str::to_owned).or(url_password);
        let authorization = user.map(|u| {
            let pair = format!("{u}:{}", password.unwrap_or_default());
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|source| UrlError::Resolve {
                host: host.into(),
                source,
            })?
            .next()
            .ok_or_else(|| UrlError::NoAddress { host: host.into() })?;
        Ok(Self {
            addr,
            authority: authority.to_owned(),
            repo_path,
            authorization,
        })
    }

    /// The URL without credentials, for reports.
    pub fn display_url(&self) -> String {
        format!("http://{}{}", self.authority, self.repo_path)
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; port 80 when absent.
fn split_host_port(authority: &str) -> Option<(&str, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(p) => Some((host, p.parse().ok()?)),
            None if after.is_empty() => Some((host, 80)),
            None => None,
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h, p.parse().ok()?)),
        None => Some((authority, 80)),
    }
}

/// `%XX` escapes in URL userinfo (a password with `@` or `:` must be written escaped).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_credentials_and_path() {
        let t = Target::parse("http://al%40x:p%3Aw@127.0.0.1:8080/o/r.git/", None, None).unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.repo_path, "/o/r.git");
        let expected = base64::engine::general_purpose::STANDARD.encode("al@x:p:w");
        assert_eq!(t.display_url(), "http://127.0.0.1:8080/o/r.git");
        assert_eq!(t.authorization.unwrap(), format!("Basic {expected}"));
    }

    #[test]
    fn flags_override_url_credentials() {
        let t = Target::parse("http://a:b@127.0.0.1:1/o/r", Some("c"), Some("d")).unwrap();
        let expected = base64::engine::general_purpose::STANDARD.encode("c:d");
        assert_eq!(t.authorization.unwrap(), format!("Basic {expected}"));
    }

    #[test]
    fn rejects_bad_urls() {
        assert!(matches!(
            Target::parse("https://h/o/r", None, None),
            Err(UrlError::NotHttp { .. })
        ));
        assert!(matches!(
            Target::parse("http://127.0.0.1:99999/o/r", None, None),
            Err(UrlError::BadPort { .. })
        ));
        assert!(matches!(
            Target::parse("http://127.0.0.1:1/onlyowner", None, None),
            Err(UrlError::NoRepository { .. })
        ));
        assert!(matches!(
            Target::parse("http:///o/r", None, None),
            Err(UrlError::NoHost { .. })
        ));
    }
}
