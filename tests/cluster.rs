//! The cluster (#14): three (or four) real `gitplane serve` nodes on loopback, one scratch
//! PostgreSQL database, moto's S3 for LFS, and the real git, git-lfs and OpenSSH clients.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    git, git_env, git_raw, make_worktree, openssh_command, ssh_keygen, ssh_known_hosts, S3Server,
    Server, ServerOptions, SharedStore,
};

struct Cluster {
    nodes: Vec<Server>,
    password: String,
    _secret_dir: tempfile::TempDir,
    _s3: S3Server,
}

fn cluster(n: usize) -> Cluster {
    let shared = SharedStore::create();
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("cluster-secret");
    std::fs::write(&secret, "a-cluster-secret-for-the-tests-0123456789\n").unwrap();
    let s3 = S3Server::start();
    let config = format!(
        "{}\n[cluster]\ndown_after_ms = 3000\nheartbeat_ms = 300\n",
        s3.bucket_config("cluster-lfs")
    );
    let nodes: Vec<Server> = (1..=n)
        .map(|i| {
            Server::start_with(ServerOptions {
                shared_store: Some((shared.clone(), format!("n{i}"))),
                cluster_secret: Some(secret.clone()),
                config: Some(config.clone()),
                ..ServerOptions::default()
            })
        })
        .collect();
    let password = nodes[0].admin_password.clone();
    assert!(!password.is_empty(), "node 1 made `admin`");
    Cluster {
        nodes,
        password,
        _secret_dir: secret_dir,
        _s3: s3,
    }
}

impl Cluster {
    fn url(&self, node: usize, repo: &str) -> String {
        format!(
            "http://admin:{}@{}/{repo}.git",
            self.password, self.nodes[node].addr
        )
    }

    fn status(&self) -> String {
        self.nodes[0].admin(&["cluster", "status"], None)
    }

    /// Creates `repo` with two copies on three nodes; returns the node that holds none.
    fn create_on_two(&self, repo: &str) -> usize {
        let out = self.nodes[0].admin(&["repo", "create", repo, "--replication-factor", "2"], None);
        (0..3)
            .find(|i| !out.contains(&format!("n{}", i + 1)))
            .expect("one node holds no copy")
    }

    /// `OID REF` of every ref of `repo` on `node`'s disk.
    fn refs_on_disk(&self, node: usize, repo: &str) -> String {
        git(
            &self.nodes[node].repo_path(repo),
            &["for-each-ref", "--format=%(objectname) %(refname)"],
        )
    }
}

fn ls_remote(dir: &Path, url: &str) -> String {
    let mut lines: Vec<String> = git(dir, &["ls-remote", "--refs", url])
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines.join("\n")
}

fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if cond() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn created_on_one_node_pushed_through_another_identical_everywhere() {
    let c = cluster(3);
    let out = c.nodes[0].admin(&["repo", "create", "admin/app"], None);
    assert!(
        out.contains("n1") && out.contains("n2") && out.contains("n3"),
        "{out}"
    );
    let work = tempfile::tempdir().unwrap();
    make_worktree(work.path(), 3);
    let out = git_raw(work.path(), &["push", &c.url(1, "admin/app"), "main"], &[]);
    assert!(
        out.status.success(),
        "{}\n--- n2 ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.nodes[1].log(),
    );
    git(
        work.path(),
        &[
            "push",
            "-q",
            &c.url(1, "admin/app"),
            "main:refs/heads/second",
        ],
    );

    let first = ls_remote(work.path(), &c.url(0, "admin/app"));
    assert!(
        first.contains("refs/heads/main") && first.contains("refs/heads/second"),
        "{first}"
    );
    for node in 0..3 {
        assert_eq!(
            ls_remote(work.path(), &c.url(node, "admin/app")),
            first,
            "through n{}",
            node + 1
        );
        let clone = tempfile::tempdir().unwrap();
        git(
            clone.path(),
            &["clone", "-q", &c.url(node, "admin/app"), "c"],
        );
        git(&clone.path().join("c"), &["fsck", "--full"]);
    }
    let on_disk = c.refs_on_disk(0, "admin/app");
    assert!(on_disk.contains("refs/heads/second"), "{on_disk}");
    assert_eq!(c.refs_on_disk(1, "admin/app"), on_disk);
    assert_eq!(c.refs_on_disk(2, "admin/app"), on_disk);
    let status = c.status();
    assert!(
        status.contains("every repository's replicas agree"),
        "{status}"
    );
}

#[test]
fn sixty_pushes_with_a_node_killed_halfway_lose_nothing_acknowledged() {
    let mut c = cluster(3);
    c.nodes[0].admin(&["repo", "create", "admin/busy"], None);
    let work = tempfile::tempdir().unwrap();
    make_worktree(work.path(), 1);
    git(
        work.path(),
        &["push", "-q", &c.url(0, "admin/busy"), "main"],
    );
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for i in 0..60 {
        if i == 30 {
            c.nodes[2].kill9();
        }
        let node = i % 3;
        if node == 2 && i >= 30 {
            // Its clients cannot reach it: they would go to another node (a balancer's job).
            refused += 1;
            continue;
        }
        std::fs::write(work.path().join("f.txt"), i.to_string()).unwrap();
        git(work.path(), &["add", "f.txt"]);
        git(work.path(), &["commit", "-qm", &format!("c{i}")]);
        let branch = format!("HEAD:refs/heads/b{i}");
        let out = git_raw(
            work.path(),
            &["push", "-q", &c.url(node, "admin/busy"), &branch],
            &[],
        );
        if out.status.success() {
            acknowledged.push(format!("refs/heads/b{i}"));
        } else {
            refused += 1;
            eprintln!(
                "push {i} via n{} failed: {}",
                node + 1,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    eprintln!("{} pushes acknowledged, {refused} not", acknowledged.len());
    assert!(
        acknowledged.len() >= 45,
        "too few pushes went through: {}",
        acknowledged.len()
    );
    for node in 0..2 {
        let refs = ls_remote(work.path(), &c.url(node, "admin/busy"));
        for r in &acknowledged {
            assert!(
                refs.contains(r.as_str()),
                "{r} acknowledged but missing through n{}",
                node + 1
            );
        }
        git(&c.nodes[node].repo_path("admin/busy"), &["fsck", "--full"]);
    }
    let status = c.status();
    assert!(
        status.contains("n3") && status.contains("outdated"),
        "{status}"
    );

    c.nodes[2].restart();
    let repaired = wait_until(Duration::from_secs(60), || {
        c.refs_on_disk(2, "admin/busy") == c.refs_on_disk(0, "admin/busy")
            && c.status().contains("every repository's replicas agree")
    })
    .expect("n3 was not repaired within 60 s");
    eprintln!("n3 repaired {repaired:?} after its restart");
    git(&c.nodes[2].repo_path("admin/busy"), &["fsck", "--full"]);
    assert_eq!(
        ls_remote(work.path(), &c.url(2, "admin/busy")),
        ls_remote(work.path(), &c.url(0, "admin/busy"))
    );
}

#[test]
fn killing_the_coordinator_mid_push_leaves_the_cluster_agreeing_with_the_client() {
    let mut c = cluster(3);
    c.nodes[0].admin(&["repo", "create", "admin/big"], None);
    let work = tempfile::tempdir().unwrap();
    make_worktree(work.path(), 1);
    git(work.path(), &["push", "-q", &c.url(0, "admin/big"), "main"]);
    // A push large enough to be in flight when its node dies.
    std::fs::write(
        work.path().join("big.bin"),
        common::random_bytes(24 << 20, 7),
    )
    .unwrap();
    git(work.path(), &["add", "big.bin"]);
    git(work.path(), &["commit", "-qm", "big"]);
    let url = c.url(1, "admin/big");
    let dir = work.path().to_owned();
    let push = std::thread::spawn(move || {
        git_raw(&dir, &["push", "-q", &url, "HEAD:refs/heads/big"], &[])
    });
    std::thread::sleep(Duration::from_millis(400));
    c.nodes[1].kill9();
    let out = push.join().unwrap();
    let acknowledged = out.status.success();
    eprintln!("push acknowledged: {acknowledged}");
    // The survivors agree, and with what the client saw when it was told success.
    let settled = wait_until(Duration::from_secs(30), || {
        c.refs_on_disk(0, "admin/big") == c.refs_on_disk(2, "admin/big")
    });
    assert!(settled.is_some(), "n1 and n3 disagree");
    let refs = ls_remote(work.path(), &c.url(0, "admin/big"));
    if acknowledged {
        assert!(
            refs.contains("refs/heads/big"),
            "acknowledged but missing: {refs}"
        );
    }
    assert_eq!(refs, ls_remote(work.path(), &c.url(2, "admin/big")));
    c.nodes[1].restart();
    wait_until(Duration::from_secs(60), || {
        c.refs_on_disk(1, "admin/big") == c.refs_on_disk(0, "admin/big")
    })
    .expect("the old coordinator was not brought in line within 60 s");
}

#[test]
fn ssh_and_lfs_through_a_node_that_holds_no_copy() {
    common::require_tool("git-lfs");
    let c = cluster(3);
    let outsider = c.create_on_two("admin/media");
    assert!(!c.nodes[outsider].repo_path("admin/media").exists());

    // LFS (objects in S3) and git over HTTP, through the node without a copy.
    let work = tempfile::tempdir().unwrap();
    make_worktree(work.path(), 1);
    git(work.path(), &["lfs", "install", "--local"]);
    git(work.path(), &["lfs", "track", "*.bin"]);
    std::fs::write(
        work.path().join("asset.bin"),
        common::random_bytes(3 << 20, 11),
    )
    .unwrap();
    git(work.path(), &["add", ".gitattributes", "asset.bin"]);
    git(work.path(), &["commit", "-qm", "lfs"]);
    git(
        work.path(),
        &["push", "-q", &c.url(outsider, "admin/media"), "main"],
    );
    // A relayed v2 clone spawns git on the holder only for its pack: the holder answers the
    // advertisement and ls-refs from memory and disk, as it does for its own clients.
    let holders: Vec<usize> = (0..3).filter(|i| *i != outsider).collect();
    let v2_answers = |nodes: &[usize]| -> [u64; 2] {
        let sum = |series| {
            nodes
                .iter()
                .map(|&i| common::metric(&c.nodes[i], series))
                .sum()
        };
        [
            sum("gitplane_git_v2_advertisements_total"),
            sum("gitplane_git_v2_ls_refs_total"),
        ]
    };
    let (by_holders, by_outsider) = (v2_answers(&holders), v2_answers(&[outsider]));
    let clone = tempfile::tempdir().unwrap();
    git(
        clone.path(),
        &["clone", "-q", &c.url(outsider, "admin/media"), "c"],
    );
    let after = v2_answers(&holders);
    assert_eq!(
        [after[0] - by_holders[0], after[1] - by_holders[1]],
        [1, 1],
        "a holder answers the relayed clone's advertisement and ls-refs itself"
    );
    assert_eq!(
        v2_answers(&[outsider]),
        by_outsider,
        "the node without a copy answers no v2 request itself"
    );
    let copy = clone.path().join("c");
    git(&copy, &["lfs", "install", "--local"]);
    git(&copy, &["lfs", "pull"]);
    let same = std::fs::read(copy.join("asset.bin")).unwrap()
        == std::fs::read(work.path().join("asset.bin")).unwrap();
    assert!(
        same,
        "the LFS object came back different through the outsider"
    );

    // SSH through the same node: authenticated there, git relayed to a copy.
    let keys = tempfile::tempdir().unwrap();
    let key = ssh_keygen(keys.path(), "admin");
    c.nodes[0].admin(
        &["key", "add", "admin", &format!("{}.pub", key.display())],
        None,
    );
    let ssh = openssh_command(&key, &ssh_known_hosts(&c.nodes[outsider], keys.path()));
    let url = format!(
        "ssh://git@127.0.0.1:{}/admin/media.git",
        c.nodes[outsider].listening["ssh"].port()
    );
    let env = [
        ("GIT_SSH_COMMAND", ssh.as_str()),
        ("GIT_LFS_SKIP_SMUDGE", "1"),
    ];
    git_env(clone.path(), &["clone", "-q", &url, "s"], &env);
    std::fs::write(clone.path().join("s/over-ssh.txt"), "ssh").unwrap();
    git(&clone.path().join("s"), &["add", "over-ssh.txt"]);
    git(&clone.path().join("s"), &["commit", "-qm", "over ssh"]);
    git_env(
        &clone.path().join("s"),
        &["push", "-q", "origin", "main"],
        &env,
    );
    assert!(
        !c.nodes[outsider].repo_path("admin/media").exists(),
        "a copy appeared on the outsider"
    );
    assert_eq!(
        c.refs_on_disk(holders[0], "admin/media"),
        c.refs_on_disk(holders[1], "admin/media")
    );

    // A copy whose own config changes what upload-pack shows is left to git on the holder.
    for &h in &holders {
        git(
            &c.nodes[h].repo_path("admin/media"),
            &["config", "uploadpack.hideRefs", "refs/heads/hidden"],
        );
    }
    git(
        work.path(),
        &[
            "push",
            "-q",
            &c.url(outsider, "admin/media"),
            "main:refs/heads/hidden",
        ],
    );
    let before = v2_answers(&holders);
    let listed = ls_remote(work.path(), &c.url(outsider, "admin/media"));
    assert!(
        listed.contains("refs/heads/main") && !listed.contains("refs/heads/hidden"),
        "{listed}"
    );
    assert_eq!(v2_answers(&holders), before, "git answered, not gitplane");
}

#[test]
fn draining_a_node_under_clone_load_fails_no_clone() {
    let c = cluster(3);
    let out = c.nodes[0].admin(
        &["repo", "create", "admin/site", "--replication-factor", "2"],
        None,
    );
    let holders: Vec<usize> = (0..3)
        .filter(|i| out.contains(&format!("n{}", i + 1)))
        .collect();
    let work = tempfile::tempdir().unwrap();
    make_worktree(work.path(), 20);
    git(
        work.path(),
        &["push", "-q", &c.url(0, "admin/site"), "main"],
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let urls: Vec<String> = (0..3).map(|i| c.url(i, "admin/site")).collect();
    let loaders: Vec<_> = (0..4)
        .map(|t| {
            let (stop, urls) = (stop.clone(), urls.clone());
            std::thread::spawn(move || {
                let dir = tempfile::tempdir().unwrap();
                let (mut ok, mut failed) = (0, Vec::new());
                for i in 0..10_000 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let dest = format!("c{t}-{i}");
                    let r = git_raw(dir.path(), &["clone", "-q", &urls[(t + i) % 3], &dest], &[]);
                    if r.status.success() {
                        ok += 1;
                    } else {
                        failed.push(String::from_utf8_lossy(&r.stderr).into_owned());
                    }
                    let _ = std::fs::remove_dir_all(dir.path().join(&dest));
                }
                (ok, failed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let drained = format!("n{}", holders[0] + 1);
    let out = c.nodes[0].admin(&["node", "drain", &drained], None);
    assert!(out.contains("holds no replica now"), "{out}");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for l in loaders {
        let (o, f) = l.join().unwrap();
        ok += o;
        failed.extend(f);
    }
    eprintln!("{ok} clones during the drain, {} failed", failed.len());
    assert!(
        failed.is_empty(),
        "clones failed during the drain: {failed:?}"
    );
    assert!(ok > 0);
    assert!(
        !c.nodes[holders[0]].repo_path("admin/site").exists(),
        "the drained copy is still on disk"
    );
    let status = c.status();
    assert!(
        status.contains("every repository's replicas agree"),
        "{status}"
    );
}

#[test]
fn grpc_reads_only_current_copies_and_votes_its_ref_changes_like_pushes() {
    use common::grpc::{call, connect, frame, runtime};
    use gitplane::rpc::pb::v1 as pb;
    use prost::Message;
    let c = cluster(3);
    let outsider = c.create_on_two("admin/api");
    let holder = (outsider + 1) % 3;
    let work = tempfile::tempdir().unwrap();
    make_worktree(work.path(), 2);
    git(
        work.path(),
        &["push", "-q", &c.url(holder, "admin/api"), "main"],
    );
    let ask = |node: usize, path: &str, body: Vec<u8>| {
        let addr = c.nodes[node].listening["rpc"];
        let token = std::fs::read_to_string(c.nodes[node].data_dir().join("rpc-token")).unwrap();
        let auth = format!("Bearer {}", token.trim());
        runtime().block_on(async {
            let client = connect(addr).await;
            call(
                &client,
                path,
                &[("authorization", auth.as_str())],
                &[frame(0, &body)],
                false,
            )
            .await
        })
    };
    let list = pb::ListBranchesRequest {
        repository: "admin/api".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let a = ask(
        holder,
        "/gitplane.v1.RepositoryService/ListBranches",
        list.clone(),
    );
    assert_eq!(a.grpc_status(), Some(0), "{a:?}");
    let a = ask(
        outsider,
        "/gitplane.v1.RepositoryService/ListBranches",
        list,
    );
    assert_eq!(
        a.grpc_status(),
        Some(9),
        "FAILED_PRECONDITION expected: {a:?}"
    );
    assert!(
        a.grpc_message().contains("call node"),
        "{}",
        a.grpc_message()
    );
    let create = |name: &str| {
        pb::CreateBranchRequest {
            repository: "admin/api".into(),
            name: name.into(),
            start_point: "main".into(),
        }
        .encode_to_vec()
    };
    // A branch made through the API lands on both copies, as a push would.
    let a = ask(
        holder,
        "/gitplane.v1.RepositoryService/CreateBranch",
        create("via-api"),
    );
    assert_eq!(a.grpc_status(), Some(0), "{a:?}");
    let other = (holder + 1) % 3;
    let other = if other == outsider {
        (other + 1) % 3
    } else {
        other
    };
    assert!(c
        .refs_on_disk(holder, "admin/api")
        .contains("refs/heads/via-api"));
    assert_eq!(
        c.refs_on_disk(other, "admin/api"),
        c.refs_on_disk(holder, "admin/api")
    );
    assert!(ls_remote(work.path(), &c.url(outsider, "admin/api")).contains("via-api"));
    assert!(c.status().contains("every repository's replicas agree"));

    // With the other copy's node down, two copies have no majority without it: the call fails
    // and nothing changes, here or there.
    c.nodes[other].signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(3500));
    let a = ask(
        holder,
        "/gitplane.v1.RepositoryService/CreateBranch",
        create("no-majority"),
    );
    c.nodes[other].signal(libc::SIGCONT);
    assert_eq!(a.grpc_status(), Some(14), "UNAVAILABLE expected: {a:?}");
    assert!(
        a.grpc_message().contains("replicas"),
        "{}",
        a.grpc_message()
    );
    assert!(!c.refs_on_disk(holder, "admin/api").contains("no-majority"));
    assert!(!c.refs_on_disk(other, "admin/api").contains("no-majority"));
}

#[test]
fn a_partitioned_node_is_left_behind_then_repaired_and_each_push_fires_once() {
    let c = cluster(3);
    c.nodes[0].admin(&["repo", "create", "admin/web"], None);
    let (hook_url, deliveries) = common::webhook_receiver();
    c.nodes[1].admin(
        &["webhook", "add", "admin/web", &hook_url, "--secret-stdin"],
        Some("s\n"),
    );
    let work = tempfile::tempdir().unwrap();
    make_worktree(work.path(), 1);
    git(work.path(), &["push", "-q", &c.url(0, "admin/web"), "main"]);

    // n3 stops answering (SIGSTOP: its sockets stay open, nothing reads them).
    c.nodes[2].signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(3500));
    for i in 0..3 {
        std::fs::write(work.path().join("p.txt"), i.to_string()).unwrap();
        git(work.path(), &["add", "p.txt"]);
        git(work.path(), &["commit", "-qm", &format!("p{i}")]);
        let started = Instant::now();
        git(
            work.path(),
            &["push", "-q", &c.url(i % 2, "admin/web"), "main"],
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a push waited {:?} on the stopped node",
            started.elapsed()
        );
    }
    let status = c.status();
    assert!(
        status.contains("DOWN") && status.contains("outdated"),
        "{status}"
    );

    c.nodes[2].signal(libc::SIGCONT);
    wait_until(Duration::from_secs(60), || {
        c.refs_on_disk(2, "admin/web") == c.refs_on_disk(0, "admin/web")
            && c.status().contains("every repository's replicas agree")
    })
    .expect("n3 was not repaired within 60 s of its return");
    assert_eq!(
        ls_remote(work.path(), &c.url(2, "admin/web")),
        ls_remote(work.path(), &c.url(0, "admin/web"))
    );
    // One event per push (4 pushes), not one per replica.
    assert!(
        wait_until(Duration::from_secs(20), || deliveries.lock().unwrap().len()
            >= 4)
        .is_some()
    );
    std::thread::sleep(Duration::from_secs(2));
    let got = deliveries.lock().unwrap();
    let ids: std::collections::HashSet<String> = got
        .iter()
        .filter_map(|d| d["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        (got.len(), ids.len()),
        (4, 4),
        "deliveries, distinct events"
    );
}

#[test]
fn concurrent_pushes_of_distinct_branches_through_every_node_all_commit() {
    let c = cluster(3);
    c.nodes[0].admin(&["repo", "create", "admin/team"], None);
    let base = tempfile::tempdir().unwrap();
    make_worktree(base.path(), 1);
    git(
        base.path(),
        &["push", "-q", &c.url(0, "admin/team"), "main"],
    );
    let pushers: Vec<_> = (0..9)
        .map(|i| {
            let url = c.url(i % 3, "admin/team");
            let src = base.path().to_owned();
            std::thread::spawn(move || {
                let dir = tempfile::tempdir().unwrap();
                git(
                    dir.path(),
                    &["clone", "-q", &src.display().to_string(), "w"],
                );
                let w = dir.path().join("w");
                std::fs::write(w.join(format!("t{i}")), "x").unwrap();
                git(&w, &["add", "."]);
                git(&w, &["commit", "-qm", &format!("t{i}")]);
                let out = git_raw(
                    &w,
                    &["push", "-q", &url, &format!("HEAD:refs/heads/t{i}")],
                    &[],
                );
                (
                    i,
                    out.status.success(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                )
            })
        })
        .collect();
    for p in pushers {
        let (i, ok, err) = p.join().unwrap();
        assert!(
            ok,
            "push {i} failed: {err}\n{}",
            c.nodes[i % 3]
                .log()
                .lines()
                .filter(|l| !l.contains("DEBUG"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let refs = ls_remote(base.path(), &c.url(2, "admin/team"));
    for i in 0..9 {
        assert!(
            refs.contains(&format!("refs/heads/t{i}")),
            "t{i} missing: {refs}"
        );
    }
    wait_until(Duration::from_secs(30), || {
        c.status().contains("every repository's replicas agree")
    })
    .expect("copies still disagree 30 s after the pushes");
    let on_disk = c.refs_on_disk(0, "admin/team");
    assert_eq!(c.refs_on_disk(1, "admin/team"), on_disk);
    assert_eq!(c.refs_on_disk(2, "admin/team"), on_disk);
}

#[test]
fn a_copy_left_in_a_write_window_by_a_crash_is_repaired_before_it_is_trusted() {
    let mut c = cluster(3);
    c.nodes[0].admin(&["repo", "create", "admin/doubt"], None);
    let work = tempfile::tempdir().unwrap();
    make_worktree(work.path(), 1);
    git(
        work.path(),
        &["push", "-q", &c.url(0, "admin/doubt"), "main"],
    );
    c.nodes[1].kill9();
    // As if it lost power between the vote and git's commit: its transaction file is left.
    let dir = c.nodes[1].repo_path("admin/doubt");
    std::fs::write(dir.join("gitplane-txn-000000000000000000000000"), "1").unwrap();
    c.nodes[1].restart();
    assert!(
        c.nodes[1]
            .log()
            .contains("an interrupted write left this copy in doubt"),
        "the restart did not mark the copy"
    );
    assert!(!dir.join("gitplane-txn-000000000000000000000000").exists());
    wait_until(Duration::from_secs(30), || {
        c.status().contains("every repository's replicas agree")
    })
    .expect("the copy in doubt was not repaired within 30 s");
    assert_eq!(
        c.refs_on_disk(1, "admin/doubt"),
        c.refs_on_disk(0, "admin/doubt")
    );
}

#[test]
fn a_node_without_a_copy_keeps_relayed_answers_until_the_next_write() {
    let c = cluster(3);
    let outsider = c.create_on_two("admin/kept");
    let holders: Vec<usize> = (0..3).filter(|i| *i != outsider).collect();
    let work = tempfile::tempdir().unwrap();
    make_worktree(work.path(), 3);
    git(
        work.path(),
        &["push", "-q", &c.url(holders[0], "admin/kept"), "main"],
    );
    // What reaches the holders: v2 advertisements and ls-refs they answer, packs upload-pack
    // asks of their pack cache.
    let holder_work = || -> u64 {
        let series = [
            "gitplane_git_v2_advertisements_total",
            "gitplane_git_v2_ls_refs_total",
            "gitplane_pack_cache_hits_total",
            "gitplane_pack_cache_misses_total",
            "gitplane_pack_cache_bypassed_total",
        ];
        holders
            .iter()
            .flat_map(|&h| series.iter().map(move |s| (h, s)))
            .map(|(h, s)| common::metric(&c.nodes[h], s))
            .sum()
    };
    let outsider_metric = |series| common::metric(&c.nodes[outsider], series);
    // One more commit, pushed through `node`.
    let push_commit = |node: usize, name: &str| {
        std::fs::write(work.path().join(name), name).unwrap();
        git(work.path(), &["add", name]);
        git(work.path(), &["commit", "-qm", name]);
        git(
            work.path(),
            &["push", "-q", &c.url(node, "admin/kept"), "main"],
        );
    };
    let clone = |name: &str| {
        let dir = tempfile::tempdir().unwrap();
        git(
            dir.path(),
            &[
                "clone",
                "-q",
                "--bare",
                &c.url(outsider, "admin/kept"),
                name,
            ],
        );
        let refs = git(
            &dir.path().join(name),
            &["for-each-ref", "--format=%(objectname) %(refname)"],
        );
        git(&dir.path().join(name), &["fsck", "--full"]);
        refs
    };

    // The first clone is relayed and nothing kept (most requests come once); the second is
    // relayed and its three answers (advertisement, ls-refs, pack) kept.
    let stored = || outsider_metric("gitplane_relay_cache_stored_total");
    let (work0, stored0) = (holder_work(), stored());
    let first = clone("first");
    assert_eq!(first, c.refs_on_disk(holders[0], "admin/kept"));
    assert!(holder_work() > work0, "the first clone reached a holder");
    assert_eq!(stored(), stored0, "an answer asked for once was kept");
    let work1 = holder_work();
    assert_eq!(clone("second"), first);
    assert!(holder_work() > work1, "the second clone reached a holder");
    assert_eq!(
        stored() - stored0,
        3,
        "the outsider kept the advertisement, ls-refs and the pack"
    );
    // The third is answered by the outsider alone, the same.
    let (work1, hits1) = (
        holder_work(),
        outsider_metric("gitplane_relay_cache_hits_total"),
    );
    assert_eq!(clone("third"), first);
    assert_eq!(holder_work(), work1, "the third clone reached a holder");
    assert_eq!(
        outsider_metric("gitplane_relay_cache_hits_total") - hits1,
        3
    );

    // A push (through a holder: the outsider sees only the store) makes a new generation: the
    // next clone through the outsider is relayed again and has it.
    push_commit(holders[1], "after");
    let pushed = clone("pushed");
    assert_ne!(pushed, first);
    assert_eq!(pushed, c.refs_on_disk(holders[0], "admin/kept"));
    assert!(
        holder_work() > work1,
        "the clone after the push reached a holder"
    );

    // A holder with a write between vote and commit (its copy may lag the generation) answers,
    // but not as current: nothing is kept until no such write is left.
    let window: Vec<_> = holders
        .iter()
        .map(|&h| c.nodes[h].repo_path("admin/kept").join("gitplane-txn-test"))
        .collect();
    push_commit(holders[0], "windowed");
    for f in &window {
        std::fs::write(f, "1").unwrap();
    }
    let before_window = stored();
    let windowed = clone("windowed");
    assert_eq!(windowed, c.refs_on_disk(holders[0], "admin/kept"));
    // Asked for a second time: it would be kept, were the copies not in a write window.
    assert_eq!(clone("windowed-again"), windowed);
    assert_eq!(
        stored(),
        before_window,
        "an answer from a copy inside a write window was kept"
    );
    for f in &window {
        std::fs::remove_file(f).unwrap();
    }
    assert_eq!(clone("after-window"), windowed);
    assert_eq!(stored() - before_window, 3);
}
