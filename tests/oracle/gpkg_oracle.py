#!/usr/bin/env python3
"""Portage's own GPKG code as a test oracle for pacloud's signing.

  gpkg_oracle.py make REPO OUT.gpkg.tar
      writes an unsigned GPKG with portage's gpkg.compress (a small image).
  gpkg_oracle.py verify REPO GNUPGHOME FILE.gpkg.tar
      runs portage's verifier (gpkg._verify_binpkg) with signatures requested
      and verified against the keyring GNUPGHOME, as binrepos.conf
      `verify-signature = true` does; prints "OK" or "REFUSED <exception>:
      <message>" and exits 0 either way (1 on an unexpected error).
"""
import os
import sys
import tempfile

import portage
from portage import gpkg
from portage.exception import PortageException


def settings(repo, tmp, extra):
    cfg = os.path.join(tmp, "config")
    os.makedirs(os.path.join(cfg, "etc/portage"), exist_ok=True)
    link = os.path.join(cfg, "etc/portage/make.profile")
    if not os.path.islink(link):
        os.symlink(os.path.join(repo, "profiles/default"), link)
    repos = f"[DEFAULT]\nmain-repo = pacloud-fixtures\n\n[pacloud-fixtures]\nlocation = {repo}\n"
    env = {"PORTAGE_REPOSITORIES": repos, "PORTAGE_TMPDIR": tmp, "BINPKG_COMPRESS": "zstd"}
    env.update(extra)
    return portage.config(config_root=cfg, target_root=os.path.join(tmp, "root"), eprefix="", env=env)


def main():
    cmd, repo = sys.argv[1], os.path.abspath(sys.argv[2])
    with tempfile.TemporaryDirectory() as tmp:
        if cmd == "make":
            out = sys.argv[3]
            s = settings(repo, tmp, {"FEATURES": "-binpkg-signing"})
            root = os.path.join(tmp, "image")
            os.makedirs(os.path.join(root, "usr/share/hello"))
            with open(os.path.join(root, "usr/share/hello/greeting"), "w") as f:
                f.write("hello from portage's gpkg.compress\n")
            metadata = {"CATEGORY": b"app-misc\n", "PF": b"hello-2.12-r1\n", "EAPI": b"8\n", "SLOT": b"0\n"}
            gpkg.gpkg(s, "hello-2.12-r1-1", out).compress(root, metadata)
            print("OK")
        elif cmd == "verify":
            home, path = sys.argv[3], sys.argv[4]
            s = settings(repo, tmp, {"FEATURES": "binpkg-request-signature", "BINPKG_GPG_VERIFY_GPG_HOME": home})
            pkg = gpkg.gpkg(s, None, path, verify_signature=True)
            try:
                pkg._verify_binpkg()
            except PortageException as e:
                print(f"REFUSED {type(e).__name__}: {e}")
                return
            print("OK")
        else:
            sys.exit(f"unknown command {cmd}")


main()
