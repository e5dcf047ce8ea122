#!/usr/bin/env python3
"""Install the offline vLLM 0.26.0 bundle on the GPU machine (no network, no pip).

Run from the repo root, in every device call that carries a part:

    python3 scripts/gpu_vllm/install.py            # -> /opt/vllm026/site

Unpacks each .gpu_vllm/partN/vllm026-partN.tar.xz that is present and not yet installed
(its sha256 is recorded under <target>/.parts/), so calls 1..N each install what they
carry and a repeated call does nothing. Once every part of the bundle is in, it writes
<target>/../bin/vllm and a dist-info that registers this repo's vLLM plugin entry point
(from pyproject.toml), then checks in a subprocess that `import vllm` and its CUDA
extension load against the image's torch. Prints what it did; exits non-zero on failure
(bad checksum, failed check). Standard library only (tarfile + lzma).

Then:  source scripts/gpu_vllm/env.sh   (PYTHONPATH=/opt/vllm026/site:<repo>, PATH, offline)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
DEFAULT_TARGET = os.environ.get("VLLM026_SITE", "/opt/vllm026/site")


def say(*a):
    print("[install]", *a, flush=True)


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def plugin_dist_info(site: Path) -> str | None:
    """Write vllm_elastic-<ver>.dist-info with the [vllm.general_plugins] entry points of
    pyproject.toml, so vLLM finds the plugin with PYTHONPATH alone (the repo's
    git-ignored *.egg-info does not travel)."""
    pp = REPO / "pyproject.toml"
    if not pp.exists():
        return None
    text = pp.read_text()
    name = re.search(r'^name\s*=\s*"([^"]+)"', text, re.M)
    ver = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    name = (name.group(1) if name else "vllm-elastic").replace("-", "_")
    ver = ver.group(1) if ver else "0"
    groups: dict[str, list[str]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r'^\[project\.entry-points\."?([^"\]]+)"?\]\s*$', line)
        if m:
            cur = m.group(1)
            groups[cur] = []
            continue
        if line.startswith("["):
            cur = None
        elif cur and "=" in line and not line.strip().startswith("#"):
            k, v = line.split("=", 1)
            groups[cur].append(f"{k.strip()} = {v.strip().strip(chr(34))}")
    if not groups:
        return None
    for old in site.glob(f"{name}-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    di = site / f"{name}-{ver}.dist-info"
    di.mkdir()
    (di / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n")
    (di / "entry_points.txt").write_text(
        "".join(f"[{g}]\n" + "\n".join(eps) + "\n\n" for g, eps in groups.items()))
    (di / "INSTALLER").write_text("vllm-elastic-gpu-bundle\n")
    (di / "RECORD").write_text("")
    return f"{di.name} ({', '.join(groups)})"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default=DEFAULT_TARGET, help="site dir (default %(default)s)")
    ap.add_argument("--parts-dir", default=str(REPO / ".gpu_vllm"))
    ap.add_argument("--no-check", action="store_true", help="skip the import check")
    a = ap.parse_args()

    site = Path(a.target)
    marks = site / ".parts"
    marks.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    expected = None
    for man_path in sorted(Path(a.parts_dir).glob("part*/vllm026-part*.json")):
        man = json.loads(man_path.read_text())
        expected = man["parts"]
        arc = man_path.parent / man["archive"]
        mark = marks / f"part{man['part']}.sha256"
        if mark.exists() and mark.read_text().strip() == man["sha256"]:
            say(f"part{man['part']}: already installed")
            continue
        if not arc.exists():
            say(f"part{man['part']}: manifest without archive {arc}")
            return 2
        digest = sha256(arc)
        if digest != man["sha256"]:
            say(f"part{man['part']}: sha256 mismatch ({digest} != {man['sha256']})")
            return 2
        t = time.time()
        with tarfile.open(arc, "r:xz") as tar:
            try:
                tar.extractall(site, filter="data")
            except TypeError:  # Python without extraction filters
                tar.extractall(site)
        mark.write_text(man["sha256"] + "\n")
        say(f"part{man['part']}/{man['parts']}: {man['files']} files, "
            f"{man['unpacked_bytes'] / 2**20:.0f} MiB -> {site} in {time.time() - t:.1f} s")

    have = sorted(int(p.stem[4:].split(".")[0]) for p in marks.glob("part*.sha256"))
    if expected is None:
        totals = [json.loads(p.read_text()).get("parts") for p in site.glob("vllm026-bundle.json")]
        say(f"no part carried in {a.parts_dir}; installed so far: {have or 'none'}")
        return 0 if have else 1
    missing = [k for k in range(1, expected + 1) if k not in have]
    if missing:
        say(f"installed parts {have}; still missing {missing}: carry them in the next call "
            f"(within 30 s) and run this again")
        return 0

    bindir = site.parent / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / "vllm"
    # Like pip's console script: the __main__ guard matters, vLLM spawns its engine core
    # with multiprocessing "spawn", which re-imports this file in the child.
    exe.write_text(f"#!{sys.executable}\nimport sys\nfrom vllm.entrypoints.cli.main import main\n"
                   "if __name__ == '__main__':\n    sys.exit(main())\n")
    exe.chmod(0o755)
    ep = plugin_dist_info(site)
    say(f"all {expected} part(s) in {site}; wrote {exe}" + (f"; plugin entry point {ep}" if ep else ""))

    if not a.no_check:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]),
                   VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
        code = ("import torch, vllm, vllm._C_stable_libtorch, vllm.vllm_flash_attn, "
                "vllm.platforms as P; import importlib.metadata as m; "
                "print('vllm', vllm.__version__, 'torch', torch.__version__, "
                "'from', vllm.__file__.rsplit('/', 2)[0], '| platform', "
                "type(P.current_platform).__name__, '| torch from', torch.__file__)")
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        out = (r.stdout + r.stderr).strip().splitlines()
        say("check:", out[-1] if out else "(no output)")
        if r.returncode != 0:
            print("\n".join(out[-30:]))
            return 1
    say(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
