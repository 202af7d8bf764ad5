//! Hook workers end to end (issue #6): real pushes through a real `gitplane serve`, the real
//! RabbitMQ broker on 127.0.0.1:5672 (guest/guest; scripts/test.sh installs and starts it, and
//! these tests fail, never skip, when it is unreachable), and a webhook receiver on loopback.
//!
//! Every test uses its own exchange/queue prefix (with `x-expires`, so leftovers vanish), so
//! parallel tests and reruns never see each other's messages. A broker outage is simulated with
//! a TCP proxy owned by the test between the server and the broker: dropping the proxy cuts
//! every connection and refuses new ones, exactly what a stopped broker looks like to the server,
//! without stopping the machine's shared broker.
//!
//! Benchmarks (ignored by default; the figures are in docs/BENCHMARKS.md):
//! `cargo test --release --test hooks -- --ignored --nocapture --test-threads 1 bench_`

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{git, git_env, grpc, make_worktree, wait_for, Server, ServerOptions, BIN};
use gitplane::store::Store;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const BROKER: &str = "127.0.0.1:5672";

// --- the broker ----------------------------------------------------------------------------------

fn require_broker() {
    let addr: SocketAddr = BROKER.parse().unwrap();
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).is_ok(),
        "RabbitMQ is not reachable on {BROKER}: run scripts/test.sh, which installs rabbitmq-server \
         and starts it (`rabbitmq-server -detached`)"
    );
}

fn amqp_url(addr: &str) -> String {
    format!("amqp://guest:guest@{addr}/%2f")
}

/// A prefix no other test or earlier run uses.
fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("gptest-{test}-{}-{nanos}", std::process::id())
}

/// Messages waiting in `queue` on the real broker, with their bodies (taken off the queue).
fn drain_queue(queue: &str) -> Vec<Vec<u8>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use lapin::options::BasicGetOptions;
        let conn = lapin::Connection::connect(&amqp_url(BROKER), Default::default())
            .await
            .expect("connect to RabbitMQ");
        let ch = conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        for _ in 0..1000 {
            match ch
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                Some(m) => out.push(m.delivery.data.clone()),
                None => break,
            }
        }
        let _ = conn.close(200, "bye".into()).await;
        out
    })
}

// --- a TCP proxy standing in for the broker --------------------------------------------------------

struct Proxy {
    port: u16,
    target: SocketAddr,
    running: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(target: &str) -> Self {
        let mut p = Self {
            port: 0,
            target: target.parse().unwrap(),
            running: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
            thread: None,
        };
        p.up();
        p
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Listens (again, on the same port) and forwards every connection to the broker.
    fn up(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("proxy bind");
        listener.set_nonblocking(true).unwrap();
        self.port = listener.local_addr().unwrap().port();
        self.running.store(true, Ordering::SeqCst);
        let (running, conns, target) = (
            Arc::clone(&self.running),
            Arc::clone(&self.conns),
            self.target,
        );
        self.thread = Some(std::thread::spawn(move || {
            while running.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(target) else {
                            continue;
                        };
                        let mut c = conns.lock().unwrap();
                        c.push(client.try_clone().unwrap());
                        c.push(server.try_clone().unwrap());
                        pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                        pipe(server, client);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }

    /// The broker "stops": the listener closes and every open connection is cut.
    fn down(&mut self) {
        self.running.store(false, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.down();
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

// --- a webhook receiver ----------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Received {
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Received>>>,
    max_concurrent: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    /// Answers every POST with `status` after holding it for `delay`.
    fn start(status: u16, delay: Duration) -> Self {
        Self::start_holding(status, delay, None)
    }

    /// Like [`Self::start`], but answers as soon as `release_at` requests are open at once, so a
    /// test can make deliveries pile up without depending on how fast events arrive.
    fn start_holding(status: u16, delay: Duration, release_at: Option<usize>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let max_concurrent = Arc::new(AtomicUsize::new(0));
        let current = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, m, s) = (
            Arc::clone(&got),
            Arc::clone(&max_concurrent),
            Arc::clone(&stop),
        );
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (g, m, current) =
                            (Arc::clone(&g), Arc::clone(&m), Arc::clone(&current));
                        std::thread::spawn(move || {
                            let now = current.fetch_add(1, Ordering::SeqCst) + 1;
                            m.fetch_max(now, Ordering::SeqCst);
                            let hold = Hold {
                                delay,
                                release_at,
                                open: &current,
                            };
                            serve_one(stream, status, &hold, &g);
                            current.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Self {
            addr,
            got,
            max_concurrent,
            stop,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// How long the receiver holds a request before answering.
struct Hold<'a> {
    delay: Duration,
    /// Answer early once this many requests are open at once.
    release_at: Option<usize>,
    open: &'a AtomicUsize,
}

impl Hold<'_> {
    fn wait(&self) {
        let until = Instant::now() + self.delay;
        while Instant::now() < until {
            if self
                .release_at
                .is_some_and(|n| self.open.load(Ordering::SeqCst) >= n)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn serve_one(stream: TcpStream, status: u16, hold: &Hold<'_>, got: &Mutex<Vec<Received>>) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut headers = HashMap::new();
    for _ in 0..100 {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let len: usize = headers["content-length"].parse().unwrap();
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    got.lock().unwrap().push(Received { headers, body });
    hold.wait();
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

// --- the server, with what the hook tests ask of it -------------------------------------------------

fn hook_server(config: &str) -> Server {
    Server::start_with(ServerOptions {
        config: Some(config.to_owned()),
        ..ServerOptions::default()
    })
}

trait HookServer {
    /// Creates `name` with a webhook to `url` signed with `secret`.
    fn repo_with_webhook(&self, name: &str, url: &str, secret: &str);
    fn store(&self) -> Store;
    /// Value of one series, e.g. `gitplane_hook_jobs_succeeded_total{job="webhooks"}`.
    fn metric(&self, series: &str) -> i64;
}

impl HookServer for Server {
    fn repo_with_webhook(&self, name: &str, url: &str, secret: &str) {
        self.create_repo(name, false);
        let out = self.admin(
            &["webhook", "add", name, url, "--secret-stdin"],
            Some(&format!("{secret}\n")),
        );
        assert!(out.contains("webhook"), "{out}");
    }

    fn store(&self) -> Store {
        Store::open(&self.location()).unwrap()
    }

    fn metric(&self, series: &str) -> i64 {
        i64::try_from(common::metric(self, series)).unwrap()
    }
}

fn config(amqp: Option<&str>, prefix: &str, extra_hooks: &str, concurrency: &str) -> String {
    let amqp = amqp
        .map(|a| format!("amqp_url = \"{}\"\n", amqp_url(a)))
        .unwrap_or_default();
    format!(
        "[hooks]\n{amqp}amqp_prefix = \"{prefix}\"\nqueue_expires_secs = 900\nbackoff_initial_ms = 50\nbackoff_max_ms = 400\nwebhook_timeout_secs = 5\n{extra_hooks}\n[hooks.concurrency]\n{concurrency}\n"
    )
}

/// A working copy of `name` that makes one new commit per push.
struct Pusher {
    dir: PathBuf,
    url: String,
    n: usize,
}

impl Pusher {
    fn new(root: &Path, server: &Server, name: &str) -> Self {
        let dir = root.join(format!("work-{}", name.replace('/', "-")));
        make_worktree(&dir, 1);
        Self {
            dir,
            url: server.admin_url(name),
            n: 0,
        }
    }

    /// Commits and pushes; returns the new head.
    fn push(&mut self, options: &[&str]) -> String {
        self.n += 1;
        std::fs::write(self.dir.join("n.txt"), format!("{}\n", self.n)).unwrap();
        git(&self.dir, &["add", "."]);
        git_env(
            &self.dir,
            &["commit", "-q", "-m", &format!("change {}", self.n)],
            &[],
        );
        let mut args = vec!["push", "-q"];
        for o in options {
            args.push("-o");
            args.push(o);
        }
        args.push(&self.url);
        args.push("main");
        git(&self.dir, &args);
        git(&self.dir, &["rev-parse", "HEAD"]).trim().to_owned()
    }
}

fn event_id(r: &Received) -> String {
    r.headers["x-gitplane-delivery"].clone()
}

/// The delivery test shared by the AMQP and embedded modes.
fn push_triggers_signed_webhook(amqp: Option<&str>, test: &str) {
    let root = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(200, Duration::ZERO);
    let server = hook_server(&config(amqp, &unique_prefix(test), "", "webhooks = 8\n"));
    server.repo_with_webhook("admin/proj", &receiver.url(), "s3cret");
    let mut pusher = Pusher::new(root.path(), &server, "admin/proj");
    let first = git(&pusher.dir, &["rev-parse", "HEAD"]).trim().to_owned();
    let head = pusher.push(&["ci.skip", "reviewer=bob"]);
    assert!(
        wait_for(Duration::from_secs(30), || receiver.count() >= 1),
        "no webhook delivery within 30 s:\n{}",
        server.log()
    );
    let got = receiver.received();
    assert_eq!(got.len(), 1, "exactly one delivery for one push");
    let r = &got[0];
    assert_eq!(
        r.headers["x-gitplane-signature-256"],
        hmac_hex("s3cret", &r.body),
        "signature must be HMAC-SHA256 of the body"
    );
    assert_eq!(r.headers["x-gitplane-event"], "push");
    assert_eq!(r.headers["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["repository"], "admin/proj");
    assert_eq!(body["pusher"], "admin");
    assert_eq!(body["remote_addr"], "127.0.0.1");
    assert_eq!(body["id"], event_id(r).as_str());
    assert_eq!(
        body["refs"],
        serde_json::json!([{"ref": "refs/heads/main", "before": "0000000000000000000000000000000000000000", "after": head}]),
        "a first push creates main"
    );
    assert_eq!(
        body["push_options"],
        serde_json::json!(["ci.skip", "reviewer=bob"])
    );

    // The other jobs ran for the same event: commits indexed, size measured.
    let store = server.store();
    let ev = event_id(r);
    assert!(
        wait_for(Duration::from_secs(30), || {
            ["disk_usage", "indexing", "webhooks"]
                .iter()
                .all(|j| store.job_status(&ev, j).unwrap().is_some())
        }),
        "jobs not all finished:\n{}",
        server.log()
    );
    let commits = store.commits("admin/proj").unwrap();
    let shas: HashSet<_> = commits.iter().map(|c| c.sha.as_str()).collect();
    assert_eq!(
        shas,
        HashSet::from([first.as_str(), head.as_str()]),
        "{commits:?}"
    );
    assert!(commits
        .iter()
        .any(|c| c.subject == "change 1" && c.author == "Test Author <author@example.com>"));
    let size = store
        .repo_size("admin/proj")
        .unwrap()
        .expect("size recorded");
    assert!(size > 0);
    assert_eq!(
        server.metric("gitplane_repo_size_bytes{repo=\"admin/proj\"}"),
        size as i64
    );
    let log = store.deliveries(&ev).unwrap();
    assert_eq!(log.len(), 1);
    assert!(log[0].ok && log[0].status == Some(200) && log[0].attempt == 1);
    assert!(wait_for(Duration::from_secs(10), || store
        .outbox_depth()
        .unwrap()
        == 0));

    // A second push reports old -> new for main.
    let next = pusher.push(&[]);
    assert!(wait_for(Duration::from_secs(30), || receiver.count() >= 2));
    let body: serde_json::Value = serde_json::from_slice(&receiver.received()[1].body).unwrap();
    assert_eq!(
        body["refs"],
        serde_json::json!([{"ref": "refs/heads/main", "before": head, "after": next}])
    );
}

#[test]
fn push_triggers_signed_webhook_through_rabbitmq() {
    require_broker();
    push_triggers_signed_webhook(Some(BROKER), "signed");
}

#[test]
fn embedded_mode_passes_the_same_delivery_test() {
    push_triggers_signed_webhook(None, "embedded");
}

/// One unary call of the repository API with the server's bearer token; panics unless OK.
#[test]
fn push_events_name_the_client_behind_trusted_proxies() {
    let root = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(200, Duration::ZERO);
    let config = format!(
        "{}\n[http]\ntrusted_proxies = [\"127.0.0.0/8\", \"10.0.0.0/8\"]\n",
        config(None, &unique_prefix("xff"), "", "webhooks = 8\n")
    );
    let server = hook_server(&config);
    server.repo_with_webhook("admin/proj", &receiver.url(), "s3cret");
    let mut pusher = Pusher::new(root.path(), &server, "admin/proj");
    let remote_addr_of_push = |pusher: &mut Pusher, n: usize| {
        pusher.push(&[]);
        assert!(
            wait_for(Duration::from_secs(30), || receiver.count() >= n),
            "no webhook delivery:\n{}",
            server.log()
        );
        let body: serde_json::Value =
            serde_json::from_slice(&receiver.received()[n - 1].body).unwrap();
        body["remote_addr"].as_str().unwrap_or_default().to_owned()
    };
    // The loopback peer and 10.1.2.3 are trusted proxies; 198.51.100.23 is the first hop that is
    // not, so it is the client. 6.6.6.6 is what a client could have forged, and is not reached.
    git(
        &pusher.dir,
        &[
            "config",
            "http.extraHeader",
            "X-Forwarded-For: 6.6.6.6, 198.51.100.23, 10.1.2.3",
        ],
    );
    assert_eq!(remote_addr_of_push(&mut pusher, 1), "198.51.100.23");
    // Without the header, the socket peer.
    git(&pusher.dir, &["config", "--unset", "http.extraHeader"]);
    assert_eq!(remote_addr_of_push(&mut pusher, 2), "127.0.0.1");
}

fn grpc_ok<M: prost::Message>(server: &Server, method: &str, request: &M) {
    let token = std::fs::read_to_string(server.data_dir().join("rpc-token")).unwrap();
    let auth = format!("Bearer {}", token.trim());
    let answer = grpc::runtime().block_on(async {
        let client = grpc::connect(server.listening["rpc"]).await;
        grpc::call(
            &client,
            &format!("/gitplane.v1.RepositoryService/{method}"),
            &[("authorization", auth.as_str())],
            &[grpc::frame(0, &request.encode_to_vec())],
            false,
        )
        .await
    });
    assert_eq!(
        answer.grpc_status(),
        Some(0),
        "{method}: {}",
        answer.grpc_message()
    );
}

/// Refs changed through the gRPC API (CreateBranch, Merge, DeleteBranch) become hook events
/// like a push does: recorded before the call answers, delivered as signed webhooks, with
/// `via` naming the method and the exact before/after ids.
#[test]
fn grpc_ref_changes_trigger_webhooks() {
    use gitplane::rpc::pb::v1 as pb;
    let root = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(200, Duration::ZERO);
    let server = hook_server(&config(None, &unique_prefix("grpc"), "", "webhooks = 8\n"));
    server.repo_with_webhook("admin/api", &receiver.url(), "s3cret");
    let mut pusher = Pusher::new(root.path(), &server, "admin/api");
    let first = git(&pusher.dir, &["rev-parse", "HEAD"]).trim().to_owned();
    let head = pusher.push(&[]);
    assert!(wait_for(Duration::from_secs(30), || receiver.count() >= 1));

    grpc_ok(
        &server,
        "CreateBranch",
        &pb::CreateBranchRequest {
            repository: "admin/api".into(),
            name: "release".into(),
            start_point: first.clone(),
        },
    );
    grpc_ok(
        &server,
        "Merge",
        &pb::MergeRequest {
            repository: "admin/api".into(),
            target: "release".into(),
            source: "main".into(),
            expected_target_id: first.clone(),
            mode: pb::MergeMode::FastForwardOnly as i32,
            ..Default::default()
        },
    );
    grpc_ok(
        &server,
        "DeleteBranch",
        &pb::DeleteBranchRequest {
            repository: "admin/api".into(),
            name: "release".into(),
            expected_old_id: head.clone(),
        },
    );
    assert!(
        wait_for(Duration::from_secs(30), || receiver.count() >= 4),
        "expected 4 deliveries, got {}:\n{}",
        receiver.count(),
        server.log()
    );
    let zero = "0000000000000000000000000000000000000000";
    let mut seen: Vec<(String, serde_json::Value)> = receiver
        .received()
        .iter()
        .skip(1)
        .map(|r| {
            assert_eq!(
                r.headers["x-gitplane-signature-256"],
                hmac_hex("s3cret", &r.body)
            );
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(body["repository"], "admin/api");
            (
                body["via"].as_str().unwrap_or("").to_owned(),
                body["refs"].clone(),
            )
        })
        .collect();
    // Deliveries of different events may arrive in any order.
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    let release = |before: &str, after: &str| serde_json::json!([{"ref": "refs/heads/release", "before": before, "after": after}]);
    assert_eq!(
        seen,
        vec![
            ("grpc:CreateBranch".to_owned(), release(zero, &first)),
            ("grpc:DeleteBranch".to_owned(), release(&head, zero)),
            ("grpc:Merge".to_owned(), release(&first, &head)),
        ]
    );
    assert!(
        server.store().pending_owners().unwrap().is_empty(),
        "each call's pending row became its event"
    );
}

#[test]
fn webhook_semaphore_caps_concurrent_deliveries_per_core() {
    require_broker();
    let root = tempfile::tempdir().unwrap();
    // Slow receiver: deliveries pile up, so only the semaphore keeps them at 2 per core. Each is
    // held until both cores' permits are all in use (or 3 s, inside the 5 s webhook timeout), so
    // the pile-up does not depend on how fast pushes arrive on a loaded machine.
    let receiver = Receiver::start_holding(200, Duration::from_secs(3), Some(4));
    let server = hook_server(&config(
        Some(BROKER),
        &unique_prefix("sem"),
        "prefetch = 32\n",
        "webhooks = 2\n",
    ));
    let repos = 5;
    let per_repo = 10;
    for i in 0..repos {
        server.repo_with_webhook(&format!("admin/r{i}"), &receiver.url(), "k");
    }
    let pushers: Vec<_> = (0..repos)
        .map(|i| Pusher::new(root.path(), &server, &format!("admin/r{i}")))
        .collect();
    std::thread::scope(|s| {
        for mut p in pushers {
            s.spawn(move || {
                for _ in 0..per_repo {
                    p.push(&[]);
                }
            });
        }
    });
    let total = repos * per_repo;
    assert!(
        wait_for(Duration::from_secs(120), || receiver.count() >= total),
        "{} of {total} deliveries:\n{}",
        receiver.count(),
        server.log()
    );
    let peaks: Vec<i64> = (0..2)
        .map(|core| {
            server.metric(&format!(
                "gitplane_hook_jobs_peak_running{{job=\"webhooks\",core=\"{core}\"}}"
            ))
        })
        .collect();
    let receiver_max = receiver.max_concurrent.load(Ordering::SeqCst);
    eprintln!("webhook concurrency: per-core peaks {peaks:?}, receiver saw at most {receiver_max} at once");
    assert!(peaks.iter().all(|p| *p <= 2), "per-core peaks {peaks:?}");
    assert!(
        receiver_max <= 4,
        "2 cores x 2 permits, receiver saw {receiver_max}"
    );
    assert!(
        peaks.contains(&2),
        "the limit was never reached ({peaks:?}): the test did not load the semaphore"
    );
    assert!(server.metric("gitplane_hook_semaphore_waits_total{job=\"webhooks\"}") > 0);
    let ids: HashSet<_> = receiver.received().iter().map(event_id).collect();
    assert_eq!(ids.len(), total, "one delivery per push");
}

#[test]
fn broker_outage_events_wait_in_the_outbox_then_go_out_exactly_once() {
    require_broker();
    let root = tempfile::tempdir().unwrap();
    let mut proxy = Proxy::start(BROKER);
    let receiver = Receiver::start(200, Duration::ZERO);
    let server = hook_server(&config(
        Some(&proxy.addr()),
        &unique_prefix("outage"),
        "",
        "",
    ));
    server.repo_with_webhook("admin/proj", &receiver.url(), "k");
    assert!(
        wait_for(Duration::from_secs(20), || server
            .metric("gitplane_hook_amqp_connects_total")
            >= 2),
        "server never connected through the proxy:\n{}",
        server.log()
    );
    proxy.down();
    let mut pusher = Pusher::new(root.path(), &server, "admin/proj");
    for _ in 0..20 {
        pusher.push(&[]);
    }
    let store = server.store();
    assert_eq!(
        store.outbox_depth().unwrap(),
        20,
        "events wait in the outbox"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        receiver.count(),
        0,
        "nothing can be delivered without the broker"
    );
    assert_eq!(store.outbox_depth().unwrap(), 20);

    proxy.up();
    let jobs = ["disk_usage", "webhooks", "indexing"];
    assert!(
        wait_for(Duration::from_secs(60), || {
            jobs.iter()
                .all(|j| store.job_count(j, "done").unwrap() == 20)
        }),
        "not every job finished after the broker came back:\n{}",
        server.log()
    );
    assert!(wait_for(Duration::from_secs(10), || store
        .outbox_depth()
        .unwrap()
        == 0));
    // Give stray duplicates a chance to show up before counting.
    std::thread::sleep(Duration::from_secs(1));
    let ids: Vec<_> = receiver.received().iter().map(event_id).collect();
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(ids.len(), 20, "each event delivered once: {ids:?}");
    assert_eq!(unique.len(), 20);
    for j in jobs {
        assert_eq!(
            server.metric(&format!(
                "gitplane_hook_jobs_succeeded_total{{job=\"{j}\"}}"
            )),
            20,
            "{j} ran exactly once per event"
        );
    }
}

#[test]
fn sigkill_while_jobs_run_loses_no_event() {
    require_broker();
    let root = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(200, Duration::from_millis(400));
    let mut server = hook_server(&config(
        Some(BROKER),
        &unique_prefix("kill"),
        "",
        "webhooks = 1\n",
    ));
    server.repo_with_webhook("admin/proj", &receiver.url(), "k");
    let mut pusher = Pusher::new(root.path(), &server, "admin/proj");
    for _ in 0..10 {
        pusher.push(&[]);
    }
    assert!(wait_for(Duration::from_secs(30), || receiver.count() >= 2));
    let store = server.store();
    let done_before = store.job_count("webhooks", "done").unwrap();
    server.kill9();
    assert!(
        done_before < 10,
        "jobs must still be running at the kill ({done_before} done)"
    );

    server.restart();
    let jobs = ["disk_usage", "webhooks", "indexing"];
    assert!(
        wait_for(Duration::from_secs(60), || {
            jobs.iter()
                .all(|j| store.job_count(j, "done").unwrap() == 10)
        }),
        "events lost after SIGKILL: {:?}\n{}",
        jobs.map(|j| store.job_count(j, "done").unwrap()),
        server.log()
    );
    assert!(wait_for(Duration::from_secs(10), || store
        .outbox_depth()
        .unwrap()
        == 0));
    let ids: HashSet<_> = receiver.received().iter().map(event_id).collect();
    assert_eq!(ids.len(), 10, "every event reached the webhook");
    let outbox_events: HashSet<_> = store
        .job_records("webhooks")
        .unwrap()
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    assert_eq!(outbox_events, ids.iter().cloned().collect());
}

/// Runs `cmd` for at most `limit`; whether it exited 0 (a push still running at the limit is
/// killed and counts as failed).
fn run_bounded(mut cmd: Command, limit: Duration) -> bool {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run git");
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Some(status) = child.try_wait().expect("wait git") {
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// Processes whose command line names `path` (the receive-packs of a repository).
fn processes_on(path: &Path) -> usize {
    let needle = path.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| c.windows(needle.len()).any(|w| w == needle))
        .count()
}

/// Branch -> the distinct delivery ids of the events that name it.
fn events_by_branch(receiver: &Receiver) -> HashMap<String, HashSet<String>> {
    let mut out: HashMap<String, HashSet<String>> = HashMap::new();
    for r in receiver.received() {
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        for u in body["refs"].as_array().unwrap() {
            let name = u["ref"].as_str().unwrap();
            out.entry(name.to_owned()).or_default().insert(event_id(&r));
        }
    }
    out
}

/// Issue #17: pushes cut by a server crash between git's ref update and post-receive still get
/// their event (the pending row written by reference-transaction is reconciled at restart), and
/// no branch gets two events.
#[test]
fn sigkill_mid_push_every_moved_branch_has_exactly_one_event() {
    sigkill_mid_push(None, "race");
}

#[test]
fn sigkill_mid_push_exactly_one_event_through_rabbitmq() {
    require_broker();
    sigkill_mid_push(Some(BROKER), "race-amqp");
}

/// 3 rounds of 40 concurrent pushes of distinct branches, the server SIGKILLed mid-way and
/// restarted each round.
fn sigkill_mid_push(amqp: Option<&str>, test: &str) {
    const ROUNDS: usize = 3;
    const PUSHES: usize = 40;
    let root = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(200, Duration::ZERO);
    let mut server = hook_server(&config(
        amqp,
        &unique_prefix(test),
        "",
        "webhooks = 8\ndisk_usage = 0\nindexing = 0\n",
    ));
    server.repo_with_webhook("admin/race", &receiver.url(), "r");
    let work = root.path().join("work");
    make_worktree(&work, 1);
    git(
        &work,
        &["push", "-q", &server.admin_url("admin/race"), "main"],
    );
    let bare = server.repo_path("admin/race");
    let store = server.store();
    let mut acked_total = 0;
    let mut unacked_moved = 0;
    for round in 0..ROUNDS {
        // One distinct commit per branch, so "present" means this push's commit.
        let commits: Vec<(String, String)> = (0..PUSHES)
            .map(|i| {
                let branch = format!("refs/heads/r{round}-{i}");
                let msg = format!("round {round} push {i}");
                let sha = git(
                    &work,
                    &["commit-tree", "HEAD^{tree}", "-p", "HEAD", "-m", &msg],
                );
                (branch, sha.trim().to_owned())
            })
            .collect();
        let url = server.admin_url("admin/race");
        let acked = Arc::new(AtomicUsize::new(0));
        let pushes: Vec<_> = commits
            .iter()
            .cloned()
            .map(|(branch, sha)| {
                let (work, url, acked) = (work.clone(), url.clone(), Arc::clone(&acked));
                std::thread::spawn(move || {
                    let mut cmd = Command::new("git");
                    cmd.current_dir(&work)
                        .args(["push", "-q", &url, &format!("{sha}:{branch}")]);
                    let ok = run_bounded(cmd, Duration::from_secs(60));
                    if ok {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    ok
                })
            })
            .collect();
        // Kill once a few pushes have landed and most are still in flight.
        let some_landed = wait_for(Duration::from_secs(60), || {
            acked.load(Ordering::SeqCst) >= PUSHES / 5
        });
        server.kill9();
        assert!(
            some_landed,
            "round {round}: pushes never landed\n{}",
            server.log()
        );
        let results: Vec<bool> = pushes.into_iter().map(|t| t.join().unwrap()).collect();
        server.restart();
        // receive-packs of the killed server run on (own process group) and may still move
        // refs: judge the refs once they are gone.
        assert!(
            wait_for(Duration::from_secs(60), || processes_on(&bare) == 0),
            "round {round}: git processes of the killed server still run"
        );
        let on_disk: HashMap<String, String> = git(
            &bare,
            &[
                "for-each-ref",
                "--format=%(refname) %(objectname)",
                "refs/heads/",
            ],
        )
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(r, o)| (r.to_owned(), o.to_owned()))
        .collect();
        for ((branch, sha), ok) in commits.iter().zip(&results) {
            if *ok {
                assert_eq!(
                    on_disk.get(branch),
                    Some(sha),
                    "round {round}: acknowledged push of {branch} is not on disk"
                );
            }
        }
        let moved: HashSet<String> = commits
            .iter()
            .filter(|(b, _)| on_disk.contains_key(b))
            .map(|(b, _)| b.clone())
            .collect();
        acked_total += results.iter().filter(|ok| **ok).count();
        unacked_moved += moved.len() - results.iter().filter(|ok| **ok).count();
        // Settled: every moved branch delivered, nothing pending, nothing left in the outbox.
        let settled = wait_for(Duration::from_secs(90), || {
            let seen = events_by_branch(&receiver);
            moved.iter().all(|b| seen.contains_key(b))
                && store.pending_owners().unwrap().is_empty()
                && store.outbox_depth().unwrap() == 0
        });
        let seen = events_by_branch(&receiver);
        assert!(
            settled,
            "round {round}: moved branches without an event: {:?}; pending {:?}; outbox {}\n{}",
            moved
                .iter()
                .filter(|b| !seen.contains_key(*b))
                .collect::<Vec<_>>(),
            store.pending_owners().unwrap(),
            store.outbox_depth().unwrap(),
            server.log()
        );
        for (branch, _) in &commits {
            let events = seen.get(branch).map_or(0, HashSet::len);
            let expected = usize::from(moved.contains(branch));
            assert_eq!(
                events,
                expected,
                "round {round}: {branch} (moved: {}) has {events} events",
                moved.contains(branch)
            );
        }
    }
    let fsck = Command::new("git")
        .arg("--git-dir")
        .arg(&bare)
        .args(["fsck", "--full"])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "git fsck --full: {}",
        String::from_utf8_lossy(&fsck.stderr)
    );
    let reconciled = server.metric("gitplane_hook_pending_reconciled_total{outcome=\"published\"}");
    let received = receiver.received();
    let distinct: HashSet<String> = received.iter().map(event_id).collect();
    eprintln!(
        "{ROUNDS} rounds x {PUSHES} pushes: {acked_total} acknowledged, {unacked_moved} moved \
         without an acknowledgement; reconciled into events by the last start: {reconciled}; \
         {} deliveries of {} events (duplicates carry the same delivery id)",
        received.len(),
        distinct.len()
    );
}

#[test]
fn failing_receiver_ends_in_the_dead_letter_queue() {
    require_broker();
    let root = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(500, Duration::ZERO);
    let prefix = unique_prefix("dead");
    let server = hook_server(&config(Some(BROKER), &prefix, "max_attempts = 3\n", ""));
    server.repo_with_webhook("admin/proj", &receiver.url(), "k");
    let mut pusher = Pusher::new(root.path(), &server, "admin/proj");
    pusher.push(&[]);
    let store = server.store();
    assert!(
        wait_for(Duration::from_secs(30), || store
            .job_count("webhooks", "dead")
            .unwrap()
            == 1),
        "never dead-lettered:\n{}",
        server.log()
    );
    let mut dead = Vec::new();
    assert!(wait_for(Duration::from_secs(10), || {
        // A node of a shared store has its own queues: `PREFIX.NODE.…`.
        let topology = match &server.database {
            Some((_, node)) => format!("{prefix}.{node}"),
            None => prefix.clone(),
        };
        dead.extend(drain_queue(&format!("{topology}.dead.webhooks")));
        !dead.is_empty()
    }));
    assert_eq!(dead.len(), 1);
    let event: serde_json::Value = serde_json::from_slice(&dead[0]).unwrap();
    let ev = event["id"].as_str().unwrap().to_owned();
    assert_eq!(receiver.count(), 3, "N = 3 tries, then no more");
    let log = store.deliveries(&ev).unwrap();
    assert_eq!(
        log.iter().map(|d| d.attempt).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(log.iter().all(|d| !d.ok && d.status == Some(500)));
    let rec = store.job_status(&ev, "webhooks").unwrap().unwrap();
    assert_eq!((rec.status.as_str(), rec.attempts), ("dead", 3));
    // The other jobs of the same event were not affected.
    assert!(wait_for(Duration::from_secs(10), || store
        .job_status(&ev, "indexing")
        .unwrap()
        .is_some_and(|r| r.status == "done")));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(receiver.count(), 3);
    assert_eq!(
        server.metric("gitplane_hook_jobs_dead_lettered_total{job=\"webhooks\"}"),
        1
    );
}

#[test]
fn hook_without_a_usable_store_fails_loudly() {
    // The post-receive hook must tell the pusher (stderr, non-zero) when it cannot record.
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("d");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir(data.join("gitplane.db")).unwrap(); // a directory where the db should be
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(&data)
        .args(["hook", "post-receive"])
        .env("GITPLANE_REPO", "a/b")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{} {} refs/heads/main\n", "0".repeat(40), "a".repeat(40)).as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NOT recorded"), "{err}");
}

#[test]
fn reference_transaction_without_a_usable_store_refuses_the_update() {
    // Real git: a `prepared` that cannot be recorded makes git abort, so no ref moves unseen.
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("d");
    std::fs::create_dir_all(data.join("hooks")).unwrap();
    std::fs::create_dir(data.join("gitplane.db")).unwrap(); // a directory where the db should be
    let hook = data.join("hooks/reference-transaction");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nexec '{BIN}' --data-dir '{}' hook reference-transaction \"$1\"\n",
            data.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let bare = root.path().join("r.git");
    let out = Command::new("git")
        .args(["init", "-q", "--bare"])
        .arg(&bare)
        .output()
        .unwrap();
    assert!(out.status.success());
    git(
        &bare,
        &[
            "config",
            "core.hooksPath",
            &data.join("hooks").to_string_lossy(),
        ],
    );
    let work = root.path().join("w");
    make_worktree(&work, 1);
    let out = Command::new("git")
        .current_dir(&work)
        .env("GITPLANE_REPO", "a/b")
        .args(["push", &bare.to_string_lossy(), "main"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the push must fail: {err}");
    assert!(err.contains("ref update refused"), "{err}");
    let refs = git(&bare, &["for-each-ref"]);
    assert!(refs.trim().is_empty(), "no ref moved: {refs}");
}

// --- measurements (ignored by default) ---------------------------------------------------------------

/// End-to-end events/s from the outbox to job completion through the real broker, confirms on,
/// with the trivial `noop` job only.
#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_end_to_end_events_per_second() {
    require_broker();
    let events: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let server = hook_server(&config(
        Some(BROKER),
        &unique_prefix("bench"),
        "prefetch = 256\n",
        "disk_usage = 0\nwebhooks = 0\nindexing = 0\nnoop = 256\n",
    ));
    // Let both cores connect and declare before the clock starts.
    assert!(wait_for(Duration::from_secs(20), || server
        .metric("gitplane_hook_amqp_connects_total")
        >= 2));
    let store = server.store();
    let started = Instant::now();
    store
        .in_transaction(|s| {
            for i in 0..events {
                let id = format!("bench-{i:08}");
                let payload = format!(
                    r#"{{"id":"{id}","repository":"admin/bench","pusher":"admin","refs":[],"push_options":[],"pushed_at":0}}"#
                );
                s.outbox_insert(&id, "admin/bench", &payload)?;
            }
            Ok(())
        })
        .unwrap();
    let inserted = started.elapsed();
    assert!(wait_for(Duration::from_secs(300), || store
        .outbox_depth()
        .unwrap()
        == 0));
    let relayed = started.elapsed();
    assert!(
        wait_for(
            Duration::from_secs(300),
            || store.job_count("noop", "done").unwrap() as usize >= events
        ),
        "only {} of {events} done:\n{}",
        store.job_count("noop", "done").unwrap(),
        server.log()
    );
    let elapsed = started.elapsed();
    println!(
        "end-to-end: {events} events in {:.2} s = {:.0} events/s (outbox insert of all rows took {:.2} s; outbox empty, i.e. all confirmed, after {:.2} s = {:.0} events/s); published {} confirmed {}",
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64(),
        inserted.as_secs_f64(),
        relayed.as_secs_f64(),
        events as f64 / relayed.as_secs_f64(),
        server.metric("gitplane_hook_published_total"),
        server.metric("gitplane_hook_confirmed_total"),
    );
}

/// What one push pays for durability: the `gitplane hook post-receive` process (start, open the
/// store, one fsynced insert), and the insert alone.
#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_outbox_write_cost() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("d");
    std::fs::create_dir_all(&data).unwrap();
    let store = Store::open(&gitplane::store::Location::sqlite(&data)).unwrap();
    let n = 2000;
    let started = Instant::now();
    for i in 0..n {
        let id = format!("e{i}");
        store.outbox_insert(&id, "a/b", r#"{"refs":[]}"#).unwrap();
    }
    let per_insert = started.elapsed() / n;
    let runs = 200;
    let line = format!("{} {} refs/heads/main\n", "0".repeat(40), "a".repeat(40));
    let started = Instant::now();
    for _ in 0..runs {
        let mut child = Command::new(BIN)
            .arg("--data-dir")
            .arg(&data)
            .args(["hook", "post-receive"])
            .env("GITPLANE_REPO", "a/b")
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(line.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
    }
    let per_hook = started.elapsed() / runs;
    println!(
        "outbox write: {:.1} us per fsynced insert (in process); {:.2} ms per `gitplane hook post-receive` run (process start + open + insert)",
        per_insert.as_secs_f64() * 1e6,
        per_hook.as_secs_f64() * 1e3
    );
}
