#!/usr/bin/env python3
"""Remove from a CUDA shared object's .nv_fatbin the device code that an sm_<SM> GPU can
never load, in place, so that the file compresses to much less.

A CUDA driver runs, for a device of compute capability 9.0, only
  * ELF (cubin/SASS) entries of arch 90 (SASS is compatible within a major version only
    upwards from the built minor: sm_90 cubins are the only ones for 9.0), and
  * PTX entries of arch <= 90, which it JIT-compiles.
Every other entry (sm_75/80/86/89 SASS, sm_100/120 SASS or PTX) is dead weight on an
H100/H200. Each fatbin container keeps its offset and length in the file; its kept entries
are moved to its front, its size field is lowered, and the freed bytes become zeros. Where a
container has sm_<SM> SASS the driver never looks at its PTX, so only the SASS is kept;
else only its newest PTX <= sm_<SM> (the one the driver would JIT). A
container with no loadable entry keeps its smallest entry (the original failure mode,
"no kernel image for the device", is unchanged). Nothing else in the ELF changes (section
table, symbols, relocations), so the result loads like the original.

    python3 fatbin_prune.py FILE.so [--sm 90] [--dry-run]
"""
from __future__ import annotations

import argparse
import struct
import sys

MAGIC = 0xBA55ED50


def find_section(buf: bytes | bytearray, name: str) -> tuple[int, int]:
    if buf[:4] != b"\x7fELF" or buf[4] != 2 or buf[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff = struct.unpack_from("<Q", buf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", buf, 0x3A)
    def sh(i):
        return struct.unpack_from("<IIQQQQIIQQ", buf, shoff + i * shentsize)
    stroff = sh(shstrndx)[4]
    for i in range(shnum):
        s = sh(i)
        end = buf.index(b"\0", stroff + s[0])
        if bytes(buf[stroff + s[0]:end]).decode() == name:
            return s[4], s[5]  # sh_offset, sh_size
    raise KeyError(name)


def entries(buf, off, end):
    e = off
    while e < end:
        kind, _, ehs, psz = struct.unpack_from("<HHIQ", buf, e)
        arch = struct.unpack_from("<I", buf, e + 28)[0]
        yield e, kind, arch, ehs + psz
        e += ehs + psz
    if e != end:
        raise ValueError(f"fatbin entry overruns its container at {e:#x}")


def prune(path: str, sm: int = 90, dry_run: bool = False) -> dict:
    with open(path, "rb") as f:
        buf = bytearray(f.read())
    sec_off, sec_size = find_section(buf, ".nv_fatbin")
    off, sec_end = sec_off, sec_off + sec_size
    st = dict(containers=0, kept=0, dropped=0, kept_bytes=0, dropped_bytes=0, empty=0)
    while off < sec_end:
        if struct.unpack_from("<I", buf, off)[0] != MAGIC:
            off += 8  # containers are 8-byte aligned; padding between them is skipped
            continue
        _, _, hsz, fsz = struct.unpack_from("<IHHQ", buf, off)
        body, end = off + hsz, off + hsz + fsz
        ents = list(entries(buf, body, end))
        keep = [x for x in ents if x[1] == 2 and x[2] == sm]
        if not keep:  # no SASS for this GPU: the driver JITs the newest PTX <= sm
            ptx = [x for x in ents if x[1] == 1 and x[2] <= sm]
            if ptx:
                best = max(x[2] for x in ptx)
                keep = [x for x in ptx if x[2] == best]
        if not keep:
            keep = [min(ents, key=lambda x: x[3])]
            st["empty"] += 1
        new = b"".join(bytes(buf[e:e + n]) for e, _, _, n in keep)
        st["containers"] += 1
        st["kept"] += len(keep)
        st["dropped"] += len(ents) - len(keep)
        st["kept_bytes"] += len(new)
        st["dropped_bytes"] += fsz - len(new)
        buf[body:body + len(new)] = new
        buf[body + len(new):end] = bytes(end - body - len(new))
        struct.pack_into("<Q", buf, off + 8, len(new))
        off = end
    if not dry_run:
        with open(path, "wb") as f:
            f.write(buf)
    return st


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--sm", type=int, default=90)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    for p in a.files:
        s = prune(p, a.sm, a.dry_run)
        print(f"{p}: {s['containers']} containers, kept {s['kept']} entries "
              f"({s['kept_bytes'] / 2**20:.1f} MiB), dropped {s['dropped']} "
              f"({s['dropped_bytes'] / 2**20:.1f} MiB), {s['empty']} with nothing for sm_{a.sm}")
    sys.exit(0)
