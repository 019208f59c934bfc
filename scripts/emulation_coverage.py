"""Which test file reaches which CUDA kernel, on the emulated backend.

    NYSTROM_LIBRARY=build/libnystrom_emulated.so python scripts/emulation_coverage.py [test files ...]

Runs each Python test file (default: every tests/python/test_*.py) in its own pytest process on the device
"emu" (schedule inorder) with its own kernel log (NYSTROM_EMU_KERNEL_LOG, written by the emulator: one
"kernel<instantiation>=launches" line per launched instantiation), then prints, per kernel template of
cuda/, the files that launched it and how many of its instantiations each reached. scripts/test_emulated.sh
checks that every template is reached by the whole suite; this says by what, for a reader who changes a
kernel and wants the tests that exercise it. Exits non-zero if a template is reached by no file.
"""
import glob
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = re.compile(r"nystrom::cuda::kern::(\w+_kernel)<")


def template(name):
    m = TEMPLATE.search(name)
    return m.group(1) if m else None


def built_templates(lib):
    out = subprocess.run(["nm", "-DC", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    return sorted({t for t in map(template, out.splitlines()) if t})


def reached_by(path, lib):
    fd, log = tempfile.mkstemp(suffix=".log")
    os.close(fd)
    env = dict(os.environ, NYSTROM_LIBRARY=lib, NYSTROM_TEST_DEVICE="emu", NYSTROM_EMU_KERNEL_LOG=log,
               NYSTROM_EMU_SCHEDULE="inorder")
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", path, "-q", "-m", "not slow", "-p", "no:cacheprovider"],
                             cwd=os.path.join(ROOT, "tests"), env=env, capture_output=True, text=True)
        reached = {}
        with open(log) as f:
            for line in f:
                name, _, count = line.strip().rpartition("=")
                t = template(name)
                if t and count.isdigit() and int(count) > 0:
                    reached.setdefault(t, set()).add(name)
        summary = (res.stdout.strip().splitlines() or ["(no output)"])[-1]
        return reached, summary
    finally:
        os.unlink(log)


def main():
    lib = os.environ.get("NYSTROM_LIBRARY")
    if not lib or not os.path.isfile(lib):
        sys.exit("emulation_coverage.py: set NYSTROM_LIBRARY to the emulated library (libnystrom_emulated.so)")
    files = sys.argv[1:] or sorted(glob.glob(os.path.join(ROOT, "tests", "python", "test_*.py")))
    templates = built_templates(lib)
    by_template = {t: [] for t in templates}
    for path in files:
        reached, summary = reached_by(os.path.abspath(path), lib)
        name = os.path.basename(path)
        print(f"{name:32s} {summary}", flush=True)
        for t, names in reached.items():
            by_template.setdefault(t, []).append((name, len(names)))
    print("\nkernel template              files that launch it (instantiations reached)")
    missing = []
    for t in sorted(by_template):
        rows = by_template[t]
        print(f"  {t:26s} " + (", ".join(f"{f} ({n})" for f, n in rows) if rows else "NONE"))
        if not rows:
            missing.append(t)
    if missing:
        sys.exit("emulation_coverage.py: reached by no test file: " + ", ".join(missing))


if __name__ == "__main__":
    main()
