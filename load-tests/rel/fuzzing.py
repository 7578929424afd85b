"""Group 7 of `load-tests/reliability`: fuzzing (issue 11, item 7).

One row per fuzz target of `fuzz/run` (discovered at run time from fuzz/fuzz_targets/*.rs):
`fuzz/run --seconds 30 TARGET` (--quick and --ci: 5 s; --ci runs the first target only). The
figures come from libFuzzer's stats in fuzz/artifacts/TARGET.log: executions, coverage (cov:,
ft:), corpus; a non-zero exit of fuzz/run is a crash found (its input is in
fuzz/artifacts/TARGET/). Goal: 0 panics. The long run's figures are in fuzz/LONG-RUN.md.
"""

import glob
import os
import re
import subprocess
import time

from common import REPO, Row, guarded, log

GROUP = "fuzzing"
TITLE = "Fuzzing (libFuzzer on the stable toolchain)"
FUZZ = os.path.join(REPO, "fuzz")


def targets():
    return sorted(os.path.splitext(os.path.basename(p))[0]
                  for p in glob.glob(os.path.join(FUZZ, "fuzz_targets", "*.rs")))


def parse_log(text):
    """{execs, cov, ft, corp, new_units, rss_mb, panic} from a libFuzzer log."""
    out = {}
    m = re.search(r"^stat::number_of_executed_units:\s*(\d+)", text, re.M)
    if m:
        out["execs"] = int(m.group(1))
    m = re.search(r"^stat::new_units_added:\s*(\d+)", text, re.M)
    if m:
        out["new_units"] = int(m.group(1))
    m = re.search(r"^stat::peak_rss_mb:\s*(\d+)", text, re.M)
    if m:
        out["rss_mb"] = int(m.group(1))
    stats = re.findall(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)(?: corp: (\d+)/(\S+))?", text, re.M)
    if stats:
        last = stats[-1]
        out.setdefault("execs", int(last[0]))
        out["cov"], out["ft"] = int(last[1]), int(last[2])
        if last[3]:
            out["corp"] = f"{last[3]} inputs / {last[4]}"
    m = re.search(r"panicked at [^\n]*(?:\n[^\n]*)?", text)
    if m:
        out["panic"] = " ".join(m.group(0).split())[:300]
    elif "SUMMARY:" in text or "==ERROR" in text:
        m = re.search(r"(SUMMARY:[^\n]*|==\d+==ERROR:[^\n]*)", text)
        out["panic"] = m.group(0)[:300] if m else "libFuzzer error"
    return out


def one(ctx, target, secs):
    row = Row(GROUP, f"fuzz target {target}", f"libFuzzer, 1 process, -max_len=4096, {secs} s",
              f"{secs} s of generated inputs", goal="0 panics",
              reproduce=f"fuzz/run --seconds {secs} {target}")
    logf = os.path.join(FUZZ, "artifacts", f"{target}.log")
    t0 = time.monotonic()
    try:
        r = subprocess.run([os.path.join(FUZZ, "run"), "--seconds", str(secs), target], cwd=FUZZ,
                           capture_output=True, text=True, timeout=secs + 1200)
        rc, out = r.returncode, (r.stdout + r.stderr)
    except subprocess.TimeoutExpired as e:
        rc, out = -1, f"fuzz/run timed out after {e.timeout} s"
    dur = time.monotonic() - t0
    try:
        with open(logf, errors="replace") as f:
            text = f.read()
        fresh = os.path.getmtime(logf) >= time.time() - dur - 1
    except OSError:
        text, fresh = "", False
    st = parse_log(text) if fresh else {}
    row.requests = st.get("execs", 0)
    crashed = rc != 0 and fresh and ("panic" in st or "FOUND A FAILURE" in out)
    row.failed = 1 if crashed else 0
    row.ok = rc == 0 and fresh and row.requests > 0
    if crashed:
        row.lost = f"a crash: {st.get('panic', 'see the log')} (input in fuzz/artifacts/{target}/)"
    elif rc != 0:
        tail = " | ".join(ln for ln in out.strip().splitlines()[-3:])
        row.lost = f"fuzz/run failed before fuzzing (exit {rc}): {tail[:300]}"
    elif not fresh:
        row.lost = f"no fresh fuzz/artifacts/{target}.log"
    else:
        row.lost = "nothing"
    figs = [f"{row.requests} executions ({row.requests / secs:.0f}/s)"]
    for k, label in (("cov", "cov"), ("ft", "ft"), ("corp", "corpus"), ("new_units", "new units"),
                     ("rss_mb", "peak RSS MiB")):
        if k in st:
            figs.append(f"{label} {st[k]}")
    row.notes = (", ".join(figs) + f"; fuzz/run took {dur:.0f} s in all (replay of fuzz/regressions, build, "
                 f"{secs} s of fuzzing); the long run's figures: [fuzz/LONG-RUN.md](../fuzz/LONG-RUN.md)")
    row.duration_s = dur
    return row


def run(ctx):
    secs = ctx.secs(30, 5, ci=5)
    ts = targets()
    if not ts:
        return guarded(ctx, GROUP, "fuzz targets", lambda: (_ for _ in ()).throw(
            RuntimeError("no fuzz/fuzz_targets/*.rs")))
    if ctx.ci:
        ts = ts[:1]
    log(f"  fuzz targets: {', '.join(ts)} ({secs} s each)")
    rows = []
    for t in ts:
        rows += guarded(ctx, GROUP, f"fuzz target {t}", lambda t=t: one(ctx, t, secs))
    return rows
