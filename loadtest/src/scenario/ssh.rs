//! `ssh-clone`: a clone over SSH as `git clone ssh://...` makes it, with a russh client on the
//! thread's tokio runtime. Each iteration is a new SSH connection (key exchange, host key check,
//! public-key authentication), like a new `git` process: a session channel, the environment
//! request `GIT_PROTOCOL=version=2`, `exec git-upload-pack '/PATH'`, then the upload-pack
//! conversation on the channel ([`stream::converse`]), and the exit status.
//!
//! gitplane honours `GIT_PROTOCOL`; OpenSSH passes it to git-shell only with
//! `AcceptEnv GIT_PROTOCOL`. Without it upload-pack answers in protocol v0, and the clone is made
//! in v0 (`want` lines and `done`): the load is the same clone, in the older protocol.
//!
//! The host key is checked against the keys a known_hosts file holds for `[HOST]:PORT`, loaded
//! once at start-up, or not at all with `--insecure-accept-host-key`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use russh::client;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{Channel, ChannelMsg, Disconnect};
use thiserror::Error;

use super::{IterError, Iteration, Outcome, Workload};
use crate::net::NetError;
use crate::proto::ProtoError;
use crate::runtime::Tokio;
use crate::stream::{self, Duplex};
use crate::upload::Goal;
use crate::url::SshTarget;

/// Most stderr bytes kept from upload-pack for an error message.
const MAX_STDERR: usize = 1024;

/// Why an SSH iteration failed.
#[derive(Debug, Error)]
pub enum SshError {
    #[error("SSH: {0}")]
    Protocol(#[from] russh::Error),
    #[error("host key {fingerprint} of {host} is not in {known_hosts}")]
    HostKey {
        host: String,
        fingerprint: String,
        known_hosts: String,
    },
    #[error("the server refused public key authentication as `{user}`")]
    AuthRejected { user: String },
    #[error("the server refused to run `{command}`")]
    ExecRefused { command: String },
    #[error("upload-pack failed (exit status {status}): {stderr}")]
    Remote { status: String, stderr: String },
}

impl SshError {
    /// The key in the errors-by-kind table.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Protocol(_) => "ssh_protocol",
            Self::HostKey { .. } => "ssh_host_key",
            Self::AuthRejected { .. } => "ssh_auth",
            Self::ExecRefused { .. } => "ssh_exec_refused",
            Self::Remote { .. } => "ssh_remote_failed",
        }
    }
}

/// Why an ssh-clone load cannot start.
#[derive(Debug, Error)]
pub enum SshSetupError {
    #[error("--identity {path}: {source} (an unencrypted OpenSSH private key is needed)")]
    Identity {
        path: PathBuf,
        #[source]
        source: russh::keys::Error,
    },
    #[error("--known-hosts {path}: {source}")]
    KnownHostsRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--known-hosts {path}: {source}")]
    KnownHosts {
        path: PathBuf,
        #[source]
        source: russh::keys::Error,
    },
    #[error("--known-hosts {path} has no key for {host} (add `{host} KEYTYPE KEY`)")]
    NoHostKey { path: PathBuf, host: String },
}

/// How the server's host key is checked.
pub enum HostKeyPolicy {
    /// Against the keys this known_hosts file has for the host.
    KnownHosts(PathBuf),
    /// Not at all (`--insecure-accept-host-key`).
    AcceptAny,
}

enum HostKeys {
    Known { file: String, keys: Vec<PublicKey> },
    AcceptAny,
}

pub struct SshLoad {
    pub target: SshTarget,
    key: Arc<PrivateKey>,
    host_keys: Arc<HostKeys>,
    config: Arc<client::Config>,
    /// `git-upload-pack '/PATH'`.
    command: String,
}

impl SshLoad {
    /// Loads the identity and the host keys once.
    ///
    /// # Errors
    /// When the identity cannot be read or decoded, or the known_hosts file cannot be read or
    /// has no key for the host.
    pub fn new(
        target: SshTarget,
        identity: &Path,
        policy: HostKeyPolicy,
    ) -> Result<Self, SshSetupError> {
        let key = russh::keys::load_secret_key(identity, None).map_err(|source| {
            SshSetupError::Identity {
                path: identity.to_owned(),
                source,
            }
        })?;
        let host_keys = match policy {
            HostKeyPolicy::AcceptAny => HostKeys::AcceptAny,
            HostKeyPolicy::KnownHosts(path) => {
                // russh treats an unreadable file as an empty one; say what is wrong instead.
                std::fs::metadata(&path).map_err(|source| SshSetupError::KnownHostsRead {
                    path: path.clone(),
                    source,
                })?;
                let keys: Vec<PublicKey> = russh::keys::known_hosts::known_host_keys_path(
                    &target.host,
                    target.port,
                    &path,
                )
                .map_err(|source| SshSetupError::KnownHosts {
                    path: path.clone(),
                    source,
                })?
                .into_iter()
                .map(|(_line, key)| key)
                .collect();
                if keys.is_empty() {
                    return Err(SshSetupError::NoHostKey {
                        path,
                        host: known_hosts_name(&target),
                    });
                }
                HostKeys::Known {
                    file: path.display().to_string(),
                    keys,
                }
            }
        };
        let config = client::Config {
            // Requests are small and answered at once; Nagle would only delay them.
            nodelay: true,
            ..Default::default()
        };
        let command = format!("git-upload-pack {}", sq_quote(&target.path));
        Ok(Self {
            target,
            key: Arc::new(key),
            host_keys: Arc::new(host_keys),
            config: Arc::new(config),
            command,
        })
    }

    async fn connect(&self) -> Result<client::Handle<Verifier>, IterError> {
        let addr = self.target.addr;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| NetError::Connect { addr, source })?;
        let verifier = Verifier {
            keys: Arc::clone(&self.host_keys),
            host: known_hosts_name(&self.target),
        };
        let mut handle = client::connect_stream(Arc::clone(&self.config), tcp, verifier).await?;
        let hash = if self.key.algorithm().is_rsa() {
            handle
                .best_supported_rsa_hash()
                .await
                .map_err(SshError::from)?
                .flatten()
        } else {
            None
        };
        let auth = handle
            .authenticate_publickey(
                &self.target.user,
                PrivateKeyWithHashAlg::new(Arc::clone(&self.key), hash),
            )
            .await
            .map_err(SshError::from)?;
        if !auth.success() {
            return Err(SshError::AuthRejected {
                user: self.target.user.clone(),
            }
            .into());
        }
        Ok(handle)
    }

    async fn clone_once(&self, capture: bool) -> Result<Outcome, IterError> {
        let handle = self.connect().await?;
        let channel = handle
            .channel_open_session()
            .await
            .map_err(SshError::from)?;
        // No reply asked: a server that does not take it answers in v0, which is handled.
        channel
            .set_env(false, "GIT_PROTOCOL", "version=2")
            .await
            .map_err(SshError::from)?;
        channel
            .exec(true, self.command.as_bytes())
            .await
            .map_err(SshError::from)?;
        let mut io = ExecChannel {
            channel,
            command: &self.command,
            piece: Bytes::new(),
            stderr: Vec::new(),
            exit: None,
            ended: false,
        };
        let result = stream::converse(&mut io, Goal::Clone { capture }).await;
        // After a complete conversation, or when upload-pack hung up early, its exit status
        // follows; git waits for it too. After other failures the channel is dropped at once.
        if result.is_ok() || io.ended {
            io.wait_exit().await;
        }
        let _ = handle.disconnect(Disconnect::ByApplication, "", "en").await;
        let failed = io.exit.is_some_and(|s| s != 0);
        let remote = |io: &ExecChannel<'_>| SshError::Remote {
            status: io.exit.map_or_else(|| "none".into(), |s| s.to_string()),
            stderr: String::from_utf8_lossy(&io.stderr)
                .trim()
                .escape_default()
                .to_string(),
        };
        match result {
            Ok(session) if !failed => Ok(Outcome {
                bytes: session.pack_bytes,
                pack: session.pack,
                protocol: session.version,
            }),
            Ok(_) => Err(remote(&io).into()),
            // upload-pack hung up early and said why on stderr, or with its status.
            Err(IterError::Proto(ProtoError::Truncated(_))) if failed || !io.stderr.is_empty() => {
                Err(remote(&io).into())
            }
            Err(e) => Err(e),
        }
    }
}

impl Workload for SshLoad {
    type Rt = Tokio;
    type Client = ();

    fn client(&self) {}

    async fn iterate(&self, _client: &(), it: Iteration<'_>) -> Result<Outcome, IterError> {
        self.clone_once(it.capture).await
    }
}

/// Checks the server's host key.
struct Verifier {
    keys: Arc<HostKeys>,
    host: String,
}

impl client::Handler for Verifier {
    type Error = SshError;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, SshError> {
        let HostKeys::Known { file, keys } = &*self.keys else {
            return Ok(true);
        };
        let fingerprint = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                if keys.iter().any(|k| k.key_data() == key.key_data()) {
                    return Ok(true);
                }
                key.fingerprint(HashAlg::Sha256).to_string()
            }
            PublicKeyOrCertificate::Certificate(c) => {
                format!(
                    "(a certificate signed by {})",
                    c.signature_key().fingerprint(HashAlg::Sha256)
                )
            }
        };
        Err(SshError::HostKey {
            host: self.host.clone(),
            fingerprint,
            known_hosts: file.clone(),
        })
    }
}

/// The exec channel as upload-pack's stdin and stdout; stderr and the exit status are kept.
struct ExecChannel<'a> {
    channel: Channel<client::Msg>,
    command: &'a str,
    piece: Bytes,
    stderr: Vec<u8>,
    exit: Option<u32>,
    /// The server sent EOF or closed the channel.
    ended: bool,
}

impl ExecChannel<'_> {
    /// Reads what follows the server's EOF: the exit status, then the close.
    async fn wait_exit(&mut self) {
        while let Some(msg) = self.channel.wait().await {
            match msg {
                ChannelMsg::ExitStatus { exit_status } => self.exit = Some(exit_status),
                ChannelMsg::Close => break,
                ChannelMsg::ExtendedData { data, ext: 1 } => self.keep_stderr(&data),
                _ => {}
            }
        }
    }

    fn keep_stderr(&mut self, data: &[u8]) {
        let room = MAX_STDERR.saturating_sub(self.stderr.len());
        self.stderr
            .extend_from_slice(data.get(..room.min(data.len())).unwrap_or_default());
    }
}

impl Duplex for ExecChannel<'_> {
    type Error = IterError;

    async fn send(&mut self, data: Vec<u8>) -> Result<(), IterError> {
        self.channel
            .data_bytes(data)
            .await
            .map_err(SshError::from)?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Option<&[u8]>, IterError> {
        loop {
            match self.channel.wait().await {
                Some(ChannelMsg::Data { data }) if !data.is_empty() => {
                    self.piece = data;
                    return Ok(Some(&self.piece));
                }
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => self.keep_stderr(&data),
                Some(ChannelMsg::ExitStatus { exit_status }) => self.exit = Some(exit_status),
                // The answer to `exec` (we asked for one).
                Some(ChannelMsg::Failure) => {
                    return Err(SshError::ExecRefused {
                        command: self.command.to_owned(),
                    }
                    .into())
                }
                Some(ChannelMsg::Eof | ChannelMsg::Close) | None => {
                    self.ended = true;
                    return Ok(None);
                }
                Some(_) => {}
            }
        }
    }
}

/// The host as known_hosts names it: `HOST`, or `[HOST]:PORT` off port 22.
fn known_hosts_name(target: &SshTarget) -> String {
    if target.port == 22 {
        target.host.clone()
    } else {
        format!("[{}]:{}", target.host, target.port)
    }
}

/// Quotes `s` for a POSIX shell as git does (`'...'`, with `'` written as `'\''`).
fn sq_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_like_git() {
        assert_eq!(sq_quote("/o/r.git"), "'/o/r.git'");
        assert_eq!(sq_quote("/it's"), r"'/it'\''s'");
    }
}
