#!/usr/bin/env python3
"""keel-vmm vs QEMU microvm on the same tiny PVH guest, side by side.

startup: wall time from exec of the VMM to its exit, for a guest that checks
its PVH entry state and writes the debug-exit port at once (so it bounds
"exec -> first guest instruction" from above: it includes VM teardown).
memory:  resident memory of the VMM process while a 1-vCPU 256 MiB guest
spins (pvh-test s), from /proc/PID/status; for keel-vmm, guest RAM is a
memfd and shows as RssShmem, so "beyond guest memory" is VmRSS - RssShmem.

Usage: bench/startup_memory.py [--runs N] [--keel PATH] [--guest PATH]
Run it on an idle machine; it prints a table for bench/RESULTS.md.
"""
import argparse, os, shutil, signal, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commands(keel, qemu, guest, mode):
    cmdline = "pvh-test" + (" s" if mode == "spin" else "")
    return {
        "keel": [keel, "--kernel", guest, "--cmdline", cmdline, "--memory", "256", "--cpus", "1",
                 "--serial", "none", "--debug-exit"],
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
    return fields


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
    args = parser.parse_args()
    for path in (args.keel, args.guest, args.qemu):
        if not path or not os.path.exists(path):
            sys.exit(f"startup_memory: {path} not found (build first: scripts/build.sh)")

    exits = commands(args.keel, args.qemu, args.guest, "exit")
    expected = {"keel": 0, "qemu": 1}  # isa-debug-exit reports (0 << 1) | 1
    times = {"keel": [], "qemu": []}
    for vmm in ("keel", "qemu"):
        startup_ms(exits[vmm], expected[vmm])  # warm the page cache
    for _ in range(args.runs):
        for vmm in ("keel", "qemu"):
            times[vmm].append(startup_ms(exits[vmm], expected[vmm]))

    spins = commands(args.keel, args.qemu, args.guest, "spin")
    memory = {vmm: resident(spins[vmm]) for vmm in ("keel", "qemu")}

    print(f"startup, exec -> guest exits ({args.runs} runs each, interleaved)")
    for vmm in ("keel", "qemu"):
        t = sorted(times[vmm])
        print(f"  {vmm:5} median {statistics.median(t):7.2f} ms   p90 {t[int(len(t) * 0.9) - 1]:7.2f} ms"
              f"   min {t[0]:7.2f} ms")
    ratio = statistics.median(times["keel"]) / statistics.median(times["qemu"])
    print(f"  keel/qemu median: {ratio:.2f}")
    print("resident memory, 1 vCPU, 256 MiB guest spinning (KiB)")
    for vmm in ("keel", "qemu"):
        m = memory[vmm]
        beyond = m["VmRSS"] - (m.get("RssShmem", 0) if vmm == "keel" else 0)
        print(f"  {vmm:5} VmRSS {m['VmRSS']:6}  RssAnon {m['RssAnon']:6}  RssFile {m['RssFile']:6}"
              f"  RssShmem {m['RssShmem']:4}  Pss {m['Pss']:6}  Uss {m['Uss']:6}"
              f"  VmRSS beyond guest RAM {beyond:6}")


if __name__ == "__main__":
    main()
