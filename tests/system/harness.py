#!/usr/bin/env python3
"""Keel system-test harness: boots real Linux guests under real KVM.

Where the host has no usable VT-x/AMD-V (this project's machines: /dev/kvm is
PVM there), the harness boots an "L1" Linux under QEMU TCG with an AMD CPU
model; L1 loads kvm-amd and runs the scenarios, which boot "L2" guests with
the VMM under test. On a host with real hardware virtualization ("direct"
mode) the scenarios run on the host itself. See tests/system/README.md.

  harness.py run   --kit DIR --out DIR [--binary PATH]... [--scenario NAME]...
  harness.py check --out DIR NAME
  harness.py demo  --kit DIR [--out DIR] [--binary PATH]...
  harness.py list | mode
"""

import argparse
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

SYSTEM_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(SYSTEM_DIR))
KIT_SCRIPTS = os.path.join(REPO_ROOT, "scripts", "kit")
# KEEL_SCENARIO_DIR runs scenarios from elsewhere (bench/nested uses it).
SCENARIO_DIR = os.path.abspath(os.environ.get("KEEL_SCENARIO_DIR") or
                               os.path.join(SYSTEM_DIR, "scenarios"))
L1_INIT = os.path.join(SYSTEM_DIR, "l1", "init")
BUSYBOX = "/bin/busybox"
SKIP_RC = 77
DEFAULT_SCENARIO_TIMEOUT = 300
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Where Debian's QEMU looks for firmware and option ROMs.
QEMU_DATA_DIRS = ["/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu"]
KIT_PAYLOAD_FILES = ["vmlinuz", "vmlinux", "initramfs.cpio.gz", "data.ext4",
                     "data.SHA256SUMS", "kit.env", "kernel.config"]
# Kit tools that scenarios also run in L1 (host side), so executable there.
KIT_PAYLOAD_TOOLS = ["keel-vsock"]

# The kit scripts are imported from the source tree; keep it free of caches.
sys.dont_write_bytecode = True
sys.path.insert(0, KIT_SCRIPTS)
import kit_tools  # noqa: E402  (scripts/kit/kit_tools.py)
import mkcpio  # noqa: E402  (scripts/kit/mkcpio.py)


class HarnessError(Exception):
    pass


def say(message):
    print(f"harness: {message}", flush=True)


def cache_dir():
    base = os.environ.get("KEEL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "keel")
    path = os.path.join(base, "l1")
    os.makedirs(path, exist_ok=True)
    return path


class CacheLock:
    """Serializes payload builds that share a cache directory."""

    def __init__(self, directory):
        self.path = os.path.join(directory, "lock")

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def prune(directory, prefix, keep):
    entries = sorted((e for e in os.scandir(directory) if e.name.startswith(prefix)),
                     key=lambda e: e.stat().st_mtime, reverse=True)
    for entry in entries[keep:]:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)


def file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_env_file(path):
    values = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                values[key] = value
    return values


# --- host capabilities --------------------------------------------------------

def detect_mode():
    """Returns ("direct" | "nested", reason)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set()
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        flags = set()
    hw = sorted(flags & {"vmx", "svm"})
    if not hw:
        return "nested", "the CPU has no vmx/svm flag: real KVM only exists nested under TCG"
    if not os.path.exists("/dev/kvm"):
        return "nested", f"the CPU has {hw[0]} but /dev/kvm is missing"
    if os.path.exists("/sys/module/kvm_pvm"):
        return "nested", "/dev/kvm is PVM (kvm_pvm), which cannot boot a stock Linux"
    return "direct", f"the CPU has {hw[0]}, /dev/kvm exists and is not PVM"


def which_or_die(name, package):
    path = shutil.which(name)
    if not path:
        raise HarnessError(f"{name} not found in PATH (install the {package} package)")
    return path


def list_scenarios():
    names = []
    for entry in sorted(os.listdir(SCENARIO_DIR)):
        if entry.endswith(".sh") and os.path.isfile(os.path.join(SCENARIO_DIR, entry)):
            names.append(entry[:-3])
    return names


def scenario_timeout(name):
    with open(os.path.join(SCENARIO_DIR, name + ".sh")) as f:
        for line in f:
            match = re.match(r"^# keel-timeout: *(\d+)", line)
            if match:
                return int(match.group(1))
    return DEFAULT_SCENARIO_TIMEOUT


def resolve_scenarios(requested):
    available = list_scenarios()
    if not requested:
        return available
    for name in requested:
        if not NAME_RE.match(name) or name not in available:
            raise HarnessError(f"unknown scenario {name!r}; available: {', '.join(available)}")
    return list(dict.fromkeys(requested))


def load_kit(kit_dir):
    kit_dir = os.path.abspath(kit_dir)
    env_file = os.path.join(kit_dir, "kit.env")
    if not os.path.isfile(env_file):
        raise HarnessError(f"{env_file} not found: build the kit with "
                           f"scripts/kit/build-kit.sh {kit_dir}")
    kit = read_env_file(env_file)
    kit["dir"] = kit_dir
    for name in KIT_PAYLOAD_FILES + KIT_PAYLOAD_TOOLS:
        if not os.path.isfile(os.path.join(kit_dir, name)):
            raise HarnessError(f"kit file {os.path.join(kit_dir, name)} is missing; "
                               "rebuild the kit")
    return kit


# --- what goes into L1 ----------------------------------------------------------

def shared_libraries(binary):
    """Paths of the shared objects `ldd` lists for binary, loader included."""
    proc = subprocess.run(["ldd", binary], capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    if "not a dynamic executable" in output or "statically linked" in output:
        return []
    if proc.returncode != 0:
        raise HarnessError(f"ldd {binary} failed: {output.strip()}")
    libraries = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if "=> not found" in line:
            raise HarnessError(f"{binary} needs {line.split()[0]}, which ldd cannot find")
        match = re.search(r"=>\s*(/\S+)", line) or re.match(r"(/\S+)\s+\(", line)
        if match:
            libraries.append(match.group(1))
    return libraries


class PayloadPlan:
    """The files of the L1 payload disk: destination path -> source."""

    def __init__(self):
        self.files = {}      # dest -> (source path, mode)
        self.symlinks = {}   # dest -> target

    def add_file(self, dest, source, mode=None):
        dest = dest.lstrip("/")
        if mode is None:
            mode = stat.S_IMODE(os.stat(source).st_mode)
        self.files[dest] = (os.path.realpath(source), mode)

    def add_tree(self, dest, source):
        for root, _, names in os.walk(source, followlinks=True):
            for name in names:
                path = os.path.join(root, name)
                if os.path.isfile(path):
                    self.add_file(os.path.join(dest, os.path.relpath(path, source)), path)

    def add_binary(self, path):
        """Carries an executable and its libraries at their host paths."""
        path = os.path.abspath(path)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise HarnessError(f"binary {path} does not exist or is not executable")
        self.add_file("sysroot" + path, path)
        for library in shared_libraries(path):
            # Keep the name ldd printed (the soname link), with its content.
            self.add_file("sysroot" + library, library)
        name = os.path.basename(path)
        self.symlinks["bin/" + name] = os.path.relpath("sysroot" + path, "bin")

    def digest(self):
        digest = hashlib.sha256()
        for dest in sorted(self.files):
            source, mode = self.files[dest]
            digest.update(f"F {dest} {mode:o} {file_digest(source)}\n".encode())
        for dest in sorted(self.symlinks):
            digest.update(f"L {dest} {self.symlinks[dest]}\n".encode())
        return digest.hexdigest()[:16]

    def materialize(self, root):
        for dest, (source, mode) in self.files.items():
            target = os.path.join(root, dest)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(source, target)
            os.chmod(target, mode)
        for dest, link in self.symlinks.items():
            target = os.path.join(root, dest)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(link, target)


def plan_payload(kit, binaries, qemu_for_l2):
    plan = PayloadPlan()
    for name in KIT_PAYLOAD_FILES:
        plan.add_file(f"kit/{name}", os.path.join(kit["dir"], name), 0o644)
    for name in KIT_PAYLOAD_TOOLS:
        plan.add_file(f"kit/{name}", os.path.join(kit["dir"], name), 0o755)
    plan.add_file("system/lib.sh", os.path.join(SYSTEM_DIR, "lib.sh"))
    plan.add_tree("system/scenarios", SCENARIO_DIR)
    plan.add_tree("system/common", os.path.join(SYSTEM_DIR, "common"))
    if qemu_for_l2:
        plan.add_binary(qemu_for_l2)
        for directory in QEMU_DATA_DIRS:
            if os.path.isdir(directory):
                plan.add_tree("sysroot" + directory, directory)
    for binary in binaries:
        plan.add_binary(binary)
    return plan


def disk_assets():
    """Scenario disks: scenarios/<name>.disk/ becomes assets/<name>.ext4."""
    return sorted(e[:-5] for e in os.listdir(SCENARIO_DIR)
                  if e.endswith(".disk") and os.path.isdir(os.path.join(SCENARIO_DIR, e)))


def build_assets(dest_dir):
    os.makedirs(dest_dir, exist_ok=True)
    for name in disk_assets():
        run_checked([os.path.join(KIT_SCRIPTS, "make-disk.sh"), "--label", "keel-scenario",
                     os.path.join(SCENARIO_DIR, name + ".disk"),
                     os.path.join(dest_dir, name + ".ext4")],
                    f"building scenario disk {name}.ext4")


def run_checked(argv, what):
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise HarnessError(f"{what} failed ({' '.join(argv)}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def build_payload(kit, binaries, qemu_for_l2):
    """Returns the path of the payload disk image, built or from the cache."""
    started = time.monotonic()
    plan = plan_payload(kit, binaries, qemu_for_l2)
    # The scenario disks are built from files that are part of the plan.
    plan_key = plan.digest()
    cache = cache_dir()
    image = os.path.join(cache, f"payload-{plan_key}.ext4")
    with CacheLock(cache):
        if os.path.isfile(image):
            os.utime(image)
            say(f"payload {os.path.basename(image)} from cache "
                f"({time.monotonic() - started:.1f} s)")
            return image
        stage = tempfile.mkdtemp(prefix="payload-stage-", dir=cache)
        try:
            plan.materialize(stage)
            build_assets(os.path.join(stage, "system", "assets"))
            manifest = {"kit": kit.get("KEEL_KIT_ID"), "binaries": list(binaries),
                        "qemu": qemu_for_l2, "key": plan_key}
            with open(os.path.join(stage, "manifest.json"), "w") as f:
                json.dump(manifest, f, indent=1)
            run_checked([os.path.join(KIT_SCRIPTS, "make-disk.sh"), "--label", "keel-payload",
                         stage, image], "building the L1 payload disk")
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        prune(cache, "payload-", 3)
    say(f"payload {os.path.basename(image)} built "
        f"({os.path.getsize(image) >> 20} MiB sparse, {time.monotonic() - started:.1f} s)")
    return image


def pin_payload(image, out_dir):
    """Hard-links the cached payload into the output directory.

    The cache keeps only the newest payloads; the link keeps this run's one
    alive (a retry opens it again) and lets the run be reproduced from OUT.
    """
    pinned = os.path.join(out_dir, "payload.ext4")
    try:
        if os.path.lexists(pinned):
            os.unlink(pinned)
        os.link(image, pinned)
        return pinned
    except OSError:
        return image  # another file system: use the cache's copy


def build_l1_base_initrd(kit):
    """busybox + tests/system/l1/init + the KVM and virtio-blk modules."""
    if not os.path.isfile(BUSYBOX) or not kit_tools.is_static(BUSYBOX):
        raise HarnessError(f"{BUSYBOX} is missing or not static (install busybox-static)")
    kernel_version = kit["KERNEL_VERSION"]
    modules_dir = os.path.join(kit["dir"], kit["KIT_MODULES_DIR"])
    with open(os.path.join(kit["dir"], kit["KIT_L1_MODULE_ORDER"])) as f:
        order = [line.strip() for line in f if line.strip()]
    inputs = [BUSYBOX, L1_INIT, os.path.join(KIT_SCRIPTS, "mkcpio.py")] + \
        [os.path.join(modules_dir, m) for m in order]
    digest = hashlib.sha256(kernel_version.encode())
    for path in inputs:
        digest.update(f"{path} {file_digest(path)}\n".encode())
    cache = cache_dir()
    image = os.path.join(cache, f"l1-base-{digest.hexdigest()[:16]}.cpio.gz")
    with CacheLock(cache):
        if os.path.isfile(image):
            os.utime(image)
            return image
        stage = tempfile.mkdtemp(prefix="l1-stage-", dir=cache)
        try:
            for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc/keel", "proc", "sys", "dev",
                      "tmp", "run", "root", "payload"]:
                os.makedirs(os.path.join(stage, d), exist_ok=True)
            shutil.copyfile(BUSYBOX, os.path.join(stage, "bin/busybox"))
            os.chmod(os.path.join(stage, "bin/busybox"), 0o755)
            applets = run_checked([BUSYBOX, "--list-full"], "busybox --list-full").split()
            for applet in applets:
                target = os.path.join(stage, applet)
                if not os.path.lexists(target):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    os.symlink("/bin/busybox", target)
            shutil.copyfile(L1_INIT, os.path.join(stage, "init"))
            os.chmod(os.path.join(stage, "init"), 0o755)
            for module in order:
                dest = os.path.join(stage, "lib/modules", kernel_version, module)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copyfile(os.path.join(modules_dir, module), dest)
            with open(os.path.join(stage, "etc/keel/l1.order"), "w") as f:
                f.write("\n".join(order) + "\n")
            with open(os.path.join(stage, "etc/passwd"), "w") as f:
                f.write("root:x:0:0:root:/root:/bin/sh\n")
            run_checked([sys.executable, os.path.join(KIT_SCRIPTS, "mkcpio.py"),
                         "--root", stage, "--out", image, "--node", "dev/console:c:5:1:600",
                         "--node", "dev/null:c:1:3:666"], "packing the L1 initramfs")
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        prune(cache, "l1-base-", 3)
    return image


def write_l1_initrd(base, out_path, run_conf):
    """The cached base archive followed by a small one holding run.conf.

    The kernel unpacks concatenated archives in order, so a run's settings
    cost a few hundred bytes instead of a rebuilt initramfs.
    """
    stage = tempfile.mkdtemp(prefix="l1-run-")
    try:
        os.makedirs(os.path.join(stage, "etc/keel"))
        with open(os.path.join(stage, "etc/keel/run.conf"), "w") as f:
            f.write(run_conf)
        extra = out_path + ".run"
        subprocess.run([sys.executable, os.path.join(KIT_SCRIPTS, "mkcpio.py"),
                        "--root", stage, "--out", extra], check=True)
        with open(out_path, "wb") as out:
            for part in (base, extra):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        os.unlink(extra)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def shell_quote(value):
    return "'" + value.replace("'", "'\\''") + "'"


def make_run_conf(mode, scenarios, l2_vmm, interactive, extra_env):
    lines = [f"KEEL_RUN_MODE={mode}",
             f"KEEL_RUN_SCENARIOS={shell_quote(' '.join(scenarios))}",
             f"KEEL_L2_VMM={shell_quote(l2_vmm)}",
             f"KEEL_INTERACTIVE={1 if interactive else 0}",
             f"KEEL_SCENARIO_TIMEOUT={DEFAULT_SCENARIO_TIMEOUT}"]
    for item in extra_env:
        key, value = item.split("=", 1)
        lines.append(f"export {key}={shell_quote(value)}")
    return "\n".join(lines) + "\n"


def l1_qemu_argv(host_qemu, kit, initrd, payload, serial_args):
    return [host_qemu, "-accel", "tcg,thread=multi", "-cpu", "EPYC", "-smp", "2",
            "-m", "4G", "-M", "q35", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot",
            "-kernel", os.path.join(kit["dir"], "vmlinuz"), "-initrd", initrd,
            "-append", "console=ttyS0 panic=-1 quiet",
            "-drive", f"file={payload},format=raw,if=virtio,readonly=on"] + serial_args


# --- reading L1's console -------------------------------------------------------

class ScenarioRecord:
    def __init__(self, name):
        self.name = name
        self.status = "not-run"
        self.rc = None
        self.reason = "did not run"
        self.attempt = None
        self.reached_l2_userspace = False
        self.secs_l1 = None
        self.secs_host = None
        self.lines = []
        self.begin_host = None
        self.l1_panics = 0  # times L1's kernel panicked or hung while this scenario ran

    def as_json(self):
        return {"status": self.status, "rc": self.rc, "reason": self.reason,
                "attempt": self.attempt, "reached_l2_userspace": self.reached_l2_userspace,
                "secs_guest": self.secs_l1, "secs_host": self.secs_host,
                "interrupted_by_l1_panic": self.l1_panics, "log": f"{self.name}.log"}


def finish_record(record, rc):
    record.rc = rc
    fail_lines = [l for l in record.lines if l.startswith("KEEL-FAIL ")]
    skip_lines = [l for l in record.lines if l.startswith("KEEL-SKIP ")]
    timeout_lines = [l for l in record.lines if l.startswith("KEEL-SCENARIO-TIMEOUT ")]
    if rc == 0:
        record.status, record.reason = "pass", ""
    elif rc == SKIP_RC:
        record.status = "skip"
        record.reason = skip_lines[-1][len("KEEL-SKIP "):] if skip_lines else "skipped"
    elif timeout_lines:
        record.status = "timeout"
        record.reason = timeout_lines[-1]
    else:
        record.status = "fail"
        record.reason = (fail_lines[-1][len("KEEL-FAIL "):] if fail_lines
                         else f"scenario exited with rc={rc}")


L1_PANIC = re.compile(r"^\[\s*\d+\.\d+\] Kernel panic - not syncing")
# L1's runner ends a scenario at its own time limit and says so within
# seconds; an L1 that prints nothing this long after that limit has hung
# (seen under TCG with nested SVM, like the panics) and counts as one.
L1_HANG_GRACE_S = 120


class ConsoleWatcher:
    """Follows an L1 console log while L1 runs; tracks markers."""

    def __init__(self, path, records, attempt, t0):
        self.path = path
        self.records = records
        self.attempt = attempt
        self.t0 = t0
        self.offset = 0
        self.partial = b""
        self.current = None
        self.marks = {}
        self.done = False
        self.kvm_missing = None
        self.payload_failed = None
        self.kernel_panic = None  # L1's own "Kernel panic - not syncing" line
        self.started = []

    def elapsed(self):
        return time.monotonic() - self.t0

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        for raw in lines:
            self.line(raw.decode("utf-8", "replace").rstrip("\r"))

    def flush(self):
        self.poll()
        if self.partial:
            self.line(self.partial.decode("utf-8", "replace").rstrip("\r"))
            self.partial = b""

    def line(self, text):
        t = self.elapsed()
        if self.current is not None:
            self.current.lines.append(text)
        # L1's kernel messages start with a bare timestamp; an L2 guest's
        # console reaches this log only with a "vm| " prefix.
        if self.kernel_panic is None and L1_PANIC.match(text):
            self.kernel_panic = text.strip()
            say(f"[{t:6.1f}s] L1 {self.kernel_panic}")
        if not text.startswith("KEEL-"):
            return
        word = text.split()[0]
        fields = dict(re.findall(r"(\w+)=(\S+)", text))
        if word in ("KEEL-L1-READY", "KEEL-L1-PAYLOAD", "KEEL-L1-KVM", "KEEL-L1-DONE"):
            if word == "KEEL-L1-KVM" and not text.startswith("KEEL-L1-KVM ok"):
                self.kvm_missing = text
            elif word == "KEEL-L1-PAYLOAD" and not text.startswith("KEEL-L1-PAYLOAD ok"):
                self.payload_failed = text
            else:
                self.marks[word] = t
            if word == "KEEL-L1-DONE":
                self.done = True
            say(f"[{t:6.1f}s] {text}")
        elif word == "KEEL-SCENARIO-BEGIN":
            name = text.split()[1]
            record = self.records.get(name)
            if record is not None:
                # A scenario run again after an L1 failure keeps the first
                # attempt's lines above the second's.
                record.lines.append(f"# attempt {self.attempt}, from "
                                    f"{os.path.basename(self.path)}")
                record.lines.append(text)
                record.attempt = self.attempt
                record.reached_l2_userspace = False
                record.begin_host = t
                record.status, record.reason = "error", "L1 stopped during the scenario"
                self.current = record
                self.started.append(name)
            say(f"[{t:6.1f}s] {text}")
        elif word == "KEEL-SCENARIO-END":
            name = text.split()[1]
            record = self.records.get(name)
            if record is not None and record is self.current:
                finish_record(record, int(fields.get("rc", "1")))
                record.secs_l1 = float(fields.get("secs", "0"))
                record.secs_host = round(t - record.begin_host, 1)
            self.current = None
            say(f"[{t:6.1f}s] {text}")
        elif word == "KEEL-L2-READY" and self.current is not None:
            self.current.reached_l2_userspace = True
            say(f"[{t:6.1f}s]   {text}")
        elif word in ("KEEL-FAIL", "KEEL-SKIP", "KEEL-L2-RETRY", "KEEL-SCENARIO-TIMEOUT",
                      "KEEL-PASS", "KEEL-L1-WARN"):
            say(f"[{t:6.1f}s]   {text}")


def stop_process(proc, grace=5.0):
    """Ends a child we started: SIGTERM, then SIGKILL after grace seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_l1_attempt(args, kit, attempt, scenarios, records, payload, base_initrd,
                   deadline):
    out = args.out
    log = os.path.join(out, f"L1-attempt{attempt}.log")
    qemu_log = os.path.join(out, f"L1-attempt{attempt}.qemu.log")
    initrd = os.path.join(out, f"l1-attempt{attempt}.cpio.gz")
    for path in (log, qemu_log):
        if os.path.exists(path):
            os.unlink(path)
    # The log exists even if QEMU dies before opening it.
    open(log, "wb").close()
    write_l1_initrd(base_initrd, initrd,
                    make_run_conf("run", scenarios, args.l2_vmm, False, args.env))
    argv = l1_qemu_argv(args.host_qemu, kit, initrd, payload, ["-serial", f"file:{log}"])
    budget = sum(scenario_timeout(n) for n in scenarios) + args.boot_timeout + 60
    attempt_deadline = min(deadline, time.monotonic() + budget)
    info = {"attempt": attempt, "log": os.path.basename(log),
            "qemu_log": os.path.basename(qemu_log), "scenarios": list(scenarios),
            "argv": argv}
    say(f"L1 attempt {attempt}: {len(scenarios)} scenario(s), "
        f"time limit {attempt_deadline - time.monotonic():.0f} s; console in {log}")
    t0 = time.monotonic()
    watcher = ConsoleWatcher(log, records, attempt, t0)
    with open(qemu_log, "wb") as qemu_out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qemu_out,
                                stderr=subprocess.STDOUT)
        outcome, reason = None, None
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                watcher.poll()
                now = time.monotonic()
                booted = "KEEL-L1-PAYLOAD" in watcher.marks
                # An L1 that reported a missing /dev/kvm or payload powers
                # itself off; the boot time limit covers one that does not.
                if not booted and now - t0 > args.boot_timeout:
                    outcome = "boot-failed"
                    reason = (f"L1 did not report KEEL-L1-READY/KVM/PAYLOAD within "
                              f"{args.boot_timeout} s (seen: {sorted(watcher.marks)})")
                    break
                current = watcher.current
                if current is not None and current.begin_host is not None:
                    limit = scenario_timeout(current.name)
                    if now - t0 - current.begin_host > limit + L1_HANG_GRACE_S:
                        outcome = "l1-hang"
                        reason = (f"L1 printed no end of {current.name} {L1_HANG_GRACE_S} s "
                                  f"after its {limit} s limit: L1 hung")
                        break
                if now > attempt_deadline:
                    outcome = "timeout"
                    reason = f"L1 still running after {now - t0:.0f} s; stopped"
                    break
        finally:
            stop_process(proc)
    watcher.flush()
    info["exit_code"] = proc.returncode
    info["duration_s"] = round(time.monotonic() - t0, 1)
    for mark, key in (("KEEL-L1-READY", "l1_ready_s"), ("KEEL-L1-KVM", "kvm_s"),
                      ("KEEL-L1-PAYLOAD", "payload_s"), ("KEEL-L1-DONE", "done_s")):
        if mark in watcher.marks:
            info[key] = round(watcher.marks[mark], 1)
    booted = "KEEL-L1-PAYLOAD" in watcher.marks
    if outcome is None:
        if watcher.kvm_missing:
            outcome, reason = "boot-failed", watcher.kvm_missing
        elif watcher.payload_failed:
            outcome, reason = "boot-failed", watcher.payload_failed
        elif not booted:
            outcome = "boot-failed"
            reason = (f"L1 exited (QEMU rc={proc.returncode}) before it was ready "
                      f"(seen: {sorted(watcher.marks)})")
        elif not watcher.done and watcher.kernel_panic:
            outcome = "l1-panic"
            reason = (f"L1's kernel panicked ({watcher.kernel_panic}) before KEEL-L1-DONE; "
                      f"QEMU rc={proc.returncode}")
        elif not watcher.done:
            outcome = "died"
            reason = f"L1 exited (QEMU rc={proc.returncode}) before KEEL-L1-DONE"
        else:
            outcome, reason = "ok", ""
    if outcome == "timeout" and not booted:
        outcome = "boot-failed"
    info["outcome"], info["reason"] = outcome, reason
    for name in scenarios:
        record = records[name]
        if record.attempt == attempt and record.status == "error":
            record.reason = f"L1 attempt {attempt} ended during the scenario: {reason}"
            if outcome in ("l1-panic", "l1-hang"):
                record.l1_panics += 1
    if outcome != "ok":
        say(f"L1 attempt {attempt}: {outcome}: {reason}")
        tail = read_tail(log, 15)
        if tail:
            say("last lines of the L1 console:\n" + tail)
    return info


def read_tail(path, count):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").replace("\r", "").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-count:])


def write_results(args, mode, mode_reason, kit, records, attempts, started):
    counts = {}
    for record in records.values():
        counts[record.status] = counts.get(record.status, 0) + 1
        with open(os.path.join(args.out, f"{record.name}.log"), "w") as f:
            f.write(f"# scenario {record.name}: {record.status}"
                    f"{' - ' + record.reason if record.reason else ''}\n")
            for line in record.lines:
                f.write(line + "\n")
    results = {
        "mode": mode, "mode_reason": mode_reason,
        "kit": {"dir": kit["dir"], "id": kit.get("KEEL_KIT_ID")},
        "binaries": args.binary, "l2_vmm": args.l2_vmm,
        "started": started, "duration_s": round(time.monotonic() - args.t0, 1),
        "attempts": attempts,
        "scenarios": {name: r.as_json() for name, r in records.items()},
        "summary": counts,
    }
    tmp = os.path.join(args.out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, os.path.join(args.out, "results.json"))
    return results


def run_nested(args, kit, scenarios, records):
    args.host_qemu = which_or_die(os.environ.get("KEEL_HOST_QEMU", "qemu-system-x86_64"),
                                  "qemu-system-x86")
    qemu_for_l2 = shutil.which(os.environ.get("KEEL_L2_QEMU", "qemu-system-x86_64"))
    if args.l2_vmm == "qemu" and not qemu_for_l2:
        raise HarnessError("qemu-system-x86_64 for L2 not found (install qemu-system-x86)")
    payload = pin_payload(build_payload(kit, args.binary, qemu_for_l2), args.out)
    base_initrd = build_l1_base_initrd(kit)
    deadline = args.t0 + args.timeout
    attempts = []
    pending = list(scenarios)
    for attempt in (1, 2, 3):
        info = run_l1_attempt(args, kit, attempt, pending, records, payload, base_initrd,
                              deadline)
        attempts.append(info)
        # A scenario is run again only if L1 failed under it before its L2
        # guest reached userspace; one that got that far has its verdict.
        # The exception is L1's own kernel panicking (seen under both L2
        # VMMs: nested SVM under TCG, tests/system/README.md): that is the
        # test host failing, not the scenario, so the scenario it cut short
        # runs again in a fresh L1, once; a second panic under it stands.
        retry = [n for n in pending
                 if records[n].status in ("not-run", "error")
                 and (not records[n].reached_l2_userspace
                      or (records[n].status == "error" and records[n].l1_panics == 1
                          and records[n].attempt == attempt))]
        if info["outcome"] == "ok" or not retry:
            break
        # A third L1 only after a kernel panic in the second.
        if attempt == 3 or (attempt == 2 and info["outcome"] not in ("l1-panic", "l1-hang")):
            break
        if time.monotonic() + args.boot_timeout > deadline:
            say("no time left for a second L1 attempt")
            break
        say(f"retrying in a fresh L1: {' '.join(retry)}")
        pending = retry
    for name in pending:
        record = records[name]
        if record.status == "not-run":
            record.status = "error"
            record.reason = "; ".join(f"L1 attempt {a['attempt']}: {a['outcome']}: {a['reason']}"
                                      for a in attempts if a["outcome"] != "ok") or "not run"
    return attempts


def run_direct(args, kit, scenarios, records):
    """Runs the scenarios on this host; it has real hardware virtualization."""
    work = os.path.join(args.out, "direct")
    shutil.rmtree(work, ignore_errors=True)
    bin_dir = os.path.join(work, "bin")
    os.makedirs(bin_dir)
    qemu = shutil.which(os.environ.get("KEEL_L2_QEMU", "qemu-system-x86_64"))
    for binary in ([qemu] if qemu else []) + args.binary:
        os.symlink(os.path.abspath(binary), os.path.join(bin_dir, os.path.basename(binary)))
    build_assets(os.path.join(work, "assets"))
    env = dict(os.environ, KEEL_HOST_MODE="direct", KEEL_KIT=kit["dir"],
               KEEL_SYSTEM_DIR=SYSTEM_DIR, KEEL_ASSETS=os.path.join(work, "assets"),
               KEEL_BIN=bin_dir, KEEL_L2_VMM=args.l2_vmm)
    for item in args.env:
        key, value = item.split("=", 1)
        env[key] = value
    log_path = os.path.join(args.out, "direct.log")
    with open(log_path, "w") as log:
        for name in scenarios:
            record = records[name]
            workdir = os.path.join(work, "work", name)
            os.makedirs(workdir)
            timeout = scenario_timeout(name)
            record.attempt = 1
            record.lines = [f"# direct mode on this host, workdir {workdir}",
                            f"KEEL-SCENARIO-BEGIN {name} timeout={timeout}"]
            say(f"KEEL-SCENARIO-BEGIN {name} timeout={timeout}")
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [BUSYBOX, "sh", os.path.join(SCENARIO_DIR, name + ".sh")],
                cwd=workdir, env=dict(env, KEEL_SCENARIO=name, KEEL_WORKDIR=workdir),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True)
            try:
                output, _ = proc.communicate(timeout=timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                # The scenario runs in its own session: its process group is
                # everything it started.
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    output, _ = proc.communicate(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    output, _ = proc.communicate()
                output += f"\nKEEL-SCENARIO-TIMEOUT {name} after={timeout}\n".encode()
                rc = 124
            text = output.decode("utf-8", "replace").replace("\r", "")
            record.lines += text.splitlines()
            record.reached_l2_userspace = any(l.startswith("KEEL-L2-READY")
                                              for l in record.lines)
            finish_record(record, rc)
            record.secs_host = record.secs_l1 = round(time.monotonic() - t0, 1)
            end = f"KEEL-SCENARIO-END {name} rc={rc} secs={record.secs_host}"
            record.lines.append(end)
            log.write("\n".join(record.lines) + "\n")
            say(end)
    return [{"attempt": 1, "log": os.path.basename(log_path), "outcome": "ok", "reason": ""}]


def cmd_run(args):
    args.t0 = time.monotonic()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    for item in args.env:
        if "=" not in item or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", item):
            raise HarnessError(f"--env {item!r}: want NAME=VALUE")
    args.binary = [os.path.abspath(b) for b in args.binary]
    for binary in args.binary:
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            raise HarnessError(f"--binary {binary}: not an executable file")
    kit = load_kit(args.kit)
    scenarios = resolve_scenarios(args.scenario)
    if not scenarios:
        raise HarnessError(f"no scenarios in {SCENARIO_DIR}")
    mode, reason = choose_mode(args.mode)
    say(f"mode: {mode} ({reason})")
    os.makedirs(args.out, exist_ok=True)
    args.out = os.path.abspath(args.out)
    for stale in ("results.json",) + tuple(f"{n}.log" for n in list_scenarios()):
        if os.path.exists(os.path.join(args.out, stale)):
            os.unlink(os.path.join(args.out, stale))
    if args.timeout is None:
        total = sum(scenario_timeout(n) for n in scenarios)
        args.timeout = 2 * args.boot_timeout + total + 120
    records = {name: ScenarioRecord(name) for name in scenarios}
    if mode == "nested":
        attempts = run_nested(args, kit, scenarios, records)
    else:
        attempts = run_direct(args, kit, scenarios, records)
    results = write_results(args, mode, reason, kit, records, attempts, started)
    for name, record in records.items():
        secs = f"{record.secs_host:.1f} s" if record.secs_host is not None else "-"
        say(f"{record.status.upper():8} {name} ({secs})"
            f"{': ' + record.reason if record.reason else ''}")
    counts = results["summary"]
    failed = sum(v for k, v in counts.items() if k not in ("pass", "skip"))
    say(f"{counts.get('pass', 0)} passed, {failed} failed, {counts.get('skip', 0)} skipped "
        f"in {results['duration_s']} s; results in {os.path.join(args.out, 'results.json')}")
    l1_never_ran = mode == "nested" and all(a["outcome"] == "boot-failed" for a in attempts)
    if l1_never_ran:
        return 2
    if args.fixture:
        return 0
    return 1 if failed else 0


def choose_mode(requested):
    detected, reason = detect_mode()
    if requested == "auto":
        return detected, reason
    if requested == "direct" and detected != "direct":
        if os.environ.get("KEEL_HARNESS_FORCE_MODE") != "1":
            raise HarnessError(f"--mode direct needs real VT-x/AMD-V: {reason} "
                               "(KEEL_HARNESS_FORCE_MODE=1 forces it, to test the harness)")
        return requested, f"forced by KEEL_HARNESS_FORCE_MODE=1 although {reason}"
    if requested == detected:
        return requested, reason
    return requested, f"requested with --mode {requested} ({reason})"


def cmd_check(args):
    results_path = os.path.join(args.out, "results.json")
    try:
        with open(results_path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        print(f"FAIL {args.name}: no results in {results_path} ({e}); "
              "did the system.l1 run happen?")
        return 1
    record = results["scenarios"].get(args.name)
    if record is None:
        print(f"FAIL {args.name}: not part of the run in {args.out} "
              f"(ran: {', '.join(results['scenarios'])})")
        return 1
    secs = record.get("secs_host")
    where = f"attempt {record.get('attempt')}, {results['mode']} mode"
    if record["status"] == "pass":
        print(f"PASS {args.name} ({secs} s, {where})")
        return 0
    if record["status"] == "skip":
        print(f"SKIP {args.name}: {record['reason']}")
        return SKIP_RC
    print(f"FAIL {args.name} [{record['status']}]: {record['reason']}")
    print(f"reached L2 userspace: {record['reached_l2_userspace']}; {where}")
    log_path = os.path.join(args.out, record["log"])
    print(f"----- last lines of {log_path} -----")
    print(read_tail(log_path, args.lines))
    for attempt in results.get("attempts", []):
        if attempt.get("outcome") != "ok":
            print(f"----- L1 attempt {attempt['attempt']}: {attempt['outcome']}: "
                  f"{attempt['reason']} ({os.path.join(args.out, attempt['log'])}) -----")
            print(read_tail(os.path.join(args.out, attempt["log"]), 20))
    return 1


def find_keel_vmm(binaries):
    """keel-vmm from --binary, else the newest one under the repository's build*/."""
    for binary in binaries:
        if os.path.basename(binary) == "keel-vmm":
            return binaries
    found = []
    for entry in os.listdir(REPO_ROOT):
        top = os.path.join(REPO_ROOT, entry)
        if not (entry.startswith("build") and os.path.isdir(top)):
            continue
        for root, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d not in ("kit", "CMakeFiles", "_deps")]
            if "keel-vmm" in files:
                path = os.path.join(root, "keel-vmm")
                if os.access(path, os.X_OK):
                    found.append(path)
    if not found:
        raise HarnessError("--vmm keel needs keel-vmm: pass --binary PATH or build it "
                           f"under {REPO_ROOT}/build")
    newest = max(found, key=os.path.getmtime)
    say(f"using {newest} (pass --binary to choose another)")
    return binaries + [newest]


def cmd_demo(args):
    kit = load_kit(args.kit)
    mode, reason = choose_mode(args.mode)
    if args.l2_vmm == "keel":
        args.binary = find_keel_vmm([os.path.abspath(b) for b in args.binary])
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    timeout = args.timeout or (3600 if interactive else 600)
    print(f"harness: demo in {mode} mode ({reason}); "
          f"{'interactive' if interactive else 'not interactive: the guest powers off after its summary'}; "
          f"time limit {timeout} s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    if mode == "direct":
        env = dict(os.environ, KEEL_KIT=kit["dir"], KEEL_SYSTEM_DIR=SYSTEM_DIR,
                   KEEL_SCENARIO="demo", KEEL_WORKDIR=os.path.join(args.out, "demo"),
                   KEEL_L2_VMM=args.l2_vmm, KEEL_HOST_MODE="direct")
        disk = (f"--disk {shell_quote(os.path.join(kit['dir'], 'data.ext4'))} "
                if args.l2_vmm == "qemu" else "")
        script = (f". {shell_quote(os.path.join(SYSTEM_DIR, 'lib.sh'))}; "
                  f"l2_run_foreground --cpus {args.cpus} --mem {args.memory} --verbose "
                  f"{disk}--cmdline 'keel.demo=1 keel.shell={1 if interactive else 0}'")
        for binary in args.binary:
            env["PATH"] = os.path.dirname(os.path.abspath(binary)) + ":" + env["PATH"]
        argv = [BUSYBOX, "sh", "-c", script]
    else:
        host_qemu = which_or_die("qemu-system-x86_64", "qemu-system-x86")
        qemu_for_l2 = shutil.which("qemu-system-x86_64")
        payload = build_payload(kit, [os.path.abspath(b) for b in args.binary], qemu_for_l2)
        base = build_l1_base_initrd(kit)
        initrd = os.path.join(args.out, "l1-demo.cpio.gz")
        write_l1_initrd(base, initrd, make_run_conf(
            "demo", [], args.l2_vmm, interactive,
            args.env + [f"KEEL_DEMO_CPUS={args.cpus}", f"KEEL_DEMO_MEM_MIB={args.memory}"]))
        log = os.path.join(args.out, "demo-L1.log")
        # stdio is multiplexed with the QEMU monitor: Ctrl-A X quits.
        serial = ["-chardev", f"stdio,id=console,mux=on,signal=off,logfile={log}",
                  "-serial", "chardev:console", "-mon", "chardev=console"]
        argv = l1_qemu_argv(host_qemu, kit, initrd, payload, serial)
        if interactive:
            print("harness: Ctrl-A X ends the demo at any time", flush=True)
    proc = subprocess.Popen(argv, env=env if mode == "direct" else None)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"\nharness: demo still running after {timeout} s; stopping it", flush=True)
        stop_process(proc)
        return 1
    except KeyboardInterrupt:
        stop_process(proc)
        return 130
    if mode == "nested":
        tail = read_tail(os.path.join(args.out, "demo-L1.log"), 400)
        match = re.search(r"^KEEL-L1-DEMO-END rc=(\d+)", tail, re.M)
        rc = int(match.group(1)) if match else 1
        print(f"\nharness: demo {'finished' if rc == 0 else 'failed'} (L2 VMM rc="
              f"{match.group(1) if match else 'unknown'}); L1 console log: "
              f"{os.path.join(args.out, 'demo-L1.log')}", flush=True)
    return rc


def cmd_mode(_args):
    mode, reason = detect_mode()
    print(f"{mode}: {reason}")
    return 0


def cmd_list(_args):
    for name in list_scenarios():
        print(f"{name}\t(timeout {scenario_timeout(name)} s)")
    return 0


def main(argv):
    parser = argparse.ArgumentParser(
        prog="harness.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--kit", required=True, help="guest kit directory (build-kit.sh output)")
        p.add_argument("--binary", action="append", default=[], metavar="PATH",
                       help="binary to carry into L1 with its libraries (repeatable); "
                            "scenarios find it in $KEEL_BIN and on PATH")
        p.add_argument("--mode", choices=["auto", "nested", "direct"], default="auto",
                       help="nested: L1 under TCG; direct: on this host (needs VT-x/AMD-V)")
        p.add_argument("--l2-vmm", "--vmm", dest="l2_vmm", choices=["qemu", "keel"],
                       default="qemu", help="VMM that boots L2 guests (KEEL_L2_VMM)")
        p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                       help="extra environment for scenarios (e.g. KEEL_L2_VERBOSE=1)")

    run = sub.add_parser("run", help="boot one L1 and run scenarios in it")
    common(run)
    run.add_argument("--out", required=True, help="directory for logs and results.json")
    run.add_argument("--scenario", action="append", default=[], metavar="NAME",
                     help="scenario to run (repeatable; default: all)")
    run.add_argument("--timeout", type=float, default=None,
                     help="wall-time limit for the whole run, retry included (seconds)")
    run.add_argument("--boot-timeout", type=float, default=120,
                     help="time for L1 to load KVM and mount its payload (seconds)")
    run.add_argument("--fixture", action="store_true",
                     help="exit 0 once results are written, unless L1 never booted "
                          "(scenario verdicts are left to 'check')")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="exit 0 if scenario NAME passed in a run")
    check.add_argument("--out", required=True)
    check.add_argument("--lines", type=int, default=60, help="log lines shown on failure")
    check.add_argument("name")
    check.set_defaults(func=cmd_check)

    demo = sub.add_parser("demo", help="show a real guest's console on this terminal")
    common(demo)
    demo.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "keel-demo"))
    demo.add_argument("--timeout", type=float, default=None,
                      help="wall-time limit (default 3600 s with a terminal, else 600 s)")
    demo.add_argument("--cpus", type=int, default=2, help="guest vCPUs")
    demo.add_argument("--memory", type=int, default=512, help="guest memory in MiB")
    demo.set_defaults(func=cmd_demo)

    sub.add_parser("mode", help="print which mode 'auto' picks, and why").set_defaults(
        func=cmd_mode)
    sub.add_parser("list", help="list scenarios").set_defaults(func=cmd_list)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HarnessError as e:
        print(f"harness: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
