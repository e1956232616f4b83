#!/usr/bin/env python3
"""keel-vmm vs QEMU microvm on the same tiny PVH guest, side by side.

startup: wall time from exec of the VMM to its exit, for a guest that checks
its PVH entry state and writes the debug-exit port at once (so it bounds
"exec -> first guest instruction" from above: it includes VM teardown).
memory:  resident memory of the VMM process while a 1-vCPU 256 MiB guest
spins (pvh-test s), from /proc/PID/status; for keel-vmm, "beyond guest
memory" is VmRSS minus the resident part of its guest RAM mapping (from
/proc/PID/smaps: the 256 MiB anonymous mapping with the default
--memory-backend anon, the memfd "keel-guest-ram" with memfd).

Usage: bench/startup_memory.py [--runs N] [--keel PATH] [--guest PATH]
                               [--memory-backend anon|memfd]
Run it on an idle machine; it prints a table for bench/RESULTS.md.
"""
import argparse, os, shutil, signal, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


GUEST_MIB = 256


def commands(keel, qemu, guest, mode, backend):
    cmdline = "pvh-test" + (" s" if mode == "spin" else "")
    return {
        "keel": [keel, "--kernel", guest, "--cmdline", cmdline, "--memory", str(GUEST_MIB),
                 "--memory-backend", backend, "--cpus", "1", "--serial", "none", "--debug-exit"],
        "qemu": [qemu, "-M", "microvm,x-option-roms=off,isa-serial=off,rtc=off", "-enable-kvm",
                 # QEMU's default CPU model: -cpu host aborts on a PVM host
                 # (MSR 0x10a), and the guest needs nothing beyond it.
                 "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config",
                 "-display", "none", "-kernel", guest, "-append", cmdline,
                 "-device", "isa-debug-exit,iobase=0xf4,iosize=1"],
    }


def startup_ms(cmd, expected):
    start = time.perf_counter()
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
    elapsed = (time.perf_counter() - start) * 1000
    if result.returncode != expected:
        sys.exit(f"{cmd[0]} exited {result.returncode}, expected {expected}: "
                 f"{result.stderr.decode(errors='replace')[-400:]}")
    return elapsed


def status_kib(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0])
    # Pss shares each shared page among the processes mapping it; private
    # pages (USS) are what one more VM really costs.
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Pss", "Private_Clean", "Private_Dirty"):
                fields[key] = int(value.split()[0])
    fields["Uss"] = fields.pop("Private_Clean", 0) + fields.pop("Private_Dirty", 0)
    fields["GuestRss"], fields["GuestHuge"] = guest_ram_kib(pid)
    return fields


def guest_ram_kib(pid):
    """Rss and AnonHugePages (KiB) of keel-vmm's guest RAM mapping: the memfd
    named keel-guest-ram, or an anonymous mapping of exactly the guest's size
    (nothing else in keel-vmm maps 256 MiB)."""
    rss = huge = 0
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                begin, end = (int(x, 16) for x in head[0].split("-"))
                name = head[5] if len(head) > 5 else ""
                inside = "keel-guest-ram" in name or (
                    name == "" and end - begin == GUEST_MIB << 20)
            elif inside and head and head[0] == "Rss:":
                rss += int(head[1])
            elif inside and head and head[0] == "AnonHugePages:":
                huge += int(head[1])
    return rss, huge


def resident(cmd):
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # past start-up, guest spinning
        if process.poll() is not None:
            sys.exit(f"{cmd[0]} exited early with {process.returncode}")
        return status_kib(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--keel", default=os.path.join(ROOT, "build/src/vmm/keel-vmm"))
    parser.add_argument("--guest", default=os.path.join(ROOT, "build/tests/guest/pvh_check.elf"))
    parser.add_argument("--qemu", default=shutil.which("qemu-system-x86_64"))
    parser.add_argument("--memory-backend", default="anon", choices=("anon", "memfd"))
    args = parser.parse_args()
    for path in (args.keel, args.guest, args.qemu):
        if not path or not os.path.exists(path):
            sys.exit(f"startup_memory: {path} not found (build first: scripts/build.sh)")

    exits = commands(args.keel, args.qemu, args.guest, "exit", args.memory_backend)
    expected = {"keel": 0, "qemu": 1}  # isa-debug-exit reports (0 << 1) | 1
    times = {"keel": [], "qemu": []}
    for vmm in ("keel", "qemu"):
        startup_ms(exits[vmm], expected[vmm])  # warm the page cache
    for _ in range(args.runs):
        for vmm in ("keel", "qemu"):
            times[vmm].append(startup_ms(exits[vmm], expected[vmm]))

    spins = commands(args.keel, args.qemu, args.guest, "spin", args.memory_backend)
    memory = {vmm: resident(spins[vmm]) for vmm in ("keel", "qemu")}

    print(f"startup, exec -> guest exits ({args.runs} runs each, interleaved)")
    for vmm in ("keel", "qemu"):
        t = sorted(times[vmm])
        print(f"  {vmm:5} median {statistics.median(t):7.2f} ms   p90 {t[int(len(t) * 0.9) - 1]:7.2f} ms"
              f"   min {t[0]:7.2f} ms")
    ratio = statistics.median(times["keel"]) / statistics.median(times["qemu"])
    print(f"  keel/qemu median: {ratio:.2f}")
    print(f"resident memory, 1 vCPU, {GUEST_MIB} MiB guest spinning (KiB); "
          f"keel-vmm --memory-backend {args.memory_backend}")
    for vmm in ("keel", "qemu"):
        m = memory[vmm]
        beyond = m["VmRSS"] - (m["GuestRss"] if vmm == "keel" else 0)
        print(f"  {vmm:5} VmRSS {m['VmRSS']:6}  RssAnon {m['RssAnon']:6}  RssFile {m['RssFile']:6}"
              f"  RssShmem {m['RssShmem']:4}  Pss {m['Pss']:6}  Uss {m['Uss']:6}"
              f"  VmRSS beyond guest RAM {beyond:6}"
              + (f"  (guest RAM resident {m['GuestRss']}, in hugepages {m['GuestHuge']})"
                 if vmm == "keel" else ""))


if __name__ == "__main__":
    main()
