#!/usr/bin/env python3
"""Writes the hand-made seed inputs into fuzz/corpus/<target>/seed-*.

Run from anywhere: python3 fuzz/make_seeds.py. It only (re)writes files named
seed-*, so inputs the fuzzer found stay. Input layouts are described in
fuzz/checks.rs next to each check.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def name(text):
    out = b""
    for label in text.split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def header(id_=0x1234, flags=0x0100, qd=1, an=0, ns=0, ar=0):
    return struct.pack(">HHHHHH", id_, flags, qd, an, ns, ar)


def opt(size=1232, ext=0, version=0, do=False, options=b"", owner=b"\0"):
    ttl = bytes([ext, version, 0x80 if do else 0, 0])
    return owner + struct.pack(">HH", 41, size) + ttl + struct.pack(">H", len(options)) + options


def rr(owner, rtype, rdata, ttl=300, rclass=1):
    return owner + struct.pack(">HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def question(text="www.example.com", qtype=1, qclass=1):
    return name(text) + struct.pack(">HH", qtype, qclass)


def query(text="www.example.com", qtype=1, edns=None, **kw):
    ar = 1 if edns is not None else 0
    msg = header(ar=ar, **kw) + question(text, qtype)
    if edns is not None:
        msg += edns
    return msg


# 63+63+63+61 byte labels: 255 bytes in wire form, the most RFC 1035 allows.
NAME_255 = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
NAME_256 = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 62])

PARSE_QUERY = {
    "normal": query(),
    "edns_do": query("Example.COM", 28, opt(4096, do=True)),
    "edns_small": query("a", 1, opt(100)),
    "edns_cookie": query("example.org", 1, opt(1232, options=struct.pack(">HH", 10, 8) + b"\x01" * 8)),
    "root": query(".", 2),
    "name_255": query(NAME_255),
    "name_256": query(NAME_256),
    "escapes": header() + b"\x03a.b\x02\\\x00\x02\x01\xff\x00" + struct.pack(">HH", 16, 1),
    "pointer_in_question": header() + b"\xc0\x0c" + struct.pack(">HH", 1, 1),
    "pointer_loop_in_additional": header(ar=1) + question() + rr(b"\x01x\xc0\x21", 1, b"\x7f\0\0\1"),
    "two_opts": header(ar=2) + question() + opt() + opt(),
    "opt_in_answer": header(an=1) + question() + opt(),
    "opt_not_root": header(ar=1) + question() + opt(owner=name("x")),
    "opt_pointer_owner": header(ar=1) + question(".") + opt(owner=b"\xc0\x0c"),
    "badvers": query(edns=opt(version=1)),
    "badvers_ext": query(edns=opt(ext=5, version=2, do=True)),
    "axfr": query(qtype=252),
    "ixfr": query(qtype=251, edns=opt()),
    "notify": query(flags=0x2000),
    "qr_set": query(flags=0x8100),
    "tc_set": query(flags=0x0300),
    "qdcount_0": header(qd=0),
    "qdcount_2": header(qd=2) + question() + question(),
    "truncated_question": query()[:-1],
    "truncated_name": header() + b"\x07exam",
    "trailing_byte": query() + b"\0",
    "short_header": query()[:11],
    "label_type_0x40": header() + b"\x41a\x00" + struct.pack(">HH", 1, 1),
    "cd_rd_ad": query(flags=0x0130, edns=opt(do=True)),
    "records_in_query": header(an=1, ns=1) + question() + rr(b"\xc0\x0c", 1, b"\1\2\3\4") + rr(b"\0", 2, name("ns")),
}


def response(q, an=b"", ancount=0, ar=b"", arcount=0, flags=0x8180):
    qd = struct.unpack(">H", q[4:6])[0]
    end = len(q)
    if q[10:12] != b"\0\0":
        end = len(q) - 11  # drop the query's OPT
    return header(struct.unpack(">H", q[:2])[0], flags, qd, ancount, 0, arcount) + q[12:end] + an + ar


def pr(mode, q, resp):
    return bytes([mode]) + struct.pack(">H", len(q)) + q + resp


Q = query("www.Example.com", 1)
A_REC = rr(b"\xc0\x0c", 1, b"\x5d\xb8\xd8\x22")
CNAME = rr(b"\xc0\x0c", 5, b"\x03cdn\xc0\x10")  # www.example.com CNAME cdn.example.com

PARSE_RESPONSE = {
    "answer_compressed": pr(0, Q, response(Q, A_REC, 1)),
    "answer_case_differs": pr(0, Q, header(0x1234, 0x8180, 1, 1) + question("WWW.example.COM") + A_REC),
    "answer_cname_chain": pr(0, Q, response(Q, CNAME + rr(b"\xc0\x2d", 1, b"\1\2\3\4"), 2)),
    "answer_edns": pr(0, query(edns=opt(do=True)), response(Q, A_REC, 1, opt(1232, do=True), 1)),
    "answer_two_opts": pr(0, Q, response(Q, A_REC, 1, opt() + opt(), 2)),
    "answer_trailing": pr(0, Q, response(Q, A_REC, 1) + b"junk"),
    "answer_pointer_loop": pr(0, Q, response(Q, rr(b"\x01a\xc0\x21", 1, b"\1\2\3\4"), 1)),
    "answer_forward_pointer": pr(0, Q, response(Q, rr(b"\xc0\x40", 1, b"\1\2\3\4"), 1)),
    "answer_short_rdata": pr(0, Q, response(Q, A_REC, 1)[:-2]),
    "question_pointer_to_header": pr(0, Q, header(0x1234, 0x8180, 1) + b"\xc0\x02" + b"\0\1\0\1"),
    "other_name": pr(0, Q, response(query("www.example.net"))),
    "other_type": pr(0, Q, response(query("www.example.com", 28))),
    "qr_clear": pr(0, Q, response(Q, flags=0x0100)),
    "header_only_refused": pr(0, Q, header(0x1234, 0x8185, 0)),
    "header_only_noerror": pr(0, Q, header(0x1234, 0x8180, 0)),
    "header_only_nxdomain": pr(0, Q, header(0x1234, 0x8183, 0)),
    "qdcount_2": pr(0, Q, header(0x1234, 0x8180, 2) + question() + question()),
    "servfail_with_question": pr(0, Q, response(Q, flags=0x8182)),
    "short": pr(0, Q, response(Q)[:11]),
    "empty_query": pr(0, b"", response(Q)),
    "query_unreadable": pr(0, header() + b"\xc0\x0c\0\1\0\1", response(Q)),
    "mode_records": pr(0x07, Q, A_REC + opt()),
    "mode_plain": pr(0x01, query("a.b", 16), b""),
    "name_255": pr(0, query(NAME_255), response(query(NAME_255), rr(b"\xc0\x0c", 1, b"\1\2\3\4"), 1)),
    # The question "A\000b." with its root label read through a pointer into
    # its own label: the same name in other bytes, so restore_for_client
    # leaves the answer's question as it is.
    "question_compressed_into_itself": pr(
        0, header() + b"\x03A\x00b\x00\0\1\0\1", header(0x1234, 0x8180, 1, 1) + b"\x03a\x00B\xc0\x0e\0\1\0\1" + A_REC
    ),
}


def hops(n):
    """A question name that is a chain of n backward pointers ending at root."""
    body = b"\0"
    for i in range(n):
        target = 12 + (0 if i == 0 else 1 + 2 * (i - 1))
        body += struct.pack(">H", 0xC000 | target)
    return body


WALK = {
    "query": query(),
    "answer_compressed": response(Q, A_REC, 1),
    "answer_cname_chain": response(Q, CNAME + rr(b"\xc0\x2d", 1, b"\1\2\3\4"), 2),
    "answer_edns": response(Q, A_REC, 1, opt(1232, do=True), 1),
    "two_opts": response(Q, A_REC, 1, opt() + opt(), 2),
    "pointer_loop": header(qd=0, an=1) + b"\x01a\xc0\x0c" + struct.pack(">HHIH", 1, 1, 0, 0),
    "pointer_self": header(qd=1) + b"\xc0\x0c\0\1\0\1",
    "hops_128": header(qd=0) + hops(128),
    "hops_129": header(qd=0) + hops(129),
    "name_255": query(NAME_255),
    "name_256": query(NAME_256),
    "escapes": header() + b"\x03a.b\x02\\\x00\x02\x01\xff\x00" + struct.pack(">HH", 16, 1),
    "root": query("."),
    "short": query()[:20],
    "empty": b"",
}


def frame(msg):
    return struct.pack(">H", len(msg)) + msg


def fr(ctl, stream):
    return bytes([len(ctl)]) + bytes(ctl) + stream


STREAM = frame(query()) + frame(query("a", 28, opt())) + frame(response(Q, A_REC, 1))

FRAMER = {
    "one_shot": fr([], STREAM),
    "byte_by_byte": fr([0, 1, 2] * 60, STREAM),
    "spare_commit": fr([1, 40, 17, 2, 1, 200, 255, 3, 4, 1, 3, 0, 2], STREAM),
    "big_spare": fr([0x83, 10, 5, 2, 4, 0x83, 1, 255], STREAM),
    "push_then_shrink": fr([0, 7, 4, 0, 30, 2, 4, 0x82, 2, 2], STREAM),
    "short_frame": fr([0, 3, 2], frame(query()) + b"\x00\x05hello" + frame(query())),
    "zero_length": fr([], b"\x00\x00"),
    "length_11": fr([0, 1, 2, 0, 1, 2], b"\x00\x0b" + b"x" * 11),
    "incomplete": fr([2], frame(query()) + frame(query())[:-3]),
    "lone_byte": fr([], b"\x00"),
    "empty": b"",
}


def ops(*items):
    out = b""
    for op in items:
        out += bytes(op) if isinstance(op, (list, tuple)) else op
    return out


INSERT, BURST, TAKE, BURY, RESTORE, DRAIN, GET = 0, 1, 2, 3, 4, 5, 6
FILL = bytes([7]) + b"FULL"  # fills the table, in the stable replay only
RAW = 0x80

ID_TABLE = {
    "basic": ops([INSERT, 1], [INSERT, 2], [INSERT, 3], [TAKE, 0, 0], [GET, 0, 0], [DRAIN]),
    "bury_then_late": ops([INSERT, 1], [BURY, 0, 0, 0], [GET, 0, 0], [INSERT, 2], [TAKE, 0, 0], [TAKE, 0, 0], [DRAIN]),
    "bury_wrong_query": ops([INSERT, 1], [BURY, 0, 0, 1], [TAKE, 0, 0]),
    "take_restore": ops([INSERT, 1], [INSERT, 2], [TAKE, 0x80, 0], [RESTORE], [TAKE, 0x80, 0], [INSERT, 3], [RESTORE]),
    "unknown_ids": ops([TAKE | RAW, 0x12, 0x34], [GET | RAW, 0xff, 0xff], [BURY | RAW, 0, 0, 0], [RESTORE]),
    "drain_mixed": ops([BURST, 3], [BURY, 0x40, 0, 0], [BURY, 0x80, 0, 0], [TAKE, 0xc0, 0], [DRAIN], [INSERT, 9], [GET, 0, 0]),
    "full_table": ops(FILL, [INSERT, 1], [TAKE, 0x7f, 0xff], [INSERT, 2], [INSERT, 3], [BURY, 0, 0, 0], [DRAIN]),
    "full_with_tombs": ops([BURST, 254] * 8, [BURY, 0, 0, 0], [BURY, 0x80, 0, 0], FILL, [INSERT, 1], [TAKE, 0, 0], [INSERT, 1], [DRAIN]),
}

TARGETS = {
    "parse_query": PARSE_QUERY,
    "parse_response": PARSE_RESPONSE,
    "walk": WALK,
    "framer": FRAMER,
    "id_table": ID_TABLE,
}

for target, seeds in TARGETS.items():
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for old in os.listdir(d):
        if old.startswith("seed-"):
            os.remove(os.path.join(d, old))
    for label, data in seeds.items():
        with open(os.path.join(d, "seed-" + label), "wb") as f:
            f.write(data)
    print(f"{target}: {len(seeds)} seeds")
