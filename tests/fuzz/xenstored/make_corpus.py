#!/usr/bin/env python3
"""Writes the xs-wire seed corpus: byte 0 = connection mode, then xsd_sockmsg frames."""
import os, struct, sys

T = dict(CONTROL=0, DIRECTORY=1, READ=2, GET_PERMS=3, WATCH=4, UNWATCH=5, TX_START=6,
         TX_END=7, INTRODUCE=8, RELEASE=9, GET_DOMAIN_PATH=10, WRITE=11, MKDIR=12, RM=13,
         SET_PERMS=14, IS_INTRODUCED=17, RESUME=18, SET_TARGET=19, RESET_WATCHES=21,
         DIRECTORY_PART=22)

def msg(t, *args, req=0, tx=0, raw=None):
    payload = raw if raw is not None else b"".join(a.encode() + b"\0" for a in args)
    return struct.pack("<IIII", T[t], req, tx, len(payload)) + payload

seeds = {
    "rw": b"\0" + msg("WRITE", raw=b"/a/b\0value") + msg("READ", "/a/b") + msg("DIRECTORY", "/a"),
    "tree": b"\0" + msg("MKDIR", "/x/y/z") + msg("RM", "/x/y") + msg("DIRECTORY_PART", "/x", "0"),
    "perms": b"\1" + msg("WRITE", raw=b"/local/domain/5/k\0v", req=1) +
             msg("SET_PERMS", "/local/domain/5", "n5", "r0") + msg("READ", "k") +
             msg("GET_PERMS", "/local/domain/5"),
    "watch": b"\2" + msg("WATCH", "/w", "tok") + msg("WATCH", "rel", "t", req=1) +
             msg("WRITE", raw=b"/w/1\0x") + msg("RM", "/w") + msg("UNWATCH", "/w", "tok"),
    "tx": b"\0" + msg("TX_START", "") + msg("WRITE", raw=b"/t\0in-tx", tx=1) +
          msg("READ", "/t", req=1) + msg("TX_END", "T", tx=1) + msg("TX_START", "", req=1) +
          msg("TX_END", "F", req=1, tx=1),
    "domains": b"\4" + msg("INTRODUCE", "7", "123", "4") + msg("IS_INTRODUCED", "7") +
               msg("SET_TARGET", "7", "5") + msg("GET_DOMAIN_PATH", "7") +
               msg("RELEASE", "7") + msg("RESUME", "5") + msg("WATCH", "@releaseDomain", "r"),
    "control": b"\0" + msg("CONTROL", "print", "hi") + msg("CONTROL", "check") +
               msg("RESET_WATCHES", ""),
    "bad": b"\3" + msg("READ", raw=b"/no-nul") + struct.pack("<IIII", 999, 0, 0, 1) + b"x" +
           msg("WRITE", raw=b"/big\0" + b"v" * 4000),
}
out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "../corpus/xs-wire")
os.makedirs(out, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
