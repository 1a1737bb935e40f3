#!/usr/bin/env python3
"""Study: where does portage (via portage_oracle.py) disagree with the grammar
in DESIGN.md section 2?  Run with the project venv:

    .venv/bin/python tests/oracle/study.py [-v]

The DESIGN regexes are applied with re.fullmatch and re.ASCII, i.e. exactly
like Rust's `regex` crate would treat `^...$` (whole string, no trailing-"\n"
allowance, ASCII classes as written).  Length limits from DESIGN are NOT
modelled here (portage has none; that divergence is by design).
"""

import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

D_CAT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9+_.-]*")
D_PKG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9+_-]*")
D_VER = re.compile(
    r"[0-9]+(\.[0-9]+)*[a-z]?((_alpha|_beta|_pre|_rc|_p)[0-9]*)*(-r[0-9]+)?"
)
D_USE = re.compile(r"[A-Za-z0-9][A-Za-z0-9+_@-]*")


def d_version(v):
    return D_VER.fullmatch(v) is not None


def d_category(v):
    return D_CAT.fullmatch(v) is not None


def d_package(v):
    if D_PKG.fullmatch(v) is None:
        return False
    # "must not end in -<valid version>"
    for i, ch in enumerate(v):
        if ch == "-" and d_version(v[i + 1 :]):
            return False
    return True


def d_use(v):
    if v.startswith("-"):
        v = v[1:]
    return D_USE.fullmatch(v) is not None


def d_atom(v):
    if v.count("/") != 1:
        return False
    c, p = v.split("/")
    return d_category(c) and d_package(p)


DESIGN = {
    "category": d_category,
    "package": d_package,
    "version": d_version,
    "use": d_use,
    "atom": d_atom,
    "version_atom": d_version,
}

NONASCII = ["é", "ß", "Ω", "ф", "٣", "１", "²", "ǅ", "\u0301"]

CASES = {
    "category": [
        "app-misc", "dev-libs", "virtual", "sys-apps", "x11-libs", "dev-perl",
        "_a", "0cat", "a+b", "a.b", "a..", "a-", "A-Z", "cat_1",
        "+cat", ".cat", "-cat", "", " ", "cat ", " cat", "c/at", "cat\n",
        "cat\t", "cat:", "cat*", "cat!", "cat[x]", "cat::r",
        "app-misc-1", "app-misc-1.0",
    ]
    + ["c" + c for c in NONASCII]
    + [c + "cat" for c in NONASCII],
    "package": [
        "hello", "foo", "foo_bar", "_foo", "0foo", "foo+", "foo++", "gtk+",
        "foo-", "foo--", "foo-bar", "foo-r1", "foo-r", "foo-1-r", "foo-1+",
        "foo-1", "foo-1.0", "foo-1.0-r1", "foo-1a", "foo-1_p", "foo-1_p1",
        "foo-1.0_alpha1_beta2-r3", "foo-01", "foo-1A", "foo-1.0-r01",
        "foo--1", "foo-bar-2", "foo1", "foo.1", "foo-1.", "foo-1_x",
        "foo-1-1", "foo-1.0b2", "foo-1ab", "_-1", "a+-1", "foo-1\n",
        "+foo", ".foo", "-foo", "", " ", "foo ", "foo\n", "f/oo", "foo.bar",
        "foo:0", "foo::gentoo", "foo[x]", "foo*", "Foo", "FOO-1",
        "foo-١", "foo-１",
    ]
    + ["h" + c + "llo" for c in NONASCII]
    + [c + "foo" for c in NONASCII],
    "version": [
        "1", "1.0", "2.12-r1", "1.0_alpha1_beta2-r3", "1.0a", "1.0-r01",
        "01", "001.002", "1.0_p", "1.0_p1", "1.0_p20240101", "1.0_pre",
        "1.0_rc1_p2", "1.0_beta", "1.0a_alpha", "1.0_alpha_alpha",
        "1.0A", "1.0_Alpha", "1.0_P1", "1.0-R1", "1.0ab", "1.0-r", "1.0-r1-r2",
        "1.0_p-r1", "1.0_x", "1.0_", "1..0", ".1", "1.", "a1", "1.0a1",
        "1.0-r1a", "", " ", "1.0 ", " 1.0", "1.0\n", "1\n", "1.0\t",
        "v1", "1.0_alpha-1", "1.0-1", "1e5", "-1", "+1", "1.0_p-1",
        "٣", "1.٣", "１", "1.0-r٣", "²", "1.0_p١",
        "1" * 50, "1." * 30 + "1",
    ],
    "use": [
        "foo", "bar", "-foo", "--foo", "-", "", " ", "foo ", "+foo", "foo+",
        "f+o", "foo@bar", "@foo", "-@foo", "foo_bar", "_foo", "-_foo", "1foo",
        "-1foo", "foo-bar", "foo-", "FOO", "Foo", "abi_x86_64", "python_targets_python3_12",
        "l10n_en-GB", "foo.bar", "foo:bar", "foo/bar", "foo\n", "-foo\n",
        "foo!", "foo?", "foo*", "foo=", "(foo)",
    ]
    + ["f" + c for c in NONASCII]
    + [c + "oo" for c in NONASCII],
    "atom": [
        "app-misc/hello", "dev-libs/libfoo", "app-misc/hello-2.12-r1",
        "cat/pkg-1.0", "cat/pkg-1", "=cat/pkg-1.0", ">=cat/pkg-1", "!cat/pkg",
        "cat/pkg:0", "cat/pkg::gentoo", "cat/pkg[foo]", "cat/pkg/x", "cat",
        "/pkg", "cat/", "app-misc/héllo", "app-misç/hello", "app-misc/hello\n",
        "cat/pkg-r1", "cat/pkg-1-r", "+cat/pkg", "cat/+pkg", ".cat/pkg",
        "cat/.pkg", "-cat/pkg", "cat/-pkg", "cat/pkg*", "*/pkg", "cat/*",
        "cat.x/pkg", "cat/pk.g", "virtual/pkg-1a", "cat/pkg-١",
    ],
}
CASES["version_atom"] = CASES["version"]


def run_oracle(items):
    inp = "".join(json.dumps({"kind": k, "value": v}) + "\n" for k, v in items)
    p = subprocess.run(
        [sys.executable, os.path.join(HERE, "portage_oracle.py")],
        input=inp.encode(),
        capture_output=True,
        check=True,
    )
    out = [json.loads(x) for x in p.stdout.decode().splitlines()]
    assert len(out) == len(items), (len(out), len(items))
    return out


def main():
    verbose = "-v" in sys.argv
    items = [(k, v) for k, vs in CASES.items() for v in vs]
    res = run_oracle(items)
    diverge = 0
    for (k, v), r in zip(items, res):
        d = DESIGN[k](v)
        p = r["valid"]
        mark = "  " if d == p else "!!"
        if d != p:
            diverge += 1
        if verbose or d != p:
            extra = f"  ({r['error']})" if "error" in r else ""
            print(
                f"{mark} {k:12} {json.dumps(v, ensure_ascii=False):34} "
                f"portage={'ok' if p else 'no':3} design={'ok' if d else 'no'}{extra}"
            )
    print(f"{len(items)} cases, {diverge} divergences")


if __name__ == "__main__":
    main()
