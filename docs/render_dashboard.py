#!/usr/bin/env python3
"""Render docs/dashboard.png: the Grafana dashboard's main panels, drawn from real data.

It runs a real mesh agent with real traffic for a while, has a real Prometheus server scrape the
agent's /metrics every second, then evaluates the dashboard's own PromQL expressions (read from
deploy/grafana-dashboard.json, Grafana variables replaced) over that time with Prometheus'
query_range API and plots them with matplotlib, one subplot per panel, titled as the panel is.

    sudo python3 docs/render_dashboard.py                 # record ~60 s and render
    python3 docs/render_dashboard.py --from-data d.json   # render again from saved query results

Recording needs root (it loads the eBPF programs), the `mesh` binary (cargo build --release),
/usr/bin/prometheus (Debian package `prometheus`) and matplotlib (`pip install matplotlib`).
It touches only what it creates: a cgroup v2 directory (only its own client processes are moved
there; the agent attaches to that cgroup only), a bpffs directory, backends on 127.0.0.1,
VIPs in 127.100.58.0/24, and a temp directory. All of them are removed at the end, also on error
or Ctrl-C. Every loop is bounded in time.

The scenario (times for the default 60 s): clients connect to `web` (3 TCP backends, health
checked), `api` (no backends at first) and `dns` (UDP); at 25% `api` gets two backends; at 40%
web backend 3 stops (connect failures, then health checks eject it); at 55% an invalid config
edit is rejected; at 65% web-3 comes back; at 80% web-1 is drained.
"""

import argparse
import json
import math
import os
import random
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "deploy", "grafana-dashboard.json")

# The panels drawn, in order (titles as in the dashboard; the script fails if one is missing).
PANELS = [
    "Connections/s per backend",
    "No-backend connects/s per service",
    "Bytes/s per service",
    "TCP RTT per service (p50, p99)",
    "Backends: configured and active",
    "Backend health (active checks)",
    "Connect failures/s per backend",
    "Config rejections",
    "Reconcile duration (p50, p99)",
    "Map entries",
    "Health checks/s by outcome",
    "Data path events/s",
]

# How Grafana's variables are replaced: all agents, all services, a 10 s rate window (the
# scrape interval is 1 s), and the recorded range.
RATE_WINDOW = "10s"

VIP_NET = "127.100.58"


# ---------------------------------------------------------------------------------------------
# Clients (run as child processes inside the test cgroup: `--client ...`).


def client_main(kind, addr, base_rate, seconds, payload):
    """Connects (tcp) or sends datagrams (udp) to addr at about base_rate per second, the rate
    swinging by +-40% over 20 s, for `seconds`. Errors (refused connects) are expected."""
    host, port = addr.rsplit(":", 1)
    target = (host, int(port))
    start = time.monotonic()
    done = 0
    data = b"x" * payload + b"\n"
    period = 20.0

    def due(t):
        # The integral of base_rate * (1 + 0.4 sin(2 pi t / period)) from 0 to t.
        swing = 0.4 * period / (2 * math.pi) * (1 - math.cos(2 * math.pi * t / period))
        return base_rate * (t + swing)

    while True:
        now = time.monotonic() - start
        if now >= seconds:
            break
        if done >= due(now):
            time.sleep(0.005)
            continue
        done += 1
        try:
            if kind == "tcp":
                with socket.create_connection(target, timeout=2) as s:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                    while s.recv(65536):
                        pass
            else:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(1)
                    s.sendto(data, target)
                    s.recvfrom(2048)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# Backends (threads in this process, which stays outside the cgroup).


class TcpBackend:
    """Reads one line, answers `<name>\\n` and a body of 200..4000 bytes, closes."""

    def __init__(self, name, port=0):
        self.name = name
        backend = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.settimeout(2)
                try:
                    line = self.request.makefile("rb").readline()
                    if not line:
                        return  # a health check
                    body = b"y" * random.randint(200, 4000)
                    self.request.sendall(backend.name.encode() + b"\n" + body + b"\n")
                except OSError:
                    pass

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        socketserver.ThreadingTCPServer.daemon_threads = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
        self.addr = "127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class UdpBackend:
    def __init__(self, name):
        self.name = name
        backend = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                _, sock = self.request
                sock.sendto(backend.name.encode(), self.client_address)

        self.server = socketserver.ThreadingUDPServer(("127.0.0.1", 0), Handler)
        self.addr = "127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------
# Recording.


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read().decode()


def wait_for(what, timeout, check):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("%s: not within %ss" % (what, timeout))


def cgroup2_mount():
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                return fields[1].replace("\\040", " ")
    raise RuntimeError("no cgroup v2 mount in /proc/mounts")


def render_config(services):
    out = []
    for svc in services:
        out.append("[[services]]")
        out.append('name = "%s"' % svc["name"])
        out.append('vip = "%s"' % svc["vip"])
        out.append('protocol = "%s"' % svc["protocol"])
        if "health" in svc:
            out.append("health = %s" % svc["health"])
        for addr, weight, drain in svc["backends"]:
            out.append("[[services.backends]]")
            out.append('addr = "%s"' % addr)
            out.append("weight = %d" % weight)
            if drain:
                out.append("drain = true")
        out.append("")
    return "\n".join(out) + "\n"


class Recording:
    """Everything a recording creates; `close` removes all of it."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.tag = "mesh-dashboard-%d" % os.getpid()
        self.tmp = tempfile.mkdtemp(prefix=self.tag + "-")
        self.cgroup = os.path.join(cgroup2_mount(), self.tag)
        self.bpffs = os.path.join("/sys/fs/bpf", self.tag)
        self.config = os.path.join(self.tmp, "mesh.toml")
        self.procs = []
        self.backends = []
        self.agent = None
        self.prometheus = None
        os.mkdir(self.cgroup)

    def write_config(self, services):
        tmp = self.config + ".tmp"
        with open(tmp, "w") as f:
            f.write(render_config(services))
        os.rename(tmp, self.config)

    def start_agent(self):
        self.metrics = "127.0.0.1:%d" % free_port()
        log = open(os.path.join(self.tmp, "agent.log"), "w")
        self.agent = subprocess.Popen(
            [self.mesh, "agent", "--config", self.config, "--cgroup", self.cgroup,
             "--bpffs", self.bpffs, "--metrics", self.metrics],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_for("agent /readyz", 20,
                 lambda: http_get("http://%s/readyz" % self.metrics)[0] == 200)

    def start_prometheus(self):
        self.prom = "127.0.0.1:%d" % free_port()
        config = os.path.join(self.tmp, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: mesh\n    scrape_interval: 1s\n"
                    "    scrape_timeout: 1s\n    static_configs:\n"
                    "      - targets: ['%s']\n" % self.metrics)
        log = open(os.path.join(self.tmp, "prometheus.log"), "w")
        self.prometheus = subprocess.Popen(
            ["/usr/bin/prometheus", "--config.file=" + config,
             "--storage.tsdb.path=" + os.path.join(self.tmp, "data"),
             "--web.listen-address=" + self.prom],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.tmp)
        wait_for("prometheus /-/ready", 30,
                 lambda: http_get("http://%s/-/ready" % self.prom)[0] == 200)

    def client(self, kind, addr, rate, seconds, payload=300):
        procs_file = os.path.join(self.cgroup, "cgroup.procs")

        def enter_cgroup():
            with open(procs_file, "w") as f:
                f.write("0")

        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--client", kind, addr, str(rate),
             str(seconds), str(payload)],
            stdin=subprocess.DEVNULL, preexec_fn=enter_cgroup)
        self.procs.append(proc)

    def query_range(self, expr, start, end):
        query = urllib.parse.urlencode(
            {"query": expr, "start": "%.3f" % start, "end": "%.3f" % end, "step": "1s"})
        status, body = http_get("http://%s/api/v1/query_range?%s" % (self.prom, query))
        doc = json.loads(body)
        if status != 200 or doc.get("status") != "success":
            raise RuntimeError("query %r: %s" % (expr, body))
        return doc["data"]["result"]

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for proc in (self.prometheus, self.agent):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if os.path.exists(self.bpffs):
            subprocess.run([self.mesh, "cleanup", "--bpffs", self.bpffs],
                           stdout=subprocess.DEVNULL, timeout=30, check=False)
            if os.path.exists(self.bpffs):
                subprocess.run(["rm", "-rf", self.bpffs], check=False)
        if os.path.isdir(self.cgroup):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    os.rmdir(self.cgroup)
                    break
                except OSError:
                    with open(os.path.join(self.cgroup, "cgroup.procs")) as f:
                        for pid in f.read().split():
                            try:
                                os.kill(int(pid), signal.SIGKILL)
                            except ProcessLookupError:
                                pass
                    time.sleep(0.1)
        for backend in self.backends:
            backend.stop()
        subprocess.run(["rm", "-rf", self.tmp], check=False)


def record(mesh, seconds):
    """Runs the scenario; returns {"start", "end", "events", "panels": {title: [series...]}}."""
    panels = dashboard_panels()
    rec = Recording(mesh)
    try:
        web = [TcpBackend("web-%d" % i) for i in (1, 2, 3)]
        api = [TcpBackend("api-%d" % i) for i in (1, 2)]
        dns = [UdpBackend("dns-%d" % i) for i in (1, 2)]
        rec.backends = web + api + dns
        health = '{ type = "tcp", interval = "500ms", timeout = "250ms", rise = 2, fall = 2 }'

        def services(api_backends=False, web3=True, drain_web1=False, invalid=False):
            web_backends = [(web[0].addr, 2, drain_web1), (web[1].addr, 1, False)]
            if web3:
                web_backends.append((web[2].addr, 1, False))
            return [
                {"name": "web", "vip": VIP_NET + ".1:80", "protocol": "tcp", "health": health,
                 "backends": web_backends},
                {"name": "api", "vip": VIP_NET + ".2:80", "protocol": "tcp",
                 "backends": [(b.addr, 0 if invalid else 1, False) for b in api]
                 if api_backends else []},
                {"name": "dns", "vip": VIP_NET + ".3:53", "protocol": "udp",
                 "backends": [(b.addr, 1, False) for b in dns]},
            ]

        rec.write_config(services())
        rec.start_agent()
        rec.start_prometheus()
        time.sleep(2)
        start = time.time()
        rec.client("tcp", VIP_NET + ".1:80", 120, seconds)
        rec.client("tcp", VIP_NET + ".1:80", 60, seconds, payload=3000)
        rec.client("tcp", VIP_NET + ".2:80", 40, seconds)
        rec.client("udp", VIP_NET + ".3:53", 80, seconds)
        state = {"api_backends": False}
        events = []

        def at(fraction, label, action):
            due = start + fraction * seconds
            time.sleep(max(0.0, due - time.time()))
            action()
            events.append({"t": time.time(), "label": label})
            print("%5.1fs %s" % (time.time() - start, label), flush=True)

        def add_api():
            state["api_backends"] = True
            rec.write_config(services(api_backends=True))

        def stop_web3():
            web[2].stop()

        def reject():
            rec.write_config(services(api_backends=True, invalid=True))

        def restore():
            rec.write_config(services(api_backends=True))

        def restart_web3():
            web[2] = TcpBackend("web-3", port=int(web[2].addr.rsplit(":", 1)[1]))
            rec.backends.append(web[2])

        def drain_web1():
            rec.write_config(services(api_backends=True, drain_web1=True))

        at(0.25, "api gets 2 backends", add_api)
        at(0.40, "web-3 stops", stop_web3)
        at(0.55, "invalid config edit rejected", reject)
        at(0.58, "", restore)
        events.pop()
        at(0.65, "web-3 back", restart_web3)
        at(0.80, "web-1 drained", drain_web1)
        time.sleep(max(0.0, start + seconds + 2 - time.time()))
        end = time.time()
        for proc in rec.procs:
            proc.wait(10)
        time.sleep(2)  # the last scrape
        data = {"start": start, "end": end, "events": events, "panels": {}}
        for title in PANELS:
            panel = panels[title]
            series = []
            for target in panel["targets"]:
                expr = substitute(target["expr"], end - start)
                for result in rec.query_range(expr, start, end):
                    series.append({
                        "legend": legend(target.get("legendFormat", ""), result["metric"]),
                        "values": [[float(t), float(v)] for t, v in result["values"]],
                    })
            if not series:
                print("warning: panel %r has no data" % title, file=sys.stderr)
            data["panels"][title] = series
        return data
    finally:
        rec.close()


def dashboard_panels():
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    panels = {}
    stack = list(dashboard["panels"])
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))
        panels[panel["title"]] = panel
    missing = [title for title in PANELS if title not in panels]
    if missing:
        raise SystemExit("panels not in %s: %s" % (DASHBOARD, missing))
    return panels


def substitute(expr, range_secs):
    return (expr.replace("$__rate_interval", RATE_WINDOW)
            .replace("$__interval", "1s")
            .replace("$__range", "%ds" % max(1, int(range_secs)))
            .replace("$instance", ".*")
            .replace("$service", ".*"))


def legend(fmt, metric):
    out = fmt
    for key, value in metric.items():
        out = out.replace("{{%s}}" % key, value)
    while "{{" in out:
        a = out.index("{{")
        b = out.index("}}", a)
        out = out[:a] + out[b + 2:]
    return out.strip() or "value"


# ---------------------------------------------------------------------------------------------
# Plotting.

BG = "#111217"
PANEL = "#181b1f"
TEXT = "#ccccdc"
GRID = "#2c3235"
LINE_STYLES = {"active": "-", "configured": "--", "sent": "-", "received": "--",
               "p50": "-", "p99": "--", "mean": ":"}
COLORS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9",
          "#fade2a", "#96d98d", "#ff9830", "#ca95e5", "#c0d8ff"]


def unit_formatter(unit):
    def per_sec(v, _):
        return "%g/s" % round(v, 1)

    def binbps(v, _):
        for scale, name in ((1 << 30, "GiB/s"), (1 << 20, "MiB/s"), (1 << 10, "KiB/s")):
            if abs(v) >= scale:
                return "%.1f %s" % (v / scale, name)
        return "%d B/s" % v

    def seconds(v, _):
        if v == 0:
            return "0"
        if abs(v) < 1e-3:
            return "%.0f µs" % (v * 1e6)
        if abs(v) < 1:
            return "%.1f ms" % (v * 1e3)
        return "%.2f s" % v

    return {"cps": per_sec, "ops": per_sec, "binBps": binbps, "s": seconds}.get(
        unit, lambda v, _: "%g" % v)


def plot(data, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter
    import datetime

    panels = dashboard_panels()
    cols = 4
    rows = math.ceil(len(PANELS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(22, 4.3 * rows + 0.9), dpi=90)
    fig.patch.set_facecolor(BG)
    start, end = data["start"], data["end"]
    to_dt = lambda t: datetime.datetime.fromtimestamp(t)  # noqa: E731
    for ax, title in zip(axes.flat, PANELS):
        panel = panels[title]
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        ax.set_facecolor(PANEL)
        for spine in ax.spines.values():
            spine.set_color(GRID)
        ax.tick_params(colors=TEXT, labelsize=8)
        ax.grid(color=GRID, linewidth=0.6)
        ax.set_title(title, color=TEXT, fontsize=11, loc="left", pad=6)
        series = sorted(data["panels"].get(title, []), key=lambda s: s["legend"])
        health = panel["type"] == "state-timeline"
        # Series of one service share a colour and differ in line style (active/configured,
        # sent/received, p50/p99/mean) when the panel has several per service.
        targets = panel["targets"]
        by_service = len(targets) > 1 or "{{state}}" in targets[0].get("legendFormat", "")
        services = sorted({s["legend"].split(" ")[0] for s in series})
        for i, s in enumerate(series):
            xs = [to_dt(t) for t, _ in s["values"]]
            ys = [v if not math.isnan(v) else None for _, v in s["values"]]
            style = "-"
            if by_service and " " in s["legend"]:
                service, variant = s["legend"].split(" ")[0], s["legend"].split(" ")[-1]
                k = services.index(service)
                color = COLORS[k % len(COLORS)]
                style = LINE_STYLES.get(variant, "-")
                if "{{state}}" in targets[0].get("legendFormat", ""):
                    # Counts of several services often coincide: keep each line visible.
                    ys = [y if y is None else y + (k - (len(services) - 1) / 2) * 0.05
                          for y in ys]
            else:
                color = COLORS[i % len(COLORS)]
            if health:
                ax.step(xs, [y if y is None else y + (i - (len(series) - 1) / 2) * 0.05
                             for y in ys],
                        where="post", color=color, linewidth=1.6, label=s["legend"])
            else:
                ax.plot(xs, ys, color=color, linestyle=style, linewidth=1.3, label=s["legend"])
        if health:
            ax.set_yticks([-1, 0, 1])
            ax.set_yticklabels(["unknown", "unhealthy", "healthy"])
            ax.set_ylim(-1.4, 1.4)
        else:
            ax.yaxis.set_major_formatter(FuncFormatter(unit_formatter(unit)))
            top = max((v for s in series for _, v in s["values"] if not math.isnan(v)),
                      default=0)
            # Room above the data for the legend.
            ax.set_ylim(0, top * 1.45 if top > 0 else 1)
        for event in data["events"]:
            ax.axvline(to_dt(event["t"]), color="#5a5f68", linestyle="--", linewidth=0.8)
        ax.set_xlim(to_dt(start), to_dt(end))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.xaxis.set_major_locator(mdates.SecondLocator(bysecond=range(0, 60, 15)))
        if series:
            ax.legend(loc="upper left", fontsize=7, facecolor=PANEL, edgecolor=GRID,
                      labelcolor=TEXT, ncol=2 if len(series) > 4 else 1, framealpha=0.85)
        else:
            ax.text(0.5, 0.5, "No data", color=TEXT, ha="center", va="center",
                    transform=ax.transAxes)
    for ax in list(axes.flat)[len(PANELS):]:
        ax.set_visible(False)
    events = "   ".join("%+.0fs %s" % (e["t"] - start, e["label"]) for e in data["events"])
    fig.suptitle("mesh load balancer  (deploy/grafana-dashboard.json, real agent, %.0f s)"
                 % (end - start), color=TEXT, fontsize=15, x=0.01, ha="left", y=0.995)
    fig.text(0.01, 0.962, "events (dashed lines): " + events, color="#8e8e9e", fontsize=9,
             ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.955))
    fig.savefig(out, facecolor=BG)
    print("wrote %s" % out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mesh", default=os.path.join(ROOT, "target", "release", "mesh"))
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "dashboard.png"))
    parser.add_argument("--save-data", help="also write the query results to this JSON file")
    parser.add_argument("--from-data", help="render from saved query results, record nothing")
    parser.add_argument("--client", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        kind, addr, rate, seconds, payload = args.client
        client_main(kind, addr, float(rate), float(seconds), int(payload))
        return
    if args.from_data:
        with open(args.from_data) as f:
            data = json.load(f)
    else:
        if os.geteuid() != 0:
            raise SystemExit("recording needs root (it loads eBPF programs); "
                             "or render saved data with --from-data")
        if not 10 <= args.seconds <= 600:
            raise SystemExit("--seconds must be between 10 and 600")
        data = record(args.mesh, args.seconds)
        if args.save_data:
            with open(args.save_data, "w") as f:
                json.dump(data, f)
    plot(data, args.out)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
