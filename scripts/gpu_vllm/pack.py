#!/usr/bin/env python3
"""Build the offline vLLM 0.26.0 bundle for the GPU machine (run here, with network).

    python3 scripts/gpu_vllm/pack.py            # -> .gpu_vllm/part1/, .gpu_vllm/part2/

1. downloads vllm==0.26.0 (cp38-abi3 manylinux_2_28 wheel) and the pinned dependency wheels
   of requirements-gpu.txt (cp312 manylinux / pure-python, --no-deps) into .gpu_vllm/cache/;
2. unpacks them into .gpu_vllm/cache/stage/ (a site dir: what `pip install --target` makes),
   dropping from vllm what the plugin never loads (DROP below; README.md says why);
3. cuts the CUDA fatbins of vllm/_C_stable_libtorch.abi3.so and FlashAttention-3's .so to
   what an sm_90 GPU (H100/H200) can load (fatbin_prune.py: 53 -> 18 MiB xz), and strips
   their static symbol tables (debug names only; dynamic symbols untouched) when `strip`
   is on PATH;
4. writes the parts: one part if the whole bundle packs to <= 58 MiB (it does: ~40 MiB),
   else part1 = the CUDA objects + dependencies and part2 = vLLM's Python; each part is a
   folder .gpu_vllm/partN/ with one vllm026-partN.tar.xz and a .json manifest (sha256,
   file count, sizes). install.py unpacks them on the GPU machine.

Re-running reuses the cache (delete .gpu_vllm/cache to start over). Standard library only,
plus `python3 -m pip download` for step 1.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

from install import sha256  # this folder (the script's own sys.path entry)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VLLM_VERSION = "0.26.0"
VLLM_WHEEL = f"vllm-{VLLM_VERSION}-cp38-abi3-manylinux_2_28_x86_64.whl"
# The image is Ubuntu 24.04 (glibc 2.39): every manylinux_2_N up to 39 runs there.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + [
    "manylinux2014_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]
PART_LIMIT = 58 * 2**20  # bytes of .tar.xz per part (a device call carries 64 MiB in all)

# Paths inside the vllm wheel that are not unpacked (fnmatch on the archive path).
DROP = [
    # 291 MiB: FlashAttention 2, sm_80 SASS (useless on sm_90) + sm_80 PTX (62 MiB xz).
    # vllm.vllm_flash_attn imports if FA2 *or* FA3 loads; FA3 (sm_90 only, 7 MiB xz) is kept.
    "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",
    "vllm/_moe_C_stable_libtorch.abi3.so",  # 45 MiB: fused-MoE kernels, optional import
    "vllm/vllm-rs",  # 41 MiB: Rust frontend binary (VLLM_USE_RUST_FRONTEND=1 only)
    "vllm/_flashmla_C.abi3.so",  # MLA kernels (DeepSeek), import guarded
    "vllm/_flashmla_extension_C.abi3.so",
    "vllm/_qutlass_C.abi3.so",  # FP4 quant kernels, import guarded
    "vllm/_rust_tool_parser.abi3.so",  # Rust tool-call parser, only for that parser
    "vllm/third_party/deep_gemm/include/*",  # CUDA headers for DeepGEMM's JIT (FP8 GEMM)
    "vllm/third_party/deep_gemm/_C.cpython-31[0134]-*.so",  # other Pythons' builds
    "vllm/third_party/fmha_sm100/cutlass/*",  # CUTLASS headers (Blackwell FMHA JIT)
    "vllm/entrypoints/serve/instrumentator/static/*",  # swagger-ui for --enable-offline-docs
    "vllm/distributed/kv_transfer/disagg_prefill_workflow.jpg",
]
# Never carried: the image's own copies must be used (PYTHONPATH comes first on sys.path).
FORBIDDEN_TOP = {
    "torch", "triton", "numpy", "transformers", "tokenizers", "safetensors", "nvidia",
    "cuda", "huggingface_hub", "jinja2", "yaml", "anyio", "httpx", "httpcore", "h11",
    "click", "typing_extensions", "setuptools", "pkg_resources", "google", "aiohttp",
    "prometheus_client", "psutil", "regex", "requests", "numba", "llvmlite", "cv2",
    "torchvision", "torchaudio", "PIL", "tqdm", "filelock", "msgpack", "cloudpickle",
}
BIG_SO = "vllm/_C_stable_libtorch.abi3.so"
# CUDA objects whose fatbin is cut to what the target GPU (sm_90: H100/H200) can load.
PRUNE_SO = [BIG_SO, "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so"]


def log(*a):
    print("[pack]", *a, flush=True)


def read_requirements(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def wheel_name_matches(fname: str, req: str) -> bool:
    name, ver = req.split("==")
    norm = name.lower().replace("-", "_").replace(".", "_")
    parts = fname.split("-")
    return parts[0].lower().replace(".", "_") == norm and parts[1] == ver


def download(reqs: list[str], cache: Path, vllm_wheel: Path | None) -> list[Path]:
    cache.mkdir(parents=True, exist_ok=True)
    wheels = []
    target = cache / VLLM_WHEEL
    if not target.exists():
        if vllm_wheel and vllm_wheel.exists():
            shutil.copy(vllm_wheel, target)
        else:
            log("downloading", VLLM_WHEEL, "(290 MiB)")
            subprocess.check_call(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                 "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                 *sum((["--platform", p] for p in PLATFORMS), []),
                 "-d", str(cache), f"vllm=={VLLM_VERSION}"])
    wheels.append(target)
    have = [p.name for p in cache.glob("*.whl")]
    missing = [r for r in reqs if not any(wheel_name_matches(h, r) for h in have)]
    if missing:
        log("downloading", len(missing), "dependency wheels")
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
               "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
               "--abi", "cp312", "--abi", "abi3", "--abi", "none",
               *sum((["--platform", p] for p in PLATFORMS + ["any"]), []),
               "-d", str(cache), *missing]
        subprocess.check_call(cmd)
        have = [p.name for p in cache.glob("*.whl")]
    for r in reqs:
        m = [h for h in have if wheel_name_matches(h, r)]
        if len(m) != 1:
            sys.exit(f"[pack] expected one wheel for {r}, found {m}")
        wheels.append(cache / m[0])
    return wheels


def unpack_wheel(whl: Path, site: Path, drop: list[str]) -> tuple[int, int]:
    """Unpack like pip --target: <name>.data/{purelib,platlib}/ go to the root; scripts,
    headers and data are skipped (no console scripts: install.py writes bin/vllm)."""
    n = dropped = 0
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            name = info.filename
            if any(fnmatch.fnmatch(name, pat) for pat in drop):
                dropped += 1
                continue
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
                    name = "/".join(parts[2:])
                else:
                    continue
            dest = site / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(dest, mode | 0o644 if mode else 0o644)
            n += 1
    return n, dropped


def fix_records(site: Path) -> None:
    """Mark each dist-info as installed by this bundle; RECORD lists files we may have
    dropped, so it is rewritten to the files present (pip uninstall/list stay sane)."""
    for di in site.glob("*.dist-info"):
        (di / "INSTALLER").write_text("vllm-elastic-gpu-bundle\n")
        rec = di / "RECORD"
        if rec.exists():
            keep = []
            for line in rec.read_text().splitlines():
                path = line.split(",", 1)[0]
                if path and (site / path).exists():
                    keep.append(line)
            rec.write_text("\n".join(keep) + "\n")


def strip_so(path: Path) -> None:
    strip = shutil.which("strip")
    if not strip:
        log("no `strip` on PATH: keeping symbols of", path.name)
        return
    before = path.stat().st_size
    subprocess.check_call([strip, "--strip-unneeded", str(path)])
    log(f"stripped {path.name}: {before / 2**20:.1f} -> {path.stat().st_size / 2**20:.1f} MiB")


def tar_xz(files: list[Path], site: Path, out: Path, preset: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    filt = lzma.FORMAT_XZ
    with lzma.open(out, "wb", format=filt, preset=preset | lzma.PRESET_EXTREME,
                   check=lzma.CHECK_CRC64) as xz:
        with tarfile.open(fileobj=xz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for f in files:
                ti = tar.gettarinfo(str(f), arcname=str(f.relative_to(site)))
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = "root"
                ti.mtime = 0
                with open(f, "rb") as fh:
                    tar.addfile(ti, fh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requirements", default=str(HERE / "requirements-gpu.txt"))
    ap.add_argument("--cache", default=str(REPO / ".gpu_vllm" / "cache"))
    ap.add_argument("--out", default=str(REPO / ".gpu_vllm"))
    ap.add_argument("--vllm-wheel", default="/tmp/v26/" + VLLM_WHEEL,
                    help="use this already-downloaded vllm wheel if it exists")
    ap.add_argument("--no-strip", action="store_true")
    ap.add_argument("--sm", type=int, default=90, help="target compute capability x10")
    ap.add_argument("--preset", type=int, default=9)
    ap.add_argument("--stage-only", action="store_true", help="stop after unpacking")
    ap.add_argument("--two-parts", action="store_true",
                    help="always split (CUDA objects + deps | vLLM Python)")
    a = ap.parse_args()

    t0 = time.time()
    cache, out = Path(a.cache), Path(a.out)
    reqs = read_requirements(Path(a.requirements))
    wheels = download(reqs, cache, Path(a.vllm_wheel))

    site = cache / "stage" / "site"
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    for w in wheels:
        n, d = unpack_wheel(w, site, DROP if w.name == VLLM_WHEEL else [])
        log(f"{w.name}: {n} files" + (f", {d} dropped" if d else ""))
    fix_records(site)
    bad = sorted(p.name for p in site.iterdir() if p.name.split(".")[0] in FORBIDDEN_TOP)
    if bad:
        sys.exit(f"[pack] the bundle would shadow the image's packages: {bad}")
    sys.path.insert(0, str(HERE))
    from fatbin_prune import prune

    for so in PRUNE_SO:
        st = prune(str(site / so), sm=a.sm)
        log(f"pruned {so} to what sm_{a.sm} loads: kept {st['kept']} fatbin entries "
            f"({st['kept_bytes'] / 2**20:.1f} MiB), dropped {st['dropped']} "
            f"({st['dropped_bytes'] / 2**20:.1f} MiB)")
        if not a.no_strip:
            strip_so(site / so)
    (site / "vllm026-bundle.json").write_text(json.dumps(
        {"vllm": VLLM_VERSION, "requirements": reqs, "dropped": DROP}, indent=1) + "\n")
    if a.stage_only:
        log("staged at", site)
        return

    files = sorted(p for p in site.rglob("*") if p.is_file())
    for old in out.glob("part*"):
        if old.is_dir() and old.name[4:].isdigit():
            shutil.rmtree(old)
    tmp = cache / "try-one-part.tar.xz"
    if not a.two_parts:
        log(f"compressing {len(files)} files, "
            f"{sum(f.stat().st_size for f in files) / 2**20:.0f} MiB (xz -{a.preset}e, ~2 min)")
        tar_xz(files, site, tmp, a.preset)
    if not a.two_parts and tmp.stat().st_size <= PART_LIMIT:
        groups = {1: files}
        archives = {1: tmp}
    else:
        # Two parts: the CUDA objects and the dependencies first, vLLM's Python second.
        heavy = {site / so for so in PRUNE_SO}
        g1 = [f for f in files if f in heavy or not f.relative_to(site).parts[0].startswith("vllm")]
        g2 = [f for f in files if f not in set(g1)]
        groups = {1: g1, 2: g2}
        archives = {}
        for k, fs in groups.items():
            archives[k] = cache / f"try-part{k}.tar.xz"
            log(f"compressing part{k}: {len(fs)} files")
            tar_xz(fs, site, archives[k], a.preset)
    total = len(groups)
    for k, fs in groups.items():
        d = out / f"part{k}"
        d.mkdir(parents=True, exist_ok=True)
        arc = d / f"vllm026-part{k}.tar.xz"
        shutil.move(str(archives[k]), arc)
        size = arc.stat().st_size
        man = {
            "part": k, "parts": total, "vllm": VLLM_VERSION, "archive": arc.name,
            "sha256": sha256(arc), "bytes": size, "files": len(fs),
            "unpacked_bytes": sum(f.stat().st_size for f in fs),
            "requirements": reqs,
        }
        (d / f"vllm026-part{k}.json").write_text(json.dumps(man, indent=1) + "\n")
        log(f"part{k}: {len(fs)} files, {man['unpacked_bytes'] / 2**20:.1f} MiB -> "
            f"{size / 2**20:.2f} MiB xz  ({arc})")
        if size > PART_LIMIT:
            sys.exit(f"[pack] part{k} is over {PART_LIMIT / 2**20:.0f} MiB")
    log(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
