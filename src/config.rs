//! Configuration in two stages: [`FileConfig`] is what a user writes in TOML (every field optional,
//! defaults documented here), [`ServeConfig`] is the validated runtime form built once at start-up.
//! Command-line flags override the file; nothing deeper in the code reads configuration ad hoc.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./gitplane-data";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for gitplane: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The TOML file, as written by a user. See `docs/CONFIG.md` for an annotated example.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Where repositories, the database and keys live. Default `./gitplane-data`.
    pub data_dir: Option<PathBuf>,
    pub http: HttpSection,
    pub tcp: TcpSection,
    pub runtime: RuntimeSection,
    pub git: GitSection,
    pub shutdown: ShutdownSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Address of the Git smart HTTP listener. Default `127.0.0.1:8080`.
    pub listen: String,
    /// Open connections one shard accepts before it answers 503. Default 16384.
    pub max_connections_per_shard: usize,
    /// Seconds a client has to send a whole request head (slowloris defence). Default 10.
    pub head_timeout_secs: u64,
    /// Seconds an idle keep-alive connection is kept. Default 60.
    pub idle_timeout_secs: u64,
    /// Largest request head accepted, in bytes. Default 16384.
    pub max_head_bytes: usize,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_connections_per_shard: 16384,
            head_timeout_secs: 10,
            idle_timeout_secs: 60,
            max_head_bytes: 16 * 1024,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpSection {
    /// Idle seconds before the kernel sends the first keepalive probe. Default 60.
    pub keepalive_idle_secs: u64,
    /// Seconds between keepalive probes. Default 10.
    pub keepalive_interval_secs: u64,
    /// Unanswered probes before the kernel drops the connection. Default 6.
    pub keepalive_probes: u32,
    /// TCP_USER_TIMEOUT: seconds unacknowledged data may wait before the kernel drops the
    /// connection (0 = kernel default). Default 120.
    pub user_timeout_secs: u64,
}

impl Default for TcpSection {
    fn default() -> Self {
        Self {
            keepalive_idle_secs: 60,
            keepalive_interval_secs: 10,
            keepalive_probes: 6,
            user_timeout_secs: 120,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSection {
    /// Shard threads (0 = one per CPU). Default 0.
    pub shards: usize,
    /// Use the epoll driver even where io_uring works (for comparison and old kernels). Default false.
    pub force_epoll: bool,
    /// Threads for blocking work (SQLite, password hashing; 0 = 2 per shard). Default 0.
    pub blocking_threads: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GitSection {
    /// The git executable. Default `git` (looked up in PATH).
    pub binary: PathBuf,
    /// Pack generations (upload-pack, receive-pack) running at once on the node. Default 64.
    pub max_concurrent: usize,
    /// Pack generations running at once for one repository. Default 16.
    pub max_concurrent_per_repo: usize,
    /// Requests that may wait for a pack slot; beyond this they get 503. Default 256.
    pub max_queued: usize,
    /// Seconds a request waits for a pack slot before 503. Default 30.
    pub queue_timeout_secs: u64,
}

impl Default for GitSection {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("git"),
            max_concurrent: 64,
            max_concurrent_per_repo: 16,
            max_queued: 256,
            queue_timeout_secs: 30,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownSection {
    /// Seconds in-flight transfers may run after SIGTERM before they are cut. Default 30.
    pub grace_secs: u64,
}

impl Default for ShutdownSection {
    fn default() -> Self {
        Self { grace_secs: 30 }
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}

/// Flags of `gitplane serve` that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub http_listen: Option<String>,
    pub shards: Option<usize>,
    pub force_epoll: bool,
}

/// Validated runtime configuration of `gitplane serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub http_listen: SocketAddr,
    pub shards: NonZeroUsize,
    pub force_epoll: bool,
    pub blocking_threads: NonZeroUsize,
    pub http: HttpLimits,
    pub tcp: TcpOptions,
    pub git: GitLimits,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub max_connections_per_shard: usize,
    pub head_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_head_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct TcpOptions {
    pub keepalive_idle: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_probes: u32,
    pub user_timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct GitLimits {
    pub binary: PathBuf,
    pub max_concurrent: usize,
    pub max_concurrent_per_repo: usize,
    pub max_queued: usize,
    pub queue_timeout: Duration,
}

fn positive_secs(field: &'static str, secs: u64) -> Result<Duration, ConfigError> {
    if secs == 0 {
        return Err(invalid(field, "must be at least 1 second"));
    }
    Ok(Duration::from_secs(secs))
}

fn at_least_one(field: &'static str, n: usize) -> Result<usize, ConfigError> {
    if n == 0 {
        return Err(invalid(field, "must be at least 1"));
    }
    Ok(n)
}

impl ServeConfig {
    /// Merges flags over the file and validates the result.
    pub fn build(file: FileConfig, flags: Overrides) -> Result<Self, ConfigError> {
        let data_dir = flags
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let h = file.http;
        let listen_text = flags.http_listen.unwrap_or_else(|| h.listen.clone());
        let http_listen: SocketAddr = listen_text.parse().map_err(|e| {
            invalid(
                "http.listen",
                format!("`{listen_text}` is not an IP:PORT address ({e})"),
            )
        })?;
        let shards = match flags.shards.unwrap_or(file.runtime.shards) {
            0 => std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            n => NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN),
        };
        if shards.get() > 1024 {
            return Err(invalid("runtime.shards", "at most 1024 shards"));
        }
        let blocking_threads = match file.runtime.blocking_threads {
            0 => shards.saturating_mul(NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN)),
            n => NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN),
        };
        if h.max_head_bytes < 1024 || h.max_head_bytes > 1024 * 1024 {
            return Err(invalid(
                "http.max_head_bytes",
                "must be between 1024 and 1048576",
            ));
        }
        let http = HttpLimits {
            max_connections_per_shard: at_least_one(
                "http.max_connections_per_shard",
                h.max_connections_per_shard,
            )?,
            head_timeout: positive_secs("http.head_timeout_secs", h.head_timeout_secs)?,
            idle_timeout: positive_secs("http.idle_timeout_secs", h.idle_timeout_secs)?,
            max_head_bytes: h.max_head_bytes,
        };
        let t = file.tcp;
        if t.keepalive_probes == 0 {
            return Err(invalid("tcp.keepalive_probes", "must be at least 1"));
        }
        let tcp = TcpOptions {
            keepalive_idle: positive_secs("tcp.keepalive_idle_secs", t.keepalive_idle_secs)?,
            keepalive_interval: positive_secs(
                "tcp.keepalive_interval_secs",
                t.keepalive_interval_secs,
            )?,
            keepalive_probes: t.keepalive_probes,
            user_timeout: (t.user_timeout_secs > 0)
                .then(|| Duration::from_secs(t.user_timeout_secs)),
        };
        let g = file.git;
        let git = GitLimits {
            binary: g.binary,
            max_concurrent: at_least_one("git.max_concurrent", g.max_concurrent)?,
            max_concurrent_per_repo: at_least_one(
                "git.max_concurrent_per_repo",
                g.max_concurrent_per_repo,
            )?,
            max_queued: g.max_queued,
            queue_timeout: positive_secs("git.queue_timeout_secs", g.queue_timeout_secs)?,
        };
        Ok(Self {
            data_dir,
            http_listen,
            shards,
            force_epoll: flags.force_epoll || file.runtime.force_epoll,
            blocking_threads,
            http,
            tcp,
            git,
            shutdown_grace: Duration::from_secs(file.shutdown.grace_secs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = ServeConfig::build(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(c.http_listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    }

    #[test]
    fn flags_override_file() {
        let file: FileConfig =
            toml::from_str("data_dir = \"/a\"\n[http]\nlisten = \"127.0.0.1:1\"\n").unwrap();
        let flags = Overrides {
            data_dir: Some("/b".into()),
            http_listen: Some("127.0.0.1:2".into()),
            shards: Some(3),
            force_epoll: false,
        };
        let c = ServeConfig::build(file, flags).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/b"));
        assert_eq!(c.http_listen.port(), 2);
        assert_eq!(c.shards.get(), 3);
    }

    #[test]
    fn errors_name_the_field() {
        let file: FileConfig = toml::from_str("[http]\nhead_timeout_secs = 0\n").unwrap();
        let err = ServeConfig::build(file, Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("http.head_timeout_secs"), "{err}");
        let flags = Overrides {
            http_listen: Some("nope".into()),
            ..Overrides::default()
        };
        let err = ServeConfig::build(FileConfig::default(), flags).unwrap_err();
        assert!(err.to_string().contains("http.listen"), "{err}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(toml::from_str::<FileConfig>("[http]\nlisen = \"x\"\n").is_err());
    }
}
