#!/usr/bin/env bash
# Set up (see setup.sh), then show the main job on the embedded default store:
# put a small dataset into a repository, commit, change it, commit again, compare,
# read the old version, roll back, and check the store. Everything lives in a
# temporary directory: your own store (~/.local/share/vfs) is never touched.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

export PATH=$PWD/.venv/bin:$PATH
demo=$(mktemp -d -t vfs-demo.XXXXXX)
export VFS_STORE=$demo/store VFS_CACHE=$demo/cache
data=$demo/data

step() { printf '\n==> %s\n' "$*"; }
# Show a command as one would type it (arguments with spaces quoted), then run it.
run() {
  local arg shown=()
  for arg in "$@"; do
    case $arg in *" "*) shown+=("\"$arg\"") ;; *) shown+=("$arg") ;; esac
  done
  printf '$ %s\n' "${shown[*]}"
  "$@"
}

step "The demo store is $VFS_STORE (cache: $VFS_CACHE); remove $demo when done"

step "Create the store and a repository"
run vfsctl init
run vfsctl repo create images --description "demo images"

step "Make a small dataset in $data: three text files and a 5 MiB random binary"
mkdir -p "$data/labels"
echo "a demo dataset for vfs" >"$data/README.txt"
printf 'cat\ndog\nbird\n' >"$data/labels/classes.txt"
printf 'image,label\nimg0.png,cat\nimg1.png,dog\n' >"$data/labels/train.csv"
head -c $((5 * 1024 * 1024)) /dev/urandom >"$data/blob.bin"
ls -lR "$data"

step "Stage the dataset under /raw and commit it"
run vfsctl put -r images@main:/raw "$data"
run vfsctl commit images@main -m "first"
run vfsctl ls -l -R images@main

step "Change a file, insert 4 KiB in the middle of the binary, put and commit again"
echo "fish" >>"$data/labels/classes.txt"
python - "$data/blob.bin" <<'PY'
import sys

path = sys.argv[1]
with open(path, "rb") as f:
    content = f.read()
middle = len(content) // 2
with open(path, "wb") as f:
    f.write(content[:middle] + b"inserted" * 512 + content[middle:])
PY
run vfsctl put -r images@main:/raw "$data"
run vfsctl commit images@main -m "more classes, a longer blob"

step "What the last commit changed, and the history (content-defined chunks: only the chunks around the insertion are new)"
run vfsctl diff images@main
run vfsctl log images@main

first=$(vfsctl log images@main --json | python -c '
import json, sys
document = json.load(sys.stdin)
commits = document["commits"] if isinstance(document, dict) else document
print(commits[-1]["id"])  # newest first: the last one is the first commit
')
first=${first:0:12}  # any unique prefix of a commit id will do

step "Read a file as it was in the first commit ($first)"
run vfsctl cat "images@$first:/raw/labels/classes.txt"

step "Roll main back to the first commit: a new commit, history is kept"
run vfsctl rollback images@main --to "$first" -m "back to the first version"
run vfsctl log images@main
run vfsctl cat images@main:/raw/labels/classes.txt

step "Every move of the branch"
run vfsctl reflog images@main

step "Mount the store: every branch and commit as plain files under $demo/pfs"
mnt=$demo/pfs
run vfsctl mount "$mnt"
trap 'vfsctl unmount "$mnt" >/dev/null 2>&1 || true' EXIT
run ls -l "$mnt"
run ls -l "$mnt/images@main/raw"
run cat "$mnt/images@$first/raw/labels/classes.txt"

step "Write to the branch with plain shell commands, then commit"
run mkdir -p "$mnt/images@main/raw/notes"
echo '$ echo "written through the mount" > .../raw/notes/hello.txt'
echo "written through the mount" >"$mnt/images@main/raw/notes/hello.txt"
run cp "$data/labels/train.csv" "$mnt/images@main/raw/labels/valid.csv"
run vfsctl status images@main
run vfsctl commit images@main -m "notes written through the mount"
run vfsctl status
latest=$(vfsctl log images@main -n 1 --json | python -c '
import json, sys
document = json.load(sys.stdin)
commits = document["commits"] if isinstance(document, dict) else document
print(commits[0]["id"][:12])
')
run ls -lR "$mnt/images@$latest/raw/notes"
echo "\$ touch $mnt/images@$latest/raw/x   # commits are read-only"
touch "$mnt/images@$latest/raw/x" || true

step "A pipeline: count the lines of every label file, in a bwrap sandbox, on every commit"
cat >"$demo/linecount.yaml" <<'SPEC'
pipeline: linecount
description: lines per label file
input: {repo: images, branch: main, glob: "/raw/labels/*"}
transform:
  cmd: ["sh", "-c", "for f in /pfs/images/raw/labels/*; do wc -l < \"$f\" > \"/pfs/out/$(basename \"$f\").lines\"; done"]
runtime: bwrap
parallelism: 2
SPEC
run cat "$demo/linecount.yaml"
run vfsctl pipeline create -f "$demo/linecount.yaml"
run vfsctl wait images@main --timeout 120
run ls -l "$mnt/linecount@main"
run cat "$mnt/linecount@main/classes.txt.lines"
run vfsctl provenance linecount@main

step "Commit one more label file: only that datum runs"
echo '$ printf "a\nb\nc\n" > .../raw/labels/extra.txt'
printf 'a\nb\nc\n' >"$mnt/images@main/raw/labels/extra.txt"
run vfsctl commit images@main -m "one more label file"
run vfsctl wait images@main --timeout 120
run vfsctl job list linecount
run cat "$mnt/linecount@main/extra.txt.lines"

run vfsctl unmount "$mnt"
trap - EXIT

step "Verify the store: reachability and every blob's hash"
run vfsctl fsck --deep

step "Space: the data as it is now, and the store holding both versions of it"
du -sh "$data" "$VFS_STORE"

step "Done. The demo store is in $demo: rm -rf $demo to remove it"
