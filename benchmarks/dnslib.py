"""DNS helpers shared by benchlib.py (benchmarks/bench.sh) and soaklib.py
(benchmarks/soak.sh); python3 standard library only. Not run on its own.

  host_records(hosts, aaaa_every, txt_every, txt)
                        local-data for a list of host names: A, some AAAA
                        and TXT records
  write_zone(outdir, zone, records, queries, note[, queries_file])
                        the unbound local-data file OUTDIR/ZONE.conf and
                        dnsperf's query file OUTDIR/queries.txt (or
                        OUTDIR/QUERIES_FILE)
  probe(port, name, modes)
                        readiness probe: one A query per transport to
                        127.0.0.1:PORT, each answered NOERROR with a record
  query_line(line)      one per-query line of `dnsperf -v`: (code, latency)
  parse_dnsperf(path)   the dnsperf output parser: summary figures, rcodes,
                        per-query latencies and timeouts
"""

import os
import random
import re
import socket
import struct


# ---------------------------------------------------------------- zone
def host_records(hosts, aaaa_every, txt_every=0, txt=""):
    """RR strings for HOSTS (fully qualified, with the final dot), the i-th
    one with an A record 10.x.y.z (i in the low 24 bits), every AAAA_EVERY-th
    an AAAA 2001:db8::i too, every TXT_EVERY-th (0: none) a TXT with TXT,
    in which {i} is replaced by i."""
    records = []
    for i, h in enumerate(hosts):
        records.append(f"{h} 300 IN A 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
        if i % aaaa_every == 0:
            records.append(f"{h} 300 IN AAAA 2001:db8::{i:x}")
        if txt_every and i % txt_every == 0:
            records.append(f"{h} 300 IN TXT \"{txt.format(i=i)}\"")
    return records


def write_zone(outdir, zone, records, queries, note, queries_file="queries.txt"):
    """OUTDIR/ZONE.conf: unbound server-clause lines, a static local zone
    ZONE with an SOA, an NS and its A record, then RECORDS (RR strings) as
    local-data; NOTE goes in a comment on top. OUTDIR/QUERIES_FILE
    (default queries.txt): QUERIES ("name type" strings), one per line."""
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, f"{zone}.conf"), "w") as f:
        f.write(f"    # {note}\n")
        f.write(f"    local-zone: \"{zone}.\" static\n")
        f.write(f"    local-data: '{zone}. 300 IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 300'\n")
        f.write(f"    local-data: '{zone}. 300 IN NS ns.{zone}.'\n")
        f.write(f"    local-data: 'ns.{zone}. 300 IN A 192.0.2.53'\n")
        for rr in records:
            f.write(f"    local-data: '{rr}'\n")
    with open(os.path.join(outdir, queries_file), "w") as f:
        f.write("\n".join(queries) + "\n")


# ---------------------------------------------------------------- probe
def _query(name, qid):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack(">HH", 1, 1)


def _probe_one(port, name, mode):
    qid = random.randrange(65536)
    msg = _query(name, qid)
    try:
        if mode == "tcp":
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(struct.pack(">H", len(msg)) + msg)
                buf = b""
                while len(buf) < 2 or len(buf) < 2 + struct.unpack(">H", buf[:2])[0]:
                    chunk = s.recv(4096)
                    if not chunk:
                        return False
                    buf += chunk
                resp = buf[2:]
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(2)
                s.sendto(msg, ("127.0.0.1", port))
                resp, _ = s.recvfrom(65535)
    except OSError:
        return False
    if len(resp) < 12:
        return False
    rid, flags, _qd, an = struct.unpack(">HHHH", resp[:8])
    return rid == qid and bool(flags & 0x8000) and flags & 0xF == 0 and an >= 1


def probe(port, name, modes=("udp",)):
    """True when every transport in MODES ("udp", "tcp") answers `NAME A`
    on 127.0.0.1:PORT with NOERROR and at least one record (2 s each)."""
    return all(_probe_one(int(port), name, m) for m in modes)


def cmd_probe(port, name, *modes):
    """Subcommand `probe PORT NAME [MODE...]` of benchlib.py and soaklib.py:
    one `NAME A` query to 127.0.0.1:PORT over each MODE (udp, tcp; default
    udp); exit status 0 when each gets a NOERROR answer with a record."""
    return 0 if probe(port, name, modes or ("udp",)) else 1


# ---------------------------------------------------------------- dnsperf
# summary lines: key, label; only the first occurrence counts (for -m tcp
# and dot a second "Average Latency" follows under "Connection Statistics")
SUMMARY = (("sent", "Queries sent:"),
           ("completed", "Queries completed:"),
           ("lost", "Queries lost:"),
           ("interrupted", "Queries interrupted:"),
           ("qps", "Queries per second:"),
           ("avg_lat_s", "Average Latency (s):"),
           ("run_s", "Run time (s):"),
           ("lat_stddev_s", "Latency StdDev (s):"))


def query_line(line):
    """dnsperf 2.10 with -v prints one line per query,
        > NOERROR h00012.bench.test A 0.000345
    (rcode, name, type, latency in seconds with microsecond resolution) for
    an answer, `> T name type` for a timeout, `> I name type` for a query
    interrupted at the end. Returns (code, latency in s or None), or None
    for any other line."""
    if not line.startswith("> "):
        return None
    parts = line.split()
    code = parts[1] if len(parts) > 1 else "?"
    lat = None
    if len(parts) >= 5:
        try:
            lat = float(parts[-1])
        except ValueError:
            pass
    return code, lat


def parse_dnsperf(path):
    """Parse dnsperf 2.10 output, with or without -v, from PATH. Returns
    {SUMMARY key: the figure as printed (str), for those found,
     "rcodes": {RCODE: count}, "lat_min_max": (min, max) as printed (if
     found), "conn": {"Connection attempts"/"Reconnections": count} (tcp,
     dot), "latencies": sorted per-query latencies in s, "timeouts": count}.
    A file that cannot be read gives just the empty containers."""
    out = {"rcodes": {}, "latencies": [], "timeouts": 0}
    try:
        f = open(path, errors="replace")
    except OSError:
        return out
    with f:
        for line in f:
            q = query_line(line)
            if q is not None:
                code, lat = q
                if lat is not None:
                    out["latencies"].append(lat)
                elif code == "T":
                    out["timeouts"] += 1
                continue
            s = line.strip()
            for key, label in SUMMARY:
                if s.startswith(label) and key not in out:
                    out[key] = s[len(label):].split()[0]
            if s.startswith("Average Latency (s):") and "min" in s and "lat_min_max" not in out:
                m = re.search(r"min ([0-9.]+), max ([0-9.]+)", s)
                if m:
                    out["lat_min_max"] = (m.group(1), m.group(2))
            if s.startswith("Response codes:"):
                for item in s[len("Response codes:"):].split(","):
                    item = item.split()
                    if len(item) >= 2:
                        out["rcodes"][item[0]] = int(item[1])
            if s.startswith("Connection attempts:") or s.startswith("Reconnections:"):
                k, v = s.split(":", 1)
                out.setdefault("conn", {})[k] = v.split()[0]
    out["latencies"].sort()
    return out
