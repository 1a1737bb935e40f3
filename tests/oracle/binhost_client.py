#!/usr/bin/env python3
"""A real portage binhost client for the tests: points portage's binary tree
at a pacloud binhost URL (`<server>/binhost/<target>`), populates it the way
`emerge --getbinpkg` does, and prints what portage sees as JSON lines:
{"cpv": ..., "build_id": ..., "use": ..., "path": ...}.

Usage: binhost_client.py BINHOST_URL REPO_DIR
"""
import json
import os
import sys
import tempfile

import portage
from portage.dbapi.bintree import binarytree

url, repo = sys.argv[1], os.path.abspath(sys.argv[2])
with tempfile.TemporaryDirectory() as tmp:
    cfg = os.path.join(tmp, "config")
    os.makedirs(os.path.join(cfg, "etc/portage"))
    os.symlink(os.path.join(repo, "profiles/default"), os.path.join(cfg, "etc/portage/make.profile"))
    pkgdir = os.path.join(tmp, "pkgdir")
    os.makedirs(pkgdir)
    repos = f"[DEFAULT]\nmain-repo = pacloud-fixtures\n\n[pacloud-fixtures]\nlocation = {repo}\n"
    settings = portage.config(
        config_root=cfg,
        target_root=os.path.join(tmp, "root"),
        eprefix="",
        env={"PORTAGE_BINHOST": url, "PORTAGE_REPOSITORIES": repos, "PKGDIR": pkgdir,
             "FEATURES": "binpkg-multi-instance -binpkg-request-signature", "PORTAGE_TMPDIR": tmp},
    )
    bt = binarytree(pkgdir=pkgdir, settings=settings)
    bt.populate(getbinpkgs=True, getbinpkg_refresh=True)
    for cpv in sorted(bt.dbapi.cpv_all(), key=str):
        d = bt._remotepkgs[bt.dbapi._instance_key(cpv)]
        print(json.dumps({"cpv": str(cpv), "build_id": cpv.build_id, "use": d.get("USE", ""), "path": d.get("PATH")}))
