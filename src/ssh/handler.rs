//! The russh [`Handler`] of one connection: public-key authentication against the store, and
//! the channel policy. Secure by default, as russh's trait is: only what is implemented here is
//! allowed.
//!
//! - Auth: SSH user `git`, public key only, Ed25519/ECDSA/RSA-SHA2 ([`super::keys`]); the key
//!   names the gitplane user.
//! - Channels: session channels only (a few per connection); direct-tcpip, X11, agent and
//!   streamlocal channels and remote forwarding are refused.
//! - Requests: `env GIT_PROTOCOL` is kept; `exec` of the commands in [`super::command`] runs;
//!   `pty-req`, `x11-req`, agent forwarding and other env variables get a failure reply;
//!   `shell`, `subsystem` and unknown commands get a message on stderr and exit status 1.
//!
//! Before `exec`, a channel must not be able to park the session: russh hands every channel
//! message to the channel's bounded queue, which nobody reads until git runs. So a channel that
//! sends data, or too many requests, before `exec` is closed.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use russh::keys::{Algorithm, PublicKey};
use russh::server::{
    Auth, ChannelOpenHandle, Handler, Msg, PublicKeyOffer, Session, VerifiedPublicKey,
};
use russh::{Channel, ChannelId, ChannelOpenFailure};
use tokio::sync::watch;

use super::command::{parse_exec, ExecRequest};
use super::exec::{self, ExecContext};
use super::keys::{fingerprint, signature_algorithm_allowed};
use super::lfs::{authenticate_response, lfs_href};
use super::lfs_transfer;
use super::phase::{ExecGuard, Phase};
use super::{with_store, SshError, SshShared};
use crate::admission::AddressSlot as PreAuthSlot;
use crate::auth::{decide, Decision};
use crate::cluster::membership::Route;
use crate::git::process::{sanitize_git_protocol, RemoteExec};
use crate::git::repo_name::RepoName;
use crate::metrics::METRICS;
use crate::runtime::sidecar::StopSignal;
use crate::store::Access;
use crate::token::{self, Operation};

/// The only SSH user name; the key says who the person is.
pub const SSH_USER: &str = "git";
/// Requests a channel may make before `exec` (OpenSSH sends a handful of env and pty requests).
const MAX_REQUESTS_BEFORE_EXEC: usize = 32;

/// Holds a pre-auth slot and the gauge of unauthenticated connections until auth succeeds or
/// the connection ends.
pub(super) struct PreAuthGuard {
    _slot: PreAuthSlot,
}

impl PreAuthGuard {
    pub fn new(slot: PreAuthSlot) -> Self {
        METRICS.ssh.unauthenticated.inc();
        Self { _slot: slot }
    }
}

impl Drop for PreAuthGuard {
    fn drop(&mut self) {
        METRICS.ssh.unauthenticated.dec();
    }
}

/// A session channel that has not run a command yet.
struct Pending {
    channel: Channel<Msg>,
    protocol: Option<String>,
    requests: usize,
}

pub(super) struct ConnHandler {
    shared: Arc<SshShared>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    preauth: Option<PreAuthGuard>,
    /// The gitplane user, once authenticated.
    user: Option<String>,
    /// (fingerprint, user) of the last key that passed the offer check, to skip a second
    /// store lookup when the client then signs with it.
    offered: Option<(String, String)>,
    phase: Arc<watch::Sender<Phase>>,
    dead: watch::Receiver<bool>,
    stop: StopSignal,
    pending: HashMap<ChannelId, Pending>,
    open: HashSet<ChannelId>,
}

impl ConnHandler {
    pub fn new(
        shared: Arc<SshShared>,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        preauth: PreAuthGuard,
        phase: Arc<watch::Sender<Phase>>,
        dead: watch::Receiver<bool>,
        stop: StopSignal,
    ) -> Self {
        Self {
            shared,
            peer,
            local,
            preauth: Some(preauth),
            user: None,
            offered: None,
            phase,
            dead,
            stop,
            pending: HashMap::new(),
            open: HashSet::new(),
        }
    }

    /// The gitplane user a key belongs to, if the SSH user, algorithm and key are acceptable.
    async fn check_key(
        &mut self,
        ssh_user: &str,
        key: &PublicKey,
        algorithm: &Algorithm,
    ) -> Result<Option<String>, SshError> {
        if ssh_user != SSH_USER {
            METRICS.ssh.auth_rejected.inc();
            tracing::info!(peer = %self.peer, user = %ssh_user.escape_debug(), "SSH login refused: the user name must be `git`");
            return Ok(None);
        }
        if !signature_algorithm_allowed(algorithm) {
            METRICS.ssh.auth_rejected.inc();
            tracing::info!(peer = %self.peer, algorithm = %algorithm, "SSH key refused: algorithm not allowed");
            return Ok(None);
        }
        let fp = fingerprint(key);
        if let Some((f, user)) = &self.offered {
            if *f == fp {
                return Ok(Some(user.clone()));
            }
        }
        let lookup = fp.clone();
        let user = with_store(self.shared.config.store.clone(), move |s| {
            s.user_for_ssh_key(&lookup)
        })
        .await?;
        match user {
            Some(u) => {
                self.offered = Some((fp, u.clone()));
                Ok(Some(u))
            }
            None => {
                METRICS.ssh.auth_rejected.inc();
                tracing::info!(peer = %self.peer, fingerprint = %fp, "SSH key refused: not registered");
                Ok(None)
            }
        }
    }

    /// Counts a request on a channel that has not run a command; closes abusive channels.
    /// Returns whether the channel is still usable.
    fn note_request(&mut self, id: ChannelId, session: &mut Session) -> Result<bool, SshError> {
        let Some(p) = self.pending.get_mut(&id) else {
            return Ok(false);
        };
        p.requests += 1;
        if p.requests > MAX_REQUESTS_BEFORE_EXEC {
            self.pending.remove(&id);
            METRICS.ssh.requests_refused.inc();
            session.close(id)?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Refuses a shell/exec/subsystem: success reply (so the client shows our message), the
    /// message on stderr, exit status 1, close.
    fn refuse(
        &mut self,
        id: ChannelId,
        session: &mut Session,
        message: &str,
    ) -> Result<(), SshError> {
        METRICS.ssh.requests_refused.inc();
        // Drop the channel's queue first: nobody will read it.
        self.pending.remove(&id);
        session.channel_success(id)?;
        session.extended_data(id, 1, format!("gitplane: {message}\n").into_bytes())?;
        session.exit_status_request(id, 1)?;
        session.eof(id)?;
        session.close(id)?;
        Ok(())
    }

    /// `ssh://git@HOST:PORT`, for messages.
    fn ssh_url(&self) -> String {
        match self.local {
            Some(a) => format!("ssh://{SSH_USER}@{a}"),
            None => format!("ssh://{SSH_USER}@HOST"),
        }
    }

    async fn authorize(
        &self,
        repo: &RepoName,
        need: Access,
    ) -> Result<Result<(String, Option<RemoteExec>), String>, SshError> {
        let Some(user) = self.user.clone() else {
            return Ok(Err("not authenticated".into()));
        };
        let (r, u) = (repo.clone(), user.clone());
        let routing = self.shared.config.cluster_routing();
        let (access, route) = with_store(self.shared.config.store.clone(), move |s| {
            let access = s.repo_access(&r, Some(&u))?;
            let route = match (&routing, &access) {
                (Some(routing), Some(a)) => routing.route_among(s, &r.to_string(), &a.replicas)?,
                _ => Route::Local,
            };
            Ok((access, route))
        })
        .await?;
        if let Some(node) = access.as_ref().and_then(|a| a.elsewhere.as_deref()) {
            tracing::info!(repo = %repo, node, "repository lives on another node");
            return Ok(Err(format!("repository {repo} not found")));
        }
        Ok(match decide(access, true, need) {
            Decision::Allow => match route {
                Route::Local => Ok((user, None)),
                Route::Remote(remote) => Ok((user, Some(remote))),
                Route::NoCurrentReplica => Err(format!(
                    "no up-to-date copy of {repo} is reachable now; try again shortly"
                )),
            },
            Decision::Forbidden => Err(format!(
                "{user} may not {} {repo}",
                if need >= Access::Write {
                    "push to"
                } else {
                    "read"
                }
            )),
            Decision::NotFound | Decision::Unauthorized => {
                Err(format!("repository {repo} not found"))
            }
        })
    }

    fn lfs_authenticate(
        &self,
        id: ChannelId,
        session: &mut Session,
        user: &str,
        repo: &RepoName,
        operation: Operation,
    ) -> Result<(), SshError> {
        let ttl = self.shared.limits.lfs_token_ttl;
        let now = crate::clock::unix_now();
        let token = token::mint(
            &self.shared.tokens,
            user,
            repo,
            operation,
            now.saturating_add(ttl.as_secs()),
        );
        // A wildcard HTTP listen address is no use in a URL: use the address this client
        // reached us on, with the HTTP port.
        let mut http = self.shared.http_addr;
        if http.ip().is_unspecified() {
            if let Some(local) = self.local {
                http.set_ip(local.ip());
            }
        }
        let body = authenticate_response(&lfs_href(http, repo), &token, ttl.as_secs());
        METRICS.ssh.execs.inc();
        session.channel_success(id)?;
        session.data(id, body.into_bytes())?;
        session.exit_status_request(id, 0)?;
        session.eof(id)?;
        session.close(id)?;
        Ok(())
    }
}

impl Handler for ConnHandler {
    type Error = SshError;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(
            match self
                .check_key(user, offer.public_key, offer.algorithm)
                .await?
            {
                Some(_) => Auth::Accept,
                None => Auth::reject(),
            },
        )
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(
            match self.check_key(user, key.public_key, key.algorithm).await? {
                Some(name) => {
                    self.user = Some(name);
                    Auth::Accept
                }
                None => Auth::reject(),
            },
        )
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        // Frees the pre-auth slot: the deadline and caps no longer apply.
        self.preauth = None;
        self.phase.send_modify(|p| p.authenticated = true);
        METRICS.ssh.handshakes_completed.inc();
        tracing::debug!(peer = %self.peer, user = ?self.user, "SSH authenticated");
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.open.len() >= self.shared.limits.max_channels_per_connection {
            METRICS.ssh.requests_refused.inc();
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        let id = channel.id();
        reply.accept().await;
        self.open.insert(id);
        self.pending.insert(
            id,
            Pending {
                channel,
                protocol: None,
                requests: 0,
            },
        );
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        tracing::info!(peer = %self.peer, host = %host.escape_debug(), port, "SSH port forwarding refused");
        refuse_channel(reply).await;
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse_channel(reply).await;
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        refuse_channel(reply).await;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        METRICS.ssh.requests_refused.inc();
        tracing::info!(peer = %self.peer, address = %address.escape_debug(), port = *port, "SSH remote forwarding refused");
        Ok(false)
    }

    async fn streamlocal_forward(
        &mut self,
        _socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        METRICS.ssh.requests_refused.inc();
        Ok(false)
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.pending.remove(&channel);
        self.open.remove(&channel);
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Data before exec would pile up in a queue nobody reads: close the channel.
        if self.pending.remove(&channel).is_some() {
            METRICS.ssh.requests_refused.inc();
            session.close(channel)?;
        }
        Ok(())
    }

    async fn extended_data(
        &mut self,
        channel: ChannelId,
        _code: u32,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.data(channel, data, session).await
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self.note_request(channel, session)? {
            return Ok(());
        }
        let protocol = (name == "GIT_PROTOCOL")
            .then(|| sanitize_git_protocol(value))
            .flatten();
        match (protocol, self.pending.get_mut(&channel)) {
            (Some(v), Some(p)) => {
                p.protocol = Some(v.to_owned());
                session.channel_success(channel)?;
            }
            _ => session.channel_failure(channel)?,
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.note_request(channel, session)? {
            METRICS.ssh.requests_refused.inc();
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.note_request(channel, session)? {
            METRICS.ssh.requests_refused.inc();
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.note_request(channel, session)?;
        METRICS.ssh.requests_refused.inc();
        Ok(false)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self.pending.contains_key(&channel) {
            return Ok(());
        }
        let msg = format!(
            "hi {}! You have authenticated, but this server has no shell access.\nUse git: git clone {}/OWNER/NAME.git",
            self.user.as_deref().unwrap_or("?"),
            self.ssh_url()
        );
        self.refuse(channel, session, &msg)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self.pending.contains_key(&channel) {
            return Ok(());
        }
        let msg = format!(
            "subsystem `{}` is not available; only git commands run here",
            name.escape_debug()
        );
        self.refuse(channel, session, &msg)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self.pending.contains_key(&channel) {
            // Closed for abuse, or a second command on one channel.
            session.channel_failure(channel)?;
            return Ok(());
        }
        if *self.stop.borrow() {
            return self.refuse(
                channel,
                session,
                "the server is shutting down; retry in a moment",
            );
        }
        let request = match parse_exec(data) {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(peer = %self.peer, error = %e, "SSH exec refused");
                return self.refuse(channel, session, &e.to_string());
            }
        };
        let (repo, need) = match &request {
            ExecRequest::Git { service, repo } => (
                repo.clone(),
                if service.writes() {
                    Access::Write
                } else {
                    Access::Read
                },
            ),
            ExecRequest::LfsAuthenticate { repo, operation }
            | ExecRequest::LfsTransfer { repo, operation } => (
                repo.clone(),
                match operation {
                    Operation::Upload => Access::Write,
                    Operation::Download => Access::Read,
                },
            ),
        };
        let (user, remote) = match self.authorize(&repo, need).await? {
            Ok(u) => u,
            Err(msg) => {
                tracing::info!(peer = %self.peer, user = ?self.user, %repo, "SSH access refused: {msg}");
                return self.refuse(channel, session, &msg);
            }
        };
        match request {
            ExecRequest::LfsAuthenticate { repo, operation } => {
                self.pending.remove(&channel);
                self.lfs_authenticate(channel, session, &user, &repo, operation)
            }
            ExecRequest::LfsTransfer { repo, operation } => {
                let Some(pending) = self.pending.remove(&channel) else {
                    session.channel_failure(channel)?;
                    return Ok(());
                };
                session.channel_success(channel)?;
                METRICS.ssh.execs.inc();
                tracing::debug!(peer = %self.peer, %user, %repo, operation = operation.as_str(), "git-lfs-transfer session started");
                let ctx = lfs_transfer::TransferContext {
                    shared: Arc::clone(&self.shared),
                    user,
                    repo,
                    operation,
                    peer: self.peer,
                    dead: self.dead.clone(),
                };
                let guard = ExecGuard::new(Arc::clone(&self.phase));
                tokio::spawn(lfs_transfer::run(ctx, guard, pending.channel));
                Ok(())
            }
            ExecRequest::Git { service, repo } => {
                let Some(pending) = self.pending.remove(&channel) else {
                    session.channel_failure(channel)?;
                    return Ok(());
                };
                session.channel_success(channel)?;
                METRICS.ssh.execs.inc();
                let ctx = ExecContext {
                    shared: Arc::clone(&self.shared),
                    user,
                    repo,
                    service,
                    protocol: pending.protocol,
                    peer: self.peer,
                    dead: self.dead.clone(),
                    remote,
                };
                let guard = ExecGuard::new(Arc::clone(&self.phase));
                tokio::spawn(exec::run(ctx, guard, pending.channel));
                Ok(())
            }
        }
    }
}

/// Refuses a channel type gitplane never serves (forwarding, X11, stream-local), and counts it.
async fn refuse_channel(reply: ChannelOpenHandle) {
    METRICS.ssh.requests_refused.inc();
    reply
        .reject(ChannelOpenFailure::AdministrativelyProhibited)
        .await;
}
