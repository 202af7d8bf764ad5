//! The `gitplane` binary: command-line parsing and the error edge (anyhow) over the library.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

use gitplane::admin;
use gitplane::config::{FileConfig, Overrides, ServeConfig, DEFAULT_DATA_DIR};
use gitplane::store::{Access, Location};

#[derive(Parser)]
#[command(
    name = "gitplane",
    version,
    about = "Git hosting data plane: smart HTTP, thread-per-core on io_uring"
)]
struct Cli {
    /// Data directory: repositories, database, keys. Default ./gitplane-data.
    #[arg(long, global = true, env = "GITPLANE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// PostgreSQL store shared by several nodes (`postgres://USER[:PASSWORD]@HOST/DB`); default:
    /// the embedded SQLite file in the data directory. `serve` also reads `[store] url`.
    #[arg(
        long,
        global = true,
        env = "GITPLANE_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// This node's name in a shared store [default: the host name].
    #[arg(long, global = true, env = "GITPLANE_NODE_ID")]
    node_id: Option<String>,
    /// The cluster secret (the same file on every node): `serve` joins the cluster with it
    /// (with --cluster-listen), and the admin commands act on the cluster.
    #[arg(long, global = true, env = "GITPLANE_CLUSTER_SECRET_FILE")]
    cluster_secret_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server until SIGTERM/SIGINT.
    Serve(ServeArgs),
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage repositories.
    #[command(subcommand)]
    Repo(RepoCommand),
    /// Manage users' SSH public keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Git hooks (run by git, not by hand).
    #[command(subcommand)]
    Hook(HookCommand),
    /// Manage webhooks.
    #[command(subcommand)]
    Webhook(WebhookCommand),
    /// Check this node's kernel and limits against tuning/.
    #[command(subcommand)]
    Tune(TuneCommand),
    /// Hot upgrade: the server named by the pid file starts the binary now on disk, hands it its
    /// listening sockets, and drains once the new one is ready; waits for that and reports.
    Upgrade {
        #[arg(long)]
        pid_file: PathBuf,
        /// Seconds to wait for the new generation.
        #[arg(long, default_value_t = 90)]
        timeout_secs: u64,
    },
    /// The cluster: nodes, and repositories whose replicas disagree.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Cluster nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// SSH over WebSocket for OpenSSH's ProxyCommand:
    /// `ssh -o ProxyCommand='gitplane ssh-proxy ws://HOST:PORT/ssh' git@HOST` (or `wss://`).
    SshProxy {
        /// ws://HOST[:PORT]/ssh
        url: String,
        /// An extra request header, e.g. for an identity-aware proxy: `Authorization: Bearer ...`.
        #[arg(long = "header")]
        headers: Vec<String>,
        /// For wss://: trust the certificates in this PEM file instead of the system's roots.
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Runs git on another node's copy of a repository, stdio relayed (git and gitplane run it,
    /// not people).
    #[command(hide = true)]
    ClusterExec(ClusterExecArgs),
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Print every node (up or down, last heartbeat, replicas held) and every repository whose
    /// replicas disagree.
    Status,
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Move every replica off NODE (no new ones go there), so it can be retired.
    Drain { node: String },
}

#[derive(clap::Args)]
struct ClusterExecArgs {
    /// The node's --cluster-listen address.
    #[arg(long)]
    addr: String,
    #[arg(long)]
    secret_file: PathBuf,
    /// OWNER/NAME.
    #[arg(long)]
    repo: String,
    /// A replica's copy of a write coordinated by this node (no event, no coordination there).
    #[arg(long)]
    replica: bool,
    /// git-upload-pack, git-receive-pack or git-upload-archive.
    service: String,
    /// --stateless-rpc [--advertise-refs].
    #[arg(allow_hyphen_values = true)]
    args: Vec<String>,
}

#[derive(Subcommand)]
enum TuneCommand {
    /// Print each kernel setting and limit, the recommended value, OK/LOW and the fix.
    Check {
        /// Exit 1 when any setting is not OK.
        #[arg(long)]
        strict: bool,
    },
}

#[derive(Subcommand)]
enum HookCommand {
    /// Records the push read from stdin (`OLD NEW REF` lines) in the hook outbox.
    PostReceive,
    /// Records a ref transaction of a push (git's reference-transaction hook) as pending.
    ReferenceTransaction {
        /// prepared, committed or aborted.
        state: String,
    },
}

#[derive(Subcommand)]
enum WebhookCommand {
    /// Deliver every push to OWNER/NAME to URL (http://), signed with the secret read from stdin.
    Add {
        repo: String,
        url: String,
        /// Read the HMAC secret from standard input (required: secrets never go on the command line).
        #[arg(long, required = true)]
        secret_stdin: bool,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file (see docs/CONFIG.md); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Git smart HTTP listen address [default: 127.0.0.1:8080].
    #[arg(long)]
    http_listen: Option<String>,
    /// Join the cluster (with the PostgreSQL store and --cluster-secret-file): the address other
    /// nodes reach this one on.
    #[arg(long)]
    cluster_listen: Option<String>,
    /// Git over SSH listen address [default: 127.0.0.1:2222].
    #[arg(long)]
    ssh_listen: Option<String>,
    /// Shard threads [default: one per CPU].
    #[arg(long)]
    shards: Option<usize>,
    /// Use the epoll driver even where io_uring works.
    #[arg(long)]
    force_epoll: bool,
    /// gRPC repository API listen address (HTTP/2 cleartext) [default: 127.0.0.1:9090].
    #[arg(long)]
    rpc_listen: Option<String>,
    /// RabbitMQ URL for the hook workers [default: none, the embedded queue].
    #[arg(long)]
    amqp_url: Option<String>,
    /// Write the serving generation's pid here once it is ready (for `gitplane upgrade`).
    #[arg(long)]
    pid_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user; the password is read from stdin.
    Add {
        name: String,
        /// Read the password from standard input (required: passwords never go on the command line).
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// Set a user's password, read from stdin; the old one stops working on every node.
    Passwd {
        name: String,
        /// Read the password from standard input (required: passwords never go on the command line).
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// Remove a user with their SSH keys and grants.
    Remove { name: String },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Register the public key in FILE.pub (one OpenSSH key line) for USER.
    Add { user: String, file: PathBuf },
    /// List USER's keys with their SHA-256 fingerprints.
    List { user: String },
    /// Remove the key with this fingerprint (`SHA256:...`, as `key list` prints it).
    Remove { fingerprint: String },
}

#[derive(Subcommand)]
enum RepoCommand {
    /// Create a bare repository OWNER/NAME (in a cluster, on the least loaded nodes).
    Create {
        name: String,
        /// Anyone may clone it without credentials.
        #[arg(long)]
        public: bool,
        /// In a cluster: copies to keep (all nodes when fewer are up).
        #[arg(long, default_value_t = 3)]
        replication_factor: usize,
    },
    /// In a cluster: move OWNER/NAME's copy from one node to another (copy, verify, switch,
    /// delete).
    Move {
        name: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
    },
    /// Maintain OWNER/NAME now (repack, commit-graph, pack-refs, stale files) and print what ran.
    Maintain {
        name: String,
        /// Repack everything into one pack (unreachable objects into a cruft pack).
        #[arg(long)]
        full: bool,
        /// TOML configuration file for the `[housekeeping]` thresholds (default: built-in).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Give USER read, write or admin access to OWNER/NAME.
    Grant {
        repo: String,
        user: String,
        #[arg(value_parser = parse_access)]
        access: Access,
    },
    /// Take USER's grant on OWNER/NAME away.
    Revoke { repo: String, user: String },
}

/// What the cluster admin commands need.
struct AdminCluster {
    location: Location,
    routing: gitplane::cluster::membership::Routing,
    secret: gitplane::cluster::auth::Secret,
}

fn parse_access(s: &str) -> Result<Access, String> {
    s.parse()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let hook_env = std::env::var_os(gitplane::git::pack_cache::HOOK_ENV);
    if let Some((settings, command)) = gitplane::git::pack_cache::hook_invocation(&args, hook_env) {
        // stderr reaches the client as remote progress: say what failed, nothing more.
        match gitplane::git::pack_cache::run_hook(&settings, &command) {
            Ok(status) => std::process::exit(status),
            Err(e) => {
                eprintln!("gitplane: {e}");
                std::process::exit(128);
            }
        }
    }
    let cli = Cli::parse_from(args);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let data_dir_flag = cli.data_dir;
    let data_dir = || {
        data_dir_flag
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
    };
    // The admin commands' store: the same flags and variables as the server's.
    let location = || {
        Location::new(
            &data_dir(),
            cli.database_url.as_deref(),
            cli.node_id.as_deref(),
            2,
        )
    };
    // Opened and migrated up front, so a bad URL or a newer schema is the first thing said.
    let store = || -> anyhow::Result<Location> {
        let location = location()?;
        location.prepare()?;
        Ok(location)
    };
    // In a cluster (a shared store and the cluster secret), repo create/move and node drain act
    // on every node.
    let secret_file = cli.cluster_secret_file.clone();
    let cluster = |location: &Location| -> anyhow::Result<Option<AdminCluster>> {
        let (Some(file), Some(_)) = (&secret_file, location.pg_pool()) else {
            return Ok(None);
        };
        Ok(Some(AdminCluster {
            location: location.clone(),
            routing: gitplane::cluster::membership::Routing {
                node: location.node().to_owned(),
                secret_file: file.clone(),
                relay_cache: false,
            },
            secret: gitplane::cluster::auth::Secret::load(file)?,
        }))
    };
    match cli.command {
        Command::Serve(args) => serve(
            Overrides {
                data_dir: data_dir_flag.clone(),
                database_url: cli.database_url.clone(),
                node_id: cli.node_id.clone(),
                cluster_secret_file: cli.cluster_secret_file.clone(),
                ..Overrides::default()
            },
            args,
        ),
        Command::Tune(TuneCommand::Check { strict }) => {
            let findings = gitplane::tune::check();
            print!("{}", gitplane::tune::render(&findings));
            let all_ok = findings
                .iter()
                .all(|f| f.status == gitplane::tune::Status::Ok);
            if strict && !all_ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Upgrade {
            pid_file,
            timeout_secs,
        } => upgrade(&pid_file, std::time::Duration::from_secs(timeout_secs)),
        Command::User(UserCommand::Add { name, .. }) => {
            let password = admin::read_password(std::io::stdin().lock())?;
            admin::user_add(&store()?, &name, &password)
                .with_context(|| format!("adding user {name}"))?;
            println!("user {name} added");
            Ok(())
        }
        Command::User(UserCommand::Passwd { name, .. }) => {
            let password = admin::read_password(std::io::stdin().lock())?;
            admin::user_passwd(&store()?, &name, &password)
                .with_context(|| format!("setting the password of {name}"))?;
            println!("password of {name} changed");
            Ok(())
        }
        Command::User(UserCommand::Remove { name }) => {
            admin::user_remove(&store()?, &name)
                .with_context(|| format!("removing user {name}"))?;
            println!("user {name} removed");
            Ok(())
        }
        Command::Repo(RepoCommand::Create {
            name,
            public,
            replication_factor,
        }) => {
            if let Some(cluster) = cluster(&store()?)? {
                let repo = gitplane::git::repo_name::RepoName::parse(&name)?;
                let nodes = gitplane::cluster::placement::create(
                    &cluster.location,
                    &cluster.routing,
                    &cluster.secret,
                    &repo,
                    public,
                    replication_factor,
                )
                .with_context(|| format!("creating repository {name}"))?;
                println!("repository {name} created on {}", nodes.join(", "));
                return Ok(());
            }
            let path = admin::repo_create(&store()?, Path::new("git"), &name, public)
                .with_context(|| format!("creating repository {name}"))?;
            println!("repository {name} created at {}", path.display());
            Ok(())
        }
        Command::Repo(RepoCommand::Move { name, from, to }) => {
            let c = cluster(&store()?)?.context("`repo move` needs --cluster-secret-file")?;
            gitplane::cluster::placement::move_replica(
                &c.location,
                &c.routing,
                &c.secret,
                &name,
                &from,
                &to,
            )
            .with_context(|| format!("moving {name} from {from} to {to}"))?;
            println!("{name}: the copy on {from} is now on {to}");
            Ok(())
        }
        Command::Node(NodeCommand::Drain { node }) => {
            let c = cluster(&store()?)?.context("`node drain` needs --cluster-secret-file")?;
            let moves =
                gitplane::cluster::placement::drain(&c.location, &c.routing, &c.secret, &node)
                    .with_context(|| format!("draining {node}"))?;
            for (repo, to) in &moves {
                println!("{repo}: moved to {to}");
            }
            println!("{node} holds no replica now ({} moved)", moves.len());
            Ok(())
        }
        Command::Cluster(ClusterCommand::Status) => {
            let location = store()?;
            print!("{}", gitplane::cluster::status::render(&location)?);
            Ok(())
        }
        Command::SshProxy {
            url,
            headers,
            ca_file,
        } => {
            gitplane::ssh::ws_client::run(&url, &headers, ca_file.as_deref())
                .with_context(|| format!("ssh-proxy {url}"))?;
            Ok(())
        }
        Command::ClusterExec(args) => {
            let code = gitplane::cluster::transport::relay_stdio(
                &args.addr,
                &args.secret_file,
                &args.repo,
                &args.service,
                args.args,
                args.replica,
            )
            .with_context(|| {
                format!(
                    "relaying {} of {} to {}",
                    args.service, args.repo, args.addr
                )
            })?;
            std::process::exit(code);
        }
        Command::Repo(RepoCommand::Maintain { name, full, config }) => {
            let file = match &config {
                Some(path) => FileConfig::load(path)?,
                None => FileConfig::default(),
            };
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let hk = gitplane::config::HousekeepingConfig::build(file.housekeeping, cores)?;
            let report = gitplane::housekeeping::maintain_now(
                &data_dir(),
                Path::new("git"),
                &hk,
                &name,
                full,
            )
            .with_context(|| format!("maintaining {name}"))?;
            print!("{report}");
            Ok(())
        }
        Command::Hook(HookCommand::PostReceive) => {
            // git shows the hook's stderr to the pusher; a failure must be loud there.
            // The hooks read git's input before they touch the store (git feeds it first).
            let recorded = location().map_err(anyhow::Error::from).and_then(|s| {
                Ok(gitplane::hooks::capture::post_receive(
                    &s,
                    std::io::stdin().lock(),
                )?)
            });
            if let Err(e) = recorded {
                eprintln!(
                    "gitplane: the push was received but its event was NOT recorded: {e} \
                     (its pending transactions, if recorded, are reconciled once the push ends)"
                );
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Hook(HookCommand::ReferenceTransaction { state }) => {
            // In `prepared`, exiting non-zero makes git abort the update: the push fails and no
            // ref moves without its pending event. git ignores the status of the other states.
            let recorded = location().map_err(anyhow::Error::from).and_then(|s| {
                Ok(gitplane::hooks::capture::reference_transaction(
                    &s,
                    &state,
                    std::io::stdin().lock(),
                )?)
            });
            if let Err(e) = recorded {
                eprintln!("gitplane: ref update refused: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Webhook(WebhookCommand::Add { repo, url, .. }) => {
            let secret = admin::read_password(std::io::stdin().lock())
                .context("reading the webhook secret from stdin")?;
            let id = gitplane::hooks::add_webhook(&store()?, &repo, &url, &secret)
                .with_context(|| format!("adding a webhook to {repo}"))?;
            println!("webhook {id} added to {repo}: {url}");
            Ok(())
        }
        Command::Key(KeyCommand::Add { user, file }) => {
            let key = gitplane::ssh::keys::key_add(&store()?, &user, &file)
                .with_context(|| format!("adding {} for {user}", file.display()))?;
            println!(
                "key {} ({}) added for {user}",
                key.fingerprint, key.algorithm
            );
            Ok(())
        }
        Command::Key(KeyCommand::List { user }) => {
            let keys = gitplane::ssh::keys::key_list(&store()?, &user)
                .with_context(|| format!("listing keys of {user}"))?;
            for k in keys {
                println!("{} {} {}", k.fingerprint, k.algorithm, k.comment);
            }
            Ok(())
        }
        Command::Key(KeyCommand::Remove { fingerprint }) => {
            let user = gitplane::ssh::keys::key_remove(&store()?, &fingerprint)
                .with_context(|| format!("removing key {fingerprint}"))?;
            println!("key {fingerprint} of {user} removed");
            Ok(())
        }
        Command::Repo(RepoCommand::Grant { repo, user, access }) => {
            admin::repo_grant(&store()?, &repo, &user, access)
                .with_context(|| format!("granting {user} on {repo}"))?;
            println!("{user} has {access:?} access to {repo}");
            Ok(())
        }
        Command::Repo(RepoCommand::Revoke { repo, user }) => {
            admin::repo_revoke(&store()?, &repo, &user)
                .with_context(|| format!("revoking {user} on {repo}"))?;
            println!("{user} has no grant on {repo} now");
            Ok(())
        }
    }
}

/// Sends SIGUSR2 to the generation in `pid_file` and waits until the file names a new, live one.
fn upgrade(pid_file: &Path, timeout: std::time::Duration) -> anyhow::Result<()> {
    use gitplane::server::upgrade::read_pid_file;
    let old = read_pid_file(pid_file).context("reading the pid file")?;
    let alive = |pid: u32| {
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
    };
    // SAFETY: asking the named server to upgrade itself.
    if unsafe { libc::kill(old as libc::pid_t, libc::SIGUSR2) } != 0 {
        anyhow::bail!(
            "cannot signal pid {old}: {}",
            std::io::Error::last_os_error()
        );
    }
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if let Ok(new) = read_pid_file(pid_file) {
            if new != old && alive(new) {
                println!("upgraded: pid {new} serves; pid {old} is draining");
                return Ok(());
            }
        }
    }
    anyhow::bail!(
        "no new generation within {} s; pid {old} {} (see its log)",
        timeout.as_secs(),
        if alive(old) {
            "keeps serving"
        } else {
            "is gone"
        }
    )
}

fn serve(global: Overrides, args: ServeArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let config = ServeConfig::build(
        file,
        Overrides {
            http_listen: args.http_listen,
            shards: args.shards,
            force_epoll: args.force_epoll,
            amqp_url: args.amqp_url,
            rpc_listen: args.rpc_listen,
            ssh_listen: args.ssh_listen,
            pid_file: args.pid_file,
            cluster_listen: args.cluster_listen,
            ..global
        },
    )?;
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(data_dir.join("repos"))
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    gitplane::server::run(config, |bound| {
        // Machine-readable lines for scripts and tests that start the server on port 0.
        let mut out = std::io::stdout().lock();
        for (service, addr) in bound {
            let _ = writeln!(out, "gitplane: {service} listening on {addr}");
            if *service == "http" {
                tracing::info!(
                    "ready: create a repository with `gitplane repo create admin/hello`, then `git clone http://admin@{addr}/admin/hello.git`"
                );
            }
        }
        let _ = writeln!(out, "gitplane: ready");
        let _ = out.flush();
    })?;
    Ok(())
}
