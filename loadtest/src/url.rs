//! The target of a run, parsed once at start-up into an address, the authority as given (for
//! `Host` headers and git://'s `host=`), the repository path and credentials:
//!
//! - [`Target`] for `http://[USER[:PASSWORD]@]HOST[:PORT]/OWNER/NAME[.git]` (smart HTTP, LFS,
//!   and the gRPC listener) or `git://HOST[:PORT]/PATH` (`git daemon`);
//! - [`SshTarget`] for `ssh://[USER@]HOST[:PORT]/PATH`.

use std::net::{SocketAddr, ToSocketAddrs};

use base64::Engine;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum UrlError {
    #[error("`{url}` is not an http:// or git:// URL (gitplane-load speaks cleartext HTTP/1.1 and git://; ssh:// is for ssh-clone)")]
    Unsupported { url: String },
    #[error("`{url}` is not an ssh:// URL: expected ssh://git@HOST:PORT/OWNER/NAME.git")]
    NotSsh { url: String },
    #[error("`{url}` has no host")]
    NoHost { url: String },
    #[error("`{url}` has an invalid port")]
    BadPort { url: String },
    #[error("`{url}` names no repository: expected {expected}")]
    NoRepository { url: String, expected: &'static str },
    #[error("`{url}`: git:// has no authentication, so it takes no user or password")]
    GitCredentials { url: String },
    #[error("cannot resolve `{host}`: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{host}` resolves to no address")]
    NoAddress { host: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Git,
}

/// Where the load goes, with credentials already encoded.
#[derive(Debug, Clone)]
pub struct Target {
    pub scheme: Scheme,
    pub addr: SocketAddr,
    /// `HOST[:PORT]` exactly as given, for the `Host` header (and git://'s `host=`).
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
    /// On anything but `http://` or `git://` with a host and a repository path, credentials
    /// for git://, or an unresolvable host.
    pub fn parse(url: &str, user: Option<&str>, password: Option<&str>) -> Result<Self, UrlError> {
        let (scheme, rest, default_port) = if let Some(r) = url.strip_prefix("http://") {
            (Scheme::Http, r, 80)
        } else if let Some(r) = url.strip_prefix("git://") {
            (Scheme::Git, r, 9418)
        } else {
            return Err(UrlError::Unsupported { url: url.into() });
        };
        let parts = split_url(url, rest, default_port, "http://HOST:PORT/OWNER/NAME.git")?;
        let (url_user, url_password) = match parts.userinfo {
            Some(u) => match u.split_once(':') {
                Some((n, p)) => (Some(percent_decode(n)), Some(percent_decode(p))),
                None => (Some(percent_decode(u)), None),
            },
            None => (None, None),
        };
        let user = user.map(str::to_owned).or(url_user);
        let password = password.map(str::to_owned).or(url_password);
        if scheme == Scheme::Git && (user.is_some() || password.is_some()) {
            return Err(UrlError::GitCredentials { url: url.into() });
        }
        let authorization = user.map(|u| {
            let pair = format!("{u}:{}", password.unwrap_or_default());
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        Ok(Self {
            scheme,
            addr: resolve(parts.host, parts.port)?,
            authority: parts.authority.to_owned(),
            repo_path: parts.path,
            authorization,
        })
    }

    /// The URL without credentials, for reports.
    pub fn display_url(&self) -> String {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Git => "git",
        };
        format!("{scheme}://{}{}", self.authority, self.repo_path)
    }

    /// The repository as `OWNER/NAME[.git]` (the path without its leading slash).
    pub fn repository(&self) -> &str {
        self.repo_path.trim_start_matches('/')
    }
}

/// An SSH target: where to connect, who to log in as, and the path to ask upload-pack for.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub addr: SocketAddr,
    /// The host as given, for known_hosts.
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The path as the URL has it (`/OWNER/NAME.git`), quoted into the exec command.
    pub path: String,
}

impl SshTarget {
    /// Parses `ssh://[USER@]HOST[:PORT]/PATH` (user `git` and port 22 when absent).
    ///
    /// # Errors
    /// On another scheme, a missing host or path, a bad port, or an unresolvable host.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let rest = url
            .strip_prefix("ssh://")
            .ok_or_else(|| UrlError::NotSsh { url: url.into() })?;
        let parts = split_url(url, rest, 22, "ssh://git@HOST:PORT/OWNER/NAME.git")?;
        Ok(Self {
            addr: resolve(parts.host, parts.port)?,
            host: parts.host.to_owned(),
            port: parts.port,
            user: parts.userinfo.map_or_else(|| "git".into(), percent_decode),
            path: parts.path,
        })
    }

    pub fn display_url(&self) -> String {
        format!(
            "ssh://{}@{}:{}{}",
            self.user, self.host, self.port, self.path
        )
    }
}

struct UrlParts<'a> {
    userinfo: Option<&'a str>,
    authority: &'a str,
    host: &'a str,
    port: u16,
    path: String,
}

/// Splits what follows `SCHEME://` into userinfo, authority (host and port) and a path of at
/// least two segments (no trailing slash).
fn split_url<'a>(
    url: &str,
    rest: &'a str,
    default_port: u16,
    expected: &'static str,
) -> Result<UrlParts<'a>, UrlError> {
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
        split_host_port(authority, default_port).ok_or(UrlError::BadPort { url: url.into() })?;
    let path = path.trim_end_matches('/').to_owned();
    if path
        .trim_start_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .count()
        < 2
    {
        return Err(UrlError::NoRepository {
            url: url.into(),
            expected,
        });
    }
    Ok(UrlParts {
        userinfo,
        authority,
        host,
        port,
        path,
    })
}

/// The address of `HOST[:PORT]` (`default_port` when absent).
///
/// # Errors
/// On a bad port or an unresolvable host.
pub fn resolve_authority(authority: &str, default_port: u16) -> Result<SocketAddr, UrlError> {
    let (host, port) = split_host_port(authority, default_port).ok_or(UrlError::BadPort {
        url: authority.into(),
    })?;
    resolve(host, port)
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, UrlError> {
    (host, port)
        .to_socket_addrs()
        .map_err(|source| UrlError::Resolve {
            host: host.into(),
            source,
        })?
        .next()
        .ok_or_else(|| UrlError::NoAddress { host: host.into() })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; `default_port` when absent.
fn split_host_port(authority: &str, default_port: u16) -> Option<(&str, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(p) => Some((host, p.parse().ok()?)),
            None if after.is_empty() => Some((host, default_port)),
            None => None,
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h, p.parse().ok()?)),
        None => Some((authority, default_port)),
    }
}

/// `%XX` escapes in URL userinfo (a password with `@` or `:` must be written escaped), and in
/// gRPC's `grpc-message`.
pub fn percent_decode(s: &str) -> String {
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
    fn git_and_ssh_urls() {
        let t = Target::parse("git://127.0.0.1/o/r.git", None, None).unwrap();
        assert_eq!(t.scheme, Scheme::Git);
        assert_eq!(t.addr.port(), 9418);
        assert_eq!(t.display_url(), "git://127.0.0.1/o/r.git");
        assert_eq!(t.repository(), "o/r.git");
        let s = SshTarget::parse("ssh://git@127.0.0.1:2222/o/r.git").unwrap();
        assert_eq!((s.user.as_str(), s.port), ("git", 2222));
        assert_eq!(s.path, "/o/r.git");
        assert_eq!(s.display_url(), "ssh://git@127.0.0.1:2222/o/r.git");
        let s = SshTarget::parse("ssh://[::1]/srv/git/r.git").unwrap();
        assert_eq!(
            (s.user.as_str(), s.host.as_str(), s.port),
            ("git", "::1", 22)
        );
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
            Err(UrlError::Unsupported { .. })
        ));
        assert!(matches!(
            Target::parse("git://u@127.0.0.1/o/r", None, None),
            Err(UrlError::GitCredentials { .. })
        ));
        assert!(matches!(
            SshTarget::parse("http://127.0.0.1/o/r"),
            Err(UrlError::NotSsh { .. })
        ));
        assert!(matches!(
            SshTarget::parse("ssh://127.0.0.1:22"),
            Err(UrlError::NoRepository { .. })
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
