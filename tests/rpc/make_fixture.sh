#!/usr/bin/env bash
# Builds the gRPC test fixture: a history with branches, tags (annotated and lightweight), a
# --no-ff merge, a rename, a binary file, conflicting branches, many branches and commits for
# paging, and (optionally) a commit holding a large random blob. Pushes it all into an existing
# bare repository. Anyone can rerun it:
#
#   tests/rpc/make_fixture.sh BARE_REPO WORK_DIR [BIG_MB]
#
# Every commit gets its own timestamp (one minute apart), so `git log --date-order` has a single
# right answer. Most objects end up packed (the history is pushed, then repacked); the big blob
# is pushed on its own afterwards and stays a loose object (fewer than receive.unpackLimit
# objects), so both of the server's blob paths are exercised.
set -euo pipefail
bare=$(realpath "$1")
work=$2
big_mb=${3:-0}

export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null
export GIT_AUTHOR_NAME="Fixture Author" GIT_AUTHOR_EMAIL="author@example.com"
export GIT_COMMITTER_NAME="Fixture Committer" GIT_COMMITTER_EMAIL="committer@example.com"
t=1767225600 # 2026-01-01T00:00:00Z
tick() {
    t=$((t + 60))
    export GIT_AUTHOR_DATE="@$t +0900" GIT_COMMITTER_DATE="@$t +0000"
}
commit() { tick; git commit -q -m "$1"; }

rm -rf "$work"
mkdir -p "$work"
cd "$work"
git init -q -b main
mkdir -p src docs notes
printf 'hello\n' >README.md
printf 'pub fn one() -> u32 {\n    1\n}\n' >src/lib.rs
printf '# Guide\n\nStep one.\n' >docs/guide.md
git add . && commit "Initial commit"
git tag v0.1
printf 'pub fn one() -> u32 {\n    1\n}\n\npub fn two() -> u32 {\n    2\n}\n' >src/lib.rs
git add . && commit "Add two()"
tick && git tag -a v1.0 -m "Release 1.0"
# A binary file (NUL bytes) larger than the server's in-memory blob limit (1 MiB).
python3 -c 'import random,sys; r=random.Random(7); sys.stdout.buffer.write(bytes([0,1,2,255])+bytes(r.getrandbits(8) for _ in range(3*1024*1024)))' >image.bin
git add . && commit "Add a binary image"

git checkout -q -b feature
printf '# Guide\n\nStep one.\nStep two.\n' >docs/guide.md
git add . && commit "Guide: step two"
git mv src/lib.rs src/core.rs
printf 'pub fn one() -> u32 {\n    1\n}\n\npub fn two() -> u32 {\n    2\n}\n\npub fn three() -> u32 {\n    3\n}\n' >src/core.rs
git add . && commit "Rename lib.rs to core.rs, add three()"

git checkout -q main
printf 'hello\nworld\n' >README.md
git add . && commit "README: world"
tick && git merge -q --no-ff -m "Merge branch 'feature'" feature
tick && git tag -a v2.0 -m "Release 2.0

With the feature merged."

# History for paging and path filters: 30 commits, every third one touching src/.
for i in $(seq 1 30); do
    printf 'entry %d\n' "$i" >>notes/log.txt
    if [ $((i % 3)) -eq 0 ]; then printf '// %d\n' "$i" >>src/core.rs; fi
    git add . && commit "Log entry $i"
done

# Conflicting branches: both change README's first line.
git checkout -q -b conflict-a main
printf 'hello from a\nworld\n' >README.md
git add . && commit "conflict-a: README"
git checkout -q -b conflict-b main
printf 'hello from b\nworld\n' >README.md
git add . && commit "conflict-b: README"
# A clean merge: merge-into and merge-from change different files.
git checkout -q -b merge-into main
printf 'into\n' >docs/into.md
git add . && commit "merge-into: docs"
git checkout -q -b merge-from main
printf 'from\n' >docs/from.md
git add . && commit "merge-from: docs"
# A fast-forward: ff-head is ff-base plus one commit.
git branch ff-base main
git checkout -q -b ff-head main
printf 'ff\n' >docs/ff.md
git add . && commit "ff-head: docs"
# An unrelated history.
git checkout -q --orphan orphan
git rm -rq --cached .
git clean -fdq
printf 'alone\n' >alone.txt
git add . && commit "Unrelated root"
# Branches for paging.
git checkout -q main
for i in $(seq -w 1 25); do git branch "many/b$i" v0.1; done

git push -q "$bare" 'refs/heads/*:refs/heads/*' 'refs/tags/*:refs/tags/*'
git -C "$bare" repack -adq

if [ "$big_mb" -gt 0 ]; then
    git checkout -q -b big main
    head -c "$((big_mb * 1024 * 1024))" /dev/urandom >big.bin
    git add big.bin && commit "Add a big blob"
    git push -q "$bare" big
fi
