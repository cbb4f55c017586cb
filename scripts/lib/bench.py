#!/usr/bin/env python3
"""kmsfs benchmark: kmsfs side by side with gocryptfs, securefs and libfuse's passthrough_ll.

Run through scripts/bench, which installs the peers and builds kmsfs (release) and passthrough_ll first.

Every filesystem keeps its backing directory on one tmpfs. Each run goes through every workload, and each
workload through every filesystem in turn (interleaved), every step on a fresh mount after dropping the page
cache. A table of medians over the runs follows, with kmsfs's ratio to the best of gocryptfs and securefs
(above 1 means kmsfs is better, for rates and for times alike).

Sections (--sections, comma-separated; default: core,tree,files,memory):
  core     sequential write and read, fio 4 KiB random read and write (psync, buffered, 1 and 4 jobs)
  tree     untar, ls -lR, cat of every file and rm -rf of a tarball of /usr/include
  files    create, stat and unlink of --files empty files in one directory
  memory   daemon RSS idle, after the sequential write, with 1,000 files held open
  scale    kmsfs (and gocryptfs) with the daemon's open-file limit at 1,024: create, list, stat, read and
           remove trees of --scale-counts files (default 1000,100000,1000000), microseconds per file
  kms      kmsfs with the AWS provider against moto's KMS-protocol server behind a proxy adding
           --kms-latency milliseconds per call: creates, untar, parallel opens, rewrap, memory
  shared   several hosts on one volume: a JuiceFS volume (Redis metadata, local object store) mounted by two
           clients, kmsfs --shared and gocryptfs -sharedstorage on it from both: throughput of one host and
           of two hosts at once, writing and reading (--shared-mib per host) and creating small files
"""
import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KMSFS = os.environ.get("KMSFS_BIN", os.path.join(ROOT, ".build/release/kmsfs"))
PASSTHROUGH = os.environ.get("PASSTHROUGH_LL", os.path.join(ROOT, ".build/bench/passthrough_ll"))
TICKS = os.sysconf("SC_CLK_TCK")
PEERS = ("gocryptfs", "securefs")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, **kw)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def is_mounted(path):
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


def proc_cpu(pid):
    """User + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def proc_mem(pid, field):
    """VmRSS or VmHWM of a process, MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def nofile_limit(n):
    def apply():
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    return apply


# ---------------------------------------------------------------------------------------------- filesystems

class Filesystem:
    """One filesystem under test: its backing directory, its mount point and its daemon."""
    name = "?"

    def __init__(self, work, nofile=None, env=None):
        self.base = os.path.join(work, self.name)
        self.cipher = os.path.join(self.base, "cipher")
        self.mnt = os.path.join(self.base, "mnt")
        self.nofile = nofile
        self.env = dict(os.environ, **(env or {}))
        self.proc = None
        os.makedirs(self.cipher, exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)

    def create(self):
        pass

    def command(self):
        raise NotImplementedError

    def mount(self):
        self.log = open(os.path.join(self.base, "daemon.log"), "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=self.log, env=self.env,
                                     preexec_fn=nofile_limit(self.nofile) if self.nofile else None)
        deadline = time.time() + 60
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before mounting; see {self.log.name}")
            if time.time() > deadline:
                raise RuntimeError(f"{self.name} did not mount within 60 s")
            time.sleep(0.01)
        return self.proc.pid

    @property
    def pid(self):
        return self.proc.pid

    def unmount(self):
        if self.proc is None:
            return
        for attempt in range(100):
            if subprocess.run(["umount", self.mnt], stderr=subprocess.DEVNULL).returncode == 0 or not is_mounted(self.mnt):
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", self.mnt])
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self.log.close()


class Passthrough(Filesystem):
    name = "passthrough"

    def command(self):
        return [PASSTHROUGH, "-f", "-o", "source=" + self.cipher, self.mnt]


class Gocryptfs(Filesystem):
    name = "gocryptfs"

    def create(self):
        sh(["gocryptfs", "-q", "-init", "-extpass", "echo bench-password", "-scryptn", "10", self.cipher],
           stdout=subprocess.DEVNULL)

    def command(self):
        return ["gocryptfs", "-q", "-fg", "-extpass", "echo bench-password", self.cipher, self.mnt]


class Securefs(Filesystem):
    name = "securefs"

    def create(self):
        # The lite format with 4 KiB blocks; a cheap password hash, since mounting is not what is measured.
        sh(["securefs", "create", "--format", "4", "--block-size", "4096", "--pbkdf", "pkcs5-pbkdf2-hmac-sha256",
            "-r", "1000", "--pass", "bench-password", self.cipher], stdout=subprocess.DEVNULL)

    def command(self):
        return ["securefs", "mount", "--pass", "bench-password", self.cipher, self.mnt]


class Kmsfs(Filesystem):
    name = "kmsfs"

    def __init__(self, work, nofile=None, env=None, init_args=(), mount_args=()):
        super().__init__(work, nofile, env)
        self.env.setdefault("XDG_CONFIG_HOME", os.path.join(self.base, "config"))
        self.init_args = list(init_args)
        self.mount_args = list(mount_args)

    def create(self):
        sh([KMSFS, "init"] + self.init_args + [self.cipher], stdout=subprocess.DEVNULL, env=self.env)

    def command(self):
        return [KMSFS, "mount", "-f"] + self.mount_args + [self.cipher, self.mnt]


class KmsfsWriteback(Kmsfs):
    """kmsfs with its opt-in kernel writeback cache (--writeback-cache)."""
    name = "kmsfs-wb"

    def command(self):
        return [KMSFS, "mount", "-f", "--writeback-cache"] + self.mount_args + [self.cipher, self.mnt]


class KmsfsPlaintextNames(Kmsfs):
    """kmsfs on a volume made with --plaintext-names: what name encryption costs."""
    name = "kmsfs-pn"

    def create(self):
        sh([KMSFS, "init", "--plaintext-names"] + self.init_args + [self.cipher], stdout=subprocess.DEVNULL, env=self.env)


ALL = [Passthrough, Gocryptfs, Securefs, Kmsfs, KmsfsWriteback, KmsfsPlaintextNames]


# ---------------------------------------------------------------------------------------------- workloads

class Step:
    """One measurement on a fresh mount: `run(fs)` returns {metric: value}; the daemon's CPU seconds are added."""

    def __init__(self, title, run, prepare=None, cleanup=None, cpu_metric=None):
        self.title, self.run, self.prepare, self.cleanup, self.cpu_metric = title, run, prepare, cleanup, cpu_metric


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def helper(*args):
    """Runs this file's helper mode in a separate process; returns its JSON output."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--helper"] + [str(a) for a in args],
                         check=True, stdout=subprocess.PIPE).stdout
    return json.loads(out)


def fio(fs, name, rw, jobs, size_mib, extra=()):
    """fio 4 KiB psync, buffered, `jobs` jobs each on its own file of size_mib / jobs. Returns IOPS over the
    whole job, end_fsync included (measured around fio, so a write-back cache cannot hide its flush)."""
    cmd = ["fio", "--name=" + name, "--directory=" + fs.mnt, "--ioengine=psync", "--bs=4k", "--rw=" + rw,
           "--direct=0", "--numjobs=%d" % jobs, "--size=%dm" % (size_mib // jobs), "--group_reporting",
           "--output-format=json", "--fallocate=none"] + list(extra)
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE).stdout
    wall = time.perf_counter() - t
    data = json.loads(out[out.index(b"{"):])
    job = data["jobs"][0]
    ios = job["read"]["total_ios"] + job["write"]["total_ios"]
    return ios / wall


def fio_layout(fs, name, jobs, size_mib):
    subprocess.run(["fio", "--name=" + name, "--directory=" + fs.mnt, "--ioengine=psync", "--bs=1m", "--rw=write",
                    "--numjobs=%d" % jobs, "--size=%dm" % (size_mib // jobs), "--end_fsync=1",
                    "--fallocate=none"], check=True, stdout=subprocess.DEVNULL)


def core_steps(a):
    size = a.size_mib
    nbytes = size * 1024 * 1024

    def seqwrite(fs):
        t = timed(lambda: sh(["dd", "if=/dev/zero", "of=" + fs.mnt + "/big", "bs=1M", "count=%d" % size, "conv=fsync",
                              "status=none"]))
        return {"seq write 1 GiB, MiB/s" if size == 1024 else "seq write %d MiB, MiB/s" % size: nbytes / t / 2**20,
                "_rss_write": proc_mem(fs.pid, "VmHWM")}

    def seqread(fs):
        t = timed(lambda: sh(["dd", "if=" + fs.mnt + "/big", "of=/dev/null", "bs=1M", "status=none"]))
        return {"seq read, MiB/s": nbytes / t / 2**20}

    def rm_big(fs):
        os.unlink(fs.mnt + "/big")

    fio_mib = a.fio_mib
    steps = [
        Step("seq write", seqwrite, cpu_metric="CPU s, seq write"),
        Step("seq read", seqread, cleanup=rm_big, cpu_metric="CPU s, seq read"),
        Step("fio randread 1 job", lambda fs: {"fio randread 4 KiB, 1 job, IOPS": fio(fs, "r1", "randread", 1, fio_mib)},
             prepare=lambda fs: fio_layout(fs, "r1", 1, fio_mib), cpu_metric="CPU s, randread 1 job"),
        Step("fio randread 4 jobs", lambda fs: {"fio randread 4 KiB, 4 jobs, IOPS": fio(fs, "r4", "randread", 4, fio_mib)},
             prepare=lambda fs: fio_layout(fs, "r4", 4, fio_mib), cpu_metric="CPU s, randread 4 jobs"),
        Step("fio randwrite 1 job", lambda fs: {"fio randwrite 4 KiB, 1 job, IOPS": fio(fs, "r1", "randwrite", 1, fio_mib, ["--end_fsync=1"])},
             cpu_metric="CPU s, randwrite 1 job"),
        Step("fio randwrite 4 jobs", lambda fs: {"fio randwrite 4 KiB, 4 jobs, IOPS": fio(fs, "r4", "randwrite", 4, fio_mib, ["--end_fsync=1"])},
             cleanup=lambda fs: [os.unlink(os.path.join(fs.mnt, n)) for n in os.listdir(fs.mnt) if n.startswith(("r1.", "r4."))],
             cpu_metric="CPU s, randwrite 4 jobs"),
    ]
    return steps


def tree_steps(a):
    tar = a.tarball

    def untar(fs):
        return {"untar /usr/include, s": timed(lambda: sh(["tar", "-xf", tar, "-C", fs.mnt]))}

    def lsr(fs):
        return {"ls -lR, s": timed(lambda: sh("ls -lR %s/usr >/dev/null" % fs.mnt))}

    def cat(fs):
        return {"cat every file, s": timed(lambda: sh("find %s/usr -type f -print0 | xargs -0 cat >/dev/null" % fs.mnt))}

    def rmrf(fs):
        return {"rm -rf the tree, s": timed(lambda: sh(["rm", "-rf", fs.mnt + "/usr"]))}

    return [Step("untar", untar, cpu_metric="CPU s, untar"), Step("ls -lR", lsr, cpu_metric="CPU s, ls -lR"),
            Step("cat", cat, cpu_metric="CPU s, cat"), Step("rm -rf", rmrf, cpu_metric="CPU s, rm -rf")]


def files_steps(a):
    n = a.files

    def create(fs):
        return {"create %d empty files, s" % n: helper("create", fs.mnt + "/small", n)["seconds"]}

    def stat(fs):
        return {"stat %d files, s" % n: helper("stat", fs.mnt + "/small", n)["seconds"]}

    def unlink(fs):
        return {"unlink %d files, s" % n: helper("unlink", fs.mnt + "/small", n)["seconds"]}

    return [Step("create", create, cpu_metric="CPU s, create"), Step("stat", stat, cpu_metric="CPU s, stat"),
            Step("unlink", unlink, cpu_metric="CPU s, unlink")]


def memory_steps(a):
    def idle(fs):
        time.sleep(0.5)
        return {"RSS idle, MiB": proc_mem(fs.pid, "VmRSS")}

    def held(fs):
        r = helper("hold", fs.mnt + "/held", 1000, fs.pid)
        return {"RSS with 1,000 files open, MiB": r["rss"]}

    return [Step("idle", idle), Step("1000 open", held, cleanup=lambda fs: shutil.rmtree(fs.mnt + "/held"))]


# ---------------------------------------------------------------------------------------------- running

LOWER_IS_BETTER = (", s", "MiB", "CPU s")


def lower_is_better(metric):
    return metric.endswith(", s") or "MiB" in metric and "/s" not in metric or metric.startswith("CPU s")


def run_matrix(a, filesystems, steps):
    """Runs every step on every filesystem, a.runs times, interleaved, each run in a rotated order.
    Returns {metric: {fs: [values]}}."""
    results = {}
    if a.steps:
        wanted = [w.strip() for w in a.steps.split(",")]
        steps = [s for s in steps if any(s.title.startswith(w) for w in wanted)]
    for r in range(a.runs):
        # Each run starts with another filesystem: on a virtual machine that hands freed memory back to its host,
        # whoever allocates first in a step finds warmer memory than those after it.
        order = filesystems[r % len(filesystems):] + filesystems[:r % len(filesystems)]
        for step in steps:
            for fs in order:
                if step.prepare:
                    fs.mount()
                    step.prepare(fs)
                    fs.unmount()
                drop_caches()
                fs.mount()
                cpu0 = proc_cpu(fs.pid)
                values = step.run(fs)
                if step.cpu_metric:
                    values[step.cpu_metric] = proc_cpu(fs.pid) - cpu0
                if step.cleanup:
                    step.cleanup(fs)
                fs.unmount()
                for k, v in values.items():
                    results.setdefault(k, {}).setdefault(fs.name, []).append(v)
                log("run %d  %-22s %-12s %s" % (r + 1, step.title, fs.name,
                                                 "  ".join("%s=%.4g" % (k, v) for k, v in values.items() if not k.startswith("_"))))
    return results


def fmt(v):
    if v != v:
        return "-"
    if abs(v) >= 1000:
        return "{:,.0f}".format(v)
    if abs(v) >= 100:
        return "%.0f" % v
    if abs(v) >= 10:
        return "%.1f" % v
    if abs(v) >= 1:
        return "%.2f" % v
    return "%.3f" % v


def print_table(results, names, title):
    print("\n### " + title)
    cols = list(names) + ["kmsfs / best peer"]
    print("| workload | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for metric, per in results.items():
        if metric.startswith("_"):
            continue
        med = {n: statistics.median(per[n]) if n in per else float("nan") for n in names}
        peers = [med[p] for p in PEERS if p in per]
        ratio = ""
        if "kmsfs" in per and peers:
            if lower_is_better(metric):
                best = min(peers)
                ratio = "%.2f×" % (best / med["kmsfs"]) if med["kmsfs"] > 0 else "∞"
            else:
                best = max(peers)
                ratio = "%.2f×" % (med["kmsfs"] / best) if best > 0 else ""
        print("| %s | %s | %s |" % (metric, " | ".join(fmt(med[n]) for n in names), ratio))
    sys.stdout.flush()


def matrix_section(a, work, steps, title):
    filesystems = []
    for cls in ALL:
        if cls.name not in a.fs:
            continue
        fs = cls(work) if not issubclass(cls, Kmsfs) else cls(work, init_args=a.kmsfs_init, mount_args=a.kmsfs_mount)
        fs.create()
        filesystems.append(fs)
    try:
        results = run_matrix(a, filesystems, steps)
    finally:
        for fs in filesystems:
            fs.unmount()
    rw = results.pop("_rss_write", None)
    if rw:
        results["RSS peak during the seq write, MiB"] = rw
    print_table(results, [f.name for f in filesystems], title)
    for fs in filesystems:
        shutil.rmtree(fs.base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- scale

def scale_section(a, work):
    counts = [int(c) for c in a.scale_counts.split(",")]
    print("\n### File-count scaling (daemon open-file limit 1,024; files in directories of 1,000; µs per file)")
    print("| filesystem | files | create | list | stat | read | remove | daemon RSS after stat, MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for cls in (Kmsfs, Gocryptfs):
        if cls.name not in a.scale_fs:
            continue
        for n in counts:
            fs = cls(work, nofile=1024) if cls is Gocryptfs else Kmsfs(work, nofile=1024, init_args=a.kmsfs_init, mount_args=a.kmsfs_mount)
            fs.create()
            row = {}
            try:
                for phase in ("create", "list", "stat", "read", "remove"):
                    drop_caches()
                    fs.mount()
                    r = helper("tree-" + phase, fs.mnt + "/t", n)
                    row[phase] = r["seconds"] / n * 1e6
                    if phase == "stat":
                        row["rss"] = proc_mem(fs.pid, "VmRSS")
                    fs.unmount()
                    log("scale %-9s %8d %-6s %.1f µs/file" % (fs.name, n, phase, row[phase]))
            finally:
                fs.unmount()
                shutil.rmtree(fs.base, ignore_errors=True)
            print("| %s | %s | %s | %s |" % (fs.name, "{:,}".format(n),
                                          " | ".join("%.1f" % row[p] for p in ("create", "list", "stat", "read", "remove")),
                                          fmt(row["rss"])))
            sys.stdout.flush()


# ---------------------------------------------------------------------------------------------- shared

class JuiceFS:
    """A JuiceFS volume with its metadata in a Redis server of its own and two client mounts ("hosts")."""

    def __init__(self, work, juicefs):
        self.base = os.path.join(work, "juicefs")
        os.makedirs(self.base, exist_ok=True)
        self.port = free_port()
        self.redis = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                       "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.redis)
        meta = "redis://127.0.0.1:%d/1" % self.port
        # No trash: deleted files and compacted slices leave the object store (on the bench's tmpfs) at once.
        sh([juicefs, "format", "--trash-days", "0", "--storage", "file", "--bucket", os.path.join(self.base, "bucket") + "/", meta, "bench"],
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.mounts = []
        for i in range(2):
            m = os.path.join(self.base, "client%d" % i)
            os.makedirs(m, exist_ok=True)
            sh([juicefs, "mount", "-d", "--log", m + ".log", meta, m], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.mounts.append(m)

    def close(self):
        for m in self.mounts:
            subprocess.run(["umount", "-l", m], stderr=subprocess.DEVNULL)
        self.redis.terminate()
        self.redis.wait()


class SharedHost(Filesystem):
    """One host's mount of a volume kept on a JuiceFS client mount."""

    def __init__(self, work, name, host, cipher, command):
        self.name = "%s-host%d" % (name, host)
        Filesystem.__init__(self, work)
        self.cipher = cipher
        self._command = command

    def command(self):
        return self._command(self.cipher, self.mnt)


def shared_section(a, work):
    juice = JuiceFS(work, a.juicefs)
    mib = a.shared_mib
    systems = {}
    try:
        kenv = {"XDG_CONFIG_HOME": os.path.join(work, "kmsfs-shared-config"), "KMSFS_KNOWN_VOLUMES": os.path.join(work, "kmsfs-shared-known")}
        os.makedirs(os.path.join(juice.mounts[0], "kmsfs"))
        sh([KMSFS, "init", os.path.join(juice.mounts[0], "kmsfs")], stdout=subprocess.DEVNULL, env=dict(os.environ, **kenv))
        os.makedirs(os.path.join(juice.mounts[0], "gocryptfs"))
        sh(["gocryptfs", "-q", "-init", "-extpass", "echo bench-password", "-scryptn", "10", os.path.join(juice.mounts[0], "gocryptfs")],
           stdout=subprocess.DEVNULL)
        commands = {
            "kmsfs": lambda c, m: [KMSFS, "mount", "-f", "--shared", c, m],
            "gocryptfs": lambda c, m: ["gocryptfs", "-q", "-fg", "-sharedstorage", "-extpass", "echo bench-password", c, m],
        }
        for name, cmd in commands.items():
            hosts = []
            for h in range(2):
                fs = SharedHost(work, name, h, os.path.join(juice.mounts[h], name), cmd)
                if name == "kmsfs":
                    fs.env.update(kenv)
                hosts.append(fs)
            systems[name] = hosts

        def dd_write(path, n):
            return "dd if=/dev/zero of=%s bs=1M count=%d conv=fsync status=none" % (path, n)

        def dd_read(path):
            return "dd if=%s of=/dev/null bs=1M status=none" % path

        def timed_parallel(cmds):
            t = time.perf_counter()
            procs = [subprocess.Popen(c, shell=True, stdout=subprocess.DEVNULL) for c in cmds]
            for p in procs:
                if p.wait() != 0:
                    raise RuntimeError("failed: %s" % cmds)
            return time.perf_counter() - t

        rows = {}
        for run in range(a.runs):
            for name, (h0, h1) in systems.items():
                h0.mount()
                h1.mount()
                try:
                    r = {}
                    r["one host: write, MiB/s"] = mib / timed_parallel([dd_write(h0.mnt + "/one", mib)])
                    drop_caches()
                    r["one host: read, MiB/s"] = mib / timed_parallel([dd_read(h0.mnt + "/one")])
                    r["two hosts: write (each its file), MiB/s in all"] = 2 * mib / timed_parallel(
                        [dd_write(h0.mnt + "/a", mib), dd_write(h1.mnt + "/b", mib)])
                    drop_caches()
                    r["two hosts: read (each the other's), MiB/s in all"] = 2 * mib / timed_parallel(
                        [dd_read(h0.mnt + "/b"), dd_read(h1.mnt + "/a")])
                    n = a.shared_files
                    cmd = "%s %s --helper create-write %s %d 0"
                    r["two hosts: create 100-byte files, files/s in all"] = 2 * n / timed_parallel(
                        [cmd % (sys.executable, os.path.abspath(__file__), h0.mnt + "/d0", n),
                         cmd % (sys.executable, os.path.abspath(__file__), h1.mnt + "/d1", n)])
                    for k, v in r.items():
                        rows.setdefault(k, {}).setdefault(name, []).append(v)
                    log("shared run %d %s: %s" % (run, name, ", ".join("%s %.1f" % (k, v) for k, v in r.items())))
                    for p in ("one", "a", "b"):
                        os.unlink(os.path.join(h0.mnt, p))
                    shutil.rmtree(h0.mnt + "/d0")
                    shutil.rmtree(h1.mnt + "/d1")
                finally:
                    h1.unmount()
                    h0.unmount()
        print("\n### Several hosts on one volume: two JuiceFS clients (Redis metadata, local object store), %d MiB per "
              "host, %d files per host; kmsfs --shared vs gocryptfs -sharedstorage; medians of %d runs" % (mib, a.shared_files, a.runs))
        print("| workload | kmsfs | gocryptfs | kmsfs / gocryptfs |")
        print("|---|---|---|---|")
        for k, by in rows.items():
            km, gc = statistics.median(by["kmsfs"]), statistics.median(by["gocryptfs"])
            print("| %s | %s | %s | %.2f |" % (k, fmt(km), fmt(gc), km / gc))
        sys.stdout.flush()
    finally:
        for hosts in systems.values():
            for h in hosts:
                h.unmount()
        juice.close()


# ---------------------------------------------------------------------------------------------- kms

class Moto:
    def __init__(self, work, python, server):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.python = python
        self.logf = open(os.path.join(work, "moto.log"), "ab")
        self.proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.logf, stderr=self.logf)
        wait_port(self.port, self.proc)

    def env(self, endpoint):
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}

    def create_key(self):
        out = subprocess.run([self.python, "-c", "import boto3; print(boto3.client('kms').create_key()['KeyMetadata']['Arn'])"],
                             env=dict(os.environ, **self.env(self.url)), check=True, stdout=subprocess.PIPE).stdout
        return out.decode().strip()

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class LatencyProxy:
    def __init__(self, work, upstream_port, latency_ms, throttle=0.0, hang_key=None):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.logf = open(os.path.join(work, "proxy-%d.log" % self.port), "ab")
        args = [str(self.port), str(upstream_port), str(latency_ms), str(throttle)] + ([hang_key] if hang_key else [])
        self.proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "kms_latency_proxy.py")]
                                     + args, stdout=self.logf, stderr=self.logf)
        wait_port(self.port, self.proc)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, proc):
    for _ in range(1200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("server on port %d exited" % port)
            time.sleep(0.05)
    raise RuntimeError("server on port %d did not start" % port)


def kms_section(a, work):
    moto = Moto(work, a.moto_python, a.moto_server)
    arn = moto.create_key()
    arn2 = moto.create_key()  # the key rewrap moves files to
    hung = moto.create_key()  # the first key of the volumes whose first key hangs
    proxies = {ms: LatencyProxy(work, moto.port, ms) for ms in sorted({0, a.kms_latency})}
    faulty = {"throttled": LatencyProxy(work, moto.port, 0, throttle=0.2), "hung": LatencyProxy(work, moto.port, 0, hang_key=hung)}
    rows = []

    def volume(ms, tag, fault=None):
        proxy = faulty[fault] if fault else proxies[ms]
        keys = ["--key-id", hung, "--key-id", arn] if fault == "hung" else ["--key-id", arn]
        # The first key must answer DescribeKey at init: init goes straight to moto, mounts through the proxy.
        fs = Kmsfs(os.path.join(work, "kms-%s-%d" % (tag, ms)), env=moto.env(moto.url),
                   init_args=["--kms", "aws"] + keys + a.kmsfs_init, mount_args=a.kmsfs_mount)
        fs.create()
        fs.env = dict(fs.env, **moto.env(proxy.url))
        return fs

    def measure(title, fn, latencies=(0, a.kms_latency), fault=None):
        for ms in latencies:
            values = []
            for r in range(a.runs):
                fs = volume(ms, title.split()[0], fault)
                try:
                    values.append(fn(fs))
                finally:
                    fs.unmount()
                    shutil.rmtree(fs.base, ignore_errors=True)
            rows.append((title, ms, statistics.median(values)))
            log("kms %-40s %3d ms  %.3f" % (title, ms, rows[-1][2]))

    def create1000(fs):
        fs.mount()
        return helper("create", fs.mnt + "/d", 1000)["seconds"]

    def untar(fs):
        fs.mount()
        return timed(lambda: sh(["tar", "-xf", a.tarball, "-C", fs.mnt]))

    def readers(n, made_without_fault=False):
        def run(fs):
            faulty_env = fs.env
            if made_without_fault:
                # The files are made while every key answers (so each is wrapped under both), then read through
                # the faulty proxy.
                fs.env = dict(fs.env, **moto.env(proxies[0].url))
            fs.mount()
            helper("create-write", fs.mnt + "/d", 1000, 0)
            fs.unmount()
            fs.env = faulty_env
            drop_caches()
            fs.mount()
            return helper("read-parallel", fs.mnt + "/d", 1000, n)["per_second"]
        return run

    def rewrap(jobs):
        def run(fs):
            fs.mount()
            helper("create-write", fs.mnt + "/d", 1000, 0)
            fs.unmount()
            extra = ["--jobs", str(jobs)] if jobs else []
            return timed(lambda: sh([KMSFS, "rewrap"] + extra + ["--key-id", arn2, fs.cipher], env=fs.env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return run

    try:
        measure("create 1,000 files in one directory, s", create1000)
        measure("untar /usr/include, s", untar)
        measure("create 1,000 files, no fault, files/s", lambda fs: 1000 / create1000(fs), (0,))
        measure("open+read 1,000 files, 1 reader, files/s", readers(1), (0, a.kms_latency))
        measure("open+read 1,000 files, 8 readers, files/s", readers(8), (a.kms_latency,))
        measure("rewrap 1,000 files, --jobs 1, s", rewrap(1), (a.kms_latency,))
        measure("rewrap 1,000 files, default jobs, s", rewrap(0), (a.kms_latency,))
        # Faults: 20% of calls throttled; the first of two keys never answering (each create and open then
        # goes to the second key; only the first call for the hung key waits for the deadline).
        for fault, what in (("throttled", "20% of calls throttled"), ("hung", "first key hangs")):
            measure("create 1,000 files, %s, files/s" % what, lambda fs: 1000 / create1000(fs), (0,), fault)
            measure("open+read 1,000 files, 1 reader, %s, files/s" % what, readers(1, made_without_fault=True), (0,), fault)

        # Memory under 8 parallel tar processes with a slow KMS, and after removing what they made.
        fs = volume(a.kms_latency, "memory")
        try:
            fs.mount()
            idle = proc_mem(fs.pid, "VmRSS")
            procs = []
            for i in range(8):
                os.mkdir(fs.mnt + "/t%d" % i)
                procs.append(subprocess.Popen(["tar", "-xf", a.tarball, "-C", fs.mnt + "/t%d" % i]))
            for p in procs:
                p.wait()
            during = proc_mem(fs.pid, "VmHWM")
            after_tar = proc_mem(fs.pid, "VmRSS")
            sh(["rm", "-rf"] + [fs.mnt + "/t%d" % i for i in range(8)])
            time.sleep(1)
            after_rm = proc_mem(fs.pid, "VmRSS")
            rows.append(("RSS idle / peak / after 8 parallel untar / after rm -rf, MiB", a.kms_latency,
                         "%s / %s / %s / %s" % (fmt(idle), fmt(during), fmt(after_tar), fmt(after_rm))))
        finally:
            fs.unmount()
            shutil.rmtree(fs.base, ignore_errors=True)

        if a.kms_creates:
            fs = volume(0, "flat")
            try:
                fs.mount()
                marks = []
                done = 0
                for target in (1000, 10000, a.kms_creates):
                    if target <= done:
                        continue
                    helper("create-open", fs.mnt + "/f", target - done, done)
                    done = target
                    time.sleep(0.5)
                    marks.append("%s after %s" % (fmt(proc_mem(fs.pid, "VmRSS")), "{:,}".format(target)))
                rows.append(("RSS after creates+opens (AWS provider), MiB", 0, ", ".join(marks)))
            finally:
                fs.unmount()
                shutil.rmtree(fs.base, ignore_errors=True)
    finally:
        for p in list(proxies.values()) + list(faulty.values()):
            p.stop()
        moto.stop()

    print("\n### kmsfs with AWS KMS (moto behind a latency-adding proxy), medians of %d" % a.runs)
    print("| workload | KMS latency ms | kmsfs |")
    print("|---|---|---|")
    for title, ms, v in rows:
        print("| %s | %d | %s |" % (title, ms, v if isinstance(v, str) else fmt(v)))
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------- helper mode

def helper_main(args):
    """Small timed loops in a process of their own (so the parent's state does not disturb them)."""
    op = args[0]
    if op in ("create", "stat", "unlink"):
        d, n = args[1], int(args[2])
        names = [os.path.join(d, "f%07d" % i) for i in range(n)]
        if op == "create":
            os.makedirs(d, exist_ok=True)
        t = time.perf_counter()
        if op == "create":
            for p in names:
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        elif op == "stat":
            for p in names:
                os.stat(p)
        else:
            for p in names:
                os.unlink(p)
        print(json.dumps({"seconds": time.perf_counter() - t}))
    elif op in ("create-open", "create-write"):
        d, n, start = args[1], int(args[2]), int(args[3])
        os.makedirs(d, exist_ok=True)
        for i in range(start, start + n):
            p = os.path.join(d, "f%07d" % i)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"x" * 100)
            os.close(fd)
            if op == "create-open":
                fd = os.open(p, os.O_RDONLY)
                os.read(fd, 100)
                os.close(fd)
        print(json.dumps({}))
    elif op == "hold":
        d, n, pid = args[1], int(args[2]), int(args[3])
        os.makedirs(d, exist_ok=True)
        fds = []
        for i in range(n):
            fd = os.open(os.path.join(d, "f%04d" % i), os.O_RDWR | os.O_CREAT, 0o644)
            os.write(fd, b"y" * 100)
            fds.append(fd)
        time.sleep(0.2)
        rss = proc_mem(pid, "VmRSS")
        for fd in fds:
            os.close(fd)
        print(json.dumps({"rss": rss}))
    elif op == "read-parallel":
        import threading
        d, n, k = args[1], int(args[2]), int(args[3])
        names = [os.path.join(d, "f%07d" % i) for i in range(n)]

        def work(part):
            for p in part:
                with open(p, "rb") as f:
                    f.read()
        threads = [threading.Thread(target=work, args=(names[i::k],)) for i in range(k)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        print(json.dumps({"per_second": n / (time.perf_counter() - t)}))
    elif op.startswith("tree-"):
        phase, d, n = op[5:], args[1], int(args[2])
        per_dir = 1000
        dirs = (n + per_dir - 1) // per_dir
        t = time.perf_counter()
        if phase == "create":
            os.makedirs(d, exist_ok=True)
            for i in range(dirs):
                sub = os.path.join(d, "d%04d" % i)
                os.mkdir(sub)
                for j in range(min(per_dir, n - i * per_dir)):
                    fd = os.open(os.path.join(sub, "f%04d" % j), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    os.write(fd, b"z" * 64)
                    os.close(fd)
        elif phase == "list":
            count = 0
            for i in range(dirs):
                with os.scandir(os.path.join(d, "d%04d" % i)) as it:
                    count += sum(1 for _ in it)
            assert count == n, (count, n)
        elif phase in ("stat", "read", "remove"):
            for i in range(dirs):
                sub = os.path.join(d, "d%04d" % i)
                for j in range(min(per_dir, n - i * per_dir)):
                    p = os.path.join(sub, "f%04d" % j)
                    if phase == "stat":
                        os.stat(p)
                    elif phase == "read":
                        with open(p, "rb") as f:
                            assert f.read() == b"z" * 64
                    else:
                        os.unlink(p)
                if phase == "remove":
                    os.rmdir(sub)
        print(json.dumps({"seconds": time.perf_counter() - t}))
    else:
        raise SystemExit("unknown helper " + op)


# ---------------------------------------------------------------------------------------------- main

def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--helper":
        helper_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--sections", default="core,tree,files,memory")
    p.add_argument("--fs", default="passthrough,gocryptfs,securefs,kmsfs",
                   help="filesystems to compare; kmsfs-wb is kmsfs with --writeback-cache, kmsfs-pn kmsfs with --plaintext-names")
    p.add_argument("--steps", default="", help="only the steps whose titles start with these (comma-separated)")
    p.add_argument("--size-mib", type=int, default=1024, help="sequential write/read size")
    p.add_argument("--fio-mib", type=int, default=512, help="total size of the fio files")
    p.add_argument("--files", type=int, default=10000)
    p.add_argument("--scale-counts", default="1000,100000,1000000")
    p.add_argument("--scale-fs", default="kmsfs,gocryptfs")
    p.add_argument("--kms-latency", type=int, default=20)
    p.add_argument("--kms-creates", type=int, default=100000, help="creates+opens for the flat-memory check (0: skip)")
    p.add_argument("--kmsfs-init", default="", help="extra kmsfs init arguments (space-separated)")
    p.add_argument("--kmsfs-mount", default="", help="extra kmsfs mount arguments (space-separated)")
    p.add_argument("--tmpfs-gib", type=int, default=12)
    p.add_argument("--moto-python", default=os.environ.get("TEST_PYTHON", "python3"))
    p.add_argument("--moto-server", default=os.environ.get("MOTO_SERVER", "moto_server"))
    p.add_argument("--juicefs", default=os.environ.get("JUICEFS", "juicefs"))
    p.add_argument("--shared-mib", type=int, default=64, help="shared section: MiB each host writes and reads")
    p.add_argument("--shared-files", type=int, default=500, help="shared section: small files each host creates")
    a = p.parse_args()
    a.fs = a.fs.split(",")
    a.scale_fs = a.scale_fs.split(",")
    a.kmsfs_init = a.kmsfs_init.split()
    a.kmsfs_mount = a.kmsfs_mount.split()
    sections = a.sections.split(",")

    work = tempfile.mkdtemp(prefix="kmsfs-bench.", dir="/tmp")
    sh(["mount", "-t", "tmpfs", "-o", "size=%dg" % a.tmpfs_gib, "tmpfs", work])
    ran = []

    def cleanup(*_):
        for line in open("/proc/self/mounts").read().splitlines():
            m = line.split()[1]
            if m.startswith(work + "/"):
                subprocess.run(["umount", "-l", m], stderr=subprocess.DEVNULL)
        subprocess.run(["umount", "-l", work], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        # Touch the memory the runs will use first: on a virtual machine the first write to fresh guest memory is
        # several times slower, and would penalize whichever filesystem happens to run first.
        warm = os.path.join(work, "warm-up")
        sh(["dd", "if=/dev/zero", "of=" + warm, "bs=1M", "count=%d" % min(a.tmpfs_gib * 1024 // 2, 6144), "status=none"])
        os.unlink(warm)
        a.tarball = os.path.join(work, "include.tar")
        sh(["tar", "-cf", a.tarball, "-C", "/", "usr/include"])
        ntree = int(subprocess.run("tar -tf %s | grep -vc '/$'" % a.tarball, shell=True, stdout=subprocess.PIPE).stdout)
        kv = subprocess.run([KMSFS, "--version"], stdout=subprocess.PIPE).stdout.decode().strip()
        gv = subprocess.run(["gocryptfs", "-version"], stdout=subprocess.PIPE).stdout.decode().split(";")[0]
        print("## %s, %s, securefs 0.13 (format 4, 4 KiB blocks), libfuse passthrough_ll; %d cores; backing: one tmpfs; "
              "medians of %d runs, every step on a fresh mount; /usr/include: %d files"
              % (kv, gv, os.cpu_count(), a.runs, ntree))
        if a.kmsfs_init or a.kmsfs_mount:
            print("kmsfs init %s, mount %s" % (" ".join(a.kmsfs_init), " ".join(a.kmsfs_mount)))
        if "core" in sections:
            matrix_section(a, work, core_steps(a), "Sequential and random I/O")
        if "tree" in sections:
            matrix_section(a, work, tree_steps(a), "A tree of small files (/usr/include)")
        if "files" in sections:
            matrix_section(a, work, files_steps(a), "%d empty files in one directory" % a.files)
        if "memory" in sections:
            matrix_section(a, work, memory_steps(a), "Daemon memory")
        if "scale" in sections:
            scale_section(a, work)
        if "kms" in sections:
            kms_section(a, work)
        if "shared" in sections:
            shared_section(a, work)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
