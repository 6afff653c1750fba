"""The long-horizon study's plan (issue 17) without running it: `make -n smollm2` / `make -n gemma3` with PRUNECLI and
PYTHON set to `echo` print every step the study would run. The test reads that plan like a reviewer would: each chain
continues the previous N's delta with its own flags, restraints relative to kappa(W) read the measured file at recipe
time, every delta is inspected and evaluated on records 0..N-1 with one perplexity budget, SST-2 at the last N only,
no step touches the reserved records 5000-9999, and every report the Makefile writes is a row of the summary.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DATA = "/data"
CF = f"{DATA}/counterfact/counterfact-edit.json"
KAPPA = "$(awk '{ print %s * $1 }' %s/kappa-w.txt)"
ROME = "--method rome"
MULTIPLE = "--prune-every 10 --fn log --alpha 1.2"
SMOLLM2_NS = [10, 25, 50, 100, 200, 350, 500]
GEMMA3_NS = [10, 25, 50, 100, 200]


def _chains(work: str) -> dict[str, str]:
    """Chain folder -> its edit flags, exactly as the issue asks for them."""
    return {"rome": ROME, "rome-multiple": f"{ROME} {MULTIPLE}",
            "rome-adaptive": f"{ROME} --kappa-trigger {KAPPA % (1.25, work)} --target-kappa {KAPPA % (1.1, work)}",
            "rome-tkappa": f"{ROME} --prune-every 10 --target-kappa {KAPPA % (1.25, work)}",
            "rome-original": f"{ROME} --set rome_key=original",
            "rome-original-multiple": f"{ROME} --set rome_key=original {MULTIPLE}",
            "memit": "--method memit --batch-size 10", "alphaedit": "--method alphaedit --batch-size 10"}


def _once(work: str) -> dict[str, str]:
    """PRUNE-once kind -> its prune flags."""
    return {"pruned-log-1.2": "--fn log --alpha 1.2", "pruned-scale-free-0.5": "--fn scale-free --strength 0.5",
            "pruned-target-kappa-1.25": f"--target-kappa {KAPPA % (1.25, work)}"}


def _plan(target: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    return subprocess.run([shutil.which("make"), "-n", "-C", str(EXAMPLES), target, "PRUNECLI=echo", "PYTHON=echo",
                           f"DATA={DATA}", f"LONG_WORK={tmp_path / 'work'}", f"LONG_RESULTS={tmp_path / 'results'}",
                           *args], env=env, capture_output=True, text=True, timeout=60)


def _commands(target: str, tmp_path: Path) -> list[str]:
    """The planned commands, one per line (make's backslash continuations joined, whitespace runs collapsed)."""
    result = _plan(target, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [" ".join(line.split()) for line in result.stdout.replace("\\\n", " ").splitlines()]
    return [line for line in lines if not line.startswith("make")]  # not make's own lines (directories, sub-makes)


def _edits(commands: list[str], model: str, work: str) -> dict[tuple[str, int], dict[str, Any]]:
    """(chain, N) -> the edit step's start, count, flags and --delta. Each step writes EDITED.partial.safetensors
    (checkpoints, --resume after an interruption) and its next command renames it to the target, so make never sees
    an unfinished step as done."""
    w, cf = re.escape(work), re.escape(CF)
    pattern = re.compile(rf"echo edit {model} --requests {cf} --start (\d+) --limit \$\(\( (\d+) - (\d+) \)\) "
                         rf"--stats {w}/stats-(\w+)\.safetensors (.*?) ?(?:--delta (\S+) )?-o {w}/([\w-]+)/"
                         rf"edited-(\d+)\.partial\.safetensors --checkpoint-every 50 --resume --json > "
                         rf"{w}/([\w-]+)/edited-(\d+)\.json$")
    edits = {}
    for i, line in enumerate(commands):
        if " edit " in line:
            m = pattern.search(line)
            assert m, line
            start, n, prev, stats, flags, delta, chain, out_n, json_chain, json_n = m.groups()
            assert n == out_n == json_n and chain == json_chain and start == prev
            target = f"{work}/{chain}/edited-{n}"
            assert commands[i + 1] == f"mv {target}.partial.safetensors {target}.safetensors"
            edits[(chain, int(n))] = {"start": int(start), "count": int(n) - int(prev), "flags": flags,
                                      "delta": delta, "stats": stats}
    return edits


def _check_chains(edits: dict, chains: dict[str, str], ns: list[int], work: str) -> None:
    assert set(edits) == {(c, n) for c in chains for n in ns}
    for (chain, n), step in edits.items():
        prev = ns[ns.index(n) - 1] if n != ns[0] else 0
        assert step["flags"] == chains[chain], chain
        assert step["start"] == prev and step["count"] == n - prev
        assert step["start"] + step["count"] <= 5000  # records start .. start + count - 1 < 5000
        assert step["delta"] == (f"{work}/{chain}/edited-{prev}.safetensors" if prev else None)
        assert step["stats"] == {"memit": "memit", "alphaedit": "alphaedit"}.get(chain, "rome")


def _check_reports(commands: list[str], model: str, deltas: list[tuple[str, int]], ns: list[int], work: str) -> None:
    """Every delta (folder/kind, N): inspect, CounterFact + perplexity on N records, SST-2 at the last N only."""
    budget = "--max-tokens 4096 --window 512 --stride 448"
    w, cf = re.escape(work), re.escape(CF)
    # the N records of an evaluation: n = the delta's N, read off its file name when the step runs
    limits = {(m[1], int(m[2])) for line in commands
              if (m := re.search(rf"n=\$\(echo {w}/(\S+?)-(\d+) \| sed 's/\.\*-//'\);", line))}
    assert limits == set(deltas)
    evaluated = {}
    for line in commands:
        m = re.search(rf"echo evaluate {model} --delta {w}/(\S+)\.safetensors --requests {cf} --limit \$n "
                      rf"--tasks counterfact,perplexity {budget} ", line)
        if m:
            stem = m[1]
            n = int(stem.rsplit("-", 1)[1])
            assert n <= 5000
            evaluated[(stem.rsplit("-", 1)[0], n)] = line
    assert set(evaluated) == set(deltas)
    inspected = {m[1] for line in commands if (m := re.search(rf"echo inspect {model} --delta {w}/(\S+)\.safetensors "
                                                              rf"--json", line))}
    assert inspected == {f"{d}-{n}" for d, n in deltas}
    general = {m[1] for line in commands if (m := re.search(rf"echo evaluate {model} --delta {w}/(\S+)\.safetensors "
                                                            rf"--tasks glue:sst2 --limit 200 ", line))}
    assert general == {f"{d}-{n}" for d, n in deltas if n == ns[-1]}
    base = [line for line in commands if re.search(rf"echo evaluate {model} --(requests|tasks) ", line)]
    assert sorted(base) == sorted(
        [f"bash timed.sh {work}/base/base-{n}.eval.json.seconds echo evaluate {model} --requests {CF} --limit {n} "
         f"--tasks counterfact --batch-size 16 --data-dir {DATA} -o {work}/base/base-{n}.eval.json --force > /dev/null"
         for n in ns]
        + [f"bash timed.sh {work}/base/base.general.json.seconds echo evaluate {model} --tasks perplexity,glue:sst2 "
           f"--limit 200 {budget} --batch-size 16 --data-dir {DATA} -o {work}/base/base.general.json --force "
           f"> /dev/null"])


def test_smollm2_plan(tmp_path: Path) -> None:
    work = str(tmp_path / "work" / "smollm2")
    commands = _commands("smollm2", tmp_path)
    chains = _chains(work)
    edits = _edits(commands, "smollm2", work)
    _check_chains(edits, chains, SMOLLM2_NS, work)

    # kappa(W) is measured once, on the model (the first ROME step's inspect), before any step that reads it
    kappa = f"{work}/rome/edited-10.inspect.json > {work}/kappa-w.txt"
    measured = [i for i, line in enumerate(commands) if line.endswith(kappa)]
    assert len(measured) == 1 and commands[measured[0]].startswith("echo -c 'import json, sys;")
    first_reader = next(i for i, line in enumerate(commands) if f"{work}/kappa-w.txt)" in line)
    assert measured[0] < first_reader

    once = _once(work)
    prunes = {}
    for line in commands:
        m = re.search(rf"echo prune smollm2 {re.escape(work)}/([\w-]+)/edited-(\d+)\.safetensors (.*?) "
                      rf"-o {re.escape(work)}/([\w-]+)/([\w.-]+)-(\d+)\.safetensors --force --json", line)
        if m:
            assert m[1] == m[4] and m[2] == m[6]
            prunes[(m[1], m[5], int(m[2]))] = m[3]
    assert prunes == {(c, kind, n): flags for c in ("rome", "rome-original") for kind, flags in once.items()
                      for n in SMOLLM2_NS}

    deltas = [(f"{c}/edited", n) for c in chains for n in SMOLLM2_NS] + [(f"{c}/{k}", n) for c, k, n in prunes]
    _check_reports(commands, "smollm2", deltas, SMOLLM2_NS, work)
    assert commands[-1] == f"echo summarize.py {work} {tmp_path / 'results' / 'smollm2'} --model smollm2"
    assert not any(re.search(r"--(start|limit) (\d{5,}|[5-9]\d{3})\b", line) for line in commands)


def test_gemma3_plan(tmp_path: Path) -> None:
    work = str(tmp_path / "work" / "gemma3")
    commands = _commands("gemma3", tmp_path)
    chains = {c: f for c, f in _chains(work).items() if c in ("rome", "rome-adaptive", "memit", "alphaedit")}
    _check_chains(_edits(commands, "gemma3-270m", work), chains, GEMMA3_NS, work)
    written = (re.search(rf"-o {re.escape(work)}/(\S+)\.safetensors --force --json", line) for line in commands
               if " prune " in line)
    prunes = {m[1] for m in written if m}
    assert prunes == {f"rome/{kind}-{n}" for kind in _once(work) for n in GEMMA3_NS}
    deltas = [(f"{c}/edited", n) for c in chains for n in GEMMA3_NS] + [
        (f"rome/{kind}", n) for kind in _once(work) for n in GEMMA3_NS]
    _check_reports(commands, "gemma3-270m", deltas, GEMMA3_NS, work)
    assert commands[-1] == f"echo summarize.py {work} {tmp_path / 'results' / 'gemma3'} --model gemma3-270m"


@pytest.mark.parametrize("ns", ["10 5001", "10 25x"])
def test_plan_refuses_reserved_records(tmp_path: Path, ns: str) -> None:
    result = _plan("smollm2", tmp_path, f"SMOLLM2_NS={ns}")
    assert result.returncode != 0
    assert (f"N = {ns.split()[1]}: every N must be a count <= 5000 (records 5000-9999 of CounterFact are reserved)"
            in result.stdout + result.stderr)
    assert _plan("smollm2", tmp_path, "SMOLLM2_NS=10 5000").returncode == 0  # records 0..4999: allowed


def test_every_report_of_the_plan_is_a_summary_row(tmp_path: Path) -> None:
    """Write a minimal report at every path the plan writes; summarize must turn each into its row."""
    work = tmp_path / "work" / "smollm2"
    outputs = [m[1] for line in _commands("smollm2", tmp_path)
               if (m := re.search(r"(?:-o|>) (\S+\.(?:eval|general|inspect)\.json)", line))]
    tensor = {"name": "w", "kappa": 20.0, "sigma_max": 22.0, "sigma_min": 1.1,
              "edited": {"kappa": 25.0, "sigma_max": 30.0, "sigma_min": 1.2},
              "delta": {"sigma_max": 9.0, "n_above_sigma_max": 0}}
    for out in map(Path, outputs):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"tensors": [tensor]} if out.name.endswith(".inspect.json") else
                                  {"metrics": {"efficacy_score": 1.0}, "n_nonfinite": {}}))
    spec = importlib.util.spec_from_file_location("summarize", EXAMPLES / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    rows = summarize.collect(work, "smollm2")
    keys = {(r["method"], r["restraint"], r["param"], r["N"]) for r in rows}
    assert len(keys) == len(rows)  # one row per (method, restraint, N)
    restraints = {("rome", "none"), ("rome", "multiple"), ("rome", "adaptive"), ("rome", "tkappa"),
                  ("rome-original", "none"), ("rome-original", "multiple"), ("memit", "none"), ("alphaedit", "none"),
                  ("none", "none")}
    once = {(m, fn, p) for m in ("rome", "rome-original") for fn, p in (("log", 1.2), ("scale-free", 0.5),
                                                                       ("target-kappa", 1.25))}
    assert keys == {(m, r, None, n) for m, r in restraints for n in SMOLLM2_NS} | {
        (m, fn, p, n) for m, fn, p in once for n in SMOLLM2_NS}
