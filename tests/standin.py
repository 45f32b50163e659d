"""A stand-in agent CLI for the runner's tests: a small real program (run by this test's
Python), never a mock inside the runner. Installed on PATH under any name (`standin`, or
`claude` and `codex` for the presets), it records what a run gave it and does what its
plan says for that run.

The plan ($STANDIN_PLAN) is a JSON list with one entry per run, in the order the runs
start, the last repeated (or an object: a context_id's own such list, "*" for the others);
an entry is a list of steps, done in order:
  ["reply"]            ai-agent-proxy reply $AIAP_NEWEST_REQUEST_ID (to the newest it
                       prints when newer messages wait: as an agent that reads them would)
  ["reply-anyway"]     the same with --anyway: only the messages it was given
  ["done"]             ai-agent-proxy done $AIAP_NEWEST_REQUEST_ID
  ["print", TEXT]      TEXT on stdout (its answer, for --send-output)
  ["stderr", TEXT]     TEXT on stderr
  ["sleep", S]         sleep S seconds
  ["wait-file", PATH]  wait until PATH exists (the test lets it go on), at most 30 s
  ["ignore-term"]      ignore SIGTERM from now on (as gemini's top process does)
  ["grandchild", S]    start `sleep S` in the run's process group (left running);
                       ["grandchild", S, "own-group"]: in a session and group of its own
  ["capture", CLI/NAME]  print that real CLI's captured stdout and stderr, exit with its code
  ["half"]             half a JSON line on stdout, then sleep (as a CLI killed mid-line)
  ["exit", N]          exit with N
Each run appends one JSON line to $STANDIN_LOG: its argv, the prompt's length, the
AIAP_* and AI_AGENT_PROXY_* environment, its pid and cwd, when it started and ended (the
prompt itself goes to $STANDIN_LOG.<n>.prompt).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

SOURCE = r"""
import json, os, re, subprocess, sys, time
from pathlib import Path

log = Path(os.environ["STANDIN_LOG"])
plan = json.loads(Path(os.environ["STANDIN_PLAN"]).read_text())
captures = Path(os.environ["STANDIN_CAPTURES"])
n = 0  # this run's number: the first free marker file (runs may start at once)
while True:
    try:
        os.close(os.open(f"{log}.{n}.started", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        break
    except FileExistsError:
        n += 1
context = os.environ.get("AIAP_CONTEXT_ID", "")
if isinstance(plan, dict):
    plan = plan.get(context, plan.get("*"))
    def context_of(marker):
        try:
            return json.loads(marker.read_text()).get("context")
        except ValueError:  # empty, or being written: another run's
            return None
    n_here = sum(context_of(m) == context for m in log.parent.glob(log.name + ".*.started"))
    steps = plan[min(n_here, len(plan) - 1)]
else:
    steps = plan[min(n, len(plan) - 1)]
prompt = sys.stdin.read() if not sys.stdin.isatty() else ""
Path(f"{log}.{n}.prompt").write_text(prompt)
entry = {
    "n": n, "context": context, "argv": sys.argv, "prompt_len": len(prompt), "pid": os.getpid(),
    "pgid": os.getpgid(0), "cwd": os.getcwd(), "start": time.time(),
    "env": {k: v for k, v in os.environ.items() if k.startswith(("AIAP_", "AI_AGENT_PROXY_"))},
}
code = 0
started = Path(f"{log}.{n}.started")
started.write_text(json.dumps(entry))  # a started run is visible at once (its pid, pgid)


def reply(*extra):
    newest = os.environ["AIAP_NEWEST_REQUEST_ID"]
    text = f"answered by run {n}"
    r = subprocess.run(["ai-agent-proxy", "reply", newest, "--message", text, *extra],
                       capture_output=True, text=True)
    if r.returncode == 4:  # newer messages: read them, answer the newest
        entry.setdefault("replies", []).append([r.returncode, r.stderr.strip()])
        newest = re.search(r"reply to the newest \(([0-9a-f]{32})\)", r.stdout).group(1)
        r = subprocess.run(["ai-agent-proxy", "reply", newest, "--message", text],
                           capture_output=True, text=True)
    entry.setdefault("replies", []).append([r.returncode, r.stderr.strip()])


for step in steps:
    kind = step[0]
    if kind == "reply":
        reply()
    elif kind == "reply-anyway":
        reply("--anyway")
    elif kind == "done":
        r = subprocess.run(["ai-agent-proxy", "done", os.environ["AIAP_NEWEST_REQUEST_ID"]],
                           capture_output=True, text=True)
        entry.setdefault("replies", []).append([r.returncode, r.stderr.strip()])
    elif kind == "print":
        print(step[1], flush=True)
    elif kind == "stderr":
        print(step[1], file=sys.stderr, flush=True)
    elif kind == "sleep":
        time.sleep(step[1])
    elif kind == "wait-file":
        deadline = time.time() + 30
        while not os.path.exists(step[1]) and time.time() < deadline:
            time.sleep(0.01)
    elif kind == "ignore-term":
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif kind == "grandchild":
        own = step[2:] == ["own-group"]  # (else in the run's group, as most tools start one)
        child = subprocess.Popen(["sleep", str(step[1])], start_new_session=own)
        entry["grandchild"] = child.pid
        started.write_text(json.dumps(entry))
    elif kind == "capture":
        base = captures / step[1]
        sys.stdout.write(base.with_suffix(".stdout").read_text())
        sys.stderr.write(base.with_suffix(".stderr").read_text())
        code = json.loads(base.with_suffix(".meta.json").read_text())["exit_code"]
        code = code if code >= 0 else 128 - code
    elif kind == "half":
        sys.stdout.write('{"type":"item.completed","item":{"type":"agent_mess')
        sys.stdout.flush()
        time.sleep(60)
    elif kind == "exit":
        code = step[1]
entry["end"] = time.time()
with log.open("a") as out:
    out.write(json.dumps(entry) + "\n")
sys.exit(code)
"""


def install(bin_dir: Path, *names: str) -> None:
    """The stand-in as executables `names` in `bin_dir` (run by this interpreter)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n" + SOURCE)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def environment(bin_dir: Path, log: Path, plan: list[list[list[object]]]) -> dict[str, str]:
    """What a runner's environment needs for the stand-in (and `ai-agent-proxy` and the
    fake `openclaw` it runs) to be found and to know its plan."""
    plan_file = log.with_suffix(".plan.json")
    plan_file.write_text(json.dumps(plan))
    return {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "STANDIN_LOG": str(log),
        "STANDIN_PLAN": str(plan_file),
        "STANDIN_CAPTURES": str(Path(__file__).parent / "fixtures" / "agents"),
    }


def runs(log: Path) -> list[dict[str, object]]:
    """What each finished run of the stand-in recorded, in order."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def started(log: Path, n: int) -> dict[str, object] | None:
    """What run `n` recorded when it started (its pid and group; its grandchild's pid once
    it has one), or None before."""
    try:
        return json.loads(Path(f"{log}.{n}.started").read_text())
    except (OSError, ValueError):  # not there, or still being written
        return None
