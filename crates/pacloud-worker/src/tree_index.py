# pacloud tree index generator (docs/key.md, "The tree index").
#
# Run with the worker's portage (`<python> -c <this file> CONFIG_ROOT ROOT`),
# through pacloud_worker::runner (argv only). CONFIG_ROOT holds etc/portage
# (make.conf, make.profile, repos.conf/repos.conf) exactly as a build of the
# target sees it, with no user configuration; ROOT is an empty directory.
# Prints one JSON document: for every ebuild of the target's repository its
# SLOT, IUSE, the IUSE flags enabled by default for it under the profile
# (PORTAGE_USE with an empty user configuration: IUSE defaults, make.defaults
# and package.use of the profile, make.conf USE), and the IUSE flags the
# profile masks and forces for it; plus the profile's USE_EXPAND names.
import json
import os
import sys

cfg, root = sys.argv[1], sys.argv[2]
with open(os.path.join(cfg, "etc/portage/repos.conf/repos.conf")) as f:
    os.environ["PORTAGE_REPOSITORIES"] = f.read()
os.environ["EPREFIX"] = ""
os.environ["PORTAGE_CONFIGROOT"] = cfg
os.environ["ROOT"] = root

import portage  # noqa: E402

trees = portage.create_trees(config_root=cfg, target_root=root, eprefix="", env=os.environ)
eroot = trees._target_eroot
portdb = trees[eroot]["porttree"].dbapi
settings = portage.config(clone=trees[eroot]["vartree"].settings)
main = portdb.repositories.mainRepo()
location = main.location

packages = {}
count = 0
for cp in portdb.cp_all(trees=[location]):
    versions = {}
    for cpv in portdb.cp_list(cp, mytree=location):
        iuse, slot = portdb.aux_get(cpv, ["IUSE", "SLOT"], mytree=location)
        names = sorted({f.lstrip("+-") for f in iuse.split()})
        settings.setcpv(cpv, mydb=portdb)
        use = set(settings["PORTAGE_USE"].split())
        masked = set(settings.usemask)
        forced = set(settings.useforce)
        entry = {"slot": slot}
        if names:
            entry["iuse"] = names
        on = [n for n in names if n in use]
        if on:
            entry["on"] = on
        m = [n for n in names if n in masked]
        if m:
            entry["masked"] = m
        fo = [n for n in names if n in forced and n not in masked]
        if fo:
            entry["forced"] = fo
        versions[portage.versions.cpv_getversion(cpv)] = entry
        count += 1
    if versions:
        packages[cp] = versions

settings.reset()


def words(name):
    return sorted(settings.get(name, "").lower().split())


doc = {
    "format": "pacloud-tree-index-v1",
    "repository": main.name,
    "profile": os.path.realpath(os.path.join(cfg, "etc/portage/make.profile")),
    "portage": portage.VERSION,
    "ebuilds": count,
    "use_expand": words("USE_EXPAND"),
    "use_expand_hidden": words("USE_EXPAND_HIDDEN"),
    "use_expand_unprefixed": words("USE_EXPAND_UNPREFIXED"),
    "packages": packages,
}
json.dump(doc, sys.stdout, sort_keys=True, separators=(",", ":"))
