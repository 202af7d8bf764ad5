//! Several nodes on one PostgreSQL store (#13): two real `gitplane serve` processes with their
//! own data dirs and ports, one scratch database, the real git, OpenSSH and RabbitMQ.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{
    git, git_env, git_raw, make_worktree, openssh_command, ssh_keygen, ssh_known_hosts,
    webhook_receiver, Server, ServerOptions, SharedStore,
};

const BROKER: &str = "127.0.0.1:5672";

fn node(shared: &SharedStore, id: &str, config: Option<String>) -> Server {
    Server::start_with(ServerOptions {
        shared_store: Some((shared.clone(), id.to_owned())),
        config,
        ..ServerOptions::default()
    })
}

fn http_url(server: &Server, repo: &str, user: &str, password: &str) -> String {
    format!("http://{user}:{password}@{}/{repo}.git", server.addr)
}

fn ssh_url(server: &Server, repo: &str) -> String {
    format!(
        "ssh://git@127.0.0.1:{}/{repo}.git",
        server.listening["ssh"].port()
    )
}

/// Polls `attempt` until it returns true; the time it took, or None past `limit`.
fn time_until(limit: Duration, mut attempt: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if attempt() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn two_nodes_share_users_keys_grants_and_webhooks() {
    let shared = SharedStore::create();
    let a = node(&shared, "node-a", None);
    let b = node(&shared, "node-b", None);
    // Only the first node to start makes `admin`: one user database.
    assert!(
        !a.admin_password.is_empty(),
        "A started first and made `admin`"
    );
    assert!(b.admin_password.is_empty(), "B made a second `admin`");

    // A repository made on B lives on B; a user made through A's CLI uses it at once.
    b.admin(&["repo", "create", "admin/site"], None);
    a.add_user("carol", "pw-1");
    a.admin(&["repo", "grant", "admin/site", "carol", "write"], None);
    let work = tempfile::tempdir().unwrap();
    make_worktree(work.path(), 2);
    git(
        work.path(),
        &[
            "push",
            "-q",
            &http_url(&b, "admin/site", "carol", "pw-1"),
            "main",
        ],
    );
    let clone = tempfile::tempdir().unwrap();
    git(
        clone.path(),
        &[
            "clone",
            "-q",
            &http_url(&b, "admin/site", "carol", "pw-1"),
            "c",
        ],
    );

    // Through A, which does not hold it: a clean 404, and A's log names the owner.
    let via_a = git_raw(
        clone.path(),
        &[
            "clone",
            "-q",
            &http_url(&a, "admin/site", "carol", "pw-1"),
            "x",
        ],
        &[],
    );
    assert!(!via_a.status.success());
    let err = String::from_utf8_lossy(&via_a.stderr);
    assert!(err.contains("not found") || err.contains("404"), "{err}");
    assert!(
        a.log().contains("repository lives on another node") && a.log().contains("node-b"),
        "A's log does not name the owning node"
    );

    // A password changed through A stops working on B (which trusted it a moment ago).
    a.admin(
        &["user", "passwd", "carol", "--password-stdin"],
        Some("pw-2\n"),
    );
    let old_refused = time_until(Duration::from_secs(5), || {
        !git_raw(
            clone.path(),
            &["ls-remote", &http_url(&b, "admin/site", "carol", "pw-1")],
            &[],
        )
        .status
        .success()
    })
    .expect("the old password still works on B after 5 s");
    eprintln!("old password refused on B {old_refused:?} after `user passwd` on A");
    git(
        clone.path(),
        &["ls-remote", &http_url(&b, "admin/site", "carol", "pw-2")],
    );

    // An SSH key added through A works on B; removed through A, B refuses it.
    let keys = tempfile::tempdir().unwrap();
    let key = ssh_keygen(keys.path(), "carol");
    let added = a.admin(
        &["key", "add", "carol", &format!("{}.pub", key.display())],
        None,
    );
    let fingerprint = added
        .split_whitespace()
        .nth(1)
        .expect("fingerprint in `key add` output")
        .to_owned();
    let ssh = openssh_command(&key, &ssh_known_hosts(&b, keys.path()));
    let ssh_env = [("GIT_SSH_COMMAND", ssh.as_str())];
    git_env(
        clone.path(),
        &["ls-remote", &ssh_url(&b, "admin/site")],
        &ssh_env,
    );
    a.admin(&["key", "remove", &fingerprint], None);
    let key_refused = time_until(Duration::from_secs(5), || {
        !git_raw(
            clone.path(),
            &["ls-remote", &ssh_url(&b, "admin/site")],
            &ssh_env,
        )
        .status
        .success()
    })
    .expect("the removed key still works on B after 5 s");
    eprintln!("removed SSH key refused on B {key_refused:?} after `key remove` on A");

    // A grant revoked through A ends carol's access on B; a user removed cannot log in.
    a.admin(&["repo", "revoke", "admin/site", "carol"], None);
    let denied = git_raw(
        clone.path(),
        &["ls-remote", &http_url(&b, "admin/site", "carol", "pw-2")],
        &[],
    );
    assert!(!denied.status.success(), "revoked grant still reads");
    a.admin(&["user", "remove", "carol"], None);
    let gone = a.admin_raw(&["key", "list", "carol"], None);
    assert!(!gone.status.success(), "removed user still has keys");

    // A webhook added through A fires for a push to B's repository.
    let (hook_url, deliveries) = webhook_receiver();
    a.admin(
        &["webhook", "add", "admin/site", &hook_url, "--secret-stdin"],
        Some("s3cret\n"),
    );
    std::fs::write(work.path().join("more.txt"), "more").unwrap();
    git(work.path(), &["add", "more.txt"]);
    git(work.path(), &["commit", "-qm", "more"]);
    git(
        work.path(),
        &[
            "push",
            "-q",
            &http_url(&b, "admin/site", "admin", &a.admin_password),
            "main",
        ],
    );
    assert!(
        common::wait_for(Duration::from_secs(20), || deliveries.lock().unwrap().len()
            == 1),
        "the webhook did not fire once: {:?}",
        deliveries.lock().unwrap()
    );
}

#[test]
fn forty_pushes_over_two_nodes_give_forty_deliveries_through_rabbitmq() {
    common::require_tool("git");
    assert!(
        std::net::TcpStream::connect(BROKER).is_ok(),
        "RabbitMQ is not listening on {BROKER}: run scripts/test.sh, which starts it"
    );
    let shared = SharedStore::create();
    let prefix = format!("gptest-fleet-{}", std::process::id());
    let cfg = format!(
        "[hooks]\namqp_url = \"amqp://guest:guest@{BROKER}/%2f\"\namqp_prefix = \"{prefix}\"\nqueue_expires_secs = 900\n"
    );
    let a = node(&shared, "node-a", Some(cfg.clone()));
    let b = node(&shared, "node-b", Some(cfg));
    let password = a.admin_password.clone();
    let (hook_url, deliveries) = webhook_receiver();
    let nodes = [&a, &b];
    let mut work = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let repo = format!("admin/r{i}");
        n.admin(&["repo", "create", &repo], None);
        // Added through the other node: the store is one.
        nodes[1 - i].admin(
            &["webhook", "add", &repo, &hook_url, "--secret-stdin"],
            Some("s\n"),
        );
        let dir = tempfile::tempdir().unwrap();
        make_worktree(dir.path(), 1);
        work.push((dir, http_url(n, &repo, "admin", &password)));
    }
    for i in 0..40 {
        let (dir, url) = &work[i % 2];
        std::fs::write(dir.path().join(format!("f{i}")), i.to_string()).unwrap();
        git(dir.path(), &["add", "."]);
        git(dir.path(), &["commit", "-qm", &format!("c{i}")]);
        git(dir.path(), &["push", "-q", url, "main"]);
    }
    let settled = common::wait_for(Duration::from_secs(60), || {
        deliveries.lock().unwrap().len() >= 40
    });
    // Duplicates would arrive just after: give them the chance to.
    std::thread::sleep(Duration::from_secs(2));
    let got = deliveries.lock().unwrap();
    let ids: HashSet<String> = got
        .iter()
        .filter_map(|d| d["id"].as_str().map(str::to_owned))
        .collect();
    assert!(settled, "{} of 40 deliveries within 60 s", got.len());
    assert_eq!(got.len(), 40, "deliveries, counting duplicates");
    assert_eq!(ids.len(), 40, "distinct events");
}

#[test]
fn postgres_stopped_while_serving_gives_503_quickly_and_service_resumes_by_itself() {
    let pg = common::PrivatePostgres::start();
    let server = node(&SharedStore::at(pg.url()), "solo", None);
    server.admin(&["repo", "create", "admin/app"], None);
    let work = tempfile::tempdir().unwrap();
    make_worktree(work.path(), 1);
    let url = http_url(&server, "admin/app", "admin", &server.admin_password);
    git(work.path(), &["push", "-q", &url, "main"]);
    let info_refs = format!(
        "GET /admin/app.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: t\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
        common::basic_auth("admin", &server.admin_password)
    );
    let health = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";

    pg.stop();
    for round in 0..5 {
        let started = Instant::now();
        let raw = common::raw_request(server.addr, info_refs.as_bytes(), Duration::from_secs(10));
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        assert_eq!(common::status_of(&raw), 503, "round {round}: {text}");
        assert!(text.contains("retry-after: "), "round {round}: {text}");
        assert!(
            took < Duration::from_secs(2),
            "round {round}: 503 took {took:?}"
        );
        // No shard is blocked: the health endpoint answers throughout.
        let started = Instant::now();
        let h = common::raw_request(server.addr, health, Duration::from_secs(10));
        assert_eq!(
            common::status_of(&h),
            200,
            "healthz while the database is down"
        );
        assert!(started.elapsed() < Duration::from_millis(500));
    }
    let refused = git_raw(work.path(), &["push", "-q", &url, "main:other"], &[]);
    assert!(
        !refused.status.success(),
        "a push went through with no database"
    );

    pg.start_again();
    let back = time_until(Duration::from_secs(30), || {
        git_raw(work.path(), &["ls-remote", &url], &[])
            .status
            .success()
    })
    .expect("service did not resume within 30 s of the database's return");
    eprintln!("service resumed {back:?} after PostgreSQL was back");
    git(work.path(), &["push", "-q", &url, "main:other"]);
    let clone = tempfile::tempdir().unwrap();
    git(clone.path(), &["clone", "-q", &url, "c"]);
}

#[test]
fn tls_to_postgres_when_the_url_asks_for_it_verified_against_its_root() {
    let pg = common::PrivatePostgres::start_with_tls();
    let cert = pg.tls_cert.clone().expect("certificate");
    let url = format!(
        "postgres://postgres:not-a-secret@127.0.0.1:{}/postgres?sslmode=require&sslrootcert={}",
        pg.port,
        cert.display()
    );
    let server = node(&SharedStore::at(url.clone()), "tls", None);
    server.admin(&["repo", "create", "admin/t"], None);
    let work = tempfile::tempdir().unwrap();
    make_worktree(work.path(), 1);
    let repo_url = http_url(&server, "admin/t", "admin", &server.admin_password);
    git(work.path(), &["push", "-q", &repo_url, "main"]);
    git(work.path(), &["clone", "-q", &repo_url, "c"]);

    // Every connection gitplane holds is encrypted (the server's own view).
    let mut observer = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    let row = observer
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity a
             JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'gitplane'",
            &[],
        )
        .unwrap();
    let (encrypted, all): (i64, i64) = (row.get(0), row.get(1));
    assert!(all >= 1, "gitplane holds no connection");
    assert_eq!(encrypted, all, "plaintext connections from gitplane");

    // A certificate the root does not vouch for: a clear refusal, and no password in it.
    let other = tempfile::tempdir().unwrap();
    let other_cert = other.path().join("other.crt");
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=another-ca"])
        .arg("-keyout")
        .arg(other.path().join("other.key"))
        .arg("-out")
        .arg(&other_cert)
        .output()
        .unwrap();
    assert!(out.status.success());
    let wrong = url.replace(
        &cert.display().to_string(),
        &other_cert.display().to_string(),
    );
    let refused = std::process::Command::new(common::BIN)
        .arg("--data-dir")
        .arg(other.path())
        .args(["--database-url", &wrong, "key", "list", "x"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "connected past an unknown certificate"
    );
    assert!(err.contains("postgres://postgres@127.0.0.1"), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(!err.contains("not-a-secret"), "the password leaked: {err}");
}
