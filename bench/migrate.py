#!/usr/bin/env python3
"""Live migration: guest-observed downtime and total time, keel-vmm vs QEMU.

The guest is build/bench/migrate_guest.elf (bench/migrate/migrate_guest.S), a
tiny PVH guest whose ring-3 loop writes one qword into each 4 KiB page of a
working set in turn (every page dirtied again well within a millisecond),
reads the TSC each iteration and prints once a second on COM1
    maxgap CYCLES at TSC_END loops N tsc T
the largest gap between two consecutive iterations in that second and the
TSC at its end. The
guest-observed downtime is the maxgap of the first whole line the
destination prints (the second that holds the switch-over), in ms at the
host's TSC frequency; the source's lines before the migration give the
baseline (the loop's largest gaps with no migration: host preemption on a
loaded machine shows up there).

For each working set (default 64 and 256 MiB) of a 1 GiB, 1-vCPU guest,
each VMM runs the guest for a few seconds, then migrates it over a unix
socket to a second process of its own kind on this host:
  keel-vmm: destination `--incoming unix:PATH`, source
            PUT /api/v1/vm/migrate {"destination", "downtime_ms"}; total and
            downtime from the `migration-completed` event.
  QEMU:     `-M microvm`, its default CPU model (-cpu host aborts on this
            PVM host), destination `-incoming unix:PATH`, source QMP
            downtime-limit, max-bandwidth unlimited (keel-vmm has no limit
            by default), `migrate`; total-time and downtime from
            query-migrate. Neither side uses auto-converge (keel-vmm has
            none): keel-vmm stops the VM anyway after 30 dirty rounds, and
            QEMU, which would iterate for ever, is given the same way out
            after --converge-s seconds by raising its downtime-limit (the
            row is marked "forced").
"Gap at" places that gap on the host's clock, in ms after the migrate
command (the guest's TSC mapped through the arrival time of the line that
reported it, +-5 ms): the switch-over sits near the total time; a gap near
0 is the start of dirty logging, one in between a dirty-bitmap sync.
The "TSC stall" column is how much less the guest's TSC advanced than the
host's clock between the source's last line and the destination's first
(line arrival timed by polling the console files every 2 ms, so +-5 ms):
time the guest cannot see in its own gaps because the VMM carried the TSC
over instead of letting it run on.

Usage: bench/migrate.py [--working-sets 64,256] [--runs N] [--downtime-ms 50]
                        [--keel PATH] [--qemu PATH] [--tsc-mhz F]
                        [--only keel|qemu] [--dirty-logs auto|ring,bitmap]
--dirty-logs ring,bitmap runs keel-vmm once with each of KVM's dirty logs
(rows keel-ring and keel-bitmap), side by side.
"""
import argparse, json, os, re, shutil, socket, statistics, subprocess, sys, tempfile
import threading, time

from unix_http import UnixHttp, api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "build/bench/migrate_guest.elf")
MEMORY_MIB = 1024
LINE = re.compile(r"^maxgap (\d+) at (\d+) loops (\d+) tsc (\d+)$")


def fail(message):
    sys.exit(f"migrate bench: {message}")


def wait_until(predicate, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    fail(f"timed out waiting for {what}")


class Console:
    """Follows a console file, stamping each whole line with CLOCK_MONOTONIC
    when it was first seen (polled every 2 ms)."""

    def __init__(self, path):
        self.path, self.lines, self.partial = path, [], ""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self):
        offset = 0
        while not self.stop.is_set():
            try:
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            now = time.monotonic()
            if data:
                offset += len(data)
                text = self.partial + data.decode(errors="replace")
                *whole, self.partial = text.split("\n")
                self.lines.extend((now, line) for line in whole)
            time.sleep(0.002)

    def reports(self):
        """(seen, maxgap, at, loops, tsc) of every whole report line; a fragment
        (the source stopped in the middle of a report) is left out."""
        out = []
        for seen, line in list(self.lines):
            match = LINE.match(line)
            if match:
                out.append((seen, *map(int, match.groups())))
        return out

    def close(self):
        self.stop.set()
        self.thread.join()


def guest_args(working_set):
    return f"migbench {working_set} {PERIOD_MCYCLES}"


def keel_command(keel, working_set, console, sock, dirty_log="auto"):
    return [keel, "--kernel", GUEST, "--cmdline", guest_args(working_set),
            "--memory", str(MEMORY_MIB), "--cpus", "1", "--no-acpi", "--debug-exit",
            "--serial", "file:" + console, "--api-socket", sock, "--dirty-log", dirty_log]


def qemu_command(qemu, working_set, console, qmp_sock):
    return [qemu, "-M", "microvm,x-option-roms=off,rtc=off", "-enable-kvm",
            # QEMU's default CPU model: -cpu host aborts on a PVM host (MSR 0x10a).
            "-m", str(MEMORY_MIB), "-smp", "1", "-nodefaults", "-no-user-config",
            "-display", "none", "-kernel", GUEST, "-append", guest_args(working_set),
            "-device", "isa-debug-exit,iobase=0xf4,iosize=1", "-serial", "file:" + console,
            "-qmp", f"unix:{qmp_sock},server=on,wait=off"]


class Qmp:
    def __init__(self, path):
        wait_until(lambda: os.path.exists(path), f"QMP socket {path}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # greeting
        self.run("qmp_capabilities")

    def run(self, command, **arguments):
        self.file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                fail(f"QMP {command}: {reply['error']}")
            return reply["return"]

    def close(self):
        self.sock.close()


def start(cmd, log):
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))


def stop(process):
    if process.poll() is None:
        process.kill()
    process.wait()


def warm_up(console, process, what, log):
    # Two reports: the first pass over the working set (first-touch faults)
    # is done and the loop is at full speed.
    def ready():
        if process.poll() is not None:
            fail(f"{what} exited {process.returncode}: {open(log).read()[-400:]}")
        return len(console.reports()) >= 3
    wait_until(ready, f"{what}'s guest to report", timeout=60)


class Run:
    """One migration's two processes, their consoles and logs in work; the
    processes are killed and the consoles closed on leaving."""

    def __init__(self, work):
        self.work = work
        self.src_console, self.dst_console = Console(self.path("src.console")), Console(self.path("dst.console"))
        self.src_log, self.dst_log, self.mig = self.path("src.log"), self.path("dst.log"), self.path("mig.sock")
        self.src = self.dst = None

    def path(self, name):
        return os.path.join(self.work, name)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        for process in (self.src, self.dst):
            if process:
                stop(process)
        self.src_console.close()
        self.dst_console.close()

    def wait_for_destination_report(self, what):
        wait_until(lambda: len(self.dst_console.reports()) >= 1 or self.dst.poll() is not None,
                   f"{what} destination's first report", timeout=30)
        if self.dst.poll() is not None:
            fail(f"{what} destination exited {self.dst.returncode}: {open(self.dst_log).read()[-400:]}")


def migrate_keel(args, working_set, work, dirty_log="auto"):
    with Run(work) as run:
        src_sock, dst_sock = run.path("src.sock"), run.path("dst.sock")
        run.src = start(keel_command(args.keel, working_set, run.src_console.path, src_sock,
                                     dirty_log), run.src_log)
        warm_up(run.src_console, run.src, "keel-vmm source", run.src_log)
        wait_until(lambda: os.path.exists(src_sock), "keel-vmm's API socket")
        run.dst = start(keel_command(args.keel, working_set, run.dst_console.path, dst_sock,
                                     dirty_log) +
                        ["--incoming", "unix:" + run.mig, "--log-level", "info"], run.dst_log)
        wait_until(lambda: os.path.exists(run.mig), "keel-vmm's incoming socket")
        events = UnixHttp(src_sock, timeout=args.converge_s + 120)
        events.request("GET", "/api/v1/events?follow=true")
        stream = events.getresponse()
        started = time.monotonic()
        api(src_sock, "PUT", "/api/v1/vm/migrate",
            {"destination": "unix:" + run.mig, "downtime_ms": args.downtime_ms})
        outcome = None
        while outcome is None:
            line = stream.readline()
            if not line:
                fail(f"keel-vmm's event stream ended before the migration did: "
                     f"{open(run.src_log).read()[-400:]}")
            event = json.loads(line) if line.strip().startswith(b"{") else {}
            if event.get("type") == "migration-failed":
                fail(f"keel-vmm migration failed: {event}")
            if event.get("type") == "migration-completed":
                outcome = event
        events.close()
        run.src.wait(timeout=60)
        run.wait_for_destination_report("keel-vmm")
        r = measure(args, run, started, outcome["total_ms"], outcome["downtime_ms"],
                    forced=outcome.get("rounds", 0) >= 30)
        r["breakdown"] = keel_breakdown(outcome, open(run.dst_log, errors="replace").read())
        return r


def keel_breakdown(outcome, dst_log):
    """Where keel-vmm's downtime went: the source's downtime_us steps that
    matter most and the destination's logged build times, for the run line."""
    steps = outcome.get("downtime_us", {})
    logged = lambda what: (re.search(rf"machine {what} in (\d+) us", dst_log) or [None, "?"])[1]
    return (f"ack {steps.get('ack', '?')} us, last pages {outcome.get('last_pages', '?')} in "
            f"{steps.get('last_pages', '?')} us, pause {steps.get('pause', '?')} us; "
            f"destination prebuilt {logged('prebuilt')} us, rebuilt {logged('rebuilt')} us")


def migrate_qemu(args, working_set, work):
    with Run(work) as run:
        src_qmp, dst_qmp = run.path("src.qmp"), run.path("dst.qmp")
        run.src = start(qemu_command(args.qemu, working_set, run.src_console.path, src_qmp), run.src_log)
        warm_up(run.src_console, run.src, "QEMU source", run.src_log)
        run.dst = start(qemu_command(args.qemu, working_set, run.dst_console.path, dst_qmp) +
                        ["-incoming", "unix:" + run.mig], run.dst_log)
        wait_until(lambda: os.path.exists(run.mig), "QEMU's incoming socket")
        qmp = Qmp(src_qmp)
        qmp.run("migrate-set-parameters", **{"downtime-limit": args.downtime_ms,
                                             "max-bandwidth": 100 << 30})
        started = time.monotonic()
        qmp.run("migrate", uri="unix:" + run.mig)
        forced = False
        while True:
            status = qmp.run("query-migrate")
            if status.get("status") in ("failed", "cancelled"):
                fail(f"QEMU migration {status.get('status')}: {status}")
            if status.get("status") == "completed":
                break
            if not forced and time.monotonic() - started > args.converge_s:
                qmp.run("migrate-set-parameters", **{"downtime-limit": 60000})
                forced = True
            time.sleep(0.02)
        qmp.close()
        run.wait_for_destination_report("QEMU")
        return measure(args, run, started, status["total-time"], status["downtime"], forced)


def measure(args, run, started, total_ms, downtime_ms, forced):
    to_ms = lambda cycles: cycles / (args.tsc_mhz * 1000)
    before = [r for r in run.src_console.reports()[2:] if r[0] < started]
    last_src, first_dst = run.src_console.reports()[-1], run.dst_console.reports()[0]
    wall_ms = (first_dst[0] - last_src[0]) * 1000
    tsc_ms = to_ms(first_dst[4] - last_src[4])
    gap_end = first_dst[0] - to_ms(first_dst[4] - first_dst[2]) / 1000
    return {"guest_gap_ms": to_ms(first_dst[1]),
            "gap_at_ms": (gap_end - started) * 1000 - to_ms(first_dst[1]),
            "baseline_ms": to_ms(max(r[1] for r in before)) if before else float("nan"),
            "total_ms": total_ms, "vmm_downtime_ms": downtime_ms,
            "tsc_stall_ms": wall_ms - tsc_ms, "forced": forced}


def tsc_mhz():
    with open("/proc/cpuinfo") as f:
        info = f.read()
    if " tsc_known_freq" not in info:
        fail("the host's TSC frequency is not known (no tsc_known_freq): pass --tsc-mhz")
    return float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M).group(1))


PERIOD_MCYCLES = 0


def main():
    global PERIOD_MCYCLES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--working-sets", default="64,256", help="MiB, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="migrations per VMM and working set")
    parser.add_argument("--downtime-ms", type=int, default=50, help="both VMMs' downtime limit")
    parser.add_argument("--converge-s", type=float, default=20,
                        help="seconds before QEMU's downtime limit is lifted to let it finish")
    parser.add_argument("--keel", default=os.path.join(ROOT, "build/src/vmm/keel-vmm"))
    parser.add_argument("--qemu", default=shutil.which("qemu-system-x86_64"))
    parser.add_argument("--tsc-mhz", type=float, help="default: cpu MHz from /proc/cpuinfo")
    parser.add_argument("--only", choices=("keel", "qemu"), help="run one VMM only")
    parser.add_argument("--dirty-logs", default="auto",
                        help="keel-vmm's --dirty-log values to compare, comma-separated "
                             "(e.g. ring,bitmap): one keel row each")
    args = parser.parse_args()
    for path in (args.keel, GUEST, args.qemu):
        if not path or not os.path.exists(path):
            fail(f"{path} not found (build keel-vmm and migrate_guest first)")
    args.tsc_mhz = args.tsc_mhz or tsc_mhz()
    PERIOD_MCYCLES = round(args.tsc_mhz)  # one report a second

    keels = {}
    for dirty_log in args.dirty_logs.split(","):
        name = "keel" if dirty_log == "auto" else f"keel-{dirty_log}"
        keels[name] = lambda a, w, d, dirty_log=dirty_log: migrate_keel(a, w, d, dirty_log)
    vmms = {**keels, "qemu": migrate_qemu}
    if args.only == "keel":
        vmms = keels
    elif args.only:
        vmms = {args.only: vmms[args.only]}
    results = {}
    for working_set in (int(w) for w in args.working_sets.split(",")):
        for run in range(args.runs):
            for name, migrate in vmms.items():  # interleaved
                with tempfile.TemporaryDirectory(prefix="keel-migrate-bench-") as work:
                    r = migrate(args, working_set, work)
                results.setdefault((working_set, name), []).append(r)
                print(f"ws {working_set:4} MiB {name:11} run {run}: guest gap {r['guest_gap_ms']:8.1f} ms"
                      f" at {r['gap_at_ms']:6.0f} ms  (baseline {r['baseline_ms']:6.1f})  VMM downtime {r['vmm_downtime_ms']:6} ms"
                      f"  total {r['total_ms']:6} ms  TSC stall {r['tsc_stall_ms']:7.1f} ms"
                      f"{'  forced' if r['forced'] else ''}", flush=True)
                if "breakdown" in r:
                    print(f"    {r['breakdown']}", flush=True)

    print(f"\nlive migration, {MEMORY_MIB} MiB 1-vCPU guest, unix socket, downtime limit "
          f"{args.downtime_ms} ms, TSC {args.tsc_mhz:.0f} MHz, median of {args.runs}")
    print(f"{'ws MiB':>6} {'vmm':11} {'guest gap ms':>12} {'baseline ms':>11} {'VMM downtime ms':>15} "
          f"{'total ms':>8} {'TSC stall ms':>12}")
    for (working_set, name), rs in results.items():
        med = lambda key: statistics.median(r[key] for r in rs)
        forced = sum(r["forced"] for r in rs)
        print(f"{working_set:6} {name:11} {med('guest_gap_ms'):12.1f} {med('baseline_ms'):11.1f} "
              f"{med('vmm_downtime_ms'):15.1f} {med('total_ms'):8.0f} {med('tsc_stall_ms'):12.1f}"
              f"{f'  forced {forced}/{len(rs)}' if forced else ''}")


if __name__ == "__main__":
    main()
