#!/usr/bin/env python3
"""Restore-to-running of a 1 GiB snapshot: keel-vmm vs QEMU, side by side.

The guest is build/tests/guest/pvh_check.elf in its counting mode
(`pvh-test c`: prints a..z forever on COM1, its position kept in RAM), with
1 GiB of RAM and 1 vCPU. Each VMM runs it until it prints, pauses it and saves
it once:
  keel-vmm: PUT /api/v1/vm/pause, PUT /api/v1/vm/snapshot (RAM in the file,
            mapped MAP_PRIVATE on restore, so pages load lazily on first touch)
  QEMU:     QMP migrate to "exec:cat > FILE" (QEMU's save-to-file; QEMU
            stops the guest for the last round itself)
Then each run starts a new process from the saved state with the serial
console on a pipe and times exec -> the first byte the restored guest prints,
which is restore-to-running as the guest sees it (it includes process start).
  keel-vmm --restore FILE --serial stdio
  qemu-system-x86_64 ... -incoming "exec:cat FILE" -serial stdio
Runs alternate between the two. The saved files stay in the page cache
between runs (a warm restore); the script does not drop caches.

Usage: bench/restore.py [--runs N] [--memory MiB] [--keel PATH] [--qemu PATH]
"""
import argparse, json, os, shutil, socket, statistics, subprocess, sys, tempfile, time

from unix_http import api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "build/tests/guest/pvh_check.elf")
CMDLINE = "pvh-test c"


def wait_until(predicate, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    sys.exit(f"restore bench: timed out waiting for {what}")


def file_has(path, size):
    return os.path.exists(path) and os.path.getsize(path) >= size


def save_keel(keel, memory, work):
    sock, console, snap = (os.path.join(work, n) for n in ("keel.sock", "keel.console", "keel.snap"))
    vmm = subprocess.Popen([keel, "--kernel", GUEST, "--cmdline", CMDLINE, "--memory", str(memory),
                            "--cpus", "1", "--debug-exit", "--no-acpi", "--serial", "file:" + console,
                            "--api-socket", sock], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: file_has(console, 20), "keel-vmm's guest to print")
        wait_until(lambda: os.path.exists(sock), "keel-vmm's API socket")
        api(sock, "PUT", "/api/v1/vm/pause")
        api(sock, "PUT", "/api/v1/vm/snapshot", {"path": snap})
    finally:
        vmm.kill()
        vmm.wait()
    return snap


def qmp(sock_path, commands):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    f = s.makefile("rw")
    json.loads(f.readline())  # greeting
    replies = []
    for command in commands:
        f.write(json.dumps(command) + "\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                sys.exit(f"restore bench: QMP {command['execute']}: {reply['error']}")
            replies.append(reply["return"])
            break
    s.close()
    return replies


def qemu_command(qemu, memory, serial):
    return [qemu, "-M", "microvm,x-option-roms=off,rtc=off", "-enable-kvm",
            "-m", str(memory), "-smp", "1", "-nodefaults", "-no-user-config",
            "-display", "none", "-kernel", GUEST, "-append", CMDLINE,
            "-device", "isa-debug-exit,iobase=0xf4,iosize=1", "-serial", serial]


def save_qemu(qemu, memory, work):
    sock, console, snap = (os.path.join(work, n) for n in ("qmp.sock", "qemu.console", "qemu.state"))
    vmm = subprocess.Popen(qemu_command(qemu, memory, "file:" + console) +
                           ["-qmp", f"unix:{sock},server=on,wait=off"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: file_has(console, 20), "QEMU's guest to print")
        # Not stopped first: a stream saved from a stopped QEMU restores
        # paused. QEMU stops the guest itself for the last round.
        qmp(sock, [{"execute": "qmp_capabilities"},
                   {"execute": "migrate", "arguments": {"uri": f"exec:cat > {snap}"}}])
        def completed():
            status = qmp(sock, [{"execute": "qmp_capabilities"},
                                {"execute": "query-migrate"}])[1].get("status")
            if status == "failed":
                sys.exit("restore bench: QEMU's migrate to file failed")
            return status == "completed"
        wait_until(completed, "QEMU's save to finish", timeout=120)
    finally:
        vmm.kill()
        vmm.wait()
    return snap


def first_byte_ms(cmd):
    start = time.perf_counter()
    vmm = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        byte = vmm.stdout.read(1)
        elapsed = (time.perf_counter() - start) * 1000
    finally:
        vmm.kill()
        _, err = vmm.communicate()
    if not byte:
        sys.exit(f"restore bench: {cmd[0]} printed nothing: {err.decode(errors='replace')[-400:]}")
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--memory", type=int, default=1024, help="guest RAM in MiB")
    parser.add_argument("--keel", default=os.path.join(ROOT, "build/src/vmm/keel-vmm"))
    parser.add_argument("--qemu", default=shutil.which("qemu-system-x86_64"))
    args = parser.parse_args()
    for path in (args.keel, GUEST, args.qemu):
        if not path or not os.path.exists(path):
            sys.exit(f"restore bench: {path} not found (build first: scripts/build.sh)")

    with tempfile.TemporaryDirectory(prefix="keel-restore-bench-") as work:
        keel_snap = save_keel(args.keel, args.memory, work)
        qemu_state = save_qemu(args.qemu, args.memory, work)
        restores = {
            "keel": [args.keel, "--restore", keel_snap, "--serial", "stdio"],
            "qemu": qemu_command(args.qemu, args.memory, "stdio") + ["-incoming", f"exec:cat {qemu_state}"],
        }
        times = {"keel": [], "qemu": []}
        for vmm in times:
            first_byte_ms(restores[vmm])  # warm the page cache
        for _ in range(args.runs):
            for vmm in times:
                times[vmm].append(first_byte_ms(restores[vmm]))
        sizes = {"keel": os.path.getsize(keel_snap), "qemu": os.path.getsize(qemu_state)}

    print(f"restore-to-running, {args.memory} MiB guest, exec -> first guest output "
          f"({args.runs} runs each, interleaved)")
    for vmm, samples in times.items():
        samples.sort()
        p90 = samples[int(len(samples) * 0.9) - 1]
        print(f"  {vmm:5} median {statistics.median(samples):8.2f} ms   p90 {p90:8.2f} ms   "
              f"min {samples[0]:8.2f} ms   saved file {sizes[vmm] / 2**20:8.1f} MiB")
    print(f"  keel/qemu median: {statistics.median(times['keel']) / statistics.median(times['qemu']):.2f}")


if __name__ == "__main__":
    main()
