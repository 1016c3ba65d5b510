#!/usr/bin/env python3
"""Every PUNCH_* variable and every --flag named in deploy/ must exist.

Usage: check_names.py BIN_DIR FILE...

The truth is the binaries' own help: `punch-server --help`,
`punch-agent --help` and `--help` of every subcommand of each (clap lists
flags and their `[env: PUNCH_...]` twins there).

A flag belongs to the command whose words it follows (backslash
continuations joined; a command starts a line, a comment, or follows
| ; && || ( ) or a backtick, and a '...' string holds a command of its own):
  - punch-server / punch-agent, also as a path, an ExecStart= value, or
    run through sudo, env, exec, timeout, `docker run|exec`, `kubectl exec`:
    the flag must be that binary's;
  - another tool (gcloud, kubectl, docker, cargo, ...): not ours, skipped;
  - anything else (YAML args, Markdown prose and code spans): the flag must
    be one of either binary, except in shell scripts, whose own helper
    functions (g, have, ...) take gcloud's flags.
So a foreign tool's flag named in prose must follow its tool in the same
code span (`gcloud ... --flag`), or it is reported.
"""

import re
import subprocess
import sys
from pathlib import Path

BINARIES = ("punch-server", "punch-agent")
# Tools whose flags are theirs, not punch's.
FOREIGN = {
    "gcloud", "kubectl", "docker", "cargo", "systemctl", "systemd-analyze",
    "journalctl", "openssl", "curl", "wget", "busybox", "useradd", "groupadd",
    "install", "shellcheck", "python3", "git", "ssh", "scp", "sed", "grep",
    "apt-get", "kustomize", "rustc", "HEALTHCHECK", "RUN", "COPY",
    "podman", "podman-compose", "hadolint", "kubernetes-validate",
    "deploy/check.sh", "check.sh", "debootstrap",
}
# Commands that run another command: the first punch binary after them owns
# the flags that follow it (docker and kubectl only with run/exec).
LAUNCHERS = {"sudo", "env", "exec", "timeout", "nohup", "docker", "kubectl"}
# Read by the binaries outside clap, so absent from --help: accepted only
# while the source still reads them (none now: PUNCH_LOG is --log's).
OUTSIDE_HELP = {}

FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
ENV = re.compile(r"(?<![A-Za-z0-9_])PUNCH_[A-Z0-9_]*[A-Z0-9]")
# Separators, an opening quote (after space or =), a closing quote, words.
TOKEN = re.compile(r"(?P<sep>\|\||&&|[|;()`])|(?P<open>(?<=[\s=])')|(?P<close>')|(?P<word>[^\s|;()`']+)")
ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=(.*)$")


def name_of(word):
    """The command a word names: its basename without quotes and brackets."""
    return word.strip("\"[],:").rstrip("/").rsplit("/", 1)[-1]


def flags_by_owner(line):
    """(owner, flag) for each flag on a logical line; owner is a binary,
    "foreign", or None (no known command)."""
    out = []
    stack = []  # owners of the commands a '...' string interrupted
    owner, first, launcher_armed = None, True, False
    for m in TOKEN.finditer(line):
        kind = m.lastgroup
        if kind == "sep":
            owner, first = None, True
            continue
        if kind == "open" or (kind == "close" and not stack):
            stack.append(owner)
            owner, first = None, True
            continue
        if kind == "close":
            owner, first = stack.pop(), False
            continue
        word = m.group("word")
        flag = FLAG.match(word.lstrip("\"["))
        if first:
            if word.strip("#$-[") == "":
                continue  # comment mark, prompt, list marker
            assign = ASSIGN.match(word)
            if assign and not flag:
                if name_of(assign.group(1)) in BINARIES:
                    owner, first = name_of(assign.group(1)), False
                continue  # VAR=value before a command
            first = False
            name = name_of(word)
            if name in BINARIES:
                owner = name
                continue
            if name in LAUNCHERS:
                owner, launcher_armed = ("launcher", name), name not in ("docker", "kubectl")
                continue
            owner = "foreign" if name in FOREIGN else None
        if flag:
            out.append(("foreign" if isinstance(owner, tuple) else owner, flag.group(1)))
        elif isinstance(owner, tuple):
            if word in ("run", "exec"):
                launcher_armed = True
            elif launcher_armed and name_of(word) in BINARIES:
                owner = name_of(word)
    return out


def help_of(binary):
    """Flags and PUNCH_* names in the help of `binary` and its subcommands."""

    def run(*args):
        out = subprocess.run([str(binary), *args, "--help"], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"check_names: {binary} {' '.join(args)} --help failed:\n{out.stderr}")
        return out.stdout

    text = run()
    subs = []
    in_commands = False
    for line in text.splitlines():
        if line.startswith("Commands:"):
            in_commands = True
        elif in_commands and not line.strip():
            break
        elif in_commands:
            m = re.match(r"  ([a-z][a-z0-9-]*)(\s|$)", line)
            if m and m.group(1) != "help":
                subs.append(m.group(1))
    for sub in subs:
        text += run(sub)
    return set(FLAG.findall(text)), set(ENV.findall(text))


def logical_lines(text):
    """(first line number, text) with backslash continuations joined."""
    buf, start = "", None
    for n, line in enumerate(text.splitlines(), 1):
        if start is None:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        yield start, buf + line
        buf, start = "", None
    if start is not None:
        yield start, buf


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    bin_dir = Path(sys.argv[1])
    root = Path(__file__).resolve().parent.parent
    flags, envs = {}, set()
    for b in BINARIES:
        flags[b], e = help_of(bin_dir / b)
        envs |= e
    for name, needle in OUTSIDE_HELP.items():
        if any(needle in (root / p).read_text() for p in ("server/src/main.rs", "cli/src/main.rs")):
            envs.add(name)
    either = flags["punch-server"] | flags["punch-agent"]

    bad, n_flags, n_envs = [], 0, 0
    for path in sys.argv[2:]:
        shell = path.endswith(".sh")
        for n, line in logical_lines(Path(path).read_text()):
            for name in ENV.findall(line):
                n_envs += 1
                if name not in envs:
                    bad.append(f"{path}:{n}: unknown variable {name} (in no --help of {', '.join(BINARIES)})")
            for owner, flag in flags_by_owner(line):
                if owner == "foreign" or (owner is None and shell):
                    continue
                n_flags += 1
                if flag not in (flags[owner] if owner else either):
                    who = owner or " or ".join(BINARIES)
                    bad.append(f"{path}:{n}: unknown flag --{flag} for {who} (not in its --help)")
    for b in bad:
        print(b, file=sys.stderr)
    print(f"names: {len(sys.argv) - 2} files, {n_flags} flags and {n_envs} PUNCH_* names checked, {len(bad)} unknown")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
