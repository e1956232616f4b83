#!/usr/bin/env python3
"""Pack a directory into a gzip-compressed initramfs (cpio "newc" format).

Written in Python rather than piping `find | cpio` so that it needs no root
(device nodes such as /dev/console are described, not created with mknod) and
so the output is reproducible: every entry is owned by 0:0 with mtime 0 and
entries are sorted, so the same input tree always gives the same bytes.

The newc format is documented in the kernel tree,
Documentation/driver-api/early-userspace/buffer-format.rst.
"""

import argparse
import gzip
import os
import stat
import sys

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


class CpioWriter:
    def __init__(self, out):
        self.out = out
        self.offset = 0
        self.next_ino = 1

    def _write(self, data):
        self.out.write(data)
        self.offset += len(data)

    def _pad(self):
        remainder = self.offset % 4
        if remainder:
            self._write(b"\0" * (4 - remainder))

    def entry(self, name, mode, data=b"", rdev_major=0, rdev_minor=0, nlink=1):
        encoded_name = name.encode() + b"\0"
        fields = [
            self.next_ino, mode, 0, 0, nlink, 0, len(data),
            0, 0, rdev_major, rdev_minor, len(encoded_name), 0,
        ]
        self.next_ino += 1
        self._write(NEWC_MAGIC + b"".join(b"%08x" % f for f in fields))
        self._write(encoded_name)
        self._pad()
        if data:
            self._write(data)
            self._pad()

    def trailer(self):
        self.entry(TRAILER, 0)


def parse_node(spec):
    # name:type:major:minor[:mode], e.g. dev/console:c:5:1:600
    parts = spec.split(":")
    if len(parts) not in (4, 5) or parts[1] not in ("c", "b"):
        raise argparse.ArgumentTypeError(
            f"bad --node {spec!r}: want PATH:c|b:MAJOR:MINOR[:OCTAL_MODE]")
    kind = stat.S_IFCHR if parts[1] == "c" else stat.S_IFBLK
    perm = int(parts[4], 8) if len(parts) == 5 else 0o600
    return parts[0].strip("/"), kind | perm, int(parts[2]), int(parts[3])


def walk_sorted(root):
    """Yields paths relative to root, parents before children, sorted."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        names = sorted(filenames + [d for d in dirnames
                                    if os.path.islink(os.path.join(dirpath, d))])
        # Symlinks to directories are listed by os.walk as directories; they
        # are emitted as symlinks and must not be descended into.
        dirnames[:] = [d for d in dirnames
                       if not os.path.islink(os.path.join(dirpath, d))]
        if rel_dir != ".":
            yield rel_dir
        for name in names:
            yield os.path.normpath(os.path.join(rel_dir, name))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="directory to pack")
    parser.add_argument("--out", required=True, help="output .cpio.gz file")
    parser.add_argument("--node", action="append", type=parse_node, default=[],
                        help="extra device node PATH:c|b:MAJOR:MINOR[:MODE]")
    parser.add_argument("--level", type=int, default=6, help="gzip level")
    args = parser.parse_args()

    if not os.path.isdir(args.root):
        sys.exit(f"mkcpio.py: --root {args.root}: not a directory")

    tmp = args.out + ".tmp"
    with open(tmp, "wb") as raw, gzip.GzipFile(
            fileobj=raw, mode="wb", compresslevel=args.level, mtime=0) as gz:
        writer = CpioWriter(gz)
        emitted_dirs = set()
        for rel in walk_sorted(args.root):
            full = os.path.join(args.root, rel)
            st = os.lstat(full)
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                writer.entry(rel, stat.S_IFDIR | perm, nlink=2)
                emitted_dirs.add(rel)
            elif stat.S_ISLNK(st.st_mode):
                writer.entry(rel, stat.S_IFLNK | 0o777, os.readlink(full).encode())
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    writer.entry(rel, stat.S_IFREG | perm, f.read())
            else:
                sys.exit(f"mkcpio.py: {full}: unsupported file type; "
                         "describe device nodes with --node")
        for name, mode, major, minor in args.node:
            parent = os.path.dirname(name)
            if parent and parent not in emitted_dirs:
                writer.entry(parent, stat.S_IFDIR | 0o755, nlink=2)
                emitted_dirs.add(parent)
            writer.entry(name, mode, rdev_major=major, rdev_minor=minor)
        writer.trailer()
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
