#!/usr/bin/env python3
"""Helpers for build-kit.sh that are awkward in shell.

  kit_tools.py extract-vmlinux BZIMAGE OUT
      Unpacks the LZ4 payload of a bzImage into an ELF vmlinux and checks that
      it carries the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY). Prints the
      32-bit PVH entry address.
  kit_tools.py module-order MODULES_DIR NAME...
      Reads MODULES_DIR/modules.dep (written by depmod) and prints, one per
      line, the paths (relative to MODULES_DIR) of the named modules and
      everything they depend on, dependencies first.
  kit_tools.py is-static FILE
      Exits 0 if FILE is an ELF executable without a program interpreter.
"""

import os
import struct
import subprocess
import sys

LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
ELF_MAGIC = b"\x7fELF"
PT_INTERP = 3
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18


def die(message):
    sys.exit(f"kit_tools.py: error: {message}")


def elf_program_headers(data):
    if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    headers = []
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        headers.append((p_type, p_offset, p_filesz))
    return headers


def pvh_entry(data):
    """Returns the PVH entry address from the ELF notes, or None."""
    for p_type, offset, size in elf_program_headers(data) or []:
        if p_type != PT_NOTE:
            continue
        pos, end = offset, offset + size
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", data, pos)
            name_start = pos + 12
            desc_start = name_start + ((namesz + 3) & ~3)
            name = data[name_start:name_start + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                width = "<I" if descsz == 4 else "<Q"
                return struct.unpack_from(width, data, desc_start)[0]
            pos = desc_start + ((descsz + 3) & ~3)
    return None


def extract_vmlinux(bzimage, out):
    with open(bzimage, "rb") as f:
        image = f.read()
    start = image.find(LZ4_LEGACY_MAGIC)
    if start < 0:
        die(f"{bzimage}: no LZ4 payload (magic 02 21 4c 18) found; "
            "is this kernel compressed with something else?")
    tmp = out + ".tmp"
    with open(tmp, "wb") as sink:
        # lz4 exits non-zero because the bzImage has trailing data after the
        # compressed stream; the output is judged by the checks below.
        proc = subprocess.run(["lz4", "-dc"], input=image[start:], stdout=sink,
                              stderr=subprocess.PIPE)
    with open(tmp, "rb") as f:
        data = f.read()
    if data[:4] != ELF_MAGIC:
        os.unlink(tmp)
        die(f"lz4 -dc of {bzimage} at offset {start} did not give an ELF file "
            f"(lz4 rc={proc.returncode}: {proc.stderr.decode().strip()})")
    entry = pvh_entry(data)
    if entry is None:
        os.unlink(tmp)
        die(f"vmlinux from {bzimage} has no Xen PVH entry note "
            "(XEN_ELFNOTE_PHYS32_ENTRY); the kernel lacks CONFIG_PVH")
    os.replace(tmp, out)
    print(f"0x{entry:x}")


def normalize(name):
    return name.replace("-", "_")


def module_order(modules_dir, names):
    dep_file = os.path.join(modules_dir, "modules.dep")
    try:
        with open(dep_file) as f:
            lines = f.read().splitlines()
    except OSError as e:
        die(f"cannot read {dep_file}: {e}")
    deps = {}
    by_name = {}
    for line in lines:
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[path] = rest.split()
        base = os.path.basename(path).split(".ko")[0]
        by_name[normalize(base)] = path

    order, done, active = [], set(), set()

    def visit(path):
        if path in done:
            return
        if path in active:
            die(f"dependency cycle through {path} in {dep_file}")
        active.add(path)
        for dep in deps.get(path, []):
            visit(dep)
        active.discard(path)
        done.add(path)
        order.append(path)

    for name in names:
        path = by_name.get(normalize(name))
        if path is None:
            die(f"module {name} is not in {dep_file}")
        visit(path)
    print("\n".join(order))


def is_static(path):
    with open(path, "rb") as f:
        data = f.read()
    headers = elf_program_headers(data)
    if headers is None:
        die(f"{path} is not a 64-bit little-endian ELF file")
    return all(p_type != PT_INTERP for p_type, _, _ in headers)


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(argv) >= 2 else 2
    command = argv[1]
    if command == "extract-vmlinux" and len(argv) == 4:
        extract_vmlinux(argv[2], argv[3])
    elif command == "module-order" and len(argv) >= 4:
        module_order(argv[2], argv[3:])
    elif command == "is-static" and len(argv) == 3:
        return 0 if is_static(argv[2]) else 1
    else:
        die(f"bad arguments {argv[1:]} (see --help)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
