"""gitplane's gRPC API driven by a real gRPC client (Python grpcio, stubs generated from proto/
at test time), answers checked against what the git CLI says about the same repository.

Run by tests/rpc.rs, which starts the server, builds the fixture (tests/rpc/make_fixture.sh) and
sets the environment:
  RPC_ADDR      host:port of the gRPC listener
  RPC_TOKEN     the bearer token
  RPC_REPO      owner/name of the fixture repository
  RPC_BARE      its path on disk (the git CLI reads it directly)
  RPC_PID       the server's pid (for its RSS)
  RPC_STUBS     where grpc_tools.protoc wrote the stubs
  RPC_BIG_MB    size of the big blob on branch `big`, in MiB
"""

import hashlib
import os
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.environ["RPC_STUBS"])

import grpc  # noqa: E402

from gitplane.v1 import repository_pb2 as pb  # noqa: E402
from gitplane.v1 import repository_pb2_grpc as pb_grpc  # noqa: E402
import health_pb2  # noqa: E402
import health_pb2_grpc  # noqa: E402

ADDR = os.environ["RPC_ADDR"]
TOKEN = os.environ["RPC_TOKEN"]
REPO = os.environ["RPC_REPO"]
BARE = os.environ["RPC_BARE"]
PID = int(os.environ["RPC_PID"])
BIG_MB = int(os.environ["RPC_BIG_MB"])
AUTH = [("authorization", "Bearer " + TOKEN)]
MiB = 1024 * 1024


def git(*args, check=True):
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null")
    out = subprocess.run(
        ["git", "--git-dir", BARE, *args], env=env, capture_output=True, check=False
    )
    if check and out.returncode != 0:
        raise AssertionError("git %s failed: %s" % (args, out.stderr.decode()))
    return out.stdout.decode()


def git_bytes(*args):
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null")
    return subprocess.run(
        ["git", "--git-dir", BARE, *args], env=env, capture_output=True, check=True
    ).stdout


def rev(r):
    return git("rev-parse", r).strip()


def rss_kib():
    with open("/proc/%d/status" % PID) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for the server")


def numstat(*spec):
    """{new_path: (adds, dels)} from `git diff --numstat -z -M`; binary files give (None, None)."""
    out = {}
    tokens = git("diff", "--numstat", "-z", "-M", *spec).split("\0")
    i = 0
    while i < len(tokens) and tokens[i]:
        a, d, path = tokens[i].split("\t", 2)
        if path == "":  # a rename: old and new paths follow as separate tokens
            path = tokens[i + 2]
            i += 3
        else:
            i += 1
        out[path] = (None, None) if a == "-" else (int(a), int(d))
    return out


STATUS_LETTER = {
    pb.FILE_STATUS_ADDED: "A",
    pb.FILE_STATUS_DELETED: "D",
    pb.FILE_STATUS_MODIFIED: "M",
    pb.FILE_STATUS_RENAMED: "R",
    pb.FILE_STATUS_COPIED: "C",
    pb.FILE_STATUS_TYPE_CHANGED: "T",
}


class RepositoryApi(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        opts = [("grpc.max_receive_message_length", 8 * MiB)]
        cls.channel = grpc.insecure_channel(ADDR, options=opts)
        grpc.channel_ready_future(cls.channel).result(timeout=10)
        cls.stub = pb_grpc.RepositoryServiceStub(cls.channel)
        cls.health = health_pb2_grpc.HealthStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()

    def call(self, method, request, **kw):
        return getattr(self.stub, method)(request, metadata=AUTH, timeout=60, **kw)

    def assertCode(self, code, fn, *args, **kw):
        with self.assertRaises(grpc.RpcError) as cm:
            r = fn(*args, **kw)
            # Streaming calls fail while iterating.
            if hasattr(r, "__iter__") and not isinstance(r, (bytes, str)):
                for _ in r:
                    pass
        self.assertEqual(cm.exception.code(), code, cm.exception.details())
        return cm.exception

    # ----------------------------------------------------------------------------------------
    # Health, auth, repository lookup

    def test_health_needs_no_token(self):
        r = self.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        self.assertEqual(r.status, health_pb2.HealthCheckResponse.SERVING)
        r = self.health.Check(
            health_pb2.HealthCheckRequest(service="gitplane.v1.RepositoryService"), timeout=5
        )
        self.assertEqual(r.status, health_pb2.HealthCheckResponse.SERVING)
        self.assertCode(
            grpc.StatusCode.NOT_FOUND,
            self.health.Check,
            health_pb2.HealthCheckRequest(service="nope.Service"),
            timeout=5,
        )
        watch = self.health.Watch(health_pb2.HealthCheckRequest(), timeout=5)
        self.assertEqual(next(watch).status, health_pb2.HealthCheckResponse.SERVING)
        watch.cancel()

    def test_bad_or_missing_token_is_unauthenticated(self):
        req = pb.ListBranchesRequest(repository=REPO)
        e = self.assertCode(
            grpc.StatusCode.UNAUTHENTICATED,
            self.stub.ListBranches,
            req,
            metadata=[("authorization", "Bearer wrong-token-wrong-token")],
            timeout=5,
        )
        self.assertIn("Bearer", e.details())
        self.assertCode(grpc.StatusCode.UNAUTHENTICATED, self.stub.ListBranches, req, timeout=5)
        # Streaming calls are guarded too.
        self.assertCode(
            grpc.StatusCode.UNAUTHENTICATED,
            self.stub.GetBlob,
            pb.GetBlobRequest(repository=REPO, revision="main", path="README.md"),
            timeout=5,
        )

    def test_missing_repo_is_not_found_and_bad_name_invalid(self):
        e = self.assertCode(
            grpc.StatusCode.NOT_FOUND,
            self.call,
            "ListBranches",
            pb.ListBranchesRequest(repository="admin/no-such-repo"),
        )
        self.assertIn("admin/no-such-repo", e.details())
        self.assertCode(
            grpc.StatusCode.NOT_FOUND,
            self.call,
            "GetBlob",
            pb.GetBlobRequest(repository="admin/no-such-repo", revision="main", path="x"),
        )
        for bad in ["../etc", "admin", "admin/x/y", "admin/.hidden"]:
            self.assertCode(
                grpc.StatusCode.INVALID_ARGUMENT,
                self.call,
                "RepositoryInfo",
                pb.RepositoryInfoRequest(repository=bad),
            )

    # ----------------------------------------------------------------------------------------
    # Refs

    def test_list_branches_matches_git_with_paging(self):
        want = [
            line.split(" ")
            for line in git(
                "for-each-ref", "--format=%(refname:strip=2) %(objectname)", "refs/heads/"
            ).splitlines()
        ]
        got, token, pages = [], "", 0
        while True:
            r = self.call(
                "ListBranches", pb.ListBranchesRequest(repository=REPO, limit=7, page_token=token)
            )
            self.assertLessEqual(len(r.branches), 7)
            got.extend(r.branches)
            pages += 1
            token = r.next_page_token
            if not token:
                break
        self.assertEqual([[b.name, b.target.id] for b in got], want)
        self.assertEqual(pages, (len(want) + 6) // 7)
        self.assertEqual([b.name for b in got if b.is_default], ["main"])
        main = next(b for b in got if b.name == "main")
        self.assertEqual(main.target.summary, git("log", "-1", "--format=%s", "main").strip())
        self.assertEqual(main.target.tree_id, rev("main^{tree}"))
        self.assertEqual(main.target.message, "")
        # Default page size holds all of them; a bogus token is refused.
        r = self.call("ListBranches", pb.ListBranchesRequest(repository=REPO))
        self.assertEqual(len(r.branches), len(want))
        self.assertEqual(r.next_page_token, "")
        self.assertCode(
            grpc.StatusCode.INVALID_ARGUMENT,
            self.call,
            "ListBranches",
            pb.ListBranchesRequest(repository=REPO, page_token="bogus"),
        )

    def test_list_tags_matches_git_with_paging(self):
        fmt = "%(refname:strip=2) %(objectname) %(objecttype) %(*objectname)"
        want = [line.split(" ") for line in git("for-each-ref", "--format=" + fmt, "refs/tags/").splitlines()]
        got, token = [], ""
        while True:
            r = self.call("ListTags", pb.ListTagsRequest(repository=REPO, limit=2, page_token=token))
            got.extend(r.tags)
            token = r.next_page_token
            if not token:
                break
        self.assertEqual(len(got), len(want))
        for t, (name, oid, kind, peeled) in zip(got, want):
            self.assertEqual(t.name, name)
            self.assertEqual(t.id, oid)
            self.assertEqual(t.annotated, kind == "tag")
            self.assertEqual(t.target.id, peeled or oid)
            self.assertEqual(
                t.target.summary, git("log", "-1", "--format=%s", t.target.id).strip()
            )
        v2 = next(t for t in got if t.name == "v2.0")
        self.assertEqual(v2.message, "Release 2.0\n\nWith the feature merged.\n")
        self.assertEqual(v2.tagger.email, "committer@example.com")
        v01 = next(t for t in got if t.name == "v0.1")
        self.assertFalse(v01.annotated)
        self.assertEqual(v01.message, "")

    def test_create_and_delete_branch(self):
        r = self.call(
            "CreateBranch", pb.CreateBranchRequest(repository=REPO, name="tmp/created", start_point="v1.0")
        )
        self.assertEqual(r.branch.name, "tmp/created")
        self.assertEqual(r.branch.target.id, rev("v1.0^{commit}"))
        self.assertEqual(rev("refs/heads/tmp/created"), rev("v1.0^{commit}"))
        self.assertCode(
            grpc.StatusCode.ALREADY_EXISTS,
            self.call,
            "CreateBranch",
            pb.CreateBranchRequest(repository=REPO, name="tmp/created", start_point="main"),
        )
        self.assertEqual(rev("refs/heads/tmp/created"), rev("v1.0^{commit}"))
        for bad in ["bad..name", "-x", "a b", "x.lock", "HEAD", ""]:
            self.assertCode(
                grpc.StatusCode.INVALID_ARGUMENT,
                self.call,
                "CreateBranch",
                pb.CreateBranchRequest(repository=REPO, name=bad, start_point="main"),
            )
        self.assertCode(
            grpc.StatusCode.NOT_FOUND,
            self.call,
            "CreateBranch",
            pb.CreateBranchRequest(repository=REPO, name="tmp/x", start_point="no-such-rev"),
        )
        # A stale expected value is refused and nothing changes.
        self.assertCode(
            grpc.StatusCode.ABORTED,
            self.call,
            "DeleteBranch",
            pb.DeleteBranchRequest(repository=REPO, name="tmp/created", expected_old_id=rev("main")),
        )
        self.assertEqual(rev("refs/heads/tmp/created"), rev("v1.0^{commit}"))
        r = self.call(
            "DeleteBranch",
            pb.DeleteBranchRequest(repository=REPO, name="tmp/created", expected_old_id=rev("v1.0^{commit}")),
        )
        self.assertEqual(r.old_id, rev("v1.0^{commit}"))
        self.assertEqual(git("for-each-ref", "refs/heads/tmp/created"), "")
        self.assertCode(
            grpc.StatusCode.NOT_FOUND,
            self.call,
            "DeleteBranch",
            pb.DeleteBranchRequest(repository=REPO, name="tmp/created"),
        )
        self.assertCode(
            grpc.StatusCode.FAILED_PRECONDITION,
            self.call,
            "DeleteBranch",
            pb.DeleteBranchRequest(repository=REPO, name="main"),
        )

    # ----------------------------------------------------------------------------------------
    # Commits

    def check_commit(self, c, revision):
        oid = rev(revision + "^{commit}")
        self.assertEqual(c.id, oid)
        self.assertEqual(list(c.parent_ids), git("rev-list", "--parents", "-n1", oid).split()[1:])
        self.assertEqual(c.tree_id, rev(oid + "^{tree}"))
        an, ae, at, cn, ce, ct, s = git("log", "-1", "--format=%an%n%ae%n%at%n%cn%n%ce%n%ct%n%s", oid).splitlines()
        self.assertEqual((c.author.name, c.author.email, c.author.time), (an, ae, int(at)))
        self.assertEqual((c.committer.name, c.committer.email, c.committer.time), (cn, ce, int(ct)))
        self.assertEqual(c.summary, s)
        raw = git("cat-file", "commit", oid)
        self.assertEqual(c.message, raw.split("\n\n", 1)[1])

    def test_find_commit_matches_git(self):
        for r in ["main", "HEAD", "v1.0", "main~3", "feature", "v0.1", rev("main")[:10]]:
            c = self.call("FindCommit", pb.FindCommitRequest(repository=REPO, revision=r)).commit
            self.check_commit(c, r)
        # The fixture's author dates are +0900, committer dates +0000.
        c = self.call("FindCommit", pb.FindCommitRequest(repository=REPO, revision="main")).commit
        self.assertEqual(c.author.offset_minutes, 540)
        self.assertEqual(c.committer.offset_minutes, 0)
        merge = rev("v2.0^{commit}")
        c = self.call("FindCommit", pb.FindCommitRequest(repository=REPO, revision=merge)).commit
        self.assertEqual(len(c.parent_ids), 2)
        self.assertCode(
            grpc.StatusCode.NOT_FOUND,
            self.call,
            "FindCommit",
            pb.FindCommitRequest(repository=REPO, revision="no-such-branch"),
        )
        self.assertCode(
            grpc.StatusCode.INVALID_ARGUMENT,
            self.call,
            "FindCommit",
            pb.FindCommitRequest(repository=REPO, revision=""),
        )

    def log_all(self, limit, **kw):
        got, token = [], ""
        while True:
            r = self.call(
                "CommitLog", pb.CommitLogRequest(repository=REPO, limit=limit, page_token=token, **kw)
            )
            self.assertLessEqual(len(r.commits), limit)
            got.extend(r.commits)
            token = r.next_page_token
            if not token:
                return got

    def test_commit_log_matches_git_with_paging_and_filters(self):
        want = git("rev-list", "--date-order", "--full-history", "main").split()
        got = self.log_all(10, revision="main")
        self.assertEqual([c.id for c in got], want)
        self.assertGreater(len(want), 30)
        self.check_commit(got[5], want[5])
        # Empty revision means HEAD.
        self.assertEqual([c.id for c in self.log_all(1000)], want)
        # Path filters: a directory, a file, a file that moved.
        for path in ["src", "notes/log.txt", "README.md", "src/lib.rs", "docs"]:
            want_p = git("rev-list", "--date-order", "--full-history", "main", "--", path).split()
            got_p = self.log_all(4, revision="main", path=path)
            self.assertEqual([c.id for c in got_p], want_p, path)
            self.assertTrue(want_p, path)
        # Time window (committer time, inclusive).
        times = [int(t) for t in git("log", "--date-order", "--format=%ct", "main").split()]
        since, until = times[12], times[3]
        want_t = git(
            "rev-list", "--date-order", "--full-history", "--since=@%d" % since, "--until=@%d" % until, "main"
        ).split()
        got_t = self.log_all(3, revision="main", since=since, until=until)
        self.assertEqual([c.id for c in got_t], want_t)
        self.assertEqual(len(want_t), 10)
        # Paging stays on the commit the first page started from, even if the branch moves.
        self.call("CreateBranch", pb.CreateBranchRequest(repository=REPO, name="tmp/log-pin", start_point="main"))
        first = self.call("CommitLog", pb.CommitLogRequest(repository=REPO, revision="tmp/log-pin", limit=5))
        self.assertEqual([c.id for c in first.commits], want[:5])
        git("update-ref", "refs/heads/tmp/log-pin", "main~7")
        second = self.call(
            "CommitLog", pb.CommitLogRequest(repository=REPO, limit=5, page_token=first.next_page_token)
        )
        self.assertEqual([c.id for c in second.commits], want[5:10])
        self.assertCode(
            grpc.StatusCode.INVALID_ARGUMENT,
            self.call,
            "CommitLog",
            pb.CommitLogRequest(repository=REPO, path="../x"),
        )

    # ----------------------------------------------------------------------------------------
    # Diffs

    def diff(self, method, request):
        msgs = list(getattr(self.stub, method)(request, metadata=AUTH, timeout=60))
        self.assertTrue(msgs[0].HasField("summary"))
        self.assertTrue(msgs[-1].HasField("totals"))
        files = [f for m in msgs[1:-1] for f in m.files]
        return msgs[0].summary, files, msgs[-1].totals

    def check_files(self, files, *spec, renames=True):
        args = ["diff", "--name-status"] + (["-M"] if renames else ["--no-renames"]) + list(spec)
        want = []
        for line in git(*args).splitlines():
            parts = line.split("\t")
            want.append((parts[0][0], parts[1], parts[-1]))
        got = []
        for f in files:
            letter = STATUS_LETTER[f.status]
            old = f.old_path if letter != "A" else f.new_path
            got.append((letter, old, f.new_path))
        self.assertEqual(sorted(got), sorted(want))
        stats = numstat(*spec) if renames else {}
        for f in files:
            if renames:
                adds, dels = stats[f.new_path]
                if adds is None:
                    self.assertTrue(f.binary, f.new_path)
                else:
                    self.assertFalse(f.binary, f.new_path)
                    self.assertEqual((f.additions, f.deletions), (adds, dels), f.new_path)

    def test_commit_diff_matches_git(self):
        # A rename with an edit.
        renamed = rev("feature")
        s, files, totals = self.diff(
            "CommitDiff",
            pb.CommitDiffRequest(repository=REPO, revision="feature", options=pb.DiffOptions(detect_renames=True)),
        )
        self.assertEqual((s.base_id, s.head_id), (rev("feature^"), renamed))
        self.check_files(files, "feature^", "feature")
        (f,) = [f for f in files if f.status == pb.FILE_STATUS_RENAMED]
        self.assertEqual((f.old_path, f.new_path), ("src/lib.rs", "src/core.rs"))
        # libgit2 scores similarity its own way (git says 64 here, libgit2 80); both call it a
        # rename at the 50% threshold.
        score = git("diff", "--name-status", "-M", "feature^", "feature").split()[0]
        self.assertGreaterEqual(int(score[1:]), 50)
        self.assertTrue(50 <= f.similarity < 100, f.similarity)
        self.assertEqual(totals.files, len(files))
        self.assertEqual(totals.additions, sum(f.additions for f in files))
        # Without rename detection: a delete and an add.
        _, files, _ = self.diff("CommitDiff", pb.CommitDiffRequest(repository=REPO, revision="feature"))
        self.check_files(files, "feature^", "feature", renames=False)
        # A binary file.
        binary = git("log", "--format=%H", "--grep=binary image", "main").split()[0]
        _, files, _ = self.diff("CommitDiff", pb.CommitDiffRequest(repository=REPO, revision=binary))
        self.check_files(files, binary + "^", binary)
        self.assertTrue(files[0].binary)
        self.assertEqual(files[0].new_mode, 0o100644)
        self.assertEqual(files[0].new_id, rev(binary + ":image.bin"))
        # The root commit: everything added, against the empty tree.
        root = rev("v0.1")
        s, files, _ = self.diff(
            "CommitDiff", pb.CommitDiffRequest(repository=REPO, revision="v0.1", options=pb.DiffOptions(include_patch=True))
        )
        self.assertEqual(s.base_id, "")
        self.assertEqual(
            sorted(f.new_path for f in files), sorted(git("ls-tree", "-r", "--name-only", root).split())
        )
        self.assertTrue(all(f.status == pb.FILE_STATUS_ADDED for f in files))
        # The merge commit, against its first parent.
        merge = rev("v2.0^{commit}")
        _, files, _ = self.diff(
            "CommitDiff", pb.CommitDiffRequest(repository=REPO, revision=merge, options=pb.DiffOptions(detect_renames=True))
        )
        self.check_files(files, merge + "^1", merge)
        # Against an explicit base.
        _, files, _ = self.diff(
            "CommitDiff",
            pb.CommitDiffRequest(repository=REPO, revision="main", base="v0.1", options=pb.DiffOptions(detect_renames=True)),
        )
        self.check_files(files, "v0.1", "main")

    def test_commit_diff_patches_and_limits(self):
        readme = git("log", "--format=%H", "--grep=README: world", "main").split()[0]
        _, files, _ = self.diff(
            "CommitDiff",
            pb.CommitDiffRequest(repository=REPO, revision=readme, options=pb.DiffOptions(include_patch=True)),
        )
        (f,) = files
        want = git("diff", readme + "^", readme, "--", "README.md")
        changed = lambda p: [l for l in p.splitlines() if l[:1] in "+-" and not l.startswith(("+++", "---"))]
        self.assertEqual(changed(f.patch.decode()), changed(want))
        self.assertEqual(changed(want), ["+world"])
        self.assertIn("@@ -1 +1,2 @@", f.patch.decode())
        self.assertFalse(f.patch_truncated)
        # Per-file cap.
        _, files, _ = self.diff(
            "CommitDiff",
            pb.CommitDiffRequest(repository=REPO, revision="v2.0", options=pb.DiffOptions(include_patch=True, max_patch_bytes=40)),
        )
        self.assertTrue(all(len(f.patch) <= 40 for f in files))
        self.assertTrue(any(f.patch_truncated for f in files))
        # Whole-call cap: later files come without patches.
        _, files, _ = self.diff(
            "CommitDiff",
            pb.CommitDiffRequest(
                repository=REPO, revision="main", base="v0.1", options=pb.DiffOptions(include_patch=True, max_total_patch_bytes=100)
            ),
        )
        self.assertLessEqual(sum(len(f.patch) for f in files), 100)
        self.assertTrue(files[-1].patch_truncated and not files[-1].patch)
        # File cap.
        _, files, totals = self.diff(
            "CommitDiff",
            pb.CommitDiffRequest(repository=REPO, revision="main", base="v0.1", options=pb.DiffOptions(max_files=2)),
        )
        self.assertEqual(len(files), 2)
        self.assertTrue(totals.files_truncated)
        self.assertGreater(totals.files, 2)

    def test_compare_refs_matches_git(self):
        s, files, totals = self.diff(
            "CompareRefs",
            pb.CompareRefsRequest(repository=REPO, base="merge-into", head="merge-from", max_commits=10),
        )
        self.assertEqual(s.merge_base_id, git("merge-base", "merge-into", "merge-from").strip())
        behind, ahead = git("rev-list", "--left-right", "--count", "merge-into...merge-from").split()
        self.assertEqual((s.ahead, s.behind), (int(ahead), int(behind)))
        self.assertEqual([c.id for c in s.commits], git("rev-list", "merge-from", "^merge-into").split())
        self.check_files(files, "merge-into...merge-from")
        self.assertEqual([f.new_path for f in files], ["docs/from.md"])
        # direct: base..head as two trees.
        _, files, _ = self.diff(
            "CompareRefs", pb.CompareRefsRequest(repository=REPO, base="merge-into", head="merge-from", direct=True)
        )
        self.check_files(files, "merge-into", "merge-from")
        # A longer range with renames and a binary file.
        s, files, _ = self.diff(
            "CompareRefs",
            pb.CompareRefsRequest(
                repository=REPO, base="v0.1", head="main", max_commits=1000, options=pb.DiffOptions(detect_renames=True)
            ),
        )
        self.assertEqual([c.id for c in s.commits], git("rev-list", "--date-order", "main", "^v0.1").split())
        self.check_files(files, "v0.1...main")
        self.assertCode(
            grpc.StatusCode.FAILED_PRECONDITION,
            self.diff,
            "CompareRefs",
            pb.CompareRefsRequest(repository=REPO, base="main", head="orphan"),
        )

    # ----------------------------------------------------------------------------------------
    # Trees and blobs

    def ls_tree(self, *args):
        rows = []
        for line in git("ls-tree", "-l", *args).splitlines():
            meta, path = line.split("\t", 1)
            mode, kind, oid, size = meta.split()
            rows.append((int(mode, 8), kind, oid, 0 if size == "-" else int(size), path))
        return rows

    def tree_rows(self, entries):
        kinds = {pb.OBJECT_KIND_BLOB: "blob", pb.OBJECT_KIND_TREE: "tree", pb.OBJECT_KIND_COMMIT: "commit"}
        return [(e.mode, kinds[e.kind], e.id, e.size, e.path) for e in entries]

    def tree_all(self, limit, **kw):
        got, token = [], ""
        while True:
            r = self.call("GetTree", pb.GetTreeRequest(repository=REPO, limit=limit, page_token=token, **kw))
            got.extend(r.entries)
            token = r.next_page_token
            if not token:
                return got

    def test_get_tree_matches_git(self):
        r = self.call("GetTree", pb.GetTreeRequest(repository=REPO, revision="main"))
        self.assertEqual(r.tree_id, rev("main^{tree}"))
        self.assertEqual(self.tree_rows(r.entries), self.ls_tree("main"))
        self.assertEqual(self.tree_rows(self.tree_all(5, revision="main", recursive=True)), self.ls_tree("-r", "-t", "main"))
        self.assertEqual(self.tree_rows(self.tree_all(1, revision="main", path="src")), self.ls_tree("main", "src/"))
        self.assertEqual(
            self.tree_rows(self.tree_all(2, revision="v1.0", path="/src/", recursive=True)),
            # git -t also shows the trees leading to the pathspec; the API lists what is inside.
            [row for row in self.ls_tree("-r", "-t", "v1.0", "src/") if row[4] != "src"],
        )
        self.assertEqual([e.name for e in self.tree_all(100, revision="main", path="docs")], ["guide.md"])
        self.assertCode(
            grpc.StatusCode.INVALID_ARGUMENT, self.call, "GetTree", pb.GetTreeRequest(repository=REPO, revision="main", path="README.md")
        )
        self.assertCode(
            grpc.StatusCode.NOT_FOUND, self.call, "GetTree", pb.GetTreeRequest(repository=REPO, revision="main", path="nope")
        )

    def blob(self, **kw):
        msgs = list(self.stub.GetBlob(pb.GetBlobRequest(repository=REPO, **kw), metadata=AUTH, timeout=60))
        self.assertTrue(msgs[0].id)
        self.assertTrue(all(not m.id for m in msgs[1:]))
        self.assertTrue(all(len(m.data) <= 64 * 1024 for m in msgs))
        return msgs[0], b"".join(m.data for m in msgs)

    def test_get_blob_small_and_packed(self):
        first, data = self.blob(revision="main", path="README.md")
        self.assertEqual(data, git_bytes("cat-file", "blob", "main:README.md"))
        self.assertEqual(first.id, rev("main:README.md"))
        self.assertEqual(first.size, len(data))
        # 3 MiB, packed: streamed through git cat-file, chunk by chunk.
        oid = rev("main:image.bin")
        self.assertEqual(git("cat-file", "-t", oid).strip(), "blob")
        self.assertFalse(os.path.exists(os.path.join(BARE, "objects", oid[:2], oid[2:])), "image.bin should be packed")
        first, data = self.blob(id=oid)
        self.assertEqual(data, git_bytes("cat-file", "blob", oid))
        self.assertEqual(first.size, len(data))
        self.assertGreater(len(data), 3 * MiB)
        _, head = self.blob(id=oid, limit=100000)
        self.assertEqual(head, data[:100000])
        # Errors.
        self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, self.blob, id=rev("main^{tree}"))
        self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, self.blob, revision="main", path="src")
        self.assertCode(grpc.StatusCode.NOT_FOUND, self.blob, revision="main", path="nope.txt")
        self.assertCode(grpc.StatusCode.NOT_FOUND, self.blob, id="0" * 40)
        self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, self.blob, id="xyz")

    def test_get_blob_big_streams_intact_with_flat_rss(self):
        oid = rev("big:big.bin")
        size = int(git("cat-file", "-s", oid))
        self.assertEqual(size, BIG_MB * MiB)
        loose = os.path.join(BARE, "objects", oid[:2], oid[2:])
        self.assertTrue(os.path.exists(loose), "the big blob should be a loose object")
        baseline = rss_kib()
        peak = [baseline]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_kib())
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        h = hashlib.sha1(b"blob %d\0" % size)
        received, messages = 0, 0
        try:
            for m in self.stub.GetBlob(
                pb.GetBlobRequest(repository=REPO, revision="big", path="big.bin"), metadata=AUTH, timeout=300
            ):
                if messages == 0:
                    self.assertEqual((m.id, m.size), (oid, size))
                h.update(m.data)
                received += len(m.data)
                messages += 1
        finally:
            stop.set()
            sampler.join()
        self.assertEqual(received, size)
        self.assertEqual(h.hexdigest(), oid, "content differs from the blob")
        growth_mib = (peak[0] - baseline) / 1024
        print("\n    GetBlob %d MiB in %d messages: server RSS %d KiB -> peak %d KiB (+%.1f MiB)"
              % (BIG_MB, messages, baseline, peak[0], growth_mib), file=sys.stderr)
        self.assertLess(growth_mib, 48, "server RSS grew with the blob")

    def test_slow_stream_does_not_stall_other_calls(self):
        # A client that reads a big blob slowly holds one worker and one stream; other calls,
        # on this connection and on others, keep being answered promptly.
        stream = self.stub.GetBlob(pb.GetBlobRequest(repository=REPO, revision="big", path="big.bin"), metadata=AUTH, timeout=60)
        next(stream)
        other = grpc.insecure_channel(ADDR)
        stub2 = pb_grpc.RepositoryServiceStub(other)
        try:
            for s in [self.stub, stub2]:
                for _ in range(20):
                    t = time.monotonic()
                    s.ListBranches(pb.ListBranchesRequest(repository=REPO), metadata=AUTH, timeout=5)
                    self.assertLess(time.monotonic() - t, 1.0)
        finally:
            stream.cancel()
            other.close()

    def test_short_deadline_is_deadline_exceeded(self):
        # A reader slower than its own deadline: the call ends with DEADLINE_EXCEEDED, whatever
        # the machine's speed.
        def slow_read():
            for i, _ in enumerate(
                self.stub.GetBlob(
                    pb.GetBlobRequest(repository=REPO, revision="big", path="big.bin"), metadata=AUTH, timeout=0.3
                )
            ):
                if i == 0:
                    time.sleep(0.5)

        self.assertCode(grpc.StatusCode.DEADLINE_EXCEEDED, slow_read)
        # The server is fine afterwards.
        self.call("ListBranches", pb.ListBranchesRequest(repository=REPO, limit=1))

    # ----------------------------------------------------------------------------------------
    # Merging

    def test_check_mergeability_matches_git(self):
        def check(target, source):
            return self.call("CheckMergeability", pb.CheckMergeabilityRequest(repository=REPO, target=target, source=source))

        r = check("conflict-a", "conflict-b")
        mt = subprocess.run(
            ["git", "--git-dir", BARE, "merge-tree", "--write-tree", "--name-only", "--no-messages", "conflict-a", "conflict-b"],
            capture_output=True, text=True,
        )
        self.assertEqual(mt.returncode, 1, mt.stderr)
        self.assertFalse(r.mergeable)
        self.assertEqual(list(r.conflicting_paths), sorted(set(l for l in mt.stdout.splitlines()[1:] if l)))
        self.assertEqual(list(r.conflicting_paths), ["README.md"])
        self.assertEqual(r.merge_base_id, git("merge-base", "conflict-a", "conflict-b").strip())
        behind, ahead = git("rev-list", "--left-right", "--count", "conflict-a...conflict-b").split()
        self.assertEqual((r.ahead, r.behind), (int(ahead), int(behind)))
        self.assertEqual((r.target_id, r.source_id), (rev("conflict-a"), rev("conflict-b")))

        r = check("merge-into", "merge-from")
        self.assertTrue(r.mergeable)
        self.assertFalse(r.fast_forward or r.up_to_date)
        self.assertEqual(list(r.conflicting_paths), [])
        self.assertEqual(
            subprocess.run(["git", "--git-dir", BARE, "merge-tree", "--write-tree", "merge-into", "merge-from"], capture_output=True).returncode,
            0,
        )
        r = check("ff-base", "ff-head")
        self.assertTrue(r.mergeable and r.fast_forward)
        self.assertEqual((r.ahead, r.behind), (1, 0))
        r = check("main", "v1.0")
        self.assertTrue(r.up_to_date and r.mergeable)
        r = check("main", "orphan")
        self.assertFalse(r.mergeable)
        self.assertEqual(r.merge_base_id, "")

    def branch_at(self, name, start):
        self.call("CreateBranch", pb.CreateBranchRequest(repository=REPO, name=name, start_point=start))
        return rev("refs/heads/" + name)

    def test_merge_conflict_is_refused_and_ref_unchanged(self):
        before = self.branch_at("tmp/conflict", "conflict-a")
        e = self.assertCode(
            grpc.StatusCode.FAILED_PRECONDITION,
            self.call,
            "Merge",
            pb.MergeRequest(
                repository=REPO, target="tmp/conflict", source="conflict-b", expected_target_id=before,
                author=pb.Signature(name="Merge Bot", email="bot@example.com"),
            ),
        )
        self.assertIn("README.md", e.details())
        self.assertEqual(rev("refs/heads/tmp/conflict"), before)

    def test_merge_with_stale_expected_value_is_refused(self):
        before = self.branch_at("tmp/stale", "merge-into")
        self.assertCode(
            grpc.StatusCode.ABORTED,
            self.call,
            "Merge",
            pb.MergeRequest(
                repository=REPO, target="tmp/stale", source="merge-from", expected_target_id=rev("main"),
                author=pb.Signature(name="Merge Bot", email="bot@example.com"),
            ),
        )
        self.assertEqual(rev("refs/heads/tmp/stale"), before)
        self.assertCode(
            grpc.StatusCode.INVALID_ARGUMENT,
            self.call,
            "Merge",
            pb.MergeRequest(repository=REPO, target="tmp/stale", source="merge-from"),
        )
        self.assertEqual(rev("refs/heads/tmp/stale"), before)

    def test_merge_commit_and_fast_forward(self):
        before = self.branch_at("tmp/merge", "merge-into")
        r = self.call(
            "Merge",
            pb.MergeRequest(
                repository=REPO, target="tmp/merge", source="merge-from", expected_target_id=before,
                mode=pb.MERGE_MODE_NO_FAST_FORWARD,
                author=pb.Signature(name="Merge Bot", email="bot@example.com", time=1767300000, offset_minutes=540),
                message="Merge pull request #1\n",
            ),
        )
        self.assertFalse(r.fast_forward)
        self.assertEqual(rev("refs/heads/tmp/merge"), r.commit_id)
        raw = git("cat-file", "commit", r.commit_id)
        self.assertEqual(git("rev-list", "--parents", "-n1", r.commit_id).split()[1:], [before, rev("merge-from")])
        self.assertIn("\nauthor Merge Bot <bot@example.com> 1767300000 +0900\n", raw)
        self.assertIn("\ncommitter Merge Bot <bot@example.com> 1767300000 +0900\n", raw)
        self.assertTrue(raw.endswith("\n\nMerge pull request #1\n"))
        # The same tree git's own merge makes.
        want_tree = git("merge-tree", "--write-tree", before, "merge-from").split()[0]
        self.assertEqual(rev(r.commit_id + "^{tree}"), want_tree)
        git("fsck", "--no-dangling")
        # Fast-forward.
        ff = self.branch_at("tmp/ff", "ff-base")
        r = self.call(
            "Merge",
            pb.MergeRequest(repository=REPO, target="tmp/ff", source="ff-head", expected_target_id=ff,
                            mode=pb.MERGE_MODE_FAST_FORWARD_ONLY),
        )
        self.assertTrue(r.fast_forward)
        self.assertEqual(rev("refs/heads/tmp/ff"), rev("ff-head"))
        # Now up to date.
        r = self.call(
            "Merge",
            pb.MergeRequest(repository=REPO, target="tmp/ff", source="ff-base", expected_target_id=rev("ff-head")),
        )
        self.assertTrue(r.up_to_date)
        self.assertEqual(rev("refs/heads/tmp/ff"), rev("ff-head"))
        # Fast-forward only, but diverged.
        div = self.branch_at("tmp/div", "merge-into")
        self.assertCode(
            grpc.StatusCode.FAILED_PRECONDITION,
            self.call,
            "Merge",
            pb.MergeRequest(repository=REPO, target="tmp/div", source="merge-from", expected_target_id=div,
                            mode=pb.MERGE_MODE_FAST_FORWARD_ONLY),
        )
        self.assertEqual(rev("refs/heads/tmp/div"), div)

    # ----------------------------------------------------------------------------------------
    # Repository

    def test_repository_info_matches_git(self):
        r = self.call("RepositoryInfo", pb.RepositoryInfoRequest(repository=REPO + ".git"))
        counts = dict(line.split(": ") for line in git("count-objects", "-v").splitlines())
        self.assertEqual(r.name, REPO)
        self.assertEqual(r.default_branch, git("symbolic-ref", "--short", "HEAD").strip())
        self.assertFalse(r.empty)
        self.assertEqual(r.branches, len(git("for-each-ref", "refs/heads/").splitlines()))
        self.assertEqual(r.tags, len(git("for-each-ref", "refs/tags/").splitlines()))
        self.assertEqual(r.loose_objects, int(counts["count"]))
        self.assertEqual(r.loose_size_bytes // 1024, int(counts["size"]))
        self.assertEqual(r.packed_objects, int(counts["in-pack"]))
        self.assertEqual(r.packs, int(counts["packs"]))
        self.assertEqual(r.pack_size_bytes // 1024, int(counts["size-pack"]))
        du = int(subprocess.run(["du", "-sb", BARE], capture_output=True, text=True).stdout.split()[0])
        # du -b also counts directory entries (4 KiB each here); files alone are a bit less.
        self.assertLessEqual(r.size_bytes, du)
        self.assertGreater(r.size_bytes, du - 1024 * 1024)
        self.assertGreater(r.size_bytes, BIG_MB * MiB)

    # ----------------------------------------------------------------------------------------
    # OptimizeRepository (named to run last: it repacks the shared fixture)

    def test_zz_optimize_repository(self):
        heads = git("for-each-ref", "--format=%(refname) %(objectname)")
        r = self.call("OptimizeRepository", pb.OptimizeRepositoryRequest(repository=REPO, full=True))
        self.assertIn("repack_full", r.tasks)
        self.assertIn("commit_graph", r.tasks)
        self.assertIn("full repack requested", r.reasons)
        packs = os.listdir(os.path.join(BARE, "objects", "pack"))
        self.assertTrue(any(f.endswith(".bitmap") for f in packs), packs)
        git("fsck", "--full", "--no-progress")
        self.assertEqual(git("for-each-ref", "--format=%(refname) %(objectname)"), heads)
        # A second pass finds nothing left to do but what the thresholds ask for.
        r = self.call("OptimizeRepository", pb.OptimizeRepositoryRequest(repository=REPO))
        self.assertNotIn("repack_full", r.tasks)
        self.assertCode(
            grpc.StatusCode.INVALID_ARGUMENT,
            self.call,
            "OptimizeRepository",
            pb.OptimizeRepositoryRequest(repository="../etc"),
        )


if __name__ == "__main__":
    unittest.main(verbosity=2)
