#!/usr/bin/env python3
"""Differential-test oracle: answers "is this valid?" with portage's OWN code.

Protocol (JSON lines, UTF-8):
  stdin : {"kind": "category"|"package"|"version"|"use"|"atom", "value": "<str>"}
  stdout: {"valid": true|false}            (one line per input line, same order)
          {"valid": false, "error": "..."} when the input line or the check
                                           itself failed (never crashes)
Each answer is flushed as soon as it is written, so a caller may either talk
line by line or write everything, close stdin, then read everything.

Extra kinds (not part of the core contract, for investigation):
  "isvalidatom"  raw portage.dep.isvalidatom(value) (accepts operators, slots,
                 repos, USE deps ... i.e. far more than our `atom` field)
  "version_atom" the version as portage parses it INSIDE an atom
                 ("=foo/bar-" + value), which is ASCII-only and anchored with
                 \\Z; see FINDINGS.md for why this differs from ververify.
  "info"         {"valid": true, "portage": "<version>", "c_parser": bool}

Tested with portage==3.0.83 from PyPI (see tests/oracle/requirements.txt).
"""

import json
import sys

import portage  # noqa: F401  (initialises portage's module state)
import portage.dep
import portage.versions
from portage.dep import Atom, _get_useflag_re
from portage.exception import InvalidAtom

EAPI = "8"


def _plain_cp(s):
    """True iff portage parses `s` as exactly `category/package` and nothing
    else (no operator, version, blocker, slot, repo, USE deps, build id).

    Why this and not only isvalidatom(s): isvalidatom() with its defaults also
    accepts ">=cat/pkg-1", "cat/pkg:0", "cat/pkg::repo", "cat/pkg[foo]" and
    "!cat/pkg" (with allow_blockers).  Our `atom` field is just
    `category/package`, so we require that the parsed Atom's `cp` is the whole
    input string.  The cat/pkg grammar itself is the one in
    portage/dep/__init__.py _get_atom_re(): `_cp` from portage/versions.py,
    compiled with re.ASCII and anchored with \\Z; the "simple" branch raises
    InvalidAtom when the optional `-<version>` group of `_cp` matched, which is
    how "cat/pkg-1.0" is rejected (a package name must not end in
    -<valid version>).
    """
    if not portage.dep.isvalidatom(s):  # cat/pkg-1.0 -> False
        return False
    a = Atom(s, allow_repo=False, allow_build_id=False)
    return (
        a.cp == s
        and not a.blocker
        and a.operator is None
        and a.slot is None
        and a.repo is None
        and a.use is None
    )


def check_category(v):
    # portage/versions.py has a dedicated _cat_re = ^[\w][\w+.-]*$ (re.ASCII),
    # but it is anchored with `$`, which in Python also matches before a
    # trailing "\n" ("cat\n" passes).  Portage never validates a category
    # alone when parsing what a user types; it parses atoms, whose regex is
    # anchored with \Z.  So: the category is valid iff "<v>/foo" is a plain
    # cat/pkg atom.  ("foo" is a valid package name, and "/" cannot occur in
    # a category, so the package half never causes a rejection.)
    if "/" in v:
        return False
    return _plain_cp(v + "/foo")


def check_package(v):
    # Same reasoning: valid iff "foo/<v>" parses as a plain cat/pkg atom.
    # This applies portage's _pkg regex `[\w][\w+-]*?` (ASCII) AND the rule
    # "must not end in -<valid version>" (the Atom "simple" branch, see above).
    if "/" in v:
        return False
    return _plain_cp("foo/" + v)


def check_version(v):
    # portage.versions.ververify returns True/False (never raises for a str).
    # NB: ver_regexp is compiled WITHOUT re.ASCII and anchored with `$`, so it
    # accepts non-ASCII Unicode digits and a trailing "\n"; see FINDINGS.md.
    return portage.versions.ververify(v) is True


def check_version_atom(v):
    s = "=foo/bar-" + v
    if not portage.dep.isvalidatom(s):
        return False
    a = Atom(s, allow_repo=False, allow_build_id=False)
    return (
        a.cp == "foo/bar"
        and a.version == v
        and a.slot is None
        and a.repo is None
        and a.use is None
        and a.build_id is None
    )


def check_use(v):
    # Our value may carry ONE leading '-' meaning "disable"; strip it, then
    # apply portage.dep._get_useflag_re(eapi): ^[A-Za-z0-9][A-Za-z0-9+_@-]*$
    # (the `eapi` argument is ignored in 3.0.83; all EAPIs share the regex).
    # NB: anchored with `$`, so "foo\n" passes; see FINDINGS.md.
    if v.startswith("-"):
        v = v[1:]
    return _get_useflag_re(EAPI).match(v) is not None


def check_atom(v):
    return _plain_cp(v)


def check_isvalidatom(v):
    return portage.dep.isvalidatom(v) is True


CHECKS = {
    "category": check_category,
    "package": check_package,
    "version": check_version,
    "use": check_use,
    "atom": check_atom,
    "isvalidatom": check_isvalidatom,
    "version_atom": check_version_atom,
}


def answer(raw_line):
    try:
        line = raw_line.decode("utf-8")
    except UnicodeDecodeError as e:
        return {"valid": False, "error": f"input line is not UTF-8: {e}"}
    try:
        req = json.loads(line)
    except ValueError as e:
        return {"valid": False, "error": f"bad JSON: {e}"}
    if not isinstance(req, dict):
        return {"valid": False, "error": "input is not a JSON object"}
    kind = req.get("kind")
    value = req.get("value")
    if kind == "info":
        return {
            "valid": True,
            "portage": portage.VERSION,
            "c_parser": portage.dep._c_dep_parser is not None,
        }
    check = CHECKS.get(kind)
    if check is None:
        return {"valid": False, "error": f"unknown kind: {kind!r}"}
    if not isinstance(value, str):
        return {"valid": False, "error": "value is not a string"}
    try:
        return {"valid": bool(check(value))}
    except InvalidAtom as e:
        return {"valid": False, "error": f"InvalidAtom: {e}"}
    except Exception as e:  # never crash on one value
        return {"valid": False, "error": f"{type(e).__name__}: {e}"}


def main():
    inp = sys.stdin.buffer
    out = sys.stdout
    while True:
        raw = inp.readline()
        if not raw:
            break
        raw = raw.rstrip(b"\r\n")
        if not raw.strip():
            # A blank line still gets an answer so input and output stay
            # aligned line for line.
            res = {"valid": False, "error": "empty input line"}
        else:
            res = answer(raw)
        out.write(json.dumps(res) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
